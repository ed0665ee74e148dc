"""Scores the extraction task through a running qlora-server: the base model and each named adapter, with and
without structured output, over gRPC.

    python examples/extraction/eval_server.py --target 127.0.0.1:50051 --adapter smollm2-extract-person

Every held-out prompt is sent as a greedy chat ``Generate`` (concurrently, so the server batches them, base and
adapter rows mixed), once as free text and once with ``response_format`` = the answer's JSON Schema
(:data:`evaluate.SCHEMA`; ``--schema off|on|both``, default both). Each reply is checked with
:func:`evaluate.check_reply` (valid JSON object, exact match) and :func:`evaluate.schema_valid` (valid against the
schema, checked by ``jsonschema``). One JSON line per (model, schema) pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from evaluate import SCHEMA, check_reply, load_cases, schema_valid  # noqa: E402

from server.engine.types import ChatMessage, GenerationRequest, ResponseFormat, SamplingParams  # noqa: E402
from server.rpc.client import Client  # noqa: E402


def score(client: Client, adapter_id: str, cases, max_new_tokens: int, concurrency: int,
          schema: bool = False) -> dict:
    """Greedy replies of ``adapter_id`` ("" = base) for every case, constrained to :data:`evaluate.SCHEMA` when
    ``schema``; returns n, exact_match, valid_json, schema_valid (fractions), seconds, and the first three
    replies."""
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA)) if schema else None

    def ask(case):
        messages, expected = case
        reply = client.generate(GenerationRequest(
            request_id="", adapter_id=adapter_id,
            messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages),
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, response_format=fmt))).text
        return reply, check_reply(reply, expected), schema_valid(reply)

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, cases))
    n = len(results)
    return {"adapter": adapter_id or "(base)", "schema": schema, "n": n,
            "exact_match": sum(ok for _, (_, ok), _ in results) / n,
            "valid_json": sum(valid for _, (valid, _), _ in results) / n,
            "schema_valid": sum(v for _, _, v in results) / n,
            "seconds": round(time.monotonic() - start, 1),
            "examples": [reply for reply, _, _ in results[:3]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--adapter", action="append", default=[], help="adapter id to score (repeatable)")
    p.add_argument("--data", type=Path, default=HERE / "heldout.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--schema", choices=("off", "on", "both"), default="both",
                   help="score free-text replies (off), schema-constrained ones (on), or both (default)")
    args = p.parse_args()
    cases = load_cases(args.data)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.schema]
    with Client(args.target) as client:
        for adapter_id in ["", *args.adapter]:
            for schema in modes:
                print(json.dumps(score(client, adapter_id, cases, args.max_new_tokens, args.concurrency, schema)),
                      flush=True)


if __name__ == "__main__":
    main()
