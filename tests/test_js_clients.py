"""The official JavaScript clients (npm `ollama` and `openai`) against the gateway.

Opt-in: needs `node` and a folder whose node_modules holds both packages,
named by OLLAMAMQ_JS_CLIENTS (e.g. `npm install ollama openai` in /tmp/js,
then OLLAMAMQ_JS_CLIENTS=/tmp/js). Skipped otherwise; CI installs nothing.
The bytes these clients send are also replayed without Node in
tests/test_client_conformance.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import Stack, fast_sim_options, start_stack

SCRIPT = Path(__file__).parent / "js" / "conformance.mjs"
JS_DIR = os.environ.get("OLLAMAMQ_JS_CLIENTS", "")
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    not (NODE and JS_DIR and all((Path(JS_DIR) / "node_modules" / p).is_dir()
                                 for p in ("ollama", "openai"))),
    reason="set OLLAMAMQ_JS_CLIENTS to a folder with node_modules/ollama and node_modules/openai",
)


@pytest.fixture(scope="module", params=["ollama", "ollama-no-v1", "openai"])
def stack(request: pytest.FixtureRequest) -> Stack:
    api = {"ollama": "both", "ollama-no-v1": "ollama", "openai": "openai"}[request.param]
    st = start_stack(sims=[fast_sim_options(api=api)])
    yield st
    st.close()


def test_js_clients(stack: Stack, tmp_path: Path) -> None:
    # The script is run from a copy beside node_modules, so that `import 'ollama'` resolves.
    script = Path(JS_DIR) / ".ollamamq-conformance.mjs"
    shutil.copy(SCRIPT, script)
    try:
        out = subprocess.run([str(NODE), str(script), stack.url, "llama3.2", "all-minilm"],
                             cwd=JS_DIR, capture_output=True, text=True, timeout=120, check=False)
    finally:
        script.unlink()
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == SCRIPT.read_text().count("await check("), out.stderr
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
