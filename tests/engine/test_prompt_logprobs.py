"""Prompt log-probabilities through the engine: transformers' (and PEFT's) own log-softmax at every prompt position,
whatever the prefill chunking and the batch's other rows, carried by the request's first event only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.types import ChatMessage, GenerationRequest, SamplingParams, build_sampling_params
from server.errors import InvalidArgument
from tests.engine_harness import build_engine
from tests.tiny import load_nf4, make_adapter, save_tiny_base

TOLERANCE = 1e-4
#: With an adapter: bitsandbytes' CPU 4-bit matmul rounds its output to bfloat16 even at float32 compute, so the
#: last-ulp difference between our batched LoRA term and PEFT's (or between two chunkings) now and then flips one
#: rounding, which moves a log-probability by up to a few 1e-4. Base-model rows stay at TOLERANCE.
LORA_TOLERANCE = 2e-3
ADAPTER = "scorer"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``(engine, oracles)``: a running float32-compute engine with one adapter, and per adapter id ("" = base) a
    function ``ids → [len(ids), V]`` float32 log-softmax of transformers' forward (PEFT's for the adapter)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("prompt-logprobs")
    base_dir = save_tiny_base(root)
    adapter_dir = make_adapter(base_dir, root / "src", seed=7, std=0.05,  # every projection
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    eng, _, _ = build_engine(root, base_dir, {ADAPTER: adapter_dir}, compute_dtype=torch.float32)
    peft = PeftModel.from_pretrained(load_nf4(base_dir, torch.float32), adapter_dir).eval()

    def oracle(model):
        def run(ids: list[int]) -> torch.Tensor:
            with torch.inference_mode():
                return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        return run

    yield eng, {"": oracle(eng.model), ADAPTER: oracle(peft)}
    eng.stop()


def req(rid, prompt="the quick brown fox", adapter="", **params) -> GenerationRequest:
    return GenerationRequest(request_id=rid, adapter_id=adapter, prompt=prompt,
                             params=SamplingParams(**{"max_new_tokens": 3, "ignore_eos": True, **params}))


def check_against_oracle(eng, oracles, request, result, k: int) -> None:
    """``result.prompt_logprobs`` are the oracle's log-softmax at prompt positions 0 … n-2 (each predicting the
    next prompt token), with the k most likely tokens there."""
    ids = eng._tokenize(request)
    lsm = oracles[request.adapter_id](ids)
    tol = LORA_TOLERANCE if request.adapter_id else TOLERANCE
    assert result.prompt_tokens == len(ids)
    assert [e.token_id for e in result.prompt_logprobs] == ids[1:]
    for pos, entry in enumerate(result.prompt_logprobs):
        assert entry.token == eng.tokenizer.decode([ids[pos + 1]], skip_special_tokens=False)
        assert abs(entry.logprob - lsm[pos, ids[pos + 1]].item()) < tol
        values, top = torch.topk(lsm[pos], k)
        if not request.adapter_id:  # the ranking itself could swap two near-tied tokens at the adapter's tolerance
            assert [t.token_id for t in entry.top_logprobs] == top.tolist()
        assert len(entry.top_logprobs) == k
        assert all(abs(t.logprob - v) < tol for t, v in zip(entry.top_logprobs, values.tolist()))
        assert all(t.token == eng.tokenizer.decode([t.token_id], skip_special_tokens=False)
                   for t in entry.top_logprobs)


@pytest.mark.parametrize("adapter", ["", ADAPTER])
@pytest.mark.parametrize("k", [0, 4])
def test_prompt_logprobs_equal_transformers(world, adapter, k):
    eng, oracles = world
    request = req(f"o-{adapter}-{k}", adapter=adapter, prompt_logprobs=k)
    result = eng.generate(request)
    assert len(result.prompt_logprobs) == result.prompt_tokens - 1
    check_against_oracle(eng, oracles, request, result, k)


def test_the_adapter_changes_them(world):
    eng, _ = world
    base = eng.generate(req("b", prompt_logprobs=0)).prompt_logprobs
    tuned = eng.generate(req("t", adapter=ADAPTER, prompt_logprobs=0)).prompt_logprobs
    assert max(abs(a.logprob - b.logprob) for a, b in zip(base, tuned)) > 20 * LORA_TOLERANCE


def test_sampling_parameters_do_not_shape_them_and_asking_does_not_change_the_output(world):
    """The raw logits' log-softmax: temperature and repetition penalty (which do shape generated-token logprobs)
    leave prompt log-probabilities alone; and a request's sampled tokens are the same whether it asks or not."""
    eng, _ = world
    plain = eng.generate(req("g", prompt_logprobs=2))
    shaped = dict(temperature=0.7, repetition_penalty=1.5, top_k=5, seed=3)
    sampled = eng.generate(req("s", prompt_logprobs=2, **shaped))
    assert sampled.prompt_logprobs == plain.prompt_logprobs
    assert eng.generate(req("s2", **shaped)).token_ids == sampled.token_ids
    assert eng.generate(req("n")).prompt_logprobs == ()


def test_chat_messages_score_the_rendered_prompt(world):
    eng, oracles = world
    request = GenerationRequest(request_id="chat", messages=(ChatMessage("user", "hi there"),),
                                params=SamplingParams(max_new_tokens=2, prompt_logprobs=1))
    result = eng.generate(request)
    assert result.prompt_tokens > len("hi there") and len(result.prompt_logprobs) == result.prompt_tokens - 1
    check_against_oracle(eng, oracles, request, result, 1)


def test_first_event_only_and_streaming_equals_unary(world):
    eng, _ = world
    events = list(eng.submit(req("st", prompt_logprobs=3, logprobs=True)))
    assert events[0].prompt_logprobs and events[0].text == "" and events[0].token_ids == ()
    assert all(e.prompt_logprobs == () for e in events[1:])
    unary = eng.generate(req("un", prompt_logprobs=3, logprobs=True))
    assert events[0].prompt_logprobs == unary.prompt_logprobs
    assert [lp for e in events for lp in e.logprobs] == list(unary.logprobs)


def test_a_one_token_prompt_has_none(world):
    eng, _ = world
    events = list(eng.submit(req("one", prompt="a", prompt_logprobs=5)))
    assert all(e.prompt_logprobs == () for e in events)
    result = eng.generate(req("one2", prompt="a", prompt_logprobs=5))
    assert result.prompt_tokens == 1 and result.prompt_logprobs == ()


@settings(max_examples=12, deadline=None)
@given(prefill_tokens=st.integers(1, 24), prefill_chunk=st.integers(1, 3))
def test_chunked_prefill_gives_the_unchunked_answer(world, prefill_tokens, prefill_chunk):
    """Whatever the token budget per prefill step and rows per step — so whichever positions end a chunk and
    predict the next chunk's first token — every request gets the oracle's values, its neighbours too."""
    eng, oracles = world
    saved = eng.config
    eng.config = dataclasses.replace(saved, prefill_tokens=prefill_tokens, prefill_chunk=prefill_chunk)
    try:
        requests = [req("c0", prompt="a longer prompt, to be split in many chunks", prompt_logprobs=2),
                    req("c1", adapter=ADAPTER, prompt="another prompt of some length", prompt_logprobs=0),
                    req("c2", prompt="and one that does not ask")]
        streams = [eng.submit(r) for r in requests]
        results = [s.result() for s in streams]
    finally:
        eng.config = saved
    for request, result in zip(requests[:2], results):
        check_against_oracle(eng, oracles, request, result, request.params.prompt_logprobs)
    assert results[2].prompt_logprobs == ()


def test_rows_asking_and_not_asking_in_one_prefill_step(tmp_path):
    """Requests queued before the loop starts are prefilled in one step: the asking rows get the oracle's values,
    the others none, and every row the tokens it gets alone."""
    base_dir = save_tiny_base(tmp_path)
    eng, _, _ = build_engine(tmp_path, base_dir, {}, start=False, compute_dtype=torch.float32, prefill_chunk=4)
    steps = []
    real = eng.runner.prefill_scored

    def spy(rows, scoring):
        steps.append([sc is not None for sc in scoring])
        return real(rows, scoring)
    eng.runner.prefill_scored = spy

    def oracle(ids):
        with torch.inference_mode():
            return torch.log_softmax(eng.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    try:
        asks = {"hello there": None, "zz top": 3, "a third one": None, "four": 0}
        requests = [req(f"m{i}", prompt=p, prompt_logprobs=k) for i, (p, k) in enumerate(asks.items())]
        streams = [eng.submit(r) for r in requests]
        eng.start()
        mixed = [s.result() for s in streams]
        assert steps == [[False, True, False, True]]  # one step, both kinds of rows
        for request, got in zip(requests, mixed):
            k = request.params.prompt_logprobs
            assert got.token_ids == eng.generate(dataclasses.replace(request, request_id="alone")).token_ids
            if k is None:
                assert got.prompt_logprobs == ()
            else:
                check_against_oracle(eng, {"": oracle}, request, got, k)
    finally:
        eng.stop()


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0, "3"])
def test_out_of_range_values_name_the_field(world, bad):
    eng, _ = world
    with pytest.raises(InvalidArgument) as info:
        eng.submit(req("bad", prompt_logprobs=bad))
    assert info.value.field == "prompt_logprobs"
    with pytest.raises(InvalidArgument) as info:
        build_sampling_params({"prompt_logprobs": bad}, 64)
    assert info.value.field == "prompt_logprobs"


def test_valid_values_are_accepted():
    for k in (None, 0, 1, 20):
        assert build_sampling_params({"prompt_logprobs": k}, 64).prompt_logprobs == k
