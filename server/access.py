"""API-key admission shared by the gRPC and HTTP layers: bearer token → principal, role check, per-key limits.

Plain code (no gRPC, no HTTP): :class:`server.rpc.auth.AuthInterceptor` and the HTTP API (``server.http.api``) both
call one :class:`Gate`, so a key means the same on either port: the same :class:`server.auth.KeyStore` (a SIGHUP
reload applies to both), the same roles (``server.auth.ANY_ROLE`` / ``GENERATE_ROLES`` / ``TRAIN_ROLES``) and one
:class:`server.ratelimit.KeyLimiter` (a key's requests/s, tokens/min and concurrency count across both ports).
"""

from __future__ import annotations

import logging
from typing import Iterable

from server.auth import KeyStore, PermissionDenied, Principal, Unauthenticated
from server.ratelimit import KeyLimiter, Slot

log = logging.getLogger(__name__)


def bearer_token(values: Iterable) -> str | None:
    """The key of the first ``Bearer <key>`` among ``values`` (the values of ``authorization`` metadata or headers;
    the scheme is case-insensitive, whitespace around the key is ignored), or None. Never raises: values that are
    not strings or not of that form are skipped."""
    for value in values:
        if isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Gate:
    """Who may do what, and how often: resolves keys against ``keys`` and applies their rate limits in ``limiter``
    (a fresh :class:`KeyLimiter` by default; pass one with a fake clock in tests). Thread-safe. The key itself is
    never logged nor put in an error; logs name the key's ``name``."""

    def __init__(self, keys: KeyStore, limiter: KeyLimiter | None = None) -> None:
        self.keys = keys
        self.limiter = limiter if limiter is not None else KeyLimiter()

    def authorize(self, key: str | None, operation: str, roles: frozenset[str], *, hint: str,
                  peer: str = "") -> Principal:
        """The principal of ``key`` (from :func:`bearer_token`) for ``operation`` (a gRPC method or an HTTP route,
        for messages and logs), which ``roles`` may call.

        Raises:
            Unauthenticated: ``key`` is None (the message says to send ``hint``, e.g. ``header 'Authorization:
                Bearer <key>'``) or not in the keys file (compared in constant time by the key store).
            PermissionDenied: the key's role is not one of ``roles``.
        """
        if key is None:
            raise Unauthenticated(f"missing API key: send {hint}")
        principal = self.keys.resolve(key)
        if principal is None:
            log.warning("unknown API key on %s from %s", operation, peer or "?")
            raise Unauthenticated("unknown API key")
        if principal.role not in roles:
            log.info("key %s (role %s) refused %s", principal.name, principal.role, operation)
            raise PermissionDenied(f"role {principal.role!r} may not call {operation}")
        return principal

    def admit(self, principal: Principal, *, generation: bool) -> Slot | None:
        """Apply ``principal``'s rate limits to one request: every request counts against ``requests_per_second``;
        a ``generation`` also against ``max_concurrent`` and ``tokens_per_minute`` and returns the
        :class:`server.ratelimit.Slot` to finish (with its completion tokens) when it ends. None when nothing is
        to be finished. Raises :class:`server.errors.RateLimited` when over a limit."""
        if not principal.limits:
            return None
        self.limiter.admit(principal.name, principal.limits)
        if not generation:
            return None
        return self.limiter.start_generation(principal.name, principal.limits)
