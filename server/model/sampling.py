"""Batched next-token choice on the device: repetition penalty, temperature, top-k, top-p, greedy, counter-based seeds.

Numerics (the same contract as the per-row sampler this replaces): every accepted parameter value gives a valid
distribution. Rows are processed in float64. The repetition penalty (CTRL, Keskar et al. 2019, as transformers'
``RepetitionPenaltyLogitsProcessor``: a positive score is divided by the penalty, a negative one multiplied, once
per distinct token of prompt + output) is clamped to float64's finite range, so a tiny or huge penalty never
creates an infinity (a ``-inf`` score stays ``-inf``). Greedy rows (temperature 0) take the argmax of the
penalized scores. Sampled rows subtract their maximum first, so the most likely token's score is exactly 0 before
the temperature divides it (``0 / T == 0`` for every ``T > 0``) and the others are ``<= 0``: a temperature so small
that ``logit / T`` would overflow becomes greedy (ties share the mass), a huge one tends to uniform, and one finite
score always survives. Then top-k and top-p (nucleus, Holtzman et al. 2019) filter, in transformers' order and
with transformers' tie and boundary rules (top-k keeps every token tied with the k-th score; top-p keeps the
smallest set of most likely tokens whose mass reaches ``top_p``, never fewer than one).

Randomness is counter-based: row b's one uniform is a pure function of ``(seeds[b], steps[b])`` — output number
``steps[b]`` of SplitMix64 (Steele, Lea & Flood 2014) seeded with ``seeds[b]``, computed with integer tensor ops on
the device — so a sampled token depends neither on the batch's other rows, its size nor the row's position, and
re-running a step (a retry, a recompute after preemption) gives the same token. The token is drawn by inverse CDF
over the filtered distribution.

A row whose logits contain NaN or +inf (or are all -inf) fails alone with :class:`NonFiniteLogits`; a row whose
parameters, seed, step or seen ids are out of range fails alone with a :class:`ServerError`; the other rows are
unaffected. Per row, everything above is elementwise or a reduction along that row, so rows never mix.

Entry points: :func:`request_seed` (once per request, at submit), :func:`select_tokens` (one call per step, one
host sync; :func:`select_tokens_logprobs` also returns log-probabilities, see :func:`logprob_scores`, for the rows
that ask, in the same sync), and for a model runner that keeps its own device buffers :func:`sampling_tensors` +
:func:`sample` (no sync). :func:`probabilities` returns the exact per-row distribution that :func:`sample` draws from.
Prompt scoring (``SamplingParams.prompt_logprobs``) is apart from sampling: :func:`prompt_logprob_scores` (the raw
logits' float32 log-softmax at every scored prompt position, on the device) and :func:`prompt_scores_to_host`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.types import SEED_MAX, SamplingParams
from server.errors import ServerError

_FLOAT64_MAX = torch.finfo(torch.float64).max
_MASK64 = (1 << 64) - 1
#: SplitMix64's increment (the odd integer nearest 2**64 / golden ratio).
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

#: Row status codes returned by :func:`sample` next to the tokens.
OK, NON_FINITE, BAD_SEEN_ID = 0, 1, 2


class NonFiniteLogits(ServerError):
    """The model produced NaN or +inf logits (or only -inf) for a row: INTERNAL, that row's request fails."""


def mix_seed(seed: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014):
    a bijection of uint64 whose every output bit depends on all 64 input bits. Returns an int in
    ``0 .. 2**64 - 1``: CUDA's Philox generator uses all of it, PyTorch's CPU generator its low 32 bits (which
    still depend on every bit of ``seed``)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def request_seed(params: SamplingParams) -> int:
    """A request's 64-bit sampling seed, drawn once when the request is submitted.

    ``mix_seed(params.seed)`` when the client gave a seed (``0 .. 2**64 - 1``, checked by
    :meth:`SamplingParams.validate`): a bijection, so distinct client seeds give distinct streams and every one of
    their 64 bits matters. Otherwise a fresh random value from the OS (``secrets.randbits(64)``). Returns an int in
    ``0 .. 2**64 - 1``; pass it as the row's ``seeds[b]`` at every step.
    """
    if params.seed is not None:
        return mix_seed(int(params.seed))
    return secrets.randbits(64)


def _signed(u: int) -> int:
    """The int64 with the same 64-bit pattern as uint64 ``u``."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: torch's ``>>`` is arithmetic, so mask the sign copies away."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def counter_hash(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """SplitMix64 (Steele, Lea & Flood 2014) as a counter-based generator, on the device.

    Args:
        seeds: ``[B]`` int64, each the bit pattern of a uint64 seed (values >= 2**63 stored as ``value - 2**64``).
        steps: ``[B]`` int64 >= 0, the counter.

    Returns:
        ``[B]`` int64 bit patterns of uint64 ``mix(seed + (step + 1) * 0x9E3779B97F4A7C15 mod 2**64)``, i.e. output
        number ``step`` (0-based) of the sequential SplitMix64 generator seeded with ``seed``
        (``output(seed, step) == mix_seed(seed + step * gamma)``). All arithmetic is int64: multiplication and
        addition wrap modulo 2**64 in two's complement (as PyTorch's CPU and CUDA kernels do), which is exactly
        uint64 arithmetic on the bit pattern; right shifts are made logical by masking.
    """
    z = seeds + (steps + 1) * _signed(_GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 uniforms in ``[0, 1)``: the top 53 bits of :func:`counter_hash` times ``2**-53`` (every value
    a multiple of ``2**-53``, as ``random.random``)."""
    return _shr(counter_hash(seeds, steps), 11).to(torch.float64) * (2.0 ** -53)


@dataclass(frozen=True)
class SamplingTensors:
    """A batch's sampling parameters as device tensors (one entry per row), plus host-side flags that let
    :func:`sample` skip work no row needs (they are plain bools: no sync).

    Attributes:
        temperature: ``[B]`` float64, 0 = greedy.
        top_k: ``[B]`` int64, 0 = off (any value > V keeps all).
        top_p: ``[B]`` float64 in (0, 1], 1 = off.
        penalty: ``[B]`` float64 > 0, 1 = off.
        seeds: ``[B]`` int64 bit patterns of the rows' uint64 seeds (:func:`request_seed`).
        steps: ``[B]`` int64, tokens the row has generated so far.
        seen: ``[B, L]`` int64 ids for the repetition penalty, padded with -1 (None when no row has a penalty).
        any_sampled: some row has temperature > 0.
        any_filter: some row has top_k > 0 or top_p < 1.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    seen: torch.Tensor | None
    any_sampled: bool
    any_filter: bool


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list to ``device`` without a device sync (pinned staging + non-blocking copy on CUDA)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _param_error(p: SamplingParams, seed: object, step: object) -> ServerError | None:
    """Why a row cannot be sampled from its host-side inputs (None when it can)."""
    t, tp, rp = p.temperature, p.top_p, p.repetition_penalty
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        return ServerError(f"sampling failed: bad temperature {t!r}")
    if not (isinstance(tp, (int, float)) and 0 < tp <= 1):
        return ServerError(f"sampling failed: bad top_p {tp!r}")
    if not (isinstance(p.top_k, int) and p.top_k >= 0):
        return ServerError(f"sampling failed: bad top_k {p.top_k!r}")
    if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
        return ServerError(f"sampling failed: bad repetition_penalty {rp!r}")
    if not (isinstance(seed, int) and 0 <= seed <= SEED_MAX):
        return ServerError(f"sampling failed: seed must be an int in 0..2**64-1, got {seed!r}")
    if not (isinstance(step, int) and 0 <= step < 1 << 63):
        return ServerError(f"sampling failed: step must be an int in 0..2**63-1, got {step!r}")
    return None


def sampling_tensors(params: Sequence[SamplingParams], seen: Sequence[Sequence[int]] | torch.Tensor | None,
                     seeds: Sequence[int], steps: Sequence[int], device: torch.device | str,
                     ) -> tuple[SamplingTensors, list[ServerError | None]]:
    """Build :class:`SamplingTensors` for B rows (host → device copies, no sync).

    Args:
        params: B sampling settings.
        seen: the rows' prompt + generated ids for the repetition penalty: B lists, or a ``[B, L]`` integer tensor
            (ideally already on ``device``) where ids < 0 are padding; None when no row has a penalty. Only rows
            with a penalty are copied from lists, and only their ids are checked (an id >= V fails the row).
        seeds: B uint64 seeds from :func:`request_seed`.
        steps: B counts of tokens each row has generated so far (0 for the token sampled right after prefill).
        device: where the logits live.

    Returns:
        The tensors and B host-side row errors: a row whose parameters, seed or step are out of range gets a
        :class:`ServerError` here and neutral (greedy, unpenalized) parameters in the tensors.
    """
    device = torch.device(device)
    b = len(params)
    if not (len(seeds) == len(steps) == b) or (seen is not None and len(seen) != b):
        raise ValueError(f"{b} params but {len(seeds)} seeds, {len(steps)} steps, "
                         f"{'no' if seen is None else len(seen)} seen rows")
    errors = [_param_error(p, s, n) for p, s, n in zip(params, seeds, steps)]
    floats, ints = [], []
    for p, s, n, err in zip(params, seeds, steps, errors):
        if err is not None:
            floats.append((0.0, 1.0, 1.0))
            ints.append((0, 0, 0))
        else:
            greedy = p.temperature == 0
            floats.append((float(p.temperature), 1.0 if greedy else float(p.top_p), float(p.repetition_penalty)))
            # top_k above 2**62 keeps all tokens anyway; cap it so it fits int64.
            ints.append((0 if greedy else min(int(p.top_k), 1 << 62), _signed(int(s)), int(n)))
    penalized = [err is None and float(p.repetition_penalty) != 1.0 for p, err in zip(params, errors)]
    if seen is None and any(penalized):
        raise ValueError("a row has a repetition penalty but no seen ids were given")
    any_sampled = any(f[0] > 0 for f in floats)
    any_filter = any(f[0] > 0 and (i[0] > 0 or f[1] < 1.0) for f, i in zip(floats, ints))
    f = _to_device(floats, torch.float64, device).reshape(b, 3)
    i = _to_device(ints, torch.int64, device).reshape(b, 3)
    seen_t = None
    if any(penalized):
        if isinstance(seen, torch.Tensor):
            seen_t = seen.to(device=device, dtype=torch.int64, non_blocking=True)
        else:
            rows = [list(map(int, ids)) if pen else [] for ids, pen in zip(seen, penalized)]
            width = max(1, max(len(r) for r in rows))
            seen_t = _to_device([r + [-1] * (width - len(r)) for r in rows], torch.int64, device)
    return SamplingTensors(temperature=f[:, 0], top_p=f[:, 1], penalty=f[:, 2], top_k=i[:, 0], seeds=i[:, 1],
                           steps=i[:, 2], seen=seen_t, any_sampled=any_sampled, any_filter=any_filter), errors


def _valid_rows(scores: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the row has no NaN, no +inf and at least one finite score."""
    return (~(torch.isnan(scores) | torch.isposinf(scores))).all(dim=-1) & torch.isfinite(scores).any(dim=-1)


def _penalized(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [B, V] float64, status [B] int64)``: the logits with the repetition penalty applied (invalid rows
    replaced by zeros; a status marks them)."""
    x = logits.to(torch.float64)
    b, v = x.shape
    valid = _valid_rows(x)
    status = torch.where(valid, OK, NON_FINITE)
    x = torch.where(valid[:, None], x, 0.0)
    if st.seen is not None:
        ids = st.seen
        bad = (ids >= v).any(dim=-1) & (st.penalty != 1)
        status = torch.where((status == OK) & bad, BAD_SEEN_ID, status)
        ids = torch.where((ids < 0) | (ids >= v), v, ids)  # padding → a scratch column past the vocabulary
        ext = torch.cat([x, x.new_zeros(b, 1)], dim=1)
        got = ext.gather(1, ids)
        pen = st.penalty[:, None]
        new = torch.where(got < 0, got * pen, got / pen)  # CTRL (Keskar et al. 2019), as transformers'
        new = torch.where(torch.isinf(got), got, new.clamp(-_FLOAT64_MAX, _FLOAT64_MAX))
        x = ext.scatter(1, ids, new)[:, :v]  # duplicate ids write the same value
    return x, status


def _filtered(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared pipeline. Returns ``(greedy_token [B] int64, scores [B, V] float64, status [B] int64)``:
    ``scores`` are the sampled rows' filtered, temperature-scaled scores (max exactly 0, removed tokens -inf);
    greedy rows' entries are meaningless. Invalid rows are computed on zeros (a status marks them)."""
    x, status = _penalized(logits, st)
    v = x.shape[1]
    greedy_token = x.argmax(dim=-1)
    if not st.any_sampled:
        return greedy_token, x, status
    temperature = torch.where(st.temperature > 0, st.temperature, 1.0)[:, None]
    s = (x - x.amax(dim=-1, keepdim=True)) / temperature
    if st.any_filter:
        # transformers' TopKLogitsWarper then TopPLogitsWarper, batched over one ascending sort.
        ordered, order = torch.sort(s, dim=-1, stable=True)  # ties in index order, on any batch
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=v), v)
        kth = ordered.gather(1, (v - k)[:, None])  # the k-th largest score (ties with it are kept)
        ordered = ordered.masked_fill(ordered < kth, -math.inf)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - st.top_p)[:, None]
        drop_sorted[:, -1] = False  # the most likely token always stays
        drop_p = drop_sorted.scatter(1, order, drop_sorted) & (st.top_p < 1)[:, None]
        s = s.masked_fill((s < kth) | drop_p, -math.inf)
    return greedy_token, s, status


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row on the device, without a host sync.

    Args:
        logits: ``[B, V]`` next-token logits, any float dtype, any device.
        st: the rows' parameters (:func:`sampling_tensors`), on the logits' device.

    Returns:
        ``(tokens, status)``, both ``[B]`` int64 on the device: status :data:`OK`, :data:`NON_FINITE` (NaN / +inf /
        only -inf logits) or :data:`BAD_SEEN_ID` (a seen id >= V); a row with a bad status has an arbitrary token.
        Greedy rows take the argmax of the penalized scores (the first on ties); sampled rows draw by inverse CDF
        with the uniform ``counter_uniform(seeds, steps)`` over :func:`probabilities`' distribution
        (:func:`inverse_cdf`: a zero-probability token is never chosen).

    Raises:
        Whatever torch raises for malformed input (wrong shapes, devices); :func:`select_tokens` catches it.
    """
    greedy_token, s, status = _filtered(logits, st)
    if not st.any_sampled:
        return greedy_token, status
    drawn = inverse_cdf(torch.exp(s), counter_uniform(st.seeds, st.steps))  # exp(max) == exp(0) == 1
    return torch.where(st.temperature > 0, drawn, greedy_token), status


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: ``[B, V]`` non-negative float64 weights (unnormalized, each row with a positive entry)
    and ``[B]`` uniforms in ``[0, 1)`` → ``[B]`` int64 tokens: the first token of positive weight whose cumulative
    weight exceeds ``u * total``. A zero-weight token is never returned, even where the device's scan rounds
    unevenly (then the last token of positive weight is the fallback)."""
    cdf = weights.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    hit = (weights > 0) & (cdf > target)
    first = hit.to(torch.int32).argmax(dim=-1)  # argmax returns the first maximal index
    vocab = torch.arange(weights.shape[1], device=weights.device)
    last = torch.where(weights > 0, vocab, -1).amax(dim=-1)
    return torch.where(hit.any(dim=-1), first, last)


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams],
                  seen: Sequence[Sequence[int]] | torch.Tensor | None = None) -> torch.Tensor:
    """The distribution :func:`sample` draws each row's token from (a pure function, for tests and logprobs).

    Args:
        logits: ``[B, V]`` logits, any float dtype and device.
        params: B valid sampling settings.
        seen: the rows' prompt + generated ids (see :func:`sampling_tensors`); needed when a row has a penalty.

    Returns:
        ``[B, V]`` float64 on the logits' device: greedy rows one-hot at their token, sampled rows
        ``softmax(filtered scores)``; a row that :func:`select_tokens` would fail is all NaN.

    Raises:
        ValueError: a row's parameters are out of range.
    """
    b = len(params)
    st, errors = sampling_tensors(params, seen, [0] * b, [0] * b, logits.device)
    bad = next((e for e in errors if e is not None), None)
    if bad is not None:
        raise ValueError(str(bad))
    greedy_token, s, status = _filtered(logits, st)
    w = torch.exp(s) if st.any_sampled else torch.zeros_like(s)
    probs = w / w.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter(1, greedy_token[:, None], 1.0)
    probs = torch.where((st.temperature > 0)[:, None], probs, one_hot)
    return torch.where((status == OK)[:, None], probs, math.nan)


@dataclass(frozen=True)
class RowLogprobs:
    """One row's log-probabilities at one step (float32 values, natural log): the chosen token's, and the ``k``
    most likely tokens as ``(token_id, logprob)``, most likely first (ties: the lower id first)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_scores(logits: torch.Tensor, st: SamplingTensors, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), V]`` float32 log-probabilities of the distribution reported to clients for ``rows``.

    That is ``log_softmax(penalized / T)``: the logits after the repetition penalty and the temperature (greedy
    rows, T = 0, use T = 1, i.e. the log-softmax of the penalized logits, the raw logits' without a penalty),
    *before* top-k / top-p truncation — as OpenAI's API, the log-probabilities of the model's distribution as the
    sampling parameters shaped it, so a token top-k / top-p removed still has a finite value. Computed in float64
    (the maximum subtracted first, as :func:`sample` does, so a tiny temperature cannot overflow) and rounded to
    float32. Only the given rows are computed.
    """
    sub = SamplingTensors(temperature=st.temperature[rows], top_k=st.top_k[rows], top_p=st.top_p[rows],
                          penalty=st.penalty[rows], seeds=st.seeds[rows], steps=st.steps[rows],
                          seen=None if st.seen is None else st.seen[rows], any_sampled=st.any_sampled,
                          any_filter=st.any_filter)
    x, _ = _penalized(logits[rows], sub)
    temperature = torch.where(sub.temperature > 0, sub.temperature, 1.0)[:, None]
    return torch.log_softmax((x - x.amax(dim=-1, keepdim=True)) / temperature, dim=-1).to(torch.float32)


def allowed_to_device(bitmask, device: torch.device | str) -> torch.Tensor:
    """A host ``[B, W]`` int32 allowed-token bitmask (numpy or torch) on ``device`` in one copy without a sync:
    pinned staging + a non-blocking transfer on CUDA, so filling the next step's mask never waits for the device."""
    t = torch.as_tensor(bitmask, dtype=torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set every token a row's grammar forbids to ``-inf`` (structured output, :mod:`server.engine.grammar`).

    Args:
        logits: ``[B, V]`` logits, any float dtype and device.
        allowed: ``[B, W]`` int32 on the logits' device, ``W >= ceil(V / 32)``: token ``t`` of row ``b`` is
            allowed iff bit ``t % 32`` of ``allowed[b, t // 32]`` is set (llguidance's / xgrammar's layout); an
            all-ones row (-1) leaves its logits unchanged.

    Returns:
        ``[B, V]`` new logits (the input is not modified: it may be a captured graph's output buffer). Elementwise
        on the device: a shift, an and and a ``masked_fill``; no sync.
    """
    b, v = logits.shape
    shifts = torch.arange(32, device=allowed.device, dtype=torch.int32)
    bits = ((allowed[:, :, None] >> shifts) & 1).reshape(b, -1)[:, :v]  # [B, W*32] → [B, V]
    return logits.masked_fill(bits == 0, -math.inf)


@dataclass(frozen=True)
class PromptScores:
    """One row's prompt log-probabilities, on the device (from :func:`prompt_logprob_scores`).

    Attributes:
        chosen: ``[P]`` float32, the log-probability of each scored position's next prompt token.
        top_values: ``[P, k]`` float32, the k largest log-probabilities at each position, most likely first.
        top_ids: ``[P, k]`` int64, their token ids (ties: the lower id first).
    """

    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor

    @staticmethod
    def cat(parts: Sequence["PromptScores"]) -> "PromptScores":
        """The scores of consecutive position ranges (``parts`` non-empty, one k) as one, in order."""
        return PromptScores(torch.cat([p.chosen for p in parts]), torch.cat([p.top_values for p in parts]),
                            torch.cat([p.top_ids for p in parts]))


def prompt_logprob_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> PromptScores:
    """Prompt log-probabilities of P positions: the model's own next-token distribution, no sampling parameter.

    That is ``log_softmax(logits.float())`` — float32, natural log, of the raw logits (the request's adapter is
    already in them; no repetition penalty and no temperature, unlike :func:`logprob_scores`, since a prompt is
    scored, not sampled). A non-finite logit gives NaN values; nothing raises for it.

    Args:
        logits: ``[P, V]`` logits of P positions (any float dtype, any device).
        targets: ``[P]`` int64 token ids on the same device: the token that follows each position (in ``0 .. V-1``).
        k: how many most likely tokens to return per position (``0 .. V``; values above V return V).

    Returns:
        :class:`PromptScores` on the logits' device: ``chosen [P]``, ``top_values [P, k]``, ``top_ids [P, k]``
        (a stable descending sort, as :func:`select_tokens_logprobs`: ties come lowest id first). With k = 0 no sort
        runs.

    Raises:
        Whatever torch raises for malformed input (wrong shapes, an id out of range, mismatched devices).
    """
    lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = lp.gather(1, targets.reshape(-1, 1)).reshape(-1)
    k = min(k, lp.shape[1])
    if k <= 0:
        empty = lp.new_empty((lp.shape[0], 0))
        return PromptScores(chosen, empty, empty.to(torch.int64))
    values, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
    # copies, not views: a view would keep the whole [P, V] sort alive while the caller scores further chunks
    return PromptScores(chosen, values[:, :k].clone(), ids[:, :k].clone())


def prompt_scores_to_host(scores: Sequence[PromptScores | None]) -> list[list[RowLogprobs] | None]:
    """Bring every row's :class:`PromptScores` to the host in ONE transfer (a host sync: call it after the step's
    other device work is queued — after the sampler's own sync, the device is idle and this only copies).

    Returns:
        Per row: None where ``scores[i]`` is None, else one :class:`RowLogprobs` per scored position
        (``logprob`` the target's value, ``top`` the k ``(token_id, logprob)`` pairs), float32 values as Python
        floats.
    """
    present = [s for s in scores if s is not None]
    if not present:
        return [None] * len(scores)
    # float64 holds every float32 value and every token id below 2**53 exactly: one flat tensor, one transfer
    flat = torch.cat([t.to(torch.float64).reshape(-1) for s in present
                      for t in (s.chosen, s.top_values, s.top_ids)]).tolist()
    out: list[list[RowLogprobs] | None] = []
    at = 0
    for s in scores:
        if s is None:
            out.append(None)
            continue
        p, k = s.top_values.shape
        chosen, values, ids = flat[at:at + p], flat[at + p:at + p + p * k], flat[at + p + p * k:at + p + 2 * p * k]
        at += p + 2 * p * k
        out.append([RowLogprobs(chosen[i], tuple((int(ids[i * k + j]), values[i * k + j]) for j in range(k)))
                    for i in range(p)])
    return out


def select_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  seen: Sequence[Sequence[int]] | torch.Tensor | None, seeds: Sequence[int],
                  steps: Sequence[int]) -> list[int | ServerError]:
    """Pick one next token per row, batched on the logits' device, with exactly one host sync.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype, any device).
        params: B sampling settings (validated by :meth:`SamplingParams.validate`).
        seen: the rows' prompt + generated ids for the repetition penalty: B lists, or a ``[B, L]`` int tensor
            padded with -1; may be None when no row has a penalty.
        seeds: B uint64 seeds, each from :func:`request_seed` at submit (kept for the request's life).
        steps: B counts of tokens each row has generated so far (0 for the first token, sampled after prefill).
            Row b's random draw is a pure function of ``(seeds[b], steps[b])``.

    Returns:
        B entries: a token id, or the :class:`ServerError` that ended that row: :class:`NonFiniteLogits` when its
        logits are NaN / +inf / all -inf, a plain (INTERNAL) ``ServerError`` when its parameters, seed, step or
        seen ids are out of range. Never raises: if the batched computation itself fails, every row gets a
        ``ServerError`` naming the failure.
    """
    return select_tokens_logprobs(logits, params, seen, seeds, steps)[0]


def select_tokens_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams],
                           seen: Sequence[Sequence[int]] | torch.Tensor | None, seeds: Sequence[int],
                           steps: Sequence[int], logprobs: Sequence[int] | None = None, allowed=None,
                           ) -> tuple[list[int | ServerError], list[RowLogprobs | None]]:
    """:func:`select_tokens`, plus log-probabilities for the rows that ask, still with exactly one host sync.

    Args:
        logprobs: per row, -1 = none, ``k >= 0`` = the chosen token's log-probability and the top ``k``
            (:func:`logprob_scores`); None = no row asks. Only asking rows are computed; the tokens of every row
            are exactly :func:`select_tokens`' (a row's choice never depends on whether any row asks).
        allowed: None, or a host ``[B, W]`` int32 allowed-token bitmask (:func:`apply_allowed`; structured
            output): forbidden tokens get ``-inf`` before everything else, so they are never chosen, their
            probability is 0 and top log-probabilities list only allowed tokens (fewer than ``k`` when fewer are
            allowed). A row that allows nothing fails with :class:`NonFiniteLogits`.

    Returns:
        ``(tokens, row_logprobs)``: ``tokens`` as :func:`select_tokens`; ``row_logprobs[b]`` a
        :class:`RowLogprobs` for an asking row that got a token, else None.
    """
    b = len(params)
    asks = [] if logprobs is None else [i for i, k in enumerate(logprobs) if k is not None and k >= 0]
    try:
        if logprobs is not None and len(logprobs) != b:
            raise ValueError(f"{b} params but {len(logprobs)} logprobs entries")
        st, errors = sampling_tensors(params, seen, seeds, steps, logits.device)
        if logits.dim() != 2 or logits.shape[0] != b:
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {b} rows")
        constrained: list[int] = []
        if allowed is not None:
            host_mask = torch.as_tensor(allowed)
            constrained = (host_mask != -1).any(dim=1).nonzero().reshape(-1).tolist()  # rows with a grammar
        if constrained:
            # only the constrained rows are masked; their bitmask rows and row indices (the last column) go to the
            # device in one copy
            rows = torch.tensor(constrained, dtype=torch.int32)[:, None]
            packed = allowed_to_device(torch.cat([host_mask[constrained], rows], dim=1), logits.device)
            idx = packed[:, -1].long()
            logits = logits.index_put((idx,), apply_allowed(logits[idx], packed[:, :-1]))
        if not st.any_sampled and st.seen is None:  # fast path: argmax + validity
            tokens, status = logits.argmax(dim=-1), torch.where(_valid_rows(logits), OK, NON_FINITE)
        else:
            tokens, status = sample(logits, st)
        k_max = 0
        if asks:
            k_max = min(max(logprobs[i] for i in asks), logits.shape[1])
            rows = _to_device(asks, torch.int64, logits.device)
            lp = logprob_scores(logits, st, rows)
            chosen = lp.gather(1, tokens[rows][:, None])
            # a stable descending sort: ties come lowest id first, whatever k the batch's other rows asked for
            top_values, top_ids = torch.sort(lp, dim=-1, descending=True, stable=True)
            top_values, top_ids = top_values[:, :k_max], top_ids[:, :k_max]
            # float64 holds every int64 token id / status below 2**53 exactly: one flat tensor, one transfer
            packed = torch.cat([tokens.to(torch.float64), status.to(torch.float64),
                                chosen.to(torch.float64).reshape(-1), top_values.to(torch.float64).reshape(-1),
                                top_ids.to(torch.float64).reshape(-1)])
            flat = packed.tolist()  # the one host sync
            token_list = [int(t) for t in flat[:b]]
            status_list = [int(c) for c in flat[b:2 * b]]
            n = len(asks)
            chosen_list = flat[2 * b:2 * b + n]
            values = flat[2 * b + n:2 * b + n + n * k_max]
            ids = flat[2 * b + n + n * k_max:]
        else:
            token_list, status_list = torch.stack([tokens, status]).tolist()  # the one host sync
    except Exception as exc:  # noqa: BLE001 - the step must go on; every row reports the failure
        error = ServerError(f"sampling failed: {type(exc).__name__}: {exc}")
        return [error] * b, [None] * b
    out: list[int | ServerError] = []
    for token, code, err in zip(token_list, status_list, errors):
        if err is not None:
            out.append(err)
        elif code == NON_FINITE:
            out.append(NonFiniteLogits("the model produced non-finite logits for this request"))
        elif code == BAD_SEEN_ID:
            out.append(ServerError("sampling failed: a seen token id is outside the vocabulary"))
        else:
            out.append(token)
    row_lps: list[RowLogprobs | None] = [None] * b
    grammar_rows = set(constrained)
    for j, i in enumerate(asks):
        if isinstance(out[i], int):
            k = min(logprobs[i], k_max)
            base = j * k_max
            top = tuple((int(ids[base + m]), values[base + m]) for m in range(k))
            if i in grammar_rows:  # forbidden tokens (-inf) are no alternatives: list only those that can occur
                top = tuple((tid, value) for tid, value in top if value != -math.inf)
            row_lps[i] = RowLogprobs(chosen_list[j], top)
    return out, row_lps
