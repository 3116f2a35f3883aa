"""Certificates and node keys for a deployment, made with `cryptography`.

A certificate directory holds:

    ca.pem, ca.key          the certificate authority every party trusts
    server.pem, server.key  the SuperLink's TLS certificate, signed by the CA, with
                            SANs for loopback and every --san host name or address
    nodes/NAME, NAME.pub    a SuperNode's authentication key pair (EC P-384, OpenSSH);
                            the SuperLink accepts a node only once NAME.pub is registered

Keys are EC P-384: Flower's node authentication takes NIST curves, and one curve
for everything keeps the directory simple. Private keys are written mode 0600.

That directory is the signer's: it never leaves the machine that signs. `export`
copies out what each party needs, one directory each, and no other private key:

    superlink/          ca.pem, server.pem, server.key         the SuperLink
    public/             ca.pem, nodes/NAME.pub                 who registers keys or calls the
                                                               Control/Runtime API
    nodes/NAME/         ca.pem, NAME                           SuperNode NAME
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import FedtuneError

CA, CA_KEY = "ca.pem", "ca.key"
SERVER, SERVER_KEY = "server.pem", "server.key"
NODES = "nodes"
SUPERLINK_BUNDLE, PUBLIC_BUNDLE = "superlink", "public"  # directories of `export`
LOOPBACK = ["localhost", "127.0.0.1", "::1"]
CURVE = ec.SECP384R1()


def create(certs_dir: Path, nodes: list[str], sans: list[str] = (), days: int = 365) -> list[Path]:
    """Make whatever of the CA, the server certificate (for loopback plus ``sans``)
    and the named node key pairs is missing; an expired server certificate is
    reissued. Returns the files written."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if not (certs_dir / CA).exists():
        written += _write_ca(certs_dir, days)
    ca_cert, ca_key = load_cert(certs_dir / CA), _load_pem_key(certs_dir / CA_KEY)
    server, hosts = certs_dir / SERVER, [*LOOPBACK, *sans]
    if not server.exists() or _expired(load_cert(server)) or not _covers(load_cert(server), hosts):
        written += _write_server(certs_dir, ca_cert, ca_key, hosts, days)
    for name in nodes:
        if not (certs_dir / NODES / name).exists():
            written += create_node_key(certs_dir / NODES, name)
    return written


def create_node_key(directory: Path, name: str) -> list[Path]:
    """An authentication key pair ``directory/name`` (private, OpenSSH) and ``name.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise FedtuneError(f"node name {name!r} must be a plain file name, e.g. node-0")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(directory / name, private)
    (directory / f"{name}.pub").write_bytes(public + f" {name}\n".encode())
    return [directory / name, directory / f"{name}.pub"]


def export(certs_dir: Path, dest: Path, owner: str | None = None) -> list[Path]:
    """Copy into ``dest`` each party's files (the module's docstring), afresh each
    time so a reissued certificate reaches them; ``ca.key`` is never copied.
    ``owner``: give every copy to this user, for a signer running as root (compose's
    ``certs`` service, whose volumes Docker creates owned by root). Returns the copies."""
    check_server(certs_dir)
    ca, nodes = certs_dir / CA, certs_dir / NODES
    superlink, public = dest / SUPERLINK_BUNDLE, dest / PUBLIC_BUNDLE
    copies = [  # (source, copy, private)
        (ca, superlink / CA, False), (certs_dir / SERVER, superlink / SERVER, False),
        (certs_dir / SERVER_KEY, superlink / SERVER_KEY, True), (ca, public / CA, False),
        *((pub, public / NODES / pub.name, False) for pub in sorted(nodes.glob("*.pub"))),
    ]
    for key in sorted(p for p in nodes.glob("*") if p.is_file() and p.suffix != ".pub"):
        copies += [(ca, dest / NODES / key.name / CA, False), (key, dest / NODES / key.name / key.name, True)]
    ids = _user_ids(owner) if owner else None
    for source, copy, private in copies:
        copy.parent.mkdir(parents=True, exist_ok=True)
        if private:
            _write_private(copy, source.read_bytes())
        else:
            copy.write_bytes(source.read_bytes())
        if ids:
            _chown(copy, owner, ids)
    return [copy for _, copy, _ in copies]


def _user_ids(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise FedtuneError(f"no user {user!r} here to give the exported files to") from None
    return entry.pw_uid, entry.pw_gid


def _chown(path: Path, user: str, ids: tuple[int, int]) -> None:
    try:
        os.chown(path, *ids)
    except PermissionError:
        raise FedtuneError(f"cannot give {path} to {user}: only root can (drop --owner to keep the files yours)") from None


def _write_ca(certs_dir: Path, days: int) -> list[Path]:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return _write_pair(certs_dir, CA, CA_KEY, cert, key)


def _write_server(certs_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                  hosts: list[str], days: int) -> list[Path]:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune SuperLink")])
    cert = (
        _builder(name, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in dict.fromkeys(hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return _write_pair(certs_dir, SERVER, SERVER_KEY, cert, key)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise FedtuneError(f"certificate lifetime must be >= 1 day, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _covers(cert: x509.Certificate, hosts: list[str]) -> bool:
    return set(map(_general_name, hosts)) <= set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _write_pair(certs_dir: Path, cert_name: str, key_name: str, cert: x509.Certificate, key) -> list[Path]:
    _write_private(certs_dir / key_name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (certs_dir / cert_name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return [certs_dir / cert_name, certs_dir / key_name]


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- checks: every mistake one line, before any process starts -------------------

def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    if not path.is_file():
        raise FedtuneError(f"{what} {path} does not exist; make one with `fedtune certs create`")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise FedtuneError(f"{what} {path} is not a PEM certificate") from None


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.is_file():
        raise FedtuneError(f"private key {path} does not exist; make one with `fedtune certs create`")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedtuneError(f"{path} is not an unencrypted PEM private key") from None


def _expired(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc)


def check_ca(path: Path) -> x509.Certificate:
    """The CA certificate at ``path``, or a one-line error if missing, unreadable or expired."""
    cert = load_cert(path, "CA certificate")
    if _expired(cert):
        raise FedtuneError(f"CA certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                           "make a new CA and certificates with `fedtune certs create` in an empty directory")
    return cert


def check_server(certs_dir: Path) -> None:
    """The SuperLink's files: present, unexpired, the certificate signed by the CA and matching its key."""
    ca = check_ca(certs_dir / CA)
    server = load_cert(certs_dir / SERVER, "server certificate")
    if _expired(server):
        raise FedtuneError(f"server certificate {certs_dir / SERVER} expired on {server.not_valid_after_utc:%Y-%m-%d}; "
                           f"`fedtune certs create {certs_dir}` issues a new one")
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedtuneError(f"server certificate {certs_dir / SERVER} is not signed by the CA {certs_dir / CA} (wrong CA)") from None
    key = _load_pem_key(certs_dir / SERVER_KEY)
    if key.public_key() != server.public_key():
        raise FedtuneError(f"{certs_dir / SERVER_KEY} is not the key of {certs_dir / SERVER}")


def check_node_key(path: Path) -> None:
    """A SuperNode's private key: present and an EC key in OpenSSH format."""
    if not path.is_file():
        raise FedtuneError(f"node key {path} does not exist; make one with `fedtune certs node`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedtuneError(f"node key {path} is not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedtuneError(f"node key {path} is not an EC key; Flower's node authentication needs EC (P-384)")
