"""The continuous-batching engine: a request queue, one step-loop thread, per-row adapters and streaming.

Each loop iteration (1) retires cancelled / timed-out requests, (2) admits waiting requests whose adapter is in an
accelerator slot and whose KV blocks fit (a cold adapter loads in the background while others go ahead; blocks for
the whole request are reserved up front, :mod:`server.engine.scheduler`), (3) prefills one chunk of admitted
prompts under a token budget (a finished prompt samples its first token and joins the decode batch), then (4) runs
ONE decode step for every running row — each row routed to its own adapter, its keys and values in its own blocks
of the paged KV cache — samples all rows on the device in one batch and streams the new text. Finished rows free
their blocks at once; nobody else's cache moves. Nothing here touches protobuf or tensors: the model runner
(:mod:`server.model.runner`) takes plain rows and returns logits, the sampler (:mod:`server.model.sampling`)
returns token ids, and each request's :class:`~server.engine.output.OutputProcessor` turns ids into text.

Failure invariant: every request :meth:`Engine.submit` accepted gets exactly one terminal event, whatever fails.
A failure ends only the requests it touched: a slot acquisition that raises ends that request; a prefill step that
raises ends the requests in that step (the running batch goes on: their blocks were not touched); a row whose
sampling or text handling fails ends alone; a decode step that raises ends the running batch, waiting requests go
on. Ending a request releases its adapter slot pin, its KV blocks and its request id. After :meth:`Engine.stop`,
or if the loop thread dies, every request still in flight ends and :meth:`Engine.submit` refuses new ones with
UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from server.config import EngineConfig
from server.engine.grammar import GrammarCompiler, grammar_failure
from server.engine.output import OutputProcessor, added_vocab, detokenization_caveats, hidden_special_tokens
from server.engine.scheduler import BlockAllocator, blocks_needed, plan_chunks
from server.engine.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenLogprob,
    TopLogprob,
)
from server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServerError,
    Unavailable,
)
from server.logs import RequestLog
from server.metrics import Metrics
from server.model.runner import ModelRunner, PromptScoring, StepRow
from server.model.sampling import (
    NonFiniteLogits,
    RowLogprobs,
    prompt_scores_to_host,
    request_seed,
    select_tokens_logprobs,
)

log = logging.getLogger(__name__)


class RequestStream:
    """The caller's side of one request: iterate to receive :class:`GenerationEvent` s; :meth:`cancel` stops it.

    Iteration ends after the event with ``finished`` set; an event carrying ``error`` is raised instead.
    """

    def __init__(self, request_id: str, engine: "Engine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._events: queue.Queue[GenerationEvent] = queue.Queue()

    def __iter__(self):
        while True:
            event = self._events.get()
            if event.error is not None:
                raise event.error
            yield event
            if event.finished:
                return

    def cancel(self, error: ServerError | None = None) -> None:
        """Ask the engine to stop this request (idempotent; a finished request is unaffected).

        ``error`` is what the request ends with (default :class:`Cancelled`); the first cancel's error wins, and a
        passed deadline always ends it with :class:`DeadlineExceeded`.
        """
        self._engine.cancel(self.request_id, error)

    def result(self) -> GenerationResult:
        """Block until the request finishes and return the whole answer (raises the request's error)."""
        return GenerationResult.from_events(self, self.request_id)


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: RequestStream
    prompt_ids: list[int]
    arrival: float
    label: str
    seed: int
    output: OutputProcessor
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when the request asks
    matcher: object | None = None  # the response format's grammar state (llguidance LLMatcher), None = free text
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. scored so far (asking)
    slot: int = -1
    blocks: list[int] = field(default_factory=list)  # KV blocks reserved for the whole request
    computed: int = 0  # prompt tokens already in the KV cache (chunked prefill)
    stop_ids: frozenset[int] = frozenset()
    emitted_tokens: int = 0
    prefill_start: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
    cancel_error: ServerError | None = None
    scrub: bool = False  # its logits went non-finite: zero its blocks before they are reused
    done: bool = False


class Engine:
    """Adapter-aware continuous batching over one base model.

    Args:
        model: the causal LM (its ``generation_config`` names the EOS tokens).
        tokenizer: its tokenizer (chat template used for ``messages``).
        runner: the model runner over the model's paged KV cache and LoRA banks.
        adapter_cache: :class:`~server.adapters.cache.AdapterCache` over the banks' slots.
        config: limits (batch size, queue, tokens).
        metrics: where latency / token / batch metrics go.
        max_total_tokens: prompt + generated tokens allowed per row (the model's context length).
        request_log: writes one log line per finished request (default: without prompt text).
    """

    def __init__(self, model, tokenizer, runner: ModelRunner, adapter_cache, config: EngineConfig,
                 metrics: Metrics, max_total_tokens: int, request_log: RequestLog | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runner = runner
        self.allocator = BlockAllocator(runner.pool.num_blocks)
        self.block_size = runner.pool.block_size
        self.cache = adapter_cache
        self.config = config
        self.metrics = metrics
        self.request_log = request_log or RequestLog()
        self.max_total_tokens = config.max_total_tokens or max_total_tokens
        self.eos_ids = self._eos_ids(model, tokenizer)
        # the logits' width: the model's vocabulary (may exceed the tokenizer's: padding ids are never allowed)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        self.grammar = GrammarCompiler(tokenizer, int(vocab), sorted(self.eos_ids))
        self._hidden_specials = hidden_special_tokens(tokenizer)
        self._added_tokens = added_vocab(tokenizer)
        # (decode([id]), exact bytes) of the ids log-probabilities named (engine thread only)
        self._token_texts: dict[int, tuple[str, bytes]] = {}
        for caveat in detokenization_caveats(tokenizer):
            log.warning("streamed text: %s", caveat)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._by_id: dict[str, _Sequence] = {}
        self._prefilling: list[_Sequence] = []  # admitted (blocks and slot held), prompt not fully in the cache
        self._running: list[_Sequence] = []  # decoding
        self._ids = itertools.count()
        self._stop = False
        self._dead = False
        self._failure_listeners: list = []
        self._thread: threading.Thread | None = None
        self._update_kv_gauges()

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return ids

    # --- public API (any thread) ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop thread."""
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; queued and running requests end with CANCELLED and later :meth:`submit` calls raise
        :class:`Unavailable`. Waits up to ``timeout_s`` seconds for the loop thread (a forward pass in progress
        finishes first; the loop then ends the remaining requests itself)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._shutdown(Cancelled("server shutting down"))  # never started, or already ended: idempotent

    @property
    def alive(self) -> bool:
        """True while the engine accepts requests: not stopped and its loop thread has not died."""
        return not self._stop and not self._dead

    def on_failure(self, callback) -> None:
        """Call ``callback()`` (from the loop thread) if the loop thread dies; at once if it already has. Used by
        the RPC layer to report NOT_SERVING."""
        with self._lock:
            if not self._dead:
                self._failure_listeners.append(callback)
                return
        callback()

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate, tokenize and queue ``request``.

        Raises:
            InvalidArgument: bad sampling field, neither or both of prompt / messages, duplicate request id.
            NotFound: ``adapter_id`` is not registered (field ``adapter_id``).
            ResourceExhausted: the queue is full, the prompt leaves no room to generate, or the request needs more
                KV cache blocks than the whole cache holds (field ``prompt`` when the prompt alone does not fit,
                else ``max_new_tokens``).
            Unavailable: the engine was stopped or its loop thread died.
        """
        if not self.alive:
            raise Unavailable(self._unavailable_reason())
        request.params.validate(self.config.max_new_tokens, self.config.max_stop_strings, self.config.max_stop_chars)
        prompt_ids = self._tokenize(request)
        limit = self.max_total_tokens - 1
        if self.config.max_prompt_tokens and self.config.max_prompt_tokens < limit:
            limit = self.config.max_prompt_tokens
            if len(prompt_ids) > limit:
                raise ResourceExhausted(f"prompt has {len(prompt_ids)} tokens; the limit is {limit} "
                                        "(--max-prompt-tokens)", field="prompt")
        if len(prompt_ids) > limit:
            raise ResourceExhausted(f"prompt has {len(prompt_ids)} tokens; the limit is {limit} (the context)",
                                    field="prompt")
        tokens = min(len(prompt_ids) + request.params.max_new_tokens, self.max_total_tokens)
        holds = self.allocator.capacity * self.block_size
        if blocks_needed(len(prompt_ids) + 1, self.block_size) > self.allocator.capacity:
            raise ResourceExhausted(f"the prompt ({len(prompt_ids)} tokens) and one new token do not fit the whole KV "
                                    f"cache ({holds} tokens; raise --kv-cache-bytes)", field="prompt")
        if blocks_needed(tokens, self.block_size) > self.allocator.capacity:
            raise ResourceExhausted(
                f"prompt + max_new_tokens need {tokens} tokens of KV cache; the whole cache holds {holds} (raise "
                "--kv-cache-bytes or lower max_new_tokens)", field="max_new_tokens")
        if request.adapter_id:
            self.cache.current_key(request.adapter_id)  # NotFound now, not after queueing
        fmt = request.params.response_format
        matcher = self.grammar.matcher(fmt) if fmt is not None else None  # compiled here, never on the step loop
        request_id = request.request_id or f"req-{next(self._ids)}"
        stream = RequestStream(request_id, self)
        seq = _Sequence(request=request, stream=stream, prompt_ids=prompt_ids, arrival=time.monotonic(),
                        label=self.metrics.adapter_label(request.adapter_id), seed=request_seed(request.params),
                        output=OutputProcessor(self.tokenizer, request.params.stop, self._hidden_specials),
                        stop_ids=self._stop_token_ids(request.params.stop), matcher=matcher)
        with self._lock:
            if not self.alive:  # checked again under the lock: stop() / death and this submit cannot interleave
                raise Unavailable(self._unavailable_reason())
            if request_id in self._by_id:
                raise InvalidArgument(f"request id {request_id!r} is already in flight", field="request_id")
            if len(self._waiting) >= self.config.max_queue:
                raise ResourceExhausted(f"queue is full ({self.config.max_queue} waiting requests)")
            self._waiting.append(seq)
            self._by_id[request_id] = seq
            self.metrics.waiting.set(len(self._waiting))
            self._lock.notify_all()
        return stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submit and wait for the whole answer (raises as :meth:`submit` and the request's error)."""
        return self.submit(request).result()

    def _unavailable_reason(self) -> str:
        return "the engine's loop thread died (see the server log)" if self._dead else "the engine is stopped"

    def _stop_token_ids(self, stops: tuple[str, ...]) -> frozenset[int]:
        """Ids of the added / special tokens whose text is exactly one of ``stops`` (matched by id)."""
        ids = {self._added_tokens[s] for s in stops if s in self._added_tokens}
        ids.update(tid for tid, text in self._hidden_specials.items() if text in stops)
        return frozenset(ids)

    def cancel(self, request_id: str, error: ServerError | None = None) -> None:
        """Mark a request cancelled; the loop retires it before its next step with ``error`` (default
        :class:`Cancelled`), or :class:`DeadlineExceeded` when its deadline has passed."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is not None and not seq.cancelled:
                seq.cancelled = True
                seq.cancel_error = error
                self._lock.notify_all()

    def counts(self) -> tuple[int, int]:
        """``(running, waiting)`` request counts; admitted requests still prefilling count as running."""
        with self._lock:
            return len(self._running) + len(self._prefilling), len(self._waiting)

    # --- tokenization -----------------------------------------------------------------------------------
    def _tokenize(self, request: GenerationRequest) -> list[int]:
        has_prompt = request.prompt is not None and request.prompt != ""
        if has_prompt == bool(request.messages):
            raise InvalidArgument("exactly one of prompt and messages must be set", field="prompt")
        if has_prompt:
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        else:
            for i, m in enumerate(request.messages):
                if not m.role:
                    raise InvalidArgument(f"messages[{i}].role is empty", field="messages")
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidArgument("the base model has no chat template; send prompt instead", field="messages")
            ids = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if not ids:
            raise InvalidArgument("prompt tokenizes to zero tokens", field="prompt")
        return list(ids)

    # --- the loop (engine thread) -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while (not self._stop and not self._running and not self._prefilling
                           and not self._has_admissible()):
                        self._lock.wait(timeout=0.05)
                    if self._stop:
                        break
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                    log.exception("engine step failed")
                    self._fail_in_flight(ServerError(f"engine step failed: {type(exc).__name__}: {exc}"))
        except BaseException:
            log.critical("the engine loop thread died; in-flight requests end INTERNAL", exc_info=True)
            with self._lock:
                self._dead = True
            raise
        finally:
            if self._dead:
                self._shutdown(ServerError("the engine stopped unexpectedly (see the server log)"))
                self._notify_failure()
            else:
                self._shutdown(Cancelled("server shutting down"))

    def _step(self) -> None:
        """One iteration: retire, admit, prefill one chunk, decode. Raises only for failures that touch the running
        batch."""
        self._retire_waiting()
        self._retire_active()
        self._admit()
        prefilled = self._prefill_step() if self._prefilling else False
        if self._running:
            self._decode_step()
        elif not prefilled:
            with self._lock:  # only cold adapters (or blocks) are awaited: don't spin
                self._lock.wait(timeout=0.005)

    def _has_admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) + len(self._prefilling) < self.config.max_batch_size

    def _expired(self, seq: _Sequence, now: float) -> ServerError | None:
        deadline = seq.request.deadline
        if deadline is not None and now > deadline:  # first: a cancel at the deadline is still a deadline
            return DeadlineExceeded("deadline exceeded")
        if seq.cancelled:
            return seq.cancel_error or Cancelled("request cancelled")
        return None

    def _retire_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone = [(s, e) for s in self._waiting if (e := self._expired(s, now)) is not None]
            for seq, _ in gone:
                self._waiting.remove(seq)
            self.metrics.waiting.set(len(self._waiting))
        for seq, error in gone:
            self._end(seq, error=error)

    def _retire_active(self) -> None:
        now = time.monotonic()
        gone = [(s, e) for s in [*self._prefilling, *self._running] if (e := self._expired(s, now)) is not None]
        for seq, error in gone:
            self._end(seq, error=error)
        if gone:
            self._drop_finished()

    def _blocks_for(self, seq: _Sequence) -> int:
        """KV blocks ``seq`` can ever need: its prompt plus every token it may generate, within the context."""
        tokens = min(len(seq.prompt_ids) + seq.request.params.max_new_tokens, self.max_total_tokens)
        return blocks_needed(tokens, self.block_size)

    def _admit(self) -> None:
        """Move waiting requests, oldest first, to the prefill list while there is room in the batch, their KV
        blocks fit and their adapter is in a slot. A cold adapter's request lets later ones go ahead; a request
        whose blocks do not fit stops admission (it is not starved by smaller ones behind it).

        A request whose slot acquisition raises ends alone."""
        with self._lock:
            candidates = list(self._waiting)
        room = self.config.max_batch_size - len(self._running) - len(self._prefilling)
        admitted: list[_Sequence] = []
        for seq in candidates:
            if room <= 0:
                break
            need = self._blocks_for(seq)
            if need > self.allocator.free:
                break
            slot = -1
            if seq.request.adapter_id:
                try:
                    slot = self.cache.acquire(self.cache.current_key(seq.request.adapter_id))
                except Exception as exc:  # noqa: BLE001 - ends this request only
                    if not isinstance(exc, ServerError):
                        log.exception("adapter slot acquisition failed for %s", seq.stream.request_id)
                        exc = ServerError(f"adapter slot acquisition failed: {type(exc).__name__}: {exc}")
                    with self._lock:
                        self._waiting.remove(seq)
                    self._end(seq, error=exc)
                    continue
                if slot is None:
                    continue  # loading in the background or all slots pinned: let others go ahead
            seq.slot = slot
            seq.blocks = self.allocator.allocate(need)
            admitted.append(seq)
            room -= 1
        if not admitted:
            return
        now = time.monotonic()
        with self._lock:
            for seq in admitted:
                self._waiting.remove(seq)
            self.metrics.waiting.set(len(self._waiting))
        for seq in admitted:
            seq.prefill_start = now
            self.metrics.queue_wait.observe(now - seq.arrival)
            self.metrics.prompt_tokens.labels(seq.label).inc(len(seq.prompt_ids))
        self._prefilling.extend(admitted)
        self._update_kv_gauges()

    def _prefill_step(self) -> bool:
        """Prefill the next chunk of the oldest admitted prompts (one forward pass under the token budget); a
        prompt whose last chunk ran samples its first token and joins the decode batch. Rows whose request asks for
        prompt log-probabilities score this chunk's positions too; a request whose prompt is then complete gets
        them in an event of their own, before its first token's. A failure ends the requests in this step only.
        Returns True (a step ran)."""
        chunks = plan_chunks([len(s.prompt_ids) - s.computed for s in self._prefilling],
                             self.config.prefill_tokens, self.config.prefill_chunk)
        batch = self._prefilling[:len(chunks)]
        rows = [StepRow(tuple(s.prompt_ids[s.computed:s.computed + c]), s.computed, self._table(s, s.computed + c),
                        s.slot) for s, c in zip(batch, chunks)]
        complete = [s.computed + c == len(s.prompt_ids) for s, c in zip(batch, chunks)]
        scoring = [self._prompt_scoring(s, c) for s, c in zip(batch, chunks)]
        start = time.monotonic()
        try:
            if any(sc is not None for sc in scoring):
                logits, scores = self.runner.prefill_scored(rows, scoring)
            else:
                logits, scores = self.runner.prefill(rows), None
            ready = [s for s, done in zip(batch, complete) if done]
            tokens = self._sample(logits[[i for i, done in enumerate(complete) if done]], ready) if ready else ([], [])
            if scores is not None:  # after the sampler's sync: the device is idle, this transfer only copies
                for seq, sc, row in zip(batch, scoring, prompt_scores_to_host(scores)):
                    if sc is not None:
                        seq.prompt_logprobs.extend(self._token_logprob(t, r) for t, r in zip(sc.targets, row))
        except Exception as exc:  # noqa: BLE001 - ends the requests this step touched, not the running batch
            log.exception("prefill failed")
            error = ServerError(f"prefill failed: {type(exc).__name__}: {exc}")
            for seq in batch:
                self._end(seq, error=error)
            self._drop_finished()
            return True
        for seq, c in zip(batch, chunks):
            seq.computed += c
        self.metrics.step_latency.labels("prefill").observe(time.monotonic() - start)
        ready_ids = {id(s) for s in ready}
        self._prefilling = [s for s in self._prefilling if id(s) not in ready_ids]
        self._running.extend(ready)
        for seq in ready:
            if seq.prompt_logprobs:  # the request's first event
                seq.stream._events.put(GenerationEvent(seq.stream.request_id,
                                                       prompt_logprobs=tuple(seq.prompt_logprobs)))
                seq.prompt_logprobs = []
        self._accept_all(ready, tokens)
        self._drop_finished()
        return True

    def _decode_step(self) -> None:
        """One decode step for every running row; a failure ends the running rows (their caches are suspect), not
        the queue or the prompts being prefilled."""
        rows = self._running
        start = time.monotonic()
        try:
            steps = [StepRow((s.generated[-1],), n - 1, self._table(s, n), s.slot)
                     for s, n in ((s, len(s.prompt_ids) + len(s.generated)) for s in rows)]
            tokens = self._sample(self.runner.decode(steps), rows)
        except Exception as exc:  # noqa: BLE001 - ends the running batch only
            log.exception("decode step failed")
            error = ServerError(f"decode failed: {type(exc).__name__}: {exc}")
            for seq in rows:
                self._end(seq, error=error)
            self._drop_finished()
            return
        self.metrics.step_latency.labels("decode").observe(time.monotonic() - start)
        self.metrics.batch_size.observe(len(rows))
        self._accept_all(rows, tokens)
        self._drop_finished()

    @staticmethod
    def _prompt_scoring(seq: _Sequence, chunk: int) -> PromptScoring | None:
        """What ``seq``'s next prefill chunk (``chunk`` tokens from ``seq.computed``) scores: None when its request
        does not ask for prompt log-probabilities or the chunk predicts no prompt token (a one-token prompt)."""
        k = seq.request.params.prompt_logprobs
        if k is None:
            return None
        start, n = seq.computed, len(seq.prompt_ids)
        targets = tuple(seq.prompt_ids[start + 1:min(start + chunk + 1, n)])
        return PromptScoring(targets, k) if targets else None

    def _table(self, seq: _Sequence, tokens: int) -> tuple[int, ...]:
        """The part of ``seq``'s block table that holds its first ``tokens`` tokens: attention reads (and a graph
        bucket is chosen by) the context so far, not by everything reserved for the request."""
        return tuple(seq.blocks[:blocks_needed(tokens, self.block_size)])

    def _sample(self, logits, seqs: list[_Sequence]) -> tuple[list[int | ServerError], list[RowLogprobs | None]]:
        """One token (or the row's error) per sequence, and its log-probabilities for the rows that ask: batched on
        the logits' device, one host sync."""
        params = [s.request.params for s in seqs]
        seen = [s.prompt_ids + s.generated if s.request.params.repetition_penalty != 1.0 else [] for s in seqs]
        asks = [p.top_logprobs if p.wants_logprobs else -1 for p in params]
        allowed, grammar_errors = None, [None] * len(seqs)
        if any(s.matcher is not None for s in seqs):
            # Filled on the host while the device still runs this step's forward (nothing above waited for it),
            # then copied in one transfer: no round trip per row.
            allowed, grammar_errors = self.grammar.bitmask([s.matcher for s in seqs])
        tokens, row_lps = select_tokens_logprobs(logits, params, seen, [s.seed for s in seqs],
                                                 [len(s.generated) for s in seqs],
                                                 asks if any(k >= 0 for k in asks) else None, allowed)
        for b, reason in enumerate(grammar_errors):
            if reason is not None:
                tokens[b] = grammar_failure(seqs[b].request.params.response_format, reason)
        return tokens, row_lps

    def _token_logprob(self, token: int, row: RowLogprobs) -> TokenLogprob:
        """A sampled (or scored prompt) position's log-probabilities with each token's text (``decode([id])``,
        special tokens shown) and exact bytes (:meth:`GrammarCompiler.token_bytes`)."""
        texts = self._token_texts

        def text(tid: int) -> tuple[str, bytes]:
            got = texts.get(tid)
            if got is None:  # at most one entry per vocabulary id: a long scored prompt decodes each id once
                piece = self.tokenizer.decode([tid], skip_special_tokens=False)
                got = texts[tid] = (piece, self.grammar.token_bytes(tid, piece))
            return got
        top = []
        for tid, lp in row.top:
            piece, raw = text(tid)
            top.append(TopLogprob(tid, piece, lp, raw))
        piece, raw = text(token)
        return TokenLogprob(token, piece, row.logprob, tuple(top), raw)

    def _accept_all(self, seqs: list[_Sequence],
                    sampled: tuple[list[int | ServerError], list[RowLogprobs | None]]) -> None:
        """Accept each row's token; a row whose sampling or text handling failed ends alone."""
        tokens, row_lps = sampled
        for seq, token, row_lp in zip(seqs, tokens, row_lps):
            if isinstance(token, ServerError):
                log.error("request %s: %s", seq.stream.request_id, token)
                seq.scrub = isinstance(token, NonFiniteLogits)
                self._end(seq, error=token)
                continue
            try:
                self._accept(seq, token, row_lp)
            except Exception as exc:  # noqa: BLE001 - ends this row only
                log.exception("request %s: handling its token failed", seq.stream.request_id)
                self._end(seq, error=ServerError(f"output processing failed: {type(exc).__name__}: {exc}"))

    def _accept(self, seq: _Sequence, token: int, row_lp: RowLogprobs | None = None) -> None:
        """Record ``token`` for ``seq``, stream new text, and end the row on EOS / stop (string or token id) /
        length."""
        now = time.monotonic()
        if not seq.generated:
            seq.first_token = now
        if token in seq.stop_ids:  # a stop string that is exactly one (special) token's text
            # Like EOS, a token that ends the request by its id is not part of the output (nor counted in
            # completion_tokens): the same generation reports the same count whether it ended on EOS or on a stop.
            self._emit(seq, seq.output.finish())
            self._end(seq, reason=FINISH_STOP)
            return
        fmt = seq.request.params.response_format
        if token in self.eos_ids and not seq.request.params.ignore_eos:
            if seq.matcher is not None and not seq.matcher.is_accepting():  # llguidance's EOS at a dead end
                self._end(seq, error=grammar_failure(fmt, seq.matcher.get_error() or "no valid continuation"))
                return
            self._emit(seq, seq.output.finish())
            self._end(seq, reason=FINISH_EOS)
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._end(seq, error=grammar_failure(fmt, seq.matcher.get_error()))
            return
        seq.generated.append(token)
        if row_lp is not None:
            seq.logprobs.append(self._token_logprob(token, row_lp))
        self.metrics.generated_tokens.labels(seq.label).inc()
        text, stopped = seq.output.push(token)
        self._emit(seq, text)
        if stopped:
            self._end(seq, reason=FINISH_STOP)
        elif seq.matcher is not None and seq.matcher.is_stopped():  # nothing may follow
            if not seq.matcher.is_accepting():
                self._end(seq, error=grammar_failure(fmt, seq.matcher.get_error() or "no valid continuation"))
                return
            self._emit(seq, seq.output.finish())
            self._end(seq, reason=FINISH_STOP)
        elif (len(seq.generated) >= seq.request.params.max_new_tokens
              or len(seq.prompt_ids) + len(seq.generated) >= self.max_total_tokens):
            self._emit(seq, seq.output.finish())
            self._end(seq, reason=FINISH_LENGTH)

    def _emit(self, seq: _Sequence, text: str) -> None:
        """Stream ``text`` (if any) with the token ids generated since the previous event."""
        if text:
            seq.stream._events.put(GenerationEvent(seq.stream.request_id, text=text,
                                                   token_ids=tuple(seq.generated[seq.emitted_tokens:]),
                                                   logprobs=tuple(seq.logprobs[seq.emitted_tokens:])))
            seq.emitted_tokens = len(seq.generated)

    def _end(self, seq: _Sequence, reason: str | None = None, error: ServerError | None = None) -> None:
        """Finish ``seq`` once: release its id, KV blocks and slot pin, record metrics and the request log line, and
        put its final event. The final event is put whatever fails here (a failure while finishing is logged, and a
        finished answer is still delivered). The caller drops the row from the batch."""
        with self._lock:  # atomic: two threads ending one request (stop() and the loop) give one final event
            if seq.done:
                return
            seq.done = True
            self._by_id.pop(seq.stream.request_id, None)
        now = time.monotonic()
        event = None
        try:
            event = self._final_event(seq, reason, error, now)
            if seq.blocks:
                blocks, seq.blocks = seq.blocks, []
                if seq.scrub:
                    self.runner.scrub(blocks)
                self.allocator.release(blocks)
            if seq.slot >= 0:
                slot, seq.slot = seq.slot, -1
                self.cache.release(slot)
        except Exception:  # noqa: BLE001 - the caller must still get its final event
            log.exception("finishing request %s failed", seq.stream.request_id)
        finally:
            if event is None:
                event = GenerationEvent(seq.stream.request_id, finished=True,
                                        error=error or ServerError("failed to finish the request (see the log)"))
            try:
                self._record_end(seq, reason, error, now, event.timings)
            except Exception:  # noqa: BLE001 - metrics / logging must not cost the caller its answer
                log.exception("recording the end of request %s failed", seq.stream.request_id)
            seq.stream._events.put(event)

    def _final_event(self, seq: _Sequence, reason: str | None, error: ServerError | None,
                     now: float) -> GenerationEvent:
        if error is not None:
            return GenerationEvent(seq.stream.request_id, finished=True, error=error)
        n = len(seq.generated)
        ttft = (seq.first_token or now) - seq.arrival
        tpot = (now - seq.first_token) / (n - 1) if n > 1 else 0.0
        timings = Timings(queue_seconds=max(0.0, seq.prefill_start - seq.arrival), ttft_seconds=ttft,
                          total_seconds=now - seq.arrival, tpot_seconds=tpot)
        return GenerationEvent(seq.stream.request_id, finished=True, finish_reason=reason,
                               token_ids=tuple(seq.generated[seq.emitted_tokens:]),
                               logprobs=tuple(seq.logprobs[seq.emitted_tokens:]),
                               prompt_tokens=len(seq.prompt_ids), completion_tokens=n, timings=timings)

    def _record_end(self, seq: _Sequence, reason: str | None, error: ServerError | None, now: float,
                    timings: Timings | None) -> None:
        """Metrics and the request log line of a finishing request."""
        if error is not None or timings is None:
            status = error.code if error is not None else "INTERNAL"
            self.metrics.finished.labels(seq.label, "error").inc()
            self.request_log.finished(
                seq.request, seq.stream.request_id, status=status, finish_reason=None,
                prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.generated),
                queue_seconds=max(0.0, (seq.prefill_start or now) - seq.arrival),
                ttft_seconds=(seq.first_token - seq.arrival) if seq.first_token else None, tpot_seconds=None,
                total_seconds=now - seq.arrival, error=str(error) if error is not None else "failed to finish")
            return
        n = len(seq.generated)
        self.metrics.request_latency.labels(seq.label).observe(timings.total_seconds)
        self.metrics.ttft.labels(seq.label).observe(timings.ttft_seconds)
        if n > 1:
            self.metrics.tpot.labels(seq.label).observe(timings.tpot_seconds)
        self.metrics.finished.labels(seq.label, reason).inc()
        self.request_log.finished(seq.request, seq.stream.request_id, status="OK", finish_reason=reason,
                                  prompt_tokens=len(seq.prompt_ids), completion_tokens=n,
                                  queue_seconds=timings.queue_seconds, ttft_seconds=timings.ttft_seconds,
                                  tpot_seconds=timings.tpot_seconds if n > 1 else None,
                                  total_seconds=timings.total_seconds)

    def _drop_finished(self) -> None:
        """Forget finished rows (their blocks were freed when they ended: nobody else's cache moves)."""
        self._running = [s for s in self._running if not s.done]
        self._prefilling = [s for s in self._prefilling if not s.done]
        self.metrics.running.set(len(self._running))
        self._update_kv_gauges()

    def _update_kv_gauges(self) -> None:
        self.metrics.kv_cache_blocks.labels("used").set(self.allocator.capacity - self.allocator.free)
        self.metrics.kv_cache_blocks.labels("free").set(self.allocator.free)

    def _fail_in_flight(self, error: ServerError) -> None:
        """End every request the failed step touched: the running batch and every admitted request (out of the
        queue, prefilling). Waiting requests are untouched."""
        self._end_all(error, waiting_too=False)

    def _shutdown(self, error: ServerError) -> None:
        """End every request still in flight (running, waiting, or being admitted) with ``error``."""
        self._end_all(error, waiting_too=True)

    def _end_all(self, error: ServerError, waiting_too: bool) -> None:
        """End the running batch and the admitted requests with ``error`` — the waiting queue too when
        ``waiting_too`` — freeing their KV blocks."""
        with self._lock:
            if waiting_too:
                self._waiting = deque()
            waiting = {id(s) for s in self._waiting}
            touched = [s for s in self._by_id.values() if id(s) not in waiting]
        for seq in [*self._running, *self._prefilling, *touched]:
            self._end(seq, error=error)
        self._running, self._prefilling = [], []
        self.metrics.running.set(0)
        if waiting_too:
            self.metrics.waiting.set(0)
        self._update_kv_gauges()

    def _notify_failure(self) -> None:
        with self._lock:
            listeners, self._failure_listeners = self._failure_listeners, []
        for callback in listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 - every listener gets its call
                log.exception("engine failure listener failed")

