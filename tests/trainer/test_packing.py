"""Sequence packing (``trainer.data.make_collator(packing=True)``) against the padded batch as the oracle: the same
per-example logits, loss and LoRA gradients, and no attention across example boundaries."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data import IGNORE_INDEX, make_collator

VOCAB = 128  # tests/trainer/conftest.py's tiny model
#: float32 compute: the packed row and the padded batch run the same ops on differently shaped matrices, so sums
#: may be ordered differently (a few float32 ulps of the logits, which are O(1..10)).
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def lora_model(request, tiny_model_dir):
    """The tiny NF4 base with float32 compute, prepared as the trainer prepares it (no checkpointing: the mask path
    is the same either way), with a LoRA on every linear layer whose A and B are both random (B = 0, PEFT's
    default, would hide the adapter), in train mode with dropout 0."""
    from peft import LoraConfig, get_peft_model

    from server.config import ModelConfig
    from server.model.base import load_base_model
    from trainer.train import prepare_for_qlora_training

    base, _, _ = load_base_model(ModelConfig(model=str(tiny_model_dir), device="cpu", compute_dtype="float32"))
    base.set_attn_implementation(request.param)
    prepare_for_qlora_training(base, gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    assert model.base_model.model.config._attn_implementation == request.param
    return model.train()


def _features(lengths, prompt_fracs, seed):
    """``to_features``-shaped examples: random tokens; the first part of each is prompt (``IGNORE_INDEX``)."""
    rng = random.Random(seed)
    feats = []
    for n, frac in zip(lengths, prompt_fracs):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        n_prompt = max(1, min(n - 1, round(n * frac)))
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        feats.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return feats


def _forward(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _check_packed_equals_padded(model, tokenizer, feats, every_grad_nonzero=False):
    padded = make_collator(tokenizer, packing=False)(feats)
    packed = make_collator(tokenizer, packing=True)(feats)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    pad_logits, pad_loss, pad_grads = _forward(model, padded)
    pack_logits, pack_loss, pack_grads = _forward(model, packed)
    offset = 0
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert packed["position_ids"][0, offset:offset + n].tolist() == list(range(n))
        torch.testing.assert_close(pack_logits[0, offset:offset + n], pad_logits[i, :n], **LOGIT_TOL)
        offset += n
    # Loss: mean cross-entropy over the supervised tokens of the micro-batch, the same set in both layouts.
    torch.testing.assert_close(pack_loss, pad_loss, rtol=1e-5, atol=0)
    assert pack_grads.keys() == pad_grads.keys() and len(pad_grads) > 0
    # Float32 rounding: the gradients are sums over positions in different orders, with cancellation in small
    # tensors, so the absolute bound is relative to the largest gradient entry of the whole adapter.
    overall = max(float(g.abs().max()) for g in pad_grads.values())
    for name, g in pad_grads.items():
        # (A lone short example can leave some gradient exactly 0: one key per query makes k_proj's irrelevant.)
        assert float(g.abs().max()) > 0 or not every_grad_nonzero, name
        torch.testing.assert_close(pack_grads[name], g, rtol=1e-3, atol=1e-4 * overall, msg=name)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.trainer.conftest import build_tokenizer

    return build_tokenizer()


def test_packed_batch_equals_padded_batch(lora_model, tokenizer):
    _check_packed_equals_padded(lora_model, tokenizer, _features([9, 31, 2, 17], [0.5, 0.3, 0.5, 0.9], seed=1),
                                 every_grad_nonzero=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=6),
       fracs=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
       seed=st.integers(0, 2**16))
def test_packing_equals_padding_for_any_lengths_and_batch(lora_model, tokenizer, lengths, fracs, seed):
    _check_packed_equals_padded(lora_model, tokenizer, _features(lengths, fracs, seed))


def test_packed_example_is_alone_in_its_row(lora_model, tokenizer):
    """No token attends across an example boundary: changing example 1 (its tokens, or its length) leaves the
    logits of examples 2 and 3 as they are when each runs alone. The control with the boundaries erased (position
    ids counting on) shows that a leak would be seen."""
    collate = make_collator(tokenizer, packing=True)
    first, second, third = _features([12, 10, 7], [0.5, 0.5, 0.5], seed=3)

    def logits(feats, **override):
        batch = {**collate(feats), **override}
        with torch.no_grad():
            return lora_model(**batch).logits[0]

    with torch.no_grad():
        alone = [lora_model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in (second, third)]
    changed = _features([12, 5], [0.5, 0.5], seed=4)
    for head in (first, changed[0], changed[1]):
        out = logits([head, second, third])
        n = len(head["input_ids"])
        torch.testing.assert_close(out[n:n + 10], alone[0], **LOGIT_TOL)
        torch.testing.assert_close(out[n + 10:], alone[1], **LOGIT_TOL)
    feats = [first, second, third]
    leaky = logits(feats, position_ids=torch.arange(29).unsqueeze(0))
    assert not torch.allclose(leaky[12:22], alone[0], rtol=1e-2, atol=1e-2)


def test_first_token_of_an_example_is_never_a_target(tokenizer):
    """The causal shift predicts ``labels[t + 1]`` from position ``t``: the label at every example start is
    ``IGNORE_INDEX``, so no example's last token is trained to predict the next example's first token."""
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [5, 6, 7]},
             {"input_ids": [8, 9], "attention_mask": [1] * 2, "labels": [8, 9]}]
    packed = make_collator(tokenizer, packing=True)(feats)
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_training_run_packed_matches_padded(tiny_model_dir, learnable_data, tmp_path):
    """A whole run (float32 compute) gives the same per-step losses and eval loss packed as padded, and the
    adapters agree: packing changes the batch layout, not the training."""
    from safetensors.torch import load_file
    from transformers import DataCollatorWithFlattening

    from tests.trainer.conftest import tiny_config
    from trainer.train import TrainingSession

    results = {}
    for packing in (False, True):
        cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / f"packing-{packing}", max_steps=4,
                          compute_dtype="float32", packing=packing, eval_max_examples=8)
        session = TrainingSession(cfg)
        results[packing] = session.run()
        assert isinstance(session.trainer.data_collator, DataCollatorWithFlattening) is packing
    padded, packed = results[False], results[True]
    assert len(packed.loss_history) == len(padded.loss_history) == 4
    torch.testing.assert_close(torch.tensor(packed.loss_history), torch.tensor(padded.loss_history),
                               rtol=1e-4, atol=0)
    assert packed.eval_loss == pytest.approx(padded.eval_loss, rel=1e-4)
    a = load_file(packed.adapter_dir / "adapter_model.safetensors")
    b = load_file(padded.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)
