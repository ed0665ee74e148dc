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
from pathlib import Path
from typing import Callable

from server.adapters.types import AdapterInfo, BaseModelSpec, LoadedAdapter
from server.adapters.validation import CONFIG_FILE, WEIGHTS_FILE, find_weights_file, validate_adapter_dir
from server.config import ADAPTER_ID_RE
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServerError

log = logging.getLogger(__name__)

META_FILE = "qlora_server.json"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # an adapter moved aside by a replace: restored at start-up if the new one is not in place
_DEL_PREFIX = ".del-"  # an unregistered adapter being deleted
_UPLOAD_PREFIX = ".upload-"  # upload staging directories the RPC layer makes in root
_OLD_RE = re.compile(r"^\.old-[0-9a-f]{32}-(?P<id>.+)$")

#: ``callback(adapter_id, event)``, event in ``{"registered", "replaced", "unregistered"}``.
Listener = Callable[[str, str], None]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Adapters registered on disk under ``root``, each in ``root/<adapter_id>/`` holding ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``qlora_server.json`` (``registered_at``, ``sha256``, ``size_bytes``).

    Every change is staged in a dot-named directory inside ``root`` and renamed into place, so ``root`` only ever
    holds complete adapters; a failed change leaves it exactly as it was. A new store on the same ``root`` sees the
    same adapters (start-up rescans it, removes leftover staging directories, finishes an interrupted replace, and
    re-validates each adapter against ``base``: one that no longer validates is logged and skipped, not deleted).
    All methods are thread-safe; listeners are called after the change, outside the store's lock.

    Args:
        root: the store's directory (created if absent), e.g. ``adapters/``.
        base: the resident base model every adapter is validated against.
    """

    def __init__(self, root: Path, base: BaseModelSpec) -> None:
        self.root = Path(root)
        self.base = base
        self._lock = threading.Lock()
        self._infos: dict[str, AdapterInfo] = {}
        self._listeners: list[Listener] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and ADAPTER_ID_RE.fullmatch(entry.name):
                try:
                    self._infos[entry.name] = self._read_registered(entry.name)
                except (ServerError, OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("adapter %s in %s is skipped (not deleted): %s", entry.name, self.root, exc)
        log.info("adapter store %s: %d adapters", self.root, len(self._infos))

    # ----------------------------------------------------------------------------------------------- queries

    def get(self, adapter_id: str) -> AdapterInfo:
        """The registered adapter's info. Raises: NotFound (``field="adapter_id"``)."""
        with self._lock:
            return self._get(adapter_id)

    def list(self) -> list[AdapterInfo]:
        """Every registered adapter, sorted by id."""
        with self._lock:
            return [self._infos[k] for k in sorted(self._infos)]

    def load(self, adapter_id: str) -> LoadedAdapter:
        """Re-read the adapter's weights from disk: ``LoadedAdapter`` with CPU tensors (A ``[r, in]``, B ``[out, r]``).

        Raises:
            NotFound: no such adapter (``field="adapter_id"``).
            FailedPrecondition: its files changed on disk since registration (sha256 differs) or no longer validate.
        """
        with self._lock:
            info = self._get(adapter_id)
            try:
                loaded = validate_adapter_dir(Path(info.path), self.base, adapter_id=adapter_id,
                                              registered_at=info.registered_at)
            except ServerError as exc:
                raise FailedPrecondition(f"stored adapter {adapter_id!r} no longer validates: {exc}",
                                         field="adapter_id") from exc
        if loaded.info.sha256 != info.sha256:
            raise FailedPrecondition(f"weights of adapter {adapter_id!r} changed on disk since registration "
                                     f"(sha256 {loaded.info.sha256[:12]}… != {info.sha256[:12]}…)",
                                     field="adapter_id")
        return LoadedAdapter(info=info, modules=loaded.modules)

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
        with self._lock:
            dest = self.root / adapter_id
            if adapter_id not in self._infos and not (ADAPTER_ID_RE.fullmatch(adapter_id) and dest.is_dir()):
                raise NotFound(f"adapter {adapter_id!r} is not registered", field="adapter_id")
            old = self.root / f"{_DEL_PREFIX}{uuid.uuid4().hex}-{adapter_id}"
            os.rename(dest, old)
            self._infos.pop(adapter_id, None)
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
        """Validate ``staging`` (which this consumes), write its metadata and rename it to ``root/adapter_id``."""
        try:
            loaded = validate_adapter_dir(staging, self.base, adapter_id=adapter_id, registered_at=time.time())
            meta = {"adapter_id": adapter_id, "registered_at": loaded.info.registered_at,
                    "sha256": loaded.info.sha256, "size_bytes": loaded.info.size_bytes}
            (staging / META_FILE).write_text(json.dumps(meta, indent=1))
            for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
                _fsync(staging / name)
            dest = self.root / adapter_id
            info = dataclasses.replace(loaded.info, path=str(dest))
            with self._lock:
                self._check_id(adapter_id, replace)
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
                self._infos[adapter_id] = info
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            try:
                _fsync(self.root)
            except OSError as exc:
                log.warning("cannot fsync %s: %s", self.root, exc)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("adapter %s %s: %d modules, sha256 %s", adapter_id, "replaced" if existed else "registered",
                 info.module_count, info.sha256[:12])
        self._notify(adapter_id, "replaced" if existed else "registered")
        return info

    def _read_registered(self, adapter_id: str) -> AdapterInfo:
        """Validate ``root/adapter_id`` and return its info, with ``registered_at`` from its metadata.

        Raises:
            ServerError / OSError / ValueError / KeyError: missing metadata, a weights file whose sha256 differs from
                the one recorded at registration, or a failed validation.
        """
        path = self.root / adapter_id
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        info = validate_adapter_dir(path, self.base, adapter_id=adapter_id).info
        if info.sha256 != meta["sha256"]:
            raise FailedPrecondition(f"{WEIGHTS_FILE} changed since registration (sha256 differs)", field="weights")
        return dataclasses.replace(info, registered_at=float(meta["registered_at"]))

    def _recover(self) -> None:
        """Remove staging directories and finish replaces/unregisters that a crash interrupted."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith((_TMP_PREFIX, _DEL_PREFIX, _UPLOAD_PREFIX)):
                log.info("removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
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
