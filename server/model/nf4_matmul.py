"""Small-batch NF4 matmul in Triton: ``y = x Wᵀ`` for 2–64 tokens, reading each 4-bit weight once.

Why: for more than one token, bitsandbytes dequantizes the whole weight to the compute dtype and calls a dense
GEMM, so a decode step of 16 rows writes and re-reads every weight at 16 bits — about 4× the bytes of the NF4
weights it started from (an 8B step moves ~30 GB instead of ~4.5 GB). Its fused GEMV serves exactly one token.
This kernel covers the decode batches in between: it streams the packed weights, dequantizes a tile in registers
and multiplies it on the tensor cores.

Weight layout (bitsandbytes ``Params4bit``, checked bit for bit against ``bitsandbytes.functional.dequantize_4bit``
in the tests): ``W [N, K]`` flattened row-major, two 4-bit codes per byte with the first element in the high nibble,
one absmax per 64 consecutive elements. With double quantization the absmax values are themselves 8-bit
blockwise-quantized; they are dequantized once at load (``dequantize_blockwise(absmax, state2) + offset``,
float32, ``N · K / 64 · 4`` bytes — about 0.4 GiB for an 8B model). Then, as bitsandbytes does,

    W[n, k] = bf16( code[q(n, k)] · absmax[(n·K + k) // 64] ),   y = x Wᵀ accumulated in float32.

Each program owns ``BLOCK_N`` output features and walks K in ``BLOCK_K`` tiles; x (at most 64 rows) is padded to
``BLOCK_M >= 16`` rows for ``tl.dot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs (CI) run without this kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: Token counts this kernel serves (one token goes to bitsandbytes' fused GEMV; more is prefill: a dense GEMM).
MIN_TOKENS, MAX_TOKENS = 2, 64


def available(device: torch.device) -> bool:
    """True when the kernel can run on ``device`` (Triton importable and a CUDA device)."""
    return triton is not None and torch.device(device).type == "cuda"


@dataclass(frozen=True)
class NF4Weight:
    """One ``Linear4bit``'s weight in the kernel's form.

    Attributes:
        packed: ``[N · K / 2]`` uint8 codes (the module's own storage, not a copy).
        absmax: ``[N · K / 64]`` float32 block scales (double quantization undone).
        code: ``[16]`` float32 code book (NF4 or FP4).
        n, k: output and input features.
        bias: ``[N]`` or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    n: int
    k: int
    bias: torch.Tensor | None

    @classmethod
    def from_module(cls, module) -> "NF4Weight | None":
        """The kernel's view of a bitsandbytes ``Linear4bit`` (None when it is not one, or its layout is not
        blocks of 64 over a K that is a multiple of 64)."""
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or state.blocksize != 64 or len(state.shape) != 2 or state.shape[1] % 64:
            return None
        import bitsandbytes.functional as bnbf

        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        n, k = (int(d) for d in state.shape)
        return cls(packed=weight.data.reshape(-1), absmax=absmax.float().contiguous(), code=state.code.float(),
                   n=n, k=k, bias=getattr(module, "bias", None))


if triton is not None:

    @triton.jit
    def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        half = tl.arange(0, BLOCK_K // 2)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=rows[:, None] < M, other=0.0)
            byte = tl.load(packed_ptr + cols[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=col_ok[:, None],
                           other=0)
            q = tl.join((byte >> 4).to(tl.int32), (byte & 0xF).to(tl.int32)).reshape(BLOCK_N, BLOCK_K)
            scale = tl.load(absmax_ptr + (cols[:, None] * K + (k0 + ks)[None, :]) // 64, mask=col_ok[:, None],
                            other=0.0)
            w = (tl.load(code_ptr + q) * scale).to(x.dtype)  # [BLOCK_N, BLOCK_K], as bitsandbytes dequantizes
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & col_ok[None, :])


def nf4_linear(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """``x Wᵀ (+ bias)`` with the 4-bit weight read once.

    Args:
        x: ``[..., K]`` in the compute dtype (bfloat16 or float16), at most :data:`MAX_TOKENS` rows in all.
        weight: from :meth:`NF4Weight.from_module`.

    Returns:
        ``[..., N]`` in ``x``'s dtype.

    Raises:
        ValueError: more than :data:`MAX_TOKENS` rows, or K does not match.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m > MAX_TOKENS or x2.shape[1] != weight.k:
        raise ValueError(f"nf4_linear takes at most {MAX_TOKENS} rows of {weight.k} features, got {tuple(x2.shape)}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(m, weight.n, dtype=x.dtype, device=x.device)
    block_m = max(16, triton.next_power_of_2(m))
    block_n = 16 if weight.n <= 4096 else 32  # enough programs to fill the GPU for every projection shape
    block_k = 256 if weight.k % 256 == 0 else 64
    grid = (triton.cdiv(weight.n, block_n),)
    _nf4_matmul_kernel[grid](x2, weight.packed, weight.absmax, weight.code, y, m, weight.n, weight.k, x2.stride(0),
                             y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
                             num_stages=3)
    if weight.bias is not None:
        y += weight.bias.to(y.dtype)
    return y.reshape(*lead, weight.n)
