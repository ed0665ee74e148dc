"""CUDA-graph decode (runs where CUDA is present: the GPU machine): replayed steps equal eager steps of the same
shapes on the same state, for every bucket kind, with adapters and without, and the buckets pick the right graph."""

from __future__ import annotations

import pytest
import torch

from server.adapters.types import BaseModelSpec
from server.adapters.validation import validate_adapter_dir
from server.config import EngineConfig
from server.model.graphs import SELF_CHECK_TOLERANCE, buckets
from server.model.runner import StepRow, build_runner
from tests.tiny import TINY_NAME, make_adapter, save_tiny_base

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_buckets_cover_every_size_once():
    for limit in range(1, 70):
        sizes = buckets(limit)
        assert sizes[-1] == limit and sorted(set(sizes)) == sizes
        assert all(any(s >= need for s in sizes) for need in range(1, limit + 1))


def _load_cuda_nf4(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, dtype=torch.bfloat16,
                                                device_map={"": "cuda"}).eval()


@cuda
def test_replay_equals_eager_for_mixed_adapters(tmp_path):
    base = save_tiny_base(tmp_path)
    adapter = make_adapter(base, tmp_path / "a", r=8, lora_alpha=16,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = _load_cuda_nf4(base)
    cfg = EngineConfig(adapter_slots=2, max_lora_rank=16, max_batch_size=8, kv_block_size=4)
    runner = build_runner(model, cfg, torch.bfloat16, 128)
    assert runner.graph_status == "on", runner.graph_status
    runner.banks.load(1, validate_adapter_dir(adapter, BaseModelSpec.from_model(model, TINY_NAME, 16)))
    gen = torch.Generator().manual_seed(0)
    for n, length in [(1, 3), (3, 9), (5, 30), (8, 60)]:
        prompts = [torch.randint(256, (length,), generator=gen).tolist() for _ in range(n)]
        tables = [tuple(range(1 + i * 20, 1 + i * 20 + (length + 4) // 4 + 1)) for i in range(n)]
        slots = [(-1, 1)[i % 2] for i in range(n)]
        runner.eager([StepRow(tuple(p), 0, t, s) for p, t, s in zip(prompts, tables, slots)])
        step = [StepRow((p[-1],), length, t, s) for p, t, s in zip(prompts, tables, slots)]
        b, nb = runner.graphs.bucket(step)
        eager = runner.eager(step, n=b, nb=nb).float().clone()
        replayed = runner.decode(step).float().clone()
        rel = (replayed - eager).abs().max().item() / max(1.0, eager.abs().max().item())
        assert rel <= SELF_CHECK_TOLERANCE, (n, length, rel)


@cuda
def test_prefill_and_decode_match_transformers_on_cuda(tmp_path):
    """Our prefill (fused attention over the paged cache) and a replayed decode step against the model's own
    transformers forward pass on the same NF4 weights (bf16: within 5 % of the largest logit)."""
    base = save_tiny_base(tmp_path)
    model = _load_cuda_nf4(base)
    runner = build_runner(model, EngineConfig(adapter_slots=1, max_lora_rank=8, max_batch_size=4, kv_block_size=4),
                          torch.bfloat16, 128)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(256, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    tables = [tuple(range(1 + 20 * i, 1 + 20 * i + 12)) for i in range(3)]
    first = runner.prefill([StepRow(tuple(p[:-1]), 0, t) for p, t in zip(prompts, tables)]).float()
    step = runner.decode([StepRow((p[-1],), len(p) - 1, t) for p, t in zip(prompts, tables)]).float()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p], device="cuda")).logits[0].float()
        for ours, want in ((first[i], ref[-2]), (step[i], ref[-1])):
            assert (ours - want).abs().max().item() <= 0.05 * want.abs().max().item()
