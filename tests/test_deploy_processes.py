"""The compose services' exact commands, run as plain processes, start and report SERVING
(and the environment plays an episode through the SDK, token and mTLS as deployed).

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
import re
import select
import subprocess
import time

import pytest
from conftest import REDIS_URL
from test_deploy_compose import FORGERPC, mounted_config, render

from forgerpc.clients import ChannelSettings, EnvironmentClient, ForgeRPCError, RewardClient
from forgerpc.clients.retry import NO_RETRY
from forgerpc.v1.common_pb2 import ChatMessage

SUBSET = ("reward", "weight-store", "sandbox", "replay-buffer", "environment")


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


def run_certs_job(doc: dict, certs_dir: pathlib.Path) -> None:
    """compose.tls.yaml's `certs` job: its command, with /certs and the CA volume in certs_dir."""
    job = doc["services"]["certs"]["command"]
    local = [a.replace("/var/lib/forgerpc/ca", str(certs_dir / "ca")).replace("/certs", str(certs_dir)) for a in job]
    made = subprocess.run([*FORGERPC, *local], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr


@pytest.mark.slow
def test_tls_override_certs_job_then_mtls_service(containers, tmp_path):
    """compose.tls.yaml: the `certs` job's command makes the certs, reward serves mTLS with them,
    and the TLS health check passes while the plaintext one fails."""
    doc = render("cpu", tls=True)
    run_certs_job(doc, tmp_path)
    assert (tmp_path / "ca" / "ca.key").is_file() and not (tmp_path / "ca.key").exists()  # no CA key for services
    reward = containers(doc, "reward", certs_dir=tmp_path)
    check = reward.healthcheck()
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
    plain = subprocess.run([*FORGERPC, "health", reward.address], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1


async def calculator_episode(address: str, settings: ChannelSettings) -> tuple[float, bool]:
    """One calculator episode through the SDK: a tool call, then its result as the answer."""
    def say(text: str) -> ChatMessage:
        return ChatMessage(role="assistant", content=text)

    async with EnvironmentClient(address, settings=settings, retry=NO_RETRY, timeout=10) as env:
        opened = await env.reset(environment="calculator", seed=7, options={"digits": "2"})
        a, b, c = map(int, re.findall(r"\d+", opened.observations[-1].content))
        tool = await env.step(session_id=opened.session_id, action=say(f"<calc>{a} * {b} + {c}</calc>"))
        assert tool.observations[0].content == str(a * b + c) and not tool.done
        end = await env.step(session_id=opened.session_id, action=say(f"<answer>{a * b + c}</answer>"))
        closed = await env.close_session(session_id=opened.session_id)
    return end.reward, end.done and closed.closed


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["token", "token+mtls"])
def test_environment_plays_an_episode_as_deployed(containers, tmp_path, monkeypatch, tls):
    """The environment's compose command and config (compose.tls.yaml on top for mTLS) serve a
    calculator episode to a client holding the stack token (and the client certificate), and
    refuse the same client without the token."""
    doc = render("cpu", tls=tls)
    if tls:
        run_certs_job(doc, tmp_path)
    service = containers(doc, "environment", certs_dir=tmp_path if tls else None)
    monkeypatch.setenv("FORGERPC_TOKEN", service.env["FORGERPC_TOKEN"])
    files = {"tls_ca": str(tmp_path / "ca.pem"), "tls_cert": str(tmp_path / "client.pem"),
             "tls_key": str(tmp_path / "client.key")} if tls else {}
    token = ChannelSettings(token_env="FORGERPC_TOKEN", **files)
    assert asyncio.run(calculator_episode(service.address, token)) == (1.0, True)
    with pytest.raises(ForgeRPCError) as e:
        asyncio.run(calculator_episode(service.address, ChannelSettings(**files)))
    assert e.value.code.name == "UNAUTHENTICATED"
    if tls:  # and a plaintext client does not get through at all
        with pytest.raises(ForgeRPCError) as e:
            asyncio.run(calculator_episode(service.address, ChannelSettings(token_env="FORGERPC_TOKEN")))
        assert e.value.code.name == "UNAVAILABLE"
