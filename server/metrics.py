"""Every Prometheus metric the server exports, declared in one place on a registry owned by the server."""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import PlatformCollector, ProcessCollector

#: Buckets (seconds) of end-to-end latency, time to first token and queue wait: LLM latencies span milliseconds
#: (a decode step on a GPU) to minutes (long CPU generations or a deep queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Buckets (seconds) of per-token and per-step durations: ~1 ms (tiny models, big GPUs) to seconds (CPU).
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
#: Buckets (seconds) of adapter loads (disk → host, host → accelerator slot).
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Buckets (rows) of the decode batch size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

#: ``adapter`` label value of adapters beyond the first ``top_adapter_labels`` distinct ones.
OTHER_ADAPTER = "other"
#: ``adapter`` label value of requests served by the base model alone.
BASE_ADAPTER = "base"
#: ``tier`` label values of the adapter cache: accelerator slots (``gpu``; the CPU when that is the device) and
#: host memory (``cpu``).
TIERS = ("gpu", "cpu")
#: ``phase`` label values of :attr:`Metrics.step_latency`.
PHASES = ("prefill", "decode")
#: ``component`` label values of :attr:`Metrics.component_bytes`.
COMPONENTS = ("base_weights", "adapter_banks", "adapter_host_cache", "kv_cache")
#: ``kind`` label values of :attr:`Metrics.memory_bytes`.
MEMORY_KINDS = ("allocated", "reserved", "peak", "total")
#: ``kind`` label values of :attr:`Metrics.training_memory_bytes`.
TRAINING_MEMORY_KINDS = ("budget", "estimate", "current", "peak")


class Metrics:
    """The server's metrics on their own :class:`CollectorRegistry` (no process-global state, so tests can
    build several servers in one process). The registry also carries ``prometheus_client``'s process collector
    (``process_resident_memory_bytes``, ``process_cpu_seconds_total``, …) and platform collector
    (``python_info``).

    Label ``adapter`` is bounded: :meth:`adapter_label` maps the first ``top_adapter_labels`` distinct adapter
    ids that receive a request to themselves and every later one to ``"other"``; the base model is ``"base"``.
    Labels are sticky (an adapter never changes label value), so at most ``top_adapter_labels + 2`` values exist.
    ``top_adapter_labels=0`` turns per-adapter labels off (every adapter is ``"other"``).

    Label values that are known up front (cache tiers, step phases, memory components) are created at zero, so
    rates and ratios over them exist before the first event.
    """

    def __init__(self, top_adapter_labels: int = 10) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._top = top_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info("qlora_server_build", "Versions, base model and quantization settings.", registry=r)
        # Requests
        self.requests = Counter("qlora_server_requests_total", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_latency = Histogram("qlora_server_request_latency_seconds",
                                         "End-to-end latency of a finished generation: arrival to last token.",
                                         ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qlora_server_time_to_first_token_seconds",
                              "Arrival to first generated token, per finished generation.", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("qlora_server_time_per_output_token_seconds",
                              "Mean time per output token after the first, per finished generation of 2+ tokens.",
                              ["adapter"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("qlora_server_queue_wait_seconds", "Arrival to start of prefill.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qlora_server_prompt_tokens_total", "Prompt tokens prefilled.", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("qlora_server_generated_tokens_total", "Tokens generated.", ["adapter"],
                                        registry=r)
        self.finished = Counter("qlora_server_generations_total",
                                "Finished generations by finish reason (stop, length, eos, error).",
                                ["adapter", "finish_reason"], registry=r)
        # Scheduler
        self.running = Gauge("qlora_server_running_requests", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("qlora_server_waiting_requests", "Requests queued for a batch row.", registry=r)
        self.batch_size = Histogram("qlora_server_batch_size", "Rows per decode step.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_latency = Histogram("qlora_server_step_seconds", "Duration of one engine step by phase.",
                                      ["phase"], buckets=TOKEN_LATENCY_BUCKETS + (5.0, 10.0), registry=r)
        # Adapter cache
        self.adapter_cache_hits = Counter("qlora_server_adapter_cache_hits_total",
                                          "Adapter lookups served from a tier.", ["tier"], registry=r)
        self.adapter_cache_misses = Counter("qlora_server_adapter_cache_misses_total",
                                            "Adapter lookups that missed a tier (counted once per lookup).",
                                            ["tier"], registry=r)
        self.adapter_loads = Counter("qlora_server_adapter_loads_total", "Adapters loaded into a tier.", ["tier"],
                                     registry=r)
        self.adapter_evictions = Counter("qlora_server_adapter_evictions_total", "Adapters evicted from a tier.",
                                         ["tier"], registry=r)
        self.adapter_load_latency = Histogram("qlora_server_adapter_load_seconds",
                                              "Time to load an adapter into a tier.", ["tier"],
                                              buckets=LOAD_BUCKETS, registry=r)
        self.adapters_resident = Gauge("qlora_server_adapters_resident", "Adapters resident per tier.", ["tier"],
                                       registry=r)
        self.adapters_registered = Gauge("qlora_server_adapters_registered", "Adapters in the store.", registry=r)
        self.adapter_slot_capacity = Gauge("qlora_server_adapter_slots", "Accelerator adapter slots.", registry=r)
        # Memory
        self.memory_bytes = Gauge("qlora_server_accelerator_memory_bytes",
                                  "Accelerator memory by device and kind (allocated, reserved, peak, total); "
                                  "device cpu when the model runs on the CPU.",
                                  ["device", "kind"], registry=r)
        self.component_bytes = Gauge("qlora_server_component_memory_bytes",
                                     "Bytes held by base-model weights, adapter banks (accelerator slots), the "
                                     "host adapter cache and the KV cache.",
                                     ["component"], registry=r)
        self.kv_cache_blocks = Gauge("qlora_server_kv_cache_blocks",
                                     "Blocks of the paged KV cache held by requests (used) and free.", ["state"],
                                     registry=r)
        self.startup_seconds = Gauge("qlora_server_startup_seconds",
                                     "Start-up wall time by phase: load (weights + quantization), capture (CUDA "
                                     "graphs and their self-check).", ["phase"], registry=r)
        # Training
        self.training_jobs = Gauge("qlora_server_training_jobs", "Training jobs by state.", ["state"], registry=r)
        self.training_step = Gauge("qlora_server_training_step",
                                   "Optimizer steps done by the running (or last) training job.", ["job_id"],
                                   registry=r)
        self.training_loss = Gauge("qlora_server_training_loss",
                                   "Latest training loss (nats) of the running (or last) job; absent before its "
                                   "first step.", ["job_id"], registry=r)
        self.training_tokens_per_second = Gauge("qlora_server_training_tokens_per_second",
                                                "Training throughput of the running job (tokens per second); 0 "
                                                "once it ended, absent before its first step.", ["job_id"],
                                                registry=r)
        self.training_memory_bytes = Gauge("qlora_server_training_memory_bytes",
                                           "Memory of the running (or last) training job by kind: budget, estimate "
                                           "(its estimated peak), current and peak use (the worker's resident "
                                           "memory on a CPU, its CUDA allocator's bytes on a GPU).",
                                           ["job_id", "kind"], registry=r)
        self.training_threads = Gauge("qlora_server_training_threads",
                                      "CPU threads of the running (or last) training job's worker (torch intra-op "
                                      "threads), as the worker reported them.", ["job_id"], registry=r)
        self._training_job: str | None = None  # the job whose training series exist
        self._training_throughput: set[str] = set()  # jobs with a tokens/s series
        for tier in TIERS:
            for family in (self.adapter_cache_hits, self.adapter_cache_misses, self.adapter_loads,
                           self.adapter_evictions, self.adapter_load_latency, self.adapters_resident):
                family.labels(tier)
        for phase in PHASES:
            self.step_latency.labels(phase)
        for component in COMPONENTS:
            self.component_bytes.labels(component)

    def adapter_label(self, adapter_id: str) -> str:
        """Bounded label value for ``adapter_id`` (see class docstring)."""
        if not adapter_id:
            return BASE_ADAPTER
        with self._lock:
            if adapter_id in self._labels:
                return adapter_id
            if len(self._labels) < self._top:
                self._labels.add(adapter_id)
                return adapter_id
        return OTHER_ADAPTER

    def training_job_started(self, job_id: str) -> None:
        """A training job started: drop the previous job's ``training_step`` / ``_loss`` / ``_tokens_per_second``
        series and start this one's at step 0. Its loss and throughput have no sample until its first step."""
        with self._lock:
            previous, self._training_job = self._training_job, job_id
            self._training_throughput.clear()
        if previous is not None:
            for gauge in (self.training_step, self.training_loss, self.training_tokens_per_second):
                try:
                    gauge.remove(previous)
                except KeyError:
                    pass
            for labels in [(previous,)] + [(previous, kind) for kind in TRAINING_MEMORY_KINDS]:
                try:
                    (self.training_threads if len(labels) == 1 else self.training_memory_bytes).remove(*labels)
                except KeyError:
                    pass
        self.training_step.labels(job_id).set(0)

    def training_job_progress(self, job_id: str, step: int | None = None, loss: float | None = None,
                              tokens_per_second: float | None = None) -> None:
        """Record the running job's progress (steps, loss in nats, tokens per second); None leaves a value as it
        is."""
        if step is not None:
            self.training_step.labels(job_id).set(step)
        if loss is not None:
            self.training_loss.labels(job_id).set(loss)
        if tokens_per_second is not None:
            with self._lock:
                self._training_throughput.add(job_id)
            self.training_tokens_per_second.labels(job_id).set(tokens_per_second)

    def training_job_memory(self, job_id: str, **kinds: float | None) -> None:
        """Record the job's memory (bytes) by kind (``budget``, ``estimate``, ``current``, ``peak``: keyword
        arguments); None leaves a value as it is. Raises ValueError for another kind."""
        for kind, value in kinds.items():
            if kind not in TRAINING_MEMORY_KINDS:
                raise ValueError(f"unknown training memory kind {kind!r}")
            if value is not None:
                self.training_memory_bytes.labels(job_id, kind).set(value)

    def training_job_threads(self, job_id: str, threads: int) -> None:
        """Record the CPU threads the job's worker runs with."""
        self.training_threads.labels(job_id).set(threads)

    def training_job_ended(self, job_id: str) -> None:
        """A training job ended (any way): its step and loss series stay, labelled with its id, until the next job
        starts; its throughput drops to 0 (if it had one)."""
        with self._lock:
            had_throughput = job_id in self._training_throughput
        if had_throughput:
            self.training_tokens_per_second.labels(job_id).set(0)

    def sample_memory(self, device: str = "cuda") -> None:
        """Refresh :attr:`memory_bytes` for the device type the model runs on (``device``: ``"cuda"``,
        ``"cuda:N"`` or ``"cpu"``; a ``torch.device`` works too).

        On CUDA: every visible device's allocated / reserved / peak-allocated bytes (PyTorch's caching allocator)
        and total bytes. On the CPU (the "accelerator" of a CPU-only server): ``device="cpu"`` with allocated =
        reserved = this process's resident set size, peak = its peak resident set size, total = the machine's
        physical memory (bytes)."""
        import torch

        if str(device).startswith("cuda"):
            if not torch.cuda.is_available():
                return
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                self.memory_bytes.labels(dev, "allocated").set(torch.cuda.memory_allocated(i))
                self.memory_bytes.labels(dev, "reserved").set(torch.cuda.memory_reserved(i))
                self.memory_bytes.labels(dev, "peak").set(torch.cuda.max_memory_allocated(i))
                self.memory_bytes.labels(dev, "total").set(torch.cuda.get_device_properties(i).total_memory)
            return
        import resource

        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        self.memory_bytes.labels("cpu", "allocated").set(rss)
        self.memory_bytes.labels("cpu", "reserved").set(rss)
        self.memory_bytes.labels("cpu", "peak").set(max(peak, rss))
        self.memory_bytes.labels("cpu", "total").set(psutil.virtual_memory().total)
