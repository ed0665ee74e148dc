"""Replays a fixed-shape training forward + backward as two CUDA graphs, so a step costs GPU time, not Python time.

Why: at batch 1 × 2,048 tokens on an 8B-shaped QLoRA model the GPU needs ~165 ms per step but the eager step takes
~420 ms, all of it the host launching ~10,000 kernels through Python, autograd and bitsandbytes' dispatch
(``bench/train_gpu.py --profile``). A captured graph launches them all at once.

How: ``torch.cuda.make_graphed_callables`` captures the loss module's forward and its backward (``autograd.grad``
with respect to the trainable LoRA parameters) once, on static input buffers; each call copies the batch into those
buffers and replays. The optimizer step stays outside the graph (bitsandbytes' paged AdamW reads its step count on
the host). Requirements, checked by the caller: every batch has the same shape (``[B, T]``, fixed-length or packed
to a fixed token count), no autocast, no host synchronisation in the forward (use
``trainer.fast.chunked_causal_lm_loss``, not a loss that calls ``.item()``), and checkpointed blocks must not need
the RNG state (no dropout), because a graph cannot read the generator's state while capturing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class _LossModule(torch.nn.Module):
    """``loss_fn(model, {"input_ids": ids, "labels": labels})`` as a module, so its parameters are the model's."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, {"input_ids": input_ids, "labels": labels})


class GraphedLoss:
    """A training loss whose forward and backward replay CUDA graphs captured for one batch shape.

    Args:
        model: the PEFT model in training mode on a CUDA device (trainable parameters = the LoRA weights).
        loss_fn: ``loss_fn(model, inputs) -> scalar loss`` without host synchronisation.
        sample_ids: ``[B, T]`` int64 on the model's device: the shape every later batch must have. Capture runs
            three warm-up forward/backward passes on it (``autograd.grad``: no ``.grad`` is touched).

    Calling it with ``input_ids`` and ``labels`` of that shape returns the loss (a float32 scalar that the next
    call overwrites; read it before then); ``loss.backward()`` replays the backward graph and accumulates the LoRA
    gradients into ``.grad`` as an eager backward would.

    Raises:
        ValueError: a batch of another shape than ``sample_ids``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, sample_ids: torch.Tensor) -> None:
        self.shape = tuple(sample_ids.shape)
        module = _LossModule(model, loss_fn)
        self._graphed = torch.cuda.make_graphed_callables(module, (sample_ids.clone(), sample_ids.clone()))

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(input_ids.shape) != self.shape or tuple(labels.shape) != self.shape:
            raise ValueError(f"a captured step takes batches of shape {self.shape}, got {tuple(input_ids.shape)}")
        return self._graphed(input_ids, labels)


class StepGraphs:
    """Per-shape ``GraphedLoss`` for the trainer: a batch shape seen for the second time is captured (at most
    ``max_graphs`` shapes; others run eagerly), so fixed-shape runs replay from their second step on.

    Graphs are used only where they are exact and safe: CUDA, right-padded batches of ``input_ids``/``labels``
    (an ``attention_mask`` of right padding changes nothing under causal attention, so the graph runs without it;
    ``position_ids`` of packed batches are not graphed), and no dropout inside checkpointed blocks (a graph cannot
    read the RNG state to replay it). A capture that fails turns graphs off for the run, with the reason logged.

    Args:
        model: the PEFT model (training mode, CUDA).
        loss_fn: ``trainer.fast.chunked_causal_lm_loss``-like, sync-free.
        max_graphs: most shapes captured (each holds its own activation memory pool).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, max_graphs: int = 2) -> None:
        self.model, self.loss_fn, self.max_graphs = model, loss_fn, max_graphs
        self.graphs: dict[tuple[int, ...], GraphedLoss] = {}
        self.seen: set[tuple[int, ...]] = set()
        self.disabled: str | None = None

    def loss(self, inputs: dict, num_items_in_batch=None) -> torch.Tensor | None:
        """The graphed loss of ``inputs`` (normalised like ``chunked_causal_lm_loss``), or None: run it eagerly."""
        if self.disabled is not None or set(inputs) - {"input_ids", "labels", "attention_mask"}:
            return None
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask = inputs.get("attention_mask")
        if ids.device.type != "cuda" or (mask is not None and not _right_padded(mask)):
            return None
        shape = tuple(ids.shape)
        graph = self.graphs.get(shape)
        if graph is None:
            if shape not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(shape)
                return None
            try:
                graph = self.graphs[shape] = GraphedLoss(self.model, self.loss_fn, ids)
                log.info("training step captured as a CUDA graph for batches of shape %s", shape)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
                self.disabled = f"{type(exc).__name__}: {exc}"
                self.graphs.clear()
                log.warning("CUDA graph capture failed, training eagerly: %s", self.disabled)
                return None
        loss = graph(ids, labels)  # mean over this micro-batch's supervised tokens
        if num_items_in_batch is not None:
            count = (labels[:, 1:] != -100).sum().clamp(min=1)
            loss = loss * (count / num_items_in_batch)  # = sum / num_items, as the eager loss, without a sync
        return loss


def _right_padded(mask: torch.Tensor) -> bool:
    """True when every row of ``mask`` ``[B, T]`` is ones then zeros (checked on the device, one sync)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())
