"""The gateway in front of a llama-cpp-python server, as a new user drives it.

tests/fake_llama.py copies the server's quirks; each test here is a fault
first met in front of the real server (llama-cpp-python 0.3.36, Gemma 3 270M)
with the official clients, kept here so the default suite catches it again
without the real server (tests/test_real_backend.py, opt-in, runs the real one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import pytest
from fake_llama import MODEL, FakeLlama
from harness import LoopThread, Stack, start_stack


@pytest.fixture
def fake_loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


def start_fake(lt: LoopThread, **options: Any) -> FakeLlama:
    fake = FakeLlama(**options)
    lt.run(fake.start())
    return fake


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def stack(lt: LoopThread, **options: Any) -> tuple[FakeLlama, Stack]:
    fake = start_fake(lt, **options)
    return fake, start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0)


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
        wait_for(lambda: "big" in users and users["big"].done == 1, "the request's end")
        assert users["big"].completion_tokens == 1500
    finally:
        st.close()
        fake_loop.run(fake.close())
