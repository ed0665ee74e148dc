"""Chooses the compute dtype for a device: bfloat16 only where the hardware runs it natively, with the reason."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: x86 CPU flags (Linux ``/proc/cpuinfo`` names) that mean bfloat16 matmuls run in hardware: AVX512-BF16
#: (``vdpbf16ps``) or AMX tiles with BF16. Without them PyTorch/oneDNN emulates bf16 (measured ~40x slower than
#: float32 on an AVX2-only AMD EPYC: 1.1-1.7 vs 46-63 GFLOP/s).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

AUTO = "auto"


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype the base model runs in and why.

    Attributes:
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` (a ``torch`` attribute name).
        requested: what the configuration asked for (``"auto"`` or one of the dtypes).
        reason: one sentence for logs, ``build_info`` and model cards.
        slow: True when an explicitly requested dtype is emulated on this device (a warning is logged).
    """

    dtype: str
    requested: str
    reason: str
    slow: bool = False


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (Linux format: ``flags : a b c``).

    Returns an empty set where the file is missing or has no flags line (non-Linux systems, some containers):
    the choice then falls back to float32, which is never the slow path.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def choose_compute_dtype(requested: str, device_type: str, *, cuda_bf16: bool = False,
                         cpu_flags: Iterable[str] = (), cpu_capability: str = "AVX512") -> DtypeChoice:
    """Pick the compute dtype for ``device_type`` (pure: the hardware facts are arguments).

    ``"auto"``: on CUDA, bfloat16 where the GPU supports it (Ampere and newer), else float16 (the tensor-core
    path of older GPUs); on a CPU, bfloat16 when ``cpu_flags`` include AVX512-BF16 or AMX-BF16, else float32. An
    explicit dtype is always honoured; ``slow`` marks bfloat16 on a CPU without native support (and float16 on
    any CPU, which PyTorch also emulates).

    Args:
        requested: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        device_type: ``torch.device.type`` of the model's device (``"cuda"`` or ``"cpu"``; others are treated
            like a CPU without native bfloat16).
        cuda_bf16: ``torch.cuda.is_bf16_supported()`` for that device.
        cpu_flags: the CPU's feature flags (see ``read_cpu_flags``).
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()``; when PyTorch's CPU kernels are capped below
            AVX512 (``ATEN_CPU_CAPABILITY=avx2``, or a CPU without AVX512) the bf16 flags do not count.

    Raises:
        ValueError: ``requested`` is none of the above (configs validate this earlier).
    """
    if requested not in (AUTO, "bfloat16", "float16", "float32"):
        raise ValueError(f"unknown compute dtype {requested!r}")
    native = sorted(NATIVE_BF16_CPU_FLAGS.intersection(cpu_flags)) if cpu_capability.startswith("AVX512") else []
    if device_type == "cuda":
        if requested != AUTO:
            return DtypeChoice(requested, requested, f"{requested} as configured on CUDA")
        if cuda_bf16:
            return DtypeChoice("bfloat16", requested, "auto: the GPU supports bfloat16")
        return DtypeChoice("float16", requested, "auto: the GPU has no bfloat16 support, float16 is its fast path")
    cpu = "CPU with " + "/".join(native) if native else "CPU without AVX512-BF16 or AMX-BF16"
    if requested == AUTO:
        if native:
            return DtypeChoice("bfloat16", requested, f"auto: {cpu} runs bfloat16 natively")
        return DtypeChoice("float32", requested,
                           f"auto: {cpu} emulates bfloat16 (far slower than float32), so float32")
    slow = requested == "float16" or (requested == "bfloat16" and not native)
    reason = f"{requested} as configured on a {cpu}"
    if slow:
        reason += f"; {requested} is emulated here and much slower than float32 (use auto or float32)"
    return DtypeChoice(requested, requested, reason, slow)


def resolve_compute_dtype(requested: str, device) -> DtypeChoice:
    """``choose_compute_dtype`` with this machine's facts for ``device`` (a ``torch.device``); logs the choice
    (a warning when it is the slow path)."""
    import torch

    cuda_bf16 = False
    if device.type == "cuda":
        with torch.cuda.device(device):
            # including_emulation=False: pre-Ampere GPUs "support" bf16 only by emulation, the slow path again
            cuda_bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    on_cpu = device.type != "cuda"
    choice = choose_compute_dtype(requested, device.type, cuda_bf16=cuda_bf16,
                                  cpu_flags=read_cpu_flags() if on_cpu else (),
                                  cpu_capability=torch.backends.cpu.get_cpu_capability() if on_cpu else "AVX512")
    (log.warning if choice.slow else log.info)("compute dtype %s: %s", choice.dtype, choice.reason)
    return choice
