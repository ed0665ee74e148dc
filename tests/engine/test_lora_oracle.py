"""Mixed-adapter batches through the LoRA banks must give each row what PEFT's PeftModel gives for that adapter alone."""

from __future__ import annotations

import pytest
import torch

from server.adapters.types import BaseModelSpec
from server.adapters.validation import validate_adapter_dir
from server.engine import batch as kv
from server.model.lora import attach_router
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    base_dir = save_tiny_base(root)
    dirs = {name: make_adapter(base_dir, root / name, **kw) for name, kw in ADAPTERS.items()}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for _, n in ROWS]
    forced = [torch.randint(1, 256, (DECODE_STEPS,), generator=gen).tolist() for _ in ROWS]
    return base_dir, dirs, prompts, forced


def peft_logits(base_dir, adapter_dir, ids: list[int]) -> torch.Tensor:
    """Reference: the whole sequence through PeftModel (or the plain NF4 model), last position's logits [V]."""
    from peft import PeftModel

    model = load_nf4(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_mixed_batch_matches_peft_per_row(world):
    base_dir, dirs, prompts, forced = world
    model = load_nf4(base_dir)
    router = attach_router(model, slots=4, max_rank=16, dtype=torch.float32, max_batch_size=8)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    slot_of = {}
    for slot, name in enumerate(ADAPTERS):
        router.load(slot, validate_adapter_dir(dirs[name], spec))
        slot_of[name] = slot
    row_slots = [slot_of[a] if a else -1 for a, _ in ROWS]

    # Prefill in groups (one forward pass per group, left-padded, mixed adapters inside a group) and join
    # every group into one batch, as the engine does when requests arrive at different times.
    ours: list[list[torch.Tensor]] = [[] for _ in ROWS]
    state = None
    for group in ([0, 1, 2], [3], [4, 5]):
        router.set_rows([row_slots[b] for b in group])
        part, logits = kv.prefill(model, [prompts[b] for b in group])
        for i, b in enumerate(group):
            ours[b].append(logits[i].float())
        state = kv.concatenate(state, part)
    # Decode steps with every row in ONE forward pass, each routed to its own adapter; tokens are forced so
    # the reference sees the same sequences.
    for step in range(DECODE_STEPS):
        router.set_rows(row_slots)
        logits = kv.decode(model, state, [f[step] for f in forced])
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


def test_unrouted_rows_equal_plain_base(world):
    """Rows without an adapter get exactly the base model, even with adapters loaded in other slots."""
    base_dir, dirs, prompts, _ = world
    model = load_nf4(base_dir)
    router = attach_router(model, slots=2, max_rank=16, dtype=torch.float32, max_batch_size=4)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    router.load(0, validate_adapter_dir(dirs["r8_all"], spec))
    plain = load_nf4(base_dir)
    ids = torch.tensor([prompts[1]])
    with torch.inference_mode():
        router.set_rows([-1])
        mine = model(input_ids=ids).logits
        router.set_rows([0])
        adapted = model(input_ids=ids).logits
        ref = plain(input_ids=ids).logits
    assert torch.equal(mine, ref)
    assert not torch.allclose(adapted, ref)


def test_slot_reuse_clears_old_weights(world):
    """Loading a narrower adapter over a wider one leaves no trace of the old factors."""
    base_dir, dirs, prompts, _ = world
    model = load_nf4(base_dir)
    router = attach_router(model, slots=1, max_rank=16, dtype=torch.float32, max_batch_size=2)
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    router.load(0, validate_adapter_dir(dirs["r8_all"], spec))
    router.load(0, validate_adapter_dir(dirs["r2_attn"], spec))
    router.set_rows([0])
    with torch.inference_mode():
        got = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].float()
    ref = peft_logits(base_dir, dirs["r2_attn"], prompts[0])
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    layer = router.modules["model.layers.0.mlp.down_proj"]
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) == 0
