"""deploy/k8s: the overlays render with kustomize and validate against the Kubernetes schema;
commands, configs, probes, GPUs and NetworkPolicies say what docs/DEPLOY.md promises.

Rendering uses `kubectl kustomize` (Debian's kubectl bundles kustomize); schemas come from the
kubernetes-validate package (offline). Without kubectl the render tests skip, saying so, and
the base files are still validated one by one.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from forgerpc.clients.config import load_config
from forgerpc.orchestrator.cli import _parser
from forgerpc.orchestrator.config import RunConfig
from test_deploy_compose import CALLERS, CLIENT_VARS, DEPLOY, config_model

K8S = DEPLOY / "k8s"
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NS = "forgerpc"


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (apt-get install -y kubectl): kustomize render not checked")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def forgerpc_containers(docs):
    for name, spec in pod_specs(docs).items():
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if c["image"].startswith("forgerpc"):
                yield name, spec, c


@pytest.mark.parametrize("version", VERSIONS)
def test_overlay_validates_against_the_schema(overlay, version):
    _, docs = overlay
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    assert all(d["metadata"].get("namespace", NS) == NS for d in docs)


def test_base_files_validate_without_kustomize():
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_commands_parse_and_configs_validate(overlay, monkeypatch):
    name, docs = overlay
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("forgerpc-config"))
    used = set()
    for workload, spec, c in forgerpc_containers(docs):
        argv = c.get("args") if "command" not in c else None
        if argv is None:  # init containers: the tiny-model builder or the wait loop
            assert c["command"][:3] == ["python", "-m", "forgerpc.services.common.models"] or \
                "forgerpc certs /certs --check" in c["command"][-1], c["command"]
            continue
        args = _parser().parse_args(argv)  # the real `forgerpc` parser: SystemExit on a bad command
        path = argv[argv.index("--config") + 1] if "--config" in argv else argv[1]
        key = path.removeprefix("/etc/forgerpc/")
        assert path.startswith("/etc/forgerpc/") and key in configmap["data"], (workload, path)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert spec_volume(spec, mounts["/etc/forgerpc"])["configMap"]["name"] == configmap["metadata"]["name"]
        for env in c.get("env", []):  # secrets are placeholders; literal values as the pod sees them
            monkeypatch.setenv(env["name"], env.get("value", "redis://:secret@redis:6379/0"))
        file = K8S.parent / "configs" / key
        assert yaml.safe_load(file.read_text()) == yaml.safe_load(configmap["data"][key])
        if args.command == "serve":
            cfg = load_config(config_model(args.service), file)
            assert cfg.server.auth.tls_cert == f"/certs/{args.service}.pem" and cfg.server.auth.tls_client_ca
        else:
            cfg = load_config(RunConfig, file)
        used.add(key)
    assert used == set(configmap["data"]), f"unused files in the ConfigMap: {set(configmap['data']) - used}"


def spec_volume(spec, name) -> dict:
    return next(v for v in spec["volumes"] if v["name"] == name)


def test_probes_are_grpc_health_over_mtls(overlay):
    _, docs = overlay
    services = 0
    for workload, spec, c in forgerpc_containers(docs):
        if c.get("args", [None])[0] != "serve":
            continue
        services += 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"][:5] == ["forgerpc", "certs", "/certs", "--check", "127.0.0.1:50051"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        certs = spec_volume(spec, "certs")["secret"]
        mounted = {i["path"] for i in certs["items"]}
        # Each pod gets only its own key pair, the CA and the client pair (for the probe).
        assert mounted == {"ca.pem", "client.pem", "client.key", env["FORGERPC_TLS_CERT"].removeprefix("/certs/"),
                           env["FORGERPC_TLS_KEY"].removeprefix("/certs/")}, workload
        assert next(e for e in c["env"] if e["name"] == "FORGERPC_TOKEN")["valueFrom"]["secretKeyRef"]["name"] == "forgerpc-auth"
    assert services == 7


def test_callers_use_the_token_and_their_own_certificate(overlay, monkeypatch):
    """reward -> sandbox, generator / trainer -> weight store: each caller's `client:` resolves in
    its pod to the stack token, the CA and its own certificate pair (mounted from forgerpc-tls);
    the trainer publishes to the weight store the job's stack config names."""
    _, docs = overlay
    seen = set()
    for workload, spec, c in forgerpc_containers(docs):
        argv = c.get("args") or []
        if argv[:1] != ["serve"]:
            continue
        service = argv[1]
        env = {e["name"]: e.get("value") for e in c["env"]}
        if service not in CALLERS:
            assert not set(CLIENT_VARS) & set(env), workload
            continue
        for k in CLIENT_VARS:
            monkeypatch.delenv(k, raising=False)
        for e in c["env"]:
            monkeypatch.setenv(e["name"], e.get("value", "from-a-secret"))
        file = K8S.parent / "configs" / argv[argv.index("--config") + 1].removeprefix("/etc/forgerpc/")
        cfg = load_config(config_model(service), file)
        client = cfg.client
        if service == "trainer":  # pods share no disk: weight versions go through the weight store
            stack = load_config(RunConfig, K8S.parent / "configs" / "stack-k8s.yaml", ["redis_url=redis://x"])
            assert cfg.weight_store_address == stack.services["weight_store"].addresses()[0]
        assert client.token_env == "FORGERPC_TOKEN" and "valueFrom" in next(e for e in c["env"] if e["name"] == "FORGERPC_TOKEN")
        assert (client.tls_ca, client.tls_cert, client.tls_key) == ("/certs/ca.pem", f"/certs/{service}.pem", f"/certs/{service}.key")
        mounted = {i["path"] for i in spec_volume(spec, "certs")["secret"]["items"]}
        assert {"ca.pem", f"{service}.pem", f"{service}.key"} <= mounted, workload
        seen.add(service)
    assert seen == set(CALLERS)


def test_gpu_only_in_gpu_overlay(overlay):
    name, docs = overlay
    specs = pod_specs(docs)
    for workload, spec, c in forgerpc_containers(docs):
        assert c["image"] == f"forgerpc:{'cuda' if name == 'gpu' else 'cpu'}", (workload, c["image"])
    for workload, spec in specs.items():
        gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in spec["containers"]]
        env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
        if name == "gpu" and workload in ("generator", "trainer"):
            assert gpus == [1] and env["FORGERPC_DEVICE"] == "cuda"
            assert spec_volume(spec, "models")["persistentVolumeClaim"]["claimName"] == "forgerpc-models"
            assert not spec.get("initContainers")
        else:
            assert not any(gpus) and "FORGERPC_DEVICE" not in env, workload
    if name == "cpu":  # every pod that loads the model builds the same seeded tiny model first
        for workload in ("generator", "trainer"):
            assert [c["name"] for c in specs[workload]["initContainers"]] == ["tiny-model"]


def test_generator_replicas_have_stable_dns_names_in_the_stack_config(overlay):
    _, docs = overlay
    generator = by_kind(docs, "StatefulSet")["generator"]
    service = by_kind(docs, "Service")["generator"]
    assert service["spec"]["clusterIP"] == "None" and generator["spec"]["serviceName"] == "generator"
    stack = load_config(RunConfig, K8S.parent / "configs" / "stack-k8s.yaml", ["redis_url=redis://x"])
    replicas = generator["spec"]["replicas"]
    assert stack.services["generator"].addresses() == [
        f"generator-{i}.generator.{NS}.svc:50051" for i in range(replicas)]
    services, sets = by_kind(docs, "Service"), by_kind(docs, "StatefulSet")
    for entry in stack.services.values():
        for address in entry.addresses():
            m = re.fullmatch(rf"(?:(?P<pod>[a-z0-9-]+)-(?P<i>\d+)\.)?(?P<svc>[a-z0-9-]+)\.{NS}\.svc:50051", address)
            assert m and m["svc"] in services, address
            if m["pod"]:  # a StatefulSet pod: its set exists, is governed by that Service, has the index
                assert sets[m["pod"]]["spec"]["serviceName"] == m["svc"] and int(m["i"]) < sets[m["pod"]]["spec"]["replicas"]


def test_job_waits_for_every_address_of_its_stack_config(overlay):
    """`forgerpc run` health-checks every address in stack-k8s.yaml; the Job's init container
    waits for exactly those first (a Job has no depends_on)."""
    _, docs = overlay
    job = pod_specs(docs)["orchestrator"]
    (wait,) = [c for c in job["initContainers"] if c["name"] == "wait-for-services"]
    waited = set(re.search(r"for a in (.*?);", wait["command"][-1], re.S)[1].split())
    stack = load_config(RunConfig, K8S.parent / "configs" / "stack-k8s.yaml", ["redis_url=redis://x"])
    assert waited == {a for entry in stack.services.values() for a in entry.addresses()}


def test_pods_meet_the_restricted_pod_security_standard(overlay):
    _, docs = overlay
    assert by_kind(docs, "Namespace")[NS]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (workload, c["name"])
            assert sc["readOnlyRootFilesystem"] is True


# --- NetworkPolicy semantics, evaluated as the API defines them -------------------------------

def selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        ok = {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, pod: tuple[str, dict, dict]) -> bool:
    namespace, ns_labels, labels = pod
    if "namespaceSelector" in peer:
        return selects(peer["namespaceSelector"], ns_labels) and selects(peer.get("podSelector"), labels)
    return namespace == NS and selects(peer.get("podSelector"), labels)


def allowed(policies, direction: str, subject: dict, other, port: int) -> bool:
    """Whether policies in NS let `subject` (a pod of NS) send (Egress) to / receive (Ingress) from `other`."""
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    applying = [p for p in policies if selects(p["spec"]["podSelector"], subject)
                and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not applying:
        return True
    for p in applying:
        for rule in p["spec"].get(key) or []:
            port_ok = not rule.get("ports") or any(r.get("port") == port for r in rule["ports"])
            peer_ok = not rule.get(peers) or any(peer_matches(x, other) for x in rule[peers])
            if port_ok and peer_ok:
                return True
    return False


def can_connect(policies, src: str, dst: str, port: int) -> bool:
    pod = lambda c: {"app.kubernetes.io/name": "forgerpc", "app.kubernetes.io/component": c}  # noqa: E731
    ns = {"kubernetes.io/metadata.name": NS}
    return (allowed(policies, "Egress", pod(src), (NS, ns, pod(dst)), port)
            and allowed(policies, "Ingress", pod(dst), (NS, ns, pod(src)), port))


def test_network_policies(overlay):
    _, docs = overlay
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mesh = ["generator", "reward", "replay-buffer", "trainer", "weight-store"]
    for dst in mesh:
        assert can_connect(policies, "orchestrator", dst, 50051), dst
    assert can_connect(policies, "trainer", "weight-store", 50051)
    assert can_connect(policies, "generator", "weight-store", 50051)
    assert can_connect(policies, "reward", "sandbox", 50051)
    assert can_connect(policies, "replay-buffer", "redis", 6379) and can_connect(policies, "orchestrator", "redis", 6379)
    assert not can_connect(policies, "generator", "redis", 6379)
    # The sandbox talks to nobody, and only reward talks to it.
    for dst, port in [*((d, 50051) for d in mesh), ("redis", 6379)]:
        assert not can_connect(policies, "sandbox", dst, port), dst
    for src in ["generator", "trainer", "orchestrator", "replay-buffer", "weight-store"]:
        assert not can_connect(policies, src, "sandbox", 50051), src
    dns = ("kube-system", {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
    sandbox = {"app.kubernetes.io/component": "sandbox"}
    assert not allowed(policies, "Egress", sandbox, dns, 53)
    assert allowed(policies, "Egress", {"app.kubernetes.io/component": "reward"}, dns, 53)
    # A pod from another namespace reaches nothing.
    stranger = ("default", {"kubernetes.io/metadata.name": "default"}, {"app.kubernetes.io/component": "orchestrator"})
    assert not allowed(policies, "Ingress", {"app.kubernetes.io/component": "reward"}, stranger, 50051)
    # The environment: the orchestrator reaches it; no service does, and it reaches nobody.
    assert can_connect(policies, "orchestrator", "environment", 50051)
    for other in [*mesh, "sandbox"]:
        assert not can_connect(policies, other, "environment", 50051), other
    for dst, port in [*((d, 50051) for d in [*mesh, "sandbox"]), ("redis", 6379)]:
        assert not can_connect(policies, "environment", dst, port), dst
    assert not allowed(policies, "Ingress", {"app.kubernetes.io/component": "environment"}, stranger, 50051)
