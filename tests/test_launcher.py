"""`forgerpc run` on the local stack: every service its own process, all healthy, nothing left behind."""

import subprocess
import sys

import psutil

from conftest import ROOT


def _service_pids() -> set[int]:
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "forgerpc.services" in cmd and "serve" in cmd:
            found.add(p.pid)
    return found


def test_run_starts_every_service_and_cleans_up():
    before = _service_pids()
    out = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/stack_local.yaml")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("reward", "generator", "weight_store", "replay_buffer", "trainer", "sandbox", "environment"):
        assert name in out.stdout
    assert out.stdout.count("SERVING") == 7
    assert _service_pids() - before == set(), "service processes left behind"


def test_health_command(serve_process):
    proc = serve_process("reward")
    ok = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "health", proc.address],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    proc.terminate()
    down = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "health", proc.address, "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout


def test_bad_stack_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "stack.yaml"
    bad.write_text("services:\n  rewrd: {}\n")
    out = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown service 'rewrd'" in out.stderr and "Traceback" not in out.stderr


def test_private_redis_starts_answers_and_cleans_up():
    import os

    import redis

    from forgerpc.orchestrator.redis_server import PrivateRedis

    server = PrivateRedis()
    with server as url:
        client = redis.Redis.from_url(url)
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        client.close()
        pid = server.process.pid
    assert server.process.poll() is not None and not os.path.exists(server.dir)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
