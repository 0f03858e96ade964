"""The hot path's shortcuts agree with the general code they stand in for.

Each shortcut (model-first sniff, relaying the backend's head as it is, the
reused response parser, the rfind token tap) is checked against the slow,
general path on the same bytes, without sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq_fast.config import parse_backend_url
from ollamamq_fast.fleet.backend import Backend
from ollamamq_fast.proxy.flow import FlowControl
from ollamamq_fast.proxy.pool import UpstreamPool
from ollamamq_fast.proxy.upstream import ResponseSink, UpstreamConnection
from ollamamq_fast.stats import tokens_in_tail
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.sniff import (
    SniffError,
    exact_disagrees,
    scanned_fields,
    sniff_fields,
)

# -- Sniff: the model-first fast path -------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5),
    st.text(alphabet='abcdeklmosMOD {}[]:,"\\\u017f\u212a', max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["model", "Model", "x", "role", "name"]), inner,
                        max_size=3),
    ),
    max_leaves=6,
)
# With the letters Go folds from non-ASCII ones: the long s (to s), the Kelvin sign (to k).
_keys = st.sampled_from(["model", "MODEL", "Model", "name", "prompt", "options", "x",
                         "source", "\u017fource", "\u212aey"])


def _outcome(fn, body: bytes, keys: tuple[str, ...]) -> object:
    try:
        return fn(body, keys)
    except SniffError:
        return "SniffError"


@settings(max_examples=400, deadline=None)
@given(
    first=st.one_of(st.text(alphabet='abcxyz.:/"\\\u00e9', max_size=10), st.none(),
                    st.integers(0, 3)),
    first_key=st.sampled_from(["model", "Model", "name", "x", "source", "key"]),
    rest=st.lists(st.tuples(_keys, _values), max_size=4),
    keys=st.sampled_from([("model",), ("model", "name"), ("source",), ("key",)]),
    spaced=st.booleans(),
    ascii_only=st.booleans(),
)
def test_fast_sniff_agrees_with_the_member_scan(first, first_key, rest, keys, spaced,
                                                ascii_only) -> None:
    separators = (", ", ": ") if spaced else (",", ":")

    def dumps(v: object) -> str:
        return json.dumps(v, separators=separators, ensure_ascii=ascii_only)

    members = [dumps(first_key) + separators[1] + dumps(first)]
    members += [dumps(k) + separators[1] + dumps(v) for k, v in rest]
    body = ("{" + separators[0].join(members) + "}").encode()
    assert _outcome(sniff_fields, body, keys) == _outcome(scanned_fields, body, keys)


# Key spellings as written in the body: Go reads them all as `model`, an exact
# reader only those that decode to `model` exactly.
_model_keys = st.sampled_from(['"model"', '"Model"', '"MODEL"', '"mod\\u0065l"',
                               '"MOD\\u0045L"', '"\\u006dodel"', '"x"', '"role"'])


@settings(max_examples=400, deadline=None)
@given(members=st.lists(st.tuples(_model_keys, st.one_of(
           st.none(), st.sampled_from(["a", "b", "model", 'a"b']), _values)), max_size=5),
       spaced=st.booleans())
def test_exact_disagrees_matches_both_readings(members, spaced) -> None:
    """The model a /v1 body names to Go and to an exact-name reader (vLLM, llama.cpp)."""
    sep = ", " if spaced else ","
    body = ("{" + sep.join(k + ":" + json.dumps(v) for k, v in members) + "}").encode()
    try:
        found = sniff_fields(body, ("model",))
    except SniffError:
        return  # a non-string model: refused before
    exact = None
    for key, value in json.loads(body, object_pairs_hook=list):
        if key == "model":
            exact = value
    assert bool(exact_disagrees(body, ("model",), found)) == (exact != found.get("model")), body


@pytest.mark.parametrize("body, expect", [
    (b'{"model":"a","messages":[{"role":"user","content":"hi"}]}', {"model": "a"}),
    (b'{"model":"a","x":{"model":"decoy"}}', {"model": "a"}),  # nested: general path
    (b'{"model":"a","MODEL":"b"}', {"model": "b"}),  # Go: the last duplicate wins
    (b'{"model":"a","role":"model"}', {"model": "a"}),  # "model" as a value
    (b'{"model":null,"x":1}', {}),
    # Go leaves a string field as it was on null: the earlier value stays.
    (b'{"model":"a","model":null}', {"model": "a"}),
    (b'{"model":"a","x":[1],"Model":null}', {"model": "a"}),
    (b'{"model":null,"model":"b","model":null}', {"model": "b"}),
    (b'{"Model":"M"}', {"model": "M"}),
    (b'{"model":"a\\"b"}', {"model": 'a"b'}),  # an escape in the first value: general path
    (b'{"model":"a","x":"\\"model\\""}', {"model": "a"}),  # a key-like escaped value
    (b'{"model":"\xc3\xa9t\xc3\xa9"}', {"model": "\u00e9t\u00e9"}),  # UTF-8 in the value
    # A lone surrogate escape is U+FFFD, as Go decodes it; a valid pair is one character.
    (b'{"model":"\\ud800x"}', {"model": "\ufffdx"}),
    (b'{"model":"\\udc00\\ud800\\ud800"}', {"model": "\ufffd\ufffd\ufffd"}),
    (b'{"model":"\\ud83d\\ude00"}', {"model": "\U0001f600"}),
    (b'{"\\u006dodel":"\\ud800"}', {"model": "\ufffd"}),
])
def test_fast_sniff_cases(body: bytes, expect: dict[str, str]) -> None:
    assert sniff_fields(body, ("model",)) == expect == scanned_fields(body, ("model",))


@pytest.mark.parametrize("body, keys, expect", [
    ('{"source":"a","\u017fource":"b"}'.encode(), ("source",), {"source": "b"}),
    ('{"key":"a","\u212aEY":"b"}'.encode(), ("key",), {"key": "b"}),
    ('{"model":"a","\u017f":"b"}'.encode(), ("model",), {"model": "a"}),
    # Go's simple folding, not Python's full casefold(): `ß` is not "ss", the
    # `ﬅ` ligature not "st", the dotted capital I not "i".
    ('{"mass":"a","ma\u00df":"b","MA\u1e9e":"c"}'.encode(), ("mass",), {"mass": "a"}),
    ('{"stop":"a","\ufb05op":"b","\\ufb06op":"c"}'.encode(), ("stop",), {"stop": "a"}),
    ('{"kiss":"a","\u0130ss":"b"}'.encode(), ("kiss",), {"kiss": "a"}),
    ('{"kiss":"a","\\u212aIS\u017f":"b"}'.encode(), ("kiss",), {"kiss": "b"}),
])
def test_fast_sniff_folds_keys_as_go_does(body: bytes, keys: tuple[str, ...],
                                          expect: dict[str, str]) -> None:
    assert sniff_fields(body, keys) == expect == scanned_fields(body, keys)


@pytest.mark.parametrize("body", [b'{"model":"a"', b'{"model":5}', b'{"model":{"a":1}}', b"[]"])
def test_fast_sniff_leaves_broken_bodies_to_the_scan(body: bytes) -> None:
    with pytest.raises(SniffError):
        sniff_fields(body, ("model",))


@pytest.mark.parametrize("body", [b'{"model":"a",}', b'{"model":"a","x":}', b'{"model":"a","x":1,,}'])
def test_fast_sniff_routes_a_body_broken_after_its_model(body: bytes) -> None:
    """The backend's own decoder judges the rest (its 400 comes back as it is)."""
    assert sniff_fields(body, ("model",)) == {"model": "a"}


# -- Relaying the backend's head -------------------------------------------------------

_EXTRA = b"X-Gateway-Backend: b\r\n"


def _hop_by_hop(raw: bytes) -> bool:
    """What response_framing says of the head's header names (the hot path's way)."""
    headers = [tuple(line.split(b": ", 1)) for line in raw.split(b"\r\n")[1:]]
    return framing.response_framing(200, headers, False)[2]  # type: ignore[arg-type]


def _rebuilt(raw: bytes, close: bool) -> bytes:
    """What the general head builder makes of the same raw head."""
    lines = raw.split(b"\r\n")
    _, status, reason_phrase = lines[0].split(b" ", 2)
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    return framing.response_head(int(status), reason_phrase, headers, _EXTRA, close)


@pytest.mark.parametrize("close", [False, True])
def test_relayed_head_is_the_rebuilt_head(close: bool) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
           b"Date: Wed, 02 Dec 2026 07:00:00 GMT\r\nTransfer-Encoding: chunked")
    headers = [tuple(line.split(b": ", 1)) for line in raw.split(b"\r\n")[1:]]
    found = framing.response_framing(200, headers, False)  # type: ignore[arg-type]
    assert found == (framing.Framing.CHUNKED, b"application/x-ndjson", False)
    assert framing.relay_head(raw, _EXTRA, close, found[2]) == _rebuilt(raw, close)


@pytest.mark.parametrize("header", [
    b"Connection: close", b"connection: keep-alive", b"Keep-Alive: timeout=5", b"TE: trailers",
    b"Trailer: X", b"Upgrade: h2c", b"Proxy-Connection: x", b"proxy-authenticate: Basic",
])
def test_hop_by_hop_header_forces_a_rebuild(header: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + header
    assert _hop_by_hop(raw) is True
    assert framing.relay_head(raw, _EXTRA, False, _hop_by_hop(raw)) is None
    name = header.split(b":")[0].lower()
    assert b"\r\n" + name + b":" not in _rebuilt(raw, False).lower()


def test_http10_status_line_is_rebuilt() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Length: 2"
    assert framing.relay_head(raw, _EXTRA, False, _hop_by_hop(raw)) is None


# -- The response parser kept across responses ------------------------------------------


class _Sink(ResponseSink):
    """Stands in for the exchange: collects what the client would get."""

    def __init__(self, transport: _Recorder) -> None:
        super().__init__()
        self.transport = transport
        self.done = 0

    @property
    def client_transport(self) -> Any:
        return self.transport

    def response_head(self, conn: UpstreamConnection) -> bytes:
        return b"HEAD(%d)" % conn.status

    def response_complete(self, conn: UpstreamConnection) -> None:
        self.done += 1

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        raise AssertionError(f"lost: {exc!r}")

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass


class _Pool(UpstreamPool):
    def __init__(self) -> None:
        super().__init__(Backend(parse_backend_url("http://b:1"), 1), None)  # type: ignore[arg-type]

    def forget(self, conn: UpstreamConnection) -> None:
        pass


@pytest.mark.parametrize("order", [("GET", "HEAD", "GET"), ("HEAD", "GET", "GET")])
def test_parser_is_kept_or_replaced_between_responses(order: tuple[str, ...]) -> None:
    conn = UpstreamConnection(_Pool())
    conn.connection_made(_Recorder())  # type: ignore[arg-type]
    client = _Recorder()
    for i, method in enumerate(order):
        sink = _Sink(client)
        conn.send(sink, FlowControl(client), [b"request"], head_request=method == "HEAD")
        body = b"" if method == "HEAD" else b"%05d" % i
        # A HEAD answer announces a length but has no body: the parser cannot
        # know that, so the connection must not reuse it for the next answer.
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        assert sink.done == 1, (i, method)
        assert conn.status == 200
        assert client.data[-1] == b"HEAD(200)" + body


def test_response_head_in_one_byte_pieces() -> None:
    conn = UpstreamConnection(_Pool())
    conn.connection_made(_Recorder())  # type: ignore[arg-type]
    client = _Recorder()
    sink = _Sink(client)
    conn.send(sink, FlowControl(client), [b"request"], head_request=False)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    for i in range(len(answer)):
        conn.data_received(answer[i : i + 1])
    assert sink.done == 1
    assert conn.raw_head == answer.split(b"\r\n\r\n")[0]
    assert b"".join(client.data) == b"HEAD(200)hello"


# -- Token tap ------------------------------------------------------------------------


@pytest.mark.parametrize("tail, expect", [
    (b'{"done":true,"prompt_eval_count":21,"eval_count":7}', (21, 7)),
    (b'{"done":true,"prompt_eval_count": 21}', (21, 0)),  # an embedding answer: prompt only
    (b'"usage":{"prompt_tokens":8,"total_tokens":8}}', (8, 0)),  # OpenAI embeddings
    (b'{"prompt_eval_count" : 4 , "eval_count" : 6 }', (4, 6)),  # spaced JSON
    (b'"usage": {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {}}',
     (3, 4)),
    (b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}', (3, 4)),
    (b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\ndata: [DONE]\n\n', (3, 4)),
    (b'{"eval_count":2}\n{"prompt_eval_count":5,"eval_count":9}\n', (5, 9)),  # last one wins
    (b'{"eval_count":"x"}', (0, 0)),
])
def test_tokens_in_tail(tail: bytes, expect: tuple[int, int]) -> None:
    assert tokens_in_tail(tail) == expect


# -- The measuring tools themselves ------------------------------------------------------

_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_floor_proxy_relays_a_request() -> None:
    """bench/floor_proxy.py, the yardstick of bench/compare_wrk.sh, still proxies."""
    import subprocess
    import sys
    import time

    from harness import fast_sim_options, free_port, raw_request, start_stack

    stack = start_stack([fast_sim_options()])
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(_ROOT / "bench" / "floor_proxy.py"), str(port),
                             str(stack.sims[0].port)])
    try:
        body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
        request = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                   % (len(body), body))
        deadline = time.monotonic() + 15
        while True:
            try:
                answer = raw_request(port, request)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 200") and b'"done":true' in answer
    finally:
        proc.kill()
        proc.wait()
        stack.close()


def test_stream_source_streams_through_a_gateway() -> None:
    """bench/stream_source.py, the stream target's backend, is a backend the gateway
    takes (model discovery, health) and its stream is relayed and counted whole."""
    import subprocess
    import sys
    import time

    import httpx
    from harness import free_port, start_stack

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(_ROOT / "bench" / "stream_source.py"),
                             str(port), "100"])
    stack = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=2).status_code == 200
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "stream_source did not start"
                time.sleep(0.1)
        stack = start_stack([], extra_backends=[f"http://127.0.0.1:{port}"])
        r = httpx.post(f"{stack.url}/api/generate", json={"model": "llama3.2", "prompt": "hi"},
                       timeout=10)
        lines = r.text.splitlines()
        assert r.status_code == 200 and len(lines) == 100
        assert '"done":true' in lines[-1] and '"eval_count":99' in lines[-1]
        deadline = time.monotonic() + 10
        while stack.state.stats.completion_tokens < 99:  # counted when the answer ends
            assert time.monotonic() < deadline, stack.state.stats.completion_tokens
            time.sleep(0.02)
        assert stack.state.stats.prompt_tokens == 1
    finally:
        if stack is not None:
            stack.close()
        proc.kill()
        proc.wait()


def test_hotpath_script_measures() -> None:
    """profiling/hotpath.py runs a real gateway's protocols and reports a figure."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(_ROOT / "profiling" / "hotpath.py"), "-n", "500",
                          "--rounds", "1", "--route", "chat"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "us of gateway Python per request" in out and "HTTP/1.1 200 OK" in out


def test_hotpath_script_measures_a_stream_read_by_read() -> None:
    """`--route stream` feeds a 100-line stream one line a read and reports the cost per read."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(_ROOT / "profiling" / "hotpath.py"), "-n", "50",
                          "--rounds", "1", "--route", "stream"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "102 chunk reads per request" in out and "us per read" in out, out


@pytest.mark.parametrize(("content_type", "mark"), [
    (b"application/x-ndjson", b"}\n"), (b"Application/X-NDJSON; charset=utf-8", b"}\n"),
    (b"text/event-stream; charset=utf-8", b"data:"), (b"application/json; charset=utf-8", b""),
    (b"", b""),
])
def test_event_mark_of_a_content_type_the_same_on_every_call(content_type: bytes,
                                                              mark: bytes) -> None:
    assert framing.event_mark(content_type) == mark
    assert framing.event_mark(content_type) == mark  # the second answer comes from the memo
