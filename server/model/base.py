"""Loads the base model once, quantized to NF4 with double quantization through bitsandbytes."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import EMBEDDED_MODEL, ModelConfig
from server.errors import FailedPrecondition
from server.model import embedded
from server.model.dtype import resolve_compute_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelInfo:
    """Facts about the resident base model that adapters are checked against and metrics report.

    Attributes:
        name: the model id (hub id, or the embedded model's upstream id).
        path: the local directory or hub id it was loaded from.
        device: where the weights live.
        weight_bytes: bytes of all parameters and buffers (4-bit packed weights count at their packed size).
        model_type: ``config.model_type`` (e.g. ``"llama"``).
        max_positions: ``config.max_position_embeddings`` (tokens).
        compute_dtype: the compute dtype the model was loaded in (``"auto"`` resolved, see ``server.model.dtype``);
            empty when the caller built this record itself (tests).
        compute_dtype_reason: why that dtype was chosen (one sentence).
    """

    name: str
    path: str
    device: torch.device
    weight_bytes: int
    model_type: str
    max_positions: int
    compute_dtype: str = ""
    compute_dtype_reason: str = ""


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` → the first CUDA device when one is present, else the CPU.

    Raises:
        FailedPrecondition: CUDA was asked for but is not available.
    """
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("CUDA requested but torch.cuda.is_available() is False", field="device")
    return device


def resolve_source(cfg: ModelConfig) -> tuple[str, str]:
    """Return ``(load_path, model_name)``: the embedded model is converted on first use; anything else goes to
    ``from_pretrained`` unchanged (a local directory or a hub id)."""
    if cfg.model == EMBEDDED_MODEL:
        return str(embedded.ensure_converted(cfg.cache_dir)), embedded.EMBEDDED_HUB_ID
    return cfg.model, cfg.model


def quantization_config(cfg: ModelConfig, compute_dtype: str):
    """The bitsandbytes 4-bit config shared by the server and the trainer (identical numerics both sides).

    Args:
        cfg: quantization settings (``quant_type``, ``double_quant``).
        compute_dtype: the resolved compute dtype (``"bfloat16"``, ``"float16"`` or ``"float32"``, never
            ``"auto"``: see ``server.model.dtype.resolve_compute_dtype``).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def keep_plain_cpu_4bit_matmul(model: torch.nn.Module) -> int:
    """Keep every ``bitsandbytes.nn.Linear4bit`` on the plain dequantize-then-matmul path on the CPU; returns the
    number of layers set.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval mode without grad
    and from then on uses a fused kernel that casts the activations *and the quantization scales (absmax)* to
    bfloat16 whatever the compute dtype. Served logits then differ from the trainer's (which cannot use that
    kernel: it has no autograd formula) by about 3-5 % of the largest logit on the tiny test model, ten bf16 steps,
    in float32 as in bfloat16 compute; with the plain path they agree to float32 rounding
    (tests/trainer/test_serve_parity.py). GPUs never take the fused path; on a CPU this gives up its speed.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base_model(cfg: ModelConfig):
    """Load the tokenizer and the NF4 base model, in eval mode with gradients off, in the compute dtype that
    ``server.model.dtype.resolve_compute_dtype`` picks for ``cfg.compute_dtype`` on this device (the server and the
    trainer both load through here, so they pick the same dtype on the same machine).

    Returns:
        ``(model, tokenizer, info)``; every ``nn.Linear`` of the decoder blocks is a ``bitsandbytes.nn.Linear4bit``.

    Raises:
        FailedPrecondition: the model cannot be found or loaded (the message names ``model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in a log file; the log line below says it
    device = resolve_device(cfg.device)
    choice = resolve_compute_dtype(cfg.compute_dtype, device)
    path, name = resolve_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg, choice.dtype),
            dtype=getattr(torch, choice.dtype),
            device_map={"": device},
            attn_implementation="sdpa",
        )
    except Exception as exc:  # noqa: BLE001 - corrupt weights / tokenizer files raise many kinds; one clear answer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FailedPrecondition(f"cannot load base model {path!r}: {type(exc).__name__}: {first}",
                                 field="model") from exc
    model.eval()
    model.requires_grad_(False)
    if cfg.cpu_4bit_kernel == "exact":
        keep_plain_cpu_4bit_matmul(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    info = BaseModelInfo(
        name=name,
        path=str(path),
        device=device,
        weight_bytes=int(weight_bytes),
        model_type=str(getattr(model.config, "model_type", "")),
        max_positions=int(getattr(model.config, "max_position_embeddings", 2048) or 2048),
        compute_dtype=choice.dtype,
        compute_dtype_reason=choice.reason,
    )
    log.info("base model %s loaded on %s: %.1f MiB of weights (%s, double_quant=%s, compute %s)",
             name, device, weight_bytes / 2**20, cfg.quant_type, cfg.double_quant, choice.dtype)
    return model, tokenizer, info


def base_model_basename(name_or_path: str) -> str:
    """Last path component of a model id or directory, lower-cased (``org/Model`` and ``/x/Model`` agree)."""
    return Path(str(name_or_path).rstrip("/")).name.lower()
