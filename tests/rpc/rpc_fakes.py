"""Fakes of the App, engine, adapter store and cache that the RPC tests serve over real gRPC."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from server.adapters.types import AdapterInfo
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.engine.types import (FINISH_LENGTH, GenerationEvent, GenerationRequest, Timings, TokenLogprob,
                                 TopLogprob)
from server.errors import (AlreadyExists, Cancelled, DeadlineExceeded, InvalidArgument, NotFound,
                           ResourceExhausted)
from server.metrics import Metrics

ADAPTER_CONFIG = {"base_model_name_or_path": "fake/base", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                  "peft_type": "LORA"}
SAFETENSORS_MAGIC = b"FAKE-SAFETENSORS"

# Prompts that make the fake engine misbehave in a given way.
PROMPT_EXHAUST = "exhaust"      # submit raises ResourceExhausted
PROMPT_BLOCK = "block"          # the stream blocks until cancelled, then ends with Cancelled
PROMPT_DEADLINE = "deadline"    # one text event, then an event with DeadlineExceeded
PROMPT_CRASH = "crash"          # an event with an unexpected exception
SECRET = "secret-internal-detail"


def wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout_s`` seconds (a bounded wait
    for liveness, never a timing assertion)."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_adapter_dir(path: Path, config: dict | None = None, weights: bytes = SAFETENSORS_MAGIC + b"\0" * 16) -> Path:
    """A minimal adapter directory the fake store accepts."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or ADAPTER_CONFIG))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


class FakeStream:
    """Iterates canned events; ``cancel`` is recorded (and unblocks a blocking stream)."""

    def __init__(self, request: GenerationRequest, events: list[GenerationEvent], block: bool = False) -> None:
        self.request_id = request.request_id
        self._events = events
        self._block = block
        self.cancelled = threading.Event()
        self.cancel_error = None

    def __iter__(self):
        if self._block:
            self.cancelled.wait(60)
            yield GenerationEvent(request_id=self.request_id, error=Cancelled("cancelled by the client"))
            return
        yield from self._events

    def cancel(self, error=None) -> None:
        if not self.cancelled.is_set():
            self.cancel_error = error
        self.cancelled.set()


class FakeEngine:
    """Echoes the prompt (or the rendered messages) back word by word."""

    def __init__(self, store: "FakeStore") -> None:
        self._store = store
        self.submitted: list[GenerationRequest] = []
        self.streams: list[FakeStream] = []
        self.stream_started = threading.Event()

    def submit(self, request: GenerationRequest) -> FakeStream:
        request.params.validate(64)
        if request.adapter_id and request.adapter_id not in self._store.adapters:
            raise NotFound(f"adapter {request.adapter_id!r} is not registered", field="adapter_id")
        if request.prompt == PROMPT_EXHAUST:
            raise ResourceExhausted("the queue is full")
        self.submitted.append(request)
        rid = request.request_id
        if request.prompt == PROMPT_BLOCK:
            stream = FakeStream(request, [], block=True)
        elif request.prompt == PROMPT_DEADLINE:
            stream = FakeStream(request, [GenerationEvent(rid, text="partial"),
                                          GenerationEvent(rid, error=DeadlineExceeded("the deadline passed"))])
        elif request.prompt == PROMPT_CRASH:
            stream = FakeStream(request, [GenerationEvent(rid, error=RuntimeError(SECRET))])
        else:
            text = request.prompt if request.prompt is not None else " ".join(
                f"{m.role}: {m.content}" for m in request.messages)
            words = text.split(" ")
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            # with logprobs asked: token i has log-probability -i/8 and top alternatives (i, -i/8), (100, -3.0)...
            def lps(i):
                if not request.params.wants_logprobs:
                    return ()
                alternatives = [(i, -i / 8), (100, -3.0)][:request.params.top_logprobs]
                top = tuple(TopLogprob(t, f"t{t}", v) for t, v in alternatives)
                return (TokenLogprob(i, pieces[i], -i / 8, top),)
            events = [GenerationEvent(rid, text=p, token_ids=(i,), logprobs=lps(i))
                      for i, p in enumerate(pieces[:-1])]
            k = request.params.prompt_logprobs
            if k is not None and len(pieces) > 1:
                # the prompt's words are its tokens: word i (i >= 1) has log-probability -i/4 and top alternatives
                # (i, -i/4), (200, -4.0)...; a first event of their own, as the real engine's
                def prompt_lp(i):
                    top = tuple(TopLogprob(t, f"p{t}", v) for t, v in [(i, -i / 4), (200, -4.0)][:k])
                    return TokenLogprob(i, pieces[i], -i / 4, top)
                prompt_lps = tuple(prompt_lp(i) for i in range(1, len(pieces)))
                events.insert(0, GenerationEvent(rid, prompt_logprobs=prompt_lps))
            events.append(GenerationEvent(rid, text=pieces[-1], token_ids=(len(pieces) - 1,), finished=True,
                                          logprobs=lps(len(pieces) - 1),
                                          finish_reason=FINISH_LENGTH, prompt_tokens=len(words),
                                          completion_tokens=len(words),
                                          timings=Timings(0.25, 0.5, 1.5, 0.125)))
            stream = FakeStream(request, events)
        self.streams.append(stream)
        self.stream_started.set()
        return stream

    def cancel(self, request_id: str) -> None:
        for s in self.streams:
            if s.request_id == request_id:
                s.cancel()


class FakeStore:
    """Adapters in a dict; validation is a JSON parse of the config and a magic prefix on the weights."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.adapters: dict[str, AdapterInfo] = {}

    def _validate(self, adapter_id: str, directory: Path, replace: bool) -> AdapterInfo:
        if not adapter_id:
            raise InvalidArgument("must be non-empty", field="adapter_id")
        if adapter_id in self.adapters and not replace:
            raise AlreadyExists(f"adapter {adapter_id!r} exists", field="adapter_id")
        if not directory.is_dir():
            raise NotFound(f"{directory} is not a directory", field="path")
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"unreadable: {exc}", field="adapter_config.json") from None
        weights = (directory / "adapter_model.safetensors").read_bytes()
        if not weights.startswith(SAFETENSORS_MAGIC):
            raise InvalidArgument("not a safetensors file", field="adapter_model.safetensors")
        return AdapterInfo(adapter_id=adapter_id, base_model=config["base_model_name_or_path"], rank=config["r"],
                           lora_alpha=float(config["lora_alpha"]), target_modules=tuple(config["target_modules"]),
                           module_count=30, use_rslora=False, size_bytes=len(weights), sha256="ab" * 32,
                           path=str(self.root / adapter_id), registered_at=time.time(), ranks={"v_proj": 4},
                           alphas={"v_proj": 8.0})

    def register(self, adapter_id: str, source_dir: Path, replace: bool) -> AdapterInfo:
        info = self._validate(adapter_id, source_dir, replace)
        shutil.copytree(source_dir, self.root / adapter_id, dirs_exist_ok=True)
        self.adapters[adapter_id] = info
        return info

    def register_files(self, adapter_id: str, staged_dir: Path, replace: bool) -> AdapterInfo:
        info = self._validate(adapter_id, staged_dir, replace)
        shutil.rmtree(self.root / adapter_id, ignore_errors=True)
        staged_dir.rename(self.root / adapter_id)  # like the real store: moves the staged directory
        self.adapters[adapter_id] = info
        return info

    def unregister(self, adapter_id: str) -> None:
        if self.adapters.pop(adapter_id, None) is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered", field="adapter_id")

    def get(self, adapter_id: str) -> AdapterInfo:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise NotFound(f"adapter {adapter_id!r} is not registered", field="adapter_id") from None

    def list(self) -> list[AdapterInfo]:
        return list(self.adapters.values())


class FakeAdapterCache:
    """Adapters whose id starts with ``hot`` are on the GPU, all others on disk."""

    def residency(self, adapter_id: str) -> str:
        return "gpu" if adapter_id.startswith("hot") else "disk"


class FakeApp:
    """What ``server.app.App`` exposes to the RPC layer."""

    def __init__(self, root: Path, max_upload_bytes: int = 64 * 1024, **config_changes) -> None:
        self.config = ServerConfig(engine=EngineConfig(max_new_tokens=64), max_upload_bytes=max_upload_bytes,
                                   grpc_workers=8, adapters_dir=root, **config_changes)
        self.store = FakeStore(root)
        self.engine = FakeEngine(self.store)
        self.adapter_cache = FakeAdapterCache()
        self.metrics = Metrics()
        self.base_info = SimpleNamespace(name="fake/base", device="cpu")
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeWatch:
    """The events of a watched job, already complete (a real ``JobWatch`` blocks for new ones)."""

    def __init__(self, events: list) -> None:
        self._events = events

    def __iter__(self):
        yield from self._events

    def close(self) -> None:
        pass


class FakeTrainingManager:
    """Jobs in a dict, validated as the real manager validates them (``build_train_config``); nothing trains. A
    watched job runs to ``succeeded`` at once."""

    def __init__(self) -> None:
        self.jobs: dict = {}
        self.requests: list = []

    def create(self, request):
        from server.training.jobs import Job
        from server.training.manager import build_train_config

        build_train_config(request, ModelConfig(), Path("/nonexistent/job"))  # raises InvalidArgument config.<x>
        self.requests.append(request)
        job = Job(job_id=f"job-{len(self.jobs):016x}", state="queued", adapter_id=request.adapter_id,
                  created_at=1.0, output_dir="/srv/jobs/x")
        self.jobs[job.job_id] = job
        return job

    def get(self, job_id: str):
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"no training job {job_id!r}", field="job_id") from None

    def list(self) -> list:
        return list(reversed(self.jobs.values()))

    def cancel(self, job_id: str):
        import dataclasses

        job = self.jobs[job_id] = dataclasses.replace(self.get(job_id), state="cancelled", finished_at=2.0)
        return job

    def watch(self, job_id: str) -> FakeWatch:
        import dataclasses

        from server.training.jobs import JobEvent

        job = self.get(job_id)
        done = dataclasses.replace(job, state="succeeded", step=3, total_steps=3, loss=0.5, finished_at=3.0)
        return FakeWatch([JobEvent(job, f"job is {job.state}"), JobEvent(done, "job succeeded")])


@contextmanager
def serving(app: "FakeApp"):
    """``serve(app.config)`` in a thread with ``app`` as the built app; yields ``(grpc target, announce line)``
    (the line says where metrics and the HTTP API listen); stops it on exit and checks it exited 0."""
    from server.cli import serve

    stop, ready, lines, result = threading.Event(), threading.Event(), [], {}

    def run():
        try:
            result["code"] = serve(app.config, stop, grace_seconds=0, app_factory=lambda config, metrics: app,
                                   announce=lines.append)
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while not lines and not ready.wait(0.05):
            pass
        assert lines, f"serve did not start: {result}"
        port = re.search(r"listening on \S+?:(\d+) ", lines[0]).group(1)
        yield f"127.0.0.1:{port}", lines[0]
    finally:
        stop.set()
        thread.join(30)
    assert result.get("code") == 0
