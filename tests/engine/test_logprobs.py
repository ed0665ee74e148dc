"""Token log-probabilities through the engine: an oracle against transformers' own forward, streaming vs unary,
and neighbours that do not ask are unaffected."""

from __future__ import annotations

import pytest
import torch

from server.engine.types import GenerationRequest, SamplingParams
from tests.engine_harness import build_engine
from tests.tiny import save_tiny_base


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    base_dir = save_tiny_base(root)
    eng, _, _ = build_engine(root, base_dir, {}, compute_dtype=torch.float32)
    yield eng
    eng.stop()


def req(rid, prompt="hello there", **params):
    return GenerationRequest(request_id=rid, prompt=prompt, params=SamplingParams(**{"max_new_tokens": 8, **params}))


def oracle_logits(eng, request, token_ids) -> torch.Tensor:
    """transformers' own forward (float32) over prompt + output: the logits that chose each output token."""
    prompt = eng._tokenize(request)
    ids = torch.tensor([prompt + list(token_ids)])
    with torch.no_grad():
        logits = eng.model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(token_ids)]


def test_greedy_logprobs_equal_transformers_log_softmax(engine):
    request = req("g", top_logprobs=5, ignore_eos=True)
    result = engine.generate(request)
    assert len(result.logprobs) == len(result.token_ids) == result.completion_tokens == 8
    lsm = torch.log_softmax(oracle_logits(engine, request, result.token_ids), dim=-1)
    for pos, (tok, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        assert lp.token_id == tok
        assert lp.token == engine.tokenizer.decode([tok], skip_special_tokens=False)
        assert abs(lp.logprob - lsm[pos, tok].item()) < 1e-4
        values, ids = torch.topk(lsm[pos], 5)
        assert [t.token_id for t in lp.top_logprobs] == ids.tolist()
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(lp.top_logprobs, values.tolist()))
        assert lp.top_logprobs[0].token_id == tok  # greedy: the chosen token is the most likely


def test_temperature_logprobs_are_log_softmax_of_scaled_logits(engine):
    t = 0.7
    request = req("t", temperature=t, top_k=3, seed=5, top_logprobs=2, ignore_eos=True)
    result = engine.generate(request)
    lsm = torch.log_softmax(oracle_logits(engine, request, result.token_ids) / t, dim=-1)
    for pos, (tok, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        assert abs(lp.logprob - lsm[pos, tok].item()) < 1e-4
        assert [x.token_id for x in lp.top_logprobs] == torch.topk(lsm[pos], 2).indices.tolist()
    # asking does not change the sampled tokens
    assert engine.generate(req("t2", temperature=t, top_k=3, seed=5, ignore_eos=True)).token_ids == result.token_ids


def test_logprobs_without_top_and_rows_not_asking(engine):
    asks = engine.submit(req("a", logprobs=True, ignore_eos=True))
    plain = [engine.submit(req(f"p{i}", prompt=p, ignore_eos=True)) for i, p in enumerate(["zz", "hello there"])]
    a, *rest = asks.result(), *(s.result() for s in plain)
    assert len(a.logprobs) == 8 and all(lp.top_logprobs == () for lp in a.logprobs)
    assert all(r.logprobs == () for r in rest)
    alone = [engine.generate(req(f"q{i}", prompt=p, ignore_eos=True)) for i, p in enumerate(["zz", "hello there"])]
    assert [r.token_ids for r in rest] == [r.token_ids for r in alone]


def test_stream_chunks_carry_the_unary_values(engine):
    events = list(engine.submit(req("s", top_logprobs=3, max_new_tokens=10, ignore_eos=True)))
    assert all(len(e.logprobs) == len(e.token_ids) for e in events)
    streamed = [lp for e in events for lp in e.logprobs]
    unary = engine.generate(req("u", top_logprobs=3, max_new_tokens=10, ignore_eos=True))
    assert tuple(streamed) == unary.logprobs
    assert [lp.token_id for lp in streamed] == list(unary.token_ids)


def test_token_bytes_are_the_exact_bytes_of_each_token(engine):
    """The byte tokenizer's id is its byte: every reported token and alternative carries exactly that byte, also
    where the token alone is no character and its text reads U+FFFD (id 255 excepted: llguidance reserves byte
    0xFF, which UTF-8 never contains)."""
    result = engine.generate(req("bytes", prompt="日本語 ok", top_logprobs=5, ignore_eos=True, max_new_tokens=12))
    special = set(engine.tokenizer.all_special_ids)
    checked = 0
    for lp in result.logprobs:
        for tid, raw in [(lp.token_id, lp.token_bytes)] + [(t.token_id, t.token_bytes) for t in lp.top_logprobs]:
            if tid not in special and tid != 255:
                assert raw == bytes([tid])
                checked += 1
    assert checked >= 12
