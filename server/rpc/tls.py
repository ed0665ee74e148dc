"""TLS on the gRPC port: the server's credentials (TLS, or mutual TLS with a client CA) checked at start-up, the
transport log line, and the client side (``--tls``, ``--tls-ca``, ``--tls-cert``/``--tls-key``). Plaintext stays the
default. Imports only the standard library at module level (``grpc`` where used), so the CLI can register the
options cheaply."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from server.errors import FailedPrecondition

#: (config field, flag) of the server's TLS files.
SERVER_TLS_FIELDS = (("tls_cert", "--tls-cert"), ("tls_key", "--tls-key"), ("tls_client_ca", "--tls-client-ca"))


def _read_pem(path: Path, field: str, flag: str) -> bytes:
    """The bytes of ``path``; :class:`FailedPrecondition` (``field``) when it cannot be read or holds no PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {flag} {path}: {exc.strerror or exc}", field=field) from None
    if b"-----BEGIN " not in data:
        raise FailedPrecondition(f"{flag} {path} is not a PEM file", field=field)
    return data


def _no_password() -> bytes:
    raise ValueError("encrypted")


def server_credentials(config):
    """The ``grpc.ServerCredentials`` of ``config`` (``tls_cert``/``tls_key``, plus ``tls_client_ca`` for mutual
    TLS: client certificates required and verified against it), or None for plaintext. Every file is read and
    checked now (a certificate, a key that matches it and is not encrypted, a CA bundle), so a bad file fails
    start-up at once.

    Raises:
        FailedPrecondition: naming the field (``tls_cert``, ``tls_key``, ``tls_client_ca``) and its flag.
    """
    if config.tls_cert is None:
        return None
    pem = {field: _read_pem(getattr(config, field), field, flag)
           for field, flag in SERVER_TLS_FIELDS if getattr(config, field) is not None}
    for field, flag in (("tls_cert", "--tls-cert"), ("tls_client_ca", "--tls-client-ca")):
        if field in pem:
            try:
                ssl.create_default_context(cadata=pem[field].decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise FailedPrecondition(f"{flag} {getattr(config, field)} holds no usable certificate ({exc})",
                                         field=field) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    except ValueError:
        raise FailedPrecondition(f"--tls-key {config.tls_key} is encrypted; give an unencrypted key",
                                 field="tls_key") from None
    except (ssl.SSLError, OSError) as exc:
        raise FailedPrecondition(f"--tls-key {config.tls_key} is not a private key matching --tls-cert "
                                 f"{config.tls_cert} ({exc})", field="tls_key") from None
    import grpc

    return grpc.ssl_server_credentials([(pem["tls_key"], pem["tls_cert"])], root_certificates=pem.get("tls_client_ca"),
                                       require_client_auth="tls_client_ca" in pem)


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an IP literal, brackets allowed) only reaches this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_transport(config, address: str, log: logging.Logger) -> None:
    """One start-up line on the gRPC transport: INFO naming TLS / mutual TLS, or a loud WARNING for plaintext on
    an address other machines can reach (plaintext on loopback is an INFO line); and a WARNING when the metrics
    endpoint (plaintext, no keys) binds such an address."""
    if config.tls_client_ca is not None:
        log.info("gRPC on %s: mutual TLS (cert %s; client certificates required, verified against %s)", address,
                 config.tls_cert, config.tls_client_ca)
    elif config.tls_cert is not None:
        log.info("gRPC on %s: TLS (cert %s; client certificates not requested)", address, config.tls_cert)
    elif is_loopback(config.host):
        log.info("gRPC on %s: PLAINTEXT, loopback only (no TLS)", address)
    else:
        log.warning("gRPC on %s: PLAINTEXT on an address other machines can reach: anyone on the network can read "
                    "and send requests. Give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), or bind "
                    "--host 127.0.0.1", address)
    metrics_host = config.metrics_host or config.host
    if config.metrics_port >= 0 and not is_loopback(metrics_host):
        # Metrics carry adapter ids (bounded labels) and have neither keys nor TLS.
        log.warning("metrics on %s:%s: plaintext HTTP without keys on an address other machines can reach: anyone "
                    "on the network can read them, adapter ids included. Bind --metrics-host 127.0.0.1 or a private "
                    "address", metrics_host, config.metrics_port)


# --- client ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a TLS server.

    Attributes:
        ca: PEM bundle of the CA(s) to trust for the server's certificate; None = the system's roots.
        cert: the client certificate (PEM) for mutual TLS; give ``key`` with it.
        key: its private key (PEM, unencrypted).
        server_name: the name checked against the server's certificate instead of the target's host (and sent as
            SNI), e.g. when connecting by an address the certificate does not list.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def channel(self, target: str, options: list | None = None):
        """A secure ``grpc.Channel`` to ``target``. Raises ``ValueError`` (naming the flag) for a bad file or a
        certificate given without its key (or the reverse)."""
        import grpc

        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")

        def read(path, flag):
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None

        creds = grpc.ssl_channel_credentials(root_certificates=read(self.ca, "--tls-ca"),
                                             private_key=read(self.key, "--tls-key"),
                                             certificate_chain=read(self.cert, "--tls-cert"))
        options = list(options or [])
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(target, creds, options=options)


def add_client_tls_options(p: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name`` of a client command."""
    g = p.add_argument_group("TLS (plaintext unless one of these is given)")
    g.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's root CAs")
    g.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, trusting this CA bundle (PEM)")
    g.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", type=Path, default=None, help="private key (PEM) of --tls-cert")
    g.add_argument("--tls-server-name", default=None,
                   help="name to check the server's certificate against (default: the --target host)")


def client_tls_from_args(args: argparse.Namespace) -> ClientTLS | None:
    """The :class:`ClientTLS` of a client command's options, or None (plaintext) when no TLS option is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
