"""Times the small-batch NF4 kernel (several tile configs) against bitsandbytes on the 8B projection shapes.

Usage (GPU machine): ``python bench/nf4_kernel.py``. Prints GPU µs per call (calls captured in a CUDA graph, as the decode step runs) for
M = 1, 2, 16, 64 tokens and the shapes of Llama-3-8B's projections; bitsandbytes = ``Linear4bit.forward`` (fused GEMV
at one token, dequantize + GEMM above).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}
CONFIGS = [(16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 8)]


def layer(n: int, k: int):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16, device="cuda"), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4").to("cuda")
    return lin


def time_us(fn, calls: int = 10, reps: int = 10) -> float:
    """GPU time per call: ``calls`` calls captured in one CUDA graph (no host launch cost, as in serving),
    replayed ``reps`` times; median per call in µs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    from server.model.nf4_matmul import NF4Weight, nf4_linear

    print("shape, M, bitsandbytes µs, " + ", ".join(f"ours{c} µs" for c in CONFIGS))
    for name, (n, k) in SHAPES.items():
        lin = layer(n, k)
        weight = NF4Weight.from_module(lin)
        for m in (1, 2, 16, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            with torch.inference_mode():
                row = [time_us(lambda: lin(x))]
                for cfg in CONFIGS:
                    try:
                        row.append(time_us(lambda: nf4_linear(x, weight, cfg)))
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                        print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                        row.append(float("nan"))
            print(f"{name}, {m}, " + ", ".join(f"{v:.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
