"""Backend choice policies (--balance) through a real gateway and two simulators."""

from __future__ import annotations

from collections import Counter

import httpx
from harness import fast_sim_options, start_stack


def _chat(client: httpx.Client, url: str, user: str, opening: str) -> str:
    r = client.post(url + "/api/chat", headers={"X-User-ID": user},
                    json={"model": "llama3.2", "stream": False,
                          "messages": [{"role": "system", "content": opening},
                                       {"role": "user", "content": "next turn"}]})
    assert r.status_code == 200
    return r.headers["x-gateway-backend"]


def _run(balance: str, plan: list[tuple[str, str]]) -> list[str]:
    st = start_stack(sims=[fast_sim_options(tokens=1), fast_sim_options(tokens=1)],
                     slots=4, balance=balance)
    try:
        with httpx.Client(timeout=10) as client:
            return [_chat(client, st.url, u, o) for u, o in plan]
    finally:
        st.close()


def test_round_robin_alternates() -> None:
    used = _run("round-robin", [("u", "a")] * 6)
    assert used[0] != used[1] and used[::2] == [used[0]] * 3 and used[1::2] == [used[1]] * 3


def test_least_conn_spreads_sequential_requests() -> None:
    used = _run("least-conn", [("u", "a")] * 8)
    assert set(Counter(used).values()) == {4}


def test_affinity_keeps_a_conversation_on_one_backend() -> None:
    plan = [("alice", "you are a pirate")] * 6 + [(f"user{i}", f"conv {i}") for i in range(12)]
    used = _run("affinity", plan)
    assert len(set(used[:6])) == 1  # one conversation, one backend (its KV cache)
    assert len(set(used[6:])) == 2  # different conversations spread over both


def test_random_uses_both() -> None:
    used = _run("random", [("u", "a")] * 30)
    assert len(set(used)) == 2
