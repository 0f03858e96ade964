"""Usage an operator can see (issue 15): /api/usage, the `usage` CLI, counters after a
restart, retention, and token budgets with their alerts.

The report logic is tested on plain rows; the API, the CLI and restarts on a
real gateway in front of the simulator, with its state in a temporary SQLite
file; budgets on the usage keeper over a real SQLite store.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Stack, start_stack
from test_traps import wait_for

from ollamamq_fast.accounting import keeper as keeper_mod
from ollamamq_fast.accounting.keeper import UsageKeeper
from ollamamq_fast.cli import main as cli_main
from ollamamq_fast.control.usage import (
    UsageQuery,
    UsageQueryError,
    parse_query,
    report,
    to_csv,
    totals,
)
from ollamamq_fast.control.usage_cli import to_table
from ollamamq_fast.limits import Limits
from ollamamq_fast.state.records import Usage, UsageHour
from ollamamq_fast.state.sqlite import SQLiteStore
from ollamamq_fast.stats import GatewayStats

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

ROWS = [
    UsageHour("2024-01-01T09", "alice", "k1", "llama3", "http://b1", 2, 1, 0, 0, 10, 20),
    UsageHour("2024-01-01T10", "alice", "k2", "llama3", "http://b2", 1, 0, 1, 7, 0, 7),
    UsageHour("2024-01-01T10", "bob", "", "qwen", "http://b1", 3, 0, 0, 0, 3, 30),
    UsageHour("2024-01-02T00", "alice", "k1", "qwen", "http://b1", 1, 0, 0, 0, 1, 1),
    UsageHour("2024-02-01T00", "bob", "", "qwen", "http://b2", 1, 0, 0, 0, 5, 5),
]


def q(**query: str) -> UsageQuery:
    return parse_query({k: [v] for k, v in query.items()}, now=time.time())


# -- The report --------------------------------------------------------------------


def test_report_groups_by_day_user_and_model_by_default() -> None:
    items = report(ROWS, q(**{"from": "2024-01-01", "to": "2024-01-02"}))
    assert [(i["period"], i["user"], i["model"], i["requests"], i["total_tokens"])
            for i in items] == [
        ("2024-01-01", "alice", "llama3", 3, 37),
        ("2024-01-01", "bob", "qwen", 3, 33),
        ("2024-01-02", "alice", "qwen", 1, 2),
    ]
    first = items[0]
    assert (first["errors"], first["cancelled"], first["estimated_tokens"]) == (1, 1, 7)
    assert first["exact"] is False and items[1]["exact"] is True
    assert totals(items)["total_tokens"] == 72


@pytest.mark.parametrize(("by", "expected"), [
    ("key", {"k1": 32, "k2": 7, "": 43}),
    ("backend", {"http://b1": 65, "http://b2": 17}),
    ("model", {"llama3": 37, "qwen": 45}),
    ("user", {"alice": 39, "bob": 43}),
])
def test_report_groups_by_any_dimension(by: str, expected: dict[str, int]) -> None:
    items = report(ROWS, q(**{"from": "2024-01-01", "to": "2024-02-01", "step": "total",
                              "by": by}))
    assert {i[by]: i["total_tokens"] for i in items} == expected
    assert all("period" not in i for i in items)


def test_report_by_hour_month_with_filters() -> None:
    hours = report(ROWS, q(**{"from": "2024-01-01T10", "to": "2024-01-01T10", "step": "hour",
                              "by": "user,key", "user": "alice"}))
    assert hours == [{"period": "2024-01-01T10", "user": "alice", "key": "k2", "requests": 1,
                      "errors": 0, "cancelled": 1, "estimated_tokens": 7, "prompt_tokens": 0,
                      "completion_tokens": 7, "total_tokens": 7, "exact": False}]
    months = report(ROWS, q(**{"from": "2024-01-01", "to": "2024-02-29", "step": "month",
                               "by": "", "backend": "http://b2"}))
    assert [(m["period"], m["total_tokens"]) for m in months] == [("2024-01", 7),
                                                                  ("2024-02", 10)]


@pytest.mark.parametrize("query", [
    {"by": "user,pool"}, {"by": "user,user"}, {"step": "week"}, {"from": "yesterday"},
    {"from": "2024-01-02", "to": "2024-01-01"}, {"from": "2024-13-01"},
])
def test_bad_queries_are_explained(query: dict[str, str]) -> None:
    with pytest.raises(UsageQueryError):
        q(**query)


def test_csv_has_a_header_and_one_line_per_row() -> None:
    query = q(**{"from": "2024-01-01", "to": "2024-01-01", "by": "user"})
    items = report(ROWS, query)
    lines = list(csv.reader(io.StringIO(to_csv(items, query).decode())))
    assert lines[0] == ["period", "user", "requests", "errors", "cancelled", "estimated_tokens",
                        "prompt_tokens", "completion_tokens", "total_tokens", "exact"]
    assert lines[1:] == [["2024-01-01", "alice", "3", "1", "1", "7", "10", "27", "37", "false"],
                         ["2024-01-01", "bob", "3", "0", "0", "0", "3", "30", "33", "true"]]


# -- The API, the CLI and restarts on a real gateway ------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    st = start_stack(admin_port=0, admin_token=TOKEN, state_path=str(tmp_path / "state.db"),
                     auth="keys")
    try:
        yield st
    finally:
        st.close()


def admin_url(st: Stack) -> str:
    return f"http://127.0.0.1:{st.gateway.admin_port}"


def chat(st: Stack, secret: str, stream: bool = False) -> httpx.Response:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}
    return httpx.post(st.url + "/api/chat", json=body,
                      headers={"Authorization": f"Bearer {secret}"}, timeout=10)


def make_traffic(st: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    with httpx.Client(base_url=admin_url(st), headers=AUTH, timeout=5) as admin:
        alice = admin.post("/api/keys", json={"user": "alice"}).json()
        bob = admin.post("/api/keys", json={"user": "bob"}).json()
    for _ in range(2):
        assert chat(st, alice["secret"]).status_code == 200
    assert chat(st, bob["secret"], stream=True).status_code == 200
    r = httpx.post(st.url + "/api/chat", json={"model": "no-such-model", "messages": []},
                   headers={"Authorization": f"Bearer {bob['secret']}"}, timeout=10)
    assert r.status_code >= 400
    return alice, bob


def test_api_usage_groups_requests_by_user_key_model_and_backend(stack: Stack) -> None:
    alice, bob = make_traffic(stack)
    backend = stack.sims[0].url
    with httpx.Client(base_url=admin_url(stack), headers=AUTH, timeout=5) as admin:
        doc = admin.get("/api/usage", params={"by": "user,key,backend", "step": "total"}).json()
        rows = {(r["user"], r["key"], r["backend"]): r for r in doc["rows"]}
        a = rows[("alice", alice["key_id"], backend)]
        assert a["requests"] == 2 and a["errors"] == 0 and a["completion_tokens"] > 0
        assert a["exact"] is True
        b = rows[("bob", bob["key_id"], backend)]
        assert b["requests"] == 1 and b["total_tokens"] > 0
        refused = [r for (u, _, be), r in rows.items() if u == "bob" and be != backend]
        assert refused and refused[0]["errors"] == 1 and refused[0]["total_tokens"] == 0
        assert doc["totals"]["requests"] == 4

        by_model = admin.get("/api/usage", params={"user": "alice", "step": "hour"}).json()
        assert [r["model"] for r in by_model["rows"]] == ["llama3.2:latest"]
        assert by_model["rows"][0]["period"] == time.strftime("%Y-%m-%dT%H", time.gmtime())

        as_csv = admin.get("/api/usage", params={"format": "csv", "by": "user"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        lines = list(csv.reader(io.StringIO(as_csv.text)))
        assert lines[0][:2] == ["period", "user"] and {r[1] for r in lines[1:]} == {"alice",
                                                                                     "bob"}
        accepted = admin.get("/api/usage", params={"by": "user"},
                             headers={"Accept": "text/csv"})
        assert accepted.text == as_csv.text

        bad = admin.get("/api/usage", params={"by": "nope"})
        assert bad.status_code == 400 and "cannot group by 'nope'" in bad.json()["error"]
        assert admin.get("/api/usage", params={"format": "xml"}).status_code == 400
        doc = admin.get("/openapi.json").json()
        assert "/api/usage" in doc["paths"] and "UsageReport" in doc["components"]["schemas"]


def test_cli_usage_table_csv_and_json(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    make_traffic(stack)
    base = ["usage", "--admin", admin_url(stack), "--token", TOKEN]
    assert cli_main([*base, "--by", "user", "--step", "total"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["user", "requests", "errors", "cancelled", "estimated", "in",
                              "out", "total"]
    assert [line.split()[0] for line in out[1:]] == ["alice", "bob", "total"]
    assert cli_main([*base, "--user", "alice", "--csv"]) == 0
    lines = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert lines[0][:3] == ["period", "user", "model"] and lines[1][1] == "alice"
    assert cli_main([*base, "--json", "--by", "model"]) == 0
    assert '"by": [\n    "model"\n  ]' in capsys.readouterr().out
    assert cli_main([*base, "--by", "pool"]) == 1
    assert "cannot group by 'pool'" in capsys.readouterr().err


def test_table_marks_estimated_figures() -> None:
    answer = {"from": "a", "to": "b", "step": "total", "by": ["user"],
              "rows": [{"user": "u", "requests": 1, "errors": 0, "cancelled": 0,
                        "estimated_tokens": 5, "prompt_tokens": 0, "completion_tokens": 5,
                        "total_tokens": 5, "exact": False}],
              "totals": {"requests": 1, "errors": 0, "cancelled": 0, "estimated_tokens": 5,
                         "prompt_tokens": 0, "completion_tokens": 5, "total_tokens": 5,
                         "exact": False}}
    text = to_table(answer)
    assert "~5" in text and "estimated from stream events" in text


def test_counters_and_usage_survive_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    first = start_stack(admin_port=0, admin_token=TOKEN, state_path=db, auth="keys")
    try:
        make_traffic(first)
        users = {u["user"]: u for u in first.lt.call(first.state.operator.list_users)}
        before = (users["alice"]["prompt_tokens"], users["alice"]["completion_tokens"],
                  users["alice"]["done"])
        stats = first.state.stats
        gateway_before = (stats.prompt_tokens, stats.completion_tokens)
        with httpx.Client(base_url=admin_url(first), headers=AUTH, timeout=5) as admin:
            report_before = admin.get("/api/usage").json()["rows"]
    finally:
        first.close()
    assert before[1] > 0 and before[2] == 2
    second = start_stack(admin_port=0, admin_token=TOKEN, state_path=db, auth="keys")
    try:
        with httpx.Client(base_url=admin_url(second), headers=AUTH, timeout=5) as admin:
            users = {u["user"]: u for u in admin.get("/api/users").json()["users"]}
            assert (users["alice"]["prompt_tokens"], users["alice"]["completion_tokens"],
                    users["alice"]["done"]) == before
            assert admin.get("/api/usage").json()["rows"] == report_before
            metrics = admin.get("/metrics").text
        stats = second.state.stats
        assert (stats.prompt_tokens, stats.completion_tokens) == gateway_before
        assert f"ollamamq_completion_tokens {float(gateway_before[1])}" in metrics or (
            f"ollamamq_completion_tokens_total {float(gateway_before[1])}" in metrics)
    finally:
        second.close()


def test_budget_alert_reaches_the_event_stream(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_mod, "CHECK_S", 0.05)
    st = start_stack(admin_port=0, admin_token=TOKEN, state_path=str(tmp_path / "s.db"),
                     auth="keys")
    try:
        events = st.lt.call(st.state.operator.events.subscribe)
        st.lt.call(lambda: st.state.operator.set_limits("alice", budget_day=5))
        with httpx.Client(base_url=admin_url(st), headers=AUTH, timeout=5) as admin:
            alice = admin.post("/api/keys", json={"user": "alice"}).json()
            limits = admin.get("/api/users/alice/limits").json()
        assert limits["effective"]["budget_day"] == 5
        assert chat(st, alice["secret"]).status_code == 200  # the simulator answers > 5 tokens
        alerts: list[dict[str, Any]] = []

        def drain() -> bool:
            while not events.empty():
                e = events.get_nowait()
                if e["type"] == "budget_alert":
                    alerts.append(e)
            return len(alerts) >= 2

        assert wait_for(lambda: st.lt.call(drain), timeout=10)
        assert [(a["scope"], a["user"], a["period"], a["threshold"]) for a in alerts] == [
            ("user", "alice", "day", 80), ("user", "alice", "day", 100)]
        assert chat(st, alice["secret"]).status_code == 200  # a budget never refuses
    finally:
        st.close()


# -- The keeper: budgets, once per period; retention --------------------------------


class KeeperRig:
    def __init__(self, path: str, now: float, user_budgets: dict[str, Limits],
                 key_budgets: dict[str, dict[str, int]]) -> None:
        self.store = SQLiteStore(path)
        self.events: list[dict[str, Any]] = []
        self.now = now

        async def no_flush() -> None:
            return None

        self.keeper = UsageKeeper(
            self.store, no_flush, GatewayStats(),
            lambda kind, **data: self.events.append({"type": kind, **data}),
            lambda user: user_budgets.get(user, Limits()), key_budgets, 30, lambda: True,
            wall=lambda: self.now)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_budgets_alert_at_80_and_100_percent_once_per_period(tmp_path: Path) -> None:
    now = 1717243200.0  # 2024-06-01T12:00Z
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime(now))

    async def body() -> None:
        rig = KeeperRig(str(tmp_path / "s.db"), now,
                        {"alice": Limits(budget_day=100, budget_month=1000)},
                        {"k1": {"budget_month": 50}})
        await rig.store.open()
        try:
            await rig.store.add_usage([], [UsageHour(hour, "alice", "k1", "m", "b",
                                                     1, 0, 0, 0, 40, 40)])
            await rig.keeper.check_budgets()
            assert [(e["scope"], e["period"], e["threshold"], e["used"]) for e in rig.events] == [
                ("key", "month", 80, 80), ("key", "month", 100, 80), ("user", "day", 80, 80)]
            assert rig.events[0]["key"] == "k1" and rig.events[2]["user"] == "alice"
            await rig.keeper.check_budgets()
            assert len(rig.events) == 3  # each once
            await rig.store.add_usage([], [UsageHour(hour, "alice", "", "m", "b",
                                                     1, 0, 0, 0, 0, 20)])
            await rig.keeper.check_budgets()
            assert [(e["period"], e["threshold"], e["used"]) for e in rig.events[3:]] == [
                ("day", 100, 100)]
        finally:
            await rig.store.close()
        # A restart remembers what was alerted (the marks are in the store).
        again = KeeperRig(str(tmp_path / "s.db"), now,
                          {"alice": Limits(budget_day=100, budget_month=1000)},
                          {"k1": {"budget_month": 50}})
        await again.store.open()
        try:
            await again.keeper.check_budgets()
            assert again.events == []
            # The next day is a new period for the daily budget; the month goes on.
            again.now = now + 86400
            next_hour = time.strftime("%Y-%m-%dT%H", time.gmtime(again.now))
            await again.store.add_usage([], [UsageHour(next_hour, "alice", "", "m", "b",
                                                       1, 0, 0, 0, 0, 90)])
            await again.keeper.check_budgets()
            assert [(e["period"], e["period_start"], e["threshold"]) for e in again.events] == [
                ("day", "2024-06-02", 80)]
        finally:
            await again.store.close()

    run(body())


def test_hourly_rows_past_the_retention_are_pruned(tmp_path: Path) -> None:
    now = 1717243200.0

    async def body() -> None:
        rig = KeeperRig(str(tmp_path / "s.db"), now, {}, {})
        await rig.store.open()
        try:
            old = time.strftime("%Y-%m-%dT%H", time.gmtime(now - 31 * 86400))
            recent = time.strftime("%Y-%m-%dT%H", time.gmtime(now - 29 * 86400))
            await rig.store.add_usage([Usage("a", "m", old[:10], 1, 1, 1)], [
                UsageHour(old, "a", "", "m", "", 1, 0, 0, 0, 1, 1),
                UsageHour(recent, "a", "", "m", "", 1, 0, 0, 0, 1, 1)])
            await rig.keeper.tick()
            assert [h.hour for h in await rig.store.usage_hours()] == [recent]
            assert len(await rig.store.usage()) == 1  # the daily totals stay (quotas)
        finally:
            await rig.store.close()

    run(body())


def test_budgets_and_retention_from_the_config_file() -> None:
    from ollamamq_fast.config import ConfigError, Settings, apply_toml

    s = Settings()
    apply_toml(s, {"usage_retention_days": 30, "limits": {
        "budget_month": 1000, "users": {"alice": {"budget_day": 10}},
        "keys": {"k1": {"budget_day": 5, "budget_month": 50}}}})
    assert s.usage_retention_days == 30 and s.limits == {"budget_month": 1000}
    assert s.user_limits == {"alice": {"budget_day": 10}}
    assert s.key_budgets == {"k1": {"budget_day": 5, "budget_month": 50}}
    for bad in ({"limits": {"keys": {"k1": {"quota_day": 5}}}},
                {"limits": {"keys": {"k1": {"budget_day": -1}}}},
                {"usage_retention_days": -1}):
        with pytest.raises(ConfigError):
            apply_toml(Settings(), bad)


def test_usage_rows_count_routes_that_reach_a_backend_not_local_answers() -> None:
    """As the README says: model management (/api/show) counts in the usage rows,
    the gateway's own answers (/api/tags, /api/ps, /api/version) do not."""
    st = start_stack()
    try:
        base = f"http://127.0.0.1:{st.port}"
        who = {"X-User-ID": "counted"}
        assert httpx.post(base + "/api/show", json={"model": "llama3.2"}, headers=who).status_code == 200
        for local in ("/api/tags", "/api/ps", "/api/version"):
            assert httpx.get(base + local, headers=who).status_code == 200
        answer = httpx.post(base + "/api/generate", headers=who,
                            json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert answer.status_code == 200

        def rows() -> list[dict[str, Any]]:
            return list(st.lt.run(st.state.operator.usage("counted")))

        assert wait_for(lambda: sum(r["requests"] for r in rows()) >= 2, timeout=10.0)
        assert sum(r["requests"] for r in rows()) == 2, rows()
    finally:
        st.close()
