"""The continuous-batching engine: a queue of requests, one step loop thread, per-row adapters and streaming.

Each loop iteration (1) retires cancelled / timed-out requests, (2) admits waiting requests whose adapter is
in an accelerator slot (a cold adapter loads in the background while others go ahead), prefilling each one and
concatenating it into the running batch, then (3) runs ONE decode forward pass for every running row with each
row routed to its own adapter, samples per row and streams the new text. Finished rows leave the batch before
the next step. Nothing here touches protobuf; the model is anything with the transformers causal-LM call
signature, so tests can drive it with tiny models.

Failure invariant: every request :meth:`Engine.submit` accepted gets exactly one terminal event, whatever fails.
A failure ends only the requests it touched: a slot acquisition that raises ends that request; a prefill that
raises ends the requests it was admitting (the running batch goes on); a row whose sampling or text handling
fails ends alone; a decode forward pass that raises ends the running batch (its KV cache is no longer
consistent), waiting requests go on. Ending a request releases its adapter slot pin and its request id. After
:meth:`Engine.stop`, or if the loop thread dies, every request still in flight ends and :meth:`Engine.submit`
refuses new ones with UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from server.config import EngineConfig
from server.engine import batch as kv
from server.engine.sampling import make_generator, select_tokens
from server.engine.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Timings,
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
from server.model.lora import LoraRouter

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
        text, ids, last = [], [], None
        for event in self:
            text.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return GenerationResult(self.request_id, "".join(text), tuple(ids), last.finish_reason,
                                last.prompt_tokens, last.completion_tokens, last.timings)


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: RequestStream
    prompt_ids: list[int]
    arrival: float
    label: str
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    # (token index, visible-text offset, rendering) of each generated special token that decoding hides
    specials: list[tuple[int, int, str]] = field(default_factory=list)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    prefill_start: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
    cancel_error: ServerError | None = None
    done: bool = False


class Engine:
    """Adapter-aware continuous batching over one base model.

    Args:
        model: causal LM whose linear layers are routed by ``router``.
        tokenizer: its tokenizer (chat template used for ``messages``).
        router: the model's :class:`LoraRouter`.
        adapter_cache: :class:`~server.adapters.cache.AdapterCache` over the router's slots.
        config: limits (batch size, queue, tokens).
        metrics: where latency / token / batch metrics go.
        max_total_tokens: prompt + generated tokens allowed per row (the model's context length).
        request_log: writes one log line per finished request (default: without prompt text).
    """

    def __init__(self, model, tokenizer, router: LoraRouter, adapter_cache, config: EngineConfig,
                 metrics: Metrics, max_total_tokens: int, request_log: RequestLog | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.router = router
        self.cache = adapter_cache
        self.config = config
        self.metrics = metrics
        self.request_log = request_log or RequestLog()
        self.max_total_tokens = config.max_total_tokens or max_total_tokens
        self.eos_ids = self._eos_ids(model, tokenizer)
        self._hidden_specials = self._hidden_special_tokens(tokenizer)
        self._added_tokens = self._added_vocab(tokenizer)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._by_id: dict[str, _Sequence] = {}
        self._running: list[_Sequence] = []
        self._state: kv.BatchState | None = None
        self._next_ids: list[int] = []
        self._ids = itertools.count()
        self._stop = False
        self._dead = False
        self._failure_listeners: list = []
        self._thread: threading.Thread | None = None

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

    @staticmethod
    def _added_vocab(tokenizer) -> dict[str, int]:
        """Added / special tokens' text → id (what a stop string naming one special token matches by id)."""
        vocab: dict[str, int] = {}
        get = getattr(tokenizer, "get_added_vocab", None)
        if get is not None:
            vocab.update({str(k): int(v) for k, v in get().items()})
        for text, tid in zip(getattr(tokenizer, "all_special_tokens", ()), getattr(tokenizer, "all_special_ids", ())):
            vocab.setdefault(str(text), int(tid))
        return vocab

    @classmethod
    def _hidden_special_tokens(cls, tokenizer) -> dict[int, str]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops → their rendered text (for stop matching)."""
        hidden: dict[int, str] = {}
        for tid in sorted(set(cls._added_vocab(tokenizer).values())):
            try:
                shown = tokenizer.decode([tid], skip_special_tokens=False)
                if shown and not tokenizer.decode([tid], skip_special_tokens=True):
                    hidden[tid] = shown
            except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode is simply not special text
                continue
        return hidden

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
            ResourceExhausted: the queue is full, or the prompt leaves no room to generate.
            Unavailable: the engine was stopped or its loop thread died.
        """
        if not self.alive:
            raise Unavailable(self._unavailable_reason())
        request.params.validate(self.config.max_new_tokens)
        prompt_ids = self._tokenize(request)
        if len(prompt_ids) >= self.max_total_tokens:
            raise ResourceExhausted(f"prompt has {len(prompt_ids)} tokens; the limit is {self.max_total_tokens - 1}",
                                    field="prompt")
        if request.adapter_id:
            self.cache.current_key(request.adapter_id)  # NotFound now, not after queueing
        request_id = request.request_id or f"req-{next(self._ids)}"
        stream = RequestStream(request_id, self)
        seq = _Sequence(request=request, stream=stream, prompt_ids=prompt_ids, arrival=time.monotonic(),
                        label=self.metrics.adapter_label(request.adapter_id),
                        stop_ids=self._stop_token_ids(request.params.stop))
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
        """``(running, waiting)`` request counts."""
        with self._lock:
            return len(self._running), len(self._waiting)

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
                    while not self._stop and not self._running and not self._has_admissible():
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
        """One iteration: retire, admit (prefill), decode. Raises only for failures that touch the running batch."""
        self._retire_waiting()
        self._retire_running()
        admitted = self._admit()
        if self._running:
            self._decode_step()
        elif not admitted:
            with self._lock:  # only cold adapters are waiting: don't spin while they load
                self._lock.wait(timeout=0.005)

    def _has_admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.config.max_batch_size

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

    def _retire_running(self) -> None:
        now = time.monotonic()
        gone = [(s, e) for s in self._running if (e := self._expired(s, now)) is not None]
        for seq, error in gone:
            self._end(seq, error=error)
        if gone:
            self._drop_finished()

    def _admit(self) -> int:
        """Prefill, in one forward pass, up to ``prefill_chunk`` waiting requests whose adapter is resident,
        oldest first, and join them to the running batch. Returns how many left the queue.

        A request whose slot acquisition raises ends alone; a failed prefill ends the requests it was admitting
        and leaves the running batch as it was. Raises only when joining the new rows to the running batch's KV
        cache fails (then the running batch is touched too)."""
        with self._lock:
            candidates = list(self._waiting)
        room = min(self.config.prefill_chunk, self.config.max_batch_size - len(self._running))
        chosen: list[_Sequence] = []
        for seq in candidates:
            if len(chosen) >= room:
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
            chosen.append(seq)
        if not chosen:
            return 0
        with self._lock:
            for seq in chosen:
                self._waiting.remove(seq)
            self.metrics.waiting.set(len(self._waiting))
        try:
            state, tokens = self._prefill(chosen)
        except Exception as exc:  # noqa: BLE001 - ends the requests this prefill touched, not the running batch
            log.exception("prefill failed")
            error = ServerError(f"prefill failed: {type(exc).__name__}: {exc}")
            for seq in chosen:
                self._end(seq, error=error)
            return len(chosen)
        self._state = kv.concatenate(self._state, state)
        self._running.extend(chosen)
        self._next_ids.extend(t if isinstance(t, int) else 0 for t in tokens)
        self._accept_all(chosen, tokens)
        self._drop_finished()
        return len(chosen)

    def _prefill(self, seqs: list[_Sequence]) -> tuple[kv.BatchState, list[int | ServerError]]:
        """Prefill ``seqs`` into a new batch state (the running batch is not touched) and sample their first
        tokens. Returns the state and one token (or row error) per sequence."""
        start = time.monotonic()
        for seq in seqs:
            seq.prefill_start = start
            self.metrics.queue_wait.observe(start - seq.arrival)
            seq.generator = make_generator(seq.request.params, self.model.device)
            self.metrics.prompt_tokens.labels(seq.label).inc(len(seq.prompt_ids))
        self.router.set_rows([s.slot for s in seqs])
        state, logits = kv.prefill(self.model, [s.prompt_ids for s in seqs])
        tokens = select_tokens(logits, [s.request.params for s in seqs], [s.prompt_ids + s.generated for s in seqs],
                               [s.generator for s in seqs])
        self.metrics.step_latency.labels("prefill").observe(time.monotonic() - start)
        return state, tokens

    def _decode_step(self) -> None:
        start = time.monotonic()
        rows = self._running
        self.router.set_rows([s.slot for s in rows])
        logits = kv.decode(self.model, self._state, self._next_ids)
        tokens = select_tokens(logits, [s.request.params for s in rows], [s.prompt_ids + s.generated for s in rows],
                               [s.generator for s in rows])
        self.metrics.step_latency.labels("decode").observe(time.monotonic() - start)
        self.metrics.batch_size.observe(len(rows))
        self._next_ids = [t if isinstance(t, int) else 0 for t in tokens]
        self._accept_all(rows, tokens)
        self._drop_finished()

    def _accept_all(self, seqs: list[_Sequence], tokens: list[int | ServerError]) -> None:
        """Accept each row's token; a row whose sampling or text handling failed ends alone."""
        for seq, token in zip(seqs, tokens):
            if isinstance(token, ServerError):
                log.error("request %s: %s", seq.stream.request_id, token)
                self._end(seq, error=token)
                continue
            try:
                self._accept(seq, token)
            except Exception as exc:  # noqa: BLE001 - ends this row only
                log.exception("request %s: handling its token failed", seq.stream.request_id)
                self._end(seq, error=ServerError(f"output processing failed: {type(exc).__name__}: {exc}"))

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record ``token`` for ``seq``, stream new text, and end the row on EOS / stop (string or token id) /
        length."""
        now = time.monotonic()
        if not seq.generated:
            seq.first_token = now
        if token in seq.stop_ids:  # a stop string that is exactly one (special) token's text
            # Like EOS, a token that ends the request by its id is not part of the output (nor counted in
            # completion_tokens): the same generation reports the same count whether it ended on EOS or on a stop.
            self._emit_text(seq, final=True)
            self._end(seq, reason=FINISH_STOP)
            return
        if token in self.eos_ids:
            self._emit_text(seq, final=True)
            self._end(seq, reason=FINISH_EOS)
            return
        if token in self._hidden_specials:  # remember where it sits, so stop strings can see it
            offset = len(self.tokenizer.decode(seq.generated, skip_special_tokens=True))
            seq.specials.append((len(seq.generated), offset, self._hidden_specials[token]))
        seq.generated.append(token)
        self.metrics.generated_tokens.labels(seq.label).inc()
        if self._emit_text(seq, final=False):
            self._end(seq, reason=FINISH_STOP)
        elif (len(seq.generated) >= seq.request.params.max_new_tokens
              or len(seq.prompt_ids) + len(seq.generated) >= self.max_total_tokens):
            self._emit_text(seq, final=True)
            self._end(seq, reason=FINISH_LENGTH)

    def _emit_text(self, seq: _Sequence, final: bool) -> bool:
        """Stream text not yet sent. Holds back a tail that may be the start of a stop string or an incomplete
        UTF-8 character. Returns True when a stop string appeared (the text is cut before it).

        The returned text omits special tokens (``skip_special_tokens=True``), but stop strings are matched
        against the text with the hidden special tokens' renderings put back where they were generated."""
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        match, spans = _with_specials(text, seq.specials)
        stops = seq.request.params.stop
        hit = min((i for i in (match.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            text, final = text[:_visible_index(hit, spans)], True
        end = len(text)
        if not final:
            mend = len(match)
            if match.endswith("\ufffd"):
                mend -= 1
            for s in stops:  # keep back the longest suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, mend), 0, -1):
                    if match[:mend].endswith(s[:k]):
                        mend -= k
                        break
            end = min(end, _visible_index(mend, spans))
        if end > seq.emitted_chars:
            delta = text[seq.emitted_chars:end]
            seq.emitted_chars = end
            seq.stream._events.put(GenerationEvent(seq.stream.request_id, text=delta,
                                                   token_ids=tuple(seq.generated[seq.emitted_tokens:])))
            seq.emitted_tokens = len(seq.generated)
        return hit >= 0

    def _end(self, seq: _Sequence, reason: str | None = None, error: ServerError | None = None) -> None:
        """Finish ``seq`` once: release its id and slot pin, record metrics and the request log line, and put its
        final event. The final event is put whatever fails here (a failure while finishing is logged, and a
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
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._state = kv.filter_rows(self._state, keep)
            self._running = [self._running[i] for i in keep]
            self._next_ids = [self._next_ids[i] for i in keep]
        self.metrics.running.set(len(self._running))
        self.metrics.component_bytes.labels("kv_cache").set(self._state.nbytes() if self._state else 0)

    def _fail_in_flight(self, error: ServerError) -> None:
        """End every request the failed step touched: the running batch and any request being admitted (out of
        the queue, not yet running). Waiting requests are untouched."""
        self._end_all(error, waiting_too=False)

    def _shutdown(self, error: ServerError) -> None:
        """End every request still in flight (running, waiting, or being admitted) with ``error``."""
        self._end_all(error, waiting_too=True)

    def _end_all(self, error: ServerError, waiting_too: bool) -> None:
        """End the running batch and the requests being admitted with ``error`` — the waiting queue too when
        ``waiting_too`` — and drop the batch's KV cache."""
        with self._lock:
            if waiting_too:
                self._waiting = deque()
            waiting = {id(s) for s in self._waiting}
            touched = [s for s in self._by_id.values() if id(s) not in waiting]
        for seq in [*self._running, *touched]:
            self._end(seq, error=error)
        self._running, self._next_ids, self._state = [], [], None
        self.metrics.running.set(0)
        if waiting_too:
            self.metrics.waiting.set(0)
        self.metrics.component_bytes.labels("kv_cache").set(0)

    def _notify_failure(self) -> None:
        with self._lock:
            listeners, self._failure_listeners = self._failure_listeners, []
        for callback in listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 - every listener gets its call
                log.exception("engine failure listener failed")


def _with_specials(text: str, specials: list[tuple[int, int, str]]) -> tuple[str, list[tuple[int, int, int]]]:
    """``text`` (special tokens skipped) with each hidden special token's rendering put back at its offset.

    Returns ``(match_text, spans)``; each span is ``(start, end, visible_offset)``: where a rendering sits in
    ``match_text`` and the offset in ``text`` it was inserted at."""
    if not specials:
        return text, []
    parts: list[str] = []
    spans: list[tuple[int, int, int]] = []
    prev = length = 0
    for _, offset, shown in specials:
        offset = min(max(offset, prev), len(text))
        parts.append(text[prev:offset])
        length += offset - prev
        spans.append((length, length + len(shown), offset))
        parts.append(shown)
        length += len(shown)
        prev = offset
    parts.append(text[prev:])
    return "".join(parts), spans


def _visible_index(i: int, spans: list[tuple[int, int, int]]) -> int:
    """Map index ``i`` of the match text to the visible text (an index inside a rendering maps to its start)."""
    shift = 0
    for start, end, offset in spans:
        if i <= start:
            break
        if i < end:
            return offset
        shift += end - start
    return i - shift
