"""Fixtures for trainer tests: a character-level ChatML tokenizer and tiny random Llama bases (CPU, seconds)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(pad_is_eos: bool = True):
    """A fast tokenizer with one token per printable ASCII character plus ChatML specials (vocab 103).

    EOS is ``<|im_end|>``; with ``pad_is_eos`` the pad token is EOS too (like SmolLM2), otherwise ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ([] if pad_is_eos else ["<pad>"]) + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>" if pad_is_eos else "<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.padding_side = "right"
    return tok


def save_tiny_model(out: Path, seed: int = 0, pad_is_eos: bool = True, hidden: int = 64, layers: int = 2,
                    init_range: float = 0.25) -> Path:
    """Save a random float32 Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) and its tokenizer to ``out``.

    ``init_range`` (std of the random weights) is larger than Llama's 0.02 so the frozen random lm_head can express
    peaked next-token distributions: LoRA on the blocks can then drive the loss of a learnable task well down.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(pad_is_eos)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=init_range, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random base model directory (pad = eos)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def write_jsonl(path: Path, rows) -> Path:
    """Write ``rows`` (dicts, or raw strings written as-is) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return path


def learnable_rows(n: int, seed: int = 0) -> list[dict]:
    """A task a tiny model learns fast: the completion is the prompt's 3 letters upper-cased and doubled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(3))
        rows.append({"prompt": f"up {w}", "completion": (w.upper() + " ") * 2})
    return rows


@pytest.fixture
def learnable_data(tmp_path) -> Path:
    """128 examples of the ``learnable_rows`` task."""
    return write_jsonl(tmp_path / "learn.jsonl", learnable_rows(128))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loss_fell(history, window: int = 5, factor: float = 0.6) -> bool:
    """The does-it-learn check: mean loss of the last ``window`` steps is below ``factor`` × that of the first
    ``window`` steps, and every loss is finite."""
    import math

    if len(history) < 2 * window or not all(math.isfinite(x) for x in history):
        return False
    first = sum(history[:window]) / window
    last = sum(history[-window:]) / window
    return last < factor * first


def tiny_config(model_dir: Path, data: Path, out: Path, **overrides):
    """A TrainConfig for the tiny model: no dropout, lr 1e-2, batch 8, 30 steps, eval on 10 %."""
    from trainer.config import TrainConfig

    base = dict(model=str(model_dir), dataset=data, output_dir=out, max_steps=30, batch_size=8,
                learning_rate=1e-2, lora_dropout=0.0, r=8, lora_alpha=16, save_steps=1000, logging_steps=5,
                warmup_ratio=0.0, max_grad_norm=1.0, seed=0, eval_fraction=0.1)
    base.update(overrides)
    return TrainConfig(**base)
