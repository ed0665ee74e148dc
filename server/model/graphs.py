"""CUDA-graph decode: one captured decode step per (batch bucket, context bucket, LoRA on/off), replayed each step.

Why: at batch 1 an 8B NF4 decode step launches thousands of small kernels; eagerly the GPU idles between them
(busy 8–25 % of a step, measured on an H200). A captured graph replays the whole step with one launch.

What makes the step capturable (:mod:`server.model.forward`): every input lives in a persistent device buffer
(one per context bucket, ``[max_batch, 3 + 3 + nb]`` int64 in :func:`server.model.runner.pack_rows`' layout) that
a step overwrites in place before replaying; shapes are fixed per bucket; routing and context lengths are tensors;
nothing syncs with the host. A step with B rows and contexts of at most nb blocks replays the graph of the
smallest batch bucket >= B and context bucket >= nb; the padding rows write only to the scratch block. All graphs
share one memory pool (they never run concurrently; each step reads its logits before the next replay).

Buckets: batch sizes 1, 2, 4, … up to ``max_batch`` (always included); context buckets of 8, 16, 32, … blocks up
to ``max_blocks`` (always included). Graphs = |batch buckets| · |context buckets| · 2.
"""

from __future__ import annotations

import logging
import time

import torch

from server.model.forward import DecoderForward
from server.model.kv_cache import KVPool
from server.model.lora import LoraBanks
from server.model.runner import StepRow, pack_rows, unpack

log = logging.getLogger(__name__)


def buckets(limit: int, first: int = 1) -> list[int]:
    """``first, 2·first, 4·first, …`` below ``limit``, then ``limit`` itself (ascending, no duplicates)."""
    out, size = [], first
    while size < limit:
        out.append(size)
        size *= 2
    return out + [limit]


def _fit(sizes: list[int], need: int) -> int | None:
    return next((s for s in sizes if s >= need), None)


class DecodeGraphs:
    """The captured decode graphs of one model.

    Args:
        forward, pool, banks: what the graphs run (shared with the eager path).
        max_batch_size: largest batch bucket.
        max_blocks: largest context bucket (blocks per sequence).

    Attributes:
        capture_seconds: wall time :meth:`capture` took (seconds).
        count: graphs captured.
    """

    def __init__(self, forward: DecoderForward, pool: KVPool, banks: LoraBanks, max_batch_size: int,
                 max_blocks: int) -> None:
        self.forward = forward
        self.pool = pool
        self.banks = banks
        self.batch_sizes = buckets(max_batch_size)
        self.block_counts = buckets(max_blocks, first=min(8, max_blocks))
        self.device = pool.keys[0].device
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._inputs: dict[int, torch.Tensor] = {}  # context bucket → [max_batch, 6 + nb] device buffer
        self._staging: dict[int, torch.Tensor] = {}  # the same, pinned on the host
        self.capture_seconds = 0.0
        self.count = 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, so the smaller graphs reuse the shared pool's memory)."""
        start = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        b_max = self.batch_sizes[-1]
        for nb in reversed(self.block_counts):
            self._inputs[nb] = torch.zeros(b_max, 6 + nb, dtype=torch.long, device=self.device)
            self._staging[nb] = torch.zeros(b_max, 6 + nb, dtype=torch.long).pin_memory()
            for b in reversed(self.batch_sizes):
                for use_lora in (True, False):
                    buf = self._inputs[nb][:b]
                    buf.copy_(torch.from_numpy(pack_rows([], b, 1, nb, self.pool.block_size, self.banks.none_slot)))
                    inputs = unpack(buf, 1, nb)
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
                        self.forward(inputs, self.pool, use_lora)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=mempool):
                        logits = self.forward(inputs, self.pool, use_lora)
                    self._graphs[(b, nb, use_lora)] = (graph, logits)
        torch.cuda.synchronize()
        self.count = len(self._graphs)
        self.capture_seconds = time.perf_counter() - start

    def bucket(self, rows: list[StepRow]) -> tuple[int, int] | None:
        """``(batch bucket, context bucket)`` that ``rows`` replay in, or None when none fits."""
        b = _fit(self.batch_sizes, len(rows))
        nb = _fit(self.block_counts, max(len(r.blocks) for r in rows))
        return None if b is None or nb is None else (b, nb)

    @torch.inference_mode()
    def replay(self, rows: list[StepRow]) -> torch.Tensor | None:
        """Run one decode step (one token per row) by replaying its bucket's graph.

        Returns:
            ``[len(rows), V]`` logits — a view of the graph's output, valid until the next replay — or None when
            no captured bucket fits (the caller runs the step eagerly).
        """
        fit = self.bucket(rows)
        if fit is None:
            return None
        b, nb = fit
        staging = self._staging[nb][:b]
        staging.numpy()[:] = pack_rows(rows, b, 1, nb, self.pool.block_size, self.banks.none_slot)
        # The previous step's copy out of this pinned buffer has finished: its logits were read (a host sync)
        # before this step began, so overwriting the buffer above was safe.
        self._inputs[nb][:b].copy_(staging, non_blocking=True)
        graph, logits = self._graphs[(b, nb, any(r.slot >= 0 for r in rows))]
        graph.replay()
        return logits[:len(rows)]


#: Largest accepted |replayed - eager| logit difference, relative to max(1, max |eager logit|): a few bf16 ulps
#: (bf16 keeps 8 significant bits, 2**-8 relative).
SELF_CHECK_TOLERANCE = 2.0 ** -6


@torch.inference_mode()
def self_check(graphs: DecodeGraphs, runner) -> float:
    """Compare replayed decode steps with eager steps of the same shapes on the same state, LoRA on and off.

    Prefills up to 3 short random sequences into blocks 1, 2, 3 (the engine has not started: nothing else uses
    them), writes random factors into slot 0 (cleared afterwards) and routes the rows to slot 0 / no adapter,
    then runs one decode step both ways. Returns the largest relative difference (see
    :data:`SELF_CHECK_TOLERANCE`); the caller turns graphs off when it is larger.
    """
    gen = torch.Generator().manual_seed(0)
    block = runner.pool.block_size
    n = min(3, graphs.batch_sizes[-1], runner.pool.num_blocks - 1)
    length = max(1, min(11, block - 1))
    vocab = int(runner.forward.head.weight.shape[0])
    banks = graphs.banks
    if banks.slots:  # slot 0's A and B of every module, in one write
        banks.flat[0].copy_(torch.randn(banks.flat[0].shape, generator=gen) * 0.05)
    try:
        worst = 0.0
        for lora in (True, False):
            prompts = [torch.randint(vocab, (length,), generator=gen).tolist() for _ in range(n)]
            slots = [0 if lora and banks.slots and i % 2 == 0 else -1 for i in range(n)]
            rows = [StepRow(tuple(p), 0, (1 + i,), s) for i, (p, s) in enumerate(zip(prompts, slots))]
            runner.eager(rows)
            step = [StepRow((p[-1],), length, (1 + i,), s) for i, (p, s) in enumerate(zip(prompts, slots))]
            b, nb = graphs.bucket(step)
            eager = runner.eager(step, n=b, nb=nb).float().clone()
            replayed = graphs.replay(step).float().clone()
            scale = max(1.0, float(eager.abs().max()))
            worst = max(worst, float((replayed - eager).abs().max()) / scale)
        return worst
    finally:
        if banks.slots:
            banks.clear(0)
