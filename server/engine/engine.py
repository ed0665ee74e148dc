"""The continuous-batching engine: a queue of requests, one step loop thread, per-row adapters and streaming.

Each loop iteration (1) retires cancelled / timed-out requests, (2) admits waiting requests whose adapter is
in an accelerator slot (a cold adapter loads in the background while others go ahead), prefilling each one and
concatenating it into the running batch, then (3) runs ONE decode forward pass for every running row with each
row routed to its own adapter, samples per row and streams the new text. Finished rows leave the batch before
the next step. Nothing here touches protobuf; the model is anything with the transformers causal-LM call
signature, so tests can drive it with tiny models.
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
from server.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, ServerError
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

    def cancel(self) -> None:
        """Ask the engine to stop this request (idempotent; a finished request is unaffected)."""
        self._engine.cancel(self.request_id)

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
    emitted_chars: int = 0
    emitted_tokens: int = 0
    prefill_start: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
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
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._by_id: dict[str, _Sequence] = {}
        self._running: list[_Sequence] = []
        self._state: kv.BatchState | None = None
        self._next_ids: list[int] = []
        self._ids = itertools.count()
        self._stop = False
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

    # --- public API (any thread) ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop thread."""
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; queued and running requests end with CANCELLED."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate, tokenize and queue ``request``.

        Raises:
            InvalidArgument: bad sampling field, neither or both of prompt / messages, duplicate request id.
            NotFound: ``adapter_id`` is not registered (field ``adapter_id``).
            ResourceExhausted: the queue is full, or the prompt leaves no room to generate.
        """
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
                        label=self.metrics.adapter_label(request.adapter_id))
        with self._lock:
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

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; the loop retires it before its next step."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.cancelled = True
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
        while True:
            with self._lock:
                while not self._stop and not self._running and not self._has_admissible():
                    self._lock.wait(timeout=0.05)
                    self._retire_waiting()
                if self._stop:
                    break
            try:
                self._retire_waiting()
                self._retire_running()
                admitted = self._admit()
                if self._running:
                    self._decode_step()
                elif not admitted:
                    with self._lock:  # only cold adapters are waiting: don't spin while they load
                        self._lock.wait(timeout=0.005)
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed")
                self._fail_running(ServerError(f"engine step failed: {exc}"))
        self._shutdown()

    def _has_admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.config.max_batch_size

    def _expired(self, seq: _Sequence, now: float) -> ServerError | None:
        if seq.cancelled:
            return Cancelled("request cancelled")
        deadline = seq.request.deadline
        if deadline is not None and now > deadline:
            return DeadlineExceeded("deadline exceeded")
        return None

    def _retire_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            for seq in [s for s in self._waiting if self._expired(s, now)]:
                self._waiting.remove(seq)
                self._end(seq, error=self._expired(seq, now))
            self.metrics.waiting.set(len(self._waiting))

    def _retire_running(self) -> None:
        now = time.monotonic()
        gone = [i for i, s in enumerate(self._running) if self._expired(s, now)]
        for i in gone:
            seq = self._running[i]
            self._end(seq, error=self._expired(seq, now))
        if gone:
            self._drop_finished()

    def _admit(self) -> int:
        """Prefill, in one forward pass, up to ``prefill_chunk`` waiting requests whose adapter is resident,
        oldest first, and join them to the running batch. Returns how many were admitted."""
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
                except ServerError as exc:
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
            self._prefill(chosen)
        except Exception:
            for seq in chosen:
                if not seq.done and seq not in self._running and seq.slot >= 0:
                    self.cache.release(seq.slot)
                    seq.slot = -1
            raise
        return len(chosen)

    def _prefill(self, seqs: list[_Sequence]) -> None:
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
        self._state = kv.concatenate(self._state, state)
        self._running.extend(seqs)
        self._next_ids.extend(tokens)
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token)
        self._drop_finished()

    def _decode_step(self) -> None:
        start = time.monotonic()
        rows = self._running
        self.router.set_rows([s.slot for s in rows])
        logits = kv.decode(self.model, self._state, self._next_ids)
        tokens = select_tokens(logits, [s.request.params for s in rows], [s.prompt_ids + s.generated for s in rows],
                               [s.generator for s in rows])
        self.metrics.step_latency.labels("decode").observe(time.monotonic() - start)
        self.metrics.batch_size.observe(len(rows))
        self._next_ids = tokens
        for seq, token in zip(rows, tokens):
            self._accept(seq, token)
        self._drop_finished()

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record ``token`` for ``seq``, stream new text, and end the row on EOS / stop string / length."""
        now = time.monotonic()
        if not seq.generated:
            seq.first_token = now
        if token in self.eos_ids:
            self._emit_text(seq, final=True)
            self._end(seq, reason=FINISH_EOS)
            return
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
        UTF-8 character. Returns True when a stop string appeared (the text is cut before it)."""
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        stops = seq.request.params.stop
        hit = min((i for i in (text.find(s, max(0, seq.emitted_chars - len(s))) for s in stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            text, final = text[:hit], True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            for s in stops:  # keep back the longest suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end > seq.emitted_chars:
            delta = text[seq.emitted_chars:end]
            seq.emitted_chars = end
            seq.stream._events.put(GenerationEvent(seq.stream.request_id, text=delta,
                                                   token_ids=tuple(seq.generated[seq.emitted_tokens:])))
            seq.emitted_tokens = len(seq.generated)
        return hit >= 0

    def _end(self, seq: _Sequence, reason: str | None = None, error: ServerError | None = None) -> None:
        """Finish ``seq`` once: final event, metrics, slot released. The caller drops it from the batch."""
        if seq.done:
            return
        seq.done = True
        now = time.monotonic()
        with self._lock:
            self._by_id.pop(seq.stream.request_id, None)
        if seq.slot >= 0:
            self.cache.release(seq.slot)
        if error is not None:
            self.metrics.finished.labels(seq.label, "error").inc()
            self.request_log.finished(
                seq.request, seq.stream.request_id, status=error.code, finish_reason=None,
                prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.generated),
                queue_seconds=max(0.0, (seq.prefill_start or now) - seq.arrival),
                ttft_seconds=(seq.first_token - seq.arrival) if seq.first_token else None, tpot_seconds=None,
                total_seconds=now - seq.arrival, error=str(error))
            seq.stream._events.put(GenerationEvent(seq.stream.request_id, finished=True, error=error))
            return
        n = len(seq.generated)
        ttft = (seq.first_token or now) - seq.arrival
        tpot = (now - seq.first_token) / (n - 1) if n > 1 else 0.0
        timings = Timings(queue_seconds=max(0.0, seq.prefill_start - seq.arrival), ttft_seconds=ttft,
                          total_seconds=now - seq.arrival, tpot_seconds=tpot)
        self.metrics.request_latency.labels(seq.label).observe(timings.total_seconds)
        self.metrics.ttft.labels(seq.label).observe(ttft)
        if n > 1:
            self.metrics.tpot.labels(seq.label).observe(tpot)
        self.metrics.finished.labels(seq.label, reason).inc()
        self.request_log.finished(seq.request, seq.stream.request_id, status="OK", finish_reason=reason,
                                  prompt_tokens=len(seq.prompt_ids), completion_tokens=n,
                                  queue_seconds=timings.queue_seconds, ttft_seconds=ttft,
                                  tpot_seconds=tpot if n > 1 else None, total_seconds=timings.total_seconds)
        seq.stream._events.put(GenerationEvent(seq.stream.request_id, finished=True, finish_reason=reason,
                                               token_ids=tuple(seq.generated[seq.emitted_tokens:]),
                                               prompt_tokens=len(seq.prompt_ids), completion_tokens=n,
                                               timings=timings))

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._state = kv.filter_rows(self._state, keep)
            self._running = [self._running[i] for i in keep]
            self._next_ids = [self._next_ids[i] for i in keep]
        self.metrics.running.set(len(self._running))
        self.metrics.component_bytes.labels("kv_cache").set(self._state.nbytes() if self._state else 0)

    def _fail_running(self, error: ServerError) -> None:
        for seq in self._running:
            self._end(seq, error=error)
        self._running, self._next_ids, self._state = [], [], None
        self.metrics.running.set(0)

    def _shutdown(self) -> None:
        self._fail_running(Cancelled("server shutting down"))
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            self._end(seq, error=Cancelled("server shutting down"))
