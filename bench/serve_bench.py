"""Load test of a running server over gRPC: TTFT, TPOT and end-to-end latency percentiles and token throughput.

    python bench/serve_bench.py --target 127.0.0.1:50051 --adapter a=/path/to/a --adapter b=/path/to/b \
        --requests 32 --concurrency 8 --max-new-tokens 64 --out results.json

Requests cycle through the base model and the given adapters (registered first, with replace), so every step
of the server's batch mixes adapters. Timings are measured by the client from the stream (TTFT = first
message carrying text).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.",
    "What is 12 times 7?",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(target: str, adapters: list[str], requests: int, concurrency: int, max_new_tokens: int) -> dict:
    channel = grpc.insecure_channel(target)
    gen = pbg.GenerationStub(channel)
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            adapter = ([""] + adapters)[i % (len(adapters) + 1)]
            req = pb.GenerateRequest(adapter_id=adapter, max_new_tokens=max_new_tokens,
                                     messages=[pb.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
            start = time.perf_counter()
            first, tokens = None, 0
            for msg in gen.GenerateStream(req):
                if first is None and msg.text:
                    first = time.perf_counter()
                tokens = msg.completion_tokens or tokens
            end = time.perf_counter()
            first = first or end
            with lock:
                results.append({"adapter": adapter, "ttft": first - start, "total": end - start, "tokens": tokens,
                                "tpot": (end - first) / (tokens - 1) if tokens > 1 else 0.0})

    wall = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    out = {"requests": len(results), "concurrency": concurrency, "max_new_tokens": max_new_tokens,
           "wall_s": wall, "generated_tokens": sum(r["tokens"] for r in results)}
    out["throughput_tok_s"] = out["generated_tokens"] / wall
    for key in ("ttft", "tpot", "total"):
        vals = [r[key] for r in results]
        out[f"{key}_p50_s"] = percentile(vals, 0.5)
        out[f"{key}_p90_s"] = percentile(vals, 0.9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--adapter", action="append", default=[], help="ID=DIR, registered (replace) before the run")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4, help="requests sent (and discarded) before measuring")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    stub = pbg.AdaptersStub(grpc.insecure_channel(args.target))
    ids = []
    for spec in args.adapter:
        adapter_id, _, path = spec.partition("=")
        stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=str(Path(path).resolve()),
                                                       replace=True))
        ids.append(adapter_id)
    if args.warmup:
        run(args.target, ids, args.warmup, min(args.warmup, args.concurrency), 8)
    result = run(args.target, ids, args.requests, args.concurrency, args.max_new_tokens)
    result["adapters"] = ids
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
