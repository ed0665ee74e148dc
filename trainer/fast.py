"""GPU fast path of the trainer: a fused LoRA forward, Liger Kernel's fused norms/SwiGLU/loss, selective checkpointing.

Every lever here keeps the QLoRA numerics of the plain path (frozen NF4 + double-quant base through bitsandbytes,
LoRA weights kept in float32 as the optimizer's master copy, paged AdamW) and only changes *how* the same
functions are evaluated; ``tests/trainer/test_fast.py`` checks each one against PEFT / transformers.

1. **Fused LoRA forward** (``fuse_lora_forward``). PEFT's ``lora.Linear4bit.forward`` without autocast clones the
   base output, casts the input to float32, and then writes four ``[tokens, out]`` tensors per module
   (``B(A x)``, ``· scaling``, ``.to(bf16)``, ``result +``). Ours computes

       y = base(x) + s · (x Aᵀ) Bᵀ,   s = lora_alpha / r   (Hu et al. 2021, arXiv:2106.09685; rsLoRA: alpha/√r)

   as one ``F.linear`` for the shrink and one ``addmm`` for the expand, in the compute dtype (what the server's
   GPU path computes in, ``ModelConfig.lora_dtype="auto"``); the float32 master weights are cast per step
   (``r·(in+out)`` elements, negligible). Shapes: x ``[..., in]``, A ``[r, in]``, B ``[out, r]``, y ``[..., out]``.
   Dropout on the LoRA input is kept (``lora_dropout``).
2. **Liger Kernel** (``apply_liger``; Hsu et al. 2024, arXiv:2410.10989, the well-kept ``liger-kernel`` package):
   RMSNorm and SwiGLU as single Triton kernels that save less for the backward pass. CUDA only (Triton); absent
   or on the CPU, the plain modules run.
3. **Chunked loss** (``chunked_causal_lm_loss``): the LM head and cross-entropy a chunk of tokens at a time, so
   the ``[tokens, vocab]`` logits (1 GiB in float32 at 2,048 tokens × 128K vocab) never exist at once. Liger's
   fused linear cross-entropy does the same but synchronises with the host, which a CUDA graph cannot hold.
4. **Selective checkpointing** (``checkpoint_first_layers``): recompute only the first ``k`` decoder blocks in the
   backward pass; the rest keep their activations. ``k`` = all blocks is the plain recipe's full checkpointing.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# 1. Fused LoRA forward


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + s · dropout(x) Aᵀ Bᵀ`` for one PEFT LoRA layer with exactly one active, unmerged adapter.

    Falls back to PEFT's own forward for anything else (disabled or merged adapters, several active adapters,
    mixed-batch ``adapter_names``, LoRA variants such as DoRA)."""
    names = self.active_adapters
    if (kwargs or args or self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.lora_A
            or names[0] in getattr(self, "lora_variant", {})):
        return self._peft_forward(x, *args, **kwargs)
    name = names[0]
    out = self.base_layer(x)
    a = self.lora_A[name].weight  # [r, in], float32 master copy
    b = self.lora_B[name].weight  # [out, r]
    xa = F.linear(self.lora_dropout[name](x), a.to(x.dtype))  # [..., r]
    flat = out.reshape(-1, out.shape[-1])
    return torch.addmm(flat, xa.reshape(-1, xa.shape[-1]), b.to(x.dtype).t(),
                       alpha=self.scaling[name]).view(out.shape)


def fuse_lora_forward(model: torch.nn.Module) -> int:
    """Give every PEFT ``LoraLayer`` wrapping a linear layer (bitsandbytes ``Linear4bit`` or ``nn.Linear``) the
    fused forward above; returns how many layers changed. Parameters, state-dict keys and saved adapters are
    PEFT's own, untouched. Compute dtype: the layer input's (bf16 on a GPU)."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = MethodType(_fused_lora_forward, module)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# 2. Liger Kernel


def liger_unavailable_reason(device: torch.device) -> str | None:
    """None when Liger Kernel can run on ``device``; otherwise why not (one phrase)."""
    if device.type != "cuda":
        return "Liger Kernel needs CUDA (Triton)"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc})"
    return None


def _rms_norm_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    # casting_mode "llama": the variance in float32, the scale applied after casting back, as transformers' RMSNorm.
    return liger_rms_norm(hidden, self.weight, self.variance_epsilon, casting_mode="llama", in_place=False)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def apply_liger(model: torch.nn.Module) -> dict[str, int]:
    """Route a Llama-family model's RMSNorms and SwiGLU MLPs (``act_fn`` SiLU, ``gate/up/down_proj``) through
    Liger Kernel's fused Triton ops, per instance (no class or module-level patching). Returns counts per kind.
    Call before PEFT wraps the projections or after: the MLP forward calls the (wrapped) projections."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif (all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
              and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            module.forward = MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
    return counts


def _ce_sum(hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(model, inputs: dict, num_items_in_batch: int | torch.Tensor | None = None,
                           chunk_bytes: int = 512 << 20) -> torch.Tensor:
    """Causal-LM cross-entropy of ``model`` (a ``PeftModel`` or a ``*ForCausalLM``) on ``inputs`` without
    materialising the ``[tokens, vocab]`` logits: the decoder's last hidden states go through the LM head and the
    loss a chunk of tokens at a time, each chunk checkpointed (its logits are recomputed in the backward pass, one
    chunk at a time). The same sum as transformers' ``ForCausalLMLoss`` (logits up-cast to float32, labels
    shifted by one, ``-100`` ignored); no host synchronisation, so it can run inside a CUDA graph.

    Args:
        inputs: ``input_ids`` ``[B, T]`` int64, ``labels`` ``[B, T]`` (``-100`` = no loss), and optionally
            ``attention_mask`` / ``position_ids`` ``[B, T]``.
        num_items_in_batch: supervised tokens of the whole optimizer step (transformers' Trainer passes it under
            gradient accumulation); the loss is then this micro-batch's sum divided by it; None = the mean over
            this micro-batch's supervised tokens.
        chunk_bytes: bytes of one chunk's logits and their float32 copy and gradient (``10 · tokens · vocab``).

    Returns:
        Scalar float32 loss (nats per supervised token).
    """
    from torch.utils.checkpoint import checkpoint

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal.get_decoder()
    labels = inputs["labels"]
    kwargs = {k: inputs[k] for k in ("attention_mask", "position_ids") if inputs.get(k) is not None}
    hidden = decoder(input_ids=inputs["input_ids"], use_cache=False, **kwargs).last_hidden_state  # [B, T, H]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [N, H], N = B·(T-1)
    target = labels[:, 1:].reshape(-1)  # [N]
    weight = causal.get_output_embeddings().weight  # [V, H]
    chunk = max(1, chunk_bytes // (10 * weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), target.split(chunk)):
        total = total + checkpoint(_ce_sum, h, t, weight, use_reentrant=False, preserve_rng_state=False)
    count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum().clamp(min=1)
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# 4. Selective checkpointing


def checkpoint_first_layers(model: torch.nn.Module, k: int) -> int:
    """Keep activation checkpointing (already enabled on every decoder block by
    ``prepare_for_qlora_training``) on the first ``k`` blocks only; returns how many blocks are checkpointed.

    Activation memory per un-checkpointed block ≈ (tokens × bytes the block saves); checkpointing trades it for
    one more forward pass of the block in the backward pass (Chen et al. 2016, arXiv:1604.06174)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = block.gradient_checkpointing and i < k
    return sum(1 for b in blocks if b.gradient_checkpointing)


# ----------------------------------------------------------------------------------------------------------------
# All of it, as the trainer applies it


def apply_training_levers(model: torch.nn.Module, device: torch.device) -> dict[str, object]:
    """Apply the levers above that fit ``device`` to a PEFT model; returns what was applied (for the log).

    On CUDA: the fused LoRA forward (LoRA math in the compute dtype with float32 master weights, as bf16 mixed
    precision and as the server's GPU path computes it) and Liger's RMSNorm/SwiGLU when ``liger-kernel`` is
    installed. On the CPU neither: PEFT's float32 LoRA path is what the server's CPU path computes. The chunked
    loss (``chunked_causal_lm_loss``) is used on every device by the trainer's ``compute_loss``."""
    applied: dict[str, object] = {"chunked_loss": True}
    if device.type == "cuda":
        applied["fused_lora_layers"] = fuse_lora_forward(model)
        reason = liger_unavailable_reason(device)
        applied.update(apply_liger(model) if reason is None else {"liger": reason})
    return applied


def uses_rng(model: torch.nn.Module) -> bool:
    """True when a forward pass of ``model`` in training mode draws random numbers (a dropout with p > 0)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
