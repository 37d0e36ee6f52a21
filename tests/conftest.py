"""Shared fixtures: real service processes, in-process servers, Redis URL."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class ServiceProcess:
    """`forgerpc serve NAME --port 0` as a real OS process."""

    def __init__(self, name: str, *args: str, env: dict | None = None):
        self.name = name
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forgerpc.services", "serve", name, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline()
        if not line.startswith("FORGERPC_READY"):
            self.proc.kill()
            raise RuntimeError(f"{name} did not start: {line!r} {self.proc.stderr.read()[-3000:]}")
        self.address = line.split()[2]

    def terminate(self, timeout: float = 10.0) -> float:
        """SIGTERM, wait; returns seconds until exit."""
        start = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout)
        return time.monotonic() - start

    def stop(self):
        """SIGKILL (fast teardown). A killed weight store leaves its shared-memory segments, which
        the next store on the machine would reclaim; the tests reclaim them here instead, so a run
        leaves nothing in /dev/shm."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.name == "weight_store":
            from forgerpc.services.weight_store.backends.shm import reclaim_orphans

            prefix = next((a.partition("=")[2] for a in self.args if a.startswith("shm_prefix=")), "forgerpc-ws")
            reclaim_orphans(prefix)


@pytest.fixture
def serve_process():
    started: list[ServiceProcess] = []

    def start(name: str, *args: str, env: dict | None = None) -> ServiceProcess:
        p = ServiceProcess(name, *args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def prefix():
    """A Redis key prefix of our own; every key under it is deleted afterwards."""
    import redis

    name = f"forgerpc-test-{uuid.uuid4().hex[:10]}"
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{name}:*"))
    if keys:
        r.delete(*keys)
    r.close()
