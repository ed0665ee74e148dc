"""Assembles the data plane from a ServerConfig: NF4 base model, model runner, adapter store and cache, engine."""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, field

import torch

from server import __version__
from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.adapters.types import BaseModelSpec
from server.config import ServerConfig
from server.engine.engine import Engine
from server.logs import RequestLog
from server.metrics import Metrics
from server.model.base import BaseModelInfo, load_base_model
from server.model.runner import build_runner
from server.training.jobs import DB_FILE, JobStore
from server.training.budget import JobBudget, ModelShape
from server.training.manager import TrainingManager
from server.training.shared_base import export_for_training

log = logging.getLogger(__name__)


@dataclass
class App:
    """The running data plane; the RPC layer and the CLI only talk to this object."""

    config: ServerConfig
    model: object
    tokenizer: object
    base_info: BaseModelInfo
    engine: Engine
    store: AdapterStore
    adapter_cache: AdapterCache
    metrics: Metrics
    _sampler_stop: threading.Event
    training: TrainingManager | None = None
    #: Set by ``serve`` when shutdown begins: requests the RPC layer stops from then on end "server shutting down",
    #: not "the client cancelled" (gRPC cancels the calls still running when the grace period ends).
    shutting_down: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        """Stop the training manager (a running job's worker stops at the end of its step with a checkpoint; the
        job is queued to resume when a server starts again), the engine (running requests end CANCELLED) and the
        background threads."""
        if self.training is not None:
            self.training.close()
        self._sampler_stop.set()
        self.engine.stop()
        self.adapter_cache.close()


def build_app(config: ServerConfig, model=None, tokenizer=None, base_info: BaseModelInfo | None = None,
              metrics: Metrics | None = None) -> App:
    """Load the base model (unless one is passed in, as tests do), attach the LoRA banks, open the adapter store,
    start the training manager (jobs database in ``config.state_dir``) and start the engine. ``metrics`` is the
    registry to fill (a new one when None; ``serve`` passes the one its metrics endpoint already exports). ``serve``
    runs :func:`server.model.source.check_model_source` first, before even importing this module.

    Raises:
        FailedPrecondition: the model cannot be loaded or uses attention the engine does not support, or another
            running server holds ``config.state_dir`` (field ``state_dir``).
        InvalidArgument: a config field is invalid.
    """
    metrics = metrics if metrics is not None else Metrics(config.engine.top_adapter_labels)
    start = time.perf_counter()
    if model is None:
        model, tokenizer, base_info = load_base_model(config.model)
    metrics.startup_seconds.labels("load").set(time.perf_counter() - start)
    # Before anything runs the model (a CPU forward repacks the 4-bit weights): jobs train on this snapshot.
    shared_base = export_for_training(model, base_info, config.model) if config.training_share_base else None
    engine_cfg = config.engine
    # "auto" resolved by the model loader; a caller-built BaseModelInfo (tests) leaves it to the config.
    compute_dtype = base_info.compute_dtype or config.model.compute_dtype
    lora_dtype = resolve_lora_dtype(config.model.lora_dtype, next(model.parameters()).device, compute_dtype)
    max_total_tokens = engine_cfg.max_total_tokens or base_info.max_positions
    runner = build_runner(model, engine_cfg, getattr(torch, lora_dtype), max_total_tokens)
    metrics.startup_seconds.labels("capture").set(runner.capture_seconds)
    spec = BaseModelSpec.from_model(model, base_info.name, engine_cfg.max_lora_rank)
    store = AdapterStore(config.adapters_dir, spec)
    cache = AdapterCache(store, runner.banks, engine_cfg.cpu_adapter_cache, metrics)
    engine = Engine(model, tokenizer, runner, cache, engine_cfg, metrics, base_info.max_positions,
                    request_log=RequestLog(config.log_prompts))
    metrics.build_info.info({
        "version": __version__,
        "model": base_info.name,
        "device": str(base_info.device),
        "quant_type": config.model.quant_type,
        "double_quant": str(config.model.double_quant).lower(),
        "compute_dtype": compute_dtype,
        "compute_dtype_reason": base_info.compute_dtype_reason or f"{compute_dtype} as configured",
        "lora_dtype": lora_dtype,
        "cuda_graphs": runner.graph_status,
        "kv_cache_tokens": str((runner.pool.num_blocks - 1) * runner.pool.block_size),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
    })
    metrics.component_bytes.labels("base_weights").set(base_info.weight_bytes)
    metrics.component_bytes.labels("adapter_banks").set(runner.banks.bank_bytes())
    metrics.component_bytes.labels("kv_cache").set(runner.pool.nbytes)
    metrics.adapters_registered.set(len(store.list()))
    store.subscribe(lambda _id, _event: metrics.adapters_registered.set(len(store.list())))
    try:
        # A job that trains on the shared resident base adds no base weights of its own to the device.
        base_bytes = 0 if shared_base is not None else base_info.weight_bytes
        budget = JobBudget(ModelShape.from_hf_config(model.config, compute_dtype, base_bytes),
                           str(base_info.device), memory_bytes=config.training.memory_bytes,
                           threads=config.training.threads, nice=config.training.nice)
        training = TrainingManager(store, JobStore(config.state_dir / DB_FILE), config.state_dir, metrics,
                                   model_config=config.model, budget=budget, shared_base=shared_base).start()
    except BaseException:
        cache.close()
        raise
    engine.start()
    stop = threading.Event()
    threading.Thread(target=_sample_memory, args=(metrics, stop, str(base_info.device)), name="memory-sampler",
                     daemon=True).start()
    return App(config, model, tokenizer, base_info, engine, store, cache, metrics, stop, training)


def resolve_lora_dtype(requested: str, device, compute_dtype: str) -> str:
    """The LoRA banks' dtype: ``requested`` unless ``"auto"``, which is float32 on a CPU (PEFT's up-cast) and the
    compute dtype on an accelerator."""
    if requested != "auto":
        return requested
    return "float32" if torch.device(device).type == "cpu" else compute_dtype


def _sample_memory(metrics: Metrics, stop: threading.Event, device: str, period_s: float = 1.0) -> None:
    while not stop.is_set():
        try:
            metrics.sample_memory(device)
        except Exception:  # noqa: BLE001 - a metrics hiccup must not end the sampler
            log.exception("memory sampling failed")
        stop.wait(period_s)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
