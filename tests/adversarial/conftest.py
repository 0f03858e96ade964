"""Adversarial tests: a real gateway process in front of a fake backend that logs raw bytes.

The helpers here are imported by the test modules of this directory as plain
modules (`fakebackend`, `gatewayproc`, `wire`, `readers`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakebackend import FakeBackend


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    """One fake backend per test module."""
    fake = FakeBackend()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def oa_backend() -> Iterator[FakeBackend]:
    """An OpenAI-compatible fake backend (no /api/*), one per test module."""
    fake = FakeBackend("openai")
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def nothing_malformed_forwarded(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used a fake backend: it never got a malformed request."""
    yield
    for name in ("backend", "oa_backend"):
        if name in request.fixturenames:
            fake: FakeBackend = request.getfixturevalue(name)
            bad = [(r.error, r.raw[:300]) for r in fake.errors()]
            assert not bad, f"the gateway forwarded malformed requests: {bad}"
