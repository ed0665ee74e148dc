"""The one place the server's error taxonomy becomes HTTP statuses and OpenAI-style error bodies."""

from __future__ import annotations

from server.errors import ServerError

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
_TYPE_BY_STATUS = {400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
                   401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


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
    message = str(exc) if status != 500 else "internal server error"
    return status, _body(message, _TYPE_BY_STATUS.get(status, "server_error"), param, code)


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
