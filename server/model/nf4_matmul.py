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
``BLOCK_M >= 16`` rows for ``tl.dot``. The code book is decoded with a select tree on the 4 bits (no table loads)
and the two nibbles of a byte are multiplied by x's even and odd columns (no interleaving shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs (CI) run without this kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: ``(BLOCK_N, BLOCK_K, num_warps)``.
DEFAULT_CONFIG = (32, 128, 4)
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
        code_values: the 16 float32 code-book values (NF4 or FP4), passed to the kernel as scalars.
        n, k: output and input features.
        bias: ``[N]`` or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code_values: tuple[float, ...]
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
        return cls(packed=weight.data.reshape(-1), absmax=absmax.float().contiguous(), code_values=tuple(float(v) for v in state.code.float().cpu()),
                   n=n, k=k, bias=getattr(module, "bias", None))


if triton is not None:

    @triton.jit
    def _decode(q, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        """4-bit codes → code-book values by a select tree on the bits (no per-element table loads)."""
        b0 = (q & 1) != 0
        b1 = (q & 2) != 0
        b2 = (q & 4) != 0
        b3 = (q & 8) != 0
        v0 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
        v1 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
        v2 = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
        v3 = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
        return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))

    @triton.jit
    def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                           c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Byte j of a row holds elements 2j (high nibble) and 2j+1 (low nibble): instead of interleaving the
        # decoded weights, multiply the high nibbles by x's even columns and the low ones by its odd columns.
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        row_ok = rows < M
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            byte = tl.load(packed_ptr + cols[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=col_ok[:, None],
                           other=0).to(tl.int32)
            # one absmax per 64 elements = 32 bytes: lanes of a block read the same address
            scale = tl.load(absmax_ptr + cols[:, None] * (K // 64) + ((k0 + 2 * half) // 64)[None, :],
                            mask=col_ok[:, None], other=0.0)
            x_even = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + 2 * half)[None, :], mask=row_ok[:, None],
                             other=0.0)
            x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + 2 * half + 1)[None, :], mask=row_ok[:, None],
                            other=0.0)
            w_hi = (_decode(byte >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                    * scale).to(x_even.dtype)  # as bitsandbytes dequantizes: float32 product, then rounded
            w_lo = (_decode(byte & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                    * scale).to(x_even.dtype)
            acc += tl.dot(x_even, tl.trans(w_hi))
            acc += tl.dot(x_odd, tl.trans(w_lo))
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def nf4_linear(x: torch.Tensor, weight: NF4Weight, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x Wᵀ (+ bias)`` with the 4-bit weight read once.

    Args:
        x: ``[..., K]`` in the compute dtype (bfloat16 or float16), at most :data:`MAX_TOKENS` rows in all.
        weight: from :meth:`NF4Weight.from_module`.
        config: ``(BLOCK_N, BLOCK_K, num_warps)`` to override the default tiles (benchmarks).

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
    block_n, block_k, warps = config or DEFAULT_CONFIG
    if weight.k % block_k:
        block_k = 64
    grid = (triton.cdiv(weight.n, block_n),)
    _nf4_matmul_kernel[grid](x2, weight.packed, weight.absmax, y, m, weight.n, weight.k, x2.stride(0), y.stride(0),
                             *weight.code_values, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             num_warps=warps, num_stages=3)
    if weight.bias is not None:
        y += weight.bias.to(y.dtype)
    return y.reshape(*lead, weight.n)
