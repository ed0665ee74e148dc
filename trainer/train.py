"""QLoRA fine-tuning run: NF4 base loaded as the server loads it, PEFT LoRA, transformers' Trainer, guards, output."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.errors import AlreadyExists, Cancelled, FailedPrecondition, ServerError
from server.training.jobs import TRAINER_PHASES
from trainer import data as data_mod
from trainer.adapter import (
    apply_umask_modes,
    inspect_adapter,
    model_card,
    remove_stale_temps,
    write_atomically,
)
from trainer.config import TrainConfig

log = logging.getLogger(__name__)

#: ``on_progress`` receives one of these dicts per optimizer step (``event="step"``), per evaluation (``"eval"``),
#: per evaluation batch (``"eval_progress"``, with ``eval_examples_done`` / ``eval_examples_total``), per change of
#: phase (``"phase"``) and once at the end (``"done"``). Keys of every event: event, phase (one of ``PHASES``),
#: step, total_steps (0 until training starts), loss (mean token cross-entropy of the latest step, nats; None
#: before the first), eval_loss (latest, or None), tokens_per_second (non-padding tokens since training started
#: / wall seconds), learning_rate (the LR the step used), epoch, elapsed_seconds, eta_seconds (seconds to the
#: last step at this call's pace; None before its first step).
ProgressFn = Callable[[dict[str, Any]], None]
#: Phases of a run, in order: loading (tokenizer, data, base model), training (optimizer steps, with checkpoint
#: saves), evaluating (held-out loss; also between training steps when ``eval_steps`` is set), saving (the
#: adapter directory). A server job adds ``registering`` after them.
PHASES = TRAINER_PHASES
#: Supplies the frozen NF4 base instead of ``server.model.base.load_base_model``: called with the run's
#: ``ModelConfig``, returns ``(model, BaseModelInfo)`` -- a model built as that loader builds it, never run forward
#: (a server job gets the server's resident base this way: ``server.training.shared_base``).
LoadBaseFn = Callable[[Any], tuple[Any, Any]]

#: Config fields that define the result; ``resume`` refuses a checkpoint written with different values.
_RESUME_FIELDS = ("model", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "learning_rate",
                  "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay", "max_steps", "num_epochs",
                  "batch_size", "gradient_accumulation_steps", "max_seq_length", "truncate", "optim", "seed",
                  "eval_fraction", "compute_dtype", "init_adapter")
_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_config.json")
_RUN_MANIFEST = "run.json"
#: Padded batches are rounded up to a multiple of this many tokens when steps replay from CUDA graphs, so that
#: batch shapes repeat (a graph is captured per shape; ``trainer.step_graph.StepGraphs``).
GRAPH_PAD_MULTIPLE = 64


class TrainingDiverged(ServerError):
    """The loss became NaN/inf, or stayed at exactly 0 (nothing left to learn from: broken labels or model)."""

    code = "ABORTED"


@dataclass(frozen=True)
class TrainResult:
    """Outcome of a finished run.

    Attributes:
        adapter_dir: the PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``, README.md).
        train_loss: mean token cross-entropy (nats) of the last optimizer step.
        eval_loss: mean token cross-entropy (nats) on the held-out split after training; None without one.
        steps: optimizer steps done in total (including those before a resume).
        seconds: wall time of this call (loading, training, evaluation, writing).
        data_sha256: SHA-256 of the training file.
        loss_history: per-step training losses of the steps run in this call (after ``resumed_from_step``).
        resumed_from_step: the checkpoint step this call continued from (0 for a fresh run).
    """

    adapter_dir: Path
    train_loss: float
    eval_loss: float | None
    steps: int
    seconds: float
    data_sha256: str
    loss_history: tuple[float, ...] = ()
    resumed_from_step: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Model preparation


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from converting ``Linear4bit`` weights to its CPU inference layout; returns the count.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` repacks the weight in place the first time it runs in eval mode
    without grad (any evaluation pass). Matmuls on a repacked weight go through ``gemv_4bit``, which has no autograd
    formula, so a later training step silently gets *no gradient through the base layer* (torch only warns).
    Training evaluates mid-run, so the trainer turns the repacking off; the numerics are the plain dequantize+matmul
    path (see trainer/NOTES.md).
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise FailedPrecondition("a Linear4bit weight was already repacked for CPU inference; load the base "
                                         "model afresh for training", field="model")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def prepare_for_qlora_training(model: torch.nn.Module, gradient_checkpointing: bool = True,
                               preserve_rng_state: bool = True) -> torch.nn.Module:
    """Make a 4-bit base model trainable with LoRA *without* changing its numerics.

    Unlike ``peft.prepare_model_for_kbit_training`` this keeps every unquantized weight (embeddings, norms, the
    tied lm_head) in the dtype the server serves with, instead of up-casting them to float32: with bfloat16 compute
    that up-cast trains the adapter against a different forward pass than the one it is served with, and on the
    bnb CPU backend it made LoRA training diverge (trainer/NOTES.md). It does the rest of that function's job:

    * freezes all base parameters;
    * turns on non-reentrant activation checkpointing of the decoder blocks (``use_reentrant=False``: needs no
      input that requires grad; ``preserve_rng_state`` replays dropout masks exactly in the recomputation — not
      needed without dropout, and a CUDA graph cannot capture it) and ``enable_input_require_grads`` for safety;
    * sets ``use_cache=False`` (a KV cache is useless in training and conflicts with checkpointing);
    * disables bitsandbytes' CPU weight repacking (``disable_cpu_weight_repacking``).

    Returns:
        The same model, modified in place.
    """
    model.requires_grad_(False)
    disable_cpu_weight_repacking(model)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


def lora_config(config: TrainConfig):
    """The ``peft.LoraConfig`` of a run: ``target_modules=None`` becomes PEFT's ``"all-linear"`` (every
    ``nn.Linear``/``Linear4bit`` of the model except the output layer), as in the QLoRA paper."""
    from peft import LoraConfig

    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=(config.target_modules if isinstance(config.target_modules, str)
                                      else list(config.target_modules) if config.target_modules else "all-linear"),
                      use_rslora=config.use_rslora, bias="none", task_type="CAUSAL_LM")


def adapter_config_json(config: TrainConfig, base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` a run of ``config`` writes, as the dict PEFT's ``save_pretrained`` serializes
    (sets as lists, enums as their names), with ``base_model_name_or_path`` = ``base_model``; a run from
    ``init_adapter`` keeps that adapter's config. Lets a server check, before training, that it would register the
    result (``server.adapters.validation.check_adapter_config``).

    Raises:
        NotFound / InvalidArgument: ``init_adapter`` is set and its config cannot be read (``field="adapter"``).
    """
    if config.init_adapter is not None:
        cfg = dict(inspect_adapter(config.init_adapter).config)
    else:
        cfg = {k: list(v) if isinstance(v, set) else v for k, v in lora_config(config).to_dict().items()}
    cfg["base_model_name_or_path"] = base_model
    return json.loads(json.dumps(cfg))


def _library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def _dtype_report(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in model.parameters():
        key = f"{p.__class__.__name__}:{p.dtype}"
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Monitoring (guards, progress, stop requests)


class _Monitor:
    """Per-step bookkeeping shared by the Trainer subclass (micro-batch losses) and a TrainerCallback: guards,
    progress events (see ``ProgressFn``), the current phase, and stop requests."""

    def __init__(self, config: TrainConfig, on_progress: ProgressFn | None, should_stop: Callable[[], bool] | None):
        self.config = config
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.history: list[float] = []
        self.step_loss = 0.0
        self.step_tokens = 0
        self.tokens = 0
        self.lr = 0.0
        self.eval_loss: float | None = None
        self.eval_step = -1
        self.zero_streak = 0
        self.stopped = False
        self.phase = ""
        self.step = 0
        self.total_steps = 0
        self.epoch = 0.0
        self.training = False
        self.eval_done = 0
        self.eval_total = 0
        self.t0 = time.monotonic()
        self.train_t0: float | None = None

    def micro_batch(self, loss: float, tokens: int, lr: float, step: int) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss is {loss} at step {step + 1}; lower learning_rate, check the data "
                                   "and compute_dtype (the last checkpoint is left in place)", field="learning_rate")
        self.step_loss += loss
        self.step_tokens += tokens
        self.lr = lr

    def sync(self, state) -> None:
        """Take step, planned steps and epoch from the Trainer's state."""
        self.step, self.total_steps = int(state.global_step), int(state.max_steps)
        self.epoch = float(state.epoch or 0.0)

    def end_step(self, state) -> None:
        self.sync(state)
        loss, self.step_loss = self.step_loss, 0.0
        self.tokens += self.step_tokens
        self.step_tokens = 0
        self.history.append(loss)
        self.zero_streak = self.zero_streak + 1 if loss == 0.0 else 0
        if self.zero_streak >= self.config.zero_loss_patience:
            raise TrainingDiverged(f"training loss has been exactly 0 for {self.zero_streak} steps (up to step "
                                   f"{state.global_step}): no supervised tokens reach the loss or the model is "
                                   "broken", field="dataset")
        self.emit("step", loss)

    def set_phase(self, phase: str) -> None:
        """Enter ``phase`` (one of ``PHASES``) and report it (an event ``"phase"``) if it changed."""
        if phase != self.phase:
            self.phase = phase
            self.emit("phase", self.history[-1] if self.history else None)

    def eta_seconds(self) -> float | None:
        """Seconds left to the last step at this call's mean pace (steps and evaluations so far); None before
        the first step of this call."""
        if self.train_t0 is None or not self.history or self.total_steps <= 0:
            return None
        per_step = (time.monotonic() - self.train_t0) / len(self.history)
        return max(0, self.total_steps - self.step) * per_step

    def emit(self, event: str, loss: float | None, **extra: Any) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        elapsed = now - self.t0
        trained = now - self.train_t0 if self.train_t0 is not None else 0.0
        record = {
            "event": event,
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": loss,
            "eval_loss": self.eval_loss,
            "tokens_per_second": self.tokens / trained if trained > 0 else 0.0,
            "learning_rate": self.lr,
            "epoch": self.epoch,
            "elapsed_seconds": elapsed,
            "eta_seconds": self.eta_seconds(),
        }
        record.update(extra)
        self.on_progress(record)


def _make_callback(monitor: _Monitor):
    from transformers import TrainerCallback

    class _MonitorCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            monitor.sync(state)
            monitor.training = True
            monitor.train_t0 = time.monotonic()
            monitor.set_phase("training")

        def on_train_end(self, args, state, control, **kwargs):
            monitor.training = False

        def on_step_end(self, args, state, control, **kwargs):
            monitor.end_step(state)
            if monitor.should_stop is not None and monitor.should_stop():
                monitor.stopped = True
                control.should_save = True
                control.should_training_stop = True

        def on_prediction_step(self, args, state, control, **kwargs):
            monitor.eval_done = min(monitor.eval_total, monitor.eval_done + args.per_device_eval_batch_size)
            monitor.emit("eval_progress", monitor.history[-1] if monitor.history else None,
                         eval_examples_done=monitor.eval_done, eval_examples_total=monitor.eval_total)

        def on_save(self, args, state, control, **kwargs):
            # The Trainer (and safetensors, which writes 0600) made the checkpoint; give it the process umask's
            # modes so that a server running as another user can read (and register) it.
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                apply_umask_modes(folder)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get("eval_loss")
            if value is not None:
                value = float(value)
                if not math.isfinite(value):
                    raise TrainingDiverged(f"eval loss is {value} at step {state.global_step}", field="learning_rate")
                monitor.eval_loss = value
                monitor.eval_step = int(state.global_step)
                monitor.emit("eval", monitor.history[-1] if monitor.history else None)

    return _MonitorCallback()


def _make_trainer_class():
    from transformers import Trainer

    class _QLoRATrainer(Trainer):
        """transformers' Trainer plus a per-micro-batch loss check (NaN/inf stops before the optimizer step) and
        the ``evaluating`` phase around every evaluation, which batches with ``eval_collator`` (padded: the eval
        loss and its progress count stay per example whatever the training collator)."""

        def __init__(self, *args, monitor: _Monitor, graphs=None, eval_collator=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._monitor = monitor
            self._graphs = graphs
            self._eval_collator = eval_collator

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The causal-LM loss without materialising the logits (``trainer.fast.chunked_causal_lm_loss``),
            replayed from a CUDA graph where ``trainer.step_graph.StepGraphs`` allows; evaluation with outputs
            keeps transformers' own."""
            if return_outputs or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from trainer.fast import chunked_causal_lm_loss

            loss = None
            if self._graphs is not None and model.training:
                loss = self._graphs.loss(inputs, num_items_in_batch)
            if loss is None:
                loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch)
            return loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            lr = float(self.lr_scheduler.get_last_lr()[0]) if self.lr_scheduler is not None else 0.0
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._monitor.micro_batch(float(loss), tokens, lr, self.state.global_step)
            return loss

        def evaluate(self, *args, **kwargs):
            monitor = self._monitor
            monitor.eval_done = 0
            monitor.eval_total = len(self.eval_dataset) if self.eval_dataset is not None else 0
            monitor.set_phase("evaluating")
            train_collator = self.data_collator
            if self._eval_collator is not None:
                self.data_collator = self._eval_collator
            try:
                metrics = super().evaluate(*args, **kwargs)
            finally:
                self.data_collator = train_collator
            if monitor.training:
                monitor.set_phase("training")
            return metrics

    return _QLoRATrainer


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and run manifest


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Highest-step ``checkpoint-N`` directory that holds every file a resume needs (a save cut short by a crash
    lacks ``trainer_state.json``, which the Trainer writes last), or None."""
    if not Path(checkpoint_dir).is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in Path(checkpoint_dir).iterdir():
        if not (p.is_dir() and p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit()):
            continue
        if not all((p / f).is_file() for f in _CHECKPOINT_FILES):
            continue
        step = int(p.name[len("checkpoint-"):])
        if best is None or step > best[0]:
            best = (step, p)
    return best[1] if best else None


def _checkpoint_dirs(checkpoint_dir: Path) -> list[Path]:
    if not Path(checkpoint_dir).is_dir():
        return []
    return [p for p in Path(checkpoint_dir).iterdir()
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit()]


def remove_incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete every ``checkpoint-N`` directory under ``checkpoint_dir`` that lacks a file a resume needs (a save
    cut short by an abort or a crash); returns the directories removed. Complete checkpoints are left alone."""
    removed = []
    for p in _checkpoint_dirs(checkpoint_dir):
        if not all((p / f).is_file() for f in _CHECKPOINT_FILES):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _manifest(config: TrainConfig, data_sha: str, eval_sha: str | None) -> dict[str, Any]:
    cfg = config.to_dict()
    return {"config": {k: cfg.get(k) for k in _RESUME_FIELDS}, "data_sha256": data_sha, "eval_sha256": eval_sha}


def _check_manifest(path: Path, expected: dict[str, Any]) -> None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read {path} to check the resumed run: {exc}", field="output_dir") from exc
    for key in ("data_sha256", "eval_sha256"):
        if found.get(key) != expected[key]:
            raise FailedPrecondition(f"the data changed since the checkpoint was written ({key} "
                                     f"{found.get(key)} != {expected[key]})",
                                     field="eval_dataset" if key.startswith("eval") else "dataset")
    for key, value in expected["config"].items():
        if found.get("config", {}).get(key) != value:
            raise FailedPrecondition(f"differs from the checkpointed run ({found.get('config', {}).get(key)!r} "
                                     f"!= {value!r}); resume needs the same settings", field=key)


# ----------------------------------------------------------------------------------------------------------------
# The run


class TrainingSession:
    """One training run; ``run()`` does the work. ``train()`` is the usual entry point; tests use the session to
    reach the in-memory ``model`` afterwards.

    Attributes (after ``run()``):
        model: the ``PeftModel`` (NF4 base + trained LoRA), in eval mode.
        tokenizer: its tokenizer.
        trainer: the ``transformers.Trainer`` that ran (optimizer, scheduler, state).
        model_name: the base model's name as recorded in the adapter (hub id for the embedded model).
    """

    def __init__(self, config: TrainConfig, on_progress: ProgressFn | None = None, resume: bool = False,
                 should_stop: Callable[[], bool] | None = None, load_base: LoadBaseFn | None = None) -> None:
        self.config = config
        self.load_base = load_base
        self.on_progress = on_progress
        self.resume = resume
        self.should_stop = should_stop
        self.model = None
        self.tokenizer = None
        self.trainer = None
        self.model_name: str | None = None
        self.compute_dtype: str | None = None  # the resolved compute dtype and why, for the model card
        self.levers: dict[str, object] = {}  # trainer.fast levers applied (for the log and tests)

    # -- steps -----------------------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        from server.model.base import resolve_source

        path, name = resolve_source(self.config.model_config())
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot load the tokenizer of {path!r}: {exc}", field="model") from exc
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # as server.model.base.load_base_model does
        tok.padding_side = "right"
        self.model_name = name
        return tok

    def _load_data(self, tok):
        cfg = self.config
        examples = data_mod.load_tokenized(cfg.dataset, tok, cfg.max_seq_length, cfg.truncate, field="dataset")
        data_sha = data_mod.sha256_file(cfg.dataset)
        eval_sha = None
        if cfg.eval_dataset is not None:
            eval_examples = data_mod.load_tokenized(cfg.eval_dataset, tok, cfg.max_seq_length, cfg.truncate,
                                                    field="eval_dataset")
            eval_sha = data_mod.sha256_file(cfg.eval_dataset)
            train_examples = examples
        else:
            train_examples, eval_examples = data_mod.split_train_eval(examples, cfg.eval_fraction, cfg.seed)
        n_trunc = sum(e.truncated for e in train_examples)
        held_out = len(eval_examples)
        eval_examples = eval_examples[:cfg.eval_max_examples]
        log.info("data: %d train / %d held-out examples (%d truncated), %d train tokens; evaluating on %d of them "
                 "(eval_max_examples)", len(train_examples), held_out, n_trunc,
                 sum(len(e.input_ids) for e in train_examples), len(eval_examples))
        return train_examples, eval_examples, data_sha, eval_sha

    def _load_model(self):
        from peft import PeftModel, get_peft_model

        from server.model.base import load_base_model

        if self.load_base is not None:
            base, info = self.load_base(self.config.model_config())
        else:
            base, _, info = load_base_model(self.config.model_config())
        self.compute_dtype = f"{info.compute_dtype} ({info.compute_dtype_reason})"
        # The LoRA dropout that will run: init_adapter's own when starting from one (config.lora_dropout is then
        # ignored). Without dropout, checkpointing has no RNG state to replay, and skipping it lets CUDA graphs
        # capture the step; with dropout it must be replayed or the recomputed masks would differ.
        dropout = (float(inspect_adapter(self.config.init_adapter).config.get("lora_dropout") or 0.0)
                   if self.config.init_adapter is not None else self.config.lora_dropout)
        prepare_for_qlora_training(base, self.config.gradient_checkpointing, preserve_rng_state=dropout > 0)
        # The base was loaded from a local path (for the embedded model, its converted copy in the cache); every
        # adapter we write -- checkpoints included, and PEFT's model card in them -- names the model the user asked
        # for instead (the hub id of the embedded model, or the user's own path / hub id).
        base.name_or_path = self.model_name
        if getattr(base, "config", None) is not None:
            base.config._name_or_path = self.model_name
        import transformers

        transformers.set_seed(self.config.seed)  # LoRA A's initialisation draws from the torch RNG
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated ``is_gradient_checkpointing``: library noise, not the user's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
            if self.config.init_adapter is not None:
                summary = inspect_adapter(self.config.init_adapter)
                log.info("starting from adapter %s (r=%d, alpha=%g)", summary.path, summary.r, summary.lora_alpha)
                model = PeftModel.from_pretrained(base, str(self.config.init_adapter), is_trainable=True)
            else:
                model = get_peft_model(base, lora_config(self.config))
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = self.model_name
        # Our adapters never hold embedding layers (the registry refuses embedding LoRA), so say so: PEFT's default
        # ("auto") would look the base model's name up on the hub at every save, checkpoints included -- a network
        # call per checkpoint, and a stall where the hub is slow or unreachable. The Trainer saves checkpoints
        # through this same method, so the instance gets the setting rather than each call site.
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
        from trainer import fast

        self.levers = fast.apply_training_levers(model, torch.device(info.device))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s on %s: %d trainable LoRA parameters; parameter dtypes %s; speed levers %s", info.name,
                 info.device, trainable, _dtype_report(model), self.levers)
        return model

    def _step_graphs(self, model):
        """CUDA graphs of the training step (``trainer.step_graph.StepGraphs``) when they can be exact: on CUDA, and
        without dropout in checkpointed blocks; None otherwise (said in the log)."""
        from trainer.fast import chunked_causal_lm_loss, uses_rng
        from trainer.step_graph import StepGraphs

        device = next(model.parameters()).device
        if device.type != "cuda":
            return None
        if self.config.packing:
            log.info("CUDA graphs off for this run: packed batches change shape every step; set packing: false "
                     "(batches are then padded to a multiple of %d tokens) and lora_dropout: 0 to replay steps "
                     "from graphs", GRAPH_PAD_MULTIPLE)
            return None
        if self.config.gradient_checkpointing and uses_rng(model):
            log.info("CUDA graphs off for this run: dropout (lora_dropout=%g) inside checkpointed blocks needs the "
                     "RNG state, which a graph cannot capture; set lora_dropout: 0 or gradient_checkpointing: "
                     "false to replay steps from graphs", self.config.lora_dropout)
            return None
        return StepGraphs(model, chunked_causal_lm_loss)

    def _training_args(self, n_eval: int):
        from transformers import TrainingArguments

        cfg = self.config
        device = cfg.model_config().device
        use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        return TrainingArguments(
            output_dir=str(cfg.checkpoint_dir),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the total steps
            max_grad_norm=cfg.max_grad_norm,
            weight_decay=cfg.weight_decay,
            optim=cfg.optim,
            max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
            num_train_epochs=cfg.num_epochs,
            logging_steps=cfg.logging_steps,
            logging_nan_inf_filter=False,  # the default hides NaN/inf losses from the logs
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit,
            eval_strategy="steps" if (cfg.eval_steps > 0 and n_eval > 0) else "no",
            eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
            prediction_loss_only=True,
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=False,  # no autocast: base in compute_dtype, LoRA in float32, exactly like the server's forward
            fp16=False,
            use_cpu=use_cpu,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            report_to="none",
            disable_tqdm=True,
            save_only_model=False,  # optimizer, scheduler and RNG state go into every checkpoint
        )

    def _write_adapter(self, model, result_fields: dict[str, Any], data_sha: str, eval_sha: str | None) -> Path:
        cfg = self.config
        hyper = {k: v for k, v in cfg.to_dict().items()
                 if k not in ("dataset", "eval_dataset", "output_dir", "cache_dir", "adapter_id", "device")}
        if hyper["target_modules"] is None:
            hyper["target_modules"] = "all linear layers of the blocks"
        if cfg.init_adapter is None:
            del hyper["init_adapter"]
        else:
            hyper["init_adapter"] = cfg.init_adapter.name
        if self.compute_dtype is not None:
            hyper["compute_dtype"] = self.compute_dtype
        hyper["quantization"] = "nf4, double quant"
        hyper["libraries"] = _library_versions()
        card = model_card(cfg.adapter_id, str(self.model_name), data_sha, eval_sha, hyper, result_fields)

        def fill(tmp: Path) -> None:
            model.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "README.md").write_text(card, encoding="utf-8")

        return write_atomically(cfg.adapter_dir, fill)

    # -- run -------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Validate the data, load the model, train, evaluate and write the adapter. See ``train``."""
        from transformers import PrinterCallback

        cfg = self.config
        t0 = time.monotonic()
        if cfg.adapter_dir.exists():
            raise AlreadyExists(f"{cfg.adapter_dir} exists: this run already finished", field="output_dir")
        remove_stale_temps(cfg.adapter_dir)
        remove_incomplete_checkpoints(cfg.checkpoint_dir)
        checkpoint = last_complete_checkpoint(cfg.checkpoint_dir)
        if checkpoint is not None and not self.resume:
            raise AlreadyExists(f"{cfg.checkpoint_dir} holds checkpoints of an earlier run; resume it or use another "
                                "output_dir", field="output_dir")
        if self.resume and checkpoint is None:
            log.warning("resume requested but %s holds no complete checkpoint; starting from step 0",
                        cfg.checkpoint_dir)

        monitor = _Monitor(cfg, self.on_progress, self.should_stop)
        monitor.set_phase("loading")
        tok = self._load_tokenizer()
        train_ex, eval_ex, data_sha, eval_sha = self._load_data(tok)  # whole files validated before any training
        manifest = _manifest(cfg, data_sha, eval_sha)
        manifest_path = cfg.output_dir / _RUN_MANIFEST
        if checkpoint is not None:
            _check_manifest(manifest_path, manifest)
        else:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")

        model = self._load_model()
        self.model, self.tokenizer = model, tok
        args = self._training_args(len(eval_ex))
        if args.use_cpu or not torch.cuda.is_available():
            log.info("optimizer %s: bitsandbytes pages optimizer state only on CUDA; on the CPU it keeps ordinary "
                     "(non-paged) %s state", cfg.optim, "8-bit" if cfg.optim.endswith("8bit") else "32-bit")
        trainer_cls = _make_trainer_class()
        graphs = self._step_graphs(model)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=data_mod.to_features(train_ex),
            eval_dataset=data_mod.to_features(eval_ex) if eval_ex else None,
            data_collator=data_mod.make_collator(tok, cfg.packing, None if graphs is None else GRAPH_PAD_MULTIPLE),
            callbacks=[_make_callback(monitor)],
            monitor=monitor,
            graphs=graphs,
            eval_collator=data_mod.make_collator(tok, packing=False),
        )
        trainer.remove_callback(PrinterCallback)
        self.trainer = trainer
        resumed_from = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("stopped on request before training started; nothing was trained"
                            + (f" and {checkpoint} is kept" if checkpoint is not None else ""))
        if checkpoint is not None:
            log.info("resuming from %s", checkpoint)
        try:
            with warnings.catch_warnings():
                # Said once above, in words that fit (bitsandbytes warns from inside the optimizer).
                warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        except BaseException:
            # An abort (a second Ctrl-C, an error) may cut a checkpoint save short: never leave half of one.
            remove_incomplete_checkpoints(cfg.checkpoint_dir)
            raise
        if monitor.stopped and trainer.state.global_step < trainer.state.max_steps:
            kept = last_complete_checkpoint(cfg.checkpoint_dir)
            raise Cancelled(f"stopped on request after step {trainer.state.global_step}; kept: checkpoint {kept} "
                            "(complete); no adapter was written")
        if not monitor.history:
            raise FailedPrecondition(f"no training step ran (checkpoint at step {resumed_from} already reached "
                                     f"{trainer.state.max_steps} steps)", field="max_steps")

        eval_loss = None
        if eval_ex:
            if monitor.eval_step != trainer.state.global_step:
                trainer.evaluate()  # the callback checks the value and records it
            eval_loss = monitor.eval_loss
        model.eval()
        train_loss = monitor.history[-1]
        steps = int(trainer.state.global_step)
        results = {"steps": steps, "final train loss": f"{train_loss:.4f}",
                   "eval loss": "n/a" if eval_loss is None else f"{eval_loss:.4f}",
                   "train examples": len(train_ex), "eval examples": len(eval_ex),
                   "wall seconds (this call)": f"{time.monotonic() - t0:.0f}"}
        monitor.set_phase("saving")
        adapter_dir = self._write_adapter(model, results, data_sha, eval_sha)
        result = TrainResult(adapter_dir=adapter_dir, train_loss=train_loss, eval_loss=eval_loss, steps=steps,
                             seconds=time.monotonic() - t0, data_sha256=data_sha,
                             loss_history=tuple(monitor.history), resumed_from_step=resumed_from)
        monitor.emit("done", train_loss)
        log.info("adapter written to %s (%d steps, train loss %.4f, eval loss %s, %.0f s)", adapter_dir, steps,
                 train_loss, eval_loss, result.seconds)
        return result


def train(config: TrainConfig, on_progress: ProgressFn | None = None, resume: bool = False,
          should_stop: Callable[[], bool] | None = None, load_base: LoadBaseFn | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on ``config.dataset`` with QLoRA and write it to ``config.adapter_dir``.

    The base model is loaded exactly as the server loads it (``server.model.base.load_base_model``: NF4, double
    quantization, ``compute_dtype`` compute). Safe to call from a separate worker process; reads no environment.

    Args:
        config: the run's settings.
        on_progress: called with a progress dict (see ``ProgressFn``) at every phase change, after every optimizer
            step, evaluation batch and evaluation, and at the end; an exception it raises aborts the run.
        resume: continue from the last complete checkpoint in ``config.checkpoint_dir`` (start fresh if none);
            the data files and result-defining settings must be unchanged.
        should_stop: polled before training starts and after every optimizer step; when it returns True the
            current step is finished, a complete checkpoint is saved (none before the first step), no adapter is
            written and ``Cancelled`` is raised (``resume=True`` continues later). An exception raised meanwhile
            (e.g. ``KeyboardInterrupt`` from a second Ctrl-C) aborts at once: incomplete checkpoints are deleted,
            complete ones are kept, and no adapter is written.
        load_base: where the base comes from (see ``LoadBaseFn``); None loads it with ``load_base_model``.

    Returns:
        ``TrainResult``.

    Raises:
        DataError / InvalidArgument: bad data (every bad line listed with its number) or settings.
        FailedPrecondition: the model cannot be loaded, or a resume does not match its checkpoint.
        AlreadyExists: the adapter exists, or checkpoints exist and ``resume`` is False.
        TrainingDiverged: NaN/inf loss, or a loss of exactly 0 for ``zero_loss_patience`` steps.
        Cancelled: ``should_stop`` asked to stop.
    """
    return TrainingSession(config, on_progress, resume, should_stop, load_base).run()
