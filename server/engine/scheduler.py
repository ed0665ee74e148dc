"""Scheduling arithmetic of the engine, in plain Python: the KV block allocator and the chunked-prefill plan.

Admission reserves, up front, every block a request can ever need (``ceil(min(prompt + max_new_tokens,
max_total_tokens) / block_size)``), so a running request never waits for memory and is never preempted or
corrupted; a request that does not fit waits in the queue until blocks are freed (oldest first: a large request is
not starved by small ones behind it). Prefill runs in chunks under a token budget per step, so a long prompt delays
the running rows' next token by one chunk's forward pass, not by its whole length.
"""

from __future__ import annotations

import math

from server.model.kv_cache import SCRATCH_BLOCK


def blocks_needed(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens: ``ceil(tokens / block_size)``."""
    return math.ceil(tokens / block_size)


class BlockAllocator:
    """Hands out the KV pool's blocks (every block but the scratch block).

    Args:
        num_blocks: blocks in the pool, the scratch block included.

    Not thread-safe: only the engine thread calls it.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = [b for b in range(num_blocks - 1, -1, -1) if b != SCRATCH_BLOCK]  # pop() gives low ids first

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` blocks, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        """Give ``blocks`` back.

        Raises:
            ValueError: a block is the scratch block, out of range, or already free (a double free would let two
                sequences share a block).
        """
        free = set(self._free)
        for b in blocks:
            if b == SCRATCH_BLOCK or not 0 <= b < self.num_blocks or b in free:
                raise ValueError(f"block {b} cannot be released (scratch, out of range or already free)")
            free.add(b)
        self._free.extend(reversed(blocks))


def plan_chunks(remaining: list[int], budget: int, max_rows: int) -> list[int]:
    """Prompt tokens to prefill for each waiting-to-prefill sequence this step, oldest first.

    The step is a padded ``[rows, T]`` batch, so its cost is ``rows · T`` tokens: ``T`` is the first sequence's
    chunk (``min(remaining[0], budget)``) and further sequences join while ``(rows + 1) · T <= budget``, each with
    ``min(remaining[i], T)`` tokens.

    Args:
        remaining: prompt tokens not yet in the KV cache, per sequence (each >= 1), oldest first.
        budget: most padded tokens per step (>= 1).
        max_rows: most sequences per step (>= 1).

    Returns:
        Chunk lengths for the first ``len(result)`` sequences (at least one when ``remaining`` is not empty).
    """
    if not remaining:
        return []
    t = min(remaining[0], budget)
    chunks = [t]
    for left in remaining[1:]:
        if len(chunks) >= max_rows or (len(chunks) + 1) * t > budget:
            break
        chunks.append(min(left, t))
    return chunks
