"""Assemble the gRPC server: servicers, the error/metrics interceptor, grpc.health.v1 health and reflection."""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.errors import FailedPrecondition
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.interceptor import StatusInterceptor
from server.rpc.service import AdaptersServicer, GenerationServicer

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS_SERVICE = pb.DESCRIPTOR.services_by_name["Adapters"].full_name
TRAINING_SERVICE = pb.DESCRIPTOR.services_by_name["Training"].full_name
#: Largest request message accepted (bytes); upload chunks are ~1 MiB, this leaves room for bigger ones.
MAX_RECEIVE_MESSAGE_BYTES = 16 * 1024 * 1024


def new_health_servicer() -> health.HealthServicer:
    """A health servicer to pass to :func:`build_grpc_server` when the caller wants to flip it later (e.g. to
    NOT_SERVING with ``enter_graceful_shutdown()`` at shutdown)."""
    return health.HealthServicer(experimental_non_blocking=True,
                                 experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1))


def format_address(host: str, port: int) -> str:
    """``host:port`` with an IPv6 literal bracketed (``::`` → ``[::]:50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bind_grpc_server(host: str, port: int, *, workers: int, metrics) -> tuple[grpc.Server, int]:
    """Create the thread-pool gRPC server and bind ``host:port`` now, before any service exists, so a port clash
    is reported at once (``serve`` calls this before it loads the base model). Register services with
    :func:`add_services`, then call ``server.start()``.

    Args:
        host: address to bind (``[::]`` / ``::`` = all interfaces).
        port: TCP port; 0 picks a free one.
        workers: RPC handler threads, which is also the cap on concurrent RPCs.
        metrics: the :class:`server.metrics.Metrics` the :class:`StatusInterceptor` counts RPCs in.

    Returns:
        ``(server, bound_port)``.

    Raises:
        FailedPrecondition: (field ``port``) the address cannot be bound, e.g. the port is in use; the message
            names the address and the reason.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[StatusInterceptor(metrics)],
        # Each RPC holds a handler thread while it waits for the engine: past that many, refuse at once
        # (RESOURCE_EXHAUSTED) rather than queue without bound inside gRPC.
        maximum_concurrent_rpcs=workers,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)],
    )
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        raise FailedPrecondition(f"cannot bind {address}: {_bind_failure_reason(host, port)}", field="port")
    return server, bound


def _bind_failure_reason(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, found by trying it with a plain socket (gRPC does not say)."""
    host = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot resolve {host!r} ({exc})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is already in use (another server running?)"
                return exc.strerror or str(exc)
    return "is the port in use?"


def add_services(server: grpc.Server, app, *, health_servicer: health.HealthServicer | None = None,
                 training_servicer: pb_grpc.TrainingServicer | None = None) -> None:
    """Register ``app``'s services on a bound, not yet started ``server``: ``qlora_server.v1.Generation`` and
    ``Adapters`` (plus ``Training`` when ``training_servicer`` is given), ``grpc.health.v1.Health`` (SERVING for
    ``""`` and every service name) and server reflection.

    Args:
        server: from :func:`bind_grpc_server`.
        app: the application (``config``, ``engine``, ``store``, ``adapter_cache``, ``metrics``).
        health_servicer: health servicer to register (a new one when None); pass one from
            :func:`new_health_servicer` to flip it at shutdown.
        training_servicer: implementation of ``qlora_server.v1.Training``, registered when given.
    """
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(app), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(app), server)
    services = [GENERATION_SERVICE, ADAPTERS_SERVICE]
    if training_servicer is not None:
        pb_grpc.add_TrainingServicer_to_server(training_servicer, server)
        services.append(TRAINING_SERVICE)

    health_servicer = health_servicer or new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def build_grpc_server(app, host: str, port: int, *, health_servicer: health.HealthServicer | None = None,
                      training_servicer: pb_grpc.TrainingServicer | None = None) -> tuple[grpc.Server, int]:
    """Build (not start) the thread-pool gRPC server of ``app`` and bind it: :func:`bind_grpc_server` with
    ``app.config.rpc_workers`` threads counting into ``app.metrics``, then :func:`add_services`.

    The pool has ``app.config.rpc_workers`` threads; a streaming RPC holds one for its whole life. Every service
    sits behind one :class:`StatusInterceptor` that maps errors and counts ``app.metrics.requests``.

    Returns:
        ``(server, bound_port)``; call ``server.start()``.

    Raises:
        FailedPrecondition: (field ``port``) the address cannot be bound, e.g. the port is in use.
    """
    server, bound = bind_grpc_server(host, port, workers=app.config.rpc_workers, metrics=app.metrics)
    add_services(server, app, health_servicer=health_servicer, training_servicer=training_servicer)
    return server, bound
