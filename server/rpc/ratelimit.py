"""Moved to :mod:`server.ratelimit` (plain code the gRPC and HTTP layers share); re-exported for old imports."""

from server.ratelimit import KeyLimiter, Slot, TokenBucket  # noqa: F401
