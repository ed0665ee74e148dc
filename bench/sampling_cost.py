"""Times one decode step's token choice: ours (``server.model.sampling.select_tokens``: batched on the device,
float64, NaN-safe, counter-based per-row seeds, one host sync), the per-row float32 loop that preceded issue 7, and
the plain stack (transformers' logits processors on the batch in float32 + ``torch.multinomial``), in one process,
alternating short rounds (the GPU host has slow phases), on the same logits. Prints medians and p10 in
milliseconds.

    python bench/sampling_cost.py [--device cuda] [--vocab 49152] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _plain(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_p: float, top_k: int,
           penalty: float, generator: torch.Generator | None) -> list[int]:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature),
                                 TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    scores = procs(seen, logits.float())
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1).tolist()


def _previous(logits: torch.Tensor, params: list, seen: list[list[int]], generators: list) -> list[int]:
    """The per-row token choice before issue 7 (float32, no finite checks, one generator per row), kept here as
    the same-run reference."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.float()
    out = []
    for b, p in enumerate(params):
        row = scores[b:b + 1]
        ids = torch.tensor([seen[b]], dtype=torch.long, device=row.device)
        row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row)
        row = TemperatureLogitsWarper(p.temperature)(ids, row)
        row = TopKLogitsWarper(p.top_k)(ids, row)
        row = TopPLogitsWarper(p.top_p)(ids, row)
        out.append(int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generators[b])))
    return out


def main() -> None:
    from server.engine.types import SamplingParams
    from server.model.sampling import request_seed, select_tokens

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--reps", type=int, default=10, help="steps timed per round")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=1)
    print(f"device {dev}, vocab {args.vocab}, torch {torch.__version__}")
    for batch in (1, 16):
        logits = torch.randn(batch, args.vocab, device=dev, dtype=torch.bfloat16) * 4
        seen_lists = [list(range(64)) for _ in range(batch)]
        seen = torch.tensor(seen_lists, device=dev)
        seeds = [request_seed(params)] * batch
        steps = list(range(batch))
        gens = [torch.Generator(device=dev).manual_seed(s) for s in range(batch)]
        plain_gen = torch.Generator(device=dev).manual_seed(1)
        times = {"ours": [], "previous": [], "plain": []}
        for _ in range(3):  # warm-up
            select_tokens(logits, [params] * batch, seen_lists, seeds, steps)
            _plain(logits, seen, 0.7, 0.9, 50, 1.1, plain_gen)
        for _ in range(args.rounds):
            for name in ("ours", "previous", "plain"):
                sync()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    if name == "ours":
                        select_tokens(logits, [params] * batch, seen_lists, seeds, steps)
                    elif name == "previous":
                        _previous(logits, [params] * batch, seen_lists, gens)
                    else:
                        _plain(logits, seen, 0.7, 0.9, 50, 1.1, plain_gen)
                sync()
                times[name].append((time.perf_counter() - t0) / args.reps * 1e3)
        for name, xs in times.items():
            xs.sort()
            print(f"batch {batch:>2} {name:<8} median {statistics.median(xs):7.3f} ms  p10 {xs[len(xs) // 10]:7.3f} ms")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch:>2} ours / plain = {med['ours'] / med['plain']:.2f}, "
              f"ours / previous = {med['ours'] / med['previous']:.2f}")


if __name__ == "__main__":
    main()
