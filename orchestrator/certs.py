"""Development certificates for TLS / mutual TLS between forgerpc services.

    forgerpc certs certs/ --ca-key ca/ca.key   # CA + one cert per service + a client cert
    forgerpc certs certs/ --ca-key ca/ca.key --rotate-ca   # new CA; ca.pem trusts new + previous
    forgerpc certs certs/ --check reward:50051 --server-name reward   # TLS health probe

What it writes into DIR (keys are mode 0600):

    ca.pem, ca.key            the signing CA; ca.pem is the trust bundle (current CA first,
                              then the previous one while a CA rotation rolls out); --ca-key
                              FILE keeps the key elsewhere (recommended: services never need it)
    <service>.pem/.key        server certs (serverAuth + clientAuth: services also call each other)
    client.pem/.key           the orchestrator's / SDK's client cert for mTLS

Every server cert names the service the three ways it is reached: on loopback (`localhost`,
`127.0.0.1`, `::1`), by its compose service name (`replay-buffer`: DNS forbids `_`) and by its
Kubernetes names (`replay-buffer.<ns>`, `…svc`, `…svc.cluster.local`, plus `*.generator…` so that
each generator pod behind the headless Service matches). A client that dials a pod IP sets
ChannelSettings.server_name to the service name.

Running it again keeps the CA and re-issues every leaf certificate (leaf rotation). Keys are
ECDSA P-256: small, fast handshakes, supported by gRPC's BoringSSL.

`cryptography` is imported inside the functions that use it: cli.py registers this subcommand's
parser for every `forgerpc` command, and `forgerpc serve` / `health` should not pay for it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import sys

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

SERVICES = ("generator", "reward", "replay_buffer", "trainer", "weight_store", "sandbox", "environment")
CLIENT = "client"


def dns_names(service: str, namespace: str = "forgerpc") -> list[str]:
    """Host names a service is reached by: compose name, k8s Service names, headless pod names."""
    host = service.replace("_", "-")
    names = [host, f"{host}.{namespace}", f"{host}.{namespace}.svc", f"{host}.{namespace}.svc.cluster.local"]
    # Pods behind a headless Service: <pod>.<svc>.<ns>.svc (StatefulSet pods such as generator-0)
    # and <pod-ip-dashed>.<svc>.<ns>.svc.cluster.local.
    names += [f"*.{host}.{namespace}.svc", f"*.{host}.{namespace}.svc.cluster.local"]
    return names


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forgerpc (development)"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    from cryptography import x509

    # Backdate a little so that small clock skew between hosts does not reject a fresh cert.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    name = _name(f"forgerpc development CA {datetime.date.today().isoformat()}")
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca_cert: x509.Certificate, ca_key, common_name: str, hosts: list[str], days: int,
          server: bool = True) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA. `hosts` become DNS/IP SANs (gRPC checks SANs, not CN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: pathlib.Path, data: bytes, private: bool = False) -> None:
    # Create with the final mode so a key is never world-readable, not even for a moment.
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a service restarting mid-rotation reads old or new, not half


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create(out: str | pathlib.Path, services=SERVICES, namespace: str = "forgerpc", extra_hosts=(),
           days: int = 90, ca_days: int = 365, rotate_ca: bool = False, drop_previous_ca: bool = False,
           ca_key: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Writes (or re-issues) the CA, the service certs and the client cert into `out`.

    `ca_key` keeps the CA's private key elsewhere (default `out/ca.key`), so that the folder
    mounted into services holds no key that can mint certificates. Returns the paths written.
    The CA is kept when one exists already, unless `rotate_ca`.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_pem = out / "ca.pem"
    key_path = pathlib.Path(ca_key) if ca_key else out / "ca.key"
    trusted = x509.load_pem_x509_certificates(ca_pem.read_bytes()) if ca_pem.is_file() else []
    if trusted and not rotate_ca and not key_path.is_file():
        # Silently making a new CA here would lock out every service still on the old one.
        raise FileNotFoundError(f"{ca_pem} exists but its key {key_path} does not: "
                                "pass --ca-key FILE, or --rotate-ca for a new CA")
    if not trusted or rotate_ca:
        ca_cert, signing_key = make_ca(ca_days)
        trusted = [ca_cert, *trusted[:1]]  # the previous CA stays trusted until the next rotation
    else:
        ca_cert = trusted[0]
        signing_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if _spki(signing_key.public_key()) != _spki(ca_cert.public_key()):
            raise ValueError(f"{key_path} is not the key of the CA in {ca_pem}")
        if drop_previous_ca:
            trusted = trusted[:1]
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write(key_path, _key_pem(signing_key), private=True)
    _write(ca_pem, b"".join(_pem(c) for c in trusted))
    written = [ca_pem, key_path]

    loopback = ["localhost", "127.0.0.1", "::1"]
    for service in services:
        cert, key = issue(ca_cert, signing_key, service, [*loopback, *dns_names(service, namespace), *extra_hosts], days)
        written += [out / f"{service}.pem", out / f"{service}.key"]
        _write(written[-2], _pem(cert))
        _write(written[-1], _key_pem(key), private=True)
    cert, key = issue(ca_cert, signing_key, "forgerpc-client", [], days, server=False)
    written += [out / f"{CLIENT}.pem", out / f"{CLIENT}.key"]
    _write(written[-2], _pem(cert))
    _write(written[-1], _key_pem(key), private=True)
    return written


async def check(directory: str | pathlib.Path, address: str, server_name: str = "", timeout: float = 2.0) -> str:
    """gRPC health of `address` over TLS with DIR's CA and client cert; returns the status name.

    The container health check of a TLS-enabled service (plain `forgerpc health` speaks plaintext).
    """
    from forgerpc.clients import ChannelSettings, ForgeRPCError, RewardClient

    d = pathlib.Path(directory)
    mtls = (d / f"{CLIENT}.pem").is_file() and (d / f"{CLIENT}.key").is_file()
    settings = ChannelSettings(tls_ca=str(d / "ca.pem"), server_name=server_name,
                               tls_cert=str(d / f"{CLIENT}.pem") if mtls else "",
                               tls_key=str(d / f"{CLIENT}.key") if mtls else "")
    async with RewardClient(address, settings=settings) as client:  # any client can ask grpc.health.v1
        try:
            return await client.health(timeout=timeout)
        except ForgeRPCError as e:
            return f"{e.code.name}: {e.message}"


def add_parser(sub) -> None:
    """The `forgerpc certs` subcommand (registered by orchestrator/cli.py)."""
    p = sub.add_parser("certs", help="create development TLS certificates (CA, services, client)")
    p.add_argument("dir", help="output folder, e.g. certs/ (mount it at /certs in containers)")
    p.add_argument("--services", default=",".join(SERVICES), help="comma-separated service names")
    p.add_argument("--namespace", default="forgerpc", help="Kubernetes namespace for the SANs")
    p.add_argument("--host", action="append", default=[], help="extra SAN (host name or IP) on every server cert")
    p.add_argument("--days", type=int, default=90, help="validity of service and client certs")
    p.add_argument("--ca-days", type=int, default=365)
    p.add_argument("--rotate-ca", action="store_true", help="new CA; ca.pem trusts new and previous CA")
    p.add_argument("--drop-previous-ca", action="store_true", help="end a CA rotation: trust only the current CA")
    p.add_argument("--ca-key", metavar="FILE", help="where the CA private key lives (default DIR/ca.key); "
                   "keep it out of the folder you mount into services")
    p.add_argument("--check", metavar="ADDRESS", help="instead of writing: TLS health check of ADDRESS with DIR's certs")
    p.add_argument("--server-name", default="", help="with --check: host name to verify (default: from ADDRESS)")
    p.add_argument("--timeout", type=float, default=2.0, help="with --check: seconds to wait for the answer")


def main(args) -> int:
    import asyncio

    if args.check:
        status = asyncio.run(check(args.dir, args.check, args.server_name, args.timeout))
        print(f"{args.check} (tls): {status}")
        return 0 if status == "SERVING" else 1
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    try:
        paths = create(args.dir, services, args.namespace, args.host, args.days, args.ca_days,
                       args.rotate_ca, args.drop_previous_ca, args.ca_key)
    except (OSError, ValueError) as e:
        print(f"forgerpc certs: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files to {args.dir} (CA, {len(services)} services, client)")
    return 0
