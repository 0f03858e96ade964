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
