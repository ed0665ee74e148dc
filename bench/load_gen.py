"""gRPC load generator for bench/serve_gpu.py: N concurrent GenerateStream calls, fixed-length prompts and outputs.

    python bench/load_gen.py --target 127.0.0.1:50051 --concurrency 32 --requests 64 --prompt-tokens 512 \
        --new-tokens 128 --vocab 128256 [--adapters a0,a1,...]

Run it as its own process so that the client does not share the server's GIL. Stream j always uses adapter
``adapters[j % len(adapters)]`` (none = the base model), so N streams over N adapters keep N distinct adapters in
flight. Prompts are ``"t17 t4 ..."`` texts of exactly ``--prompt-tokens`` tokens of serve_gpu's word-level tokenizer;
every request sets ``ignore_eos``. Prints one JSON object: output tokens/s over the wall time, p50/p99 of TTFT (first
streamed chunk with text) and TPOT as the client sees them, and the server-side medians from the final messages.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg  # noqa: E402


def prompt_text(rng: random.Random, tokens: int, vocab: int) -> str:
    """A prompt of exactly ``tokens`` tokens (ids 1 .. vocab-2: never the pad id 0 nor the EOS id vocab-1)."""
    return " ".join(f"t{rng.randrange(1, vocab - 1)}" for _ in range(tokens))


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(target: str, concurrency: int, requests: int, prompt_tokens: int, new_tokens: int, vocab: int,
        adapters: list[str], seed: int = 0, timeout_s: float = 600.0) -> dict:
    """Send ``requests`` streaming requests over ``concurrency`` threads; times in seconds, throughput in tokens/s."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pbg.GenerationStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    rng = random.Random(seed)
    prompts = [prompt_text(rng, prompt_tokens, vocab) for _ in range(requests)]
    shares = [list(range(j, requests, concurrency)) for j in range(concurrency)]
    records: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def stream(j: int) -> None:
        adapter = adapters[j % len(adapters)] if adapters else ""
        start.wait()
        for i in shares[j]:
            req = pb.GenerateRequest(adapter_id=adapter, prompt=prompts[i], max_new_tokens=new_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            first = last = None
            try:
                for msg in stub.GenerateStream(req, timeout=timeout_s):
                    if first is None and msg.text:
                        first = time.perf_counter()
                    last = msg
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            end = time.perf_counter()
            first = first or end
            n = last.completion_tokens if last is not None else 0
            with lock:
                records.append({"ttft": first - t0, "tpot": (end - first) / (n - 1) if n > 1 else 0.0, "tokens": n,
                                "server_ttft": last.timings.ttft_seconds, "server_tpot": last.timings.tpot_seconds})

    threads = [threading.Thread(target=stream, args=(j,), daemon=True) for j in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    wall = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    channel.close()
    tokens = sum(r["tokens"] for r in records)
    out = {"concurrency": concurrency, "requests": len(records), "errors": errors[:5], "error_count": len(errors),
           "adapters": len(set(adapters[j % len(adapters)] for j in range(concurrency))) if adapters else 0,
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "wall_s": wall, "output_tokens": tokens,
           "short_outputs": sum(r["tokens"] != new_tokens for r in records),
           "output_tok_s": tokens / wall if wall > 0 else 0.0}
    for key in ("ttft", "tpot"):
        vals = [r[key] for r in records]
        out[f"{key}_p50_s"], out[f"{key}_p99_s"] = pct(vals, 0.5), pct(vals, 0.99)
        out[f"server_{key}_p50_s"] = pct([r[f"server_{key}"] for r in records], 0.5)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=0, help="total requests (default 2 per stream)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--adapters", default="", help="comma-separated adapter ids, registered beforehand")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    print(json.dumps(run(args.target, args.concurrency, args.requests or 2 * args.concurrency, args.prompt_tokens,
                         args.new_tokens, args.vocab, adapters, args.seed)))


if __name__ == "__main__":
    main()
