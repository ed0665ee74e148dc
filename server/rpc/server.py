"""Assemble the gRPC server: servicers, the error/metrics interceptor, grpc.health.v1 health and reflection."""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from server.errors import FailedPrecondition
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.auth import AuthInterceptor
from server.rpc.interceptor import ConcurrencyLimit, Drain, StatusInterceptor
from server.rpc.service import AdaptersServicer, GenerationServicer

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS_SERVICE = pb.DESCRIPTOR.services_by_name["Adapters"].full_name
TRAINING_SERVICE = pb.DESCRIPTOR.services_by_name["Training"].full_name
#: Default largest message sent or received (bytes; ``--max-message-bytes``); upload chunks are ~1 MiB.
MAX_RECEIVE_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES
#: Long-lived RPCs outside Generation that share the ``--max-streams`` cap.
STREAM_METHODS = (f"{TRAINING_SERVICE}/WatchTrainingJob", f"{ADAPTERS_SERVICE}/UploadAdapter")
#: What a graceful shutdown neither refuses nor waits for: health (it reports NOT_SERVING), reflection and training
#: watches (open until their job ends; gRPC cancels them when the grace period is over).
DRAIN_EXEMPT = (health.SERVICE_NAME, reflection.SERVICE_NAME, f"{TRAINING_SERVICE}/WatchTrainingJob")


def new_drain() -> Drain:
    """The :class:`Drain` to give :func:`bind_grpc_server` for a graceful shutdown (``start``, then ``wait``)."""
    return Drain(DRAIN_EXEMPT)


#: The backstop ``maximum_concurrent_rpcs`` is this many times the handler threads: only a flood of short calls
#: far past every cap reaches it (the caps of :func:`rpc_limits` are what callers meet).
BACKSTOP_FACTOR = 4


def rpc_limits(config: ServerConfig) -> dict[str, ConcurrencyLimit]:
    """The per-kind concurrency caps of ``config`` for :class:`StatusInterceptor`: every Generation RPC shares
    ``config.generation_cap`` (``--max-generations``); WatchTrainingJob and UploadAdapter share
    ``config.max_streams`` (``--max-streams``). Health checks and short calls are not capped here: the handler
    pool (``config.rpc_workers``) keeps threads for them beyond both caps."""
    streams = ConcurrencyLimit(config.max_streams, "WatchTrainingJob/UploadAdapter", "--max-streams")
    return {GENERATION_SERVICE: ConcurrencyLimit(config.generation_cap, "generation", "--max-generations"),
            **{method: streams for method in STREAM_METHODS}}


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


def bind_grpc_server(host: str, port: int, *, workers: int, metrics, keys=None, limits: dict | None = None,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, drain: Drain | None = None,
                     credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """Create the thread-pool gRPC server and bind ``host:port`` now, before any service exists, so a port clash
    is reported at once (``serve`` calls this before it loads the base model). Register services with
    :func:`add_services`, then call ``server.start()``.

    Args:
        host: address to bind (``[::]`` / ``::`` = all interfaces).
        port: TCP port; 0 picks a free one.
        workers: RPC handler threads (RPCs past ``BACKSTOP_FACTOR`` times this are refused by gRPC itself).
        metrics: the :class:`server.metrics.Metrics` the :class:`StatusInterceptor` counts RPCs in.
        keys: a :class:`server.access.Gate` (``serve`` shares one with the HTTP API: the same keys and per-key
            limits) or a :class:`server.auth.KeyStore` to require API keys (:class:`server.rpc.auth.AuthInterceptor`,
            inside the status interceptor); None = auth off.
        limits: per-method / per-service caps for the interceptor (:func:`rpc_limits`); None = none.
        max_message_bytes: largest message received or sent (bytes).
        drain: from :func:`new_drain`, to refuse new RPCs (UNAVAILABLE) and wait for running ones at shutdown.
        credentials: bind with TLS (``server.rpc.tls.server_credentials``); None = plaintext.

    Returns:
        ``(server, bound_port)``.

    Raises:
        FailedPrecondition: (field ``port``) the address cannot be bound, e.g. the port is in use; the message
            names the address and the reason.
    """
    address = format_address(host, port)
    if port:
        taken = _unbindable(host, port, definite_only=True)  # a clean message, before gRPC logs its own error
        if taken is not None:
            raise FailedPrecondition(f"cannot bind {address}: {taken}", field="port")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[StatusInterceptor(metrics, limits, drain)] + ([] if keys is None else [AuthInterceptor(keys)]),
        # The caps that matter are the interceptor's (Generation, streams), below the pool size, so health
        # checks always find a thread; this backstop only bounds gRPC's own queue under a flood of short calls.
        maximum_concurrent_rpcs=workers * BACKSTOP_FACTOR,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)],
    )
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        reason = _unbindable(host, port, definite_only=False) or "is the port in use?"
        raise FailedPrecondition(f"cannot bind {address}: {reason}", field="port")
    return server, bound


def _unbindable(host: str, port: int, *, definite_only: bool) -> str | None:
    """Why no address of ``host:port`` can be bound, found with plain sockets (gRPC's error does not say), or None
    when one of them can. Like gRPC, a wildcard host may fall back from ``::`` to ``0.0.0.0``, and ``SO_REUSEADDR``
    is set. With ``definite_only``, only "in use" and "permission denied" count as failures (anything else, e.g. no
    IPv6, is left for gRPC to judge)."""
    host = host.strip("[]")
    hosts = ("::", "0.0.0.0") if host in ("", "::", "0.0.0.0") else (host,)
    reasons = []
    for name in hosts:
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            reasons.append((None, f"cannot resolve {name!r} ({exc})"))
            continue
        for family, kind, proto, _, sockaddr in infos:
            try:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(sockaddr)
            except OSError as exc:
                text = (f"port {port} is already in use (another server running?)" if exc.errno == errno.EADDRINUSE
                        else exc.strerror or str(exc))
                reasons.append((exc.errno, text))
            else:
                return None
    if not reasons or (definite_only and any(e not in (errno.EADDRINUSE, errno.EACCES) for e, _ in reasons)):
        return None
    return reasons[0][1]


def add_services(server: grpc.Server, app, *, health_servicer: health.HealthServicer | None = None,
                 training_servicer: pb_grpc.TrainingServicer | None = None) -> None:
    """Register ``app``'s services on a bound, not yet started ``server``: ``qlora_server.v1.Generation`` and
    ``Adapters`` (plus ``Training`` when ``training_servicer`` is given), ``grpc.health.v1.Health`` (SERVING for
    ``""`` and every service name; ``""`` and Generation turn NOT_SERVING if the engine's loop thread dies) and
    server reflection.

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
    on_engine_failure = getattr(getattr(app, "engine", None), "on_failure", None)
    if on_engine_failure is not None:  # the engine's loop thread died: nothing can be generated any more
        on_engine_failure(lambda: [health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                                   for name in ("", GENERATION_SERVICE)])
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def build_grpc_server(app, host: str, port: int, *, health_servicer: health.HealthServicer | None = None,
                      training_servicer: pb_grpc.TrainingServicer | None = None,
                      keys=None) -> tuple[grpc.Server, int]:
    """Build (not start) the thread-pool gRPC server of ``app`` and bind it: :func:`bind_grpc_server` with
    ``app.config.rpc_workers`` threads counting into ``app.metrics``, then :func:`add_services`.

    The pool has ``app.config.rpc_workers`` threads; a streaming RPC holds one for its whole life. Every service
    sits behind one :class:`StatusInterceptor` that maps errors, counts ``app.metrics.requests`` and enforces
    :func:`rpc_limits`; messages are capped at ``app.config.max_message_bytes`` both ways.

    Returns:
        ``(server, bound_port)``; call ``server.start()``.

    Raises:
        FailedPrecondition: (field ``port``) the address cannot be bound, e.g. the port is in use.
    """
    server, bound = bind_grpc_server(host, port, workers=app.config.rpc_workers, metrics=app.metrics, keys=keys,
                                     limits=rpc_limits(app.config), max_message_bytes=app.config.max_message_bytes)
    add_services(server, app, health_servicer=health_servicer, training_servicer=training_servicer)
    return server, bound
