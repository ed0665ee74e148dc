"""The KV block allocator and the chunked-prefill plan (pure functions), and the engine when the KV cache is full:
requests wait, running ones are never corrupted, and one that can never fit is refused naming the field."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.scheduler import BlockAllocator, blocks_needed, plan_chunks
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import FailedPrecondition, ResourceExhausted
from server.model.kv_cache import SCRATCH_BLOCK, bytes_per_token
from tests.engine_harness import build_engine
from tests.tiny import save_tiny_base


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(2, 40), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_allocator_never_hands_out_the_scratch_block_or_a_block_twice(num_blocks, ops):
    alloc = BlockAllocator(num_blocks)
    held: list[list[int]] = []
    for take, n in ops:
        if take:
            got = alloc.allocate(n)
            if n > alloc.free + (len(got) if got else 0):
                assert got is None
            if got is not None:
                assert len(got) == n and SCRATCH_BLOCK not in got
                assert not set(got) & {b for h in held for b in h}
                held.append(got)
        elif held:
            alloc.release(held.pop(n % len(held)))
        assert alloc.free + sum(map(len, held)) == alloc.capacity == num_blocks - 1


def test_release_refuses_what_would_let_two_sequences_share_a_block():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.release(blocks)
    for bad in (blocks[:1], [SCRATCH_BLOCK], [4]):
        with pytest.raises(ValueError):
            alloc.release(bad)


@settings(max_examples=300, deadline=None)
@given(remaining=st.lists(st.integers(1, 5000), max_size=10), budget=st.integers(1, 4096),
       max_rows=st.integers(1, 8))
def test_prefill_plan_stays_in_budget_and_always_progresses(remaining, budget, max_rows):
    chunks = plan_chunks(remaining, budget, max_rows)
    if not remaining:
        assert chunks == []
        return
    assert 1 <= len(chunks) <= max_rows
    assert chunks[0] == min(remaining[0], budget)  # the oldest prompt always advances
    assert all(1 <= c <= r for c, r in zip(chunks, remaining))
    assert len(chunks) * max(chunks) <= budget or len(chunks) == 1  # padded rows x T within the budget


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("sched"))


def _req(i, n=40, prompt="abc"):
    return GenerationRequest(f"r{i}", prompt=f"{prompt}{i}", params=SamplingParams(max_new_tokens=n, ignore_eos=True))


def test_a_full_cache_makes_requests_wait_and_corrupts_nobody(tmp_path, base):
    """Room for two requests' blocks: six submitted at once finish one pair after another with the answers they
    give alone (float32), blocks coming back as they end."""
    per_token = bytes_per_token(2, 2, 16, torch.float32)  # the tiny model: 2 layers, 2 KV heads of 16
    block = 4
    per_request = blocks_needed(4 + 40, block)  # prompt "abcN" (4 tokens) + 40 new
    eng, _, metrics = build_engine(tmp_path, base, {}, compute_dtype=torch.float32, max_batch_size=6,
                                   kv_block_size=block, kv_cache_bytes=(2 * per_request + 1) * block * per_token)
    try:
        assert eng.allocator.capacity == 2 * per_request
        alone = [eng.generate(_req(i)).token_ids for i in range(6)]
        streams = [eng.submit(_req(i)) for i in range(6)]
        assert [s.result().token_ids for s in streams] == alone
        assert eng.allocator.free == eng.allocator.capacity
        assert metrics.registry.get_sample_value("qlora_server_kv_cache_blocks", {"state": "used"}) == 0
        with pytest.raises(ResourceExhausted) as err:  # more than the whole cache: refused at once
            eng.submit(_req(9, n=4 * per_request * block))
        assert err.value.field == "max_new_tokens"
        with pytest.raises(ResourceExhausted) as err:  # the prompt alone does not fit: its field, not the other
            eng.submit(_req(9, n=1, prompt="x" * (2 * per_request * block)))
        assert err.value.field == "prompt"
    finally:
        eng.stop()


def test_a_kv_cache_larger_than_memory_is_refused_naming_the_field():
    from server.model.runner import kv_cache_blocks

    with pytest.raises(FailedPrecondition) as err:
        kv_cache_blocks(1 << 60, torch.device("cpu"), 1024, 16, 4, 128)
    assert err.value.field == "kv_cache_bytes"
    assert kv_cache_blocks(1, torch.device("cpu"), 1024, 16, 4, 128) == 2  # the scratch block and one more
