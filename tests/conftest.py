"""Make tests/harness.py importable as `harness` from every test module.

The gateway's default state folder follows $XDG_STATE_HOME: point it at a
temporary folder for the whole run (subprocesses inherit it), so no test
writes state or logs into the checkout or the user's home.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

_STATE_HOME = tempfile.mkdtemp(prefix="ollamamq-test-state-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME
atexit.register(shutil.rmtree, _STATE_HOME, ignore_errors=True)

# The fast subset CI runs a second time with OLLAMAMQ_FAST_PURE=1 (the same
# code uncompiled): the data plane's unit tests and its traps, and for each
# compiled module (buildinfo.COMPILED_MODULES) the tests that check it directly:
# test_accesslog (accessline), test_identity, test_user_ids and test_key_scopes
# (policy.identity), test_failover (fleet.passive, proxy.recovery),
# test_translate (wire.errors).
PURE_SUBSET = {
    "test_build.py", "test_exchange.py", "test_exchange_state.py", "test_flow.py",
    "test_headers.py", "test_ledger.py", "test_hotpath.py", "test_fairqueue.py",
    "test_scheduling.py", "test_policy.py", "test_stats.py", "test_balance.py",
    "test_traps.py", "test_hardening.py", "test_accounting.py", "test_translating.py",
    "test_pools.py", "test_intake.py", "test_admission.py", "test_chunks.py",
    "test_response_headers.py",
    "test_accesslog.py", "test_identity.py", "test_user_ids.py", "test_key_scopes.py",
    "test_failover.py", "test_translate.py",
}


def pytest_collection_modifyitems(config: object, items: list) -> None:  # type: ignore[type-arg]
    """Mark the pure-Python subset (`pytest -m pure`)."""
    import pytest

    for item in items:
        if Path(str(item.fspath)).name in PURE_SUBSET:
            item.add_marker(pytest.mark.pure)
