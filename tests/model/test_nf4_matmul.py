"""The small-batch NF4 kernel against bitsandbytes: same dequantized weights bit for bit, same products within
float32-accumulation rounding. Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.model import nf4_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter mishandles bfloat16 (numpy has no such type); float16 exercises the same code there.
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16]
pytestmark = pytest.mark.skipif(
    nf4_matmul.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton on CUDA, or TRITON_INTERPRET=1 with Triton installed")


def _linear4bit(n: int, k: int, seed: int, bias: bool):
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").to(DEVICE)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16).to(DEVICE),
                                        requires_grad=False)
    return layer


@settings(max_examples=12 if DEVICE == "cpu" else 60, deadline=None)
@given(m=st.integers(1, 64), n=st.sampled_from([16, 48, 64, 80]), k=st.sampled_from([64, 128, 256, 512]),
       seed=st.integers(0, 2**31 - 1), bias=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_matches_bitsandbytes(m, n, k, seed, bias, dtype):
    import bitsandbytes.functional as bnbf

    layer = _linear4bit(n, k, seed, bias)
    weight = nf4_matmul.NF4Weight.from_module(layer)
    dense = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # bitsandbytes' own weights
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    out = nf4_matmul.nf4_linear(x, weight)
    assert out.dtype == dtype and out.shape == (m, n)
    got = out.float()
    want = x.float() @ dense.T + (layer.bias.float() if bias else 0.0)
    scale = want.abs().max().item() + 1.0
    # bf16 output: one rounding of the float32 sum (2**-8 relative) plus summation-order differences.
    assert (got - want).abs().max().item() <= 2 ** -7 * scale, (got - want).abs().max().item()


def test_shapes_it_refuses():
    layer = _linear4bit(16, 64, 0, False)
    weight = nf4_matmul.NF4Weight.from_module(layer)
    with pytest.raises(ValueError, match="at most"):
        nf4_matmul.nf4_linear(torch.zeros(65, 64, dtype=torch.bfloat16, device=DEVICE), weight)
    assert nf4_matmul.NF4Weight.from_module(torch.nn.Linear(64, 16)) is None
