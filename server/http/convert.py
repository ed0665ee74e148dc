"""OpenAI JSON bodies ↔ the plain engine types (no FastAPI here): request validation and response shapes."""

from __future__ import annotations

import codecs
import json
import math
import time
import uuid
from dataclasses import dataclass

from server.engine.types import (
    FINISH_LENGTH,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    GenerationRequest,
    ResponseFormat,
    TokenLogprob,
    TopLogprob,
    build_generation_request,
    build_sampling_params,
)
from server.errors import InvalidArgument

#: Request fields this server does not implement yet: a request that sets one gets 400 naming it.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "guided_grammar", "guided_whitespace_pattern",
               "best_of", "suffix", "logit_bias", "parallel_tool_calls", "audio", "modalities",
               "prediction")
#: Accepted only at their neutral value.
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, kind: str):
    """``body[name]`` checked to be of ``kind`` (``int`` / ``number`` / ``bool`` / ``str``); None when absent or
    null."""
    v = body.get(name)
    if v is None:
        return None
    ok = {"int": isinstance(v, int) and not isinstance(v, bool), "number": _is_number(v),
          "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]
    if not ok or (kind == "number" and not math.isfinite(v)):
        raise InvalidArgument(f"must be {'a' if kind != 'int' else 'an'} {kind}, got {v!r}", field=name)
    return v


def _check_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise InvalidArgument("is not supported by this server yet", field=name)
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and body.get(name) != neutral:
            raise InvalidArgument(f"only {neutral} is supported by this server yet", field=name)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidArgument("must be a string or a list of strings", field="stop")


def _messages(body: dict) -> tuple[ChatMessage, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("must be a non-empty list of {role, content} objects", field="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument("must be an object with a string role", field=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgument("only text content parts are supported", field=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidArgument("must be a string or a list of text parts", field=f"messages[{i}].content")
        out.append(ChatMessage(role=m["role"], content=content))
    return tuple(out)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("must be a non-empty string (one prompt per request)", field="prompt")
    return prompt


def _logprob_fields(body: dict, chat: bool) -> dict:
    """The engine's ``logprobs`` / ``top_logprobs`` from OpenAI's: chat takes ``logprobs`` (bool) and
    ``top_logprobs`` (0..20, needs ``logprobs``); completions take ``logprobs`` (an int k: the chosen token's
    log-probability and the k most likely). Raises :class:`InvalidArgument` naming the parameter."""
    if chat:
        wanted = bool(_get(body, "logprobs", "bool"))
        k = _get(body, "top_logprobs", "int")
        if k is not None and not wanted:
            raise InvalidArgument("needs logprobs: true", field="top_logprobs")
        k = 0 if k is None else k
        name = "top_logprobs"
    else:
        if body.get("top_logprobs") is not None:
            raise InvalidArgument("is a chat parameter; completions take logprobs: k", field="top_logprobs")
        k = _get(body, "logprobs", "int")
        wanted, k, name = k is not None, 0 if k is None else k, "logprobs"
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"must be 0..{MAX_TOP_LOGPROBS}, got {k}", field=name)
    return {"logprobs": wanted, "top_logprobs": k} if wanted else {}


#: vLLM's extra structured-output parameters this server takes, and the kind each maps to.
GUIDED_PARAMS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice"}


def _response_format(body: dict) -> ResponseFormat | None:
    """The engine's structured-output constraint from OpenAI's ``response_format`` — ``{"type": "text"}`` (none),
    ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` — or
    from vLLM's extra parameters ``guided_json`` (a JSON Schema, object or text), ``guided_regex`` (a regex) and
    ``guided_choice`` (a list of strings). At most one may be set. Raises :class:`InvalidArgument` naming the
    parameter the client set (``response_format...`` or ``guided_...``)."""
    found: list[tuple[str, ResponseFormat]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidArgument("must be an object with type text, json_object or json_schema",
                                  field="response_format")
        if fmt["type"] == "json_object":
            found.append(("response_format", ResponseFormat("json_object")))
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
                raise InvalidArgument("needs json_schema.schema, a JSON Schema object",
                                      field="response_format.json_schema.schema")
            found.append(("response_format", ResponseFormat("json_schema", json.dumps(spec["schema"]))))
    schema = body.get("guided_json")
    if schema is not None:
        if not isinstance(schema, (dict, bool, str)):
            raise InvalidArgument("must be a JSON Schema (an object, or its JSON text)", field="guided_json")
        found.append(("guided_json", ResponseFormat("json_schema", schema if isinstance(schema, str)
                                                    else json.dumps(schema))))
    regex = _get(body, "guided_regex", "str")
    if regex is not None:
        found.append(("guided_regex", ResponseFormat("regex", regex)))
    choice = body.get("guided_choice")
    if choice is not None:
        if not isinstance(choice, list) or not all(isinstance(c, str) for c in choice):
            raise InvalidArgument("must be a list of strings", field="guided_choice")
        found.append(("guided_choice", ResponseFormat("choice", choices=tuple(choice))))
    if len(found) > 1:
        raise InvalidArgument(f"set at most one of response_format, {', '.join(GUIDED_PARAMS)}",
                              field=found[1][0])
    if not found:
        return None
    param, rf = found[0]
    try:
        rf.validate()
    except InvalidArgument as exc:
        raise renamed(exc, body) from None
    return rf


def renamed(exc: InvalidArgument, body: dict) -> InvalidArgument:
    """``exc`` with its field named as the client set it: an error about ``response_format.<kind>`` (from
    validation, from compiling the grammar at submit, or from decoding) names ``guided_regex`` / ``guided_choice``
    / ``guided_json`` when that is what the body used; other errors are returned as they are."""
    field = getattr(exc, "field", None) or ""
    if not field.startswith("response_format"):
        return exc
    for param in GUIDED_PARAMS:
        if body.get(param) is not None:
            return InvalidArgument(str(exc).partition(": ")[2] or str(exc), field=param)
    return exc


def is_stream(body: dict) -> bool:
    return bool(_get(body, "stream", "bool"))


@dataclass(frozen=True)
class Echo:
    """A completions request with ``echo: true``: its choice's ``text`` is the prompt then the completion, and with
    ``logprobs: k`` the legacy logprobs cover the prompt's tokens first (the first one ``null``, as OpenAI's).

    Attributes:
        prompt: the prompt text, put before the completion.
        score_only: ``max_tokens: 0`` (scoring a prompt): the engine, which generates at least one token,
            generates one; it is dropped (no text, no log-probability, ``completion_tokens`` 0, ``finish_reason``
            ``length``).
    """

    prompt: str
    score_only: bool = False


def echo_of(body: dict, *, chat: bool) -> Echo | None:
    """The :class:`Echo` of a completions body with ``echo: true``, else None. Raises :class:`InvalidArgument`:
    ``echo`` not a boolean, or set on a chat completion (chat has no echo); ``prompt`` as :func:`generation_request`
    does."""
    if not _get(body, "echo", "bool"):
        return None
    if chat:
        raise InvalidArgument("is a completions parameter; chat completions have no echo", field="echo")
    return Echo(_prompt(body), score_only=_get(body, "max_tokens", "int") == 0)


def generation_request(body: dict, *, chat: bool, adapter_id: str, max_new_tokens_limit: int,
                       **stop_limits) -> GenerationRequest:
    """The engine request of a ``/v1/completions`` (``chat`` False) or ``/v1/chat/completions`` body; ``model``
    is already resolved to ``adapter_id`` ("" = base). Completions with ``echo: true`` and ``logprobs: k`` also
    ask the engine for the prompt's log-probabilities (``prompt_logprobs = k``); with ``max_tokens: 0`` too (see
    :class:`Echo`) the engine generates one token that the response drops. Raises :class:`InvalidArgument` naming
    the OpenAI parameter (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs``,
    ``top_logprobs``, ``echo``, ``response_format``, ``guided_regex``, ``guided_choice``, ``prompt``, ``messages``,
    or an unsupported one)."""
    _check_unsupported(body)
    is_stream(body)
    echo = echo_of(body, chat=chat)
    fields: dict = {"stop": _stop(body), **_logprob_fields(body, chat), "response_format": _response_format(body)}
    max_tokens = _get(body, "max_tokens", "int")
    newer = _get(body, "max_completion_tokens", "int")  # OpenAI's newer name for the same limit
    if newer is not None:
        if max_tokens is not None and max_tokens != newer:
            raise InvalidArgument(f"contradicts max_tokens ({max_tokens}); set one of them",
                                  field="max_completion_tokens")
        max_tokens = newer
    if echo is not None and "top_logprobs" in fields:
        fields["prompt_logprobs"] = fields["top_logprobs"]
    if max_tokens == 0 and echo is None:
        raise InvalidArgument("must be >= 1" if chat else "must be >= 1 (0 only with echo: true, to score the prompt)",
                              field="max_tokens")
    if echo is not None and echo.score_only:
        max_tokens = 1  # the engine generates >= 1 token: one, which the response drops
        fields.pop("logprobs", None)
        fields.pop("top_logprobs", None)
    for name, kind, value in (("temperature", "number", None), ("top_p", "number", None), ("seed", "int", None)):
        value = _get(body, name, kind)
        if value is not None:
            fields[name] = float(value) if kind == "number" else value
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    try:
        params = build_sampling_params(fields, max_new_tokens_limit, **stop_limits)
    except InvalidArgument as exc:
        if exc.field == "max_new_tokens":  # name the OpenAI parameter
            raise InvalidArgument(str(exc).partition(": ")[2], field="max_tokens") from None
        raise
    return build_generation_request(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", adapter_id=adapter_id,
        prompt=None if chat else _prompt(body), messages=_messages(body) if chat else (), params=params)


def finish_reason(reason: str | None) -> str | None:
    """Engine finish reason → OpenAI's: ``length`` stays, ``stop`` and ``eos`` are ``stop``."""
    if reason is None:
        return None
    return "length" if reason == FINISH_LENGTH else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(entries: tuple[TokenLogprob, ...], *, chat: bool, asked: bool, text_offset: int = 0) -> dict | None:
    """OpenAI's ``logprobs`` of a choice for ``entries`` (one per generated token; None when not asked).

    Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
    Completions (the legacy shape): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
    "text_offset"}``, offsets counted from ``text_offset`` (characters of this choice's text already sent)."""
    if not asked:
        return None
    if chat:
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(_bytes(e)),
                             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(_bytes(t))}
                                              for t in e.top_logprobs]} for e in entries]}
    return _legacy([(_key(e), _bytes(e), e.logprob, {_key(t): t.logprob for t in e.top_logprobs})
                    for e in entries], text_offset)


def _bytes(entry) -> bytes:
    """A log-probability entry's exact token bytes (its text's UTF-8 when the engine did not give them)."""
    return entry.token_bytes or entry.token.encode("utf-8")


def _key(entry) -> str:
    """How the legacy completions shape names a token: its text, or, for a token whose bytes are no complete UTF-8
    text (part of a character, reading U+FFFD alone), ``bytes:\\xNN...`` as OpenAI writes them, so the
    ``top_logprobs`` keys of different partial tokens do not collide."""
    raw = _bytes(entry)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return entry.token


def _legacy(items: list[tuple[str, bytes, float | None, dict | None]], text_offset: int) -> dict:
    """The legacy completions ``logprobs`` of ``(token, token_bytes, logprob, top)`` items.

    ``text_offset`` of each token is the character offset, from ``text_offset``, where the token starts in the text
    its bytes decode to: the bytes go through one incremental UTF-8 decoder, so a token that starts inside a
    multi-byte character (a byte-level token) points at that character, and a character split over tokens counts
    once."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, at = [], text_offset
    for _, raw, _, _ in items:
        offsets.append(at)
        at += len(decoder.decode(raw))
    return {"tokens": [t for t, _, _, _ in items], "token_logprobs": [lp for _, _, lp, _ in items],
            "top_logprobs": [top for _, _, _, top in items], "text_offset": offsets}


def prompt_logprobs_body(prompt: str, entries: tuple[TokenLogprob, ...]) -> dict:
    """The legacy completions ``logprobs`` of an echoed prompt (offsets from 0): its first token with ``null``
    log-probability and top_logprobs (OpenAI's shape: nothing precedes it), then ``entries``, the engine's prompt
    log-probabilities of tokens 1 … n-1.

    The engine does not name the first token, so it is the part of ``prompt``'s bytes before the other tokens'
    bytes: where the tokens' bytes concatenate to the prompt, every offset indexes the choice's ``text`` (see
    :func:`_legacy`) and a BOS token reads ``""``; where they do not (a SentencePiece tokenizer's added leading
    space, say), it is ``""`` and the offsets follow the tokens' own bytes."""
    rest = b"".join(_bytes(e) for e in entries)
    raw = prompt.encode("utf-8")
    first = raw[:len(raw) - len(rest)] if raw.endswith(rest) else b""
    head = TopLogprob(0, first.decode("utf-8", errors="replace"), 0.0, first)
    return _legacy([(_key(head), first, None, None)]
                   + [(_key(e), _bytes(e), e.logprob, {_key(t): t.logprob for t in e.top_logprobs})
                      for e in entries], 0)


def join_logprobs(head: dict | None, tail: dict | None) -> dict | None:
    """Two legacy completions ``logprobs`` objects (prompt part, then completion part) as one; None when both are."""
    if head is None or tail is None:
        return head or tail
    return {key: head[key] + tail[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def completion_body(*, chat: bool, request_id: str, model: str, text: str, reason: str | None,
                    prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None) -> dict:
    """A whole ``text_completion`` / ``chat.completion`` object (``logprobs``: :func:`logprobs_body`)."""
    choice: dict = {"index": 0, "finish_reason": finish_reason(reason), "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(*, chat: bool, request_id: str, model: str, text: str, reason: str | None = None,
               first: bool = False, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``; ``logprobs``: :func:`logprobs_body`
    of this chunk's tokens)."""
    choice: dict = {"index": 0, "finish_reason": finish_reason(reason), "logprobs": logprobs}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if usage_ is not None:
        body["usage"] = usage_
    return body
