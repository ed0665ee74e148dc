"""The persistent adapter registry: one validated PEFT LoRA directory per adapter id under a root directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from server.adapters.types import AdapterInfo, BaseModelSpec, LoadedAdapter
from server.adapters.validation import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_weights_file,
    parse_config,
    validate_adapter,
    validate_adapter_dir,
)
from server.config import ADAPTER_ID_RE
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServerError

#: Registrations whose validated tensors are kept for the first load (the adapter cache's prefetch).
FRESH_KEEP = 4
log = logging.getLogger(__name__)

META_FILE = "qlora_server.json"
#: File in the store's root holding the last registration version assigned (``{"last_version": N}``).
VERSION_FILE = ".qlora_server_version.json"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # an adapter moved aside by a replace: restored at start-up if the new one is not in place
_DEL_PREFIX = ".del-"  # an unregistered adapter being deleted
_UPLOAD_PREFIX = ".upload-"  # upload staging directories the RPC layer makes in root
_OLD_RE = re.compile(r"^\.old-[0-9a-f]{32}-(?P<id>.+)$")

#: ``callback(adapter_id, event)``, event in ``{"registered", "replaced", "unregistered"}``.
Listener = Callable[[str, str], None]


def _meta(info: AdapterInfo) -> dict:
    return {"adapter_id": info.adapter_id, "registered_at": info.registered_at, "sha256": info.sha256,
            "size_bytes": info.size_bytes, "version": info.version}


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a sibling temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_files(directory: Path, names: tuple[str, ...]) -> list[bytes]:
    """The bytes of each of ``names`` in ``directory``, all opened through one handle of the directory, so they come
    from the same directory even if it is renamed meanwhile (a replace moves it aside). Raises OSError."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = []
        for name in names:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                out.append(f.read())
        return out
    finally:
        os.close(dir_fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Adapters registered on disk under ``root``, each in ``root/<adapter_id>/`` holding ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``qlora_server.json`` (``registered_at``, ``sha256``, ``size_bytes``,
    ``version``).

    Every change is staged in a dot-named directory inside ``root`` and renamed into place, so ``root`` only ever
    holds complete adapters; a failed change leaves it exactly as it was. A new store on the same ``root`` sees the
    same adapters (start-up rescans it, removes leftover staging directories, finishes an interrupted replace, and
    re-validates each adapter against ``base``: one that no longer validates is logged and skipped, not deleted).

    Versions: every registration (and replace) gets the next number of one counter that only goes up; the last
    one is kept in ``root/.qlora_server_version.json`` (written before the adapter is renamed into place), so a
    version is never reused, not after an unregister nor across restarts.

    Locking: ``_lock`` guards only the in-memory registry and is held for dictionary operations, never across file
    I/O, hashing or validation, so :meth:`get`, :meth:`list` and the engine's admission never wait for a load or a
    registration. Changes are serialized by a second lock that readers never take. All methods are thread-safe;
    listeners are called after the change, outside both locks.

    Args:
        root: the store's directory (created if absent), e.g. ``adapters/``.
        base: the resident base model every adapter is validated against.
    """

    def __init__(self, root: Path, base: BaseModelSpec) -> None:
        self.root = Path(root)
        self.base = base
        self._lock = threading.Lock()  # the registry dict and the listeners; never held across I/O
        self._write_lock = threading.Lock()  # serializes changes and their file I/O; readers never take it
        self._infos: dict[str, AdapterInfo] = {}
        self._listeners: list[Listener] = []
        # The tensors a registration just validated, handed to the first load of that version (no second read of
        # the files); at most FRESH_KEEP of them, oldest dropped first.
        self._fresh: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._last_version = self._read_last_version()
        unversioned: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and ADAPTER_ID_RE.fullmatch(entry.name):
                try:
                    info = self._read_registered(entry.name)
                except (ServerError, OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("adapter %s in %s is skipped (not deleted): %s", entry.name, self.root, exc)
                    continue
                self._infos[entry.name] = info
                self._last_version = max(self._last_version, info.version)
                if info.version <= 0:
                    unversioned.append(entry.name)
        # adapters registered before versions existed get one now, oldest registration first
        for adapter_id in sorted(unversioned, key=lambda a: (self._infos[a].registered_at, a)):
            try:
                self._infos[adapter_id] = self._assign_version(adapter_id)
            except OSError as exc:
                self._infos.pop(adapter_id)
                log.warning("adapter %s in %s is skipped: cannot record its version: %s", adapter_id, self.root, exc)
        log.info("adapter store %s: %d adapters", self.root, len(self._infos))

    # ----------------------------------------------------------------------------------------------- queries

    def get(self, adapter_id: str) -> AdapterInfo:
        """The registered adapter's info (its current ``version``). Raises: NotFound (``field="adapter_id"``)."""
        with self._lock:
            return self._get(adapter_id)

    def list(self) -> list[AdapterInfo]:
        """Every registered adapter, sorted by id."""
        with self._lock:
            return [self._infos[k] for k in sorted(self._infos)]

    def load(self, adapter_id: str) -> LoadedAdapter:
        """Read the adapter's current version from disk: ``LoadedAdapter`` with CPU tensors (A ``[r, in]``, B
        ``[out, r]``) and ``version`` equal to :meth:`get`'s at the call. The files are read once each, without
        holding the registry lock, through one open handle of the adapter's directory, and checked to be that
        version's (its ``qlora_server.json``); the sha256 is taken over the same bytes that are parsed.

        Raises:
            NotFound: no such adapter (``field="adapter_id"``).
            FailedPrecondition: the adapter was replaced or unregistered while loading (the caller may look it up
                again), or its files changed on disk since registration (sha256 differs) or no longer validate
                (``field="adapter_id"``).
        """
        info = self.get(adapter_id)
        try:
            meta_bytes, cfg_bytes, weights = _read_files(Path(info.path), (META_FILE, CONFIG_FILE, WEIGHTS_FILE))
            meta = json.loads(meta_bytes.decode("utf-8"))
            on_disk = int(meta.get("version", 0)) if isinstance(meta, dict) else 0
        except (OSError, ValueError, TypeError) as exc:
            self._raise_if_changed(info)
            raise FailedPrecondition(f"stored adapter {adapter_id!r} cannot be read: {exc}",
                                     field="adapter_id") from exc
        if on_disk != info.version:
            self._raise_if_changed(info)
            raise FailedPrecondition(f"stored adapter {adapter_id!r} is version {on_disk} on disk, expected "
                                     f"{info.version}", field="adapter_id")
        try:
            loaded = validate_adapter(parse_config(cfg_bytes, info.path), weights, self.base,
                                      adapter_id=adapter_id, path=info.path, registered_at=info.registered_at,
                                      version=info.version)
        except ServerError as exc:
            raise FailedPrecondition(f"stored adapter {adapter_id!r} no longer validates: {exc}",
                                     field="adapter_id") from exc
        if loaded.info.sha256 != info.sha256:
            raise FailedPrecondition(f"weights of adapter {adapter_id!r} changed on disk since registration "
                                     f"(sha256 {loaded.info.sha256[:12]}… != {info.sha256[:12]}…)",
                                     field="adapter_id")
        return LoadedAdapter(info=info, modules=loaded.modules)

    def take_registered(self, adapter_id: str) -> LoadedAdapter | None:
        """The tensors the adapter's current version was validated with at registration, once (later calls, and
        versions already superseded or dropped to keep at most ``FRESH_KEEP``, give None). Lets the adapter cache
        warm its host tier after a registration without reading and validating the files a second time."""
        with self._lock:
            fresh = self._fresh.pop(adapter_id, None)
            current = self._infos.get(adapter_id)
        return fresh if fresh is not None and fresh.info == current else None

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(adapter_id, event)`` after every change (event: ``"registered"``, ``"replaced"`` or
        ``"unregistered"``); returns a function that unsubscribes it. A callback's exception is logged, not raised."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    # ----------------------------------------------------------------------------------------------- changes

    def register(self, adapter_id: str, source_dir: Path, replace: bool = False) -> AdapterInfo:
        """Copy the PEFT adapter in ``source_dir`` (only its config and safetensors weights) into the store.

        Raises:
            InvalidArgument: a malformed ``adapter_id`` (``field="adapter_id"``) or an adapter that does not validate
                against the base model (``field`` as :func:`validate_adapter_dir` names it).
            AlreadyExists: ``adapter_id`` is taken and ``replace`` is false.
        """
        self._check_id(adapter_id, replace)
        weights = find_weights_file(Path(source_dir))
        staging = self._new_dir(_TMP_PREFIX)
        try:
            shutil.copyfile(Path(source_dir) / CONFIG_FILE, staging / CONFIG_FILE)
            shutil.copyfile(weights, staging / WEIGHTS_FILE)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._commit(adapter_id, staging, replace)

    def register_files(self, adapter_id: str, staged_dir: Path, replace: bool = False) -> AdapterInfo:
        """Like :meth:`register`, but ``staged_dir`` (e.g. an upload written to :meth:`new_staging_dir`) is moved
        into the store rather than copied. It is consumed: it no longer exists when this returns or raises.

        Raises: as :meth:`register`.
        """
        staged_dir = Path(staged_dir)
        staging = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self._check_id(adapter_id, replace)
            find_weights_file(staged_dir)
            links = staged_dir.is_symlink() or any((staged_dir / n).is_symlink() for n in (CONFIG_FILE, WEIGHTS_FILE))
            try:
                if links:  # never move a link into the store: copy what it points to
                    raise OSError("symlinks are copied")
                os.rename(staged_dir, staging)
            except OSError:  # also: another file system
                staging.mkdir()
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copyfile(staged_dir / name, staging / name)
            for extra in staging.iterdir():
                if extra.name in (CONFIG_FILE, WEIGHTS_FILE):
                    continue
                if extra.is_dir() and not extra.is_symlink():
                    shutil.rmtree(extra)
                else:
                    extra.unlink()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staged_dir, ignore_errors=True)
        return self._commit(adapter_id, staging, replace)

    def new_staging_dir(self) -> Path:
        """A new empty directory inside ``root`` (same file system, removed at start-up if left behind) to write an
        upload into before :meth:`register_files`."""
        return self._new_dir(_TMP_PREFIX)

    def unregister(self, adapter_id: str) -> None:
        """Delete the adapter's directory (also one that was skipped at start-up because it no longer validates).

        Raises:
            NotFound: no such adapter (``field="adapter_id"``).
        """
        with self._write_lock:
            dest = self.root / adapter_id
            with self._lock:
                known = adapter_id in self._infos
            if not known and not (ADAPTER_ID_RE.fullmatch(adapter_id) and dest.is_dir()):
                raise NotFound(f"adapter {adapter_id!r} is not registered", field="adapter_id")
            old = self.root / f"{_DEL_PREFIX}{uuid.uuid4().hex}-{adapter_id}"
            os.rename(dest, old)
            with self._lock:
                self._infos.pop(adapter_id, None)
                self._fresh.pop(adapter_id, None)
        shutil.rmtree(old, ignore_errors=True)
        self._notify(adapter_id, "unregistered")

    # ----------------------------------------------------------------------------------------------- internals

    def _get(self, adapter_id: str) -> AdapterInfo:
        info = self._infos.get(adapter_id)
        if info is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered", field="adapter_id")
        return info

    def _check_id(self, adapter_id: str, replace: bool) -> None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
            raise InvalidArgument(f"{adapter_id!r} must match {ADAPTER_ID_RE.pattern}", field="adapter_id")
        dest = self.root / adapter_id
        if dest.exists() and not dest.is_dir():
            raise InvalidArgument(f"{adapter_id!r} is taken by a file in the store that is not an adapter",
                                  field="adapter_id")
        if dest.exists() and not replace:
            raise AlreadyExists(f"adapter {adapter_id!r} already exists (pass replace to overwrite it)",
                                field="adapter_id")

    def _new_dir(self, prefix: str) -> Path:
        path = self.root / f"{prefix}{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def _commit(self, adapter_id: str, staging: Path, replace: bool) -> AdapterInfo:
        """Validate ``staging`` (which this consumes), give it the next version, write its metadata and rename it
        to ``root/adapter_id``. Only the final dictionary update takes the registry lock."""
        try:
            loaded = validate_adapter_dir(staging, self.base, adapter_id=adapter_id, registered_at=time.time())
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                _fsync(staging / name)
            dest = self.root / adapter_id
            with self._write_lock:
                self._check_id(adapter_id, replace)
                version = self._next_version()
                info = dataclasses.replace(loaded.info, path=str(dest), version=version)
                _write_json(staging / META_FILE, _meta(info))
                with self._lock:
                    existed = adapter_id in self._infos
                old = None
                if dest.exists():
                    old = self.root / f"{_OLD_PREFIX}{uuid.uuid4().hex}-{adapter_id}"
                    os.rename(dest, old)
                try:
                    os.rename(staging, dest)
                except BaseException:
                    if old is not None:
                        os.rename(old, dest)
                    raise
                with self._lock:
                    self._infos[adapter_id] = info
                    self._fresh.pop(adapter_id, None)
                    self._fresh[adapter_id] = LoadedAdapter(info=info, modules=loaded.modules)
                    while len(self._fresh) > FRESH_KEEP:
                        self._fresh.popitem(last=False)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            try:
                _fsync(self.root)
            except OSError as exc:
                log.warning("cannot fsync %s: %s", self.root, exc)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("adapter %s %s: version %d, %d modules, sha256 %s", adapter_id,
                 "replaced" if existed else "registered", info.version, info.module_count, info.sha256[:12])
        self._notify(adapter_id, "replaced" if existed else "registered")
        return info

    def _raise_if_changed(self, info: AdapterInfo) -> None:
        """Raise FailedPrecondition when ``info`` is no longer the adapter's current version (replaced or
        unregistered since it was looked up).

        Only called on a load's error path. It waits for a change in progress (``_write_lock``: a writer renames the
        directories first and updates the registry after), so a load that saw a half-done change is reported as
        "replaced or unregistered" (which the cache retries) rather than as a broken adapter."""
        with self._write_lock, self._lock:
            current = self._infos.get(info.adapter_id)
        if current is None or current.version != info.version:
            raise FailedPrecondition(f"adapter {info.adapter_id!r} was replaced or unregistered while loading "
                                     f"(version {info.version})", field="adapter_id")

    def _read_last_version(self) -> int:
        """The counter in ``VERSION_FILE`` (0 when absent). Raises ValueError / OSError when it is unreadable."""
        try:
            data = json.loads((self.root / VERSION_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        value = data.get("last_version") if isinstance(data, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{self.root / VERSION_FILE} holds no valid last_version: {data!r}")
        return value

    def _next_version(self) -> int:
        """Allocate the next version and persist the counter before it is used (write lock held)."""
        version = self._last_version + 1
        _write_json(self.root / VERSION_FILE, {"last_version": version})
        self._last_version = version
        return version

    def _assign_version(self, adapter_id: str) -> AdapterInfo:
        """Give an adapter registered before versions existed its version, recorded in its metadata (start-up)."""
        info = dataclasses.replace(self._infos[adapter_id], version=self._next_version())
        _write_json(self.root / adapter_id / META_FILE, _meta(info))
        return info

    def _read_registered(self, adapter_id: str) -> AdapterInfo:
        """Validate ``root/adapter_id`` and return its info, with ``registered_at`` and ``version`` from its
        metadata (``version`` 0 when it predates versions).

        Raises:
            ServerError / OSError / ValueError / KeyError: missing metadata, a weights file whose sha256 differs from
                the one recorded at registration, or a failed validation.
        """
        path = self.root / adapter_id
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        info = validate_adapter_dir(path, self.base, adapter_id=adapter_id).info
        if info.sha256 != meta["sha256"]:
            raise FailedPrecondition(f"{WEIGHTS_FILE} changed since registration (sha256 differs)", field="weights")
        version = meta.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"{META_FILE} has an invalid version {version!r}")
        return dataclasses.replace(info, registered_at=float(meta["registered_at"]), version=version)

    def _recover(self) -> None:
        """Remove staging directories and half-written metadata temporaries (``*.json.tmp`` of :func:`_write_json`),
        and finish replaces/unregisters that a crash interrupted."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith((_TMP_PREFIX, _DEL_PREFIX, _UPLOAD_PREFIX)):
                log.info("removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            for tmp in (entry, entry / f"{META_FILE}.tmp"):  # the real file is intact: it is replaced atomically
                if tmp.name in (f"{VERSION_FILE}.tmp", f"{META_FILE}.tmp") and tmp.is_file():
                    log.info("removing leftover %s", tmp)
                    tmp.unlink()
            match = _OLD_RE.fullmatch(entry.name)
            if match is None:
                continue
            dest = self.root / match["id"]
            if dest.exists():  # the new one is in place: finish deleting the old one
                shutil.rmtree(entry, ignore_errors=True)
            else:  # crashed between moving the old one aside and renaming the new one in: restore the old one
                log.warning("restoring adapter %s from an interrupted replace", match["id"])
                os.rename(entry, dest)

    def _notify(self, adapter_id: str, event: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(adapter_id, event)
            except Exception:  # a listener's bug must not undo a committed change
                log.exception("adapter store listener %r failed on %s %s", callback, event, adapter_id)
