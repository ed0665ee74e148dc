"""Measures what the compute dtype costs on this CPU: matmul GFLOP/s and NF4 SmolLM2 decode time, bf16 vs float32.

Each configuration runs in its own subprocess, because PyTorch reads ``ATEN_CPU_CAPABILITY`` (and oneDNN
``ONEDNN_MAX_CPU_ISA``) once at start-up: ``--emulate-avx2`` caps both at AVX2, which makes an AVX512-BF16 CPU behave
like the AVX2-only CPUs where bf16 is emulated. Prints one JSON line per configuration and a Markdown table.

    python bench/cpu_dtype.py                  # this CPU as it is
    python bench/cpu_dtype.py --emulate-avx2   # as an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(dtype: str, new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(64, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
    for _ in range(3):
        a @ b
    n, t0 = 30, time.perf_counter()
    for _ in range(n):
        a @ b
    gflops = 2 * 64 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9

    from server.config import ModelConfig
    from server.model.base import load_base_model

    model, tok, info = load_base_model(ModelConfig(compute_dtype=dtype, device="cpu"))
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        elapsed = time.perf_counter() - t0
    produced = out.shape[1] - ids["input_ids"].shape[1]
    return {"dtype": dtype, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "matmul_gflops": round(gflops, 1), "s_per_token": round(elapsed / produced, 4), "tokens": produced}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emulate-avx2", action="store_true", help="cap PyTorch and oneDNN kernels at AVX2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.new_tokens, args.threads)), flush=True)
        return
    env = dict(os.environ)
    if args.emulate_avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    rows = []
    for dtype in ("float32", "bfloat16"):
        run = subprocess.run([sys.executable, __file__, "--child", dtype, "--new-tokens", str(args.new_tokens),
                              "--threads", str(args.threads)], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| dtype | PyTorch CPU capability | matmul GFLOP/s | decode s/token (batch 1) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['cpu_capability']} | {r['matmul_gflops']} | {r['s_per_token']} |")


if __name__ == "__main__":
    main()
