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
        index: module name → position in :attr:`A` / :attr:`B`.
        A, B: per module, ``[S + 1, R, in]`` and ``[S + 1, out, R]`` (see the module docstring).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.slots = slots
        self.max_rank = max_rank
        self.none_slot = slots
        self.dtype = dtype
        self.index = {name: i for i, name in enumerate(shapes)}
        self.A = [torch.zeros(slots + 1, max_rank, fan_in, dtype=dtype, device=device) for fan_in, _ in shapes.values()]
        self.B = [torch.zeros(slots + 1, fan_out, max_rank, dtype=dtype, device=device) for _, fan_out in shapes.values()]

    def delta(self, module: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each row's own LoRA term ``B[s_n] A[s_n] x_n``.

        Args:
            module: the layer's position (:attr:`index`).
            x: ``[N, T, in]`` input of the layer (any float dtype; cast to the bank dtype).
            slots: ``[N]`` int64 slot per row (:attr:`none_slot` for no adapter).

        Returns:
            ``[N, T, out]`` in the bank dtype (exact zeros for rows in the zero slot).
        """
        a = self.A[module].index_select(0, slots)  # [N, R, in]: only the rows' own adapters are read
        b = self.B[module].index_select(0, slots)  # [N, out, R]
        h = torch.bmm(x.to(self.dtype), a.transpose(1, 2))  # [N, T, R]
        return torch.bmm(h, b.transpose(1, 2))  # [N, T, out]

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
        for name, i in self.index.items():
            self.A[i][slot].zero_()
            self.B[i][slot].zero_()
            lora = adapter.modules.get(name)
            if lora is None:
                continue
            if lora.rank > self.max_rank:
                raise ValueError(f"rank {lora.rank} of {name} exceeds max_lora_rank {self.max_rank}")
            self.A[i][slot, :lora.rank].copy_(lora.A.to(self.dtype))
            self.B[i][slot, :, :lora.rank].copy_((lora.B.to(torch.float32) * lora.scale).to(self.dtype))

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every bank."""
        for a, b in zip(self.A, self.B):
            a[slot].zero_()
            b[slot].zero_()

    def bank_bytes(self) -> int:
        """Bytes of all preallocated banks: ``Σ_modules (S + 1) · R · (in + out) · element size``."""
        return sum(a.nbytes + b.nbytes for a, b in zip(self.A, self.B))
