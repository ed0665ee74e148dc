"""The small error taxonomy every layer raises; the RPC layer maps each class to one gRPC status code."""

from __future__ import annotations


class ServerError(Exception):
    """Base class. ``code`` names the gRPC status the RPC layer answers with."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(ServerError):
    """A request or config field is malformed; ``field`` names it (e.g. ``temperature``)."""

    code = "INVALID_ARGUMENT"


class NotFound(ServerError):
    """An adapter id, training job id or path that does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(ServerError):
    """Registering an adapter id that exists without ``replace``."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(ServerError):
    """Queue full, prompt longer than the context, upload over the size cap."""

    code = "RESOURCE_EXHAUSTED"


class RateLimited(ResourceExhausted):
    """A per-key rate limit (requests/s, tokens/min, concurrent generations) refused the RPC; the RPC layer sends
    ``retry_after_ms`` as trailing metadata ``retry-after-ms``."""

    def __init__(self, message: str, retry_after_ms: int, field: str | None = None) -> None:
        self.retry_after_ms = int(retry_after_ms)
        super().__init__(message, field=field)


class FailedPrecondition(ServerError):
    """The request is well formed but the server's state forbids it (e.g. cancel a finished job)."""

    code = "FAILED_PRECONDITION"


class Cancelled(ServerError):
    """The client cancelled or the server is shutting down."""

    code = "CANCELLED"


class DeadlineExceeded(ServerError):
    """The client's deadline passed before the request finished."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(ServerError):
    """The service cannot take the request now (the engine is stopped or its thread died); retrying later, or on
    another replica, may succeed."""

    code = "UNAVAILABLE"


class Unauthenticated(ServerError):
    """No API key, or one the keys file does not list (auth on)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(ServerError):
    """The key's role may not call this RPC, or a server path lies outside the allowed roots."""

    code = "PERMISSION_DENIED"
