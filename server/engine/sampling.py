"""Per-row token selection: repetition penalty, temperature, top-k, top-p and seeded sampling, greedy when T=0."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own random generator (None when greedy): its draws never depend on the other rows."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(int(params.seed))
    else:
        generator.seed()
    return generator


def select_tokens(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
                  generators: list[torch.Generator | None]) -> list[int]:
    """Pick one next token per row.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype; processed in float32).
        params: B sampling settings.
        seen: B lists of the row's prompt + generated ids (for the repetition penalty; only rows that use
            it are copied to the device).
        generators: B generators from :func:`make_generator`.

    Returns:
        B token ids. The warpers are transformers' own (``generation/logits_process.py``), applied in the order
        ``generate`` uses: repetition penalty, temperature, top-k, top-p.
    """
    scores = logits.float()
    if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
        return scores.argmax(dim=-1).tolist()  # one host sync for the whole batch
    out: list[int] = []
    for b, p in enumerate(params):
        row = scores[b:b + 1]
        ids = torch.tensor([seen[b]], dtype=torch.long, device=row.device) if p.repetition_penalty != 1.0 else None
        if p.repetition_penalty != 1.0:
            row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row)
        if p.temperature == 0:
            out.append(int(row.argmax(dim=-1)))
            continue
        row = TemperatureLogitsWarper(p.temperature)(ids, row)
        if p.top_k > 0:
            row = TopKLogitsWarper(p.top_k)(ids, row)
        if p.top_p < 1.0:
            row = TopPLogitsWarper(p.top_p)(ids, row)
        probs = torch.softmax(row, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[b])))
    return out
