"""Memory and CPU-thread budgets of a training job: a pure peak-memory estimate, the budget rules, the checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from server.config import usable_cpus
from server.errors import FailedPrecondition

#: Share of the memory free on the training device (CPU: ``MemAvailable``; CUDA: ``cudaMemGetInfo`` free bytes,
#: i.e. what serving has not taken) that a job may use when ``--training-memory-bytes`` is 0 (auto).
AUTO_MEMORY_FRACTION = 0.5
#: Resident memory of a CPU worker before any tensor of the job exists (bytes): the Python interpreter with torch,
#: transformers, peft, bitsandbytes and accelerate imported and the Trainer built. Measured as the worker's
#: peak RSS on a 2-layer, 64-wide, vocab-256 model, batch 2 × 32 tokens: 503 MiB (``bench/RESULTS.md``,
#: "Training memory estimate"; 507 MiB again from the worker's own ``VmHWM``). A server's job worker peaked at
#: 649 MiB on a job of the same size (tests/training/test_budget.py's served job, 2026-11-30: it also maps the
#: shared base and imports the server's code), so 768 MiB.
CPU_RUNTIME_BYTES = 768 * 2**20
#: On CUDA the budget caps the worker's caching allocator, which holds no runtime: the CUDA context lives outside.
CUDA_RUNTIME_BYTES = 0
#: Safety factor on activations and logits for allocator rounding, fragmentation and short-lived temporaries.
TEMPORARIES_FACTOR = 1.25
#: ``niceness`` a worker runs at by default: CFS gives a nice-0 thread ~9× the CPU time of a nice-10 one
#: (kernel/sched/core.c ``sched_prio_to_weight``: 1024 vs 110), so serving wins a contended core.
DEFAULT_NICE = 10
#: bitsandbytes keeps 32-bit state for tensors smaller than this even with an 8-bit optimizer (``min_8bit_size``
#: of ``bitsandbytes.optim.Optimizer8bit``'s default, 4096 elements).
BNB_MIN_8BIT_SIZE = 4096
#: Module names of a Llama-style decoder block and which dimension (``h``: hidden, ``i``: intermediate, ``q``:
#: heads × head_dim, ``kv``: KV heads × head_dim) goes in and out of each.
_BLOCK_LINEARS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
                  "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The base model's dimensions the estimate needs (from its ``transformers`` config).

    Attributes:
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size: as in
            ``LlamaConfig`` (``head_dim`` defaults to hidden_size / num_heads there).
        compute_bytes: bytes per element of the compute dtype (4 float32, 2 bfloat16/float16).
        weight_bytes: the resident NF4 base's bytes (packed 4-bit weights, absmax, unquantized embeddings and norms;
            ``server.model.base.BaseModelInfo.weight_bytes``).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    compute_bytes: int = 4
    weight_bytes: int = 0

    @classmethod
    def from_hf_config(cls, config, compute_dtype: str, weight_bytes: int) -> "ModelShape":
        """From a ``transformers`` ``PretrainedConfig`` (Llama-style fields), a compute dtype name (``"float32"``,
        ``"bfloat16"``, ``"float16"``) and the resident weights' bytes."""
        heads = int(config.num_attention_heads)
        return cls(hidden_size=int(config.hidden_size), intermediate_size=int(config.intermediate_size),
                   num_layers=int(config.num_hidden_layers), num_heads=heads,
                   num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   vocab_size=int(config.vocab_size), compute_bytes=_DTYPE_BYTES.get(str(compute_dtype), 4),
                   weight_bytes=int(weight_bytes))

    def dim(self, name: str) -> int:
        """Size of dimension ``name`` (``h``, ``i``, ``q``, ``kv``; see ``_BLOCK_LINEARS``)."""
        return {"h": self.hidden_size, "i": self.intermediate_size, "q": self.num_heads * self.head_dim,
                "kv": self.num_kv_heads * self.head_dim}[name]


@dataclass(frozen=True)
class MemoryEstimate:
    """A job's estimated peak memory (bytes) and its parts; ``total`` is the sum of ``parts``."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _targets(target_modules) -> list[str]:
    """Block module names a ``TrainConfig.target_modules`` value adapts (None = all; a regex string is matched
    against each name's ``.<name>`` suffix)."""
    import re

    if target_modules is None:
        return list(_BLOCK_LINEARS)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [m for m in _BLOCK_LINEARS if pattern.fullmatch(f"model.layers.0.self_attn.{m}")
                or pattern.fullmatch(f"model.layers.0.mlp.{m}")]
    return [m for m in _BLOCK_LINEARS if any(t == m or t.endswith("." + m) for t in target_modules)]


def estimate_peak_bytes(config, shape: ModelShape, *, base_weight_bytes: int | None = None,
                        runtime_bytes: int = CPU_RUNTIME_BYTES) -> MemoryEstimate:
    """Estimate the peak memory (bytes) of training ``config`` (a ``trainer.config.TrainConfig``) on a base of
    ``shape``, for the worst batch: ``batch_size`` examples all ``max_seq_length`` tokens long (the collator pads
    to the longest example, so shorter data needs less). Pure: no tensors, no device queries.

    With b = batch_size, s = max_seq_length, T = b·s tokens, d = compute bytes, L layers, h hidden, i intermediate,
    a heads, V vocab, P_m = r·(in_m + out_m) LoRA parameters of module m:

    * ``base_weights``: ``base_weight_bytes`` (default ``shape.weight_bytes``; 0 when the job shares the server's
      resident base).
    * ``lora``: float32 LoRA weights + gradients, 8 bytes per parameter (PEFT keeps adapters in float32).
    * ``optimizer``: AdamW keeps two moments per parameter (Loshchilov & Hutter, arXiv:1711.05101):
      ``paged_adamw_32bit`` 8 bytes per parameter; ``paged_adamw_8bit`` 2 bytes (Dettmers et al., 8-bit
      optimizers, arXiv:2110.02861) except tensors under ``BNB_MIN_8BIT_SIZE`` elements, which stay 32-bit.
    * ``activations``: what autograd saves per decoder block, counted from the Llama forward (transformers
      ``modeling_llama``; bitsandbytes' ``MatMul4Bit`` saves its input): two RMSNorms (float32 input and
      normalised copy, 2·4·h per token each), the two normalised inputs, q, repeated k and v, the attention
      output and o_proj's input (7·h·d), the SwiGLU's gate, SiLU, up and product (4·i·d); the attention
      probabilities b·a·s²·4 (SDPA's math path; the fused kernels need less) — with ``packing`` the b examples
      are one row of T tokens under a block-diagonal mask, so a·T²·4; per adapted module its float32
      input copy (T·in·4, unless compute is float32 and lora_dropout is 0: then it is the base's input) plus a
      dropout mask (T·in bytes when lora_dropout > 0) and the A output (T·r·4). Without
      ``gradient_checkpointing``: (L + 1) blocks (the +1: the gradients of the block in backward). With it:
      the L block inputs (T·h·d each; Korthikanti et al., arXiv:2205.05198, section 4.2) plus 2 blocks (the one
      recomputed and its gradients). Times ``TEMPORARIES_FACTOR``.
    * ``logits``: lm_head output (T·V·d), its float32 up-cast for the loss, the log-softmax the cross-entropy
      saves, and the float32 gradient in backward: T·V·(d + 12), times ``TEMPORARIES_FACTOR``.
    * ``runtime``: ``runtime_bytes`` (``CPU_RUNTIME_BYTES`` for a CPU worker's RSS, ``CUDA_RUNTIME_BYTES`` for a
      CUDA allocator).

    Bounds (stated, and checked by tests/training/test_budget.py against a worker's measured peak RSS on the
    CPU): for full-length batches the measured peak lies between half the estimate and the estimate.

    Args:
        config: the job's ``TrainConfig`` (r, target_modules, lora_dropout, batch_size, max_seq_length,
            gradient_checkpointing, optim).
        shape: the base model's dimensions.
        base_weight_bytes: bytes of the base weights the worker holds; None = ``shape.weight_bytes``.
        runtime_bytes: fixed bytes of the worker's runtime.
    Returns:
        a :class:`MemoryEstimate` with parts ``base_weights``, ``lora``, ``optimizer``, ``activations``,
        ``logits``, ``runtime`` (bytes).
    """
    b, s, d = int(config.batch_size), int(config.max_seq_length), shape.compute_bytes
    tokens, r, h, i = b * s, int(config.r), shape.hidden_size, shape.intermediate_size
    targets = _targets(config.target_modules)
    lora_tensors = [r * shape.dim(_BLOCK_LINEARS[m][0]) for m in targets] + \
                   [r * shape.dim(_BLOCK_LINEARS[m][1]) for m in targets]  # A is r×in, B is out×r, per layer
    params = shape.num_layers * sum(lora_tensors)
    if str(config.optim).endswith("8bit"):
        optimizer = shape.num_layers * sum(2 * n if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in lora_tensors)
    else:
        optimizer = 8 * params
    dropout = float(config.lora_dropout) > 0
    lora_act = 0
    for m in targets:
        width = shape.dim(_BLOCK_LINEARS[m][0])
        lora_act += tokens * r * 4
        if dropout or d != 4:
            lora_act += tokens * width * 4
        if dropout:
            lora_act += tokens * width
    # Packed batches are one row of b·s tokens: SDPA with the block-diagonal mask still forms all T² scores.
    attention = shape.num_heads * (tokens * tokens if getattr(config, "packing", False) else b * s * s) * 4
    block = (tokens * (2 * 2 * 4 * h + d * (7 * h + 4 * i)) + attention + lora_act)
    if config.gradient_checkpointing:
        activations = shape.num_layers * tokens * h * d + 2 * block
    else:
        activations = (shape.num_layers + 1) * block
    logits = tokens * shape.vocab_size * (d + 12)
    return MemoryEstimate({
        "base_weights": int(shape.weight_bytes if base_weight_bytes is None else base_weight_bytes),
        "lora": 8 * params,
        "optimizer": int(optimizer),
        "activations": int(activations * TEMPORARIES_FACTOR),
        "logits": int(logits * TEMPORARIES_FACTOR),
        "runtime": int(runtime_bytes),
    })


def auto_threads(cpus: int) -> int:
    """Training threads for ``--training-threads 0`` (auto) on a machine with ``cpus`` usable cores: half of
    them, rounded down, at least 1, so serving keeps at least ⌈cpus/2⌉ cores (2 cores: 1 for training)."""
    return max(1, int(cpus) // 2)


def free_memory_bytes(device: str) -> int:
    """Memory free for a new job on ``device`` (bytes): ``MemAvailable`` of the host for ``"cpu"``, the CUDA
    driver's free bytes (``torch.cuda.mem_get_info``) for ``"cuda"`` / ``"cuda:N"``."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


class JobBudget:
    """Applies the server's training budgets to jobs: the memory check at create and at start, the numbers a
    worker gets, and the RSS check of a running CPU worker.

    Memory budget of a job: ``memory_bytes`` when set, else ``AUTO_MEMORY_FRACTION`` of the memory free on
    ``device`` when the check runs (at create and again at start, as free memory changes); an explicit budget
    larger than the free memory is lowered to it. A job whose :func:`estimate_peak_bytes` exceeds it is refused
    (``FailedPrecondition``: the config is valid, the server lacks room for it now).

    Args:
        shape: the base model's dimensions (None: no estimate; the RSS watch still applies an explicit budget).
        device: where jobs train (``"cpu"``, ``"cuda"``, ``"cuda:N"``): the resident model's device.
        memory_bytes: the ``--training-memory-bytes`` option (bytes; 0 = auto).
        threads: the ``--training-threads`` option (0 = :func:`auto_threads`).
        nice: niceness the worker runs at (0..19).
        base_weight_bytes: bytes of base weights a worker holds (None = ``shape.weight_bytes``: the worker loads
            its own copy; 0 when it shares the server's).
        free_memory: ``device`` → free bytes (default :func:`free_memory_bytes`; tests pass a constant).
    """

    def __init__(self, shape: ModelShape | None, device: str = "cpu", *, memory_bytes: int = 0, threads: int = 0,
                 nice: int = DEFAULT_NICE, base_weight_bytes: int | None = None, free_memory=None) -> None:
        self.shape = shape
        self.device = str(device)
        self.memory_option = int(memory_bytes)
        self.threads = int(threads) or auto_threads(usable_cpus())
        self.nice = int(nice)
        self.base_weight_bytes = base_weight_bytes
        self._free = free_memory or free_memory_bytes

    @property
    def on_cpu(self) -> bool:
        return not self.device.startswith("cuda")

    def budget_bytes(self) -> int:
        """The memory budget of a job starting now (bytes; see the class docstring)."""
        free = self._free(self.device)
        if self.memory_option:
            return min(self.memory_option, free)
        return int(AUTO_MEMORY_FRACTION * free)

    def estimate(self, config) -> MemoryEstimate | None:
        """:func:`estimate_peak_bytes` of ``config`` on this server (None without a model shape)."""
        if self.shape is None:
            return None
        return estimate_peak_bytes(config, self.shape, base_weight_bytes=self.base_weight_bytes,
                                   runtime_bytes=CPU_RUNTIME_BYTES if self.on_cpu else CUDA_RUNTIME_BYTES)

    def check(self, config) -> tuple[int, int | None]:
        """Check that ``config`` (a ``TrainConfig``) fits; returns ``(budget, estimate)`` in bytes (estimate None
        without a model shape).

        Raises:
            FailedPrecondition: the estimate exceeds the budget. ``field`` is ``config.batch_size`` with the largest
                batch that fits at this ``max_seq_length``, or ``config.max_seq_length`` when even one example
                does not fit (with the longest that does at batch 1), or ``config`` when nothing does; the message
                gives the estimate, its largest parts and the budget.
        """
        import dataclasses

        budget = self.budget_bytes()
        est = self.estimate(config)
        if est is None or est.total <= budget:
            return budget, None if est is None else est.total
        parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1])
                          if v)
        what = (f"estimated peak memory {_gib(est.total)} ({parts}) exceeds the training memory budget "
                f"{_gib(budget)} ({'--training-memory-bytes' if self.memory_option else 'auto: '}"
                f"{'' if self.memory_option else f'{AUTO_MEMORY_FRACTION:g} of the free memory'}, "
                f"free now {_gib(self._free(self.device))})")

        def fits(**change) -> bool:
            return self.estimate(dataclasses.replace(config, **change)).total <= budget

        batch = _largest(lambda n: fits(batch_size=n), config.batch_size - 1)
        if batch:
            raise FailedPrecondition(f"{what}; batch_size {batch} fits at max_seq_length {config.max_seq_length}",
                                     field="config.batch_size")
        seq = _largest(lambda n: fits(batch_size=1, max_seq_length=n), config.max_seq_length - 1, least=2)
        if seq:
            raise FailedPrecondition(f"{what}; at batch_size 1, max_seq_length {seq} fits",
                                     field="config.max_seq_length")
        raise FailedPrecondition(f"{what}; no batch_size or max_seq_length fits", field="config")

    def worker_settings(self, budget: int) -> dict:
        """What the worker applies (:func:`apply_worker_budget`): memory budget (bytes), device, threads, nice."""
        return {"memory_bytes": int(budget), "device": self.device, "threads": self.threads, "nice": self.nice}


def _largest(ok, hi: int, least: int = 1) -> int:
    """Largest n in least..hi with ``ok(n)`` (``ok`` monotone: true up to some n), or 0."""
    if hi < least or not ok(least):
        return 0
    lo = least
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def read_rss(pid: int) -> tuple[int, int] | None:
    """``(current, peak)`` resident set size of process ``pid`` in bytes (``VmRSS`` and ``VmHWM`` of
    ``/proc/PID/status``, proc(5)); None when the process is gone or the file lacks them (not Linux)."""
    current = peak = None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None if current is None or peak is None else (current, peak)


#: Thread-count variables of the BLAS/OpenMP runtimes torch may use; read when each runtime starts.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def apply_worker_budget(settings: dict | None) -> dict:
    """In the worker process, before the trainer runs: set the thread variables of ``THREAD_ENV``, lower this
    process's CPU priority to ``nice`` (``setpriority``; threads started later inherit it), set torch's intra-op
    threads, and on CUDA cap this process's caching allocator at ``memory_bytes``
    (``torch.cuda.set_per_process_memory_fraction``: an allocation beyond it raises ``torch.OutOfMemoryError`` in
    the worker, never touching the server). ``settings`` is :meth:`JobBudget.worker_settings`'s dict (None or
    empty: nothing is changed). Returns what is in force: ``threads`` (``torch.get_num_threads()``), ``nice``
    (``os.getpriority``), ``memory_budget_bytes``."""
    settings = settings or {}
    threads, nice = settings.get("threads"), settings.get("nice")
    if threads:
        for name in THREAD_ENV:
            os.environ[name] = str(int(threads))
    if nice is not None:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if int(nice) > current:  # only ever lower the priority (raising it needs privileges)
            os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    budget = int(settings.get("memory_bytes") or 0)
    device = str(settings.get("device") or "cpu")
    if budget and device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        if dev.index is None:  # "cuda": the current device (set_per_process_memory_fraction needs an index)
            dev = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev)
    return {"threads": torch.get_num_threads(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "memory_budget_bytes": budget}
