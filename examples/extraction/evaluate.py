"""Scores a model's greedy replies on the extraction task: exact match of the parsed JSON object.

``python examples/extraction/evaluate.py [--model smollm2] [--adapter DIR] [--data heldout.jsonl]`` loads the base
model exactly as the server does (NF4, double quant, bf16 compute), scores it, then (with ``--adapter``) applies the
PEFT adapter in the same process and scores again: greedy decoding of every held-out prompt, one JSON line each. ``check_reply`` is the checker; ``evaluate`` the
in-process scorer others can call with any (model, tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


#: The answer's JSON Schema (structured output's ``response_format``): the four fields, each required, nothing
#: else; strings at most 40 characters and a plausible age, so a model that starts repeating itself inside a string
#: (the base SmolLM2 does on one held-out prompt) is made to close it and still gives a complete object.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "job": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "job", "city"], "additionalProperties": False}


def schema_valid(reply: str) -> bool:
    """Whether the reply (surrounding whitespace ignored) is JSON valid against :data:`SCHEMA` (checked with the
    ``jsonschema`` package, an oracle independent of the server's grammar engine)."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(reply.strip()), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def check_reply(reply: str, expected: dict) -> tuple[bool, bool]:
    """Return ``(valid_json_object, exact_match)``: the reply (surrounding whitespace ignored) must parse as one
    JSON object equal to ``expected`` — same keys, same values, same types (age an int)."""
    try:
        got = json.loads(reply.strip())
    except ValueError:
        return False, False
    if not isinstance(got, dict):
        return False, False
    same = got.keys() == expected.keys() and all(type(got[k]) is type(v) and got[k] == v
                                                  for k, v in expected.items())
    return True, same


def load_cases(path: Path) -> list[tuple[list[dict], dict]]:
    """``(prompt_messages, expected_fields)`` per line of a ``messages`` JSONL file (the last turn is the answer)."""
    cases = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                msgs = json.loads(line)["messages"]
                cases.append((msgs[:-1], json.loads(msgs[-1]["content"])))
    return cases


def evaluate(model, tokenizer, cases, max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    """Greedy-decode every case and score it.

    Returns:
        ``{"n", "exact_match" (fraction), "valid_json" (fraction), "seconds", "samples": [(reply, ok), ...]}``.
    """
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    n_ok = n_json = 0
    samples = []
    t0 = time.monotonic()
    try:
        for i in range(0, len(cases), batch_size):
            chunk = cases[i:i + batch_size]
            prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                       for m, _ in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for (_, expected), row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                reply = tokenizer.decode(row, skip_special_tokens=True)
                valid, ok = check_reply(reply, expected)
                n_json += valid
                n_ok += ok
                samples.append((reply, ok))
    finally:
        tokenizer.padding_side = old_side
    n = len(cases)
    return {"n": n, "exact_match": n_ok / n, "valid_json": n_json / n, "seconds": time.monotonic() - t0,
            "samples": samples}


def main() -> None:
    """CLI: print base (or base + adapter) scores on the held-out file."""
    sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing
    from server.config import ModelConfig
    from server.model.base import load_base_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", type=Path, help="PEFT adapter directory to apply")
    ap.add_argument("--data", type=Path, default=HERE / "heldout.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N cases")
    ap.add_argument("--show", type=int, default=3, help="print N sample replies")
    ap.add_argument("--skip-base", action="store_true", help="with --adapter: do not score the bare base model")
    args = ap.parse_args()
    cases = load_cases(args.data)[: args.limit or None]
    model, tok, _ = load_base_model(ModelConfig(model=args.model))

    def report(label: str, res: dict) -> None:
        for reply, ok in res["samples"][: args.show]:
            print(f"  {'OK ' if ok else 'BAD'} {reply!r}")
        print(json.dumps({"model": label, "n": res["n"], "exact_match": round(res["exact_match"], 4),
                          "valid_json": round(res["valid_json"], 4), "seconds": round(res["seconds"], 1)}),
              flush=True)

    if not args.skip_base:
        report(args.model, evaluate(model, tok, cases))
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter))
        report(f"{args.model} + {args.adapter}", evaluate(model, tok, cases))


if __name__ == "__main__":
    main()
