"""Runs the OpenAI-compatible API with uvicorn in a background thread, on a socket bound before the model loads;
HTTPS (and client certificates) with the gRPC port's ``--tls-cert`` / ``--tls-key`` (/ ``--tls-client-ca``)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from server.errors import FailedPrecondition
from server.rpc.tls import is_loopback


def bind_http_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (``[::]`` = all interfaces, IPv4 too) and ``port`` (0 = a free one).
    Raises :class:`FailedPrecondition` (field ``http_port``) when it cannot be bound."""
    bare = host.strip("[]")
    try:
        family, _, _, _, addr = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise FailedPrecondition(f"cannot bind {host} port {port}: {exc.strerror or exc}", field="http_port") from None
    return sock


def tls_options(config) -> dict:
    """uvicorn's TLS options for ``config``'s ``tls_cert`` / ``tls_key`` (the gRPC port's certificate), with
    client certificates required and verified against ``tls_client_ca`` when set; {} (plaintext) without a cert."""
    if getattr(config, "tls_cert", None) is None:
        return {}
    options = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if getattr(config, "tls_client_ca", None) is not None:
        options.update(ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    """uvicorn serving ``build_http_app(app, gate)`` on ``sock`` in a daemon thread; :meth:`stop` ends it.

    ``gate`` (a :class:`server.access.Gate`, the one the gRPC port uses) requires API keys; None = open. TLS comes
    from ``app.config`` (:func:`tls_options`): the certificate is loaded here, so a bad file raises
    :class:`FailedPrecondition` (field ``tls_cert``) now rather than in the server thread."""

    def __init__(self, app, sock: socket.socket, gate=None) -> None:
        import uvicorn

        from server.http.api import build_http_app

        self.sock = sock
        self.port = sock.getsockname()[1]
        tls = tls_options(app.config)
        #: ``https`` when served over TLS, else ``http``.
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(build_http_app(app, gate), log_level="warning", access_log=False, lifespan="off",
                                **tls)
        try:
            config.load()  # builds the SSL context
        except (ssl.SSLError, OSError) as exc:
            raise FailedPrecondition(f"cannot serve HTTPS with {app.config.tls_cert}: {exc}",
                                     field="tls_cert") from None
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http-server",
                                        daemon=True)

    def start(self, timeout_s: float = 30.0) -> "HttpServer":
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            raise FailedPrecondition("the HTTP server did not start", field="http_port")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.sock.close()


def log_http_transport(config, server: HttpServer, keys_on: bool, log: logging.Logger) -> None:
    """One start-up line on the HTTP API, like the gRPC port's (``server.rpc.tls.log_transport``): its URL
    (``https://`` over TLS), mutual TLS / TLS / plaintext and whether API keys are required; a WARNING for
    plaintext on an address other machines can reach (keys and answers travel in the clear)."""
    host = config.host if ":" not in config.host or config.host.startswith("[") else f"[{config.host}]"
    where = f"OpenAI-compatible HTTP API on {server.scheme}://{host}:{server.port}/v1"
    keys = "API keys required" if keys_on else "no API keys"
    if config.tls_client_ca is not None:
        log.info("%s: mutual TLS (cert %s; client certificates required, verified against %s); %s", where,
                 config.tls_cert, config.tls_client_ca, keys)
    elif config.tls_cert is not None:
        log.info("%s: TLS (cert %s; client certificates not requested); %s", where, config.tls_cert, keys)
    elif is_loopback(config.host):
        log.info("%s: PLAINTEXT, loopback only (no TLS); %s", where, keys)
    else:
        log.warning("%s: PLAINTEXT on an address other machines can reach: anyone on the network can read requests, "
                    "answers and API keys. Give --tls-cert and --tls-key, or bind --host 127.0.0.1; %s", where, keys)
