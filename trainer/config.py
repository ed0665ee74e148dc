"""Frozen, validated hyperparameters of one QLoRA training run, loadable from a YAML or JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import ADAPTER_ID_RE, COMPUTE_DTYPES, EMBEDDED_MODEL, ModelConfig
from server.errors import InvalidArgument

#: Optimizers the trainer accepts: bitsandbytes' paged AdamW with 8-bit or 32-bit state (names as in
#: ``transformers.TrainingArguments.optim``).
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
#: Learning-rate schedules (``transformers.get_scheduler`` names); the default is the QLoRA paper's constant LR.
SCHEDULERS = ("constant_with_warmup", "linear", "cosine")
_PATH_FIELDS = ("dataset", "eval_dataset", "output_dir", "cache_dir", "init_adapter")


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise InvalidArgument(message, field=field_name)


def _default_cache_dir() -> Path:
    return ModelConfig().cache_dir


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs. Defaults follow the QLoRA paper (Dettmers et al. 2023,
    arXiv:2305.14314, section 5 / appendix B): NF4 + double quantization, LoRA on every linear layer of the
    blocks, paged AdamW, lr 2e-4 held constant, max grad norm 0.3, warmup ratio 0.03, LoRA dropout 0.1 for models
    up to 13B.

    Attributes:
        model: base model as the server names it: ``"smollm2"`` (embedded SmolLM2-135M-Instruct), a local
            directory or a hub id. Loaded exactly as the server loads it (NF4, double quant, ``compute_dtype``).
        dataset: JSONL training file (``prompt``/``completion`` or chat ``messages`` per line; see trainer/data.py).
        output_dir: run directory; holds ``checkpoints/`` while training and the finished ``adapter/``.
        adapter_id: name of the adapter (model card title; the id it is registered under later).
        eval_dataset: optional held-out JSONL file; when absent ``eval_fraction`` of ``dataset`` is held out.
        init_adapter: optional PEFT LoRA adapter directory to start from (ours or any ``save_pretrained`` output);
            its own r, lora_alpha, lora_dropout, target_modules and use_rslora then apply and the fields below are
            ignored.
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator; the update is ``(lora_alpha / r) · B A`` (Hu et al. 2021,
            arXiv:2106.09685) or ``(lora_alpha / sqrt(r)) · B A`` with ``use_rslora`` (Kalajdzievski 2023,
            arXiv:2312.03732).
        lora_dropout: dropout probability on the LoRA input.
        target_modules: module names to adapt (a list: exact names or name suffixes), or one string, which PEFT
            reads as a regex matched against full module names (``".*\\.(q|v)_proj"``); ``None`` = every linear
            layer of the decoder blocks (not lm_head), as in the QLoRA paper.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        learning_rate: peak learning rate.
        lr_scheduler: one of ``SCHEDULERS``.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly from 0 (0 ≤ x < 1).
        max_grad_norm: gradient-norm clip (L2 over all trainable parameters).
        weight_decay: decoupled AdamW weight decay.
        max_steps: optimizer steps to run; 0 = ``num_epochs`` passes over the training split.
        num_epochs: passes over the training split when ``max_steps`` is 0.
        batch_size: examples per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step (effective batch = product).
        max_seq_length: longest tokenized example (tokens, prompt + completion).
        truncate: ``True`` cuts a longer example to ``max_seq_length`` tokens (its end is lost); ``False`` rejects
            it with its line number.
        optim: one of ``OPTIMIZERS``.
        seed: seeds Python, NumPy and torch, the data order and the train/eval split.
        eval_fraction: share of ``dataset`` held out for the eval loss when ``eval_dataset`` is absent (0 = no eval).
        eval_steps: evaluate every N optimizer steps (0 = only at the end).
        eval_max_examples: evaluate on at most this many held-out examples (the first ones of the shuffled split,
            or of ``eval_dataset``), so an evaluation takes seconds, not minutes, on a CPU.
        save_steps: write a resumable checkpoint (adapter, optimizer, scheduler, RNG) every N optimizer steps.
        save_total_limit: checkpoints kept (oldest deleted first).
        logging_steps: record the mean training loss in the trainer state, and print a progress line when the
            output is not a terminal, every N steps.
        zero_loss_patience: stop with an error when the training loss is exactly 0 on this many consecutive steps.
        compute_dtype: bitsandbytes 4-bit compute dtype and dtype of every unquantized base weight; ``"auto"``
            (default) resolves on the training device exactly as the server does (``server.model.dtype``), so a
            trainer and a server on the same machine use the same dtype.
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
        packing: concatenate the examples of a training micro-batch into one row with no padding (position ids
            restart at 0 per example, attention stays inside each example: ``data.make_collator``); the loss, its
            gradients and the per-example logits are those of the padded batch up to float rounding. ``False`` (the
            default) pads every micro-batch to its longest example. Off by default because SDPA still scores every
            pair of the packed row (T² for T tokens in the micro-batch, against Σ length² padded): it pays when
            padding dominates, and it keeps a step's shape from repeating (no CUDA-graph replay). Evaluation
            batches are always padded.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        cache_dir: where the embedded model is converted to (as the server's ``ModelConfig.cache_dir``).
    """

    model: str = EMBEDDED_MODEL
    dataset: Path
    output_dir: Path
    adapter_id: str = "adapter"
    eval_dataset: Path | None = None
    init_adapter: Path | None = None
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    max_steps: int = 0
    num_epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 512
    truncate: bool = False
    optim: str = "paged_adamw_8bit"
    seed: int = 42
    eval_fraction: float = 0.1
    eval_steps: int = 0
    eval_max_examples: int = 64
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10
    zero_loss_patience: int = 3
    compute_dtype: str = "auto"
    gradient_checkpointing: bool = True
    packing: bool = False
    device: str = "auto"
    cache_dir: Path = field(default_factory=_default_cache_dir)

    def __post_init__(self) -> None:
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                _require(isinstance(value, str) and bool(value), name, "must be a path")
                object.__setattr__(self, name, Path(value))
        _require(isinstance(self.dataset, Path) and str(self.dataset) not in ("", "."), "dataset",
                 "must name a JSONL file")
        _require(isinstance(self.output_dir, Path), "output_dir", "must be a directory path")
        _require(isinstance(self.model, str) and bool(self.model), "model",
                 "must name a directory, a hub id or 'smollm2'")
        _require(isinstance(self.adapter_id, str) and ADAPTER_ID_RE.fullmatch(self.adapter_id) is not None,
                 "adapter_id", f"must match {ADAPTER_ID_RE.pattern}")
        if isinstance(self.target_modules, str):  # a regex, as PEFT reads a string (full match on module names)
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise InvalidArgument(f"is not a valid regex: {exc}", field="target_modules") from None
            _require(bool(self.target_modules), "target_modules", "must not be empty")
        elif self.target_modules is not None:
            mods = self.target_modules
            _require(isinstance(mods, (list, tuple)) and len(mods) > 0
                     and all(isinstance(m, str) and m for m in mods), "target_modules",
                     "must be null (all linear layers of the blocks), a non-empty list of module names or a regex")
            object.__setattr__(self, "target_modules", tuple(mods))
        for name in ("r", "max_steps", "batch_size", "gradient_accumulation_steps", "max_seq_length", "seed",
                     "eval_steps", "eval_max_examples", "save_steps", "save_total_limit", "logging_steps",
                     "zero_loss_patience"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer")
        for name in ("r", "batch_size", "gradient_accumulation_steps", "eval_max_examples", "save_steps",
                     "save_total_limit", "logging_steps", "zero_loss_patience"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = use num_epochs)")
        _require(self.eval_steps >= 0, "eval_steps", "must be >= 0 (0 = only at the end)")
        _require(self.max_seq_length >= 2, "max_seq_length", "must be >= 2")
        _require(self.seed >= 0, "seed", "must be >= 0")
        for name in ("lora_alpha", "lora_dropout", "learning_rate", "warmup_ratio", "max_grad_norm",
                     "weight_decay", "num_epochs", "eval_fraction"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     name, "must be a finite number")
            object.__setattr__(self, name, float(value))
        _require(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        _require(self.learning_rate >= 0, "learning_rate", "must be >= 0")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.num_epochs > 0, "num_epochs", "must be > 0")
        _require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        for name in ("use_rslora", "truncate", "gradient_checkpointing", "packing"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")
        _require(self.optim in OPTIMIZERS, "optim", f"must be one of {OPTIMIZERS}")
        _require(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {SCHEDULERS}")
        _require(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"must be one of {COMPUTE_DTYPES}")
        self.model_config()  # validates device (and re-checks model / compute_dtype) with the server's rules

    def model_config(self) -> ModelConfig:
        """The server's ``ModelConfig`` for this run's base model (same quantization, dtype, device, cache)."""
        return ModelConfig(model=self.model, compute_dtype=self.compute_dtype, device=self.device,
                           cache_dir=self.cache_dir)

    @property
    def adapter_dir(self) -> Path:
        """Where the finished PEFT adapter is written (``output_dir/adapter``)."""
        return self.output_dir / "adapter"

    @property
    def checkpoint_dir(self) -> Path:
        """Where resumable checkpoints are written (``output_dir/checkpoints/checkpoint-<step>``)."""
        return self.output_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> TrainConfig:
        """Build from a mapping. Relative paths are taken relative to ``base_dir`` when given.

        Raises:
            InvalidArgument: an unknown key (``field`` = the key), a missing required key, or any invalid value.
        """
        if not isinstance(data, dict):
            raise InvalidArgument("the config must be a mapping of field names to values", field="config")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidArgument(f"unknown field (known: {', '.join(sorted(known))})", field=str(key))
        for key in ("dataset", "output_dir"):
            if data.get(key) in (None, ""):
                raise InvalidArgument("is required", field=key)
        values = dict(data)
        for name in ("learning_rate", "lora_alpha", "lora_dropout", "warmup_ratio", "max_grad_norm",
                     "weight_decay", "num_epochs", "eval_fraction"):
            # YAML 1.1 reads "2e-4" (no dot) as a string.
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    raise InvalidArgument("must be a number", field=name) from None
        if base_dir is not None:
            for name in _PATH_FIELDS:
                value = values.get(name)
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    values[name] = str(Path(base_dir) / value)
                elif isinstance(value, str) and value:
                    values[name] = str(Path(value).expanduser())
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file; relative paths in it are relative to the file's directory.

        Raises:
            InvalidArgument: unreadable or unparsable file (``field="config"``), or an invalid field.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path}: {exc}", field="config") from exc
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise InvalidArgument(f"{path}: expected a .yaml, .yml or .json file", field="config")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise InvalidArgument(f"{path}: cannot parse JSON: {exc}", field="config") from exc
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InvalidArgument(f"{path}: cannot parse YAML: {exc}", field="config") from exc
        return cls.from_dict(data if data is not None else {}, base_dir=path.resolve().parent)
