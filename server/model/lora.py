"""LoRA slots over the shared base: per-slot adapter banks and the gathered per-row LoRA matmul (BGMV style).

For a routable linear layer with frozen base weight W (NF4) and S slots of rank at most R, the banks hold

    A: [S + 1, R, in]    slot s's A_s in rows 0 … r_s-1 (zeros after), the last slot all zeros
    B: [S + 1, out, R]   slot s's scale_s · B_s in columns 0 … r_s-1 (zeros after), the last slot all zeros

with scale_s = lora_alpha / r (alpha / sqrt(r) for rsLoRA) folded into B. A batch row n routed to slot s_n (or to
the zero slot ``S`` for "no adapter") gets

    y_n = W x_n + B[s_n] (A[s_n] x_n)

which is PEFT's LoRA forward (``peft.tuners.lora.Linear.forward``: ``W x + scale · B_s A_s x``) because the zero
padding of rank < R contributes exact zeros, and a row with no adapter adds an exact zero (``y + 0 == y``), so it
gets exactly the base output. Each row gathers only its OWN slot (Punica's BGMV, Chen et al., "Punica: Multi-Tenant
LoRA Serving", 2023): the work per step is ``N · R · (in + out)`` multiply-adds whatever the number of resident
adapters, two gathers and two batched matmuls per layer. Routing is a tensor argument (``slots [N]``), never
mutable state, so a captured CUDA graph replays it for any routing.

Banks are written between steps only (the engine thread owns them), so no forward pass reads a slot mid-write.
"""

from __future__ import annotations

import torch
from torch import nn

from server.adapters.types import LoadedAdapter


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and its subclasses, which include bitsandbytes' ``Linear4bit``."""
    return isinstance(module, nn.Linear)


def routable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → linear layer for every linear layer LoRA may target: all of them except the output head.

    Embedding layers and the LM head are not routable (adapters targeting them are refused at registration).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if is_linear(m) and m is not head and name}


class LoraBanks:
    """Every routable layer's adapter banks, and the slot protocol the adapter cache drives.

    All banks live in ONE tensor ``flat [S + 1, total]`` (every module's A, in module order, then every module's
    B), so a step gathers its rows' adapters for all layers with one ``index_select`` (:meth:`gather`), and the A
    factors of modules that share an input (q, k, v; gate, up) are adjacent: one matmul shrinks for all of them
    (:meth:`shrink`). Per module and step that leaves one shrink (shared) and one fused multiply-add expand
    (:meth:`expand`), instead of a gather, a matmul, a matmul and an add each — launches, not bytes, are what a
    small decode step pays for.

    Args:
        shapes: module name → ``(in_features, out_features)``, in a fixed order (see :func:`routable_modules`).
        slots: S, adapters resident at once.
        max_rank: R, the widest rank a slot holds.
        dtype: dtype of the banks and of the LoRA matmuls (float32 matches PEFT's default up-cast of adapter weights;
            bfloat16 halves the memory and reads on a GPU).
        device: where the banks live (the model's device).

    Attributes:
        slots, max_rank: S and R.
        none_slot: the index of the all-zero slot (``S``) that rows without an adapter are routed to.
        index: module name → module position.
        A, B: per module, views ``[S + 1, R, in]`` and ``[S + 1, out, R]`` of :attr:`flat`.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.slots = slots
        self.max_rank = max_rank
        self.none_slot = slots
        self.dtype = dtype
        self.index = {name: i for i, name in enumerate(shapes)}
        self.shapes = list(shapes.values())
        r = max_rank
        self.a_offset, self.b_offset, offset = [], [], 0
        for fan_in, _ in self.shapes:
            self.a_offset.append(offset)
            offset += r * fan_in
        for _, fan_out in self.shapes:
            self.b_offset.append(offset)
            offset += fan_out * r
        self.flat = torch.zeros(slots + 1, offset, dtype=dtype, device=device)
        self.A = [self.flat[:, o:o + r * fan_in].view(slots + 1, r, fan_in)
                  for o, (fan_in, _) in zip(self.a_offset, self.shapes)]
        self.B = [self.flat[:, o:o + fan_out * r].view(slots + 1, fan_out, r)
                  for o, (_, fan_out) in zip(self.b_offset, self.shapes)]

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows' own adapters, every module: ``slots [N]`` int64 → ``[N, total]`` (one ``index_select``)."""
        return self.flat.index_select(0, slots)

    def shrink(self, gathered: torch.Tensor, first: int, count: int, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``count`` consecutive modules that share the input ``x``, in one batched matmul.

        Args:
            gathered: ``[N, total]`` from :meth:`gather`.
            first, count: module positions ``first … first + count - 1`` (equal ``in_features``).
            x: ``[N, T, in]``.

        Returns:
            ``[N, T, count · R]`` in the bank dtype: module ``first + j``'s part is columns ``j·R … (j+1)·R - 1``.
        """
        fan_in = self.shapes[first][0]
        start = self.a_offset[first]
        a = gathered[:, start:start + count * self.max_rank * fan_in].view(-1, count * self.max_rank, fan_in)
        return torch.bmm(x.to(self.dtype), a.transpose(1, 2))

    def expand(self, gathered: torch.Tensor, module: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + B h`` for one module: ``h [N, T, R]`` (from :meth:`shrink`), ``y [N, T, out]`` the base output.

        One fused multiply-add (``baddbmm``) when ``y`` has the bank dtype; a zero-slot row adds exact zeros, so it
        keeps exactly ``y``."""
        _, fan_out = self.shapes[module]
        start = self.b_offset[module]
        b = gathered[:, start:start + fan_out * self.max_rank].view(-1, fan_out, self.max_rank).transpose(1, 2)
        if y.dtype == self.dtype:
            return torch.baddbmm(y, h, b)
        return y + torch.bmm(h, b).to(y.dtype)

    def delta(self, module: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each row's own LoRA term ``B[s_n] A[s_n] x_n`` for one module: ``x [N, T, in]``, ``slots [N]`` →
        ``[N, T, out]`` in the bank dtype (exact zeros for rows in the zero slot)."""
        gathered = self.gather(slots)
        h = self.shrink(gathered, module, 1, x)
        zero = torch.zeros(*h.shape[:2], self.shapes[module][1], dtype=self.dtype, device=h.device)
        return self.expand(gathered, module, h, zero)

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Write ``adapter`` into ``slot``; modules it does not target get zeros.

        Raises:
            ValueError: a module it names is not routable, its rank exceeds ``max_rank``, or ``slot`` is out of
                range (the zero slot is never written).
        """
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range 0..{self.slots - 1}")
        unknown = set(adapter.modules) - set(self.index)
        if unknown:
            raise ValueError(f"adapter targets modules that are not routable: {sorted(unknown)[:5]}")
        too_wide = [name for name, lora in adapter.modules.items() if lora.rank > self.max_rank]
        if too_wide:
            raise ValueError(f"rank {adapter.modules[too_wide[0]].rank} of {too_wide[0]} exceeds max_lora_rank "
                             f"{self.max_rank}")
        self.flat[slot].zero_()
        for name, lora in adapter.modules.items():
            i = self.index[name]
            self.A[i][slot, :lora.rank].copy_(lora.A.to(self.dtype))
            self.B[i][slot, :, :lora.rank].copy_((lora.B.to(torch.float32) * lora.scale).to(self.dtype))

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every bank."""
        self.flat[slot].zero_()

    def bank_bytes(self) -> int:
        """Bytes of all preallocated banks: ``Σ_modules (S + 1) · R · (in + out) · element size``."""
        return self.flat.nbytes
