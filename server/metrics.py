"""Every Prometheus metric the server exports, declared in one place on a registry owned by the server."""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# LLM latencies span milliseconds (a decode step on a GPU) to minutes (long CPU generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OTHER_ADAPTER = "other"
BASE_ADAPTER = "base"


class Metrics:
    """The server's metrics on their own :class:`CollectorRegistry` (no process-global state, so tests can
    build several servers in one process).

    Label ``adapter`` is bounded: :meth:`adapter_label` maps the first ``top_adapter_labels`` distinct adapter
    ids seen to themselves and every later one to ``"other"``; the base model is ``"base"``.
    """

    def __init__(self, top_adapter_labels: int = 10) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._top = top_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.build_info = Info("qlora_server_build", "Versions, base model and quantization settings.", registry=r)
        # Requests
        self.requests = Counter("qlora_server_requests_total", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_latency = Histogram("qlora_server_request_latency_seconds",
                                         "End-to-end generation latency (arrival to last token).", ["adapter"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qlora_server_time_to_first_token_seconds", "Arrival to first generated token.",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("qlora_server_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", ["adapter"],
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("qlora_server_queue_wait_seconds", "Arrival to start of prefill.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qlora_server_prompt_tokens_total", "Prompt tokens prefilled.", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("qlora_server_generated_tokens_total", "Tokens generated.", ["adapter"],
                                        registry=r)
        self.finished = Counter("qlora_server_generations_total", "Finished generations by finish reason.",
                                ["adapter", "finish_reason"], registry=r)
        # Scheduler
        self.running = Gauge("qlora_server_running_requests", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("qlora_server_waiting_requests", "Requests queued for a batch row.", registry=r)
        self.batch_size = Histogram("qlora_server_batch_size", "Rows per decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step_latency = Histogram("qlora_server_step_seconds", "Duration of one engine step by phase.",
                                      ["phase"], buckets=TOKEN_LATENCY_BUCKETS + (5.0, 10.0), registry=r)
        # Adapter cache
        self.adapter_cache_hits = Counter("qlora_server_adapter_cache_hits_total",
                                          "Adapter lookups served from a tier.", ["tier"], registry=r)
        self.adapter_cache_misses = Counter("qlora_server_adapter_cache_misses_total",
                                            "Adapter lookups that missed a tier.", ["tier"], registry=r)
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
                                  "Accelerator memory by kind (allocated, reserved, peak, total).",
                                  ["device", "kind"], registry=r)
        self.component_bytes = Gauge("qlora_server_component_memory_bytes",
                                     "Bytes held by base-model weights, adapter banks and the KV cache.",
                                     ["component"], registry=r)
        self.process_rss = Gauge("qlora_server_process_resident_memory_bytes", "Resident set size of the server.",
                                 registry=r)
        # Training
        self.training_jobs = Gauge("qlora_server_training_jobs", "Training jobs by state.", ["state"], registry=r)
        self.training_step = Gauge("qlora_server_training_step", "Current step of the running training job.",
                                   registry=r)
        self.training_loss = Gauge("qlora_server_training_loss", "Latest training loss of the running job.",
                                   registry=r)
        self.training_tokens_per_second = Gauge("qlora_server_training_tokens_per_second",
                                                "Training throughput of the running job.", registry=r)

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

    def sample_memory(self) -> None:
        """Refresh memory gauges: every CUDA device's allocated / reserved / peak / total bytes (PyTorch's
        caching allocator), and this process's RSS."""
        import psutil
        import torch

        self.process_rss.set(psutil.Process(os.getpid()).memory_info().rss)
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                self.memory_bytes.labels(dev, "allocated").set(torch.cuda.memory_allocated(i))
                self.memory_bytes.labels(dev, "reserved").set(torch.cuda.memory_reserved(i))
                self.memory_bytes.labels(dev, "peak").set(torch.cuda.max_memory_allocated(i))
                self.memory_bytes.labels(dev, "total").set(torch.cuda.get_device_properties(i).total_memory)
