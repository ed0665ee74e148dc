"""Per-row LoRA routing over a shared base model: every linear layer gets a preallocated bank of adapter slots.

One forward pass serves a batch whose rows use different adapters (or none). For a wrapped linear layer with
base weight W (NF4, frozen), and S slots of rank at most R, the banks hold

    A_cat: [S·R, in]   (slot s owns rows s·R … s·R+r_s-1; the rest are zero)
    B_cat: [out, S·R]  (slot s owns columns s·R … s·R+r_s-1, holding scale_s · B_s; the rest are zero)

with scale_s = alpha/r (or alpha/sqrt(r) for rsLoRA) of this module in slot s folded into B, and for input x of
row b with slot s_b (or none):

    y_b = W x_b + B_cat · (m_b ⊙ (A_cat · x_b)),   m_b[j] = 1 if j // R == s_b else 0

which equals W x_b + scale·B_s A_s x_b, PEFT's LoRA forward (``peft.tuners.lora.Linear.forward``), because the
zero padding and the masked-out slots contribute exact zeros. The mask m is the same for every layer, so the
router builds it once per routing change; a layer adds six small ops (two casts, two matmuls, a multiply, an
add) to its base matmul. Shapes are static for a given batch size and the
routing is a tensor (no ``.item()``, no per-slot Python branches), so a decode step stays capturable in a CUDA
graph. The cost is two dense matmuls of width S·R per layer, the same work as one rank-S·R LoRA; rows without
an adapter just get a zero mask. Slot loading happens between steps, never inside one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from server.adapters.types import LoadedAdapter


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and its subclasses, which include bitsandbytes' ``Linear4bit``."""
    return isinstance(module, nn.Linear)


class RoutedLoraLinear(nn.Module):
    """A base linear layer plus S LoRA slots routed per batch row.

    Args:
        base: the frozen layer (``bnb.nn.Linear4bit`` or ``nn.Linear``), ``[*, in] -> [*, out]``.
        router: the shared per-step routing state.
        slots, max_rank: S and R above.
        dtype: dtype of the banks and of the LoRA matmuls (float32 matches PEFT's default up-cast).
    """

    def __init__(self, base: nn.Module, router: "LoraRouter", slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.max_rank = max_rank
        self._router = [router]  # a list keeps the router out of this module's children
        self.register_buffer("lora_A", torch.zeros(slots * max_rank, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(self.out_features, slots * max_rank, dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, T, in]`` in the compute dtype → ``[B, T, out]`` in the base layer's output dtype."""
        y = self.base(x)
        router = self._router[0]
        if not router.active:
            return y
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # [B, T, S·R]
        h = h * router.row_mask  # [B, 1, S·R]: keep only each row's own slot
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def write_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter's factors into ``slot`` (zeros if ``A`` is None). A: ``[r, in]``, B: ``[out, r]``;
        ``scale`` is folded into B."""
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        self.lora_A[lo:hi].zero_()
        self.lora_B[:, lo:hi].zero_()
        if A is None:
            return
        r = A.shape[0]
        self.lora_A[lo:lo + r].copy_(A)
        self.lora_B[:, lo:lo + r].copy_(B.to(self.lora_B.dtype) * scale)


class LoraRouter:
    """Owns every :class:`RoutedLoraLinear` of one model and the per-step row → slot routing.

    Attributes:
        modules: base-model module name (e.g. ``model.layers.0.mlp.down_proj``) → its routed layer.
        slots: S, adapters resident at once.
        max_rank: R, the widest rank a slot holds.
    """

    def __init__(self, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 max_batch_size: int) -> None:
        self.slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.modules: dict[str, RoutedLoraLinear] = {}
        self.active = False
        # Preallocated so a captured graph can read a fixed buffer; a step writes it with one copy.
        self._mask = torch.zeros(max_batch_size, 1, slots * max_rank, dtype=dtype, device=device)
        self.row_mask = self._mask[:0]
        self._last_rows: tuple[int, ...] | None = None

    def set_rows(self, row_slots: list[int]) -> None:
        """Route the next forward passes: row b uses slot ``row_slots[b]`` (``-1`` = base model only).

        Raises:
            ValueError: more rows than the preallocated batch or a slot out of range.
        """
        n = len(row_slots)
        key = tuple(row_slots)
        if key == self._last_rows:
            return  # same routing as the previous step: skip the host-to-device copy
        if n > self._mask.shape[0]:
            raise ValueError(f"batch of {n} rows exceeds max_batch_size {self._mask.shape[0]}")
        if any(s >= self.slots or s < -1 for s in row_slots):
            raise ValueError(f"slot out of range in {row_slots}")
        self._last_rows = key
        self.active = any(s >= 0 for s in row_slots)
        if not self.active:
            self.row_mask = self._mask[:n]
            return
        table = torch.zeros(n, 1, self.slots * self.max_rank, dtype=self.dtype)
        for b, s in enumerate(row_slots):
            if s >= 0:
                table[b, 0, s * self.max_rank:(s + 1) * self.max_rank] = 1.0
        self._mask[:n].copy_(table)  # one host-to-device copy per routing change
        self.row_mask = self._mask[:n]

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Write ``adapter`` into ``slot`` of every bank; modules it does not target get zeros.

        Raises:
            ValueError: a module it names is not routed, or its rank exceeds ``max_rank``.
        """
        unknown = set(adapter.modules) - set(self.modules)
        if unknown:
            raise ValueError(f"adapter targets modules that are not routed: {sorted(unknown)[:5]}")
        for name, layer in self.modules.items():
            lora = adapter.modules.get(name)
            if lora is None:
                layer.write_slot(slot, None, None, 0.0)
                continue
            if lora.rank > self.max_rank:
                raise ValueError(f"rank {lora.rank} of {name} exceeds max_lora_rank {self.max_rank}")
            layer.write_slot(slot, lora.A.to(self.dtype), lora.B.to(self.dtype), lora.scale)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every bank."""
        for layer in self.modules.values():
            layer.write_slot(slot, None, None, 0.0)

    def bank_bytes(self) -> int:
        """Bytes of all preallocated banks (the adapter cache's accelerator footprint)."""
        return sum(layer.lora_A.nbytes + layer.lora_B.nbytes for layer in self.modules.values())


def routable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → linear layer for every linear layer LoRA may target: all of them except the output head.

    Embedding layers and the LM head are not routable (adapters targeting them are refused at registration).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if is_linear(m) and m is not head and name}


def attach_router(model: nn.Module, slots: int, max_rank: int, dtype: torch.dtype,
                  max_batch_size: int) -> LoraRouter:
    """Wrap every routable linear layer of ``model`` in place and return the router that drives them.

    The model keeps its module names (``model.layers.0.self_attn.q_proj`` is now a :class:`RoutedLoraLinear`
    whose ``.base`` is the original layer), so adapter keys map onto it unchanged.
    """
    device = next(model.parameters()).device
    router = LoraRouter(slots, max_rank, dtype, device, max_batch_size)
    for name, module in list(routable_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = RoutedLoraLinear(module, router, slots, max_rank, dtype, device)
        setattr(parent, child, wrapped)
        router.modules[name] = wrapped
    return router
