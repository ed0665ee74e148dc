"""Two-tier adapter cache: accelerator slots (LRU, pinned while rows use them) backed by host memory (LRU).

Disk → host loads run on a background thread so a cold adapter never stalls the running batch; host →
accelerator copies happen on the engine thread between steps. Entries are keyed by ``(adapter_id, version)``, the
store's registration version: a replaced adapter has a new key even when only its config changed (same weights,
new ``lora_alpha``), so a later request can never be served the old weights or scale, and store events (replace /
unregister) drop the old key from both tiers as soon as no running row uses it. After every slot write the version
is checked again: a replace that arrived during the write leaves that slot stale, never served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from server.adapters.types import LoadedAdapter
from server.errors import NotFound, ServerError
from server.metrics import Metrics
from server.model.lora import LoraBanks

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (adapter_id, the store's registration version)


class AdapterCache:
    """Maps adapters to accelerator slots of the :class:`~server.model.lora.LoraBanks`.

    Only the engine thread calls :meth:`acquire` and :meth:`release`; :meth:`residency` and store events may come
    from any thread.

    Args:
        store: the :class:`~server.adapters.store.AdapterStore` (``get``, ``load``, ``subscribe``).
        banks: owns the slots (``banks.slots`` of them).
        host_capacity: adapters kept in host memory.
        metrics: where hits / misses / loads / evictions / load latency are counted.
    """

    def __init__(self, store, banks: LoraBanks, host_capacity: int, metrics: Metrics) -> None:
        self.store = store
        self.banks = banks
        self.metrics = metrics
        self.host_capacity = host_capacity
        self._lock = threading.Lock()
        self._host: OrderedDict[Key, LoadedAdapter] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[Key, Future] = {}
        self._failed: dict[Key, ServerError] = {}
        self._slot_key: list[Key | None] = [None] * banks.slots
        self._slot_refs = [0] * banks.slots
        self._slot_used = [0.0] * banks.slots  # last use, for LRU among unpinned slots
        self._slot_stale = [False] * banks.slots  # holds a replaced / unregistered adapter: never matched again
        self._disk_loaded: set[Key] = set()  # loaded from disk after a cpu miss, not yet promoted to a slot
        self._generation: dict[str, int] = {}  # bumped on replace / unregister; a load started before is dropped
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        metrics.adapter_slot_capacity.set(banks.slots)
        if hasattr(store, "subscribe"):
            store.subscribe(self._on_store_event)

    # --- any thread -------------------------------------------------------------------------------------
    def current_key(self, adapter_id: str) -> Key:
        """The key ``(adapter_id, version)`` of the adapter's current version. Raises NotFound (field
        ``adapter_id``)."""
        info = self.store.get(adapter_id)
        return (adapter_id, info.version)

    def residency(self, adapter_id: str) -> str:
        """``"gpu"`` (in an accelerator slot — the CPU when that is the device), ``"cpu"`` (host memory) or
        ``"disk"`` for the adapter's current version."""
        try:
            key = self.current_key(adapter_id)
        except NotFound:
            return "disk"
        with self._lock:
            if self._live_slot(key) is not None:
                return "gpu"
            if key in self._host:
                return "cpu"
        return "disk"

    def _on_store_event(self, adapter_id: str, event: str) -> None:
        if event in ("replaced", "unregistered"):
            self._drop(adapter_id)
        if event in ("registered", "replaced"):
            self._prefetch(adapter_id)

    def _prefetch(self, adapter_id: str) -> None:
        """Start loading a just-registered version into host memory (the store hands over the tensors its
        registration validated), so the first request for it only waits for the slot write."""
        try:
            key = self.current_key(adapter_id)
        except NotFound:
            return
        with self._lock:
            if key in self._host or key in self._loading:
                return
            self._loading[key] = self._pool.submit(self._load_from_disk, key, self._generation.get(adapter_id, 0),
                                                   True)

    def _drop(self, adapter_id: str) -> None:
        """Forget every cached version of ``adapter_id`` (replaced or unregistered)."""
        with self._lock:
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            for key in [k for k in self._host if k[0] == adapter_id]:
                del self._host[key]
                self.metrics.adapter_evictions.labels("cpu").inc()
            for slot, key in enumerate(self._slot_key):
                if key is not None and key[0] == adapter_id:
                    self._slot_stale[slot] = True  # cleared on the engine thread once no row uses it
            self._failed = {k: v for k, v in self._failed.items() if k[0] != adapter_id}
            self._disk_loaded = {k for k in self._disk_loaded if k[0] != adapter_id}
        self._update_gauges()

    # --- engine thread ----------------------------------------------------------------------------------
    def acquire(self, key: Key) -> int | None:
        """Pin ``key`` in an accelerator slot and return the slot, or None when it is not ready yet (a disk load
        was started or is running, or every slot is pinned). Call again on a later step.

        Raises:
            ServerError: the background load failed (e.g. the files changed on disk), or the adapter is gone.
        """
        with self._lock:
            slot = self._live_slot(key)
            if slot is not None:
                self._pin(slot)
                self.metrics.adapter_cache_hits.labels("gpu").inc()
                return slot
            error = self._failed.pop(key, None)
            if error is not None:
                self._disk_loaded.discard(key)
                raise error
            adapter = self._host.get(key)
            if adapter is None:
                if key not in self._loading:
                    self.metrics.adapter_cache_misses.labels("cpu").inc()
                    self._disk_loaded.add(key)
                    generation = self._generation.get(key[0], 0)
                    self._loading[key] = self._pool.submit(self._load_from_disk, key, generation)
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self._host.move_to_end(key)
            # One lookup counts once per tier: a gpu miss when the slot is filled, and a cpu hit only when the
            # host copy was not loaded from disk for this very miss (that lookup already counted a cpu miss).
            self.metrics.adapter_cache_misses.labels("gpu").inc()
            if key in self._disk_loaded:
                self._disk_loaded.discard(key)
            else:
                self.metrics.adapter_cache_hits.labels("cpu").inc()
            if self._slot_key[slot] is not None:
                self.metrics.adapter_evictions.labels("gpu").inc()
            # The slot holds ``key`` from now on, while it is written: a store event during the write marks it stale.
            self._slot_key[slot] = key
            self._slot_stale[slot] = False
            self._pin(slot)  # nobody else may take it while it is being written
        start = time.perf_counter()
        try:
            self.banks.load(slot, adapter)  # engine thread, between steps: no row reads the slot now
        except BaseException:
            with self._lock:
                self._slot_refs[slot] -= 1
                self._slot_key[slot] = None
                self._slot_stale[slot] = False
            raise
        self.metrics.adapter_load_latency.labels("gpu").observe(time.perf_counter() - start)
        self.metrics.adapter_loads.labels("gpu").inc()
        if not self._still_current(key, slot):  # replaced / unregistered during the write: never serve it
            self.release(slot)
            self._update_gauges()
            return None
        self._update_gauges()
        return slot

    def release(self, slot: int) -> None:
        """Unpin one use of ``slot``; a stale (replaced / unregistered) adapter's slot is cleared when unused."""
        with self._lock:
            self._slot_refs[slot] -= 1
            clear = self._slot_refs[slot] == 0 and self._slot_stale[slot]
            if clear:
                self._slot_key[slot] = None
                self._slot_stale[slot] = False
                self.metrics.adapter_evictions.labels("gpu").inc()
        if clear:
            self.banks.clear(slot)  # free the memory's contents; the bank itself is preallocated
            self._update_gauges()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- internals --------------------------------------------------------------------------------------
    def _still_current(self, key: Key, slot: int) -> bool:
        """After writing ``key`` into ``slot``: whether it is still the adapter's current version. When it is not
        (a store event marked the slot stale, or the store already has a newer version whose event has not arrived
        yet), the slot is marked stale so no later lookup matches it."""
        try:
            current = self.current_key(key[0])
        except NotFound:
            current = None
        with self._lock:
            if current == key and not self._slot_stale[slot]:
                return True
            self._slot_stale[slot] = True
            return False

    def _pin(self, slot: int) -> None:
        self._slot_refs[slot] += 1
        self._slot_used[slot] = time.monotonic()

    def _live_slot(self, key: Key) -> int | None:
        """The slot holding ``key`` (not stale), if any (lock held)."""
        for slot, k in enumerate(self._slot_key):
            if k == key and not self._slot_stale[slot]:
                return slot
        return None

    def _free_slot(self) -> int | None:
        """An empty or stale slot, else the least recently used unpinned one; None if all are pinned (lock
        held)."""
        candidates = [s for s in range(len(self._slot_key)) if self._slot_refs[s] == 0]
        if not candidates:
            return None
        empty = [s for s in candidates if self._slot_key[s] is None or self._slot_stale[s]]
        return empty[0] if empty else min(candidates, key=lambda s: self._slot_used[s])

    def _load_from_disk(self, key: Key, generation: int, registered: bool = False) -> None:
        """Load ``key`` into the host tier (background thread); ``registered``: a prefetch right after its
        registration, which takes the tensors the registration validated when the store still has them."""
        adapter_id, version = key
        start = time.perf_counter()
        error: ServerError | None = None
        adapter = None
        try:
            adapter = (self.store.take_registered(adapter_id) if registered else None) or self.store.load(adapter_id)
        except ServerError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported to the waiting request, never lost
            log.exception("loading adapter %s failed", adapter_id)
            error = ServerError(f"loading adapter {adapter_id!r} failed: {exc}")
        if error is None:
            self.metrics.adapter_load_latency.labels("cpu").observe(time.perf_counter() - start)
            self.metrics.adapter_loads.labels("cpu").inc()
        try:
            current = self.current_key(adapter_id)
        except NotFound:
            current = None
        with self._lock:
            self._loading.pop(key, None)
            if (self._generation.get(adapter_id, 0) != generation or current != key
                    or (adapter is not None and adapter.version != version)):
                # replaced or unregistered while loading: never cache it, and fail nobody: a waiting request
                # looks the adapter up again (NotFound when it is gone)
                self._disk_loaded.discard(key)
                return
            if error is not None:
                self._failed[key] = error
                return
            self._host[key] = adapter
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)
                self.metrics.adapter_evictions.labels("cpu").inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        with self._lock:
            live = sum(k is not None and not stale for k, stale in zip(self._slot_key, self._slot_stale))
            self.metrics.adapters_resident.labels("gpu").set(live)
            self.metrics.adapters_resident.labels("cpu").set(len(self._host))
            self.metrics.component_bytes.labels("adapter_host_cache").set(sum(a.nbytes for a in self._host.values()))
