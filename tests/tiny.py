"""Tiny random Llama base models and PEFT LoRA adapters for tests (CPU, well under a second each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The base model's id in tests; its directory is named after its basename so PEFT records a matching path.
TINY_NAME = "test-org/tiny-llama"


def tiny_config(hidden: int = 64, intermediate: int = 128, layers: int = 2):
    """A ``LlamaConfig``: 4 heads, 2 KV heads, vocab 256, 128 positions (sizes bitsandbytes' NF4 handles on CPU)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                       tie_word_embeddings=False)


def save_tiny_base(parent: Path, seed: int = 0, name: str = "tiny-llama", **sizes) -> Path:
    """Save a random float32 ``LlamaForCausalLM`` to ``parent/name`` (safetensors) and return that directory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    out = Path(parent) / name
    LlamaForCausalLM(tiny_config(**sizes)).save_pretrained(out)
    return out


def load_nf4(base_dir: Path, compute_dtype: torch.dtype = torch.bfloat16):
    """Load ``base_dir`` quantized to NF4 with double quantization and ``compute_dtype`` compute (bfloat16 by
    default), on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, dtype=compute_dtype,
                                                 device_map={"": "cpu"})
    return model.eval().requires_grad_(False)


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 safe_serialization: bool = True, std: float = 0.1, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``base_dir`` to ``out_dir`` with every LoRA parameter random (seeded).

    PEFT initialises ``lora_B`` to zero, which would make an adapter a no-op; here A and B (and any other LoRA
    parameter, e.g. a DoRA magnitude) are drawn from N(0, std²) with ``torch.Generator().manual_seed(seed)`` and
    cast to ``dtype``. ``lora_kwargs`` go to ``peft.LoraConfig`` (default ``r=4, lora_alpha=8,
    target_modules=["q_proj", "v_proj"]``). Returns ``out_dir``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora_kwargs}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                p.data = p.data.to(dtype)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return Path(out_dir)


def edit_config(adapter_dir: Path, **changes) -> Path:
    """Rewrite ``adapter_config.json`` of ``adapter_dir`` with ``changes`` applied (a value of ``...`` deletes a key)."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return Path(adapter_dir)
