"""The model runner: turns a step plan (plain rows) into device tensors, runs the forward pass, returns logits.

It owns the KV pool, the LoRA banks' forward and, on CUDA, the captured decode graphs (:mod:`server.model.graphs`).
The engine layer hands it plain Python rows (:class:`StepRow`) and never sees a tensor except the logits it passes
on to the sampler.

Host → device traffic per step is ONE int64 array per step: each row is packed as

    [input ids (T) | positions (T) | write rows (T) | context_len | lora slot | last index | block table (nb)]

and copied in one transfer (a decode step on CUDA copies it straight into the captured graph's input buffer).
A prefill step whose rows score their prompt (:meth:`ModelRunner.prefill_scored`) appends those rows' target ids
to that same array.

Prompt scoring: the forward pass computes every position's hidden state anyway; only each row's last one goes
through the final norm and the LM head. A row that scores its prompt also sends its chunk's positions through them,
:data:`SCORE_CHUNK_ELEMENTS` logits at a time (so ``[T, V]`` float32 never materializes for a long prompt), and
:func:`server.model.sampling.prompt_logprob_scores` turns them into log-probabilities. Rows that do not ask cost
nothing more.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from server.errors import FailedPrecondition
from server.model.forward import DecoderForward, StepInputs
from server.model.kv_cache import KVPool
from server.model.lora import LoraBanks
from server.model.sampling import PromptScores, prompt_logprob_scores

log = logging.getLogger(__name__)

#: Most logits (positions x vocabulary) one prompt-scoring chunk computes at once: 2**22 float32 values are 16 MiB;
#: with the log-softmax and the top-k sort's values and int64 ids a chunk peaks near 5x that (about 80 MiB).
SCORE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class StepRow:
    """One sequence's part of a step.

    Attributes:
        tokens: ids to feed (one for decode; a prompt chunk for prefill).
        start: position of ``tokens[0]`` in the sequence (= tokens already in the KV cache).
        blocks: the sequence's block table (ids); it must cover positions ``0 … start + len(tokens) - 1``.
        slot: LoRA slot, or -1 for the base model alone.
    """

    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    slot: int = -1


@dataclass(frozen=True)
class PromptScoring:
    """What one prefill row scores: position i of its chunk (``0 <= i < len(targets)``) predicts ``targets[i]``.

    A chunk of prompt tokens ``prompt[s:s + c]`` of an n-token prompt scores ``targets = prompt[s + 1:min(s + c + 1,
    n)]``: its positions within the chunk predict the next prompt token, and its last position predicts the first
    token of the next chunk (on the prompt's last chunk that position predicts the first generated token, which is
    not scored). So chunked and unchunked prefill score the same positions.

    Attributes:
        targets: token ids, 1 .. ``len(tokens)`` of them (non-empty).
        top_k: the most likely tokens to return per position (0 .. V).
    """

    targets: tuple[int, ...]
    top_k: int


def pack_rows(rows: list[StepRow], n: int, t: int, nb: int, block_size: int, none_slot: int) -> np.ndarray:
    """Pack ``rows`` into the ``[n, 3t + 3 + nb]`` int64 layout of the module docstring, padding to ``n`` rows of
    ``t`` tokens and ``nb`` blocks. Padding tokens and padding rows write to and read from the scratch block only.

    Raises:
        ValueError: a row has more tokens than ``t``, more blocks than ``nb``, or its blocks do not cover its
            tokens.
    """
    out = np.zeros((n, 3 * t + 3 + nb), dtype=np.int64)
    out[:, 2 * t:3 * t] = np.arange(t) % block_size  # padding writes: distinct scratch rows
    out[:, 3 * t] = 1  # a padding row's context is one (scratch) token
    out[:, 3 * t + 1] = none_slot
    for i, row in enumerate(rows):
        k, end = len(row.tokens), row.start + len(row.tokens)
        if k > t or len(row.blocks) > nb or math.ceil(end / block_size) > len(row.blocks):
            raise ValueError(f"row {i}: {k} tokens from position {row.start} with {len(row.blocks)} blocks does "
                             f"not fit t={t}, nb={nb}, block_size={block_size}")
        positions = np.arange(row.start, end)
        blocks = np.asarray(row.blocks, dtype=np.int64)
        out[i, :k] = row.tokens
        out[i, t:t + k] = positions
        out[i, 2 * t:2 * t + k] = blocks[positions // block_size] * block_size + positions % block_size
        out[i, 3 * t] = end
        out[i, 3 * t + 1] = none_slot if row.slot < 0 else row.slot
        out[i, 3 * t + 2] = k - 1
        out[i, 3 * t + 3:3 * t + 3 + len(blocks)] = blocks
    return out


def unpack(buf: torch.Tensor, t: int, nb: int) -> StepInputs:
    """Views of a packed ``[n, 3t + 3 + nb]`` device buffer as :class:`StepInputs` (no copies)."""
    return StepInputs(input_ids=buf[:, :t], positions=buf[:, t:2 * t], write_rows=buf[:, 2 * t:3 * t],
                      context_lens=buf[:, 3 * t], lora_slots=buf[:, 3 * t + 1], last_index=buf[:, 3 * t + 2],
                      block_tables=buf[:, 3 * t + 3:3 * t + 3 + nb])


class ModelRunner:
    """Executes prefill and decode steps over the paged cache.

    Args:
        forward: the model's :class:`DecoderForward`.
        pool: the KV pool.
        banks: the LoRA banks (``none_slot`` routes a row to no adapter).
        max_batch_size: most rows in a decode step.
        max_blocks: most blocks one sequence holds (``ceil(max_total_tokens / block_size)``).
        graphs: captured decode graphs (CUDA) or None for the eager path.

    Attributes:
        graph_status: ``"on"``, ``"off"`` (CPU, or disabled) or why graphs are off (failed self-check).
        capture_seconds: wall time of the graph capture and its self-check at start-up (seconds; 0 without graphs).
    """

    def __init__(self, forward: DecoderForward, pool: KVPool, banks: LoraBanks, max_batch_size: int,
                 max_blocks: int, graphs=None) -> None:
        self.forward = forward
        self.pool = pool
        self.banks = banks
        self.max_batch_size = max_batch_size
        self.max_blocks = max_blocks
        self.graphs = graphs
        self.device = pool.keys[0].device
        self.graph_status = "on" if graphs is not None else "off"
        self.capture_seconds = 0.0
        vocab = int(forward.head.weight.shape[0])
        #: Positions per prompt-scoring chunk (at least 1; tests lower it to exercise the chunking).
        self.score_chunk = max(1, SCORE_CHUNK_ELEMENTS // vocab)

    def _inputs(self, rows: list[StepRow], n: int | None, nb: int | None,
                extra: tuple[int, ...] | list[int] = ()) -> tuple[StepInputs, torch.Tensor, bool]:
        """The step's :class:`StepInputs` and ``extra`` ids (``[len(extra)]`` int64), copied to the device in one
        transfer, and whether any row uses an adapter."""
        t = max(len(r.tokens) for r in rows)
        nb = nb or max(len(r.blocks) for r in rows)
        host = pack_rows(rows, n or len(rows), t, nb, self.pool.block_size, self.banks.none_slot)
        if len(extra):
            shape = host.shape
            host = np.concatenate([host.reshape(-1), np.asarray(extra, dtype=np.int64)])
            buf = torch.from_numpy(host).to(self.device)
            packed, tail = buf[:shape[0] * shape[1]].view(shape), buf[shape[0] * shape[1]:]
        else:
            packed = torch.from_numpy(host).to(self.device)
            tail = packed.new_empty(0)
        return unpack(packed, t, nb), tail, any(r.slot >= 0 for r in rows)

    @torch.inference_mode()
    def eager(self, rows: list[StepRow], n: int | None = None, nb: int | None = None) -> torch.Tensor:
        """Run ``rows`` eagerly (any T: prefill chunks, or decode without graphs).

        Args:
            rows: the step's rows (tokens of one row may be a prompt chunk).
            n, nb: pad to this many rows / blocks (default: exactly the rows' needs).

        Returns:
            ``[len(rows), V]`` logits of each row's last token.
        """
        inp, _, use_lora = self._inputs(rows, n, nb)
        return self.forward(inp, self.pool, use_lora)[:len(rows)]

    def prefill(self, rows: list[StepRow]) -> torch.Tensor:
        """One prefill step: each row's prompt chunk (eager; rows padded to the longest chunk).

        Returns:
            ``[len(rows), V]`` logits of each row's last chunk token.
        """
        return self.eager(rows)

    @torch.inference_mode()
    def prefill_scored(self, rows: list[StepRow], scoring: list[PromptScoring | None],
                       ) -> tuple[torch.Tensor, list[PromptScores | None]]:
        """One prefill step that also scores prompt tokens for the rows that ask (:class:`PromptScoring`).

        Args:
            rows: as :meth:`prefill`.
            scoring: one entry per row: None (not scored: costs nothing more than :meth:`prefill`) or what to score.

        Returns:
            ``(logits, scores)``: ``logits`` as :meth:`prefill` (``[len(rows), V]``, the LM head's dtype);
            ``scores[i]`` None for a row not scored, else its :class:`~server.model.sampling.PromptScores` on the
            device (``len(targets)`` positions), computed :attr:`score_chunk` positions at a time. No host sync.

        Raises:
            ValueError: ``scoring`` is not one entry per row, or a row's targets are empty or outnumber its tokens.
        """
        if len(scoring) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(scoring)} scoring entries")
        for i, (row, sc) in enumerate(zip(rows, scoring)):
            if sc is not None and not 1 <= len(sc.targets) <= len(row.tokens):
                raise ValueError(f"row {i}: {len(sc.targets)} targets for {len(row.tokens)} tokens")
        extra = [tid for sc in scoring if sc is not None for tid in sc.targets]
        inp, targets, use_lora = self._inputs(rows, None, None, extra)
        hidden = self.forward.hidden_states(inp, self.pool, use_lora)  # [N, T, hidden]
        n = len(rows)
        logits = self.forward.logits(hidden[torch.arange(n, device=hidden.device), inp.last_index[:n]])
        scores: list[PromptScores | None] = []
        at = 0
        for i, sc in enumerate(scoring):
            if sc is None:
                scores.append(None)
                continue
            p, step = len(sc.targets), self.score_chunk
            parts = [prompt_logprob_scores(self.forward.logits(hidden[i, a:min(a + step, p)]),
                                           targets[at + a:at + min(a + step, p)], sc.top_k)
                     for a in range(0, p, step)]
            scores.append(parts[0] if len(parts) == 1 else PromptScores.cat(parts))
            at += p
        return logits, scores

    def decode(self, rows: list[StepRow]) -> torch.Tensor:
        """One decode step (one token per row): replays a captured graph when one fits, else runs eagerly.

        Returns:
            ``[len(rows), V]`` logits (a view of the graph's output buffer: read it before the next step).
        """
        if self.graphs is not None:
            logits = self.graphs.replay(rows)
            if logits is not None:
                return logits
        return self.eager(rows)

    @torch.inference_mode()
    def scrub(self, blocks: list[int]) -> None:
        """Zero ``blocks`` in every layer: used before freeing the blocks of a sequence whose logits went
        non-finite, so a NaN never lingers in a block a later sequence reads (masked, but 0 · NaN = NaN)."""
        if not blocks:
            return
        rows = self.pool.token_rows(torch.tensor([blocks], dtype=torch.long, device=self.device)).reshape(-1)
        for keys, values in zip(self.pool.keys, self.pool.values):
            keys.index_fill_(0, rows, 0)
            values.index_fill_(0, rows, 0)



def kv_cache_blocks(requested_bytes: int, device: torch.device, per_token: int, block_size: int,
                    max_batch_size: int, max_total_tokens: int) -> int:
    """Blocks of the KV pool (the scratch block included).

    ``requested_bytes`` when set (``blocks = bytes // (block_size · per_token)``, at least 2); else (auto) enough
    for ``max_batch_size`` rows of ``max_total_tokens`` tokens plus the scratch block, capped at half the free
    accelerator memory (CUDA) or at 1 GiB and half the available host memory (CPU). ``per_token`` is
    :func:`server.model.kv_cache.bytes_per_token`.

    Raises:
        FailedPrecondition: the requested cache exceeds 90 % of the available memory (field ``kv_cache_bytes``).
    """
    from server.model.kv_cache import blocks_for

    available = _available_bytes(device)
    if requested_bytes:
        blocks = blocks_for(requested_bytes, block_size, per_token)
        need = blocks * block_size * per_token
        if need > 0.9 * available:
            raise FailedPrecondition(
                f"a KV cache of {need / 2**30:.2f} GiB does not fit: {available / 2**30:.2f} GiB of "
                f"{'accelerator' if device.type == 'cuda' else 'host'} memory is available (0 = auto sizing)",
                field="kv_cache_bytes")
        return blocks
    full = max_batch_size * math.ceil(max_total_tokens / block_size) + 1
    cap = available // 2 if device.type == "cuda" else min(1 << 30, available // 2)
    return min(full, blocks_for(cap, block_size, per_token))


def _available_bytes(device: torch.device) -> int:
    """Free accelerator memory (CUDA) or available host memory (CPU), in bytes."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def build_runner(model, config, lora_dtype: torch.dtype, max_total_tokens: int) -> ModelRunner:
    """Attach the LoRA banks and KV pool to ``model`` and, on CUDA with ``config.cuda_graphs``, capture and
    self-check the decode graphs (graphs stay off, with a logged error, when replay differs from eager).

    Args:
        model: a supported transformers causal LM (see :func:`server.model.forward.check_supported`).
        config: the :class:`~server.config.EngineConfig` (slots, rank, batch, KV cache and graph settings).
        lora_dtype: dtype of the LoRA banks.
        max_total_tokens: prompt + generated tokens per row (tokens).

    Returns:
        The runner; ``runner.graph_status`` says ``"on"``, ``"off"`` (CPU or disabled) or why they are off,
        ``runner.capture_seconds`` the capture + self-check wall time (seconds).

    Raises:
        FailedPrecondition: the model's architecture is not supported (field ``model``).
    """
    from server.model.kv_cache import bytes_per_token
    from server.model.lora import routable_modules

    device = next(model.parameters()).device
    shapes = {name: (int(m.in_features), int(m.out_features)) for name, m in routable_modules(model).items()}
    banks = LoraBanks(shapes, config.adapter_slots, config.max_lora_rank, lora_dtype, device)
    forward = DecoderForward(model, banks)
    dtype = forward.embed.weight.dtype
    per_token = bytes_per_token(forward.layers, forward.kv_heads, forward.head_dim, dtype)
    blocks = kv_cache_blocks(config.kv_cache_bytes, device, per_token, config.kv_block_size, config.max_batch_size,
                             max_total_tokens)
    pool = KVPool(forward.layers, blocks, config.kv_block_size, forward.kv_heads, forward.head_dim, dtype, device)
    max_blocks = min(math.ceil(max_total_tokens / config.kv_block_size), pool.num_blocks - 1)
    runner = ModelRunner(forward, pool, banks, config.max_batch_size, max_blocks)
    if device.type == "cuda" and config.cuda_graphs:
        from server.model.graphs import SELF_CHECK_TOLERANCE, DecodeGraphs, self_check

        start = time.perf_counter()
        graphs = DecodeGraphs(forward, pool, banks, config.max_batch_size, max_blocks)
        graphs.capture()
        error = self_check(graphs, runner)
        runner.capture_seconds = time.perf_counter() - start
        if error <= SELF_CHECK_TOLERANCE:
            runner.graphs, runner.graph_status = graphs, "on"
            log.info("captured %d decode graphs in %.1f s (replay vs eager: max relative difference %.2g)",
                     graphs.count, runner.capture_seconds, error)
        else:
            runner.graph_status = f"off: self-check failed (relative difference {error:.3g})"
            log.error("CUDA graphs disabled: replayed logits differ from eager by %.3g (relative) > %.3g; serving "
                      "eagerly", error, SELF_CHECK_TOLERANCE)
    return runner
