"""Decode step time on this CPU: the exact 4-bit path (`--cpu-4bit-kernel exact`) vs bitsandbytes' fused kernel.

    .venv/bin/python bench/cpu_4bit_kernel.py [--rounds 3] [--steps 24]

Loads the embedded SmolLM2-135M twice through the server's loader (``--compute-dtype auto``), one copy per
``cpu_4bit_kernel``, attaches a model runner to each, and times batch-1 decode steps (64-token prompt, median of
each round after 4 warm-up steps) in alternating rounds. Prints one JSON line (milliseconds per decode step). On a
CPU without AVX512-BF16 both copies run the same (exact) path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from server.config import EngineConfig, ModelConfig
    from server.model.base import load_base_model
    from server.model.runner import StepRow, build_runner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    runners, dtype = {}, None
    for kernel in ("exact", "fused"):
        model, _, info = load_base_model(ModelConfig(model="smollm2", device="cpu", cpu_4bit_kernel=kernel))
        dtype = info.compute_dtype
        runners[kernel] = build_runner(model, EngineConfig(adapter_slots=1, max_lora_rank=16, cpu_adapter_cache=1),
                                       torch.float32, 256)
    prompt = tuple(range(100, 164))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for kernel in (("exact", "fused") if r % 2 == 0 else ("fused", "exact")):
            runner = runners[kernel]
            blocks = tuple(range(1, 1 + 256 // runner.pool.block_size))
            runner.prefill([StepRow(prompt, 0, blocks, -1)])
            step = []
            for i in range(args.steps):
                t = time.perf_counter()
                runner.decode([StepRow((7,), len(prompt) + i, blocks, -1)])
                step.append(time.perf_counter() - t)
            times[kernel].append(statistics.median(step[4:]) * 1e3)
    print(json.dumps({"compute_dtype": dtype, "threads": torch.get_num_threads(),
                      "decode_ms_per_round": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
