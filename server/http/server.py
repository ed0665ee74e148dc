"""Runs the OpenAI-compatible API with uvicorn in a background thread, on a socket bound before the model loads."""

from __future__ import annotations

import socket
import threading

from server.errors import FailedPrecondition


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


class HttpServer:
    """uvicorn serving ``build_http_app(app)`` on ``sock`` in a daemon thread; :meth:`stop` ends it."""

    def __init__(self, app, sock: socket.socket) -> None:
        import uvicorn

        from server.http.api import build_http_app

        self.sock = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(build_http_app(app), log_level="warning", access_log=False,
                                                     lifespan="off"))
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
