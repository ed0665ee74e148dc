"""trainer.fast against its oracles: PEFT's own LoRA forward, transformers' causal-LM loss, full checkpointing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import fast

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 96):
    """A float32 LlamaForCausalLM small enough for hypothesis (hidden 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).train()


def _peft(model, r: int, alpha: float, rslora: bool, dropout: float = 0.0, targets="all-linear", seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout,
                                                  target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT starts B at zero; a non-zero B makes the LoRA path visible in the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=st.sampled_from([1, 4, 8]), alpha=st.floats(1, 64), rslora=st.booleans(), batch=st.integers(1, 3),
       seq=st.integers(2, 12), seed=st.integers(0, 1000))
def test_fused_lora_forward_matches_peft_outputs_and_gradients(r, alpha, rslora, batch, seq, seed):
    """The fused forward is the same function as PEFT's: logits and every LoRA gradient agree in float32."""
    ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))
    results = []
    for fused in (False, True):
        model = _peft(_tiny_llama(seed), r, alpha, rslora, seed=seed)
        if fused:
            assert fast.fuse_lora_forward(model) == 2 * 7  # every linear of both blocks
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), _grads(model)))
    (ref_logits, ref_grads), (logits, grads) = results
    # float32 with another summation order (one addmm instead of matmul, scale, add): errors of a few ulps of the
    # largest value, far below the LoRA effect itself (checked in the next test).
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5 * float(ref_logits.abs().max()))
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 2 * 7
    # Some gradients are ~0 (noise) at 2 tokens, and a large scale (alpha/r up to 64) amplifies float32 rounding:
    # compare against the largest gradient entry of the whole adapter.
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=2e-4 * scale)


def test_fused_lora_forward_applies_scaling_and_falls_back_when_disabled():
    """A wrong scale would show: the fused output moves with lora_alpha; with adapters disabled it is the base."""
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    base = _tiny_llama()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = _peft(_tiny_llama(), r=4, alpha=8.0, rslora=False)
    fast.fuse_lora_forward(model)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(off, base_logits)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), seq=st.integers(2, 16), chunk_tokens=st.integers(1, 20),
       ignore=st.floats(0, 0.9), seed=st.integers(0, 1000), items=st.booleans())
def test_chunked_loss_equals_transformers_loss_and_gradients(batch, seq, chunk_tokens, ignore, seed, items):
    """Any chunking gives transformers' ForCausalLMLoss (mean, or sum / num_items_in_batch) and its gradients."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < ignore] = -100
    labels[0, -1] = ids[0, -1]  # at least one supervised token
    num_items = int((labels[:, 1:] != -100).sum()) + 3 if items else None
    results = []
    for chunked in (False, True):
        model = _peft(_tiny_llama(seed), r=4, alpha=8.0, rslora=False, seed=seed)
        inputs = {"input_ids": ids, "labels": labels}
        if chunked:
            loss = fast.chunked_causal_lm_loss(model, inputs, num_items, chunk_bytes=chunk_tokens * 10 * 96)
        else:
            loss = model(**inputs, num_items_in_batch=num_items).loss
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (ref, ref_grads), (got, grads) = results
    if (labels[:, 1:] != -100).sum() == 0:
        return
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6 * scale)


@settings(max_examples=8, deadline=None)
@given(k=st.integers(0, 3))
def test_checkpointing_first_k_blocks_changes_memory_not_math(k):
    """Checkpointing any number of blocks leaves the loss and gradients those of no checkpointing."""
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    results = []
    for blocks in (None, k):
        model = _tiny_llama(layers=3)
        if blocks is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = _peft(model, r=2, alpha=4.0, rslora=False)
        if blocks is not None:
            assert fast.checkpoint_first_layers(model, blocks) == min(blocks, 3)
            flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
                     and type(m).__name__ == "LlamaDecoderLayer"]
            assert flags == [i < blocks for i in range(3)]
        loss = fast.chunked_causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0])
    scale = max(float(g.abs().max()) for g in results[0][1].values())
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-6 * scale)


def test_cpu_levers_keep_peft_float32_lora_and_say_why_not_liger():
    model = _peft(_tiny_llama(), r=2, alpha=4.0, rslora=False, dropout=0.1)
    applied = fast.apply_training_levers(model, torch.device("cpu"))
    assert applied == {"chunked_loss": True}  # no fused LoRA or Liger on the CPU: the server's CPU numerics
    assert "CUDA" in fast.liger_unavailable_reason(torch.device("cpu"))
    assert fast.uses_rng(model)
    assert not fast.uses_rng(_peft(_tiny_llama(), r=2, alpha=4.0, rslora=False, dropout=0.0))


@pytest.mark.parametrize(("init_dropout", "config_dropout"), [(None, 0.0), (None, 0.1), (0.1, 0.0), (0.0, 0.1)])
def test_checkpointing_replays_the_rng_exactly_when_dropout_runs(tiny_model_dir, tmp_path, init_dropout,
                                                                  config_dropout):
    """Checkpointing skips saving the RNG state (so a CUDA graph can capture the step) only when no LoRA dropout
    will run: the run's own lora_dropout, or, starting from init_adapter, that adapter's (config's is ignored)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tests.trainer.conftest import tiny_config, write_jsonl
    from trainer.train import TrainingSession

    init = None
    if init_dropout is not None:
        init = tmp_path / "init"
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=init_dropout,
                                         target_modules=["q_proj"])).save_pretrained(init)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    session = TrainingSession(tiny_config(tiny_model_dir, data, tmp_path / "run", lora_dropout=config_dropout,
                                          init_adapter=init))
    session._load_tokenizer()
    model = session._load_model()
    dropout = init_dropout if init_dropout is not None else config_dropout
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert blocks and {b._gradient_checkpointing_func.keywords["preserve_rng_state"] for b in blocks} == {dropout > 0}
    assert fast.uses_rng(model) == (dropout > 0)
