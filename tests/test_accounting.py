"""Every token counted (issue 15, part 2): usage events recognised by content, embeddings,
estimates for streams without usage, partial usage of cut streams, max_completion_tokens,
X-Request-ID on every response."""

from __future__ import annotations

import httpx
import pytest
from harness import fast_sim_options, start_stack
from test_exchange import OK_HEAD, Rig, chunk, post

from ollamamq_fast.policy.caps import CAP_RULES, cap_openai, mirror_max_tokens, splice
from ollamamq_fast.policy.streamusage import UsageStripper
from ollamamq_fast.wire.sniff import sniff_spans

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("usage_event", [
    b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    b'data: {"id": "x", "choices": [], "usage": {"prompt_tokens": 3}}\n\n',
    b'data:{"id":"x","choices":[ ],"usage":{"prompt_tokens":3}}\r\n\r\n',
])
def test_the_injected_usage_event_is_recognised_however_it_is_spaced(usage_event: bytes) -> None:
    content = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
               b'data: {"choices": [], "note": "not usage"}\n\n')
    stripper = UsageStripper(per_chunk=False)
    out = stripper.feed(content + usage_event + b"data: [DONE]\n\n") + stripper.flush()
    assert out == content + b"data: [DONE]\n\n"


def test_per_chunk_usage_members_go_in_any_spacing() -> None:
    stripper = UsageStripper(per_chunk=True)
    out = stripper.feed(b'data: {"choices":[{"text":"a"}], "usage": {"prompt_tokens": 0}}\n\n')
    assert out == b'data: {"choices":[{"text":"a"}]}\n\n'


def test_max_completion_tokens_is_mirrored_into_max_tokens() -> None:
    body = b'{"model":"m","messages":[],"max_completion_tokens":77}'
    sn = sniff_spans(body, ("model",), ("max_tokens", "max_completion_tokens"))
    edit = mirror_max_tokens(body, sn)
    assert edit is not None
    assert splice(body, [edit]).endswith(b'"max_completion_tokens":77,"max_tokens":77}')
    both = b'{"model":"m","max_tokens":5,"max_completion_tokens":77}'
    assert mirror_max_tokens(both, sniff_spans(both, ("model",), (
        "max_tokens", "max_completion_tokens"))) is None


def test_a_cap_keeps_the_smaller_limit_the_client_asked_for() -> None:
    rule = CAP_RULES[b"/v1/chat/completions"]
    body = b'{"model":"m","max_completion_tokens":50}'
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    out = splice(body, cap_openai(body, sn, rule, 64, False))
    assert out.endswith(b'"max_completion_tokens":50,"max_tokens":50}')


@pytest.mark.parametrize("one_read", [True, False])
@pytest.mark.parametrize("chat", [True, False])
def test_a_stream_without_usage_is_counted_as_estimated(one_read: bool, chat: bool) -> None:
    """One token an event, less the events that carry none: a chat stream's role
    event (a completions stream has none), the finish event and [DONE]. The same
    count whether the stream comes in one read or one read an event, the end of
    body last (as uvicorn writes llama-cpp-python's: the finish event is then not
    among the last two reads)."""
    rig = Rig()
    try:
        proto, _ = rig.client()
        if chat:
            proto.data_received(post(b"/v1/chat/completions",
                                     b'{"model":"m","messages":[],"stream":true}'))
        else:
            proto.data_received(post(b"/v1/completions", b'{"model":"m","prompt":"","stream":true}'))
        rig.turn()
        conn, _ = rig.pools[0].last
        if chat:
            events = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n']
            events += [b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(10)]
            events += [b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n']
        else:
            events = [b'data: {"choices":[{"text":"t%d","finish_reason":null}]}\n\n' % i
                      for i in range(10)]
            events += [b'data: {"choices":[{"text":"","finish_reason":"length"}]}\n\n']
        events.append(b"data: [DONE]\n\n")
        if one_read:
            conn.data_received(SSE_HEAD + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        else:
            conn.data_received(SSE_HEAD)
            for e in events:
                conn.data_received(chunk(e))
            conn.data_received(b"0\r\n\r\n")
        user = rig.state.stats.users["alice"]
        assert (user.done, user.completion_tokens, user.estimated_tokens) == (1, 10, 10)
        assert rig.state.stats.estimated_tokens == 10
    finally:
        rig.close()


def test_a_stream_cut_short_still_counts_what_was_generated() -> None:
    rig = Rig()
    try:
        proto, _ = rig.client()
        proto.data_received(post())
        rig.turn()
        conn, _ = rig.pools[0].last
        lines = b"".join(chunk(b'{"message":{"content":"t"},"done":false}\n') for _ in range(6))
        conn.data_received(OK_HEAD + lines)
        proto.connection_lost(None)
        user = rig.state.stats.users["alice"]
        # Six lines, each a token; no final line came, so none is taken off.
        assert user.dropped == 1 and user.completion_tokens == 6 and user.estimated_tokens == 6
    finally:
        rig.close()


def test_embeddings_count_their_prompt_tokens() -> None:
    st = start_stack(sims=[fast_sim_options()])
    try:
        for path, body in (("/api/embed", {"model": "llama3.2", "input": "count these words"}),
                           ("/v1/embeddings", {"model": "llama3.2", "input": "and these"})):
            r = httpx.post(st.url + path, json=body, headers={"X-User-ID": "emb"})
            assert r.status_code == 200, r.text
        assert st.state.stats.users["emb"].prompt_tokens > 0
    finally:
        st.close()


def test_every_response_carries_a_request_id() -> None:
    st = start_stack(sims=[fast_sim_options()])
    try:
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
                "stream": False}
        seen = set()
        for method, path, body in (("POST", "/api/chat", chat), ("GET", "/api/tags", None),
                                   ("POST", "/api/chat", {"model": 1}), ("GET", "/nope", None)):
            r = httpx.request(method, st.url + path, json=body)
            rid = r.headers.get("x-request-id")
            assert rid and rid not in seen, (path, r.headers)
            seen.add(rid)
        r = httpx.post(st.url + "/api/chat", json=chat, headers={"X-Request-ID": "trace-42.a"})
        assert r.headers["x-request-id"] == "trace-42.a"
        r = httpx.post(st.url + "/api/chat", json=chat, headers={"X-Request-ID": "bad id\tx"})
        assert r.headers["x-request-id"] != "bad id\tx"
    finally:
        st.close()
