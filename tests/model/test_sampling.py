"""Batched device sampling: transformers' warpers as the oracle, counter-based seeds, row independence, failures."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.types import SamplingParams
from server.errors import ServerError
from server.model import sampling
from server.model.sampling import (
    NonFiniteLogits,
    counter_hash,
    counter_uniform,
    mix_seed,
    probabilities,
    request_seed,
    sample,
    sampling_tensors,
    select_tokens,
    select_tokens_logprobs,
)

UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
STEP = st.integers(min_value=0, max_value=2**63 - 1)
F64_MAX = torch.finfo(torch.float64).max
MASK = 2**64 - 1
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- a pure-Python SplitMix64, written from the paper, as the reference -----------------------------------------

def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _splitmix_stream(seed: int, n: int) -> list[int]:
    """The sequential generator: ``state += gamma; yield mix(state)``."""
    out, state = [], seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        out.append(_mix(state))
    return out


def _as_int64(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def _hash(seeds: list[int], steps: list[int]) -> list[int]:
    t = counter_hash(torch.tensor([_as_int64(s) for s in seeds]), torch.tensor(steps))
    return [v & MASK for v in t.tolist()]


def _uniforms(seed: int, steps: list[int]) -> list[float]:
    return counter_uniform(torch.tensor([_as_int64(seed)] * len(steps)), torch.tensor(steps)).tolist()


@settings(max_examples=300, deadline=None)
@given(seeds=st.lists(UINT64, min_size=1, max_size=8), data=st.data())
def test_counter_hash_equals_the_python_reference_bit_for_bit(seeds, data):
    steps = data.draw(st.lists(STEP, min_size=len(seeds), max_size=len(seeds)))
    want = [_mix((s + (n + 1) * 0x9E3779B97F4A7C15) & MASK) for s, n in zip(seeds, steps)]
    assert _hash(seeds, steps) == want
    assert [mix_seed((s + n * 0x9E3779B97F4A7C15) & MASK) for s, n in zip(seeds, steps)] == want


@settings(max_examples=30, deadline=None)
@given(seed=UINT64)
def test_counter_hash_is_the_sequential_splitmix64_stream(seed):
    assert _hash([seed] * 200, list(range(200))) == _splitmix_stream(seed, 200)


@settings(max_examples=100, deadline=None)
@given(seed=UINT64, steps=st.lists(STEP, min_size=1, max_size=8))
def test_uniforms_are_the_top_53_bits(seed, steps):
    got = _uniforms(seed, steps)
    for u, h in zip(got, _hash([seed] * len(steps), steps)):
        assert u == (h >> 11) * 2.0**-53
        assert 0.0 <= u < 1.0


# --- seeds (moved from tests/engine/test_sampling_seed.py) ------------------------------------------------------

def _stream(seed: int) -> list[float]:
    return _uniforms(request_seed(SamplingParams(temperature=1.0, seed=seed)), list(range(8)))


@settings(max_examples=60, deadline=None)
@given(seed=UINT64, bit=st.integers(min_value=0, max_value=63))
def test_flipping_any_bit_of_the_seed_changes_the_stream(seed, bit):
    other = seed ^ (1 << bit)
    assert _stream(seed) != _stream(other)
    # the counter's own seed (what the engine passes) too, without the mix in front
    assert _uniforms(seed, list(range(8))) != _uniforms(other, list(range(8)))


@settings(max_examples=30, deadline=None)
@given(seed=UINT64)
def test_the_same_seed_gives_the_same_stream(seed):
    assert _stream(seed) == _stream(seed)
    assert 0 <= mix_seed(seed) < 2**64
    assert request_seed(SamplingParams(seed=seed)) == mix_seed(seed)


def test_seeds_that_share_their_low_32_bits_differ():
    """The reported cases: torch's CPU generator alone kept only the low 32 bits, so these used to collide."""
    for a, b in [(1, 2**32 + 1), (1, 2**63 + 1), (0, 2**63), (12345, 2**63 + 12345)]:
        assert _stream(a) != _stream(b), (a, b)


@settings(max_examples=40, deadline=None)
@given(a=UINT64, b=UINT64)
def test_the_mix_is_one_to_one(a, b):
    assert (mix_seed(a) == mix_seed(b)) == (a == b)


def test_an_unseeded_request_gets_a_fresh_64_bit_seed():
    drawn = {request_seed(SamplingParams(temperature=1.0)) for _ in range(64)}
    assert len(drawn) == 64 and all(0 <= s < 2**64 for s in drawn)
    assert any(s >= 2**63 for s in drawn)  # all 64 bits are used (fails with probability 2**-64)


# --- the oracle: transformers' own processors, row by row -------------------------------------------------------

def _oracle(row: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    """``[V]`` float64: transformers' processors in ``generate``'s order, plus the module's documented numerics
    (float64, finite clamp of the penalty, row max subtracted before the temperature, greedy = one-hot argmax)."""
    x = row.double()[None].clone()
    ids = torch.tensor([seen], dtype=torch.long)
    if p.repetition_penalty != 1.0 and seen:
        y = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, x.clone())
        x = torch.where(torch.isinf(y) & torch.isfinite(x), y.clamp(-F64_MAX, F64_MAX), y)
    if p.temperature == 0:
        return torch.zeros_like(x[0]).scatter(0, x[0].argmax()[None], 1.0)
    x = x - x.max()
    x = TemperatureLogitsWarper(float(p.temperature))(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(int(p.top_k))(ids, x)
    if p.top_p < 1.0:
        y = x[torch.isfinite(x)]
        # transformers' sort is not stable: which of two tied tokens top-p keeps is unspecified there
        assume(len(set(y.tolist())) == len(y))
        x = TopPLogitsWarper(float(p.top_p))(ids, x)
    return torch.softmax(x, dim=-1)[0]


SPECIAL = [-math.inf, -1e308, 1e308, -1e300, 1e300, 5e-324, -5e-324, 0.0, 1e-300]
SCORE = st.one_of(st.floats(-40, 40, allow_nan=False, allow_subnormal=False), st.sampled_from(SPECIAL))
TEMPERATURE = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-300, 1e-30, 1e300, 1.7e308]),
                        st.floats(1e-3, 1e3))
TOP_P = st.one_of(st.just(1.0), st.sampled_from([5e-324, 1e-300, 1e-16, 1.0 - 2**-53]), st.floats(1e-6, 1.0))
TOP_K = st.one_of(st.just(0), st.just(1), st.integers(1, 20), st.just(2**40))
PENALTY = st.one_of(st.just(1.0), st.sampled_from([5e-324, 1e-300, 1e-10, 1e10, 1e300, 1.7e308]),
                    st.floats(0.05, 20))


@st.composite
def rows(draw, vocab=None):
    v = vocab if vocab is not None else draw(st.integers(1, 12))
    scores = draw(st.lists(SCORE, min_size=v, max_size=v, unique=True))
    assume(any(math.isfinite(s) for s in scores))
    params = SamplingParams(temperature=draw(TEMPERATURE), top_p=draw(TOP_P), top_k=draw(TOP_K),
                            repetition_penalty=draw(PENALTY))
    seen = draw(st.lists(st.integers(0, v - 1), max_size=2 * v))
    return scores, params, seen


@st.composite
def batches(draw, min_size=1, max_size=6):
    v = draw(st.integers(1, 12))
    return v, draw(st.lists(rows(vocab=v), min_size=min_size, max_size=max_size))


def _logits(rows_) -> torch.Tensor:
    return torch.tensor([r[0] for r in rows_], dtype=torch.float64)


@SETTINGS
@given(batch=batches())
def test_probabilities_match_transformers_row_by_row(batch):
    _, rows_ = batch
    logits = _logits(rows_)
    got = probabilities(logits, [r[1] for r in rows_], [r[2] for r in rows_])
    for b, (_, p, seen) in enumerate(rows_):
        want = _oracle(logits[b], p, seen)
        assert not torch.isnan(want).any()
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-9, msg=lambda m: f"row {b} {p}: {m}")
        assert (got[b] > 0).any() and abs(float(got[b].sum()) - 1.0) < 1e-12


def _select(rows_, seeds, steps, dtype=torch.float64):
    return select_tokens(_logits(rows_).to(dtype), [r[1] for r in rows_], [r[2] for r in rows_], seeds, steps)


@SETTINGS
@given(batch=batches(), data=st.data())
def test_the_sampled_token_lies_in_the_support(batch, data):
    _, rows_ = batch
    seeds = data.draw(st.lists(UINT64, min_size=len(rows_), max_size=len(rows_)))
    steps = data.draw(st.lists(STEP, min_size=len(rows_), max_size=len(rows_)))
    probs = probabilities(_logits(rows_), [r[1] for r in rows_], [r[2] for r in rows_])
    for b, token in enumerate(_select(rows_, seeds, steps)):
        assert isinstance(token, int)
        assert probs[b, token] > 0


@SETTINGS
@given(batch=batches(min_size=0, max_size=5), row=st.data())
def test_a_rows_token_does_not_depend_on_its_neighbours_or_position(batch, row):
    v, neighbours = batch
    mine = row.draw(rows(vocab=v))
    seed, step = row.draw(UINT64), row.draw(STEP)
    alone = _select([mine], [seed], [step])[0]
    pos = row.draw(st.integers(0, len(neighbours)))
    together = neighbours[:pos] + [mine] + neighbours[pos:]
    seeds = row.draw(st.lists(UINT64, min_size=len(together), max_size=len(together)))
    steps = row.draw(st.lists(STEP, min_size=len(together), max_size=len(together)))
    seeds[pos], steps[pos] = seed, step
    assert _select(together, seeds, steps)[pos] == alone
    assert _select([mine], [seed], [step]) == [alone]  # and it is reproducible


@settings(max_examples=40, deadline=None)
@given(seed=UINT64, step=st.integers(0, 2**62))
def test_same_seed_and_step_same_token_other_steps_other_draws(seed, step):
    v, n = 16384, 32
    flat = [([0.0] * v, SamplingParams(temperature=1.0), [])]
    tokens = _select(flat * n, [seed] * n, [step + i for i in range(n)], dtype=torch.float32)
    assert len(set(tokens)) >= n - 2  # 32 draws from 16384 tokens: >= 3 collisions has probability ~5e-6
    assert _select(flat, [seed], [step]) == tokens[:1]
    uniforms = _uniforms(seed, [step + i for i in range(n)])
    assert len(set(uniforms)) == n


@pytest.mark.parametrize("scores, params", [
    ([1.0, 2.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5], SamplingParams(temperature=1.0)),
    ([1.0, 2.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5], SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
    ([0.0] * 8, SamplingParams(temperature=1.0)),
    ([4.0, 1.0, -math.inf, 1.0, 0.2, 2.0, -3.0, 2.5], SamplingParams(temperature=2.0, top_p=0.8,
                                                                      repetition_penalty=1.3)),
])
def test_empirical_frequencies_match_the_distribution(scores, params):
    n, seen = 40000, [0, 5]
    logits = torch.tensor([scores] * n, dtype=torch.float64)
    st_, errors = sampling_tensors([params] * n, [seen] * n, [mix_seed(7)] * n, list(range(n)), "cpu")
    assert errors == [None] * n
    tokens, status = sample(logits, st_)
    assert (status == 0).all()
    probs = probabilities(logits[:1], [params], [seen])[0]
    counts = torch.bincount(tokens, minlength=len(scores)).double()
    assert (counts[probs == 0] == 0).all()
    support = probs > 0
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 10 * math.sqrt(2 * max(df, 1)) + 10, (chi2, df, counts.tolist(), probs.tolist())


@SETTINGS
@given(batch=batches(min_size=1, max_size=6), data=st.data())
def test_non_finite_rows_fail_alone(batch, data):
    _, rows_ = batch
    b = len(rows_)
    seeds = data.draw(st.lists(UINT64, min_size=b, max_size=b))
    steps = data.draw(st.lists(STEP, min_size=b, max_size=b))
    clean = _select(rows_, seeds, steps)
    bad = data.draw(st.sets(st.integers(0, b - 1), min_size=1))
    logits = _logits(rows_)
    for r in bad:
        poison = data.draw(st.sampled_from(["nan", "inf", "all-inf"]))
        if poison == "all-inf":
            logits[r] = -math.inf
        else:
            logits[r, data.draw(st.integers(0, logits.shape[1] - 1))] = float(poison)
    got = select_tokens(logits, [r[1] for r in rows_], [r[2] for r in rows_], seeds, steps)
    for i in range(b):
        if i in bad:
            assert isinstance(got[i], NonFiniteLogits)
        else:
            assert got[i] == clean[i]


@SETTINGS
@given(batch=batches(), data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_greedy_is_the_argmax_of_the_penalized_scores(batch, data, dtype):
    _, rows_ = batch
    rows_ = [(s, SamplingParams(repetition_penalty=p.repetition_penalty), seen) for s, p, seen in rows_]
    if data.draw(st.booleans()):  # the fast path (no penalty anywhere)
        rows_ = [(s, SamplingParams(), seen) for s, _, seen in rows_]
    logits = _logits(rows_).to(dtype)
    assume(torch.isfinite(logits).any(dim=-1).all() and not torch.isposinf(logits).any())
    b = len(rows_)
    got = select_tokens(logits, [r[1] for r in rows_], [r[2] for r in rows_], [0] * b, list(range(b)))
    for i, (_, p, seen) in enumerate(rows_):
        assert got[i] == int(_oracle(logits[i], p, seen).argmax())
    if all(p.repetition_penalty == 1.0 for _, p, _ in rows_):
        assert got == logits.argmax(dim=-1).tolist()


# --- failures stay in their row; the batch never raises -----------------------------------------------------------

def test_bad_rows_fail_alone_and_the_rest_keep_their_tokens():
    good = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = [good, SamplingParams(temperature=-1.0), good, good, good, SamplingParams(top_p=0.0)]
    seen = [[1, 2], [1], [3, 99], [4], [], [5]]
    seeds = [1, 2, 3, -4, 5, 6]
    steps = [0, 0, 0, 0, 2**63, 0]
    got = select_tokens(logits, params, seen, seeds, steps)
    assert isinstance(got[0], int)
    assert all(isinstance(got[i], ServerError) and not isinstance(got[i], NonFiniteLogits) for i in range(1, 6))
    assert "outside the vocabulary" in str(got[2]) and "seed" in str(got[3]) and "step" in str(got[4])
    assert got[0] == select_tokens(logits[:1], params[:1], seen[:1], seeds[:1], steps[:1])[0]


def test_a_failing_batch_gives_every_row_an_error(monkeypatch):
    params = [SamplingParams(temperature=1.0)] * 3
    got = select_tokens(torch.zeros(2, 5), params, None, [1, 2, 3], [0, 0, 0])  # 2 logit rows for 3 requests
    assert len(got) == 3 and all(isinstance(e, ServerError) for e in got)

    def boom(*_a, **_k):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(sampling, "sample", boom)
    got = select_tokens(torch.zeros(3, 5), params, None, [1, 2, 3], [0, 0, 0])
    assert all(isinstance(e, ServerError) and "device fell over" in str(e) for e in got)


@pytest.mark.parametrize("params", [
    [SamplingParams()] * 3,  # fast path
    [SamplingParams(), SamplingParams(temperature=0.9, top_k=3, top_p=0.5, repetition_penalty=1.5),
     SamplingParams(repetition_penalty=0.5)],
])
def test_one_host_sync_per_batch(monkeypatch, params):
    """The whole batch comes back through one ``tolist``; nothing else reads a tensor on the host."""
    calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(tuple(self.shape))
        return real_tolist(self)

    def forbidden(self, *_a):
        raise AssertionError("a host read of a tensor")

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    for name in ("item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    got = select_tokens(logits, params, [[1, 2], [3], [4, 5, 6]], [1, 2, 3], [0, 1, 2])
    monkeypatch.undo()
    assert all(isinstance(t, int) for t in got), got
    assert calls == [(2, 3)]


# --- boundaries a random sweep rarely hits ----------------------------------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(scores=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=10, unique=True), data=st.data())
def test_top_p_exactly_on_a_cumulative_boundary_matches_transformers(scores, data):
    """transformers drops a token whose ascending cumulative mass is ``<= 1 - top_p``; pick ``top_p`` so that
    the comparison is an exact equality."""
    row = torch.tensor([scores], dtype=torch.float64)
    shifted = row - row.max()
    cum = torch.softmax(torch.sort(shifted, dim=-1).values, dim=-1).cumsum(dim=-1)[0].tolist()
    c = data.draw(st.sampled_from(cum[:-1]))
    exact = [t for t in (1 - c, math.nextafter(1 - c, 0), math.nextafter(1 - c, 2)) if 0 < t <= 1 and 1 - t == c]
    assume(exact)
    top_p = exact[0]
    p = SamplingParams(temperature=1.0, top_p=top_p)
    torch.testing.assert_close(probabilities(row, [p])[0], _oracle(row[0], p, []), rtol=0, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=10), data=st.data())
def test_inverse_cdf_never_returns_a_zero_weight_token(weights, data):
    assume(any(weights))
    w = torch.tensor([weights], dtype=torch.float64)
    total = float(w.sum())
    # the edges: u = 0, the largest u, and every u that lands exactly on a cumulative boundary
    u = data.draw(st.one_of(st.sampled_from([0.0, 1 - 2**-53]), st.floats(0, 1, exclude_max=True),
                            st.sampled_from([c / total for c in w.cumsum(-1)[0].tolist()[:-1]] or [0.0])))
    assume(0 <= u < 1)
    token = int(sampling.inverse_cdf(w, torch.tensor([u], dtype=torch.float64))[0])
    assert weights[token] > 0
    below = sum(weights[:token])
    assert below <= u * total < below + weights[token] or token == max(i for i, x in enumerate(weights) if x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu():
    """int64 wrap-around and the batched pipeline on CUDA: the same hash bits, the same distributions and tokens
    (V small enough that the reductions do not depend on the device)."""
    gen = torch.Generator().manual_seed(3)
    seeds = [int(s) for s in torch.randint(0, 2**62, (64,), generator=gen)] + [2**64 - 1, 2**63, 0]
    steps = [int(s) for s in torch.randint(0, 2**62, (67,), generator=gen)]
    s64 = torch.tensor([_as_int64(s) for s in seeds])
    n = torch.tensor(steps)
    assert counter_hash(s64.cuda(), n.cuda()).tolist() == counter_hash(s64, n).tolist()
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r)
              for t in (0.0, 0.5, 1.3) for p in (1.0, 0.7) for k in (0, 3) for r in (1.0, 1.4)]
    logits = torch.randn(len(params), 10, generator=gen, dtype=torch.float64)
    seen = [[1, 2, 2, 7]] * len(params)
    torch.testing.assert_close(probabilities(logits.cuda(), params, seen).cpu(), probabilities(logits, params, seen),
                               rtol=0, atol=1e-12)
    args = (params, seen, seeds[:len(params)], steps[:len(params)])
    assert select_tokens(logits.cuda(), *args) == select_tokens(logits, *args)


def test_an_empty_batch():
    assert select_tokens(torch.zeros(0, 7), [], [], [], []) == []


# --- log-probabilities (select_tokens_logprobs) -----------------------------------------------------------------

def _logprob_oracle(row: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    """``[V]`` float32: log_softmax of transformers' penalized scores divided by the temperature (1 for greedy),
    before top-k / top-p (the module's numerics: float64, finite penalty clamp, row max subtracted first)."""
    x = row.double()[None].clone()
    ids = torch.tensor([seen], dtype=torch.long)
    if p.repetition_penalty != 1.0 and seen:
        y = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, x.clone())
        x = torch.where(torch.isinf(y) & torch.isfinite(x), y.clamp(-F64_MAX, F64_MAX), y)
    x = x - x.max()
    if p.temperature > 0:
        x = TemperatureLogitsWarper(float(p.temperature))(ids, x)
    return torch.log_softmax(x, dim=-1)[0].float()


@SETTINGS
@given(batch=batches(), data=st.data())
def test_logprobs_match_the_oracle_and_leave_tokens_unchanged(batch, data):
    v, rows_ = batch
    n = len(rows_)
    seeds = data.draw(st.lists(UINT64, min_size=n, max_size=n))
    steps = data.draw(st.lists(STEP, min_size=n, max_size=n))
    asks = data.draw(st.lists(st.integers(-1, 25), min_size=n, max_size=n))
    logits = _logits(rows_)
    params, seen = [r[1] for r in rows_], [r[2] for r in rows_]
    tokens, lps = select_tokens_logprobs(logits, params, seen, seeds, steps, asks)
    assert tokens == select_tokens(logits, params, seen, seeds, steps)  # asking never changes a token
    for b, (tok, lp, k) in enumerate(zip(tokens, lps, asks)):
        if k < 0:
            assert lp is None
            continue
        want = _logprob_oracle(logits[b], params[b], seen[b])
        close = dict(rtol=1e-6, atol=1e-6, equal_nan=False)
        torch.testing.assert_close(torch.tensor(lp.logprob), want[tok], **close)
        assert len(lp.top) == min(k, v)
        top_values = torch.tensor([x for _, x in lp.top], dtype=torch.float32)
        torch.testing.assert_close(top_values, torch.topk(want, min(k, v)).values, **close)
        for tid, value in lp.top:  # each reported id carries its own value (ties may come in any order)
            torch.testing.assert_close(torch.tensor(value), want[tid], **close)
        # a row's log-probabilities do not depend on its neighbours
        alone = select_tokens_logprobs(logits[b:b + 1], [params[b]], [seen[b]], [seeds[b]], [steps[b]], [k])
        assert alone == ([tok], [lp])


def test_logprobs_of_a_greedy_row_are_the_raw_log_softmax():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    tokens, lps = select_tokens_logprobs(logits, [SamplingParams()] * 2, None, [0, 0], [0, 0], [5, -1])
    want = torch.log_softmax(logits[0], dim=-1)
    assert tokens[0] == int(want.argmax()) and lps[1] is None
    assert abs(lps[0].logprob - float(want.max())) < 1e-6
    values, ids = torch.topk(want, 5)
    assert [t for t, _ in lps[0].top] == ids.tolist()
    assert [x for _, x in lps[0].top] == pytest.approx(values.tolist(), abs=1e-6)


def test_logprobs_come_back_in_the_one_host_sync(monkeypatch):
    calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(tuple(self.shape))
        return real_tolist(self)

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=3), SamplingParams(repetition_penalty=0.5)]
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    tokens, lps = select_tokens_logprobs(logits, params, [[1, 2], [3], [4, 5, 6]], [1, 2, 3], [0, 1, 2],
                                         [3, -1, 0])
    monkeypatch.undo()
    assert len(calls) == 1
    assert lps[1] is None and len(lps[0].top) == 3 and lps[2].top == ()


def test_a_failing_row_gets_no_logprobs():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = math.nan
    tokens, lps = select_tokens_logprobs(logits, [SamplingParams()] * 2, None, [0, 0], [0, 0], [2, 2])
    assert isinstance(tokens[1], NonFiniteLogits) and lps[1] is None and lps[0] is not None


# --- allowed-token bitmasks (structured output) ------------------------------------------------------------------------

@given(b=st.integers(1, 4), v=st.integers(1, 100), extra_words=st.integers(0, 2), data=st.data())
@settings(max_examples=60, deadline=None)
def test_apply_allowed_matches_a_naive_bit_loop(b, v, extra_words, data):
    """Bit ``t % 32`` of word ``t // 32`` allows token t (llguidance's layout), for any V (not only multiples of
    32), extra words past the vocabulary ignored; other logits are untouched."""
    words = (v + 31) // 32 + extra_words
    raw = data.draw(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), min_size=words, max_size=words),
                             min_size=b, max_size=b))
    mask = torch.tensor(raw, dtype=torch.int32)
    logits = torch.randn(b, v, dtype=torch.bfloat16)
    out = sampling.apply_allowed(logits, mask)
    for i in range(b):
        for t in range(v):
            allowed = (raw[i][t // 32] >> (t % 32)) & 1
            assert out[i, t].item() == (logits[i, t].item() if allowed else -math.inf)
    assert out.dtype == logits.dtype


def test_select_tokens_never_picks_a_forbidden_token():
    """With a mask allowing only the two least likely tokens, greedy and sampled rows choose among those two, and
    a row that allows nothing fails alone (NonFiniteLogits)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    lowest = logits.argsort(dim=-1)[:, :2]
    mask = torch.zeros(3, 2, dtype=torch.int32)
    for row in range(2):
        for t in lowest[row].tolist():
            mask[row, t // 32] |= (1 << (t % 32)) if t % 32 != 31 else -2**31
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams()]
    for step in range(20):
        tokens = sampling.select_tokens_logprobs(logits, params, None, [7, 7, 7], [step] * 3, allowed=mask)[0]
        assert tokens[0] == lowest[0][logits[0, lowest[0]].argmax()].item()
        assert tokens[1] in lowest[1].tolist()
        assert isinstance(tokens[2], sampling.NonFiniteLogits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_needs_no_host_sync():
    """Copying a step's bitmask to the device and applying it never waits for the device (CUDA's sync debug mode
    raises on any synchronizing call)."""
    logits = torch.randn(8, 49152, device="cuda")
    mask = torch.randint(-2**31, 2**31 - 1, (8, 49152 // 32), dtype=torch.int32).numpy()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampling.apply_allowed(logits, sampling.allowed_to_device(mask, logits.device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expect = sampling.apply_allowed(logits.cpu(), torch.from_numpy(mask))
    assert torch.equal(out.cpu(), expect)
