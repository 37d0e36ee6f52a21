"""`forgerpc certs`: the certificates it writes, and a real reward service running TLS + mTLS + token.

The service is a separate OS process started with the generated files, exactly as a container
would start it (`server.auth.*` keys); clients connect through the SDK's ChannelSettings.
"""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import verification

from forgerpc.clients import ChannelSettings, ForgeRPCError, RewardClient
from forgerpc.clients.retry import NO_RETRY
from forgerpc.orchestrator import certs
from forgerpc.v1.reward_pb2 import RewardItem

TOKEN_ENV = "FORGERPC_TEST_TLS_TOKEN"


def _verifier(ca_pem: bytes, name: x509.GeneralName):
    store = verification.Store(x509.load_pem_x509_certificates(ca_pem))
    return verification.PolicyBuilder().store(store).build_server_verifier(name)


def _verifies(ca_pem: bytes, leaf_pem: bytes, host: str) -> bool:
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    try:
        _verifier(ca_pem, subject).verify(x509.load_pem_x509_certificate(leaf_pem), [])
        return True
    except verification.VerificationError:
        return False


def test_server_certs_name_every_way_a_service_is_reached(tmp_path):
    certs.create(tmp_path, services=["reward", "weight_store", "generator"])
    ca = (tmp_path / "ca.pem").read_bytes()
    reward = (tmp_path / "reward.pem").read_bytes()
    for host in ("localhost", "127.0.0.1", "reward", "reward.forgerpc.svc.cluster.local"):
        assert _verifies(ca, reward, host), host
    assert not _verifies(ca, reward, "trainer")  # a cert is not valid for another service
    # DNS forbids '_': the compose/k8s name of weight_store is weight-store.
    assert _verifies(ca, (tmp_path / "weight_store.pem").read_bytes(), "weight-store")
    # A generator pod behind the headless Service: <ip-dashed>.generator.<ns>.svc.cluster.local.
    assert _verifies(ca, (tmp_path / "generator.pem").read_bytes(), "10-1-2-3.generator.forgerpc.svc.cluster.local")
    # The client cert is for clients only.
    assert not _verifies(ca, (tmp_path / "client.pem").read_bytes(), "localhost")
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_rerun_keeps_ca_and_rotate_ca_trusts_old_and_new(tmp_path):
    certs.create(tmp_path, services=["reward"])
    ca1 = (tmp_path / "ca.pem").read_bytes()
    old_leaf = (tmp_path / "reward.pem").read_bytes()
    certs.create(tmp_path, services=["reward"])  # leaf rotation: same CA, new leaf
    assert (tmp_path / "ca.pem").read_bytes() == ca1
    assert (tmp_path / "reward.pem").read_bytes() != old_leaf
    certs.create(tmp_path, services=["reward"], rotate_ca=True)
    bundle = (tmp_path / "ca.pem").read_bytes()
    assert len(x509.load_pem_x509_certificates(bundle)) == 2
    new_leaf = (tmp_path / "reward.pem").read_bytes()
    # During the rollout the bundle accepts services still on old leaves and those on new ones.
    assert _verifies(bundle, old_leaf, "reward") and _verifies(bundle, new_leaf, "reward")
    assert not _verifies(ca1, new_leaf, "reward")
    certs.create(tmp_path, services=["reward"], drop_previous_ca=True)
    assert not _verifies((tmp_path / "ca.pem").read_bytes(), old_leaf, "reward")


def test_ca_key_kept_apart_and_never_replaced_silently(tmp_path):
    out, ca_dir = tmp_path / "certs", tmp_path / "ca"
    certs.create(out, services=["reward"], ca_key=ca_dir / "ca.key")
    assert not (out / "ca.key").exists() and (ca_dir / "ca.key").is_file()
    ca = (out / "ca.pem").read_bytes()
    certs.create(out, services=["reward"], ca_key=ca_dir / "ca.key")  # re-issue with the same CA
    assert (out / "ca.pem").read_bytes() == ca and _verifies(ca, (out / "reward.pem").read_bytes(), "reward")
    # Forgetting --ca-key must not mint a new CA that every running service would distrust.
    with pytest.raises(FileNotFoundError, match="--ca-key"):
        certs.create(out, services=["reward"])
    other = tmp_path / "other"
    certs.create(other, services=["reward"])
    with pytest.raises(ValueError, match="not the key of the CA"):
        certs.create(out, services=["reward"], ca_key=other / "ca.key")
    assert (out / "ca.pem").read_bytes() == ca


@pytest.fixture
def tls_reward(tmp_path_factory, serve_process):
    good = tmp_path_factory.mktemp("certs")
    certs.create(good, services=["reward"])
    proc = serve_process(
        "reward",
        f"server.auth.token_env={TOKEN_ENV}",
        f"server.auth.tls_cert={good / 'reward.pem'}",
        f"server.auth.tls_key={good / 'reward.key'}",
        f"server.auth.tls_client_ca={good / 'ca.pem'}",  # mutual TLS
        env={TOKEN_ENV: "s3cret-token"},
    )
    return proc, good


def _client(address: str, d, *, token: bool, client_cert: bool = True) -> RewardClient:
    settings = ChannelSettings(
        token_env=TOKEN_ENV if token else "",
        tls_ca=str(d / "ca.pem"),
        tls_cert=str(d / "client.pem") if client_cert else "",
        tls_key=str(d / "client.key") if client_cert else "",
    )
    return RewardClient(address, settings=settings, timeout=5.0, retry=NO_RETRY)


async def _evaluate(client: RewardClient) -> float:
    async with client:
        out = await client.evaluate(items=[RewardItem(response="4", target="4")])
    return out.scores[0].score


async def test_tls_token_and_wrong_ca(tls_reward, tmp_path, monkeypatch):
    proc, good = tls_reward
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")

    assert await _evaluate(_client(proc.address, good, token=True)) == pytest.approx(1.0)

    with pytest.raises(ForgeRPCError) as e:
        await _evaluate(_client(proc.address, good, token=False))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

    wrong = tmp_path / "wrong"
    certs.create(wrong, services=["reward"])  # a different CA that never signed the server's cert
    with pytest.raises(ForgeRPCError) as e:
        await _evaluate(_client(proc.address, wrong, token=True))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE

    # mTLS: the right CA but no client certificate is refused in the handshake too.
    with pytest.raises(ForgeRPCError) as e:
        await _evaluate(_client(proc.address, good, token=True, client_cert=False))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_cli_certs_and_tls_health_check(tls_reward, tmp_path):
    """`forgerpc certs DIR --check ADDRESS`: the TLS container health check, through the real CLI."""
    proc, good = tls_reward
    cli = [sys.executable, "-m", "forgerpc.orchestrator"]
    ok = subprocess.run([*cli, "certs", str(good), "--check", proc.address], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    # Plain `forgerpc health` speaks plaintext, which a TLS port refuses.
    plain = subprocess.run([*cli, "health", proc.address], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1
    out = tmp_path / "fresh"
    made = subprocess.run([*cli, "certs", str(out), "--services", "reward,sandbox"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.pem", "ca.key", "client.pem", "client.key", "reward.pem", "reward.key", "sandbox.pem", "sandbox.key"])
    wrong = subprocess.run([*cli, "certs", str(out), "--check", proc.address], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "UNAVAILABLE" in wrong.stdout, wrong.stdout


def test_forgerpc_cli_does_not_import_cryptography():
    """Every `forgerpc` command builds the whole parser, `certs` included; only `forgerpc certs`
    itself may load cryptography (`serve` and the health checks should not pay for it)."""
    code = ("import sys\nfrom forgerpc.orchestrator import cli\n"
            "cli._parser().parse_args(['serve', 'reward'])\ncli._parser().parse_args(['certs', 'x'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
