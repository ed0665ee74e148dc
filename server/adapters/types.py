"""Plain types shared by the adapter store, the engine's adapter cache and the RPC layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the gRPC client imports these types and must not need torch
    import torch


@dataclass(frozen=True)
class ModuleLora:
    """The LoRA factors of one target module, W' = W + scale · B A (Hu et al., 2021; PEFT's ``LoraLayer``).

    Attributes:
        A: ``lora_A.weight``, shape ``[r, in_features]``, float (any float dtype; the engine casts).
        B: ``lora_B.weight``, shape ``[out_features, r]``.
        scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023), with the
            module's own r and alpha from ``rank_pattern`` / ``alpha_pattern`` when they match it.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class AdapterInfo:
    """What the server knows about a registered adapter (the ``Adapter`` message carries these).

    Attributes:
        adapter_id: the registry key.
        base_model: ``base_model_name_or_path`` from its ``adapter_config.json``.
        rank: the default r; ``ranks`` maps module name → r where ``rank_pattern`` changes it.
        lora_alpha: the default alpha; ``alphas`` likewise.
        target_modules: as configured (a list, or a regex string as a one-element list).
        module_count: number of base-model modules it changes.
        use_rslora: scale = alpha / sqrt(r) instead of alpha / r.
        size_bytes: bytes of ``adapter_model.safetensors``.
        sha256: hex digest of ``adapter_model.safetensors``.
        path: the adapter's directory inside the store.
        registered_at: UNIX time (seconds) of registration.
        version: the registration's version: one number the store assigns at each registration or replace,
            strictly increasing across the store's whole life (persisted, never reused after an unregister or a
            restart). Caches key by ``(adapter_id, version)``, so a replace that changes only
            ``adapter_config.json`` (same ``sha256``) is a new version too. 0 = not registered.
    """

    adapter_id: str
    base_model: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    module_count: int
    use_rslora: bool
    size_bytes: int
    sha256: str
    path: str
    registered_at: float
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    version: int = 0

    @property
    def max_rank(self) -> int:
        return max([self.rank, *self.ranks.values()])


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's weights in host memory, keyed by the base model's module names
    (e.g. ``model.layers.0.self_attn.q_proj``), ready to be copied into accelerator slots.

    ``version`` is the store's registration version (:attr:`AdapterInfo.version`): a replaced adapter has a new
    version, even when only its config changed, so caches never mix them.
    """

    info: AdapterInfo
    modules: dict[str, ModuleLora]

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


@dataclass(frozen=True)
class BaseModelSpec:
    """What adapter validation needs to know about the resident base model (no tensors, cheap to copy).

    Attributes:
        name: the base model's id (e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``).
        linear_shapes: routable module name (e.g. ``model.layers.0.self_attn.q_proj``) → ``(in_features,
            out_features)``; these are the only modules an adapter may target.
        other_modules: names of every other module (embeddings, norms, the LM head, containers), so a target
            that exists but is not a routable linear layer is refused by name rather than reported absent.
        max_rank: the server's ``max_lora_rank``.
    """

    name: str
    linear_shapes: dict[str, tuple[int, int]]
    other_modules: frozenset[str]
    max_rank: int

    @classmethod
    def from_model(cls, model, name: str, max_rank: int) -> "BaseModelSpec":
        """Build from a loaded model: every routable linear layer (:func:`server.model.lora.routable_modules`)."""
        from server.model.lora import routable_modules

        shapes = {n: (int(m.in_features), int(m.out_features)) for n, m in routable_modules(model).items()}
        inside = tuple(n + "." for n in shapes)  # a wrapped layer's children (PEFT, bitsandbytes) are not targets
        others = frozenset(n for n, _ in model.named_modules() if n and n not in shapes and not n.startswith(inside))
        return cls(name=name, linear_shapes=shapes, other_modules=others, max_rank=max_rank)
