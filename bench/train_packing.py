"""Measures what sequence packing changes in a training run: step time and tokens/s, padded vs packed batches.

Runs the recipe (default examples/extraction/train.yaml) for a few optimizer steps twice, ``packing: false`` then
``packing: true``, with no evaluation and no checkpoints, in a scratch output directory, and prints one JSON line per
run and a Markdown table. Step time is the mean over the steps after the first (the first pays one-off set-up);
tokens/s counts non-padding tokens (the trainer's own ``tokens_per_second``), so it is comparable between the two.
Also reports the share of the padded batches that was padding (tokens the padded run computes on and discards).

    python bench/train_packing.py --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _padding_share(config) -> float:
    """Padding tokens / all tokens of the padded micro-batches of one epoch in the recipe's batch order (approx.:
    batches in file order, as the sampler's shuffle does not change the average much)."""
    from transformers import AutoTokenizer

    from server.model.base import resolve_source
    from trainer import data as data_mod

    path, _ = resolve_source(config.model_config())
    tok = AutoTokenizer.from_pretrained(path)
    ex = data_mod.load_tokenized(config.dataset, tok, config.max_seq_length, config.truncate)
    lengths = [len(e.input_ids) for e in ex]
    b = config.batch_size
    real = sum(lengths)
    padded = sum(max(lengths[i:i + b]) * len(lengths[i:i + b]) for i in range(0, len(lengths), b))
    return 1.0 - real / padded


def run(recipe: Path, steps: int, packing: bool) -> dict:
    from trainer.config import TrainConfig
    from trainer.train import TrainingSession

    events: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_file(recipe).replace(output_dir=Path(tmp) / "run", max_steps=steps, packing=packing,
                                                    eval_fraction=0.0, save_steps=10_000)
        TrainingSession(cfg, on_progress=lambda ev: events.append(ev) if ev["event"] == "step" else None).run()
    t = [ev["elapsed_seconds"] for ev in events]
    return {"packing": packing, "steps": len(events), "step_seconds": (t[-1] - t[0]) / (len(t) - 1),
            "tokens_per_second": events[-1]["tokens_per_second"], "final_loss": events[-1]["loss"],
            "padding_share_of_padded_batches": _padding_share(cfg)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "examples/extraction/train.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for packing in (False, True):
        rows.append(run(args.recipe, args.steps, packing))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| packing | steps | step time (s) | tokens/s (non-padding) | final loss |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['packing'] else 'off'} | {r['steps']} | {r['step_seconds']:.2f} | "
              f"{r['tokens_per_second']:.0f} | {r['final_loss']:.4f} |")
    print(f"\npadding share of the padded batches: {rows[0]['padding_share_of_padded_batches']:.1%}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
