"""The gateway in front of a llama-cpp-python server, as a new user drives it.

tests/fake_llama.py copies the server's quirks; each test here is a fault
first met in front of the real server (llama-cpp-python 0.3.36, Gemma 3 270M)
with the official clients, kept here so the default suite catches it again
without the real server (tests/test_real_backend.py, opt-in, runs the real one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import orjson
import pytest
from fake_llama import MODEL, FakeLlama, start_fake
from harness import LoopThread, Stack, start_stack, wait_until

from ollamamq_fast.wire import framing


@pytest.fixture
def fake_loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


def stack(lt: LoopThread, **options: Any) -> tuple[FakeLlama, Stack]:
    fake = start_fake(lt, **options)
    # One slot, as a llama-cpp-python server must have (the harness gives four).
    return fake, start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0, slots=1)


def test_a_whole_ollama_chat_answer_larger_than_4_kib(fake_loop: LoopThread) -> None:
    """The server writes a whole answer with its head: one read, relayed by one
    writelines to the translating relay, which must take it."""
    fake, st = stack(fake_loop, chunks=1500, chunk_delay=0.0)
    try:
        c = ollama.Client(host=st.url, headers={"X-User-ID": "big"})
        answer = c.chat(model=MODEL, messages=[{"role": "user", "content": "q"}], stream=False)
        assert answer.message.content == "".join(f"w{i} " for i in range(1500))
        assert answer.eval_count == 1500 and answer.done
        users = st.state.stats.users
        wait_until(lambda: "big" in users and users["big"].done == 1, "the request's end")
        assert users["big"].completion_tokens == 1500
    finally:
        st.close()
        fake_loop.run(fake.close())


def user_stats(st: Stack, user: str) -> Any:
    return st.state.stats.users.get(user)


def ended(st: Stack, user: str, done: int = 0, dropped: int = 0) -> Callable[[], bool]:
    def check() -> bool:
        u = user_stats(st, user)
        return u is not None and u.in_flight == 0 and (u.done, u.dropped) == (done, dropped)
    return check


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_without_usage_is_estimated_one_token_an_event(
        fake_loop: LoopThread, path: str) -> None:
    """llama-cpp-python sends no usage (it ignores include_usage): a chat stream's
    role event, finish event and [DONE] carry no token, a completions stream has no
    role event. The estimate is exact for it: one token an event."""
    fake, st = stack(fake_loop, chunks=12, chunk_delay=0.01)
    try:
        body: dict[str, Any] = {"model": MODEL, "stream": True}
        body.update({"messages": [{"role": "user", "content": "q"}]} if "chat" in path
                    else {"prompt": "q"})
        r = httpx.post(st.url + path, json=body, headers={"X-User-ID": "est"}, timeout=30)
        assert r.status_code == 200 and r.text.count("w") == 12
        wait_until(ended(st, "est", done=1), "the request's end")
        u = user_stats(st, "est")
        assert (u.completion_tokens, u.estimated_tokens) == (12, 12)
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_a_translated_raw_generate_stream_is_estimated_exactly(fake_loop: LoopThread) -> None:
    """Ollama's raw generate goes to /v1/completions: no role event there either."""
    fake, st = stack(fake_loop, chunks=12, chunk_delay=0.01)
    try:
        c = ollama.Client(host=st.url, headers={"X-User-ID": "raw"})
        parts = list(c.generate(model=MODEL, prompt="q", raw=True, stream=True))
        assert sum(1 for p in parts if p.response) == 12 and parts[-1].done
        wait_until(ended(st, "raw", done=1), "the request's end")
        assert user_stats(st, "raw").completion_tokens == 12
    finally:
        st.close()
        fake_loop.run(fake.close())


def read_then_leave(url: str, path: str, user: str, events: int) -> None:
    """Stream, read `events` token events, close the connection."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "q"}]}
    seen = 0
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", url + path, headers={"X-User-ID": user}, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"w' in line or '"content": "w' in line:
                seen += 1
                if seen == events:
                    break
    assert seen == events


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_client_leaving_mid_stream_is_charged_what_it_was_sent(
        fake_loop: LoopThread, path: str) -> None:
    """A cut stream has no finish event and no [DONE] (no final line on /api/chat):
    what it was sent is counted, estimated, and the generation stops."""
    fake, st = stack(fake_loop, chunks=40, chunk_delay=0.25)
    try:
        read_then_leave(st.url, path, "leaver", 4)
        wait_until(ended(st, "leaver", dropped=1), "the request's end")
        wait_until(lambda: fake_loop.call(lambda: fake.generating) == 0, "the generation's end")
        u = user_stats(st, "leaver")
        assert (u.completion_tokens, u.estimated_tokens) == (4, 4)
    finally:
        st.close()
        fake_loop.run(fake.close())


@pytest.mark.parametrize("mid_event", [False, True])
def test_a_backend_dying_mid_stream_counts_what_was_relayed(
        fake_loop: LoopThread, mid_event: bool) -> None:
    """The server killed after 5 tokens: the client's stream ends with an error event
    (or is cut, when the server died mid-event), the request ends once, and the
    tokens it was sent count (estimated), as for a client that leaves."""
    fake, st = stack(fake_loop, chunks=20, chunk_delay=0.0, die_after=5, die_mid_event=mid_event)
    try:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "q"}]}
        if mid_event:
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.post(st.url + "/v1/chat/completions", json=body,
                           headers={"X-User-ID": "died"}, timeout=30)
        else:
            r = httpx.post(st.url + "/v1/chat/completions", json=body,
                           headers={"X-User-ID": "died"}, timeout=30)
            assert r.status_code == 200 and r.text.count('"content":"w') == 5
            assert '"error"' in r.text.rstrip().splitlines()[-1]
        wait_until(ended(st, "died", done=1), "the request's end")
        u = user_stats(st, "died")
        # Mid-event, the sixth token's event had begun: it was generated.
        assert u.completion_tokens == u.estimated_tokens == (6 if mid_event else 5)
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_the_estimate_takes_off_only_the_token_less_events_that_came() -> None:
    sse, ndjson = b"text/event-stream; charset=utf-8", b"application/x-ndjson"
    chat = b'data: {"choices":[{"delta":{"content":"w"},"finish_reason":null}]}\r\n\r\n'
    finish = b'data: {"choices":[{"delta":{},"finish_reason": "length"}]}\r\n\r\n'
    text = b'data: {"choices":[{"text":"w","finish_reason":null}]}\r\n\r\n'
    text_finish = b'data: {"choices":[{"text":"","finish_reason":"length"}]}\r\n\r\n'
    done = b"data: [DONE]\r\n\r\n"
    # A chat stream: role + 10 + finish + [DONE], whatever of it the tail shows;
    # interrupted by llama-cpp-python (no finish); cut short (neither).
    assert framing.estimated_tokens(13, sse, chat + finish + done, True) == 10
    assert framing.estimated_tokens(13, sse, done + b"0\r\n\r\n", True) == 10
    assert framing.estimated_tokens(12, sse, chat + done, True) == 10
    assert framing.estimated_tokens(11, sse, chat * 2, True) == 10
    # A completions stream has no role event.
    assert framing.estimated_tokens(12, sse, text + text_finish + done, False) == 10
    assert framing.estimated_tokens(12, sse, done, False) == 10
    assert framing.estimated_tokens(10, sse, text, False) == 10
    line = b'{"message":{"content":"w"},"done":false}\n'
    assert framing.estimated_tokens(11, ndjson, line + b'{"done":true,"eval_count":10}\n', False) == 10
    assert framing.estimated_tokens(10, ndjson, line, False) == 10


def test_a_translated_request_is_sent_as_json_whatever_the_client_said(
        fake_loop: LoopThread) -> None:
    """Ollama reads any body as JSON and its docs' curl examples send none
    (`curl -d` says application/x-www-form-urlencoded); the translated body is the
    gateway's own JSON, and llama-cpp-python refuses (500) a body of another type."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        for stream in (False, True):
            body = orjson.dumps({"model": MODEL, "stream": stream,
                                 "messages": [{"role": "user", "content": "q"}]})
            r = httpx.post(st.url + "/api/chat", content=body, timeout=30, headers={
                "Content-Type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200, r.text
            assert r.headers["x-translated"] == "ollama->openai"
            assert "w2" in r.text
        assert fake_loop.call(lambda: list(fake.wrong_content_types)) == []
    finally:
        st.close()
        fake_loop.run(fake.close())


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_relayed_openai_request_is_sent_as_json_whatever_the_client_said(
        fake_loop: LoopThread, ctype: str | None) -> None:
    """`curl -d '{...}'` on /v1/chat/completions, without -H 'Content-Type: ...',
    says application/x-www-form-urlencoded: llama-cpp-python (FastAPI) then reads no
    object and answers 500 with a validation error, where Ollama answers. The gateway
    has read the body as a JSON object: the server is told so."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        headers = {"X-User-ID": "curl"} if ctype is None else {"X-User-ID": "curl",
                                                               "Content-Type": ctype}
        for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}),
                            ("/v1/completions", {"prompt": "q"})):
            for stream in (False, True):
                body = orjson.dumps({"model": MODEL, "stream": stream, **extra})
                r = httpx.post(st.url + path, content=body, timeout=30, headers=headers)
                assert r.status_code == 200, r.text
                assert "x-translated" not in r.headers and "w2" in r.text
        assert fake_loop.call(lambda: list(fake.wrong_content_types)) == []
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_the_client_gets_one_request_id_the_gateways(fake_loop: LoopThread) -> None:
    """llama-cpp-python answers with an x-request-id of its own (the one it was sent,
    or one it makes when the gateway kept a client's non-UUID id to itself): the
    client must see one X-Request-ID, the gateway's, as in the access line."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}]}
        for sent in ({}, {"X-Request-ID": "trace-42"}):
            for stream in (False, True):
                r = httpx.post(st.url + "/v1/chat/completions", json={**body, "stream": stream},
                               headers=sent, timeout=30)
                assert r.status_code == 200
                ids = r.headers.get_list("x-request-id")
                assert len(ids) == 1, ids
                assert ids[0] == sent.get("X-Request-ID", ids[0])
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_an_ollama_format_schema_reaches_llama_cpp_in_its_own_form(fake_loop: LoopThread) -> None:
    """Ollama's `format: {schema}` is OpenAI's `json_schema` response format, which
    llama-cpp-python refuses (500); llama.cpp's servers take the schema as
    `{"type": "json_object", "schema": ...}`."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        c = ollama.Client(host=st.url)
        for stream in (False, True):
            out = c.chat(model=MODEL, messages=[{"role": "user", "content": "q"}], format=schema,
                         stream=stream)
            last = out if not stream else list(out)[-1]
            assert last.done
        c.chat(model=MODEL, messages=[{"role": "user", "content": "q"}], format="json")
        assert fake_loop.call(lambda: list(fake.formats)) == [
            {"type": "json_object", "schema": schema}, {"type": "json_object", "schema": schema},
            {"type": "json_object"}]
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_model_management_says_it_needs_an_ollama_backend(fake_loop: LoopThread) -> None:
    """`ollama pull` / delete / copy / create go to Ollama backends only: in front of
    llama.cpp alone the answer says so, not "model 'x' not found" for a model the
    gateway serves."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        c = ollama.Client(host=st.url)
        for call in (lambda: c.pull(MODEL), lambda: c.delete(MODEL), lambda: c.copy(MODEL, "x"),
                     lambda: c.create(model="y", from_=MODEL), lambda: c.pull("other")):
            with pytest.raises(ollama.ResponseError) as err:
                call()
            assert err.value.status_code == 501, err.value
            assert "Ollama backend" in err.value.error and "not found" not in err.value.error
        assert c.show(MODEL).capabilities == ["completion"]  # answered by the gateway
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_requests_that_leave_the_queue_unserved_log_how_long_they_waited(
        fake_loop: LoopThread, tmp_path: Path) -> None:
    """The one slot busy with a long stream: a client that gives up while queued
    (499), and a request that outwaits --queue-timeout (503), were logged with
    queue_ms 0."""
    # A 3 s stream: it outlasts the 0.6 s give-up and the 1 s queue timeout behind it.
    fake = start_fake(fake_loop, chunks=60, chunk_delay=0.05)
    log = tmp_path / "access.log"
    st = start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0, slots=1,
                     queue_timeout=1.0, log_file=str(log))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}]}
        long = threading.Thread(target=httpx.post, args=(st.url + "/v1/chat/completions",),
                                kwargs={"json": {**body, "stream": True}, "timeout": 30,
                                        "headers": {"X-User-ID": "runs"}})
        long.start()
        wait_until(lambda: fake_loop.call(lambda: fake.generating) == 1, "the long stream")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(st.url + "/v1/chat/completions", json=body, timeout=0.6,
                       headers={"X-User-ID": "gives-up"})
        r = httpx.post(st.url + "/v1/chat/completions", json=body, timeout=10,
                       headers={"X-User-ID": "outwaits"})
        assert r.status_code == 503
        long.join()
        wait_until(lambda: st.state.access.written >= 3, "the access lines")
    finally:
        st.close()
        fake_loop.run(fake.close())
    lines = {x["user"]: x for x in map(orjson.loads, log.read_text().splitlines())}
    assert lines["gives-up"]["status"] == 499 and 500 <= lines["gives-up"]["queue_ms"] < 2000
    assert lines["outwaits"]["status"] == 503 and lines["outwaits"]["queue_ms"] >= 1000


def test_openai_model_objects_carry_created_and_agree(fake_loop: LoopThread) -> None:
    """llama-cpp-python's /v1/models items have no `created`, which OpenAI's
    model object requires (typed clients fail without it): the gateway's list
    gives one, and /v1/models/{id}, /api/tags and the list all agree."""
    fake, st = stack(fake_loop)
    try:
        import openai

        c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in c.models.list().data}[MODEL]
        assert isinstance(listed.created, int)
        one = c.models.retrieve(MODEL)
        assert (one.created, one.owned_by) == (listed.created, listed.owned_by)
        tag = {m.model: m for m in ollama.Client(host=st.url).list().models}[MODEL]
        assert tag.modified_at is not None and int(tag.modified_at.timestamp()) == listed.created
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_an_ollama_body_with_a_lone_surrogate_or_bad_utf8_is_read_as_go_reads_it(
        fake_loop: LoopThread) -> None:
    """`"\\ud800"` (valid JSON syntax, no character) and invalid UTF-8 bytes are U+FFFD
    to Ollama's Go decoder. Translated for llama.cpp, the body kept the lone surrogate,
    which orjson cannot write: 500 "internal error in the gateway", logged as a 499."""
    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        bodies = (b'{"model":"tiny","stream":false,"messages":[{"role":"user","content":"a\\ud800b"}]}',
                  b'{"model":"tiny","stream":false,"messages":[{"role":"user","content":"a\xffb"}]}',
                  (b'{"model":"tiny","stream":false,"options":{"\\udfff":1},'
                   b'"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}'))
        for body in bodies:
            r = httpx.post(st.url + "/api/chat", content=body, headers={"X-User-ID": "go"},
                           timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["done"] is True
        assert fake_loop.call(lambda: list(fake.messages)) == [
            [{"role": "user", "content": "a\ufffdb"}], [{"role": "user", "content": "a\ufffdb"}],
            [{"role": "user", "content": "\U0001f600"}]]
        wait_until(ended(st, "go", done=3), "the requests' ends")
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_a_body_the_server_cannot_read_as_json_is_answered_400_in_the_apis_shape(
        fake_loop: LoopThread) -> None:
    """The gateway reads a body's top level only; one broken further in reached
    llama-cpp-python, whose bare `500 Internal Server Error` (plain text) was relayed:
    the openai SDK raised InternalServerError('Internal Server Error'), for the
    client's own mistake. It gets 400 in OpenAI's envelope, saying where."""
    import openai

    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0)
    try:
        broken = (b'{"model":"tiny","messages":[{"role":"user","content":"q",}],"max_tokens":2}',
                  b'{"model":"tiny","prompt":"q","max_tokens":2,"stream":tru}',
                  b'{"model":"tiny","messages":[{"role":"user","content":"\xff"}]}',
                  # Deeper than Python's parser goes (a RecursionError, not a ValueError).
                  b'{"model":"tiny","messages":[{"role":"user","content":"q","x":'
                  + b"[" * 5000 + b"]" * 5000 + b'}]}')
        for path, body in zip(("/v1/chat/completions", "/v1/completions", "/v1/chat/completions",
                               "/v1/chat/completions"), broken, strict=True):
            r = httpx.post(st.url + path, content=body, timeout=30,
                           headers={"Content-Type": "application/json", "X-User-ID": "typo"})
            assert r.status_code == 400, (path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error", error
            assert error["message"].startswith("invalid JSON in request body: "), error
        # The backend is not blamed, its slot is free: the next request is answered.
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        ok = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}])
        assert ok.choices[0].message.content
        wait_until(ended(st, "typo", done=4), "the requests' ends")
        assert st.state.fleet.backends[0].consecutive_failures == 0
    finally:
        st.close()
        fake_loop.run(fake.close())


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_client_that_leaves_after_done_keeps_the_backend_connection(
        fake_loop: LoopThread, include_usage: bool) -> None:
    """uvicorn writes a stream's end of body apart from its `[DONE]`, and the openai
    SDK closes its connection as soon as it reads `[DONE]`. The gateway dropped the
    backend connection then (as for a client that leaves mid-stream): a new
    connection to the server for each such stream. It reads the end and pools it."""
    import openai

    fake, st = stack(fake_loop, chunks=5, chunk_delay=0.0, end_delay=0.3)
    try:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0,
                          default_headers={"X-User-ID": "sdk"})
        extra: dict[str, Any] = (
            {"stream_options": {"include_usage": True}} if include_usage else {})
        for _ in range(3):
            chunks = list(c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "q"}], stream=True, **extra))
            assert chunks[-1].choices[0].finish_reason == "stop"
        wait_until(ended(st, "sdk", done=3), "the streams' ends")
        assert user_stats(st, "sdk").completion_tokens == 15
        wait_until(lambda: st.state.fleet.backends[0].pool.idle, "the connection back in the pool")
        r = httpx.post(st.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200
        peers = fake_loop.call(lambda: list(fake.peers))
        # Four on two connections (one each before): the slot is free at [DONE], so
        # the next stream may start while the last connection still reads its end.
        assert len(peers) == 4 and len(set(peers)) <= 2, peers
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_a_backend_that_never_ends_a_stream_read_to_its_done_is_dropped(
        fake_loop: LoopThread) -> None:
    """The end of body read after the client left must come soon (upstream.DRAIN_S):
    a backend that never sends it does not keep a connection open for ever."""
    import openai

    from ollamamq_fast.proxy.upstream import DRAIN_S

    fake, st = stack(fake_loop, chunks=3, chunk_delay=0.0, end_delay=DRAIN_S + 2)
    try:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        chunks = list(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "q"}], stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
        pool = st.state.fleet.backends[0].pool
        assert pool is not None
        wait_until(lambda: pool.open == 0, "the connection dropped", timeout=DRAIN_S + 3)
        assert not pool.idle
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_ollama_embed_vectors_are_unit_length_and_cut_to_dimensions(fake_loop: LoopThread) -> None:
    """Ollama's /api/embed answers unit vectors, cut to `dimensions` (then unit again).
    llama-cpp-python ignores `dimensions` and, for a model without pooling, sends a
    vector a token, averaged by the gateway: an Ollama client got 64 numbers where it
    asked for 8, not of unit length (a vector store sized for 8 refuses them)."""
    fake, st = stack(fake_loop)
    try:
        c = ollama.Client(host=st.url)
        for dims, width in ((None, 4), (2, 2), (9, 4)):
            out = c.embed(model=MODEL, input=["ab cde", "x"], dimensions=dims)
            assert [len(v) for v in out.embeddings] == [width, width], out.embeddings
            for vector in out.embeddings:
                assert abs(sum(v * v for v in vector) - 1.0) < 1e-9, vector
        # The average of [2, 1, 2, 0] and [3, 1, 2, 1], cut to 2 and made unit.
        first = c.embed(model=MODEL, input="ab cde", dimensions=2).embeddings[0]
        assert first == pytest.approx([2.5 / (2.5**2 + 1) ** 0.5, 1 / (2.5**2 + 1) ** 0.5])
        # Ollama's legacy /api/embeddings gives its vector as the model makes it.
        assert c.embeddings(model=MODEL, prompt="ab cde").embedding == [2.5, 1.0, 2.0, 0.5]
    finally:
        st.close()
        fake_loop.run(fake.close())
