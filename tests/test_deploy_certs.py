"""Certificates and node keys (`fedtune certs`), and the one-line errors of bad
deployment input: missing or expired certificates, a wrong CA, an address where
nothing answers. A TLS listener in this process plays the SuperLink."""

import datetime as dt
import ipaddress
import os
import pwd
import socket
import ssl
import stat
import threading
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.cli import main
from fedtune.deploy import certs, services
from fedtune.deploy.topology import free_port


def _fails_cleanly(capsys, args, *expected):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err


@pytest.fixture
def certs_dir(tmp_path):
    d = tmp_path / "certs"
    certs.create(d, ["node-0", "node-1"], sans=["superlink", "10.0.0.7"], days=30)
    return d


def test_ca_server_certificate_and_node_keys(certs_dir):
    ca, server = certs.load_cert(certs_dir / certs.CA), certs.load_cert(certs_dir / certs.SERVER)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")}
    lifetime = server.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    # Node keys: what Flower's SuperNode loads (OpenSSH private) and registers (OpenSSH public, P-384).
    key = serialization.load_ssh_private_key((certs_dir / "nodes" / "node-0").read_bytes(), None)
    public = serialization.load_ssh_public_key((certs_dir / "nodes" / "node-0.pub").read_bytes())
    assert isinstance(key.curve, ec.SECP384R1) and key.public_key() == public
    for private in (certs.CA_KEY, certs.SERVER_KEY, "nodes/node-0"):
        assert stat.S_IMODE((certs_dir / private).stat().st_mode) == 0o600
    certs.check_server(certs_dir)
    certs.check_node_key(certs_dir / "nodes" / "node-1")


def test_create_keeps_what_exists_and_adds_what_is_missing(certs_dir):
    before = {p: p.read_bytes() for p in certs_dir.rglob("*") if p.is_file()}
    written = certs.create(certs_dir, ["node-0", "node-1", "node-2"], sans=["superlink"])
    assert written == [certs_dir / "nodes" / "node-2", certs_dir / "nodes" / "node-2.pub"]
    assert all(p.read_bytes() == data for p, data in before.items())
    # A host name the server certificate lacks: a new one, signed by the same CA.
    certs.create(certs_dir, [], sans=["fl.example.org"])
    assert (certs_dir / certs.CA).read_bytes() == before[certs_dir / certs.CA]
    certs.check_server(certs_dir)


def test_fedtune_certs_commands(tmp_path, capsys):
    assert main(["certs", "create", str(tmp_path / "c"), "--nodes", "2", "--san", "superlink"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "c" / "nodes" / "node-1.pub").is_file()
    assert main(["certs", "node", str(tmp_path / "edge" / "alice")]) == 0
    certs.check_node_key(tmp_path / "edge" / "alice")
    assert (tmp_path / "edge" / "alice.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_export_gives_each_party_its_files_and_no_other_private_key(certs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["certs", "create", str(certs_dir), "--export", str(out)]) == 0
    assert f"exported {out / 'nodes' / 'node-1'}: ca.pem node-1" in capsys.readouterr().out
    copies = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert set(copies) == {"superlink/ca.pem", "superlink/server.pem", "superlink/server.key", "public/ca.pem",
                           "public/nodes/node-0.pub", "public/nodes/node-1.pub",
                           "nodes/node-0/ca.pem", "nodes/node-0/node-0", "nodes/node-1/ca.pem", "nodes/node-1/node-1"}
    source = {"superlink/server.key": "server.key", "nodes/node-1/node-1": "nodes/node-1", "public/nodes/node-0.pub": "nodes/node-0.pub"}
    assert all(copies[c].read_bytes() == (certs_dir / s).read_bytes() for c, s in source.items())
    private = {c for c, p in copies.items() if b"PRIVATE KEY" in p.read_bytes()}
    assert private == {"superlink/server.key", "nodes/node-0/node-0", "nodes/node-1/node-1"}  # never ca.key
    assert all(stat.S_IMODE(copies[c].stat().st_mode) == 0o600 for c in private)
    certs.check_server(out / "superlink")
    certs.check_node_key(out / "nodes" / "node-0" / "node-0")

    # Again after a reissue: the SuperLink gets the new certificate. A node whose public
    # key alone the signer holds (made on its own machine) is exported as public only.
    certs.create(certs_dir, [], sans=["fl.example.org"])
    certs.create_node_key(tmp_path / "edge", "alice")
    (certs_dir / "nodes" / "alice.pub").write_bytes((tmp_path / "edge" / "alice.pub").read_bytes())
    certs.export(certs_dir, out)
    assert (out / "superlink" / "server.pem").read_bytes() == (certs_dir / "server.pem").read_bytes()
    assert (out / "public" / "nodes" / "alice.pub").is_file() and not (out / "nodes" / "alice").exists()


def test_export_owner(certs_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    _fails_cleanly(capsys, ["certs", "create", str(certs_dir), "--owner", "root"], "--owner", "add --export")
    _fails_cleanly(capsys, ["certs", "create", str(certs_dir), "--export", out, "--owner", "no-such-user"], "no user 'no-such-user'")
    # Root (compose's signer) gives the files to another user; anyone else may name only themself.
    user = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    assert main(["certs", "create", str(certs_dir), "--export", out, "--owner", user.pw_name]) == 0
    assert {(p.stat().st_uid, p.stat().st_gid) for p in (tmp_path / "out").rglob("*") if p.is_file()} == {(user.pw_uid, user.pw_gid)}


def test_the_superlink_keeps_its_unauthenticated_apis_on_loopback_by_default(certs_dir, tmp_path, monkeypatch, capsys):
    execs = []
    monkeypatch.setattr(services.os, "execve", lambda path, argv, env: execs.append(argv))
    superlink = ["deploy", "superlink", "--certs", str(certs_dir), "--state", str(tmp_path / "state")]
    assert main(superlink) == 0
    assert main([*superlink, "--control-address", "[::1]:9100", "--fleet-address", "10.0.0.7:9200"]) == 0
    flags = [{flag: argv[argv.index(flag) + 1] for flag in ("--host", "--port", "--fleet-api-address")} for argv in execs]
    # Control and Runtime APIs (flower-superlink's --host/--port): loopback; the Fleet API, authenticated: every interface.
    assert flags == [{"--host": "127.0.0.1", "--port": "9093", "--fleet-api-address": "0.0.0.0:9092"},
                     {"--host": "::1", "--port": "9100", "--fleet-api-address": "10.0.0.7:9200"}]
    _fails_cleanly(capsys, [*superlink, "--control-address", "9093"], "'9093' must be HOST:PORT")


def _expire(path, ca_dir):
    """Re-sign the certificate at ``path`` (same key, issuer, extensions) with a validity that ended yesterday."""
    cert = certs.load_cert(path)
    signer = serialization.load_pem_private_key((ca_dir / certs.CA_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    builder = x509.CertificateBuilder(cert.issuer, cert.subject, cert.public_key(), cert.serial_number,
                                      now - dt.timedelta(days=10), now - dt.timedelta(days=1), list(cert.extensions))
    path.write_bytes(builder.sign(signer, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))


def test_missing_expired_and_foreign_certificates_are_one_line_errors(certs_dir, tmp_path, capsys):
    superlink = ["deploy", "superlink", "--state", str(tmp_path / "state"), "--certs"]
    _fails_cleanly(capsys, [*superlink, str(tmp_path / "nowhere")], "CA certificate", "does not exist", "fedtune certs create")
    other = tmp_path / "other"
    certs.create(other, ["node-0"])
    (certs_dir / certs.SERVER).write_bytes((other / certs.SERVER).read_bytes())
    _fails_cleanly(capsys, [*superlink, str(certs_dir)], "is not signed by the CA", "wrong CA")
    (certs_dir / certs.SERVER).unlink()
    certs.create(certs_dir, [])
    _expire(certs_dir / certs.SERVER, certs_dir)
    _fails_cleanly(capsys, [*superlink, str(certs_dir)], "server certificate", "expired on")
    assert certs.create(certs_dir, [])[0] == certs_dir / certs.SERVER  # create reissues an expired one
    _expire(certs_dir / certs.CA, certs_dir)
    _fails_cleanly(capsys, [*superlink, str(certs_dir)], "CA certificate", "expired on")
    # An edge client's side: its CA file and its key.
    node = ["deploy", "node", "--superlink", "127.0.0.1:1", "--partition-id", "0"]
    (tmp_path / "junk.pem").write_text("not a certificate")
    _fails_cleanly(capsys, [*node, "--key", str(other / "nodes" / "node-0"), "--ca", str(tmp_path / "junk.pem")],
                   "not a PEM certificate")
    _fails_cleanly(capsys, [*node, "--key", str(other / "nodes" / "node-0"), "--ca", str(certs_dir / certs.CA)],
                   "CA certificate", "expired on")
    _fails_cleanly(capsys, [*node, "--key", str(tmp_path / "no-key"), "--ca", str(other / certs.CA)], "node key", "does not exist")
    _fails_cleanly(capsys, [*node, "--key", str(other / certs.CA_KEY), "--ca", str(other / certs.CA)], "not an unencrypted OpenSSH private key")


@contextmanager
def _tls_server(certs_dir):
    """A TLS listener on loopback presenting the server certificate of ``certs_dir``; yields its address."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs_dir / certs.SERVER, certs_dir / certs.SERVER_KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True):
                    pass
            except OSError:  # accept timed out, or the client rejected our certificate
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        listener.close()


def test_a_wrong_ca_and_a_silent_address_are_one_line_errors(certs_dir, tmp_path, capsys):
    other = tmp_path / "other"
    certs.create(other, ["node-0"])
    node = ["deploy", "node", "--key", str(other / "nodes" / "node-0"), "--partition-id", "0"]
    with _tls_server(certs_dir) as address:
        _fails_cleanly(capsys, [*node, "--superlink", address, "--ca", str(other / certs.CA)],
                       f"the server at {address} presents a certificate not signed by", "wrong CA")
        _fails_cleanly(capsys, ["certs", "register", str(other / "nodes" / "node-0.pub"), "--superlink", address,
                                "--ca", str(other / certs.CA)], "wrong CA")
    silent = f"127.0.0.1:{free_port()}"
    _fails_cleanly(capsys, [*node, "--superlink", silent, "--ca", str(certs_dir / certs.CA)], f"nothing answers at {silent}")
    _fails_cleanly(capsys, ["deploy", "submit", "--superlink", silent, "--ca", str(certs_dir / certs.CA),
                            "--set", f"run.output_dir={tmp_path / 'runs'}"], "nothing answers")
    assert not (tmp_path / "runs").exists()  # checked before anything is prepared
    _fails_cleanly(capsys, [*node, "--superlink", "no-port", "--ca", str(certs_dir / certs.CA)], "must be HOST:PORT")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["certs", "register", str(tmp_path / "empty"), "--superlink", silent, "--ca", str(certs_dir / certs.CA)],
                   "holds no public key")
    # Our CA, but a certificate that does not name the address dialled.
    certs._write_server(certs_dir, certs.load_cert(certs_dir / certs.CA),
                        serialization.load_pem_private_key((certs_dir / certs.CA_KEY).read_bytes(), None), ["fl.example.org"], 1)
    with _tls_server(certs_dir) as address:
        _fails_cleanly(capsys, [*node, "--superlink", address, "--ca", str(certs_dir / certs.CA)],
                       "not valid for '127.0.0.1'", "--san 127.0.0.1")
    assert certs.create(certs_dir, [])[0] == certs_dir / certs.SERVER  # reissued: it lacked loopback
    _expire(certs_dir / certs.SERVER, certs_dir)
    with _tls_server(certs_dir) as address:
        _fails_cleanly(capsys, [*node, "--superlink", address, "--ca", str(certs_dir / certs.CA)], "expired certificate")


def test_a_bad_node_name_is_refused(tmp_path, capsys):
    _fails_cleanly(capsys, ["certs", "node", str(tmp_path / ".hidden")], "plain file name")
