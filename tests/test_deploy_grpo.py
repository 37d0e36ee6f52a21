"""The compose `cpu` profile's exact commands, run as plain processes, pass a short GRPO run.

Every process is the compose file's own: command, entrypoint, environment and mounted config
(deploy/compose.yaml rendered by the Compose v2 binary). What a container would have and this
machine lacks is substituted, and only that (`Localize`):

    named volume (models, weights, runs, ...)  ->  one temp dir per volume, shared like the volume
    compose host name `svc:50051`               ->  the 127.0.0.1 address that process listens on
    redis container                             ->  a private redis-server (same flags, password)
    server.host / server.port                   ->  127.0.0.1:0 appended (last override wins)

Then the orchestrator job runs `forgerpc run /etc/forgerpc/stack.yaml` (stack-compose-cpu.yaml)
plus a few overrides that shorten the run. Every service requires the compose token, so the run
finishing proves each call carried it. The mTLS variant also sets the compose knob
FORGERPC_WEIGHT_STORE=weight-store:50051 (the Kubernetes wiring): weight versions then go
trainer -> weight store -> generators, service to service, with the callers' `client:` settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import time

import pytest
import redis
from test_deploy_compose import argv, forgerpc_services, local, mounted_config, render

from forgerpc.clients import ChannelSettings, ForgeRPCError, GeneratorClient, WeightStoreClient
from forgerpc.clients.retry import NO_RETRY
from forgerpc.orchestrator.redis_server import free_port

PORT = 50051  # every forgerpc container listens here (compose.yaml)
SHORT = ["sft.steps=6", "sft.eval_every=3", "sft.batch_size=16", "grpo.steps=3", "grpo.eval_every=2",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_size=16", "task.eval_size=16"]


class Localize:
    """Container paths and host names -> this machine's, as one explicit replacement table."""

    def __init__(self, doc: dict, tmp: pathlib.Path):
        self.doc, self.tmp, self.table = doc, tmp, {}
        for service in forgerpc_services(doc).values():  # redis's /data: start_redis
            for v in service.get("volumes") or []:
                if v["type"] == "volume":  # the same named volume is the same directory everywhere
                    self.table[v["target"]] = str(tmp / "volumes" / v["source"])
                    (tmp / "volumes" / v["source"]).mkdir(parents=True, exist_ok=True)

    def host(self, host_port: str, address: str) -> None:
        self.table[host_port] = address

    def __call__(self, text: str) -> str:
        for old in sorted(self.table, key=len, reverse=True):  # longest first: /x/models/tiny before /x
            text = text.replace(old, self.table[old])
        return text

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """(argv, env) of the service's container, with its mounted config file localized."""
        service = self.doc["services"][name]
        line = local(argv(service))
        if service.get("configs"):
            source, target = mounted_config(service)
            text = pathlib.Path(self.doc["configs"][source]["file"]).read_text()
            copy = self.tmp / "etc" / pathlib.Path(target).name
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(self(text))
            line = [str(copy) if a == target else a for a in line]
        # A container sees only its own environment: drop this shell's forgerpc/Redis variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORGERPC_") and k != "REDIS_URL"}
        env.update({k: self(v) for k, v in (service.get("environment") or {}).items()})
        return [self(a) for a in line], env


class Processes:
    """Everything this test starts; stdout/stderr go to files (a full pipe would block a service)."""

    def __init__(self, logs: pathlib.Path):
        self.logs, self.started = logs, []
        logs.mkdir()

    def start(self, name: str, line: list[str], env: dict, cwd=None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.out", "w")
        err = open(self.logs / f"{name}.err", "w")
        proc = subprocess.Popen(line, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        out.close(), err.close()
        self.started.append((name, proc))
        return proc

    def ready(self, name: str, proc: subprocess.Popen, timeout: float = 120) -> str:
        """The address from the service's `FORGERPC_READY <name> <address>` line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            for line in (self.logs / f"{name}.out").read_text().splitlines():
                if line.startswith("FORGERPC_READY "):
                    return line.split()[2]
            time.sleep(0.2)
        raise AssertionError(f"{name} did not start: {self.tail(name)}")

    def tail(self, name: str) -> str:
        return (self.logs / f"{name}.err").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for _, proc in self.started:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_redis(doc: dict, here: Localize, procs: Processes) -> None:
    """The redis service's own command (AOF on, password from its env), on a free local port;
    its /data volume is the working directory, as in the image."""
    service = doc["services"]["redis"]
    assert service["command"][:2] == ["sh", "-c"]
    port = free_port()
    script = service["command"][2].replace("$$", "$") + f" --port {port} --bind 127.0.0.1"
    env = {**os.environ, **service["environment"]}
    (data,) = [here.tmp / "volumes" / v["source"] for v in service["volumes"] if v["target"] == "/data"]
    data.mkdir(parents=True)
    proc = procs.start("redis", ["sh", "-c", script], env, cwd=data)
    here.host("redis:6379", f"127.0.0.1:{port}")
    client = redis.Redis(host="127.0.0.1", port=port, password=service["environment"]["REDIS_PASSWORD"])
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, procs.tail("redis")
            time.sleep(0.1)
    with pytest.raises(redis.AuthenticationError):  # the password is really required
        redis.Redis(host="127.0.0.1", port=port).ping()


def serve(name: str, here: Localize, procs: Processes, host: str | None = None) -> subprocess.Popen:
    line, env = here.command(name)
    assert line[-2] == "--config" and env["FORGERPC_TOKEN"], line
    return procs.start(host or name, [*line, "server.host=127.0.0.1", "server.port=0"], env)


async def model_info(address: str, settings: ChannelSettings):
    async with GeneratorClient(address, settings=settings, retry=NO_RETRY) as g:
        return await g.get_model_info(timeout=10)


async def latest_stored(address: str, settings: ChannelSettings) -> int:
    async with WeightStoreClient(address, settings=settings, retry=NO_RETRY) as store:
        return (await store.get_latest_version(timeout=10)).version.version


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["token", "token+mtls+store"])
def test_compose_stack_as_processes_passes_a_short_grpo_run(tmp_path, monkeypatch, tls):
    """tls: with compose.tls.yaml on top: the `certs` job first, every service mTLS, and the
    orchestrator's `client:` section reading the FORGERPC_CLIENT_TLS_* variables it sets."""
    doc = render("cpu", tls=tls, knobs={"FORGERPC_WEIGHT_STORE": "weight-store:50051"} if tls else None)
    project = doc["name"]
    here = Localize(doc, tmp_path)
    procs = Processes(tmp_path / "logs")
    try:
        if tls:
            line, env = here.command("certs")
            job = subprocess.run(line, env=env, capture_output=True, text=True, timeout=120)
            assert job.returncode == 0, job.stderr[-3000:]
        # Wave 1, what the others depend on: redis, sandbox, weight-store, the model-tiny job; and
        # the environment, which needs nothing (the job only waits for its health).
        start_redis(doc, here, procs)
        first = {n: serve(n, here, procs) for n in ("sandbox", "weight-store", "environment")}
        line, env = here.command("model-tiny")
        job = subprocess.run(line, env=env, capture_output=True, text=True, timeout=180)
        assert job.returncode == 0, job.stderr[-3000:]
        for n, p in first.items():
            here.host(f"{n}:{PORT}", procs.ready(n, p))
        # Wave 2: reward (-> sandbox), replay-buffer (-> redis), the generator replicas, trainer.
        second = {n: serve(n, here, procs) for n in ("reward", "replay-buffer", "trainer")}
        replicas = doc["services"]["generator"]["deploy"]["replicas"]
        for i in range(1, replicas + 1):  # compose names replica i <project>-generator-<i>
            second[f"{project}-generator-{i}"] = serve("generator", here, procs, host=f"{project}-generator-{i}")
        for n, p in second.items():
            here.host(f"{n}:{PORT}", procs.ready(n, p))
        generators = [here.table[f"{project}-generator-{i}:{PORT}"] for i in range(1, replicas + 1)]

        # The orchestrator job: its exact command, the compose stack config, a shorter run.
        line, env = here.command("orchestrator")
        out = subprocess.run([*line, *SHORT], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "private Redis" not in out.stdout

        run_dir = pathlib.Path(here("/var/lib/forgerpc/runs/compose-cpu"))
        assert run_dir.is_relative_to(tmp_path / "volumes" / "runs")  # written into the `runs` volume
        assert not (run_dir / "logs").exists() and not (run_dir / "model").exists(), "the job started something"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        sft = [r for r in rows if r.get("phase") == "sft"]
        grpo = [r for r in rows if r.get("phase") == "grpo"]
        assert [r["step"] for r in sft] == list(range(7))
        steps = [r for r in grpo if r["step"] > 0]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert all("reward_mean" in r and "loss" in r for r in steps)
        assert 0.0 <= min(r["reward_mean"] for r in steps) <= max(r["reward_mean"] for r in steps) <= 1.0
        assert [r["step"] for r in grpo if "eval_accuracy" in r] == [0, 2, 3]
        # SFT published v1, v2 (steps 3, 6); GRPO publishes after every step: v3, v4, v5.
        assert steps[0]["version"] == 2 and steps[-1]["version"] == 4
        published = sorted(p.name for p in (tmp_path / "volumes" / "weights").iterdir())
        if tls:  # through the weight store: the shared volume stays empty
            assert published == [], published
        else:
            assert published[-1] == "v00000005", published  # in the `weights` volume the generators mount

        # Both replicas serve the last version (the fan-out reached each), and every service ran
        # with the token required: the same call without it is refused.
        monkeypatch.setenv("FORGERPC_TOKEN", env["FORGERPC_TOKEN"])
        tls_files = {"tls_ca": env.get("FORGERPC_CLIENT_TLS_CA", ""), "tls_cert": env.get("FORGERPC_CLIENT_TLS_CERT", ""),
                     "tls_key": env.get("FORGERPC_CLIENT_TLS_KEY", "")}
        assert all(tls_files.values()) == tls
        if tls:
            store = here.table[f"weight-store:{PORT}"]
            assert asyncio.run(latest_stored(store, ChannelSettings(token_env="FORGERPC_TOKEN", **tls_files))) == 5
        for address in generators:
            info = asyncio.run(model_info(address, ChannelSettings(token_env="FORGERPC_TOKEN", **tls_files)))
            assert info.policy_version == 5
            with pytest.raises(ForgeRPCError) as e:
                asyncio.run(model_info(address, ChannelSettings(**tls_files)))
            assert e.value.code.name == "UNAUTHENTICATED"
            if tls:  # and a plaintext client does not get through at all
                with pytest.raises(ForgeRPCError):
                    asyncio.run(model_info(address, ChannelSettings(token_env="FORGERPC_TOKEN")))
        for name, proc in procs.started:
            assert proc.poll() is None, f"{name} died during the run: {procs.tail(name)}"
    finally:
        procs.stop_all()
