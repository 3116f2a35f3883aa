"""Before starting a SuperNode or calling a SuperLink: does anything answer at the
address, and does it present a certificate our CA signed for that host name?
Flower itself retries a wrong address forever and reports a bad certificate as a
generic connection failure; this turns each case into one line."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from fedtune.errors import FedtuneError

# OpenSSL's verify codes for the cases a user can fix: an expired certificate, one
# that names other hosts (host name, IP address).
EXPIRED, NAME_MISMATCH = 10, (62, 64)


class Unreachable(FedtuneError):
    """Nothing answers at the address (yet)."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedtuneError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def check_tls_endpoint(address: str, ca: Path, timeout: float = 5.0) -> None:
    """Connect to ``address`` and complete a TLS handshake verified against ``ca``."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])  # gRPC and the HTTP APIs
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == EXPIRED:
            raise FedtuneError(f"the server at {address} presents an expired certificate; "
                               "reissue it with `fedtune certs create` and restart the SuperLink") from None
        if exc.verify_code in NAME_MISMATCH:
            raise FedtuneError(f"the server certificate at {address} is not valid for {host!r}; "
                               f"reissue it with `fedtune certs create DIR --san {host}`") from None
        raise FedtuneError(f"the server at {address} presents a certificate not signed by {ca} "
                           f"(wrong CA: {exc.verify_message})") from None
    except ssl.SSLError as exc:
        raise FedtuneError(f"TLS handshake with {address} failed ({exc.reason}); is it a SuperLink with TLS?") from None
    except OSError as exc:  # refused, unreachable, timed out, unknown host
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise Unreachable(f"nothing answers at {address} ({reason}); check the address and that the SuperLink runs") from None
