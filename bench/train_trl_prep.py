"""Experiment: TRL's SFTTrainer on the extraction demo with and without peft.prepare_model_for_kbit_training.

TRL 1.16's SFTTrainer does not call prepare_model_for_kbit_training itself, but for a 4-bit base it casts the
LoRA weights to bfloat16 and (SFTConfig default) trains under bf16 autocast. This script runs that stack on the
same data / LoRA / optimizer settings as bench/train_kbit_prep.py:

``python bench/train_trl_prep.py {plain,prepare} [--steps 50] [--compute bfloat16|float32]``; prints one JSON line
with the per-step losses and the greedy held-out exact match.
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
    """Run one arm and print its losses and score."""
    import torch
    from datasets import Dataset
    from evaluate import evaluate, load_cases
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from server.config import ModelConfig
    from server.model.base import load_base_model

    ap = argparse.ArgumentParser()
    ap.add_argument("arm", choices=["plain", "prepare"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compute", default="bfloat16")
    ap.add_argument("--eval-limit", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trl"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok, _ = load_base_model(ModelConfig(compute_dtype=args.compute, device="cpu"))
    if args.arm == "prepare":
        model = prepare_model_for_kbit_training(model)
    with open(ROOT / "examples" / "extraction" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    ds = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    losses = []

    class Show(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))
                print(f"{args.arm} step {state.global_step} loss {logs['loss']:.4f}", flush=True)

    cfg = SFTConfig(output_dir=str(args.out / args.arm), max_steps=args.steps, per_device_train_batch_size=8,
                    learning_rate=2e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=0.03,
                    max_grad_norm=0.3, optim="paged_adamw_8bit", logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=True, seed=0, max_length=256)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[Show()])
    dtypes = sorted({f"{n.split('.')[-2] if 'lora' in n else 'base'}:{p.dtype}"
                     for n, p in trainer.model.named_parameters() if p.requires_grad or "norm" in n})
    t0 = time.monotonic()
    trainer.train()
    secs = time.monotonic() - t0
    cases = load_cases(ROOT / "examples" / "extraction" / "heldout.jsonl")[: args.eval_limit]
    score = evaluate(trainer.model, tok, cases)
    print(json.dumps({"arm": args.arm, "compute": args.compute, "bf16_autocast": cfg.bf16, "dtypes": dtypes,
                      "gradient_checkpointing_kwargs": cfg.gradient_checkpointing_kwargs, "losses": losses,
                      "train_seconds": round(secs, 1), "exact_match": score["exact_match"],
                      "valid_json": score["valid_json"], "sample": score["samples"][0][0]}))


if __name__ == "__main__":
    main()
