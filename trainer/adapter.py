"""Reads, writes (atomically) and describes PEFT LoRA adapter directories made by the trainer or by plain PEFT."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import AlreadyExists, InvalidArgument, NotFound

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter directory holds, read without loading a base model.

    Attributes:
        path: the directory.
        base_model: ``base_model_name_or_path`` from ``adapter_config.json``.
        r: LoRA rank.
        lora_alpha: LoRA alpha; scaling is ``alpha / r`` or ``alpha / sqrt(r)`` when ``use_rslora``.
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023, arXiv:2312.03732).
        target_modules: adapted module names (sorted) or PEFT's ``"all-linear"`` shorthand.
        num_parameters: elements of all stored LoRA tensors.
        weights_file: file name of the weights (safetensors or legacy ``.bin``).
        config: the raw ``adapter_config.json`` mapping.
    """

    path: Path
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    num_parameters: int
    weights_file: str
    config: dict[str, Any]

    @property
    def scaling(self) -> float:
        """The factor multiplying ``B A``: ``alpha / r`` (Hu et al. 2021) or ``alpha / sqrt(r)`` (rsLoRA)."""
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


def inspect_adapter(path: str | Path) -> AdapterSummary:
    """Describe a PEFT LoRA adapter directory (ours or any ``PeftModel.save_pretrained`` output).

    Raises:
        NotFound: no directory, no ``adapter_config.json`` or no weights file.
        InvalidArgument: the config is not a LoRA config or is malformed.
    """
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise NotFound(f"{path} has no {ADAPTER_CONFIG}", field="adapter")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidArgument(f"{cfg_path}: invalid JSON: {exc}", field="adapter") from exc
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidArgument(f"{cfg_path}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})", field="adapter")
    weights = next((n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise NotFound(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})", field="adapter")
    if weights.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path / weights), framework="pt") as f:
            numel = 0
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                numel += n
    else:
        import torch

        numel = sum(t.numel() for t in torch.load(path / weights, map_location="cpu", weights_only=True).values())
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(sorted(targets))
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"{cfg_path}: bad or missing r / lora_alpha: {exc}", field="adapter") from exc
    return AdapterSummary(path=path, base_model=cfg.get("base_model_name_or_path"), r=r, lora_alpha=alpha,
                          use_rslora=bool(cfg.get("use_rslora", False)), target_modules=targets or (),
                          num_parameters=numel, weights_file=weights, config=cfg)


def process_umask() -> int:
    """The process's file-mode creation mask (e.g. ``0o022``).

    Read from ``/proc/self/status`` where the kernel reports it (Linux >= 4.7); elsewhere it is read by setting
    and restoring it with ``os.umask``, which is briefly visible to other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give ``root`` and everything below it the permission bits a plain ``open`` / ``mkdir`` gets under the
    process umask: files ``0o666 & ~umask``, directories ``0o777 & ~umask`` (``0o644`` / ``0o755`` under the usual
    ``0o022``; ``0o600`` / ``0o700`` under ``0o077``).

    Libraries write some files privately whatever the umask (``tempfile.mkdtemp`` makes ``0o700`` directories,
    safetensors writes ``0o600`` files), so an adapter or checkpoint would be unreadable to a server running as
    another user (as in the Docker image). Symbolic links are left alone.

    Raises:
        OSError: a path cannot be changed (e.g. it belongs to another user).
    """
    mask = process_umask()
    root = Path(root)
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by calling ``fill(tmp)`` on a fresh temporary sibling and renaming it into place.

    A failure (or a crash) inside ``fill`` leaves no ``target``; only a ``.<name>.tmp-*`` sibling may remain after a
    hard kill, which ``remove_stale_temps`` deletes. The directory and its files get the process umask's modes
    (``apply_umask_modes``).

    Raises:
        AlreadyExists: ``target`` exists.
    """
    target = Path(target)
    if target.exists():
        raise AlreadyExists(f"{target} exists", field="output_dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        apply_umask_modes(tmp)  # mkdtemp and safetensors write privately; the adapter is meant for the server
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def remove_stale_temps(target: Path) -> None:
    """Delete leftovers of interrupted ``write_atomically(target, ...)`` calls."""
    target = Path(target)
    if target.parent.is_dir():
        for p in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def model_card(adapter_id: str, base_model: str, data_sha256: str, eval_sha256: str | None,
               hyperparameters: dict[str, Any], results: dict[str, Any]) -> str:
    """A short README.md for the adapter directory (Hugging Face model-card front matter + tables)."""
    def rows(d: dict[str, Any]) -> str:
        return "\n".join(f"| {k} | {v} |" for k, v in d.items())

    data_lines = f"- training data sha256: `{data_sha256}`\n"
    if eval_sha256:
        data_lines += f"- held-out data sha256: `{eval_sha256}`\n"
    return (
        "---\n"
        f"base_model: {base_model}\n"
        "library_name: peft\n"
        "tags:\n- lora\n- qlora\n- qlora-server\n"
        "---\n\n"
        f"# {adapter_id}\n\n"
        f"LoRA adapter for `{base_model}` trained with QLoRA (NF4 base, double quantization) by qlora-server's "
        "trainer. Load it with `peft.PeftModel.from_pretrained(base_model, this_directory)`.\n\n"
        f"## Data\n\n{data_lines}\n"
        f"## Results\n\n| metric | value |\n|---|---|\n{rows(results)}\n\n"
        f"## Hyperparameters\n\n| name | value |\n|---|---|\n{rows(hyperparameters)}\n"
    )
