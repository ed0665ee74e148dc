"""The paged KV cache: one preallocated pool of fixed-size blocks per layer, addressed through per-row block tables.

Layout (the vLLM design, Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention", 2023):
each layer owns ``keys`` and ``values`` of shape ``[num_blocks · block_size, H_kv, D]`` in the compute dtype.
A sequence holds a list of block ids (its block table); its token at position ``p`` lives in pool row
``table[p // block_size] · block_size + p % block_size``. Shapes never change while serving, so the decode step can
be captured in a CUDA graph, and sequences join and leave without copying anyone's keys and values.

Block 0 is never given to a sequence: it is the scratch block that padding tokens (rows of a batch bucket that hold
no sequence, or the tail of a padded prefill chunk) write to and read from, so a padded slot can never touch a
real sequence's cache.

Memory: ``bytes = num_blocks · block_size · layers · 2 · H_kv · D · bytes_per_element`` (keys and values).
"""

from __future__ import annotations

import torch

#: The block that padding tokens write to; never allocated to a sequence.
SCRATCH_BLOCK = 0


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes over all layers: ``layers · 2 · H_kv · D · element size``."""
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for(budget_bytes: int, block_size: int, per_token_bytes: int) -> int:
    """How many blocks ``budget_bytes`` holds (the scratch block included), at least 2 (scratch + one)."""
    return max(2, budget_bytes // (block_size * per_token_bytes))


class KVPool:
    """The preallocated per-layer key / value pools.

    Args:
        layers: decoder layers L.
        num_blocks: blocks in the pool (block 0 is the scratch block).
        block_size: tokens per block.
        kv_heads, head_dim: H_kv and D of the model's attention.
        dtype, device: of the pools (the model's compute dtype and device).

    Attributes:
        keys, values: L tensors ``[num_blocks · block_size, H_kv, D]`` each, zero-initialised (zeros, never NaN,
            so a masked read of an unwritten row multiplies a finite value by an attention weight of 0).
    """

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (the scratch block and one more), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds on its device (all layers, keys and values)."""
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def token_rows(self, block_tables: torch.Tensor) -> torch.Tensor:
        """Pool rows of every position a block table covers.

        Args:
            block_tables: ``[N, nb]`` int64 block ids.

        Returns:
            ``[N, nb · block_size]`` int64: entry ``[n, p]`` is the pool row of row n's position p.
        """
        offsets = torch.arange(self.block_size, device=block_tables.device, dtype=block_tables.dtype)
        return (block_tables[:, :, None] * self.block_size + offsets).flatten(1)
