"""The FastAPI application: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

With a :class:`server.access.Gate` (``serve --api-keys-file``) every ``/v1/`` request needs ``Authorization: Bearer
<key>``, checked before routing and before the body is read (:class:`KeyCheck`); the routes apply the key's roles,
tenant scopes and rate limits exactly as the gRPC methods they mirror (:data:`ROLES_BY_ROUTE`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from server.access import Gate, bearer_token
from server.auth import ANY_ROLE, GENERATE_ROLES, Principal, require_adapter, visible
from server.engine.types import FINISH_LENGTH, GenerationEvent, GenerationResult
from server.errors import Cancelled, InvalidArgument, NotFound, ServerError, Unauthenticated
from server.http import convert
from server.http.errors import ModelNotFound, error_headers, error_response

log = logging.getLogger(__name__)

#: Roles allowed per route: those of the gRPC method each mirrors (``GET /v1/models`` as ListAdapters, the
#: completions as Generate). A ``/v1/`` route not listed (a 404 or 405 to come) needs a key of any role.
ROLES_BY_ROUTE: dict[str, frozenset[str]] = {
    "GET /v1/models": ANY_ROLE,
    "POST /v1/completions": GENERATE_ROLES,
    "POST /v1/chat/completions": GENERATE_ROLES,
}
GUARDED_PREFIX = "/v1/"
_OTHER_ROUTE = "an unlisted /v1/ route"  # what logs and messages call it (the path itself is the client's text)
_PRINCIPAL = "qlora_principal"  # key of the caller in the ASGI scope's ``state``
_KEY_HINT = "header 'Authorization: Bearer <key>'"


def _json_error(exc: Exception) -> JSONResponse:
    status, body = error_response(exc)
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


class KeyCheck:
    """ASGI middleware: a ``/v1/`` request without a known key (401) or of a role the route does not allow (403)
    is answered here, before routing and before its body is read; otherwise the caller's
    :class:`server.auth.Principal` goes into the scope's ``state`` for the route (:func:`caller`)."""

    def __init__(self, app, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        route = f"{scope['method']} {scope['path']}"
        if route not in ROLES_BY_ROUTE:
            route = _OTHER_ROUTE
        headers = [value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"authorization"]
        client = scope.get("client")
        try:
            principal = self.gate.authorize(bearer_token(headers), route, ROLES_BY_ROUTE.get(route, ANY_ROLE),
                                            hint=_KEY_HINT, peer=f"{client[0]}:{client[1]}" if client else "")
        except ServerError as exc:
            await _json_error(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[_PRINCIPAL] = principal
        await self.app(scope, receive, send)


def caller(request: Request, gate: Gate | None) -> Principal | None:
    """The principal :class:`KeyCheck` put on ``request`` (None when ``gate`` is None: keys off). Raises
    :class:`Unauthenticated` if keys are on and there is none (the middleware was bypassed)."""
    if gate is None:
        return None
    principal = request.scope.get("state", {}).get(_PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthenticated("missing API key: send " + _KEY_HINT)
    return principal


def build_http_app(app, gate: Gate | None = None) -> FastAPI:
    """The OpenAI-compatible API over ``app`` (``server.app.App`` or a fake with ``config``, ``engine``,
    ``store``, ``base_info``). With ``gate``, every ``/v1/`` request needs a key (:class:`KeyCheck`): the same
    keys, roles, tenant scopes and per-key rate limits as the gRPC port sharing ``gate``; None = open."""
    api = FastAPI(title="qlora-server OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    if gate is not None:
        api.add_middleware(KeyCheck, gate=gate)

    @api.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError):
        return _json_error(exc)

    @api.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        status, body = error_response(InvalidArgument("the body must be a JSON object", field="body"))
        return JSONResponse(body, status_code=status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals (a body it cannot parse, an unknown route, a wrong method) in OpenAI's error shape
        status = exc.status_code
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                            status_code=status, headers=getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("HTTP request failed")
        status, body = error_response(exc)
        return JSONResponse(body, status_code=status)

    def resolve(model, principal: Principal | None) -> str:
        """The adapter id ``model`` names ("" for the base model, open to every key that may generate). An adapter
        outside ``principal``'s scopes is 404 ``model_not_found`` exactly like a missing one (gRPC: NOT_FOUND)."""
        if not isinstance(model, str) or not model:
            raise InvalidArgument("must name the base model or a registered adapter", field="model")
        if model == app.base_info.name:
            return ""
        try:
            require_adapter(principal, model)
            app.store.get(model)
        except NotFound:
            raise ModelNotFound(model) from None
        return model

    @api.get("/v1/models")
    def models(request: Request) -> dict:
        principal = caller(request, gate)
        if gate is not None:
            gate.admit(principal, generation=False)
        created = int(time.time())
        ids = [app.base_info.name] + sorted(i.adapter_id for i in visible(principal, app.store.list()))
        return {"object": "list",
                "data": [{"id": i, "object": "model", "created": created, "owned_by": "qlora-server"} for i in ids]}

    def generate(request: Request, body: dict, chat: bool):
        """Admit the request against the caller's limits (a generation slot, given back when it ends), then run
        it: a whole body, or server-sent events when ``stream`` is set."""
        principal = caller(request, gate)
        slot = None if gate is None else gate.admit(principal, generation=True)
        tokens = 0
        handed_off = False  # the event stream finishes the slot
        try:
            adapter_id = resolve(body.get("model"), principal)
            limits = app.config.engine
            req = convert.generation_request(body, chat=chat, adapter_id=adapter_id,
                                             max_new_tokens_limit=limits.max_new_tokens,
                                             max_stop_strings=limits.max_stop_strings,
                                             max_stop_chars=limits.max_stop_chars)
            echo = convert.echo_of(body, chat=chat)
            try:
                stream = app.engine.submit(req)
            except InvalidArgument as exc:  # e.g. a grammar that does not compile: name the client's parameter
                raise convert.renamed(exc, body) from None
            model = body["model"]
            asked = req.params.wants_logprobs or req.params.prompt_logprobs is not None
            if convert.is_stream(body):
                events = EventStream(stream, chat, req.request_id, model, asked, slot, echo,
                                     rename=lambda exc: convert.renamed(exc, body))
                handed_off = True
                return EventStreamResponse(events)
            finished = False
            try:
                try:
                    result = GenerationResult.from_events(stream, req.request_id)
                except InvalidArgument as exc:  # a grammar that failed while decoding
                    raise convert.renamed(exc, body) from None
                finished = True
                tokens = result.completion_tokens
                text, reason, completion_tokens = result.text, result.finish_reason, result.completion_tokens
                logprobs = convert.logprobs_body(result.logprobs, chat=chat, asked=asked)
                if echo is not None:  # the prompt's text and tokens first; completion offsets count the prompt's
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
        finally:
            if slot is not None and not handed_off:
                slot.finish(tokens)

    @api.post("/v1/completions")
    def completions(request: Request, body: dict[str, Any] = Body(...)):
        return generate(request, body, chat=False)

    @api.post("/v1/chat/completions")
    def chat_completions(request: Request, body: dict[str, Any] = Body(...)):
        return generate(request, body, chat=True)

    return api


class EventStream:
    """Server-sent events of one request: one ``data: {chunk}`` per text delta (with its tokens' log-probabilities
    when ``asked``), the last carrying finish_reason and usage, then ``data: [DONE]``. With ``echo`` the first
    chunk is the prompt (and its log-probabilities when ``asked``), sent when the engine's first event arrives (the
    prompt's scores come with it); a score-only echo (``max_tokens: 0``) then sends no completion text. An error
    after the first byte is sent as ``data: {"error": ...}`` (an INVALID_ARGUMENT naming the parameter the client
    set, via ``rename``), then ``data: [DONE]``.

    :meth:`close` (idempotent, thread-safe; called when the iteration ends and when the response ends, even if the
    client went away before the first byte) cancels the engine's request unless it finished and finishes the
    rate-limit ``slot`` with its completion tokens (a stream that ends early: one per chunk sent, as gRPC does)."""

    def __init__(self, stream, chat: bool, request_id: str, model: str, asked: bool = False, slot=None,
                 echo: convert.Echo | None = None, rename=lambda exc: exc) -> None:
        self._stream, self._chat, self._request_id, self._model, self._asked = stream, chat, request_id, model, asked
        self._slot, self._echo, self._rename = slot, echo, rename
        self._lock = threading.Lock()
        self._closed = self._finished = False
        self._tokens = self._chunks = 0

    def __iter__(self):
        chat, request_id, model, asked, echo = self._chat, self._request_id, self._model, self._asked, self._echo
        first = True
        sent = 0  # characters streamed so far (the completions shape's text_offset)
        try:
            for event in _events(self._stream, request_id):
                if event.error is not None:
                    error = event.error
                    if isinstance(error, InvalidArgument):  # name the parameter the client set (guided_*)
                        error = self._rename(error)
                    yield _data(error_response(error)[1])
                    yield "data: [DONE]\n\n"  # as vLLM: the stream still ends the usual way
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
                    self._finished = True
                    self._tokens = event.completion_tokens
                    yield _data(convert.chunk_body(
                        chat=chat, request_id=request_id, model=model, text=event.text, reason=event.finish_reason,
                        first=first, usage_=convert.usage(event.prompt_tokens, event.completion_tokens),
                        logprobs=logprobs))
                    yield "data: [DONE]\n\n"
                    return
                if event.text or event.logprobs:
                    yield _data(convert.chunk_body(chat=chat, request_id=request_id, model=model, text=event.text,
                                                   first=first, logprobs=logprobs))
                    self._chunks += 1
                    sent += len(event.text)
                    first = False
            yield _data(error_response(ServerError("the engine ended the request without a final event"))[1])
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the engine's request unless it finished, and give the rate-limit slot back (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._finished:
            self._stream.cancel(Cancelled("the HTTP client went away"))
        if self._slot is not None:
            self._slot.finish(self._tokens or self._chunks)


def _events(stream, request_id: str):
    """``stream``'s events, where an error the stream raises (the engine's :class:`RequestStream` raises a request's
    error instead of yielding it) comes as a final event carrying it, so it reaches the client as an error chunk."""
    it = iter(stream)
    while True:
        try:
            event = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes to the client as an OpenAI error body
            yield GenerationEvent(request_id, finished=True, error=exc)
            return
        yield event


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` of an :class:`EventStream` that is closed when the response ends however it ends
    (done, client gone, cancelled), even if its iteration never started, and as soon as the server reports the
    client gone: a request still waiting for its first token is cancelled then, not when a token comes."""

    def __init__(self, events: EventStream) -> None:
        super().__init__(iter(events), media_type="text/event-stream")
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        async def watched() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._events.close()  # ends the iteration blocked on the engine in its worker thread
            return message

        try:
            await super().__call__(scope, watched, send)
        finally:
            self._events.close()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
