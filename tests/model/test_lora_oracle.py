"""The model runner against PEFT: mixed-adapter batches over the paged KV cache give each row what ``PeftModel`` gives
for that adapter alone, whatever the prefill chunking, batch composition and block placement."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.types import BaseModelSpec
from server.adapters.validation import validate_adapter_dir
from server.config import EngineConfig
from server.engine.scheduler import BlockAllocator, blocks_needed
from server.model.lora import LoraBanks
from server.model.runner import StepRow, build_runner
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (adapter name, LoraConfig kwargs): three ranks, list and regex targets, rank/alpha patterns, rsLoRA.
ADAPTERS = {
    "r2_attn": dict(seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(seed=2, r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "r16_mlp": dict(seed=3, r=16, lora_alpha=8, use_rslora=True, target_modules=r".*\.mlp\.(gate|up|down)_proj",
                    rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 32}),
}
# Row → adapter (None = base model), prompt length. Base rows sit between adapter rows on purpose.
ROWS = [("r2_attn", 7), (None, 11), ("r8_all", 5), ("r16_mlp", 13), (None, 3), ("r8_all", 9)]
DECODE_STEPS = 4
BLOCK = 4  # small blocks: every sequence spans several, scattered over the pool


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    base_dir = save_tiny_base(root)
    dirs = {name: make_adapter(base_dir, root / name, **kw) for name, kw in ADAPTERS.items()}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for _, n in ROWS]
    forced = [torch.randint(1, 256, (DECODE_STEPS,), generator=gen).tolist() for _ in ROWS]
    return base_dir, dirs, prompts, forced


def make_runner(base_dir, compute_dtype=torch.bfloat16, slots=4, **kw):
    model = load_nf4(base_dir, compute_dtype)
    cfg = EngineConfig(adapter_slots=slots, max_lora_rank=16, max_batch_size=8, kv_block_size=BLOCK,
                       cpu_adapter_cache=max(4, slots), **kw)
    return model, build_runner(model, cfg, torch.float32, 128)


def peft_logits(base_dir, adapter_dir, ids: list[int], compute_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference: the whole sequence through PeftModel (or the plain NF4 model), last position's logits [V]."""
    from peft import PeftModel

    model = load_nf4(base_dir, compute_dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_mixed_batch_matches_peft_per_row(world):
    base_dir, dirs, prompts, forced = world
    model, runner = make_runner(base_dir)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    slot_of = {}
    for slot, name in enumerate(ADAPTERS):
        runner.banks.load(slot, validate_adapter_dir(dirs[name], spec))
        slot_of[name] = slot
    row_slots = [slot_of[a] if a else -1 for a, _ in ROWS]
    alloc = BlockAllocator(runner.pool.num_blocks)
    alloc.allocate(3)  # so the rows' blocks do not start at block 1
    tables = [tuple(alloc.allocate(blocks_needed(n + DECODE_STEPS, BLOCK))[::-1]) for _, n in ROWS]

    # Prefill in groups (one forward pass per group, mixed adapters inside a group; the second group's long prompt
    # in two chunks), as the engine does when requests arrive at different times.
    ours: list[list[torch.Tensor]] = [[] for _ in ROWS]
    for group, split in (([0, 1, 2], None), ([3], 6), ([4, 5], None)):
        starts = [0] * len(group)
        if split:
            runner.prefill([StepRow(tuple(prompts[b][:split]), 0, tables[b], row_slots[b]) for b in group])
            starts = [split] * len(group)
        logits = runner.prefill([StepRow(tuple(prompts[b][s:]), s, tables[b], row_slots[b])
                                 for b, s in zip(group, starts)])
        for i, b in enumerate(group):
            ours[b].append(logits[i].float())
    # Decode steps with every row in ONE forward pass, each routed to its own adapter; tokens are forced so the
    # reference sees the same sequences.
    for step in range(DECODE_STEPS):
        logits = runner.decode([StepRow((forced[b][step],), len(prompts[b]) + step, tables[b], row_slots[b])
                                for b in range(len(ROWS))])
        for b in range(len(ROWS)):
            ours[b].append(logits[b].float())

    worst, smallest_effect = 0.0, float("inf")
    for b, (adapter, _) in enumerate(ROWS):
        for step in range(DECODE_STEPS + 1):
            ids = prompts[b] + forced[b][:step]
            ref = peft_logits(base_dir, dirs[adapter] if adapter else None, ids)
            err = (ours[b][step] - ref).abs().max().item()
            worst = max(worst, err)
            assert err <= 0.05 * ref.abs().max().item(), (b, adapter, step, err)
            if adapter and step == 0:
                # The check must be able to fail: the adapter moves the logits far more than the tolerance.
                effect = (peft_logits(base_dir, None, ids) - ref).abs().max().item()
                smallest_effect = min(smallest_effect, effect)
    print(f"worst |ours - PEFT| = {worst:.4g}, smallest adapter effect = {smallest_effect:.4g}")
    assert smallest_effect > 20 * worst, (smallest_effect, worst)


def test_unrouted_rows_get_exactly_the_base_output(world):
    """Rows without an adapter get bit-for-bit what they get with no adapter loaded anywhere, even in a batch whose
    other rows use adapters (the zero slot adds exact zeros)."""
    base_dir, dirs, prompts, _ = world
    model, runner = make_runner(base_dir, slots=2)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    rows = [StepRow(tuple(prompts[1]), 0, (1, 2, 3), -1), StepRow(tuple(prompts[1]), 0, (4, 5, 6), 0)]
    alone = runner.prefill(rows[:1]).clone()
    runner.banks.load(0, validate_adapter_dir(dirs["r8_all"], spec))
    runner.banks.load(1, validate_adapter_dir(dirs["r2_attn"], spec))
    mixed = runner.prefill(rows)
    assert torch.equal(mixed[0], alone[0])
    assert not torch.allclose(mixed[1], alone[0])
    ref = peft_logits(base_dir, None, prompts[1])
    assert (alone[0].float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_slot_reuse_clears_old_weights(world):
    """Loading a narrower adapter over a wider one leaves no trace of the old factors."""
    base_dir, dirs, prompts, _ = world
    model, runner = make_runner(base_dir, slots=1)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    runner.banks.load(0, validate_adapter_dir(dirs["r8_all"], spec))
    runner.banks.load(0, validate_adapter_dir(dirs["r2_attn"], spec))
    got = runner.prefill([StepRow(tuple(prompts[0]), 0, (1, 2), 0)])[0].float()
    ref = peft_logits(base_dir, dirs["r2_attn"], prompts[0])
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    down = runner.banks.index["model.layers.0.mlp.down_proj"]
    assert torch.count_nonzero(runner.banks.A[down][0]) == 0 and torch.count_nonzero(runner.banks.B[down][0]) == 0


@pytest.fixture(scope="module")
def f32_runner(world):
    base_dir, dirs, _, _ = world
    model, runner = make_runner(base_dir, compute_dtype=torch.float32, slots=2)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    runner.banks.load(0, validate_adapter_dir(dirs["r8_all"], spec))
    return runner


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_chunked_prefill_and_block_placement_do_not_change_logits(f32_runner, data):
    """Float32: any split of a prompt into chunks, any blocks, any row position give the logits of one whole
    prefill (within float32 rounding of the two attention kernels), for adapter and base rows."""
    runner = f32_runner
    n = data.draw(st.integers(2, 40), label="prompt length")
    prompt = tuple(data.draw(st.lists(st.integers(0, 255), min_size=n, max_size=n), label="prompt"))
    slot = data.draw(st.sampled_from([-1, 0]), label="slot")
    need = blocks_needed(n, BLOCK)
    pool_blocks = list(range(1, runner.pool.num_blocks))
    blocks_a = tuple(data.draw(st.permutations(pool_blocks), label="blocks a")[:need])
    whole = runner.prefill([StepRow(prompt, 0, blocks_a, slot)])[0].clone()
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=4), label="cuts")))
    blocks_b = tuple(b for b in pool_blocks if b not in blocks_a)[:need]
    neighbour = StepRow(tuple(range(7)), 0, tuple(b for b in pool_blocks if b not in blocks_a + blocks_b)[:2], 0)
    start = 0
    for end in [*cuts, n]:
        rows = [StepRow(prompt[start:end], start, blocks_b, slot)]
        if data.draw(st.booleans(), label="with a neighbour"):
            rows.insert(data.draw(st.integers(0, 1)), neighbour)
        logits = runner.prefill(rows)
        start = end
    ours = logits[[i for i, r in enumerate(rows) if r.blocks == blocks_b][0]]
    # A one-token chunk runs the decode attention, longer ones the fused kernel: two summation orders.
    assert torch.allclose(ours, whole, atol=1e-3, rtol=1e-3), (ours - whole).abs().max()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(1, 3), slots=st.integers(1, 4), rank=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_gathered_delta_equals_a_naive_per_row_loop(n, t, slots, rank, seed):
    """``LoraBanks.delta`` (gather + two bmm) against a plain loop ``B_s (A_s x)`` per row; the zero slot gives 0."""
    gen = torch.Generator().manual_seed(seed)
    banks = LoraBanks({"m": (6, 5)}, slots, rank, torch.float32, torch.device("cpu"))
    for s in range(slots):
        banks.A[0][s].copy_(torch.randn(rank, 6, generator=gen))
        banks.B[0][s].copy_(torch.randn(5, rank, generator=gen))
    x = torch.randn(n, t, 6, generator=gen)
    route = torch.randint(0, slots + 1, (n,), generator=gen)  # slots itself = the zero slot
    got = banks.delta(0, x, route)
    for i in range(n):
        s = int(route[i])
        want = torch.zeros(t, 5) if s == slots else x[i] @ banks.A[0][s].T @ banks.B[0][s].T
        assert torch.allclose(got[i], want, atol=1e-5), (i, s)
        if s == slots:
            assert torch.count_nonzero(got[i]) == 0
