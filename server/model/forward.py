"""The decoder forward pass over the paged KV cache, with each row's own LoRA adapter (Llama-family models).

We run the transformers model's own modules (embedding, RMSNorms, rotary embedding, the NF4 ``Linear4bit``
projections, the MLP activation, the LM head) but own the loop around them, because attention must read and write
the paged pool (:mod:`server.model.kv_cache`) and every projection adds its row's LoRA term
(:mod:`server.model.lora`). Every input is a tensor of fixed shape, there are no host syncs and no Python branches
on tensor values, so :mod:`server.model.graphs` can capture the decode step in a CUDA graph.

A step is N rows of T tokens (right-padded): decode is T = 1, a prefill chunk T >= 1. For layer l, with
H query heads in H_kv groups of G = H / H_kv (grouped-query attention), head dim D:

    k, v of the step's tokens are written to pool rows ``write_rows [N, T]`` (the scratch block for padding),
    then row n's query at position p attends keys 0 … p of its own context, read through its block table:
    attn = softmax(q Kᵀ · D^-1/2 + mask) V, mask = 0 where key j <= p and j < context_len[n], else -inf

Prefill chunks (T > 1) use PyTorch's ``scaled_dot_product_attention`` with that mask (its fused kernels skip masked
blocks and never materialize the ``[T, L]`` scores); the decode step (T = 1, the captured one) multiplies the G
queries of a group against the gathered keys directly, with the softmax in float32 as transformers' eager attention.

:meth:`DecoderForward.__call__` returns each row's last-token logits; :meth:`DecoderForward.hidden_states` +
:meth:`DecoderForward.logits` give any position's (prompt scoring, :mod:`server.model.runner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from server.errors import FailedPrecondition
from server.model.kv_cache import KVPool
from server.model.lora import LoraBanks

#: ``config.model_type`` values whose decoder layer is the Llama layer (pre-norm, rotary, GQA, gated MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


@dataclass
class StepInputs:
    """One forward step's device tensors (all int64, on the model's device).

    Attributes:
        input_ids: ``[N, T]`` token ids (0 for padding).
        positions: ``[N, T]`` position of each token in its sequence (0 for padding).
        write_rows: ``[N, T]`` pool row each token's key/value is written to (a scratch row for padding).
        block_tables: ``[N, nb]`` block ids of each row's context (the scratch block past its end).
        context_lens: ``[N]`` tokens of each row's context after this step (>= 1; 1 for padding rows).
        lora_slots: ``[N]`` adapter slot per row (``LoraBanks.none_slot`` for none).
        last_index: ``[N]`` index in T of each row's last real token (whose logits are returned).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    lora_slots: torch.Tensor
    last_index: torch.Tensor


def check_supported(model: nn.Module) -> None:
    """Raise :class:`FailedPrecondition` (field ``model``) unless the engine's forward pass can run ``model``:
    a Llama-family decoder (``SUPPORTED_MODEL_TYPES``) with full attention (no sliding window)."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise FailedPrecondition(f"model type {kind!r} is not supported by the engine (supported: "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)})", field="model")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        raise FailedPrecondition(f"sliding-window attention ({window} tokens) is not supported by the engine",
                                 field="model")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise FailedPrecondition("the model has no decoder layers at model.model.layers", field="model")


class DecoderForward:
    """Runs one step of a Llama-family causal LM over a :class:`KVPool` with per-row LoRA.

    It keeps references to the model's modules (taken once here), so wrapping the model later — PEFT's
    ``PeftModel`` in a benchmark, say — does not change what this forward computes.

    Args:
        model: a transformers ``*ForCausalLM`` passing :func:`check_supported` (weights NF4 or plain).
        banks: LoRA banks whose module names are the model's routable linear layers.

    Attributes:
        layers, kv_heads, head_dim: the attention shape the KV pool must have.
    """

    def __init__(self, model: nn.Module, banks: LoraBanks) -> None:
        check_supported(model)
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = model.get_output_embeddings()
        self.banks = banks
        self.layer_modules = list(inner.layers)
        self.layers = len(self.layer_modules)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scaling = self.head_dim ** -0.5
        prefix = _layers_prefix(model, inner)
        # Per layer, the bank index of each of the 7 projections (-1: not routable → no LoRA term).
        self.lora_index = [[banks.index.get(f"{prefix}.{i}.{p}", -1) for p in _PROJECTIONS]
                           for i in range(self.layers)]

    def _project(self, layer: int, which: tuple[int, ...], modules: tuple[nn.Module, ...], x: torch.Tensor,
                 lora: torch.Tensor | None) -> list[torch.Tensor]:
        """Base projections of ``x`` (``[N, T, in]``) by ``modules`` (projections ``which`` of ``layer``), each plus
        its rows' LoRA term when ``lora`` (the step's gathered banks) is given. Modules sharing ``x`` whose A factors
        are adjacent in the banks are shrunk with one matmul."""
        # bitsandbytes picks its kernel by shape: the fused 4-bit GEMV for one token, dequantize + GEMM above
        # (a Triton kernel reading the 4-bit weights once measured 5-15x slower than this; see bench/RESULTS.md).
        outs = [m(x) for m in modules]
        if lora is None:
            return outs
        index = [self.lora_index[layer][w] for w in which]
        banks, r = self.banks, self.banks.max_rank
        if all(i >= 0 for i in index) and index == list(range(index[0], index[0] + len(index))):
            h = banks.shrink(lora, index[0], len(index), x)
            return [banks.expand(lora, i, h[..., j * r:(j + 1) * r], y) for j, (i, y) in enumerate(zip(index, outs))]
        for j, i in enumerate(index):
            if i >= 0:
                outs[j] = banks.expand(lora, i, banks.shrink(lora, i, 1, x), outs[j])
        return outs

    def __call__(self, inp: StepInputs, pool: KVPool, use_lora: bool) -> torch.Tensor:
        """Run one step; write the step's keys/values to ``pool``.

        Args:
            inp: the step's tensors (shapes in :class:`StepInputs`).
            pool: the KV cache (shapes matching this model).
            use_lora: add LoRA terms (False when every row has no adapter: exactly the base model, and cheaper).

        Returns:
            ``[N, V]`` logits of each row's last real token, in the LM head's dtype.
        """
        hidden = self.hidden_states(inp, pool, use_lora)
        n = hidden.shape[0]
        return self.logits(hidden[torch.arange(n, device=hidden.device), inp.last_index])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits (the LM head's dtype) of ``[..., hidden]`` decoder outputs (:meth:`hidden_states`):
        the final norm then the LM head, position by position (the LM head has no LoRA term)."""
        return self.head(self.norm(hidden))

    def hidden_states(self, inp: StepInputs, pool: KVPool, use_lora: bool) -> torch.Tensor:
        """Run one step's decoder layers; write the step's keys/values to ``pool``.

        Args: as :meth:`__call__`.

        Returns:
            ``[N, T, hidden]`` output of the last decoder layer at every position (before the final norm; padding
            positions hold garbage), in the model's compute dtype. :meth:`logits` turns any of them into logits.
        """
        n, t = inp.input_ids.shape
        hidden = self.embed(inp.input_ids)  # [N, T, hidden]
        cos, sin = self.rotary(hidden, inp.positions)  # [N, T, D] each
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads of [N, T, H, D]
        token_rows = pool.token_rows(inp.block_tables)  # [N, L] pool row of each context position
        ctx = token_rows.shape[1]
        key_pos = torch.arange(ctx, device=hidden.device)
        allowed = (key_pos[None, None, :] <= inp.positions[:, :, None]) & (
            key_pos[None, None, :] < inp.context_lens[:, None, None])  # [N, T, L]
        groups = self.heads // self.kv_heads
        lora = self.banks.gather(inp.lora_slots) if use_lora else None  # [N, total]: the rows' own adapters
        bias = None
        if t == 1:  # decode: [N, 1, G, L], the same additive mask for every group member, over KV heads
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=hidden.device).masked_fill(
                ~allowed, float("-inf"))[:, None].expand(n, 1, groups, ctx)
        write = inp.write_rows.reshape(-1)
        read = token_rows.reshape(-1)
        for l, layer in enumerate(self.layer_modules):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            q, k, v = self._project(l, (0, 1, 2), (attn.q_proj, attn.k_proj, attn.v_proj), x, lora)
            q = q.view(n, t, self.heads, self.head_dim)
            k = k.view(n, t, self.kv_heads, self.head_dim)
            v = v.view(n, t, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            pool.keys[l].index_copy_(0, write, k.reshape(n * t, self.kv_heads, self.head_dim).to(pool.keys[l].dtype))
            pool.values[l].index_copy_(0, write, v.reshape(n * t, self.kv_heads, self.head_dim).to(pool.values[l].dtype))
            keys = pool.keys[l].index_select(0, read).view(n, ctx, self.kv_heads, self.head_dim)
            values = pool.values[l].index_select(0, read).view(n, ctx, self.kv_heads, self.head_dim)
            if t > 1:  # prefill: the library's fused attention (skips work on masked blocks, no [T, L] scores)
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
                    attn_mask=allowed[:, None], scale=self.scaling, enable_gqa=True)
                out = out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim)
            else:
                # Group members folded into the query length: [N, H_kv, G·T, D] against [N, H_kv, D, L], so K and V
                # are never copied per group member.
                qg = q.view(n, t, self.kv_heads, groups, self.head_dim).permute(0, 2, 3, 1, 4).reshape(
                    n, self.kv_heads, groups * t, self.head_dim)
                scores = torch.matmul(qg, keys.permute(0, 2, 3, 1).to(qg.dtype)).float() * self.scaling + bias
                probs = torch.softmax(scores, dim=-1).to(qg.dtype)
                out = torch.matmul(probs, values.permute(0, 2, 1, 3).to(qg.dtype))  # [N, H_kv, G·T, D]
                out = out.view(n, self.kv_heads, groups, t, self.head_dim).permute(0, 3, 1, 2, 4).reshape(
                    n, t, self.heads * self.head_dim)
            hidden = hidden + self._project(l, (3,), (attn.o_proj,), out, lora)[0]
            x = layer.post_attention_layernorm(hidden)
            gate, up = self._project(l, (4, 5), (mlp.gate_proj, mlp.up_proj), x, lora)
            hidden = hidden + self._project(l, (6,), (mlp.down_proj,), mlp.act_fn(gate) * up, lora)[0]
        return hidden


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] → [-x2, x1]`` over the last dim: the rotary embedding's pairing of transformers' Llama."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layers_prefix(model: nn.Module, inner: nn.Module) -> str:
    """The module-name prefix of the decoder layers (``model.layers`` for transformers' Llama)."""
    for name, module in model.named_modules():
        if module is inner.layers:
            return name
    raise FailedPrecondition("cannot find the decoder layers' module name", field="model")
