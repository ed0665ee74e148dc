"""The one server interceptor: maps raised errors to gRPC status codes and counts every finished RPC by code."""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Mapping

import grpc

from server.errors import ResourceExhausted, ServerError, Unavailable
from server.metrics import Metrics

_LOG = logging.getLogger(__name__)

#: Trailing-metadata key carrying :attr:`ServerError.field` (the bad request field) when the error names one.
FIELD_METADATA_KEY = "qlora-error-field"
#: Trailing-metadata key carrying the milliseconds to wait before retrying a rate-limited RPC
#: (:class:`server.errors.RateLimited`).
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
#: Status details sent for unexpected exceptions (the traceback goes to the server log only).
INTERNAL_DETAILS = "internal error (see the server log)"
#: A remaining time above this means the client set no deadline (gRPC reports an infinite-future deadline).
NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600.0
#: An RPC that the client ends within this many seconds of its deadline (and within
#: :data:`DEADLINE_SLACK_FRACTION` of its whole timeout) counts as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_SECONDS = 1.0
DEADLINE_SLACK_FRACTION = 0.25


def client_time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the client's deadline (>= 0), or None when it set none."""
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > NO_DEADLINE_SECONDS:
        return None
    return max(0.0, remaining)


class DeadlineClock:
    """Tells whether an RPC that ended before its handler did ended because the client's deadline passed.

    The client's own deadline timer usually fires first: it cancels the call, and that cancellation can reach the
    server a little *before* the server's copy of the deadline (which starts when the request arrives, later than
    the client started counting). Such an RPC still failed on its deadline, so an end that comes within
    ``min(DEADLINE_SLACK_SECONDS, DEADLINE_SLACK_FRACTION * timeout)`` of the deadline counts as one; ``timeout``
    is the time that was left when this clock was made (at the start of the handler).
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._budget = client_time_remaining(context)

    def passed(self) -> bool:
        """True when the client set a deadline and it has passed (within the slack above)."""
        remaining = client_time_remaining(self._context)
        if self._budget is None or remaining is None:
            return False
        return remaining <= min(DEADLINE_SLACK_SECONDS, DEADLINE_SLACK_FRACTION * self._budget)


def status_code_for(error: ServerError) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` named by ``error.code``; INTERNAL when the name is not a status code."""
    try:
        return grpc.StatusCode[error.code]
    except KeyError:
        return grpc.StatusCode.INTERNAL


class _Outcome:
    """Counts one RPC exactly once: with the code its handler ended with, or — when the RPC terminated before the
    handler did — DEADLINE_EXCEEDED if the client's deadline had passed (see :class:`DeadlineClock`), else
    CANCELLED (cancel, disconnect)."""

    def __init__(self, metrics: Metrics, method: str, context: grpc.ServicerContext) -> None:
        self._metrics = metrics
        self._method = method
        self._clock = DeadlineClock(context)
        self._lock = threading.Lock()
        self._done = False

    def record(self, code: str) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._metrics.requests.labels(self._method, code).inc()

    def on_terminated(self) -> None:
        expired = self._clock.passed()
        self.record((grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name)


class ConcurrencyLimit:
    """At most ``cap`` RPCs at once among the methods it guards; one more is refused at once with
    RESOURCE_EXHAUSTED naming ``option`` (the ``serve`` flag that sets the cap). Never blocks."""

    def __init__(self, cap: int, what: str, option: str) -> None:
        self.cap = cap
        self._what = what
        self._option = option
        self._slots = threading.BoundedSemaphore(cap)

    def acquire(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(f"{self.cap} {self._what} RPCs are already in flight, the server's cap "
                                    f"({self._option}); retry later")

    def release(self) -> None:
        self._slots.release()


class Drain:
    """Graceful shutdown of the RPCs behind a :class:`StatusInterceptor`: after :meth:`start`, every new RPC
    except those of the ``exempt`` services / methods (health, reflection, training watches) is refused with
    UNAVAILABLE while the server still listens, and :meth:`wait` blocks until the RPCs already running have ended."""

    def __init__(self, exempt: tuple[str, ...] = ()) -> None:
        self.exempt = exempt
        self._cond = threading.Condition()
        self._active = 0
        self._draining = False

    def counts(self, method: str) -> bool:
        return method not in self.exempt and method.split("/")[0] not in self.exempt

    def enter(self) -> None:
        with self._cond:
            if self._draining:
                raise Unavailable("the server is shutting down; retry against another instance or later")
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def start(self) -> None:
        with self._cond:
            self._draining = True

    def wait(self, timeout: float) -> bool:
        """Block until no counted RPC is running or ``timeout`` seconds passed; True when drained."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout=max(0.0, timeout))


class StatusInterceptor(grpc.ServerInterceptor):
    """Wraps every handler (unary and streaming, requests and responses) so that:

    * a :class:`ServerError` becomes the status its ``.code`` names, with ``str(error)`` ("field: message") as
      details and the field in trailing metadata ``qlora-error-field`` (and, for a
      :class:`server.errors.RateLimited`, the retry hint in ``retry-after-ms``);
    * any other exception becomes INTERNAL with a fixed message (logged here with its traceback, never sent);
    * a handler that set a status itself (``context.abort`` / ``set_code``) keeps it;
    * ``metrics.requests{method, code}`` counts the RPC once when it finishes; ``method`` is the full method
      name without the leading slash (e.g. ``qlora_server.v1.Generation/Generate``);
    * an RPC whose method (``service/Method``) or service is a key of ``limits`` first takes a slot of that
      :class:`ConcurrencyLimit` (RESOURCE_EXHAUSTED when none is free) and gives it back when its handler ends;
    * with a ``drain``, RPCs it counts are tracked, and refused with UNAVAILABLE once it started.
    """

    def __init__(self, metrics: Metrics, limits: Mapping[str, ConcurrencyLimit] | None = None,
                 drain: Drain | None = None) -> None:
        self._metrics = metrics
        self._limits = dict(limits or {})
        self._drain = drain

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        limit = self._limits.get(method) or self._limits.get(method.split("/")[0])
        if self._drain is not None and self._drain.counts(method):
            limit = _Guard(self._drain, limit)
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(handler.unary_unary, method, limit),
                                                       **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(handler.stream_unary, method, limit),
                                                        **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, method, limit),
                                                        **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._wrap_stream(handler.stream_stream, method, limit),
                                                         **kwargs)
        return handler

    def _start(self, method: str, context: grpc.ServicerContext) -> _Outcome:
        outcome = _Outcome(self._metrics, method, context)
        if not context.add_callback(outcome.on_terminated):
            outcome.on_terminated()
        return outcome

    def _wrap_unary(self, behavior: Callable, method: str, limit: ConcurrencyLimit | None = None) -> Callable:
        def wrapped(request_or_iterator, context):
            outcome = self._start(method, context)
            try:
                if limit is None:
                    response = behavior(request_or_iterator, context)
                else:
                    limit.acquire()
                    try:
                        response = behavior(request_or_iterator, context)
                    finally:
                        limit.release()
            except Exception as exc:
                self._fail(exc, context, outcome, method)
                raise
            outcome.record(_final_code(context))
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str, limit: ConcurrencyLimit | None = None) -> Callable:
        def wrapped(request_or_iterator, context):
            outcome = self._start(method, context)
            try:
                if limit is None:
                    yield from behavior(request_or_iterator, context)
                else:
                    limit.acquire()
                    try:
                        yield from behavior(request_or_iterator, context)
                    finally:
                        limit.release()
            except Exception as exc:
                self._fail(exc, context, outcome, method)
                raise
            outcome.record(_final_code(context))

        return wrapped

    def _fail(self, exc: Exception, context: grpc.ServicerContext, outcome: _Outcome, method: str) -> None:
        """Record the failure and abort the RPC with its status (``context.abort`` raises); returns only when the
        handler already set a status or the RPC is gone, and the caller re-raises."""
        if isinstance(exc, ServerError):
            code = status_code_for(exc)
            outcome.record(code.name)
            trailers = []
            if exc.field:
                trailers.append((FIELD_METADATA_KEY, exc.field))
            retry_after_ms = getattr(exc, "retry_after_ms", None)
            if retry_after_ms is not None:
                trailers.append((RETRY_AFTER_METADATA_KEY, str(retry_after_ms)))
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            context.abort(code, str(exc))
        preset = context.code()
        if preset is not None and preset != grpc.StatusCode.OK:
            outcome.record(preset.name)  # the handler aborted with its own status
            return
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            return  # reading requests of an RPC the client cancelled; on_terminated counts it
        _LOG.error("unhandled exception in %s", method, exc_info=exc)
        outcome.record(grpc.StatusCode.INTERNAL.name)
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


class _Guard:
    """A drain's enter / leave around an optional :class:`ConcurrencyLimit` (same interface)."""

    def __init__(self, drain: Drain, limit: ConcurrencyLimit | None) -> None:
        self._drain = drain
        self._limit = limit

    def acquire(self) -> None:
        self._drain.enter()
        if self._limit is not None:
            try:
                self._limit.acquire()
            except BaseException:
                self._drain.leave()
                raise

    def release(self) -> None:
        if self._limit is not None:
            self._limit.release()
        self._drain.leave()


def _final_code(context: grpc.ServicerContext) -> str:
    code = context.code()
    return (code or grpc.StatusCode.OK).name
