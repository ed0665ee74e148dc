"""Experiment: how peft's prepare_model_for_kbit_training changes QLoRA training of SmolLM2 on this CPU.

Runs the trainer (``trainer.train.train``) on the extraction demo with the model-preparation step swapped:

* ``ours``       — trainer.train.prepare_for_qlora_training (dtypes as served, non-reentrant checkpointing);
* ``peft``       — peft.prepare_model_for_kbit_training (every non-4-bit parameter up-cast to float32,
                   reentrant checkpointing), bitsandbytes CPU repacking still disabled;
* ``peft_fp32``  — the same with compute_dtype float32;
* ``upcast``     — ours + only the float32 up-cast of norms/embeddings/lm_head (isolates the dtype change);
* ``*_amp``      — any of the above with ``TrainingArguments(bf16=True)``: torch.autocast(cpu, bfloat16) around the
                   forward pass, as a "bf16" Trainer/TRL run does;
* ``*_repack``   — any of the above with bitsandbytes' CPU weight repacking left on and an evaluation every 10 steps.

and scores greedy held-out exact match afterwards. Usage:
``python bench/train_kbit_prep.py VARIANT [--steps 50] [--out /tmp/kbit]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "extraction"))


def main() -> None:
    """Run one variant and print its loss curve and held-out score."""
    import torch

    import trainer.train as tt
    from trainer.config import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("variant", help="ours | peft | peft_fp32 | upcast, optionally + _amp and/or _repack")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kbit"))
    ap.add_argument("--eval-limit", type=int, default=100)
    args = ap.parse_args()

    ours = tt.prepare_for_qlora_training

    def peft_prepare(model, gradient_checkpointing=True):
        from peft import prepare_model_for_kbit_training

        tt.disable_cpu_weight_repacking(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)

    def upcast(model, gradient_checkpointing=True):
        ours(model, gradient_checkpointing)
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        return model

    base_variant = args.variant.replace("_amp", "").replace("_repack", "")
    if base_variant in ("peft", "peft_fp32"):
        tt.prepare_for_qlora_training = peft_prepare
    elif base_variant == "upcast":
        tt.prepare_for_qlora_training = upcast
    elif base_variant != "ours":
        raise SystemExit(f"unknown variant {args.variant}")
    if "_amp" in args.variant:
        make_args = tt.TrainingSession._training_args

        def amp_args(self, n_eval):
            import dataclasses

            return dataclasses.replace(make_args(self, n_eval), bf16=True)

        tt.TrainingSession._training_args = amp_args
    if "_repack" in args.variant:
        tt.disable_cpu_weight_repacking = lambda model: 0
    data = ROOT / "examples" / "extraction"
    out = args.out / args.variant
    cfg = TrainConfig(dataset=data / "train.jsonl", output_dir=out, max_steps=args.steps, batch_size=8,
                      learning_rate=2e-4, r=16, lora_alpha=32, save_steps=10_000, logging_steps=5,
                      eval_fraction=0.1, compute_dtype="float32" if base_variant == "peft_fp32" else "bfloat16",
                      seed=0, eval_steps=10 if "_repack" in args.variant else 0)
    def show(ev):
        if ev["event"] == "step":
            print(f"{args.variant} step {ev['step']} loss {ev['loss']:.4f} t {ev['elapsed_seconds']:.0f}s", flush=True)

    t0 = time.monotonic()
    session = tt.TrainingSession(cfg, on_progress=show)
    result = session.run()
    train_s = time.monotonic() - t0
    from evaluate import evaluate, load_cases

    cases = load_cases(data / "heldout.jsonl")[: args.eval_limit]
    score = evaluate(session.model, session.tokenizer, cases)
    print(json.dumps({"variant": args.variant, "losses": [round(x, 4) for x in result.loss_history],
                      "eval_loss": result.eval_loss, "train_seconds": round(train_s, 1),
                      "exact_match": score["exact_match"], "valid_json": score["valid_json"],
                      "sample": score["samples"][0][0]}))


if __name__ == "__main__":
    main()
