"""The API-key interceptor: the only code that reads the ``authorization`` metadata.

It sits inside :class:`server.rpc.interceptor.StatusInterceptor` (which maps its errors and counts the RPC),
resolves ``authorization: Bearer <key>`` to a :class:`server.auth.Principal`, checks the role against
:data:`ROLES_BY_METHOD` and hands the principal to the handler through :func:`current_principal`. Methods outside
``qlora_server.`` (health, reflection) stay open.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Callable

import grpc

from server.auth import ADMIN, INFERENCE, ROLES, TRAINER, KeyStore, PermissionDenied, Principal, Unauthenticated

_LOG = logging.getLogger(__name__)
GUARDED_PREFIX = "qlora_server."
_ALL = frozenset(ROLES)
_TRAIN = frozenset({TRAINER, ADMIN})
_INFER = frozenset({INFERENCE, ADMIN})
#: Roles allowed per method (full name without the leading slash); a ``qlora_server.`` method not listed: admin only.
ROLES_BY_METHOD: dict[str, frozenset[str]] = {
    "qlora_server.v1.Generation/Generate": _INFER,
    "qlora_server.v1.Generation/GenerateStream": _INFER,
    "qlora_server.v1.Adapters/ListAdapters": _ALL,
    "qlora_server.v1.Adapters/GetAdapter": _ALL,
    "qlora_server.v1.Adapters/RegisterAdapter": _TRAIN,
    "qlora_server.v1.Adapters/UploadAdapter": _TRAIN,
    "qlora_server.v1.Adapters/UnregisterAdapter": _TRAIN,
    "qlora_server.v1.Training/CreateTrainingJob": _TRAIN,
    "qlora_server.v1.Training/GetTrainingJob": _TRAIN,
    "qlora_server.v1.Training/ListTrainingJobs": _TRAIN,
    "qlora_server.v1.Training/CancelTrainingJob": _TRAIN,
    "qlora_server.v1.Training/WatchTrainingJob": _TRAIN,
}
_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("qlora_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the RPC this thread is handling; None when auth is off (everything allowed)."""
    return _PRINCIPAL.get()


def bearer_key(metadata) -> str | None:
    """The key of an ``authorization: Bearer <key>`` entry of ``metadata``, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses ``qlora_server.`` RPCs without a known key (UNAUTHENTICATED) or of a role not allowed
    (PERMISSION_DENIED) before the handler runs; the key itself is never logged nor echoed."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

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
        key = bearer_key(context.invocation_metadata())
        if key is None:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        principal = self._keys.resolve(key)
        if principal is None:
            _LOG.warning("unknown API key on %s from %s", method, context.peer())
            raise Unauthenticated("unknown API key")
        if principal.role not in ROLES_BY_METHOD.get(method, frozenset({ADMIN})):
            _LOG.info("key %s (role %s) refused %s", principal.name, principal.role, method)
            raise PermissionDenied(f"role {principal.role!r} may not call {method}")
        return principal

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request_or_iterator, context):
            _PRINCIPAL.set(self.authorize(method, context))
            try:
                return behavior(request_or_iterator, context)
            finally:
                _PRINCIPAL.set(None)

        return wrapped

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request_or_iterator, context):
            _PRINCIPAL.set(self.authorize(method, context))
            try:
                yield from behavior(request_or_iterator, context)
            finally:
                _PRINCIPAL.set(None)

        return wrapped
