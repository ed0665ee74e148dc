"""Pure conversions between the protobuf messages of qlora_server.v1 and the server's plain Python types."""

from __future__ import annotations

import math
import struct

from server.adapters.types import AdapterInfo
from server.engine.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    ChatMessage,
    GenerationEvent,
    GenerationRequest,
    MAX_REQUEST_ID_LENGTH,  # noqa: F401 (re-exported)
    GenerationResult,
    ResponseFormat,
    SamplingParams,
    Timings,
    TokenLogprob,
    TopLogprob,
    build_generation_request,
    build_sampling_params,
)
from server.errors import InvalidArgument
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb

#: The only file names an ``UploadAdapter`` chunk may carry (a PEFT LoRA adapter directory).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_FINISH_TO_PROTO = {
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_EOS: pb.FINISH_REASON_EOS,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}
_RESIDENCY_TO_PROTO = {"disk": pb.RESIDENCY_DISK, "cpu": pb.RESIDENCY_CPU, "gpu": pb.RESIDENCY_GPU}
_RESIDENCY_FROM_PROTO = {v: k for k, v in _RESIDENCY_TO_PROTO.items()}


# --- Generation: server side ---------------------------------------------------------------------------------------


def sampling_params_from_proto(msg: pb.GenerateRequest, max_new_tokens_limit: int, **stop_limits) -> SamplingParams:
    """Read the sampling fields of ``msg``; unset optional fields take :class:`SamplingParams` defaults
    (max_new_tokens 256 or ``max_new_tokens_limit`` when lower, top_p 1.0, repetition_penalty 1.0, seed None,
    prompt_logprobs None).

    ``max_new_tokens_limit`` is the server's cap (tokens). Raises :class:`InvalidArgument` naming the first bad
    field (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``,
    ``top_logprobs``, ``prompt_logprobs``, ``stop``).
    ``stop_limits`` (``max_stop_strings``, ``max_stop_chars``) go to :meth:`SamplingParams.validate`.
    """
    fields: dict = {"temperature": msg.temperature, "top_k": msg.top_k, "stop": tuple(msg.stop),
                    "ignore_eos": msg.ignore_eos, "logprobs": msg.logprobs, "top_logprobs": msg.top_logprobs}
    for name in ("max_new_tokens", "top_p", "repetition_penalty", "seed", "prompt_logprobs"):
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    if msg.HasField("response_format"):
        fields["response_format"] = response_format_from_proto(msg.response_format)
    return build_sampling_params(fields, max_new_tokens_limit, **stop_limits)


def response_format_from_proto(msg: pb.ResponseFormat) -> ResponseFormat:
    """``ResponseFormat`` → the plain one (shape checked later by :meth:`ResponseFormat.validate`). Raises
    :class:`InvalidArgument`: ``response_format`` when no format is set, ``response_format.json_object`` when it
    is false."""
    kind = msg.WhichOneof("format")
    if kind is None:
        raise InvalidArgument("set one of json_schema, json_object, regex, choice", field="response_format")
    if kind == "json_object":
        if not msg.json_object:
            raise InvalidArgument("must be true when set", field="response_format.json_object")
        return ResponseFormat("json_object")
    if kind == "choice":
        return ResponseFormat("choice", choices=tuple(msg.choice.values))
    return ResponseFormat(kind, getattr(msg, kind))


def response_format_to_proto(fmt: ResponseFormat) -> pb.ResponseFormat:
    """The plain response format → ``ResponseFormat`` (the inverse of :func:`response_format_from_proto`)."""
    if fmt.kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if fmt.kind == "choice":
        return pb.ResponseFormat(choice=pb.Choices(values=list(fmt.choices)))
    if fmt.kind in ("json_schema", "regex"):
        return pb.ResponseFormat(**{fmt.kind: fmt.value})
    raise InvalidArgument(f"unknown response format {fmt.kind!r}", field="response_format")


def chat_messages_from_proto(messages) -> tuple[ChatMessage, ...]:
    """Convert repeated ``ChatMessage`` (roles are checked by :func:`build_generation_request`)."""
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages)


def generation_request_from_proto(msg: pb.GenerateRequest, *, default_request_id: str, max_new_tokens_limit: int,
                                  deadline: float | None = None, **stop_limits) -> GenerationRequest:
    """Build the engine's :class:`GenerationRequest` from ``msg``.

    Args:
        default_request_id: used when ``msg.request_id`` is empty.
        max_new_tokens_limit: the server's cap on ``max_new_tokens`` (tokens).
        deadline: ``time.monotonic()`` instant after which the engine abandons the request; None = none.
        stop_limits: ``max_stop_strings`` / ``max_stop_chars`` (the server's ``EngineConfig`` values).

    Raises:
        InvalidArgument: naming the proto field: ``prompt`` when both or neither of ``prompt`` and ``messages``
            are set, ``messages[i].role``, ``request_id`` (too long), or a sampling field.
    """
    return build_generation_request(
        request_id=msg.request_id or default_request_id, adapter_id=msg.adapter_id, prompt=msg.prompt or None,
        messages=chat_messages_from_proto(msg.messages),
        params=sampling_params_from_proto(msg, max_new_tokens_limit, **stop_limits), deadline=deadline)


def finish_reason_to_proto(reason: str | None) -> int:
    """``"length"`` / ``"stop"`` / ``"eos"`` → ``FinishReason`` value; None → UNSPECIFIED. Raises ValueError for
    any other string."""
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    try:
        return _FINISH_TO_PROTO[reason]
    except KeyError:
        raise ValueError(f"unknown finish reason {reason!r}") from None


def timings_to_proto(t: Timings) -> pb.Timings:
    """Copy timings (seconds)."""
    return pb.Timings(queue_seconds=t.queue_seconds, ttft_seconds=t.ttft_seconds, total_seconds=t.total_seconds,
                      tpot_seconds=t.tpot_seconds)


def token_logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    """One generated (or scored prompt) token's log-probabilities → ``TokenLogprob`` (values become float32 on the
    wire)."""
    return pb.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob, token_bytes=lp.token_bytes,
                           top_logprobs=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob,
                                                       token_bytes=t.token_bytes)
                                         for t in lp.top_logprobs])


def token_logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    """``TokenLogprob`` → :class:`TokenLogprob`."""
    return TokenLogprob(msg.token_id, msg.token, msg.logprob,
                        tuple(TopLogprob(t.token_id, t.token, t.logprob, t.token_bytes) for t in msg.top_logprobs),
                        msg.token_bytes)


def generate_response_to_proto(result: GenerationResult) -> pb.GenerateResponse:
    """A finished request's whole answer → ``GenerateResponse``."""
    return pb.GenerateResponse(
        request_id=result.request_id, text=result.text, finish_reason=finish_reason_to_proto(result.finish_reason),
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
        timings=timings_to_proto(result.timings),
        logprobs=[token_logprob_to_proto(lp) for lp in result.logprobs],
        prompt_logprobs=[token_logprob_to_proto(lp) for lp in result.prompt_logprobs])


def stream_event_to_proto(event: GenerationEvent) -> pb.GenerateStreamResponse:
    """One engine event → ``GenerateStreamResponse``; token counts and timings only on the finished event. The caller
    handles ``event.error`` (it is not representable here)."""
    msg = pb.GenerateStreamResponse(request_id=event.request_id, text=event.text,
                                    logprobs=[token_logprob_to_proto(lp) for lp in event.logprobs],
                                    prompt_logprobs=[token_logprob_to_proto(lp) for lp in event.prompt_logprobs])
    if event.finished:
        msg.finish_reason = finish_reason_to_proto(event.finish_reason)
        msg.prompt_tokens = event.prompt_tokens
        msg.completion_tokens = event.completion_tokens
        if event.timings is not None:
            msg.timings.CopyFrom(timings_to_proto(event.timings))
    return msg


# --- Generation: client side ---------------------------------------------------------------------------------------


def generate_request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    """Plain request → ``GenerateRequest``. Optional sampling fields equal to their :class:`SamplingParams`
    default are left unset, so the server applies its own default (the same value, except that an unset
    ``max_new_tokens`` is capped by the server's limit). ``deadline`` is not carried: use the RPC timeout.

    Raises:
        InvalidArgument: a sampling value the wire type cannot hold (e.g. ``max_new_tokens`` > 2**31 - 1, a
            negative ``seed``); ``field`` names it.
    """
    p = req.params
    msg = pb.GenerateRequest(
        request_id=req.request_id, adapter_id=req.adapter_id, prompt=req.prompt or "",
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in req.messages], stop=list(p.stop),
        ignore_eos=bool(p.ignore_eos), logprobs=bool(p.logprobs))
    _set_field(msg, "temperature", p.temperature)
    _set_field(msg, "top_k", p.top_k)
    _set_field(msg, "top_logprobs", p.top_logprobs)
    if p.response_format is not None:
        msg.response_format.CopyFrom(response_format_to_proto(p.response_format))
    if p.prompt_logprobs is not None:  # unset = none; 0 is a real value (the prompt tokens' own log-probability)
        _set_field(msg, "prompt_logprobs", p.prompt_logprobs)
    defaults = SamplingParams()
    for name in ("max_new_tokens", "top_p", "repetition_penalty", "seed"):
        value = getattr(p, name)
        if value is not None and value != getattr(defaults, name):
            _set_field(msg, name, value)
    return msg


def _set_field(msg, name: str, value) -> None:
    """``setattr(msg, name, value)``; a value the wire type cannot hold (an int32 past 2**31 - 1, a negative
    uint64, a string for a number) raises :class:`InvalidArgument` naming ``name``."""
    try:
        setattr(msg, name, value)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{value!r} does not fit the wire type ({exc})", field=name) from None


def finish_reason_from_proto(value: int) -> str | None:
    """``FinishReason`` value → ``"length"`` / ``"stop"`` / ``"eos"``; UNSPECIFIED (or unknown) → None."""
    return _FINISH_FROM_PROTO.get(value)


def timings_from_proto(msg: pb.Timings) -> Timings:
    """Copy timings (seconds)."""
    return Timings(queue_seconds=msg.queue_seconds, ttft_seconds=msg.ttft_seconds, total_seconds=msg.total_seconds,
                   tpot_seconds=msg.tpot_seconds)


def generation_result_from_proto(msg: pb.GenerateResponse) -> GenerationResult:
    """``GenerateResponse`` → :class:`GenerationResult` (``token_ids`` is empty: the wire does not carry them)."""
    return GenerationResult(
        request_id=msg.request_id, text=msg.text, token_ids=(),
        finish_reason=finish_reason_from_proto(msg.finish_reason) or "",
        prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens,
        timings=timings_from_proto(msg.timings), logprobs=tuple(token_logprob_from_proto(m) for m in msg.logprobs),
        prompt_logprobs=tuple(token_logprob_from_proto(m) for m in msg.prompt_logprobs))


def stream_event_from_proto(msg: pb.GenerateStreamResponse) -> GenerationEvent:
    """``GenerateStreamResponse`` → :class:`GenerationEvent`; ``finished`` is set on the message that carries a
    finish reason."""
    reason = finish_reason_from_proto(msg.finish_reason)
    logprobs = tuple(token_logprob_from_proto(m) for m in msg.logprobs)
    prompt_logprobs = tuple(token_logprob_from_proto(m) for m in msg.prompt_logprobs)
    if reason is None:
        return GenerationEvent(request_id=msg.request_id, text=msg.text, logprobs=logprobs,
                               prompt_logprobs=prompt_logprobs)
    return GenerationEvent(
        request_id=msg.request_id, text=msg.text, finished=True, finish_reason=reason, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens,
        timings=timings_from_proto(msg.timings) if msg.HasField("timings") else None)


# --- Adapters ------------------------------------------------------------------------------------------------------


def residency_to_proto(residency: str) -> int:
    """``"disk"`` / ``"cpu"`` / ``"gpu"`` → ``Residency`` value; anything else → UNSPECIFIED."""
    return _RESIDENCY_TO_PROTO.get(residency, pb.RESIDENCY_UNSPECIFIED)


def residency_from_proto(value: int) -> str:
    """``Residency`` value → ``"disk"`` / ``"cpu"`` / ``"gpu"``, or ``"unknown"``."""
    return _RESIDENCY_FROM_PROTO.get(value, "unknown")


def adapter_to_proto(info: AdapterInfo, residency: str) -> pb.Adapter:
    """:class:`AdapterInfo` plus its cache residency → ``Adapter`` (sizes in bytes, time in UNIX seconds; the
    store-internal ``path`` is not exposed)."""
    return pb.Adapter(
        adapter_id=info.adapter_id, base_model=info.base_model, rank=info.rank, lora_alpha=info.lora_alpha,
        rank_pattern=dict(info.ranks), alpha_pattern=dict(info.alphas), target_modules=list(info.target_modules),
        module_count=info.module_count, use_rslora=info.use_rslora, size_bytes=info.size_bytes, sha256=info.sha256,
        residency=residency_to_proto(residency), registered_at=info.registered_at, version=info.version)


def adapter_from_proto(msg: pb.Adapter) -> tuple[AdapterInfo, str]:
    """``Adapter`` → (:class:`AdapterInfo` with an empty ``path``, residency string). Float fields come back at
    the wire's float32 precision."""
    info = AdapterInfo(
        adapter_id=msg.adapter_id, base_model=msg.base_model, rank=msg.rank, lora_alpha=_f32(msg.lora_alpha),
        target_modules=tuple(msg.target_modules), module_count=msg.module_count, use_rslora=msg.use_rslora,
        size_bytes=msg.size_bytes, sha256=msg.sha256, path="", registered_at=msg.registered_at,
        ranks=dict(msg.rank_pattern), alphas={k: _f32(v) for k, v in msg.alpha_pattern.items()},
        version=msg.version)
    return info, residency_from_proto(msg.residency)


def _f32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``x`` (a float32 read from the wire): 16.0 stays
    16.0 and 0.1 comes back as 0.1 rather than 0.10000000149011612."""
    if not math.isfinite(x):
        return x
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == x:
            return candidate
    return x
