"""The running batch's KV cache and its contract: prefill one sequence, concatenate, filter, decode one step.

Rows have different lengths, so the batch cache is left-padded: row b's real tokens occupy the last
``lengths[b]`` columns of every layer's key/value tensor ``[B, H_kv, L, D]`` and ``attention_mask[b]``
(``[B, L]``, 1 = real token) marks them. Padding columns hold zeros (never NaN), so masked attention weights of
exactly 0 leave real rows untouched. Position ids are the row's own token count, so a row's numerics do not
depend on how much padding it has. The cache object is transformers' ``DynamicCache``; this module only pads,
concatenates and selects its per-layer tensors (the LoRAX/TGI "filter / concatenate / step" batch contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.errors import FailedPrecondition


@dataclass
class BatchState:
    """KV cache and masks of the running rows, in row order.

    Attributes:
        cache: transformers ``DynamicCache``; each layer's keys/values ``[B, H_kv, L, D]``.
        attention_mask: ``[B, L]`` int64, 1 where the cache column holds a real token of that row.
        lengths: ``[B]`` int64 on the host's side of the API (a Python list): real tokens per row.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    lengths: list[int]

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.attention_mask.shape[1])

    def nbytes(self) -> int:
        """Bytes held by the KV cache tensors (padding included)."""
        total = 0
        for layer in self.cache.layers:
            if layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise FailedPrecondition(f"cache layer type {type(layer).__name__} (sliding-window or other special "
                                     "attention) is not supported by the batching engine", field="model")


@torch.inference_mode()
def prefill(model, prompts: list[list[int]]) -> tuple[BatchState, torch.Tensor]:
    """Run new prompts through the model in one forward pass, left-padded to the longest (LoRA routing must
    already be set, one slot per prompt).

    Args:
        prompts: N token-id lists, each of length >= 1.

    Returns:
        ``(state, logits)``: an N-row :class:`BatchState` of width max(P_i) and each prompt's last-position
        logits ``[N, V]``.
    """
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    _check_layers(cache)
    if len(prompts) > 1:
        # Padding columns must hold zeros, never whatever a fully masked query produced: a masked key still
        # multiplies its value by an attention weight of 0, and 0 * NaN would poison the real rows.
        keep = mask.bool()[:, None, :, None]
        for layer in cache.layers:
            layer.keys = torch.where(keep, layer.keys, 0)
            layer.values = torch.where(keep, layer.values, 0)
    return BatchState(cache=cache, attention_mask=mask, lengths=[len(p) for p in prompts]), out.logits[:, -1, :]


@torch.inference_mode()
def decode(model, state: BatchState, next_ids: list[int]) -> torch.Tensor:
    """One decode step for every row: feed each row's newest token, append it to the cache.

    Args:
        next_ids: B token ids (the tokens sampled at the previous step).

    Returns:
        logits ``[B, V]`` for the following token. ``state`` grows by one column and each length by one.
    """
    device = state.attention_mask.device
    ids = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]
    positions = torch.tensor(state.lengths, dtype=torch.long, device=device)[:, None]
    state.attention_mask = F.pad(state.attention_mask, (0, 1), value=1)
    out = model(input_ids=ids, attention_mask=state.attention_mask, position_ids=positions,
                past_key_values=state.cache, use_cache=True)
    state.lengths = [n + 1 for n in state.lengths]
    return out.logits[:, -1, :]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [extra, 0]
    return F.pad(t, pad)


def concatenate(a: BatchState | None, b: BatchState) -> BatchState:
    """Rows of ``a`` followed by rows of ``b``; the narrower one is left-padded with zeros to the common width."""
    if a is None or a.size == 0:
        return b
    width = max(a.width, b.width)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_left_pad(la.keys, width, 2), _left_pad(lb.keys, width, 2)])
        la.values = torch.cat([_left_pad(la.values, width, 2), _left_pad(lb.values, width, 2)])
    a.attention_mask = torch.cat([_left_pad(a.attention_mask, width, 1), _left_pad(b.attention_mask, width, 1)])
    a.lengths = a.lengths + b.lengths
    return a


def filter_rows(state: BatchState, keep: list[int]) -> BatchState | None:
    """Keep rows ``keep`` (indices, in order) and drop cache columns no kept row uses. None if none is kept."""
    if not keep:
        return None
    if keep == list(range(state.size)):
        return state
    lengths = [state.lengths[i] for i in keep]
    trim = state.width - max(lengths)  # leading columns that are padding for every kept row
    index = torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device)
    for layer in state.cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
        layer.values = layer.values.index_select(0, index)[:, :, trim:]
    state.attention_mask = state.attention_mask.index_select(0, index)[:, trim:]
    state.lengths = lengths
    return state
