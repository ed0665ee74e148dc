"""Per-row token selection: repetition penalty, temperature, top-k, top-p and seeded sampling, greedy when T=0.

Numerics: every accepted parameter value must give a valid distribution. Sampled rows are processed in float64
after subtracting the row's maximum, so the most likely token's score is exactly 0 before the temperature divides
it (0 / T = 0 for every T > 0) and the others are <= 0 (at worst -inf): a temperature so small that ``logit / T``
would overflow becomes greedy (ties share the mass), a huge one tends to uniform, and softmax always sees one
finite score. The repetition penalty's products are clamped to float64's finite range. A row whose logits are NaN
or +inf (a model fault) fails alone with :class:`NonFiniteLogits`; the other rows of the batch are unaffected.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.types import SamplingParams
from server.errors import ServerError

_FLOAT64_MAX = torch.finfo(torch.float64).max


class NonFiniteLogits(ServerError):
    """The model produced NaN or +inf logits (or only -inf) for a row: INTERNAL, that row's request fails."""


_MASK64 = (1 << 64) - 1


def mix_seed(seed: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014):
    a bijection of uint64 whose every output bit depends on all 64 input bits. Returns an int in
    ``0 .. 2**64 - 1``: CUDA's Philox generator uses all of it, PyTorch's CPU generator its low 32 bits (which
    still depend on every bit of ``seed``)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own random generator (None when greedy): its draws never depend on the other rows.

    ``params.seed`` must be in ``0 .. 2**64 - 1`` (checked by :meth:`SamplingParams.validate`). PyTorch's CPU
    generator (mt19937) keeps only the low 32 bits of its seed, so the seed is mixed first (:func:`mix_seed`):
    every one of its 64 bits changes the stream, on the CPU and on CUDA alike.
    """
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(mix_seed(int(params.seed)))
    else:
        generator.seed()
    return generator


def _valid_rows(scores: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the row has no NaN, no +inf and at least one finite score."""
    return (~(torch.isnan(scores) | torch.isposinf(scores))).all(dim=-1) & torch.isfinite(scores).any(dim=-1)


def _sample_row(row: torch.Tensor, p: SamplingParams, seen: list[int], generator: torch.Generator | None) -> int:
    """One row ``[1, V]`` (already checked finite) → one token id, following the module's numerics."""
    row = row.double()
    # The warpers below ignore the ids; only the repetition penalty reads them (a host-to-device copy per row).
    ids = torch.tensor([seen], dtype=torch.long, device=row.device) if p.repetition_penalty != 1.0 else None
    if p.repetition_penalty != 1.0:
        row = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, row)
        row = row.clamp(-_FLOAT64_MAX, _FLOAT64_MAX)  # a tiny / huge penalty must not create +-inf
    if p.temperature == 0:
        return int(row.argmax(dim=-1))
    row = row - row.max(dim=-1, keepdim=True).values  # best score exactly 0, others <= 0 (maybe -inf)
    row = TemperatureLogitsWarper(float(p.temperature))(ids, row)  # 0 / T == 0: one finite score survives
    if p.top_k > 0:
        row = TopKLogitsWarper(int(p.top_k))(ids, row)
    if p.top_p < 1.0:
        row = TopPLogitsWarper(float(p.top_p))(ids, row)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def select_tokens(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
                  generators: list[torch.Generator | None]) -> list[int | ServerError]:
    """Pick one next token per row; a row that cannot be sampled gets its error instead of a token.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype).
        params: B sampling settings (validated by :meth:`SamplingParams.validate`).
        seen: B lists of the row's prompt + generated ids (for the repetition penalty).
        generators: B generators from :func:`make_generator`.

    Returns:
        B entries: a token id, or the :class:`ServerError` that ended that row (:class:`NonFiniteLogits` when
        its logits are NaN / +inf; any other failure wrapped as an INTERNAL ``ServerError``). The warpers are
        transformers' own (``generation/logits_process.py``), applied in the order ``generate`` uses: repetition
        penalty, temperature, top-k, top-p. Never raises for a bad row: the other rows keep their tokens.
    """
    scores = logits.float()
    valid = _valid_rows(scores)
    if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
        best, ok = torch.stack([scores.argmax(dim=-1), valid.long()]).tolist()  # one host sync for the batch
        return [t if good else NonFiniteLogits("the model produced non-finite logits for this request")
                for t, good in zip(best, ok)]
    ok = valid.tolist()
    out: list[int | ServerError] = []
    for b, p in enumerate(params):
        if not ok[b]:
            out.append(NonFiniteLogits("the model produced non-finite logits for this request"))
            continue
        try:
            out.append(_sample_row(scores[b:b + 1], p, seen[b], generators[b]))
        except Exception as exc:  # noqa: BLE001 - one row's failure must not end its neighbours
            out.append(ServerError(f"sampling failed: {type(exc).__name__}: {exc}"))
    return out
