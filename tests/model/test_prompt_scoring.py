"""Prompt scoring in the model runner: any chunking of the prefill (and of the scored positions) gives transformers'
own log-softmax at every prompt position, with or without an adapter, and rows that do not score are untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.types import BaseModelSpec
from server.adapters.validation import validate_adapter_dir
from server.config import EngineConfig
from server.model.runner import PromptScoring, StepRow, build_runner
from server.model.sampling import PromptScores, prompt_logprob_scores, prompt_scores_to_host
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base

BLOCK = 4
PROMPT_LEN = 13
TOLERANCE = 1e-4
#: With the adapter: bitsandbytes' CPU 4-bit matmul rounds its output to bfloat16 even at float32 compute, so the
#: last-ulp difference between our batched LoRA term and PEFT's (or between two chunkings) now and then flips one
#: rounding, which moves a log-probability by up to a few 1e-4. Base-model rows stay at TOLERANCE.
LORA_TOLERANCE = 2e-3
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A float32-compute runner with one adapter in slot 0, a prompt, and the oracle log-softmax ``[n, V]`` of the
    plain NF4 model and of PEFT's model with that adapter (float32 compute: independent of batching)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("scoring")
    base_dir = save_tiny_base(root)
    adapter_dir = make_adapter(base_dir, root / "a", seed=4, std=0.05, target_modules=ALL_LINEAR)
    model = load_nf4(base_dir, torch.float32)
    cfg = EngineConfig(adapter_slots=2, max_lora_rank=16, max_batch_size=4, kv_block_size=BLOCK, cpu_adapter_cache=2)
    runner = build_runner(model, cfg, torch.float32, 128)
    runner.banks.load(0, validate_adapter_dir(adapter_dir, BaseModelSpec.from_model(model, TINY_NAME, 16)))
    prompt = torch.randint(1, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        base = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
        peft = PeftModel.from_pretrained(load_nf4(base_dir, torch.float32), adapter_dir).eval()
        lora = torch.log_softmax(peft(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert (base - lora).abs().max() > 20 * LORA_TOLERANCE  # the adapter matters: the check can fail
    return runner, prompt, {-1: base, 0: lora}


def score_in_chunks(runner, prompt, splits, slot, k, blocks=(1, 2, 3, 4)) -> list:
    """Prefill ``prompt`` in chunks ending at ``splits`` (+ the end), scoring as the engine does; the host rows."""
    bounds = [0, *sorted(set(splits)), len(prompt)]
    scores = []
    for s, e in zip(bounds, bounds[1:]):
        targets = tuple(prompt[s + 1:min(e + 1, len(prompt))])
        _, got = runner.prefill_scored([StepRow(tuple(prompt[s:e]), s, blocks, slot)],
                                       [PromptScoring(targets, k) if targets else None])
        scores.extend(got)
    return [r for rows in prompt_scores_to_host(scores) if rows is not None for r in rows]


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(1, PROMPT_LEN - 1), max_size=4), score_chunk=st.integers(1, 2 * PROMPT_LEN),
       slot=st.sampled_from([-1, 0]), k=st.sampled_from([0, 1, 5]))
def test_any_chunking_scores_every_prompt_position_as_transformers(world, splits, score_chunk, slot, k):
    runner, prompt, oracle = world
    runner.score_chunk = score_chunk
    try:
        rows = score_in_chunks(runner, prompt, splits, slot, k)
    finally:
        runner.score_chunk = 1 << 30
    lsm, tol = oracle[slot], TOLERANCE if slot < 0 else LORA_TOLERANCE
    assert len(rows) == len(prompt) - 1  # every prompt token after the first, whatever the chunking
    for pos, row in enumerate(rows):
        assert abs(row.logprob - lsm[pos, prompt[pos + 1]].item()) < tol
        assert len(row.top) == k
        values, ids = torch.topk(lsm[pos], k)
        if slot < 0:  # at the adapter's tolerance two near-tied tokens could swap places
            assert [t for t, _ in row.top] == ids.tolist()
        assert all(abs(v - w) < tol for (_, v), w in zip(row.top, values.tolist()))


def test_rows_that_do_not_score_get_the_same_logits(world):
    """A batch where one row scores and one does not: both rows' last-token logits equal plain prefill's, bit for
    bit, and only the scoring row has scores."""
    runner, prompt, oracle = world
    rows = [StepRow(tuple(prompt), 0, (1, 2, 3, 4), -1), StepRow(tuple(prompt[:7]), 0, (5, 6), 0)]
    plain = runner.prefill(rows).clone()
    logits, scores = runner.prefill_scored(rows, [None, PromptScoring(tuple(prompt[1:7]), 2)])
    assert torch.equal(logits, plain)
    host = prompt_scores_to_host(scores)
    assert host[0] is None and len(host[1]) == 6
    assert all(abs(r.logprob - oracle[0][i, prompt[i + 1]].item()) < LORA_TOLERANCE for i, r in enumerate(host[1]))


def test_scoring_entries_are_checked(world):
    runner, prompt, _ = world
    row = StepRow(tuple(prompt[:3]), 0, (1,), -1)
    with pytest.raises(ValueError, match="scoring entries"):
        runner.prefill_scored([row], [])
    with pytest.raises(ValueError, match="targets"):
        runner.prefill_scored([row], [PromptScoring((1, 2, 3, 4), 0)])
    with pytest.raises(ValueError, match="targets"):
        runner.prefill_scored([row], [PromptScoring((), 0)])


def test_prompt_logprob_scores_shapes_ties_and_host_rows():
    logits = torch.tensor([[0.0, 1.0, 1.0, -2.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.bfloat16)
    s = prompt_logprob_scores(logits, torch.tensor([3, 0]), 3)
    assert s.chosen.dtype == s.top_values.dtype == torch.float32 and s.top_ids.dtype == torch.int64
    assert s.top_values.shape == s.top_ids.shape == (2, 3)
    assert s.top_ids.tolist() == [[1, 2, 0], [0, 1, 2]]  # ties: the lower id first
    want = torch.log_softmax(logits.float(), dim=-1)
    assert torch.equal(s.chosen, torch.stack([want[0, 3], want[1, 0]]))
    none = prompt_logprob_scores(logits, torch.tensor([0, 0]), 0)
    assert none.top_values.shape == (2, 0) and torch.equal(none.chosen, want[:, 0])
    assert prompt_logprob_scores(logits, torch.tensor([0, 0]), 99).top_ids.shape == (2, 4)  # k above V: V
    both = PromptScores.cat([s, prompt_logprob_scores(logits[:1], torch.tensor([1]), 3)])
    rows = prompt_scores_to_host([None, both, none])
    assert rows[0] is None and len(rows[1]) == 3 and len(rows[2]) == 2
    assert rows[1][0].top == tuple(zip([1, 2, 0], want[0, [1, 2, 0]].tolist()))
    assert rows[1][2].logprob == want[0, 1].item() and rows[2][1].top == ()
    assert prompt_scores_to_host([None]) == [None]
