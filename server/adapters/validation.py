"""Checks a PEFT LoRA adapter directory against the resident base model and reads it into a LoadedAdapter."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from server.adapters.types import AdapterInfo, BaseModelSpec, LoadedAdapter, ModuleLora
from server.errors import InvalidArgument
from server.model.base import base_model_basename

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

#: ``adapter_config.json`` keys that are metadata, supported, or ignorable at inference (LoraConfig of PEFT 0.21).
_ACCEPTED_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "use_rslora",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "init_lora_weights",
    "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    # Only initialisation recipes, the saved weights already include their effect:
    "eva_config", "corda_config", "lora_ga_config",
    # PEFT forces it off for nn.Linear targets (the only routable kind); the shape checks catch a transposed adapter.
    "fan_in_fan_out",
})

#: LoraConfig features that change the forward pass and that the routed banks cannot reproduce: refused by name
#: whenever their value is not the default (None / False / empty).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: weight-decomposed LoRA with a magnitude vector)",
    "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "trainable_token_indices": "trainable_token_indices (trained rows of the token embedding)",
    "target_parameters": "target_parameters (LoRA on raw nn.Parameters, e.g. MoE experts)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora: pooled-input LoRA)",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication (a re-stacked base model)",
    "megatron_config": "Megatron parallel LoRA layers (megatron_config)",
    "loftq_config": "LoftQ (loftq_config: the adapter expects a LoftQ-requantized base)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config: sampled LoRA factors)",
    "use_bdlora": "BD-LoRA (use_bdlora: block-diagonal factors)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config: truncated base weight plus a singular-value diagonal)",
}

#: ``init_lora_weights`` values whose recipe rewrites the base weight (W_res = W - scale·B A): the saved factors
#: only make sense against that modified base unless PEFT converted them to plain LoRA when saving.
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")


def _refuse(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, field=field)


def find_weights_file(path: Path) -> Path:
    """Check that ``path`` holds an adapter's two files and return the path of its safetensors weights.

    Raises:
        InvalidArgument: ``field="path"`` (not a directory), ``"adapter_config.json"`` (absent) or ``"weights"``
            (no ``adapter_model.safetensors``, only pickle weights, or an empty file). Pickle files are never read.
    """
    path = Path(path)
    if not path.is_dir():
        raise _refuse("path", f"adapter directory {str(path)!r} " + ("is not a directory" if path.exists()
                                                                       else "does not exist"))
    if not (path / CONFIG_FILE).is_file():
        raise _refuse(CONFIG_FILE, f"{CONFIG_FILE} is missing from {str(path)!r}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise _refuse("weights", f"{str(path)!r} holds only pickle weights ({pickles[0]}); pickle files are "
                                     f"never loaded (they can run code): re-save with safe_serialization=True")
        raise _refuse("weights", f"{WEIGHTS_FILE} is missing from {str(path)!r}")
    if weights.stat().st_size == 0:
        raise _refuse("weights", f"{WEIGHTS_FILE} in {str(path)!r} is empty")
    return weights


def read_config(path: Path) -> dict:
    """Parse ``adapter_config.json`` of directory ``path`` into a dict.

    Raises:
        InvalidArgument: ``field="adapter_config.json"`` when it is missing, unreadable, not JSON or not an object.
    """
    try:
        data = (Path(path) / CONFIG_FILE).read_bytes()
    except OSError as exc:
        raise _refuse(CONFIG_FILE, f"cannot read {CONFIG_FILE} in {str(path)!r}: {exc}") from exc
    return parse_config(data, str(path))


def parse_config(data: bytes, source: str = "") -> dict:
    """Parse the bytes of an ``adapter_config.json`` (UTF-8 JSON object) into a dict; ``source`` names where it
    came from in the message.

    Raises:
        InvalidArgument: ``field="adapter_config.json"`` when it is not UTF-8 JSON or not an object.
    """
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(CONFIG_FILE, f"cannot read {CONFIG_FILE} in {source!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise _refuse(CONFIG_FILE, f"{CONFIG_FILE} must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_config(cfg: dict, base: BaseModelSpec) -> None:
    """Refuse an ``adapter_config.json`` (as a dict) that is not plain LoRA for ``base``; see the module's rules.

    Raises:
        InvalidArgument: ``field`` is the offending config key (``peft_type``, ``base_model_name_or_path``, ``r``,
            ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``bias``, ``init_lora_weights``,
            or the name of an unsupported feature such as ``use_dora``).
    """
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise _refuse("peft_type", f"peft_type is {peft_type!r}; only LORA adapters are served")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise _refuse(key, f"{what} is not supported by this server")
    if cfg.get("bias", "none") != "none":
        raise _refuse("bias", f"bias={cfg['bias']!r} (trained base-layer biases) is not supported; only 'none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise _refuse("init_lora_weights", f"init_lora_weights={init!r} trains against a modified base weight; "
                                           f"convert it to plain LoRA with PEFT's save_pretrained("
                                           f"path_initial_model_for_weight_conversion=...) first")
    for key, value in cfg.items():
        if key not in _ACCEPTED_KEYS and key not in _UNSUPPORTED and value:
            raise _refuse(key, f"unknown LoRA config field {key}={value!r} (a newer PEFT feature?) is not supported")

    name = cfg.get("base_model_name_or_path")
    if name:
        if not isinstance(name, str):
            raise _refuse("base_model_name_or_path", f"must be a string, got {name!r}")
        if base_model_basename(name) != base_model_basename(base.name):
            raise _refuse("base_model_name_or_path", f"adapter was trained for {name!r}, but the server's base "
                                                     f"model is {base.name!r}")
    if not _is_rank(cfg.get("r")):
        raise _refuse("r", f"r must be a positive integer, got {cfg.get('r')!r}")
    if not _is_number(cfg.get("lora_alpha")):
        raise _refuse("lora_alpha", f"lora_alpha must be a finite number, got {cfg.get('lora_alpha')!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise _refuse("use_rslora", f"use_rslora must be true or false, got {cfg.get('use_rslora')!r}")
    for key, ok, what in (("rank_pattern", _is_rank, "positive integers"),
                          ("alpha_pattern", _is_number, "finite numbers")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise _refuse(key, f"{key} must map module names or regexes to {what}, got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as exc:
                raise _refuse(key, f"{key} key {k!r} is not a valid regex: {exc}") from exc


def _matcher(cfg: dict, target_modules, *, scoped: bool) -> SimpleNamespace:
    """A config-like object for PEFT's ``check_target_module_exists``; unscoped ignores exclusions and layer filters."""
    return SimpleNamespace(
        target_modules=target_modules, modules_to_save=None, target_parameters=None,
        exclude_modules=cfg.get("exclude_modules") if scoped else None,
        layers_to_transform=cfg.get("layers_to_transform") if scoped else None,
        layers_pattern=cfg.get("layers_pattern") if scoped else None,
    )


def _describe(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if "embed" in leaf or "wte" in leaf:
        return f"embedding LoRA ({module})"
    if leaf in ("lm_head", "output", "embed_out"):
        return f"LoRA on the LM head ({module})"
    return f"LoRA on non-routable module {module}"


def targeted_modules(cfg: dict, base: BaseModelSpec) -> set[str]:
    """Names of the base-model linear layers ``cfg["target_modules"]`` selects, by PEFT's matching rules.

    A list entry matches a module whose name equals it or ends with ``"." + entry``; a string is a regex that must
    ``re.fullmatch`` the name (``"all-linear"`` means every routable layer); ``exclude_modules``,
    ``layers_to_transform`` and ``layers_pattern`` then narrow the set.

    Raises:
        InvalidArgument: ``field="target_modules"`` when it is missing or malformed, an entry (or the regex) matches no
            module of the base model, or it selects a module that is not a routable linear layer (embedding, LM
            head, norm, container).
    """
    target = cfg.get("target_modules")
    names = sorted(set(base.linear_shapes) | base.other_modules)
    if target == "all-linear":
        target = sorted({n.rsplit(".", 1)[-1] for n in base.linear_shapes})
    if isinstance(target, str) and target:
        try:
            re.compile(target)
        except re.error as exc:
            raise _refuse("target_modules", f"target_modules regex {target!r} is invalid: {exc}") from exc
        if not any(check_target_module_exists(_matcher(cfg, target, scoped=False), n) for n in names):
            raise _refuse("target_modules", f"target_modules regex {target!r} matches no module of {base.name}")
    elif isinstance(target, list) and target and all(isinstance(t, str) and t for t in target):
        for entry in target:
            if not any(check_target_module_exists(_matcher(cfg, [entry], scoped=False), n) for n in names):
                raise _refuse("target_modules", f"target module {entry!r} matches no module of {base.name}")
    else:
        raise _refuse("target_modules", f"target_modules must be a non-empty list of names or a regex string, "
                                        f"got {target!r}")
    matcher = _matcher(cfg, target, scoped=True)
    selected = {n for n in names if check_target_module_exists(matcher, n)}
    bad = sorted(selected & base.other_modules)
    if bad:
        raise _refuse("target_modules", f"{_describe(bad[0])} is not supported; only the decoder's linear layers "
                                        f"can be adapted (non-routable targets: {bad[:5]})")
    return selected


def module_rank_alpha(cfg: dict, module: str) -> tuple[int, float, bool]:
    """``(r, alpha, from_pattern)`` of ``module`` as PEFT's ``LoraModel`` picks them (``get_pattern_key`` lookups
    of ``rank_pattern`` / ``alpha_pattern``, else the defaults); ``from_pattern`` says whether a rank pattern applied."""
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r_key = get_pattern_key(list(ranks), module)
    alpha = alphas.get(get_pattern_key(list(alphas), module), cfg["lora_alpha"])
    return int(ranks.get(r_key, cfg["r"])), float(alpha), r_key in ranks


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's ``scaling``: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r`` (dimensionless)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _refuse_key(key: str) -> InvalidArgument:
    """The refusal for a tensor key that is not ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    if "lora_magnitude_vector" in key:
        return _refuse("use_dora", f"tensor {key!r} is a DoRA magnitude vector; DoRA is not supported")
    if "lora_embedding_" in key:
        return _refuse("target_modules", f"tensor {key!r} is embedding LoRA, which is not supported")
    if "trainable_tokens" in key or "token_adapter" in key:
        return _refuse("trainable_token_indices", f"tensor {key!r} holds trainable tokens, which are not supported")
    if "modules_to_save" in key:
        return _refuse("modules_to_save", f"tensor {key!r} belongs to modules_to_save, which is not supported")
    if re.search(r"\.lora_[AB]\.bias$", key):
        return _refuse("lora_bias", f"tensor {key!r} is a LoRA bias (lora_bias), which is not supported")
    if key.endswith(".bias"):
        return _refuse("bias", f"tensor {key!r} is a trained base-layer bias, which is not supported")
    if ".lora_" not in key and "embed" in key:
        return _refuse("target_modules", f"tensor {key!r} is a full embedding weight (saved with embedding LoRA), "
                                         f"which is not supported")
    if ".lora_" not in key:
        return _refuse("modules_to_save", f"tensor {key!r} is a full base-model weight (modules_to_save?), "
                                          f"which is not supported")
    return _refuse("weights", f"unexpected tensor {key!r}: only <module>.lora_A.weight / lora_B.weight are served")


def check_adapter_config(cfg: dict, base: BaseModelSpec) -> dict[str, tuple[int, float]]:
    """Everything the registry checks about an adapter's ``adapter_config.json`` (as a dict), without its weights:
    the rules of :func:`check_config`, the target modules (:func:`targeted_modules`), that they select at least one
    routable layer, and every selected module's rank (``rank_pattern`` included) against ``base.max_rank``.

    This is the one config check shared by registration (:func:`validate_adapter`) and by training jobs (a job is
    refused before it trains an adapter that this would refuse).

    Returns:
        Selected module name (``model.layers.0.self_attn.q_proj``) → ``(r, lora_alpha)`` of that module.

    Raises:
        InvalidArgument: ``field`` names the config key, as :func:`check_config` and :func:`targeted_modules` do;
            ``"target_modules"`` when they select no module; ``"r"`` when a module's rank exceeds the server's
            ``max_lora_rank``.
    """
    check_config(cfg, base)
    selected = targeted_modules(cfg, base)
    if not selected:
        raise _refuse("target_modules", f"target_modules {cfg.get('target_modules')!r} (with exclude_modules / "
                                        f"layers_to_transform) select no module of {base.name}")
    out: dict[str, tuple[int, float]] = {}
    for name in sorted(selected):
        r, alpha, from_pattern = module_rank_alpha(cfg, name)
        if r > base.max_rank:
            raise _refuse("r", f"{name} has rank {r}" + (" (from rank_pattern)" if from_pattern else "")
                          + f", above the server's max_lora_rank {base.max_rank}")
        out[name] = (r, alpha)
    return out


def parse_factors(data: bytes, source: str = WEIGHTS_FILE) -> dict[str, dict[str, torch.Tensor]]:
    """Parse the bytes of a PEFT safetensors file into ``module name -> {"lora_A": [r, in], "lora_B": [out, r]}``
    (CPU tensors, stored dtype); the ``base_model.model.`` prefix PEFT adds is stripped.

    Raises:
        InvalidArgument: truncated or corrupt file (``field="weights"``), no tensors (``"weights"``), or a tensor of
            an unsupported feature (named by the feature's config key, e.g. ``use_dora``).
    """
    try:
        tensors = load_safetensors(bytes(data))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _refuse("weights", f"{source} is truncated or not a safetensors file: {exc}") from exc
    if not tensors:
        raise _refuse("weights", f"{source} contains no tensors")
    unexpected = [k for k in tensors if _KEY_RE.match(k) is None]
    if unexpected:  # name the feature by its most telling key (a LoRA-variant tensor before a copied base weight)
        raise _refuse_key(min(unexpected, key=lambda k: (".lora_" not in k and "modules_to_save" not in k, k)))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    return factors


def validate_adapter_dir(path: Path, base: BaseModelSpec, *, adapter_id: str = "", registered_at: float = 0.0,
                         version: int = 0) -> LoadedAdapter:
    """Validate the PEFT LoRA adapter in directory ``path`` against ``base`` and load it: reads its two files once
    each and hands them to :func:`validate_adapter`.

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (as PEFT's
            ``save_pretrained`` writes them).
        base: the resident base model's routable layers and ``max_rank``.
        adapter_id, registered_at, version: copied into the returned :class:`AdapterInfo` (the store's key, UNIX
            time and registration version).

    Returns / Raises: as :func:`validate_adapter`; also ``InvalidArgument`` with ``field="path"``,
        ``"adapter_config.json"`` or ``"weights"`` when a file is missing or unreadable.
    """
    path = Path(path)
    weights_path = find_weights_file(path)
    cfg = read_config(path)
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise _refuse("weights", f"cannot read {weights_path}: {exc}") from exc
    return validate_adapter(cfg, data, base, adapter_id=adapter_id, path=str(path), registered_at=registered_at,
                            version=version)


def validate_adapter(cfg: dict, weights: bytes, base: BaseModelSpec, *, adapter_id: str = "", path: str = "",
                     registered_at: float = 0.0, version: int = 0) -> LoadedAdapter:
    """Validate an adapter given as its parsed ``adapter_config.json`` and the bytes of its
    ``adapter_model.safetensors`` against ``base``, and load it. The sha256 and the tensors come from the same
    ``weights`` bytes, so what is hashed is what is served. Pure CPU work, no file I/O: call it without holding
    a lock that serving takes.

    Args:
        cfg: the parsed ``adapter_config.json``.
        weights: the whole safetensors file.
        base: the resident base model's routable layers and ``max_rank``.
        adapter_id, path, registered_at, version: copied into the returned :class:`AdapterInfo`.

    Returns:
        A :class:`LoadedAdapter` whose ``modules`` map base-model module names (``model.layers.0.self_attn.q_proj``)
        to ``ModuleLora(A [r, in], B [out, r], scale)``; tensors on the CPU in their stored float dtype.

    Raises:
        InvalidArgument: anything that PEFT would load differently from ``W x + scale · B A x`` on ``base``'s
            routable layers, with ``field`` naming it: ``adapter_config.json``, ``peft_type``,
            ``base_model_name_or_path``, ``target_modules``, ``r``, ``rank_pattern``, ``lora_alpha``, ``weights``,
            or an unsupported feature's config key (``use_dora``, ``modules_to_save``, ``lora_bias``, ...).
    """
    selected = check_adapter_config(cfg, base)
    factors = parse_factors(weights)

    unknown = sorted(m for m in factors if m not in base.linear_shapes and m not in base.other_modules)
    if len(unknown) == len(factors):
        raise _refuse("weights", f"the weights match zero modules of {base.name} (e.g. {unknown[0]!r}): "
                                 f"adapter for a different architecture?")
    if unknown:
        raise _refuse("weights", f"the weights name modules that {base.name} lacks: {unknown[:5]}")
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[str, ModuleLora] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name in sorted(factors):
        pair = factors[name]
        if name in base.other_modules:
            raise _refuse("target_modules", f"{_describe(name)} is not supported")
        if name not in selected:
            raise _refuse("weights", f"the weights hold {name}, which target_modules does not select")
        if set(pair) != {"lora_A", "lora_B"}:
            have, lack = next(iter(pair)), ({"lora_A", "lora_B"} - set(pair)).pop()
            raise _refuse("weights", f"{name} has {have} but no {lack}")
        A, B = pair["lora_A"], pair["lora_B"]
        if not (A.is_floating_point() and B.is_floating_point()) or A.dim() != 2 or B.dim() != 2:
            raise _refuse("weights", f"{name}: lora_A/lora_B must be 2-D float tensors, got {A.dtype} "
                                     f"{tuple(A.shape)} / {B.dtype} {tuple(B.shape)}")
        in_f, out_f = base.linear_shapes[name]
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise _refuse("weights", f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the base "
                                     f"layer (in_features={in_f}, out_features={out_f}): adapter for another "
                                     f"architecture?")
        r, alpha, from_pattern = module_rank_alpha(cfg, name)
        if A.shape[0] != r or B.shape[1] != r:
            raise _refuse("rank_pattern" if from_pattern else "r",
                          f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} disagree with its configured "
                          f"rank {r}" + (" (from rank_pattern)" if from_pattern else ""))
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise _refuse("weights", f"{name}: lora_A/lora_B contain NaN or infinity")
        modules[name] = ModuleLora(A=A.contiguous(), B=B.contiguous(), scale=lora_scale(r, alpha, use_rslora))
        if r != cfg["r"]:
            ranks[name] = r
        if alpha != float(cfg["lora_alpha"]):
            alphas[name] = alpha

    target = cfg["target_modules"]
    info = AdapterInfo(
        adapter_id=adapter_id,
        base_model=str(cfg.get("base_model_name_or_path") or ""),
        rank=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        target_modules=(target,) if isinstance(target, str) else tuple(target),
        module_count=len(modules),
        use_rslora=use_rslora,
        size_bytes=len(weights),
        sha256=hashlib.sha256(weights).hexdigest(),
        path=path,
        registered_at=registered_at,
        ranks=ranks,
        alphas=alphas,
        version=version,
    )
    return LoadedAdapter(info=info, modules=modules)
