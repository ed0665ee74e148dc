"""The API-key interceptor: the only code that reads the ``authorization`` metadata.

It sits inside :class:`server.rpc.interceptor.StatusInterceptor` (which maps its errors and counts the RPC) and
asks a :class:`server.access.Gate` (shared with the HTTP API) to resolve ``authorization: Bearer <key>`` to a
:class:`server.auth.Principal`, check the role against :data:`ROLES_BY_METHOD` and apply the key's rate limits
(:mod:`server.ratelimit`: requests/s on every RPC; concurrency and tokens/min on Generation RPCs); it hands the
principal to the handler through :func:`current_principal`. Methods outside ``qlora_server.`` (health, reflection)
stay open and unlimited.
"""

from __future__ import annotations

import contextvars
from typing import Callable

import grpc

from server.access import Gate, bearer_token
from server.auth import ADMIN, ANY_ROLE, GENERATE_ROLES, TRAIN_ROLES, KeyStore, Principal
from server.ratelimit import KeyLimiter

GUARDED_PREFIX = "qlora_server."
#: Methods under this prefix are Generation RPCs (per-key ``max_concurrent`` and ``tokens_per_minute``).
GENERATION_PREFIX = "qlora_server.v1.Generation/"
#: Roles allowed per method (full name without the leading slash); a ``qlora_server.`` method not listed: admin only.
ROLES_BY_METHOD: dict[str, frozenset[str]] = {
    "qlora_server.v1.Generation/Generate": GENERATE_ROLES,
    "qlora_server.v1.Generation/GenerateStream": GENERATE_ROLES,
    "qlora_server.v1.Adapters/ListAdapters": ANY_ROLE,
    "qlora_server.v1.Adapters/GetAdapter": ANY_ROLE,
    "qlora_server.v1.Adapters/RegisterAdapter": TRAIN_ROLES,
    "qlora_server.v1.Adapters/UploadAdapter": TRAIN_ROLES,
    "qlora_server.v1.Adapters/UnregisterAdapter": TRAIN_ROLES,
    "qlora_server.v1.Training/CreateTrainingJob": TRAIN_ROLES,
    "qlora_server.v1.Training/GetTrainingJob": TRAIN_ROLES,
    "qlora_server.v1.Training/ListTrainingJobs": TRAIN_ROLES,
    "qlora_server.v1.Training/CancelTrainingJob": TRAIN_ROLES,
    "qlora_server.v1.Training/WatchTrainingJob": TRAIN_ROLES,
}
_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("qlora_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the RPC this thread is handling; None when auth is off (everything allowed)."""
    return _PRINCIPAL.get()


def bearer_key(metadata) -> str | None:
    """The key of an ``authorization: Bearer <key>`` entry of ``metadata``, or None."""
    return bearer_token(value for key, value in metadata or () if key.lower() == "authorization")


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses ``qlora_server.`` RPCs without a known key (UNAUTHENTICATED) or of a role not allowed
    (PERMISSION_DENIED) or over one of its rate limits (RESOURCE_EXHAUSTED with ``retry-after-ms``) before the
    handler runs; the key itself is never logged nor echoed. ``keys`` is the :class:`server.access.Gate` the HTTP
    API shares, or a :class:`KeyStore` (then a gate of its own, with ``limiter`` holding the per-key rate-limit
    state: a fresh :class:`KeyLimiter` by default; pass one with a fake clock in tests)."""

    def __init__(self, keys: Gate | KeyStore, limiter: KeyLimiter | None = None) -> None:
        self.gate = keys if isinstance(keys, Gate) else Gate(keys, limiter)
        self.limiter = self.gate.limiter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method.lstrip("/")
        if handler is None or not method.startswith(GUARDED_PREFIX):
            return handler
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, method), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, method), **kwargs)

    def authorize(self, method: str, context: grpc.ServicerContext) -> Principal:
        """The principal of the call, or raise Unauthenticated / PermissionDenied."""
        return self.gate.authorize(bearer_key(context.invocation_metadata()), method,
                                   ROLES_BY_METHOD.get(method, frozenset({ADMIN})),
                                   hint="metadata 'authorization: Bearer <key>'", peer=context.peer())

    def _admit(self, method: str, principal: Principal):
        """Apply ``principal``'s rate limits to one RPC of ``method``: a :class:`server.ratelimit.Slot` to
        finish when a Generation RPC ends, None for other RPCs; raises RateLimited when over a limit."""
        return self.gate.admit(principal, generation=method.startswith(GENERATION_PREFIX))

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request_or_iterator, context):
            principal = self.authorize(method, context)
            slot = self._admit(method, principal)
            _PRINCIPAL.set(principal)
            tokens = 0
            try:
                response = behavior(request_or_iterator, context)
                tokens = getattr(response, "completion_tokens", 0) or 0
                return response
            finally:
                _PRINCIPAL.set(None)
                if slot is not None:
                    slot.finish(tokens)

        return wrapped

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request_or_iterator, context):
            principal = self.authorize(method, context)
            slot = self._admit(method, principal)
            _PRINCIPAL.set(principal)
            # The last message carries completion_tokens; a stream that ends early is charged one token per
            # message sent (each carries at least one generated token's text): a lower bound.
            sent = final = 0
            responses = None
            try:
                responses = behavior(request_or_iterator, context)
                for message in responses:
                    sent += 1
                    final = getattr(message, "completion_tokens", 0) or final
                    yield message
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # as ``yield from`` would: the handler's own clean-up runs now
                _PRINCIPAL.set(None)
                if slot is not None:
                    slot.finish(final or sent)

        return wrapped
