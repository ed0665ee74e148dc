"""Times one decode step of our runner (eager vs CUDA graph, batch 1-64, no adapter vs 4 vs 64 resident adapters).

Usage (GPU machine; ``--tiny`` for a CPU dry run):

    python bench/decode_step.py --out "$OUT"

The model is Llama-3-8B-shaped (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256) with random
weights quantized to NF4 with double quantization in memory, bf16 compute; adapters are random r=16 on all linear
layers written straight into the banks. Rounds alternate eager and graph in one process; medians and p10 in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nf4_model(tiny: bool, device: str):
    """A random LlamaForCausalLM whose linear layers (not the head) are bitsandbytes NF4 ``Linear4bit``."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(device)
                setattr(parent, name, q)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    args = parser.parse_args()
    from server.config import EngineConfig
    from server.model.runner import StepRow, build_runner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = nf4_model(args.tiny, device)
    load_s = time.perf_counter() - t0
    cfg = EngineConfig(max_batch_size=64, adapter_slots=64, max_lora_rank=16, max_total_tokens=1024,
                       cpu_adapter_cache=64, kv_cache_bytes=0)
    t0 = time.perf_counter()
    runners = {"ours": build_runner(model, cfg, model.model.embed_tokens.weight.dtype, 1024)}
    build_s = time.perf_counter() - t0
    runner = runners["ours"]
    print(f"model {load_s:.1f} s; runner {build_s:.1f} s (capture {runner.capture_seconds:.1f} s, graphs "
          f"{runner.graph_status}); KV pool {runner.pool.nbytes / 2**30:.2f} GiB, banks "
          f"{runner.banks.bank_bytes() / 2**30:.2f} GiB", flush=True)
    gen = torch.Generator().manual_seed(0)
    for r in runners.values():  # every slot holds a random r=16 adapter
        r.banks.flat[:-1].copy_((torch.randn(r.banks.flat[:-1].shape, generator=gen) * 0.01).to(r.banks.dtype))
    vocab = model.config.vocab_size
    ctx = 512
    per_seq = (ctx + 64) // runner.pool.block_size + 1
    results = {"load_s": load_s, "build_s": build_s, "capture_s": runner.capture_seconds,
               "graphs": runner.graph_status, "kv_pool_bytes": runner.pool.nbytes,
               "bank_bytes": runner.banks.bank_bytes(), "steps_ms": {}}
    for batch in (1, 2, 16, 64):
        prompts = [torch.randint(vocab, (ctx,), generator=gen).tolist() for _ in range(batch)]
        tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
        for r in runners.values():
            for i in range(0, batch, 4):  # prefill (eager), 4 rows at a time
                r.prefill([StepRow(tuple(p), 0, t) for p, t in zip(prompts[i:i + 4], tables[i:i + 4])])
        for mode in ("none", "1 adapter", "4 adapters", "64 adapters"):
            if batch == 1 and mode in ("4 adapters", "64 adapters"):
                continue
            slots = {"none": [-1] * batch, "1 adapter": [0] * batch, "4 adapters": [i % 4 for i in range(batch)],
                     "64 adapters": [i % 64 for i in range(batch)]}[mode]
            rows = [StepRow((p[-1],), ctx, t, s) for p, t, s in zip(prompts, tables, slots)]
            stacks = {f"{name}, graph": (lambda r=r: r.decode(rows)) for name, r in runners.items()
                      if r.graphs is not None}
            if mode in ("none", "4 adapters") or device == "cpu":
                stacks["ours, eager"] = lambda: runner.eager(rows)
            runs = {key: [] for key in stacks}
            for _ in range(args.rounds):  # alternate short rounds: the host has slow phases
                for key, fn in stacks.items():
                    fn()
                    runs[key].extend(timed(fn, device) for _ in range(args.steps))
            for key, samples in runs.items():
                samples.sort()
                label = f"batch {batch}, {mode}, {key}"
                results["steps_ms"][label] = {"median": statistics.median(samples), "p10": samples[len(samples) // 10]}
                print(f"{label}: median {statistics.median(samples):.2f} ms, p10 {samples[len(samples) // 10]:.2f} ms",
                      flush=True)
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for batch in (1, 16):
            rows = [StepRow((1,), ctx, tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)), i % 4)
                    for i in range(batch)]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runner.eager(rows)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            (args.out / f"profile_eager_b{batch}_lora.txt").write_text(table)
    (args.out / "decode_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
