"""Per-key rate limits: requests/s, generated tokens/min and concurrent generations (gRPC and HTTP together).

The limits are fields of a key in the keys file (:class:`server.auth.Principal`); :class:`KeyLimiter` holds the
live state (token buckets and in-flight counts) keyed by the key's ``name``, and :class:`server.access.Gate`
consults it for both the gRPC layer (:class:`server.rpc.auth.AuthInterceptor`) and the HTTP API, so a key's
limits hold across both. Every refusal is :class:`server.errors.RateLimited` (RESOURCE_EXHAUSTED, a message naming
the limit; gRPC sends trailing metadata ``retry-after-ms``, HTTP a 429 with ``retry-after-ms`` / ``retry-after``).

* ``requests_per_second``: a bucket of ``max(1, rate)`` requests (one second's worth) refilled at ``rate``/s;
  every guarded RPC or HTTP request of the key takes one request, or is refused.
* ``tokens_per_minute``: a bucket of ``tokens_per_minute`` tokens refilled at ``tokens_per_minute / 60``/s. A
  generation is refused while it holds less than one token; after a generation its completion tokens are taken
  unconditionally, so the bucket may go negative by one request's output (the next generations wait until it
  refills).
* ``max_concurrent``: at most that many generations (Generation RPCs and HTTP completions) of the key at once.

Thread-safe; the clock (``time.monotonic`` by default) is injectable for tests. The state of a key is kept while
its limits stay the same; a keys-file reload that changes a key's limits starts that key afresh (full buckets; the
generations already running keep their slot in the old state until they end).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from server.auth import KeyLimits
from server.errors import RateLimited

Clock = Callable[[], float]
_EPSILON = 1e-9  # tokens: a shortfall below this is float rounding, not a refusal


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` tokens per second; starts full. Not thread-safe on
    its own (:class:`KeyLimiter` holds a lock)."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if not (rate > 0 and capacity > 0):
            raise ValueError("rate and capacity must be > 0")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._level = float(capacity)
        self._stamp = clock()

    @property
    def level(self) -> float:
        """Tokens held now (negative after an overdraft by :meth:`charge`)."""
        now = self._clock()
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._level

    def wait_time(self, amount: float = 1.0) -> float:
        """Seconds until the bucket holds ``amount`` tokens (0 when it does now, to within float rounding of the
        refill, so that waiting the time a refusal names is always enough)."""
        missing = amount - self.level
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def try_take(self, amount: float = 1.0) -> float:
        """Take ``amount`` tokens if the bucket holds them and return 0; else take nothing and return the seconds
        until it will (> 0)."""
        wait = self.wait_time(amount)
        if wait == 0.0:
            self._level -= amount
        return wait

    def charge(self, amount: float) -> None:
        """Take ``amount`` tokens whatever the level (it may go negative)."""
        self.level  # refill first
        self._level -= amount


def _retry_ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _refuse(name: str, what: str, field: str, seconds: float) -> RateLimited:
    ms = _retry_ms(seconds)
    return RateLimited(f"key {name!r}: {what} limit ({field}); retry in {ms / 1000:g} s", retry_after_ms=ms)


def _num(x: float) -> str:
    return f"{x:g}"


class _KeyState:
    def __init__(self, limits: KeyLimits, clock: Clock) -> None:
        self.limits = limits
        rps, tpm = limits.requests_per_second, limits.tokens_per_minute
        self.requests = None if rps is None else TokenBucket(rps, max(1.0, rps), clock)
        self.tokens = None if tpm is None else TokenBucket(tpm / 60.0, float(tpm), clock)
        self.active = 0


class Slot:
    """A generation admitted by :meth:`KeyLimiter.start_generation`: :meth:`finish` charges its completion
    tokens and gives its concurrency slot back (once)."""

    def __init__(self, limiter: "KeyLimiter", state: _KeyState | None) -> None:
        self._limiter = limiter
        self._state = state
        self._done = False

    def finish(self, completion_tokens: int) -> None:
        if self._state is None:
            return
        with self._limiter._lock:
            if self._done:
                return
            self._done = True
            if self._state.tokens is not None and completion_tokens > 0:
                self._state.tokens.charge(completion_tokens)
            if self._state.limits.max_concurrent is not None:
                self._state.active -= 1


class KeyLimiter:
    """The live per-key limit state, keyed by key name (see the module docstring)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _KeyState] = {}

    def _state(self, name: str, limits: KeyLimits) -> _KeyState | None:
        """The state of ``name`` for ``limits`` (fresh when the limits changed); call with the lock held."""
        if not limits:
            self._states.pop(name, None)
            return None
        state = self._states.get(name)
        if state is None or state.limits != limits:
            state = self._states[name] = _KeyState(limits, self._clock)
        return state

    def admit(self, name: str, limits: KeyLimits) -> None:
        """Count one request of key ``name`` against its requests/s; raises :class:`RateLimited` when over."""
        if limits.requests_per_second is None:
            return
        with self._lock:
            state = self._state(name, limits)
            wait = state.requests.try_take(1.0)
        if wait > 0:
            raise _refuse(name, f"{_num(limits.requests_per_second)} requests/s", "requests_per_second", wait)

    def start_generation(self, name: str, limits: KeyLimits) -> Slot:
        """Admit one generation of key ``name`` against its concurrency and tokens/min limits (raises
        :class:`RateLimited`); the caller must :meth:`Slot.finish` the returned slot when the generation ends."""
        if limits.max_concurrent is None and limits.tokens_per_minute is None:
            return Slot(self, None)
        with self._lock:
            state = self._state(name, limits)
            if state.tokens is not None:
                wait = state.tokens.wait_time(1.0)
                if wait > 0:
                    raise _refuse(name, f"{limits.tokens_per_minute} tokens/min", "tokens_per_minute", wait)
            if state.limits.max_concurrent is not None:
                if state.active >= limits.max_concurrent:
                    # no clock tells when a running generation ends: suggest a short back-off
                    raise _refuse(name, f"{limits.max_concurrent} concurrent generations", "max_concurrent", 1.0)
                state.active += 1
        return Slot(self, state)
