"""Measures how far an adapter's training numerics are from its serving numerics.

Loads the base model as the server does (bf16 norms/embeddings, NF4 linears, bf16 compute), applies a PEFT adapter,
and compares per-token log-probabilities on the held-out extraction data with the same model after
peft.prepare_model_for_kbit_training's float32 up-cast (the numerics an adapter sees when trained with it).

``python bench/train_serve_gap.py ADAPTER_DIR [--n 20]``; prints one JSON line: mean token NLL both ways, the max and
mean absolute log-prob difference, and the greedy-token agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Compare served vs up-cast numerics for one adapter."""
    import torch
    from peft import PeftModel

    from server.config import ModelConfig
    from server.model.base import load_base_model
    from trainer.data import IGNORE_INDEX, read_jsonl, tokenize_examples
    from trainer.train import disable_cpu_weight_repacking

    ap = argparse.ArgumentParser()
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()

    base, tok, _ = load_base_model(ModelConfig(device="cpu"))
    disable_cpu_weight_repacking(base)
    model = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    examples = read_jsonl(ROOT / "examples" / "extraction" / "heldout.jsonl")[: args.n]
    data = tokenize_examples(examples, tok, 512, False)

    def logprobs():
        out = []
        with torch.no_grad():
            for ex in data:
                ids = torch.tensor([ex.input_ids])
                lp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
                labels = torch.tensor(ex.labels[1:])
                keep = labels != IGNORE_INDEX
                out.append((lp[keep], labels[keep]))
        return out

    served = logprobs()
    for p in model.parameters():  # what prepare_model_for_kbit_training does to the dtypes
        if p.dtype == torch.bfloat16 and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
    upcast = logprobs()
    nll = lambda rows: float(torch.cat([-lp.gather(1, y[:, None])[:, 0] for lp, y in rows]).mean())
    diffs = torch.cat([(a[0] - b[0]).abs().flatten() for a, b in zip(served, upcast)])
    agree = torch.cat([a[0].argmax(-1) == b[0].argmax(-1) for a, b in zip(served, upcast)]).float().mean()
    print(json.dumps({"adapter": str(args.adapter), "n": len(data), "nll_served": nll(served),
                      "nll_upcast": nll(upcast), "max_abs_logprob_diff": float(diffs.max()),
                      "mean_abs_logprob_diff": float(diffs.mean()), "greedy_agreement": float(agree)}))


if __name__ == "__main__":
    main()
