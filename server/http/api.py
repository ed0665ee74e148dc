"""The FastAPI application: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.engine import collect_result
from server.engine.types import FINISH_LENGTH
from server.errors import Cancelled, InvalidArgument, NotFound, ServerError
from server.http import convert
from server.http.errors import ModelNotFound, error_response

log = logging.getLogger(__name__)


def build_http_app(app) -> FastAPI:
    """The OpenAI-compatible API over ``app`` (``server.app.App`` or a fake with ``config``, ``engine``,
    ``store``, ``base_info``)."""
    api = FastAPI(title="qlora-server OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError):
        status, body = error_response(exc)
        return JSONResponse(body, status_code=status)

    @api.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        status, body = error_response(InvalidArgument("the body must be a JSON object", field="body"))
        return JSONResponse(body, status_code=status)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("HTTP request failed")
        status, body = error_response(exc)
        return JSONResponse(body, status_code=status)

    def resolve(model) -> str:
        """The adapter id ``model`` names ("" for the base model)."""
        if not isinstance(model, str) or not model:
            raise InvalidArgument("must name the base model or a registered adapter", field="model")
        if model == app.base_info.name:
            return ""
        try:
            app.store.get(model)
        except NotFound:
            raise ModelNotFound(model) from None
        return model

    @api.get("/v1/models")
    def models() -> dict:
        created = int(time.time())
        ids = [app.base_info.name] + sorted(i.adapter_id for i in app.store.list())
        return {"object": "list",
                "data": [{"id": i, "object": "model", "created": created, "owned_by": "qlora-server"} for i in ids]}

    def generate(body: dict, chat: bool):
        adapter_id = resolve(body.get("model"))
        limits = app.config.engine
        req = convert.generation_request(body, chat=chat, adapter_id=adapter_id,
                                         max_new_tokens_limit=limits.max_new_tokens,
                                         max_stop_strings=limits.max_stop_strings,
                                         max_stop_chars=limits.max_stop_chars)
        echo = convert.echo_of(body, chat=chat)
        stream = app.engine.submit(req)
        model = body["model"]
        asked = req.params.wants_logprobs or req.params.prompt_logprobs is not None
        if convert.is_stream(body):
            return StreamingResponse(_sse(stream, chat, req.request_id, model, asked, echo),
                                     media_type="text/event-stream")
        finished = False
        try:
            result = collect_result(stream, req.request_id)
            finished = True
            text, reason, completion_tokens = result.text, result.finish_reason, result.completion_tokens
            logprobs = convert.logprobs_body(result.logprobs, chat=chat, asked=asked)
            if echo is not None:  # the prompt's text and tokens first; completion offsets count the prompt's text
                logprobs = convert.logprobs_body(result.logprobs, chat=False, asked=asked,
                                                 text_offset=len(echo.prompt))
                if echo.score_only:  # the one generated token is dropped
                    text, reason, completion_tokens, logprobs = "", FINISH_LENGTH, 0, None
                head = convert.prompt_logprobs_body(echo.prompt, result.prompt_logprobs) if asked else None
                text, logprobs = echo.prompt + text, convert.join_logprobs(head, logprobs)
            return convert.completion_body(
                chat=chat, request_id=req.request_id, model=model, text=text, reason=reason,
                prompt_tokens=result.prompt_tokens, completion_tokens=completion_tokens, logprobs=logprobs)
        finally:
            if not finished:
                stream.cancel(Cancelled("the HTTP request ended early"))

    @api.post("/v1/completions")
    def completions(body: dict[str, Any] = Body(...)):
        return generate(body, chat=False)

    @api.post("/v1/chat/completions")
    def chat_completions(body: dict[str, Any] = Body(...)):
        return generate(body, chat=True)

    return api


def _sse(stream, chat: bool, request_id: str, model: str, asked: bool = False, echo: convert.Echo | None = None):
    """Server-sent events: one ``data: {chunk}`` per text delta (with its tokens' log-probabilities when
    ``asked``), the last carrying finish_reason and usage, then ``data: [DONE]``. With ``echo`` the first chunk
    is the prompt (and its log-probabilities when ``asked``), sent when the engine's first event arrives (the
    prompt's scores come with it); a score-only echo (``max_tokens: 0``) then sends no completion text. An error
    after the first byte is sent as ``data: {"error": ...}``."""
    finished = False
    first = True
    sent = 0  # characters streamed so far (the completions shape's text_offset)
    try:
        for event in stream:
            if event.error is not None:
                yield _data(error_response(event.error)[1])
                return
            if echo is not None and first:
                prompt_lps = convert.prompt_logprobs_body(echo.prompt, event.prompt_logprobs) if asked else None
                yield _data(convert.chunk_body(chat=chat, request_id=request_id, model=model, text=echo.prompt,
                                               first=True, logprobs=prompt_lps))
                sent, first = len(echo.prompt), False
            if echo is not None and echo.score_only:  # the one generated token is dropped
                event = dataclasses.replace(event, text="", logprobs=(), completion_tokens=0,
                                            finish_reason=FINISH_LENGTH if event.finished else None)
            logprobs = convert.logprobs_body(event.logprobs, chat=chat, asked=asked, text_offset=sent)
            if event.finished:
                finished = True
                yield _data(convert.chunk_body(
                    chat=chat, request_id=request_id, model=model, text=event.text, reason=event.finish_reason,
                    first=first, usage_=convert.usage(event.prompt_tokens, event.completion_tokens),
                    logprobs=logprobs))
                yield "data: [DONE]\n\n"
                return
            if event.text or event.logprobs:
                yield _data(convert.chunk_body(chat=chat, request_id=request_id, model=model, text=event.text,
                                               first=first, logprobs=logprobs))
                sent += len(event.text)
                first = False
        yield _data(error_response(ServerError("the engine ended the request without a final event"))[1])
    finally:
        if not finished:
            stream.cancel(Cancelled("the HTTP client went away"))


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
