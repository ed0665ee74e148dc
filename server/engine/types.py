"""Plain request / event types the engine accepts and emits (the RPC layer converts protobuf to and from these)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from server.errors import InvalidArgument, ServerError

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_EOS = "eos"
#: Largest accepted ``seed`` (the proto field is a uint64; the sampler's counter-based draws use all 64 bits).
SEED_MAX = 2**64 - 1
#: Largest accepted ``top_logprobs`` / ``prompt_logprobs`` (alternatives reported per token).
MAX_TOP_LOGPROBS = 20
#: Longest accepted response format text: a JSON Schema or regex, or all choices together (characters).
MAX_RESPONSE_FORMAT_CHARS = 100_000
#: Most choices in a ``choice`` response format.
MAX_CHOICES = 1024
#: The kinds of :class:`ResponseFormat`.
RESPONSE_FORMAT_KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on a request's whole output (structured output), enforced token by token while decoding
    (:mod:`server.engine.grammar`).

    Attributes:
        kind: ``json_schema`` (the output is one JSON value valid against the JSON Schema ``value``),
            ``json_object`` (any JSON object), ``regex`` (the whole output matches the regular expression
            ``value``, Rust ``regex`` syntax) or ``choice`` (the output is exactly one of ``choices``).
        value: the schema (JSON text) or the pattern; empty for the other kinds.
        choices: the allowed outputs of ``choice``.

    Generation ends with finish reason ``stop`` as soon as the output is complete and nothing can follow it; it
    can still end earlier with ``length`` (``max_new_tokens``), so a truncated output may be invalid.
    """

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check the shape (not yet the grammar: the engine compiles it at submit). Raises
        :class:`InvalidArgument` naming ``response_format`` or ``response_format.<kind>``."""
        if self.kind not in RESPONSE_FORMAT_KINDS:
            raise InvalidArgument(f"must be one of {', '.join(RESPONSE_FORMAT_KINDS)}, got {self.kind!r}",
                                  field="response_format")
        field_name = f"response_format.{self.kind}"
        size = len(self.value) + sum(len(c) for c in self.choices)
        if size > MAX_RESPONSE_FORMAT_CHARS:
            raise InvalidArgument(f"at most {MAX_RESPONSE_FORMAT_CHARS} characters, got {size}", field=field_name)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                raise InvalidArgument(f"is not valid JSON: {exc}", field=field_name) from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgument("must be a JSON Schema: a JSON object (or true / false)", field=field_name)
        elif self.kind == "regex" and not self.value:
            raise InvalidArgument("must be a non-empty regular expression", field=field_name)
        elif self.kind == "choice":
            if not self.choices:
                raise InvalidArgument("needs at least one choice", field=field_name)
            if len(self.choices) > MAX_CHOICES:
                raise InvalidArgument(f"at most {MAX_CHOICES} choices, got {len(self.choices)}", field=field_name)
            if any(not c for c in self.choices):
                raise InvalidArgument("choices must be non-empty strings", field=field_name)
        if self.kind != "choice" and self.choices:
            raise InvalidArgument("choices only go with kind 'choice'", field=field_name)
        if self.kind in ("json_object", "choice") and self.value:
            raise InvalidArgument("takes no value", field=field_name)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    Attributes:
        max_new_tokens: most tokens to generate (tokens, >= 1).
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling. Any finite value
            >= 0 is accepted: one so small that logits / T would overflow acts as greedy, a huge one tends to
            uniform (see ``server.model.sampling``).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it (any value in the range, subnormals included,
            keeps at least the most likely token).
        top_k: keep the k most likely tokens; 0 disables it; values above the vocabulary keep all.
        repetition_penalty: CTRL-style penalty (Keskar et al., 2019) on tokens already in prompt or output;
            1 disables it; any finite value > 0 is accepted (scores are clamped to float64's finite range).
        seed: seeds this request's own counter-based draws (``server.model.sampling.request_seed``), so a
            sampled answer is reproducible whatever else shares the batch; None draws a fresh seed; must be in
            0 .. 2**64 - 1 (the proto's uint64).
        stop: strings that end generation when they appear in the output (they are not returned); non-empty, without
            U+FFFD (the placeholder of undecodable bytes).
        ignore_eos: generate until ``max_new_tokens`` (or a stop string / the context limit) even when the model
            emits EOS, which then is an ordinary output token; for benchmarks that need fixed-length outputs.
        logprobs: return each generated token's log-probability (see ``server.model.sampling``: the
            log-softmax of the penalized, temperature-scaled scores, before top-k / top-p truncation).
        top_logprobs: also return the k most likely tokens of that distribution per generated token
            (0 .. :data:`MAX_TOP_LOGPROBS`); k > 0 implies ``logprobs``.
        response_format: constrain the output to a JSON Schema / JSON object / regex / choice
            (:class:`ResponseFormat`); None = free text. Masked tokens have probability 0: log-probabilities are
            then those of the constrained distribution, and ``top_logprobs`` lists only allowed tokens.
        prompt_logprobs: None = do not score the prompt; k (0 .. :data:`MAX_TOP_LOGPROBS`) = return, for every
            prompt token after the first, its log-probability given the tokens before it and the k most likely
            tokens there. That distribution is the model's own (with the request's adapter): the float32
            log-softmax of the raw logits, no temperature, no penalty (``server.model.sampling.
            prompt_logprob_scores``). A prompt of n tokens gets n - 1 entries (the first token, the BOS token where
            the tokenizer adds one, has nothing before it).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None
    prompt_logprobs: int | None = None

    @property
    def wants_logprobs(self) -> bool:
        """Whether this request's tokens carry log-probabilities (``logprobs`` or ``top_logprobs > 0``)."""
        return bool(self.logprobs) or self.top_logprobs > 0

    def validate(self, max_new_tokens_limit: int, max_stop_strings: int = 16, max_stop_chars: int = 256) -> None:
        """Raise :class:`InvalidArgument` naming the first bad field (the stop limits are
        ``EngineConfig.max_stop_strings`` / ``max_stop_chars``)."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(f"must be in 1..{max_new_tokens_limit}, got {self.max_new_tokens}",
                                  field="max_new_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidArgument(f"must be a finite number >= 0, got {self.temperature}", field="temperature")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(f"must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise InvalidArgument(f"must be >= 0, got {self.top_k}", field="top_k")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidArgument(f"must be a finite number > 0, got {self.repetition_penalty}",
                                  field="repetition_penalty")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise InvalidArgument(f"must be in 0..{SEED_MAX}, got {self.seed}", field="seed")
        if not (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidArgument(f"must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}", field="top_logprobs")
        k = self.prompt_logprobs
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidArgument(f"must be unset or in 0..{MAX_TOP_LOGPROBS}, got {k!r}", field="prompt_logprobs")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty", field="stop")
        if any("\ufffd" in s for s in self.stop):
            # In generated text U+FFFD is a decoder's placeholder for bytes that are not (yet) a complete UTF-8
            # character: it can show while a character is incomplete and vanish when its last byte comes, so a
            # match on it would be decided on text that is not final.
            raise InvalidArgument("stop strings must not contain U+FFFD (the replacement character)", field="stop")
        if len(self.stop) > max_stop_strings:
            raise InvalidArgument(f"at most {max_stop_strings} stop strings (--max-stop-strings), got "
                                  f"{len(self.stop)}", field="stop")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > max_stop_chars:
            raise InvalidArgument(f"stop strings are at most {max_stop_chars} characters (--max-stop-chars), got "
                                  f"{longest}", field="stop")
        if self.response_format is not None:
            self.response_format.validate()


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn, rendered with the model's chat template."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A generation request in plain Python types.

    Exactly one of ``prompt`` (raw text, tokenized as is) and ``messages`` (rendered with the tokenizer's chat
    template, generation prompt appended) is set. ``adapter_id`` empty = base model. ``deadline`` is a
    ``time.monotonic()`` instant after which the engine abandons the request (None = no deadline).
    """

    request_id: str
    adapter_id: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None


@dataclass(frozen=True)
class Timings:
    """Per-request timings in seconds: queue wait (arrival → prefill starts), time to first token (arrival →
    first token), total (arrival → finish) and mean time per output token after the first (TPOT)."""

    queue_seconds: float
    ttft_seconds: float
    total_seconds: float
    tpot_seconds: float


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position: id, its text (``decode([id])``), log-probability and exact
    bytes (``token_bytes``: UTF-8 text, or part of a character's bytes where ``token`` reads U+FFFD; empty when
    unknown)."""

    token_id: int
    token: str
    logprob: float
    token_bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated (or scored prompt) token's log-probability and (when ``top_logprobs`` / ``prompt_logprobs``
    > 0) the k most likely tokens there, most likely first (ties: the lower id first). Log-probabilities are
    float32 values (natural log). ``token_bytes`` are the token's exact bytes (see :class:`TopLogprob`)."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()
    token_bytes: bytes = b""


@dataclass(frozen=True)
class GenerationEvent:
    """One streamed piece of a request's output.

    ``text`` is the new text since the previous event (stop strings removed); the last event has ``finished``
    set with ``finish_reason`` (``length`` / ``stop`` / ``eos``), token counts and timings, or ``error`` set
    when the request failed (deadline, cancellation, adapter unregistered, internal error). ``logprobs`` has one
    entry per token of ``token_ids`` when the request asked for log-probabilities (else it is empty).
    ``prompt_logprobs`` is set on the request's first event only, when it asked for them (``SamplingParams.
    prompt_logprobs``): one entry per prompt token after the first (an event of its own, with no text, put as
    soon as the prompt's prefill ends; empty for a one-token prompt).
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


class EndedEarly(ServerError):
    """A request's events ended without a final event (INTERNAL; the RPC layer checks whether the client left)."""


#: Timings of a final event that carries none (a test double's).
ZERO_TIMINGS = Timings(queue_seconds=0.0, ttft_seconds=0.0, total_seconds=0.0, tpot_seconds=0.0)


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer of a finished request (what ``Engine.generate`` returns). ``logprobs``: one entry per
    generated token when asked; ``prompt_logprobs``: one per prompt token after the first when asked."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def from_events(cls, events, request_id: str) -> "GenerationResult":
        """The whole answer of a request from its :class:`GenerationEvent` s (texts joined, token ids and
        log-probabilities — generated and prompt ones — concatenated, counts and timings from the final event; one
        without a finish reason or timings gives ``""`` and :data:`ZERO_TIMINGS`). The engine, the gRPC and the
        HTTP layers all collect an answer through here.

        Raises:
            the error an event carries; :class:`EndedEarly` when the events end without a final one.
        """
        text, ids, logprobs, prompt_logprobs = [], [], [], []
        for event in events:
            if event.error is not None:
                raise event.error
            text.append(event.text)
            ids.extend(event.token_ids)
            logprobs.extend(event.logprobs)
            prompt_logprobs.extend(event.prompt_logprobs)
            if event.finished:
                return cls(request_id, "".join(text), tuple(ids), event.finish_reason or "", event.prompt_tokens,
                           event.completion_tokens, event.timings or ZERO_TIMINGS, tuple(logprobs),
                           tuple(prompt_logprobs))
        raise EndedEarly("the engine ended the request without a final event")


#: Longest accepted client-chosen request id (characters).
MAX_REQUEST_ID_LENGTH = 256


def build_sampling_params(fields: dict, max_new_tokens_limit: int, **stop_limits) -> SamplingParams:
    """:class:`SamplingParams` from the ``fields`` a client set (absent = the default; an absent
    ``max_new_tokens`` is 256 or ``max_new_tokens_limit`` when lower), validated: raises :class:`InvalidArgument`
    naming the first bad field. ``stop_limits`` go to :meth:`SamplingParams.validate`. Shared by the gRPC and
    HTTP layers."""
    kwargs = {"max_new_tokens": min(SamplingParams.max_new_tokens, max_new_tokens_limit), **fields}
    params = SamplingParams(**kwargs)
    params.validate(max_new_tokens_limit, **stop_limits)
    return params


def build_generation_request(*, request_id: str, adapter_id: str, prompt: str | None,
                             messages: tuple[ChatMessage, ...], params: SamplingParams,
                             deadline: float | None = None) -> GenerationRequest:
    """A validated :class:`GenerationRequest`. Raises :class:`InvalidArgument`: ``prompt`` when both or neither
    of ``prompt`` and ``messages`` are set, ``messages[i].role`` for an empty role, ``request_id`` when too
    long."""
    has_prompt, has_messages = bool(prompt), len(messages) > 0
    if has_prompt and has_messages:
        raise InvalidArgument("set exactly one of prompt and messages, not both", field="prompt")
    if not has_prompt and not has_messages:
        raise InvalidArgument("one of prompt and messages is required", field="prompt")
    for i, m in enumerate(messages):
        if not m.role.strip():
            raise InvalidArgument("must be non-empty (e.g. 'user')", field=f"messages[{i}].role")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"at most {MAX_REQUEST_ID_LENGTH} characters", field="request_id")
    return GenerationRequest(request_id=request_id, adapter_id=adapter_id, prompt=prompt if has_prompt else None,
                             messages=messages, params=params, deadline=deadline)
