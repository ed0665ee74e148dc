"""Scores the extraction task through a running qlora-server: the base model and each named adapter, over gRPC.

    python examples/extraction/eval_server.py --target 127.0.0.1:50051 --adapter smollm2-extract-person

Every held-out prompt is sent as a greedy chat ``Generate`` (concurrently, so the server batches them, base and
adapter rows mixed) and the reply is checked with :func:`evaluate.check_reply` (valid JSON object, exact match).
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

from evaluate import check_reply, load_cases  # noqa: E402

from server.engine.types import ChatMessage, GenerationRequest, SamplingParams  # noqa: E402
from server.rpc.client import Client  # noqa: E402


def score(client: Client, adapter_id: str, cases, max_new_tokens: int, concurrency: int) -> dict:
    """Greedy replies of ``adapter_id`` ("" = base) for every case; returns n, exact_match, valid_json (fractions),
    seconds, and the first three replies."""

    def ask(case):
        messages, expected = case
        reply = client.generate(GenerationRequest(
            request_id="", adapter_id=adapter_id,
            messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages),
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))).text
        return reply, check_reply(reply, expected)

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, cases))
    n = len(results)
    return {"adapter": adapter_id or "(base)", "n": n,
            "exact_match": sum(ok for _, (_, ok) in results) / n,
            "valid_json": sum(valid for _, (valid, _) in results) / n,
            "seconds": round(time.monotonic() - start, 1),
            "examples": [reply for reply, _ in results[:3]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--adapter", action="append", default=[], help="adapter id to score (repeatable)")
    p.add_argument("--data", type=Path, default=HERE / "heldout.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    cases = load_cases(args.data)
    with Client(args.target) as client:
        for adapter_id in ["", *args.adapter]:
            print(json.dumps(score(client, adapter_id, cases, args.max_new_tokens, args.concurrency)), flush=True)


if __name__ == "__main__":
    main()
