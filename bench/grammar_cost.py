"""Per-token cost of JSON-schema constrained decoding libraries on this CPU (groundwork for issue 11).

    PYTHONPATH=DIR_WITH_LIBS .venv/bin/python bench/grammar_cost.py [--reps 5]

For the extraction demo's schema (``{"name": str, "age": int, "job": str, "city": str}``, every field required) and
the embedded SmolLM2-135M tokenizer (49,152 tokens), each library compiles the schema once, then walks the token
sequence of one valid answer: before every token it computes the allowed-token mask (what a decoder would apply
to the logits), then accepts the token. Prints one JSON line: compile seconds and the median / p90 microseconds per
mask, per library (xgrammar, llguidance). Libraries that are not importable are reported as such.

``engine_step`` measures what the engine itself pays per decode step for ``--batch`` constrained rows (default 16,
each at a different point of the answer): :meth:`GrammarCompiler.bitmask` (one array, rows filled in parallel)
plus :func:`server.model.sampling.apply_allowed` on CPU logits, median / p90 microseconds per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "job": {"type": "string"}, "city": {"type": "string"}},
          "required": ["name", "age", "job", "city"], "additionalProperties": False}
ANSWER = '{"name": "Maria Lopez", "age": 34, "job": "architect", "city": "Lisbon"}'


def _summary(compile_s: float, per_mask: list[float]) -> dict:
    per_mask = sorted(per_mask)
    return {"compile_s": round(compile_s, 4), "masks": len(per_mask),
            "median_us": round(statistics.median(per_mask) * 1e6, 1),
            "p90_us": round(per_mask[int(0.9 * (len(per_mask) - 1))] * 1e6, 1)}


def bench_xgrammar(tok, ids: list[int], reps: int) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for _ in range(reps):
        matcher = xgr.GrammarMatcher(compiled)
        for tid in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t)
            if not matcher.accept_token(tid):
                raise RuntimeError(f"xgrammar refused token {tid}")
    return _summary(compile_s, times)


def bench_llguidance(tok, ids: list[int], reps: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    mask = lnp.allocate_token_bitmask(1, lltok.vocab_size)
    times = []
    for _ in range(reps):
        matcher = llguidance.LLMatcher(lltok, grammar)
        for tid in ids:
            t = time.perf_counter()
            lnp.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - t)
            if not matcher.consume_token(tid):
                raise RuntimeError(f"llguidance refused token {tid}: {matcher.get_error()}")
    return _summary(compile_s, times)


def bench_engine_step(tok, ids: list[int], batch: int, reps: int) -> dict:
    """The engine's per-step cost for ``batch`` constrained rows (see the module docstring)."""
    import torch

    from server.engine.grammar import GrammarCompiler
    from server.engine.types import ResponseFormat
    from server.model.sampling import apply_allowed

    grammar = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    t = time.perf_counter()
    grammar.matcher(fmt)
    compile_s = time.perf_counter() - t
    logits = torch.randn(batch, len(tok))
    fill, apply = [], []
    for _ in range(reps):
        matchers = [grammar.matcher(fmt) for _ in range(batch)]
        for b, m in enumerate(matchers):  # row b starts b tokens into the answer
            m.consume_tokens(ids[:b % len(ids)])
        for step in range(len(ids) - batch % len(ids)):
            t = time.perf_counter()
            mask, _ = grammar.bitmask(matchers)
            fill.append(time.perf_counter() - t)
            t = time.perf_counter()
            apply_allowed(logits, torch.from_numpy(mask))
            apply.append(time.perf_counter() - t)
            for b, m in enumerate(matchers):
                pos = b % len(ids) + step
                if pos < len(ids):
                    m.consume_token(ids[pos])
    return {"batch": batch, "first_compile_s": round(compile_s, 4), "fill": _summary(0.0, fill),
            "apply_cpu": _summary(0.0, apply)}


def main() -> None:
    from transformers import AutoTokenizer

    from server.config import ModelConfig
    from server.model.base import resolve_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    path, _ = resolve_source(ModelConfig())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    out: dict = {"tokens": len(ids), "vocab": len(tok)}
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            out[name] = fn(tok, ids, args.reps)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next library
            out[name] = f"{type(exc).__name__}: {exc}"
    out["engine_step"] = bench_engine_step(tok, ids, args.batch, args.reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
