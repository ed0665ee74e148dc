"""Logging set-up (plain text or JSON lines) and the one structured log line written per finished request."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import TextIO

#: Logger of the per-request lines (one per generation that reached the engine's queue).
REQUEST_LOGGER = "qlora_server.requests"
#: Format of plain-text lines.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Library loggers raised to a higher level: their messages are not the user's concern. bitsandbytes tries to fetch
#: an optional CPU kernel from the Hugging Face hub through the ``kernels`` package on every start and warns when it
#: cannot; the built-in CPU kernel it falls back to is the one we test with.
#: transformers' checkpoint rotation warns that file mtimes "may not be reliable" on some filesystems and then
#: orders checkpoints by step number, which is what we rely on anyway.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR, "transformers.trainer_utils": logging.ERROR}
# Keys every JSON line has; structured fields never overwrite them.
_BASE_KEYS = ("ts", "level", "logger", "msg")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (Unix time, seconds), ``level``, ``logger``, ``msg``, the record's
    structured ``fields`` (a dict passed as ``extra={"fields": ...}``, e.g. the request log's) merged in at the top
    level, and ``exc`` (the formatted traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
                       "msg": record.getMessage()}
        for key, value in (getattr(record, "fields", None) or {}).items():
            if key not in _BASE_KEYS:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(json_lines: bool = False, level: int = logging.INFO,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` or above to one handler on ``stream`` (default stderr), formatted as
    JSON lines (:class:`JsonFormatter`) or as plain text (:data:`TEXT_FORMAT`). Replaces the root logger's
    handlers, so calling it again switches format, and quiets :data:`QUIET_LOGGERS`. Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries(level)
    return handler


def quiet_libraries(level: int = logging.INFO) -> None:
    """Raise each of :data:`QUIET_LOGGERS` to its quiet level (or ``level``, if higher). Every entry point that sets
    up logging calls this (``configure_logging`` does), so the server, the trainer and job workers log alike."""
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, quiet_level))


@dataclass(frozen=True)
class RequestLog:
    """Writes the request log line: one INFO record on :data:`REQUEST_LOGGER` per finished generation, successful
    or not, with request id, adapter id, status, finish reason, token counts and timings (seconds) as structured
    ``fields`` (top-level keys in JSON mode, ``key=value`` pairs in the text message).

    Prompt text (``prompt`` or chat ``messages``) is included only when ``log_prompts`` is set
    (``ServerConfig.log_prompts``); generated text is never logged.
    """

    log_prompts: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(REQUEST_LOGGER))

    def finished(self, request, request_id: str, *, status: str, finish_reason: str | None, prompt_tokens: int,
                 completion_tokens: int, queue_seconds: float, ttft_seconds: float | None, tpot_seconds: float | None,
                 total_seconds: float, error: str | None = None) -> dict:
        """Log one finished request and return its fields.

        Args:
            request: the :class:`~server.engine.types.GenerationRequest` (``adapter_id``, ``prompt``, ``messages``).
            request_id: the id the engine used (the client's, or one the server made).
            status: gRPC status name the request ended with (``OK``, ``CANCELLED``, ``DEADLINE_EXCEEDED``, …).
            finish_reason: ``stop`` / ``length`` / ``eos`` when it succeeded, else None.
            prompt_tokens, completion_tokens: token counts.
            queue_seconds: arrival to start of prefill (0 when it never left the queue).
            ttft_seconds: arrival to first token (None when no token was generated).
            tpot_seconds: mean time per output token after the first (None below 2 tokens).
            total_seconds: arrival to end.
            error: the error's message when it failed.
        """
        fields: dict = {
            "event": "request",
            "request_id": request_id,
            "adapter_id": request.adapter_id or "",
            "status": status,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "queue_seconds": _round(queue_seconds),
            "ttft_seconds": _round(ttft_seconds),
            "tpot_seconds": _round(tpot_seconds),
            "total_seconds": _round(total_seconds),
        }
        if error is not None:
            fields["error"] = error
        if self.log_prompts:
            if request.messages:
                fields["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                fields["prompt"] = request.prompt
        if self.logger.isEnabledFor(logging.INFO):
            text = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k != "event" and v is not None)
            self.logger.info("request %s", text, extra={"fields": fields})
        return fields


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def _text_value(value) -> str:
    if isinstance(value, str) and value and all(c.isalnum() or c in "._:-" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)
