"""`forgerpc run` on the local stack: every service its own process, all healthy, nothing left behind."""

import pathlib
import re
import subprocess
import sys

import psutil
import yaml

from conftest import ROOT


def _service_pids(under: str = "") -> set[int]:
    """Service processes (of this run only, when `under` names its directory: other test
    sessions on the machine start their own)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "forgerpc.services" in cmd and "serve" in cmd and under in " ".join(cmd):
            found.add(p.pid)
    return found


def test_run_starts_every_service_and_cleans_up(tmp_path):
    out = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/stack_local.yaml"),
                          f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("reward", "generator", "weight_store", "replay_buffer", "trainer", "sandbox", "environment"):
        assert name in out.stdout
    assert out.stdout.count("SERVING") == 7
    assert len(list((tmp_path / "logs").glob("*.log"))) == 7, "one process per service"
    assert _service_pids(str(tmp_path)) == set(), "service processes left behind"


def test_weight_store_address_reaches_trainer_and_generators(tmp_path):
    """A stack with a weight store: it starts first, and the trainer and every generator replica
    get its address as weight_store_address; a consumer whose config names one keeps it."""
    stack = tmp_path / "stack.yaml"
    stack.write_text("services:\n  weight_store: {}\n  generator: {replicas: 2}\n"
                     "  trainer: {config: {weight_store_address: '127.0.0.1:9'}}\n"
                     "  reward: {config: {functions: [{kind: exact_match}]}}\n")
    out = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "up", str(stack), "--once"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    logs = pathlib.Path(re.search(r"logs: (\S+)", out.stdout).group(1))
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in logs.glob("*.yaml")}
    assert set(configs) == {"weight_store-0", "generator-0", "generator-1", "trainer-0", "reward-0"}
    store = re.search(r"weight_store\W+(127\.0\.0\.1:\d+)", out.stdout).group(1)
    for name in ("generator-0", "generator-1"):
        assert configs[name]["weight_store_address"] == store, name
    assert configs["trainer-0"]["weight_store_address"] == "127.0.0.1:9", "a configured address is kept"
    assert "weight_store_address" not in configs["reward-0"]
    assert _service_pids(str(logs)) == set()


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
