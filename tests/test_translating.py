"""The translating relay, driven sans I/O (the rig of test_exchange.py).

Bytes are fed to the client protocol and to the backend connection by hand, in
pieces split anywhere (mid-chunk, mid-line), and what each fake transport got is
read back: the request as the backend sees it, the client's translated answer,
pauses, aborts, and the gateway's counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from test_exchange import CHAT, Rig, chunk, post

from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.fleet.select import Fleet
from ollamamq_fast.proxy.state import State
from ollamamq_fast.wire.routes import EXACT

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
NDJSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def sse(delta: dict[str, object], finish: str | None = None) -> bytes:
    event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


USAGE = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
         b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n')
SSE_BODY = (sse({"role": "assistant", "content": ""}) + sse({"content": "Hel"})
            + sse({"content": "lo"}) + sse({"content": "!"}, None) + sse({}, "stop") + USAGE
            + b"data: [DONE]\n\n")


def openai_rig(backends: int = 1, **settings: object) -> Rig:
    """A rig whose first backend is an OpenAI-compatible server."""
    rig = Rig(backends=backends, **settings)
    b = rig.state.fleet.backends[0]
    b.kind = ApiKind.OPENAI
    b.v1_models = [{"id": "m:latest", "object": "model", "created": 0, "owned_by": "vllm"}]
    rig.state.fleet.rebuild_index()
    return rig


@pytest.fixture()
def rig() -> Iterator[Rig]:
    r = openai_rig()
    yield r
    r.close()


def body_of(response: bytes) -> bytes:
    """A chunked body, de-chunked."""
    _, _, rest = response.partition(b"\r\n\r\n")
    out = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        rest = rest[n + 2:]
    return out


def ndjson(response: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in body_of(response).split(b"\n") if line]


def start(rig: Rig, path: bytes = b"/api/chat", body: bytes = CHAT, user: bytes = b"alice",
          extra: bytes = b"") -> tuple[object, object, object, object]:
    proto, client = rig.client()
    proto.data_received(post(path, body, user, extra))
    rig.turn()
    conn, backend = rig.pools[0].last
    return proto, client, conn, backend


def test_an_ollama_stream_on_an_openai_backend_is_translated_piece_by_piece(rig: Rig) -> None:
    proto, client, conn, backend = start(rig)
    sent = backend.take()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: b0:11434\r\n")
    request = orjson.loads(body)
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["messages"] == [{"role": "user", "content": "hi"}]
    wire = SSE_HEAD + chunk(SSE_BODY) + b"0\r\n\r\n"
    for i in range(0, len(wire), 7):  # split mid-chunk, mid-line, mid-event
        conn.data_received(wire[i:i + 7])
    out = bytes(client.data)
    assert b"Content-Type: application/x-ndjson" in out and b"X-Translated: ollama->openai" in out
    assert b"Transfer-Encoding: chunked" in out and out.endswith(b"0\r\n\r\n")
    lines = ndjson(out)
    assert "".join(str(line["message"]["content"]) for line in lines) == "Hello!"
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["prompt_eval_count"] == 7 and lines[-1]["eval_count"] == 3
    user = rig.state.stats.users["alice"]
    assert (user.done, user.prompt_tokens, user.completion_tokens) == (1, 7, 3)
    assert rig.pools[0].idle == [conn] and proto.active is None
    assert rig.state.fleet.backends[0].in_flight == 0


def test_a_slow_client_pauses_the_backend_of_a_translated_stream(rig: Rig) -> None:
    proto, client, conn, backend = start(rig)
    conn.data_received(SSE_HEAD + chunk(sse({"content": "a"})))
    proto.pause_writing()  # the client's write buffer passed its high-water mark
    assert backend.paused
    proto.resume_writing()
    assert not backend.paused
    conn.data_received(chunk(sse({}, "stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert ndjson(bytes(client.data))[-1]["done"] is True


def test_a_backend_lost_mid_stream_ends_the_stream_with_an_ndjson_error(rig: Rig) -> None:
    _proto, client, conn, _backend = start(rig)
    conn.data_received(SSE_HEAD + chunk(sse({"content": "a"}) + b"data: {\"cho"))
    conn.connection_lost(ConnectionResetError("reset"))
    out = bytes(client.data)
    lines = ndjson(out)
    assert lines[0]["message"]["content"] == "a"
    assert "closed the connection mid-response" in str(lines[-1]["error"])
    assert out.endswith(b"0\r\n\r\n") and client.closing  # not kept alive after a failure
    assert rig.state.fleet.backends[0].failures == 1 and rig.state.fleet.backends[0].in_flight == 0


def test_a_silent_backend_mid_stream_gets_an_error_in_the_clients_format(rig: Rig) -> None:
    proto, client, conn, backend = start(rig)
    conn.data_received(SSE_HEAD + chunk(sse({"content": "a"})))
    ex = proto.active
    ex.upstream_timeout()
    lines = ndjson(bytes(client.data))
    assert "sent nothing" in str(lines[-1]["error"]) and backend.aborted
    assert b"data:" not in bytes(client.data)  # never the backend's SSE format


def test_a_whole_answer_is_translated_with_its_length(rig: Rig) -> None:
    body = b'{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    _proto, client, conn, _backend = start(rig, body=body)
    answer = orjson.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}})
    wire = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(answer), answer))
    conn.data_received(wire[:60])
    assert not client.data  # held until the end
    conn.data_received(wire[60:])
    head, _, out = bytes(client.data).partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(out) in head and b"X-Translated: ollama->openai" in head
    reply = orjson.loads(out)
    assert reply["message"]["content"] == "yo" and reply["eval_count"] == 2 and reply["done"] is True
    assert rig.state.stats.users["alice"].completion_tokens == 2


def test_a_whole_answer_cut_short_is_a_502_in_the_clients_shape(rig: Rig) -> None:
    body = b'{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    _proto, client, conn, _backend = start(rig, body=body)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{\"id")
    conn.connection_lost(None)
    head, _, out = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and isinstance(orjson.loads(out)["error"], str)


def test_backend_errors_are_answered_in_the_clients_shape(rig: Rig) -> None:
    _proto, client, conn, _backend = start(rig)
    err = b'{"error":{"message":"model \\"m\\" does not exist","type":"NotFoundError","code":404}}'
    conn.data_received(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(err), err))
    head, _, out = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and orjson.loads(out) == {"error": 'model "m" does not exist'}


def test_a_bad_body_is_refused_before_any_backend_byte(rig: Rig) -> None:
    body = b'{"model":"m","think":"sideways","messages":[{"role":"user","content":"hi"}]}'
    proto, client = rig.client()
    proto.data_received(post(body=body))
    rig.turn()
    head, _, out = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and "think" in orjson.loads(out)["error"]
    pool = rig.pools[0]
    assert all(not t.data for _, t in pool.opened)  # nothing was sent
    assert rig.state.fleet.backends[0].in_flight == 0 and proto.active is None


def test_the_load_form_is_answered_by_the_gateway(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post(body=b'{"model":"m","messages":[]}'))
    rig.turn()
    head, _, out = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and orjson.loads(out)["done_reason"] == "load"


def test_the_client_leaving_aborts_the_translated_backend_request(rig: Rig) -> None:
    proto, _client, conn, backend = start(rig)
    conn.data_received(SSE_HEAD + chunk(sse({"content": "a"})))
    ex = proto.active
    proto.connection_lost(None)
    assert backend.aborted and ex.state is State.DONE
    assert rig.state.fleet.backends[0].in_flight == 0


def test_a_retry_on_an_ollama_backend_sends_the_original_request() -> None:
    rig = openai_rig(backends=2)
    try:
        proto, client = rig.client()
        proto.data_received(post())
        rig.turn()
        first = next(p for p in rig.pools if p.opened)
        conn, _backend = first.last
        conn.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        rig.turn()
        other = next(p for p in rig.pools if p is not first)
        conn2, backend2 = other.last
        if first is rig.pools[0]:  # the OpenAI backend failed: the Ollama one gets the original
            assert backend2.data.endswith(CHAT) and b"POST /api/chat " in backend2.data
            conn2.data_received(NDJSON_HEAD + chunk(b'{"done":true,"eval_count":1}\n') + b"0\r\n\r\n")
            assert b"X-Translated" not in client.data
        else:  # the other way round: the retry is translated
            assert b"POST /v1/chat/completions " in backend2.data
            conn2.data_received(SSE_HEAD + chunk(SSE_BODY) + b"0\r\n\r\n")
            assert b"X-Translated: ollama->openai" in client.data
        assert client.data.startswith(b"HTTP/1.1 200 OK") and rig.state.stats.failovers == 1
    finally:
        rig.close()


def test_an_openai_stream_on_an_ollama_backend_without_v1() -> None:
    rig = Rig()
    try:
        b = rig.state.fleet.backends[0]
        b.v1 = False
        rig.state.fleet.rebuild_index()
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        _proto, client, conn, backend = start(rig, path=b"/v1/chat/completions", body=body)
        sent = backend.take()
        assert sent.startswith(b"POST /api/chat HTTP/1.1")
        # The gateway's policy asked for usage (to count it): the client did not.
        wire = NDJSON_HEAD + chunk(b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}\n'
                                   b'{"model":"m","message":{"role":"assistant","content":""},"done":true,'
                                   b'"done_reason":"stop","prompt_eval_count":5,"eval_count":1}\n') + b"0\r\n\r\n"
        for i in range(0, len(wire), 5):
            conn.data_received(wire[i:i + 5])
        out = bytes(client.data)
        assert b"Content-Type: text/event-stream" in out and b"X-Translated: openai->ollama" in out
        events = [e for e in body_of(out).split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        chunks = [orjson.loads(e[6:]) for e in events[:-1]]
        assert all(c["choices"] for c in chunks)  # no usage chunk the client did not ask for
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert rig.state.stats.users["alice"].completion_tokens == 1
    finally:
        rig.close()


# -- Routing ---------------------------------------------------------------------


def mixed_fleet() -> tuple[Fleet, list[object]]:
    rig = Rig(backends=3, slots=2)
    fleet = rig.state.fleet
    ollama_a, ollama_b, oai = fleet.backends
    oai.kind = ApiKind.VLLM
    ollama_a.loaded = set()
    ollama_b.loaded = {"m:latest"}
    fleet.rebuild_index()
    rig.close()
    return fleet, [ollama_a, ollama_b, oai]


def test_a_native_request_prefers_an_ollama_backend_with_the_model_loaded() -> None:
    fleet, (ollama_a, ollama_b, oai) = mixed_fleet()
    chat = EXACT[b"/api/chat"]
    oai_route = EXACT[b"/v1/chat/completions"]
    assert fleet.pick("m:latest", chat.native, "", (), chat.native_first) is ollama_b
    ollama_b.in_flight = 1  # still has a free slot: still first
    assert fleet.pick("m:latest", chat.native, "", (), chat.native_first) is ollama_b
    ollama_b.in_flight = 2  # full: then any backend with the model, by the policy
    assert fleet.pick("m:latest", chat.native, "", (), chat.native_first) in (ollama_a, oai)
    ollama_a.in_flight = 2
    assert fleet.pick("m:latest", chat.native, "", (), chat.native_first) is oai
    # An OpenAI request and a native one whose model is unreadable.
    assert fleet.pick("m:latest", oai_route.native, "", (), oai_route.native_first) is oai
    ollama_a.in_flight = ollama_b.in_flight = 0
    for _ in range(4):
        assert fleet.pick(None, chat.native, "", (), chat.native_first) is not oai
    assert fleet.serves("m:latest", chat.native) and oai.speaks == 2 and ollama_a.speaks == 3


def test_show_prefers_an_ollama_backend_and_primary_is_ollama() -> None:
    fleet, (ollama_a, _ollama_b, oai) = mixed_fleet()
    show = EXACT[b"/api/show"]
    for _ in range(3):
        assert fleet.pick_unslotted("m:latest", show.native, (), show.native_first) is not oai
    assert fleet.primary(show.native or show.native_first) is ollama_a


def test_openai_via_is_read_from_the_config_file_and_checked() -> None:
    from ollamamq_fast.config import BackendOptions, ConfigError, Settings, apply_toml

    s = Settings()
    apply_toml(s, {"backends": [{"url": "http://a:11434", "openai_via": "native"}]})
    assert s.backend_options == {"http://a:11434": BackendOptions(openai_via="native")}
    with pytest.raises(ConfigError, match="openai_via"):
        apply_toml(Settings(), {"backends": [{"url": "http://a:11434", "openai_via": "both"}]})


def test_openai_via_native_translates_openai_requests_for_an_ollama_backend_with_v1() -> None:
    from ollamamq_fast.config import BackendOptions

    rig = Rig()
    try:
        b = rig.state.fleet.backends[0]
        b.v1 = True  # it has /v1, but the operator wants the native API
        b.configure(BackendOptions(kind="ollama", openai_via="native"))
        assert b.speaks == 1
        body = b'{"model":"m","top_k":5,"messages":[{"role":"user","content":"hi"}]}'
        _proto, _client, _conn, backend = start(rig, path=b"/v1/chat/completions", body=body)
        head, _, sent = backend.take().partition(b"\r\n\r\n")
        assert head.startswith(b"POST /api/chat ") and orjson.loads(sent)["options"]["top_k"] == 5
        b.configure(BackendOptions(kind="ollama"))  # back to auto: its /v1 is used again
        assert b.speaks == 3
    finally:
        rig.close()


def test_a_translated_request_asks_for_an_uncompressed_answer(rig: Rig) -> None:
    _proto, _client, _conn, backend = start(rig, extra=b"Accept-Encoding: gzip, br\r\nX-Trace: 7\r\n")
    head = backend.take().partition(b"\r\n\r\n")[0].lower()
    assert b"accept-encoding" not in head and b"x-trace: 7" in head


def test_an_http10_client_gets_the_translated_stream_unchunked_to_the_close(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(b"POST /api/chat HTTP/1.0\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(CHAT), CHAT))
    rig.turn()
    conn, _backend = rig.pools[0].last
    conn.data_received(SSE_HEAD + chunk(SSE_BODY) + b"0\r\n\r\n")
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    lines = [orjson.loads(line) for line in body.split(b"\n") if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 3
    assert client.closing
