"""The compose services' exact commands, run as plain processes, start and report SERVING.

What differs from a container, and why: each container has its own network namespace, so
here every process gets `server.host=127.0.0.1 server.port=0` appended (the last override
wins); mounted paths (/etc/forgerpc/..., /certs) map back to deploy/configs and a temp folder;
the replay buffer's REDIS_URL points at the test Redis instead of the `redis` container.
Everything else — command, config file, environment, health check — is the compose file's.

Left for later: the trainer/generator (their models) and the orchestrator job's GRPO run
against this stack (needs the generator, issue #3).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import select
import subprocess
import time

import pytest
from conftest import REDIS_URL
from test_deploy_compose import FORGERPC, mounted_config, render

from forgerpc.clients import ForgeRPCError, RewardClient
from forgerpc.clients.retry import NO_RETRY

SUBSET = ("reward", "weight-store", "sandbox", "replay-buffer")


class Container:
    """One compose service's command as a local process."""

    def __init__(self, doc: dict, name: str, certs_dir: pathlib.Path | None = None, extra: tuple[str, ...] = ()):
        """`extra`: key=value overrides after the compose command's own (a test's local addresses)."""
        service = doc["services"][name]
        source, target = mounted_config(service)
        host_file = doc["configs"][source]["file"]
        self.name = name
        self.command = [host_file if a == target else a for a in service["command"]]
        self.env = dict(service.get("environment") or {})
        if "REDIS_URL" in self.env:
            self.env["REDIS_URL"] = REDIS_URL
        if certs_dir is not None:
            self.env = {k: v.replace("/certs", str(certs_dir)) for k, v in self.env.items()}
        self.health = [a.replace("/certs", str(certs_dir)) if certs_dir else a
                       for a in service["healthcheck"]["test"][2:]]
        self.proc = subprocess.Popen(
            [*FORGERPC, *self.command, "server.host=127.0.0.1", "server.port=0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **self.env},
        )
        self.address = self._ready(timeout=90)

    def _ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("FORGERPC_READY"):
                    return line.split()[2]
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        raise AssertionError(f"{self.name} did not start: {self.proc.stderr.read()[-3000:]}")

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The compose healthcheck command, aimed at this process's port."""
        argv = [a.replace("127.0.0.1:50051", self.address) for a in self.health]
        return subprocess.run([*FORGERPC, *argv], capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def containers():
    started: list[Container] = []

    def start(*args, **kwargs) -> Container:
        started.append(Container(*args, **kwargs))
        return started[-1]

    yield start
    for c in started:
        c.stop()


@pytest.mark.slow
def test_compose_commands_serve_and_pass_their_healthchecks(containers):
    doc = render("cpu")
    running = [containers(doc, name) for name in SUBSET]
    for c in running:
        check = c.healthcheck()
        assert check.returncode == 0 and "SERVING" in check.stdout, (c.name, check.stdout, check.stderr)
    # The token from the compose environment is enforced: a client without it is refused.
    async def call_without_token():
        async with RewardClient(running[0].address, retry=NO_RETRY) as reward:
            await reward.list_reward_functions(timeout=10)

    with pytest.raises(ForgeRPCError) as e:
        asyncio.run(call_without_token())
    assert e.value.code.name == "UNAUTHENTICATED"


@pytest.mark.slow
def test_tls_override_certs_job_then_mtls_service(containers, tmp_path):
    """compose.tls.yaml: the `certs` job's command makes the certs, reward serves mTLS with them,
    and the TLS health check passes while the plaintext one fails."""
    doc = render("cpu", tls=True)
    job = doc["services"]["certs"]["command"]
    local = [a.replace("/var/lib/forgerpc/ca", str(tmp_path / "ca")).replace("/certs", str(tmp_path)) for a in job]
    made = subprocess.run([*FORGERPC, *local], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ca" / "ca.key").is_file() and not (tmp_path / "ca.key").exists()  # no CA key for services
    reward = containers(doc, "reward", certs_dir=tmp_path)
    check = reward.healthcheck()
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
    plain = subprocess.run([*FORGERPC, "health", reward.address], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1
