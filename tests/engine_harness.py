"""Builds a real engine (tiny NF4 model, adapter store, cache, byte tokenizer) for engine and monitoring tests."""

from __future__ import annotations

from pathlib import Path

import torch

from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.adapters.types import BaseModelSpec
from server.config import EngineConfig
from server.engine.engine import Engine
from server.metrics import Metrics
from server.model.runner import build_runner
from tests.tiny import TINY_NAME, load_nf4
from tests.tiny_tokenizer import byte_tokenizer


def build_engine(root: Path, base_dir: Path, sources: dict[str, Path], *, start: bool = True, request_log=None,
                 compute_dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                 **engine_kw) -> tuple[Engine, AdapterStore, Metrics]:
    """A fresh engine over its own store in ``root / "store"`` with every adapter in ``sources`` registered.

    ``engine_kw`` override :class:`EngineConfig` (defaults here: 4 slots, rank <= 16, host cache 4); contexts
    are 128 tokens (the tiny model's limit). ``compute_dtype`` is the NF4 compute dtype (float32 makes answers
    independent of the batch's composition); ``tokenizer`` defaults to the 256-token byte tokenizer. The caller
    stops the engine.
    """
    cfg = EngineConfig(**{"adapter_slots": 4, "max_lora_rank": 16, "cpu_adapter_cache": 4, **engine_kw})
    model = load_nf4(base_dir, compute_dtype)
    runner = build_runner(model, cfg, torch.float32, 128)
    store = AdapterStore(Path(root) / "store", BaseModelSpec.from_model(model, TINY_NAME, cfg.max_lora_rank))
    for name, src in sources.items():
        store.register(name, src)
    metrics = Metrics()
    engine = Engine(model, tokenizer or byte_tokenizer(), runner,
                    AdapterCache(store, runner.banks, cfg.cpu_adapter_cache, metrics), cfg, metrics,
                    max_total_tokens=128, request_log=request_log)
    if start:
        engine.start()
    return engine, store, metrics
