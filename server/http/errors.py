"""The one place the server's error taxonomy becomes HTTP statuses and OpenAI-style error bodies."""

from __future__ import annotations

import math

from server.errors import RateLimited, ServerError

#: ``ServerError.code`` → HTTP status; anything else is 500.
STATUS_BY_CODE = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
}
# OpenAI answers a missing or wrong key with 401, type invalid_request_error, code invalid_api_key.
_TYPE_BY_STATUS = {400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
                   401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}


class ModelNotFound(ServerError):
    """``model`` names neither the base model nor a registered adapter."""

    code = "NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist (not the base model nor a registered adapter)")
        self.field = "model"


def error_response(exc: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for ``exc``; an unexpected exception hides its detail (500)."""
    if not isinstance(exc, ServerError):
        return 500, _body("internal server error", "server_error", None, None)
    status = STATUS_BY_CODE.get(exc.code, 500)
    param, code = exc.field, exc.code.lower()
    if isinstance(exc, ModelNotFound) or (exc.code == "NOT_FOUND" and exc.field == "adapter_id"):
        param, code = "model", "model_not_found"  # the adapter went away between the lookup and the submit
    elif exc.code == "UNAUTHENTICATED":
        code = "invalid_api_key"
    elif isinstance(exc, RateLimited):
        code = "rate_limit_exceeded"
    message = str(exc) if status != 500 else "internal server error"
    return status, _body(message, _TYPE_BY_STATUS.get(status, "server_error"), param, code)


def error_headers(exc: Exception) -> dict[str, str]:
    """The headers that go with :func:`error_response` for ``exc``: ``retry-after-ms`` (milliseconds, what the
    openai client waits first) and ``retry-after`` (whole seconds, rounded up) for a per-key rate limit
    (:class:`RateLimited`); ``www-authenticate: Bearer`` for a missing or unknown key; else none."""
    if isinstance(exc, RateLimited):
        return {"retry-after-ms": str(exc.retry_after_ms), "retry-after": str(math.ceil(exc.retry_after_ms / 1000))}
    if isinstance(exc, ServerError) and exc.code == "UNAUTHENTICATED":
        return {"www-authenticate": "Bearer"}
    return {}


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
