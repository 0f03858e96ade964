"""Access log lines cannot be forged or split by client-controlled text (issue 14).

The user id, path, request id and model come from the client; whatever they
hold, a logfmt line parses to exactly our fields with the values sent, and a
JSON line is one JSON object, in a file read line by line with any reader's
idea of a line break.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import free_port, start_stack
from hypothesis import given, settings
from hypothesis import strategies as hst

from ollamamq_fast.accesslog import FIELDS, AccessLog

HOSTILE = ["plain", "a b", "x status=999 user=root", 'q" status=999 z="', "back\\slash",
           'end\\" status=999', "a\tstatus=999", "k=v", '"', "\\", "", "line\nstatus=999",
           "cr\rstatus=999", "nul\x00x", "del\x7fx", "nel\x85status=999", "ls\u2028status=999",
           "ps\u2029x", "esc\x1b[31mred", "\u00fcn\u00ef", "tag\U000e0001", "=", "a=b=c"]
PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]*)(?: |$)')


def parse_logfmt(line: str) -> list[tuple[str, str]]:
    """Pairs of one logfmt line (quoted values are JSON strings); ValueError otherwise."""
    pairs, pos = [], 0
    while pos < len(line):
        m = PAIR.match(line, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"not logfmt at {pos}: {line[pos:pos + 40]!r}")
        value = m.group(2)
        pairs.append((m.group(1), json.loads(value) if value.startswith('"') else value))
        pos = m.end()
    return pairs


def _write(tmp_path: Path, fmt: str) -> list[str]:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), fmt)
    for i, text in enumerate(HOSTILE):
        log.record(1_700_000_000.5 + i, text, "10.0.0.1", b"POST", ("/api/" + text).encode(
            "latin-1", "replace"), text, 200, "http://b:1", 1, 2, 3, 4, text.encode(
            "latin-1", "replace"))
    log.stop()
    text = path.read_bytes().decode("utf-8")
    lines = text.splitlines()  # splits on \x85, \u2028... too: none may appear raw
    assert len(lines) == len(HOSTILE) and text.count("\n") == len(HOSTILE)
    return lines


def test_logfmt_values_never_forge_or_split(tmp_path: Path) -> None:
    lines = _write(tmp_path, "logfmt")
    for text, line in zip(HOSTILE, lines, strict=True):
        pairs = parse_logfmt(line)
        assert [k for k, _ in pairs] == list(FIELDS), line
        values = dict(pairs)
        assert values["user"] == text and values["model"] == text, (text, line)
        assert values["status"] == "200"


@pytest.mark.parametrize("fmt", ["json"])
def test_json_lines_are_one_object_each(tmp_path: Path, fmt: str) -> None:
    for text, line in zip(HOSTILE, _write(tmp_path, fmt), strict=True):
        assert json.loads(line)["user"] == text


class _StalledStream(io.StringIO):
    """A log destination that blocks every write until released (a stalled disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_stalled_disk_never_blocks_the_loop_and_drops_with_a_count() -> None:
    stream = _StalledStream()
    log = AccessLog(None, "json", max_pending=1000, stream=stream)
    log.start()
    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0, 0, 0, b"r")
    t0 = time.perf_counter()
    for _ in range(20_000):
        log.record(*fields)
    took = time.perf_counter() - t0
    assert took < 1.0, took  # appends only, however stuck the writer is
    assert log.dropped >= 20_000 - 1000 - 5_000 and len(log.pending) <= 1000
    counters = log.counters()
    assert counters["dropped"] == log.dropped and counters["pending"] <= 1000
    stream.release.set()
    log.stop()
    assert log.written + log.dropped == 20_000
    assert stream.getvalue().count("\n") == log.written


def _serve_one_request(tmp_path: Path, *args: str) -> tuple[str, str]:
    """Run `serve --no-tui` with `args`, send one request, stop; (stderr, log file text)."""
    port = free_port()
    log = tmp_path / "access.log"
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui",
                             "--state", "", "--no-admin", "-p", str(port),
                             "--log-format", "logfmt", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/api/generate",
                               json={"model": "llama3.2", "prompt": "q", "stream": False},
                               headers={"X-User-ID": "probe-user"}, timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.05)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err, log.read_text() if log.exists() else ""


def test_no_tui_access_lines_go_to_the_rotated_file_only(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    err, text = _serve_one_request(tmp_path, "--log-file", str(log))
    assert "user=probe-user" in text
    assert "probe-user" not in err, err


def test_log_file_dash_is_stderr(tmp_path: Path) -> None:
    err, text = _serve_one_request(tmp_path, "--log-file", "-")
    assert "user=probe-user" in err and text == ""


def test_counters_are_in_stats_and_metrics(tmp_path: Path) -> None:
    st = start_stack(admin_port=0, admin_token="t0k", log_file=str(tmp_path / "a.log"))
    try:
        st.state.access.dropped = 7
        admin = f"http://127.0.0.1:{st.gateway.admin_port}"
        auth = {"Authorization": "Bearer t0k"}
        stats = httpx.get(admin + "/api/stats", headers=auth, timeout=5).json()
        assert stats["access_log"]["dropped"] == 7
        metrics = httpx.get(admin + "/metrics", headers=auth, timeout=5).text
        assert 'ollamamq_access_log_lines_total{state="dropped"} 7.0' in metrics
        assert "ollamamq_access_log_pending" in metrics
    finally:
        st.close()


def test_a_compiled_line_carries_every_field_and_the_batch_takes_its_limit() -> None:
    from ollamamq_fast.accessline import LineWriter

    writer = LineWriter()
    stamp = writer.stamp
    assert stamp.text(1_700_000_000.5) == b"2023-11-14T22:13:20.500Z"
    assert stamp.text(1_700_000_001.0429) == b"2023-11-14T22:13:21.042Z"
    fields = (1_700_000_000.25, "alice", "10.0.0.1", b"POST", b"/api/chat", "m:latest", 200,
              "http://b:1", 3, 1.25, 7, 9, b"rid")
    line = writer.line(fields)
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert list(record) == list(FIELDS)
    assert list(record.values())[1:] == ["alice", "10.0.0.1", "POST", "/api/chat", "m:latest",
                                         200, "http://b:1", 3, 1.25, 7, 9, "rid"]
    assert record["ts"] == "2023-11-14T22:13:20.250Z"
    # Large numbers, other types and a value already kept give the same JSON.
    big = (*fields[:6], 599, "http://b:1", 100_000, 0.5, 1024, 10**12, "rid2")
    assert json.loads(writer.line(big)) == dict(zip(FIELDS, [
        "2023-11-14T22:13:20.250Z", "alice", "10.0.0.1", "POST", "/api/chat", "m:latest", 599,
        "http://b:1", 100_000, 0.5, 1024, 10**12, "rid2"], strict=True))
    pending = [fields] * 5
    data, n = writer.batch(pending, 3)
    assert n == 3 and data.count(b"\n") == 3 and len(pending) == 2


def test_the_line_writer_keeps_few_and_short_values() -> None:
    from ollamamq_fast.accessline import LineWriter

    writer = LineWriter()
    fields = [1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.25, 0, 0, b"r"]
    for i in range(10_000):
        fields[1] = f"user-{i}"
        writer.line(tuple(fields))
    assert 0 < len(writer.rows) <= 4096
    fields[5] = "m" * 100_000
    assert json.loads(writer.line(tuple(fields)))["model"] == "m" * 100_000
    assert not any(len(part) > 1024 for part in writer.rows.values())


_NUMBERS = hst.sampled_from([0, 1, 7, 300, 10**6, None])


@given(hst.lists(hst.tuples(hst.sampled_from(["u", "v"]), hst.sampled_from([b"/a", b"/b"]),
                           hst.sampled_from([200, 404]), hst.sampled_from(["m", "n"]),
                           _NUMBERS, hst.sampled_from([0.0, 0.5, 1.25, 1.5, 250.0]),
                           _NUMBERS, _NUMBERS),
                 max_size=30))
@settings(max_examples=300, deadline=None)
def test_each_line_has_its_own_fields_whatever_came_before(
        rows: list[tuple[str, bytes, int, str, int | None, float, int | None, int | None]]) -> None:
    # The writer reuses the last line's row and numbers when the next has
    # the same ones (accessline.py): a line must never carry a neighbour's
    # user, path, status, model, queue time, duration or token counts. Paths
    # and big numbers are fresh objects, as they are per request.
    from ollamamq_fast.accessline import LineWriter

    writer = LineWriter()
    for user, path, status, model, queue, ms, prompt, completion in rows:
        fresh = [int(str(n)) if n is not None else None for n in (queue, prompt, completion)]
        fields = (1.0, user, "ip", b"GET", bytes(path), model, status, "b", fresh[0], ms,
                  fresh[1], fresh[2], b"r")
        line = writer.line(fields)
        assert line == LineWriter().line(fields)
        record = json.loads(line)
        assert (record["user"], record["path"], record["status"], record["model"]) == (
            user, path.decode(), status, model)
        assert (record["queue_ms"], record["duration_ms"], record["prompt_tokens"],
                record["completion_tokens"]) == (queue, ms, prompt, completion)


@pytest.mark.parametrize("ms", [0.0, 0.01, 0.5, 1.25, 9.99, 10.0, 1023.99, 1024.5, 123456.78])
def test_durations_keep_their_two_places(ms: float) -> None:
    from ollamamq_fast.accessline import LineWriter

    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, ms, 0, 0, b"r")
    assert json.loads(LineWriter().line(fields))["duration_ms"] == ms


@pytest.mark.parametrize("rid", [b"", b"5f0e-aa", b"a b", b'q"x', b"back\\slash", b"\xff", b"x\x7f"])
def test_request_ids_are_written_as_json_whatever_they_hold(rid: bytes) -> None:
    from ollamamq_fast.accessline import LineWriter

    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, rid)
    line = LineWriter().line(fields)
    assert line.count(b"\n") == 1 and json.loads(line)["request_id"] == rid.decode("latin-1")


def test_a_request_id_is_plain_exactly_when_every_byte_is_a_plain_one() -> None:
    from ollamamq_fast.accessline import _PLAIN_ID, _plain_id

    for c in range(256):  # NUL too: the table must not map it to itself
        one = bytes([c])
        assert _plain_id(one) is (c in _PLAIN_ID), c
        assert _plain_id(b"abc" + one + b"xyz") is (c in _PLAIN_ID), c
    assert _plain_id(b"") and _plain_id(_PLAIN_ID)


def test_the_writer_formats_in_slices_so_the_loop_gets_the_gil_between_them() -> None:
    """Compiled formatting never lets go of the GIL by itself: a batch of thousands of
    lines in one call would stall the event loop for milliseconds."""
    from ollamamq_fast.accesslog import SLICE_LINES

    stream = io.StringIO()
    log = AccessLog(None, "json", stream=stream)
    asked: list[int] = []
    real = log._lines

    class Slices:
        stamp = real.stamp

        def batch(self, pending: Any, limit: int) -> tuple[bytes, int]:
            asked.append(limit)
            return real.batch(pending, limit)

    log._lines = Slices()  # type: ignore[assignment]
    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, b"r")
    for _ in range(1000):
        log.record(*fields)
    log.flush()
    assert stream.getvalue().count("\n") == 1000 and log.written == 1000
    assert len(asked) >= 1000 // SLICE_LINES and max(asked) <= SLICE_LINES


def test_the_loop_formats_in_slices_and_the_thread_only_writes() -> None:
    """The writer thread must not format (it would hold the GIL the loop needs)."""
    import asyncio

    from ollamamq_fast.accesslog import SLICE_LINES

    stream = io.StringIO()
    log = AccessLog(None, "json", stream=stream)
    formatted_on: set[str] = set()
    real = log._lines

    class Spy:
        stamp = real.stamp

        def batch(self, pending: Any, limit: int) -> tuple[bytes, int]:
            formatted_on.add(threading.current_thread().name)
            assert limit <= SLICE_LINES
            return real.batch(pending, limit)

    log._lines = Spy()  # type: ignore[assignment]
    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, b"r")

    async def run() -> None:
        log.start(asyncio.get_running_loop())
        assert log._timer is None  # nothing to format: no wake-ups
        for burst in range(2):
            for _ in range(500):
                log.record(*fields)
            deadline = time.monotonic() + 20
            while log.written < 500 * (burst + 1):
                assert time.monotonic() < deadline, log.counters()
                await asyncio.sleep(0.01)
            assert not log.pending and log._timer is None
        log.stop()

    asyncio.run(run())
    assert log._timer is None  # all formatted: nothing scheduled while idle
    assert formatted_on == {"MainThread"}
    assert stream.getvalue().count("\n") == 1000
    assert log.counters() == {"written": 1000, "dropped": 0, "pending": 0}


def test_a_stalled_disk_stops_the_formatting_then_drops_and_the_loop_runs_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from ollamamq_fast import accesslog

    monkeypatch.setattr(accesslog, "MAX_READY_BYTES", 20_000)
    stream = _StalledStream()
    log = AccessLog(None, "json", max_pending=500, stream=stream)
    fields = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, b"r")
    ticks: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        log.start(loop)
        deadline = time.monotonic() + 20
        for _ in range(200):
            for _ in range(50):
                log.record(*fields)
            t0 = loop.time()
            await asyncio.sleep(0.005)
            ticks.append(loop.time() - t0)
            assert time.monotonic() < deadline
        # Formatted bytes stopped within one slice of the bound (lines are
        # under 200 bytes); the rest waits or was dropped.
        waiting = log.formatted_bytes - log.written_bytes
        assert waiting < 20_000 + accesslog.SLICE_LINES * 200, waiting
        assert len(log.pending) <= 500 and log.dropped > 0
        stream.release.set()
        log.stop()

    asyncio.run(run())
    assert max(ticks) < 1.0  # the loop was never held by the stalled write
    assert log.written + log.dropped == 200 * 50
    assert stream.getvalue().count("\n") == log.written


def _logged(tmp_path: Path, send: Any, lines: int) -> list[dict[str, Any]]:
    """Run `send(client, url)` against a gateway (uvloop, simulator) that logs to a
    file; its JSON lines once `lines` of them are written, with none dropped."""
    st = start_stack(log_file=str(tmp_path / "a.log"))
    try:
        with httpx.Client(timeout=10) as client:
            send(client, st.url)
        deadline = time.monotonic() + 20
        while st.state.access.written < lines:
            assert time.monotonic() < deadline, st.state.access.counters()
            time.sleep(0.05)
        assert st.state.access.dropped == 0
    finally:
        st.close()
    return [json.loads(x) for x in (tmp_path / "a.log").read_text().splitlines()]


def test_durations_are_timed_finer_than_the_loops_millisecond(tmp_path: Path) -> None:
    # uvloop's loop.time() moves in whole milliseconds: durations read from it
    # were 0.00 or 1.00 for every fast answer.
    def send(client: httpx.Client, url: str) -> None:
        for _ in range(20):
            r = client.post(f"{url}/api/generate",
                            json={"model": "llama3.2", "prompt": "hi", "stream": False})
            assert r.status_code == 200

    lines = _logged(tmp_path, send, 20)
    durations = [x["duration_ms"] for x in lines if x["path"] == "/api/generate"]
    assert len(durations) == 20
    assert any(d != int(d) for d in durations), durations
    # One clock for a request's start and end: the ledger once read the end
    # from the loop's whole milliseconds, and fast answers took "-0.4 ms".
    assert all(d > 0 for d in durations), durations


def test_the_ledger_times_requests_with_the_clock_that_stamps_their_start() -> None:
    st = start_stack()
    try:
        state = st.state
        assert state.ledger.loop_time is state.loop_time
        with httpx.Client(timeout=10) as client:
            for _ in range(30):
                r = client.post(f"{st.url}/api/generate",
                                json={"model": "llama3.2", "prompt": "hi", "stream": False})
                assert r.status_code == 200
        assert state.stats.latency.count >= 30
        assert state.stats.latency.low > 0 and state.stats.ttfb.low > 0
    finally:
        st.close()


def test_a_lone_surrogate_in_a_model_name_is_answered_logged_and_harmless(
        tmp_path: Path) -> None:
    # `\ud800` is valid JSON escape syntax but no character: Go (Ollama) reads
    # it as U+FFFD. Read as a lone surrogate it broke every UTF-8 writer: the
    # error answer (the request hung), the access line, the usage store.
    def send(client: httpx.Client, url: str) -> None:
        r = client.post(f"{url}/api/generate",
                        content=b'{"model":"\\ud800x","prompt":"hi","stream":false}')
        assert r.status_code == 404 and r.json() == {"error": "model '\ufffdx' not found"}
        r = client.post(f"{url}/v1/chat/completions", content=b'{"model":"\\udfff","messages":[]}')
        assert r.status_code == 404 and "\ufffd" in r.json()["error"]["message"]
        r = client.post(f"{url}/api/generate",
                        json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert r.status_code == 200

    lines = _logged(tmp_path, send, 3)
    assert [x["model"] for x in lines] == ["\ufffdx", "\ufffd", "llama3.2"]


def test_a_line_that_cannot_be_formatted_is_dropped_with_a_count_not_the_log() -> None:
    import asyncio

    stream = io.StringIO()
    log = AccessLog(None, "json", stream=stream)
    good = (1.0, "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, b"r")
    bad = ("not a time", "u", "ip", b"GET", b"/", "m", 200, "b", 0, 0.0, 0, 0, b"r")

    async def run() -> None:
        log.start(asyncio.get_running_loop())
        log.record(*bad)
        deadline = time.monotonic() + 20
        while not log.dropped:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        log.record(*good)
        while log.written < 1:
            assert time.monotonic() < deadline, log.counters()
            await asyncio.sleep(0.01)
        log.stop()

    asyncio.run(run())
    assert log.dropped == 1 and stream.getvalue().count("\n") == 1


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_a_record_that_cannot_be_formatted_costs_its_slice_not_the_log(fmt: str) -> None:
    # A bug's record (here one field short) and those before it in its slice
    # are dropped and counted; it is not tried again, and later ones go out.
    good = (1_700_000_000.25, "alice", "10.0.0.1", b"POST", b"/api/chat", "m", 200,
            "http://b:1", 3, 1.25, 7, 9, b"rid")
    out = io.StringIO()
    log = AccessLog(None, fmt=fmt, stream=out)
    log.pending.extend([good, good[:-1], good, good])
    log._format(3)
    assert log.dropped == 2 and log.pending == [good, good]
    log._format(3)
    assert log.formatted_lines == 2 and not log.pending
