"""API keys, roles, tenant scopes and allowed paths: plain logic, no gRPC (``server.rpc.auth`` reads the metadata).

A keys file (JSON or YAML) lists who may call the server; it holds SHA-256 hashes of the keys, never the keys::

    keys:
      - name: acme-trainer        # shown in logs instead of the key
        sha256: 9f86d08…          # sha256 of the key (`qlora-server keys hash` prints it)
        role: trainer             # inference | trainer | admin
        scopes: ["acme-"]         # adapter-id prefixes; absent or [] = every adapter
        requests_per_second: 5    # optional per-key limits (``server.ratelimit`` enforces them):
        tokens_per_minute: 20000  #   float > 0, int > 0 and int >= 1 (concurrent Generation RPCs)
        max_concurrent: 2

A scope is a plain string prefix of adapter ids (ids cannot hold ``/``: an adapter is one directory of the store)
and must end with ``-``, ``.`` or ``_``, so ``acme-`` never matches ``acmecorp-x``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from server.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

INFERENCE, TRAINER, ADMIN = "inference", "trainer", "admin"
ROLES = (INFERENCE, TRAINER, ADMIN)
#: The roles each kind of operation allows, for the gRPC methods and the HTTP routes alike.
ANY_ROLE = frozenset(ROLES)  # reading the adapters a key may see: ListAdapters, GetAdapter, GET /v1/models
GENERATE_ROLES = frozenset({INFERENCE, ADMIN})  # Generation RPCs, POST /v1/completions, /v1/chat/completions
TRAIN_ROLES = frozenset({TRAINER, ADMIN})  # registering, uploading, unregistering adapters; training jobs
SCOPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}[-._]$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class KeyLimits:
    """The optional per-key limits of a keys-file entry; None = no such limit."""

    requests_per_second: float | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.requests_per_second, self.tokens_per_minute, self.max_concurrent))


LIMIT_FIELDS = ("requests_per_second", "tokens_per_minute", "max_concurrent")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's ``name`` (for logs), its ``role``, its adapter-id prefixes (empty = all) and its
    rate limits."""

    name: str
    role: str
    scopes: tuple[str, ...] = ()
    limits: KeyLimits = KeyLimits()

    def sees(self, adapter_id: str) -> bool:
        """True when ``adapter_id`` lies inside this principal's scopes (always, for an unscoped key)."""
        return not self.scopes or any(adapter_id.startswith(s) for s in self.scopes)


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key`` (UTF-8) as the keys file stores it. Never raises for a ``str``: a lone surrogate
    (no valid key holds one) is encoded as is rather than failing."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# --- scope checks: the one place every adapter id and job of an RPC is judged ----------------------------------------


def adapter_not_found(adapter_id: str, field: str = "adapter_id") -> NotFound:
    """The very error the store raises for an unknown adapter: an out-of-scope id must look the same."""
    return NotFound(f"adapter {adapter_id!r} is not registered", field=field)


def job_not_found(job_id: str) -> NotFound:
    """The very error the job manager raises for an unknown job id."""
    return NotFound(f"no training job {job_id!r}", field="job_id")


def require_adapter(principal: Principal | None, adapter_id: str, field: str = "adapter_id") -> None:
    """Raise NOT_FOUND (as for a missing adapter) when ``adapter_id`` is outside ``principal``'s scope; None (auth
    off) sees everything."""
    if principal is not None and not principal.sees(adapter_id):
        raise adapter_not_found(adapter_id, field)


def require_job(principal: Principal | None, job):
    """``job`` when its adapter is inside ``principal``'s scope, else NOT_FOUND as for an unknown job id."""
    if principal is not None and not principal.sees(job.adapter_id):
        raise job_not_found(job.job_id)
    return job


def visible(principal: Principal | None, items: Iterable, adapter_id: Callable = lambda x: x.adapter_id) -> list:
    """The ``items`` whose adapter id lies in ``principal``'s scope (all when auth is off)."""
    return [i for i in items if principal is None or principal.sees(adapter_id(i))]


# --- paths ---------------------------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_path(path: str, roots: tuple[Path, ...], *, enforce: bool, field: str) -> Path:
    """The server-side ``path`` a request names, refused unless it lies under one of ``roots``.

    ``path`` and each of ``roots`` are resolved (``..`` and every symlink followed), so ``..``, an absolute path
    elsewhere and a symlink leading out are all refused; so is a directory ``path`` holding an entry that is a
    symlink leading out (an adapter directory whose weights link to ``/etc/shadow``). With no ``roots`` the path
    is refused when ``enforce`` (keys are on: upload only) and returned unchanged otherwise (today's behaviour).

    Returns the resolved path (read that one, not the request's, so a later symlink swap of a parent does not
    matter). Raises :class:`PermissionDenied` naming ``field``; the message never says what exists outside.
    """
    if not roots:
        if enforce:
            raise PermissionDenied("reading server paths is disabled (no --allowed-path); upload instead", field=field)
        return Path(path)
    real = os.path.realpath(path)
    real_roots = [os.path.realpath(r) for r in roots]
    if not any(_inside(real, r) for r in real_roots):
        raise PermissionDenied("is outside the allowed paths", field=field)
    if os.path.isdir(real):
        for name in sorted(os.listdir(real)):
            if not any(_inside(os.path.realpath(os.path.join(real, name)), r) for r in real_roots):
                raise PermissionDenied("holds a link leading outside the allowed paths", field=field)
    return Path(real)


# --- the keys file -------------------------------------------------------------------------------------------------


def _parse_limits(entry: dict, where: str) -> KeyLimits:
    """The :class:`KeyLimits` of a keys-file entry; raises ValueError naming the bad field."""
    rps, tpm, conc = (entry.get(f) for f in LIMIT_FIELDS)
    if rps is not None and (isinstance(rps, bool) or not isinstance(rps, (int, float)) or not math.isfinite(rps)
                            or rps <= 0):
        raise ValueError(f"{where}.requests_per_second: must be a number > 0")
    if tpm is not None and (isinstance(tpm, bool) or not isinstance(tpm, int) or tpm <= 0):
        raise ValueError(f"{where}.tokens_per_minute: must be an integer > 0")
    if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
        raise ValueError(f"{where}.max_concurrent: must be an integer >= 1")
    return KeyLimits(requests_per_second=None if rps is None else float(rps), tokens_per_minute=tpm,
                     max_concurrent=conc)


def _parse_entries(data) -> dict[str, Principal]:
    """``{sha256: Principal}`` of a parsed keys file; raises ValueError naming the bad entry."""
    if isinstance(data, dict):
        data = data.get("keys")
    if not isinstance(data, list):
        raise ValueError("must hold a list 'keys' of {name, sha256, role, scopes}")
    out: dict[str, Principal] = {}
    names: set[str] = set()
    for i, entry in enumerate(data):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping")
        unknown = set(entry) - {"name", "sha256", "role", "scopes", *LIMIT_FIELDS}
        if unknown:
            raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name, digest, role = entry.get("name"), str(entry.get("sha256", "")).lower(), entry.get("role")
        scopes = entry.get("scopes") or []
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{where}.name: must be a unique non-empty string")
        if not _SHA256_RE.fullmatch(digest):
            raise ValueError(f"{where}.sha256: must be 64 hex digits (the SHA-256 of the key, not the key)")
        if digest in out:
            raise ValueError(f"{where}.sha256: the same key is listed twice")
        if role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}")
        if not isinstance(scopes, list) or not all(isinstance(s, str) and SCOPE_RE.fullmatch(s) for s in scopes):
            raise ValueError(f"{where}.scopes: must be a list of adapter-id prefixes ending in '-', '.' or '_'")
        limits = _parse_limits(entry, where)
        names.add(name)
        out[digest] = Principal(name=name, role=role, scopes=tuple(scopes), limits=limits)
    return out


def load_keys_file(path: Path) -> dict[str, Principal]:
    """Parse ``path`` (JSON, or YAML for ``.yaml`` / ``.yml``); raises FailedPrecondition (field
    ``api_keys_file``) saying what is wrong (never echoing a value)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return _parse_entries(data)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{path}: {exc}".splitlines()[0], field="api_keys_file") from None
    except Exception as exc:  # a YAML syntax error
        raise FailedPrecondition(f"{path}: cannot parse ({type(exc).__name__})", field="api_keys_file") from None


class KeyStore:
    """The keys of ``path``, loaded now (FailedPrecondition when the file is bad) and again on :meth:`reload`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries = load_keys_file(self.path)
        self._reload_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> bool:
        """Read the file again; a bad file keeps the keys in force (logged). Returns whether it was replaced."""
        with self._reload_lock:
            try:
                entries = load_keys_file(self.path)
            except FailedPrecondition as exc:
                log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
                return False
            self._entries = entries  # one reference swap: callers see the old set or the new one
        log.info("keys file %s reloaded: %d keys", self.path, len(entries))
        return True

    def resolve(self, key: str | None) -> Principal | None:
        """The principal of ``key``, or None when it is missing or unknown. Every listed hash is compared in
        constant time (``hmac.compare_digest``), so the time taken says nothing about which prefix matched."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for known, principal in self._entries.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def reload_on_sighup(keys: KeyStore) -> Callable[[], None]:
    """Reload ``keys`` (in a thread: no file I/O inside the signal handler) on every SIGHUP; returns a function that
    restores the previous handler. Call from the main thread."""
    def on_hup(signum, frame) -> None:
        threading.Thread(target=keys.reload, name="keys-reload", daemon=True).start()

    previous = signal.signal(signal.SIGHUP, on_hup)
    return lambda: signal.signal(signal.SIGHUP, previous)
