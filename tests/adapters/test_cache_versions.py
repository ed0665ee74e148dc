"""Adapter versions and the cache: no lock held across a load, and a replace (even of the config only) is never
served stale, whatever the interleaving of registrations, disk loads and slot writes."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.adapters import store as store_module
from server.adapters import validation
from server.adapters.cache import AdapterCache
from server.adapters.store import AdapterStore
from server.adapters.types import BaseModelSpec
from server.config import EngineConfig
from server.errors import FailedPrecondition, NotFound
from server.metrics import Metrics
from server.model.runner import StepRow, build_runner
from tests.tiny import TINY_NAME, edit_config, load_nf4

#: Bound of every wait in this file (seconds): liveness only, never a timing check.
WAIT_S = 30.0
R = 4


class FakeRouter:
    """Records what each slot holds: ``(adapter_id, sha256, scale of one module, version)``; ``during_load`` (if set)
    runs while a slot is being written, to inject store changes into the write."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.content: list[tuple[str, str, float, int] | None] = [None] * slots
        self.during_load = None

    def load(self, slot: int, adapter) -> None:
        scale = next(iter(adapter.modules.values())).scale
        self.content[slot] = (adapter.info.adapter_id, adapter.info.sha256, scale, adapter.version)
        if self.during_load is not None:
            hook, self.during_load = self.during_load, None
            hook()

    def clear(self, slot: int) -> None:
        self.content[slot] = None


class DeferredPool:
    """Stands in for the cache's loader thread: submitted loads run only when the test says so, in order."""

    def __init__(self) -> None:
        self.pending: list = []

    def submit(self, fn, *args):
        self.pending.append((fn, args))

    def run_next(self) -> bool:
        if not self.pending:
            return False
        fn, args = self.pending.pop(0)
        fn(*args)
        return True

    def shutdown(self, **_) -> None:
        self.pending.clear()


@pytest.fixture(scope="module")
def variants(adapter, tmp_path_factory) -> dict[str, Path]:
    """Same weights with lora_alpha 8 and 32 (a config-only replace), and other weights with alpha 8."""
    root = tmp_path_factory.mktemp("variants")
    w1 = adapter(seed=11, r=R, lora_alpha=8)
    w1_alpha32 = root / "w1_alpha32"
    shutil.copytree(w1, w1_alpha32)
    edit_config(w1_alpha32, lora_alpha=32)
    return {"w1": w1, "w1_alpha32": w1_alpha32, "w2": adapter(seed=12, r=R, lora_alpha=8)}


def wait_until(cond, what: str) -> None:
    done = threading.Event()
    for _ in range(int(WAIT_S / 0.01)):
        if cond():
            return
        done.wait(0.01)
    pytest.fail(f"timed out waiting for {what}")


# --- 10b: a cold load holds no lock that readers or admission take ------------------------------------------------


@pytest.mark.parametrize("change", ["load", "register", "replace"])
@pytest.mark.parametrize("stage", ["check_config", "parse_factors"])
def test_readers_and_admission_are_not_blocked_by_a_load_or_a_registration(tmp_path, spec, variants, monkeypatch,
                                                                           change, stage):
    """While one adapter is being read and validated (blocked here on an event at ``stage``) by a cold load, a
    registration or a replace, ``get``, ``list``, the cache's residency and the admission of a request for another,
    resident adapter all complete."""
    store = AdapterStore(tmp_path / "store", spec)
    store.register("cold", variants["w1"])
    store.register("warm", variants["w2"])
    cache = AdapterCache(store, FakeRouter(2), host_capacity=4, metrics=Metrics())
    warm_key, warm = cache.current_key("warm"), []
    wait_until(lambda: warm.append(cache.acquire(warm_key)) or warm[-1] is not None, "the warm adapter's slot")
    cache.release(warm[-1])

    entered, release = threading.Event(), threading.Event()
    real = getattr(validation, stage)

    def blocking(*args, **kwargs):
        entered.set()
        assert release.wait(WAIT_S), "the test never released the load"
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, stage, blocking)
    writer = None
    try:
        if change == "load":
            assert cache.acquire(cache.current_key("cold")) is None  # starts the background load
        else:
            target = "new" if change == "register" else "cold"
            writer = threading.Thread(target=store.register, args=(target, variants["w1_alpha32"]),
                                      kwargs={"replace": change == "replace"}, daemon=True)
            writer.start()
        assert entered.wait(WAIT_S), "the change never started validating"
        results: dict[str, object] = {}

        def readers() -> None:
            results["get"] = store.get("warm").adapter_id
            results["list"] = [a.adapter_id for a in store.list()]
            results["residency"] = cache.residency("warm")
            key = cache.current_key("warm")  # what the engine's admission does, then:
            results["slot"] = cache.acquire(key)

        reader = threading.Thread(target=readers, daemon=True)
        reader.start()
        reader.join(WAIT_S)
        blocked = reader.is_alive()
    finally:
        release.set()
    assert not blocked, f"a reader waited for another adapter's {change}"
    assert results == {"get": "warm", "list": ["cold", "warm"], "residency": "gpu", "slot": warm[-1]}
    if writer is not None:
        writer.join(WAIT_S)
        assert not writer.is_alive()
    else:
        wait_until(lambda: cache.residency("cold") == "cpu", "the cold adapter's load to finish")
    cache.close()


def test_load_reads_the_weights_once(tmp_path, spec, variants, monkeypatch):
    """The sha256 checked against the registry is taken over the very bytes that are parsed: the weights file is
    opened once per load."""
    store = AdapterStore(tmp_path / "store", spec)
    store.register("a", variants["w1"])
    opened: list[str] = []
    real_open = store_module.os.open

    def counting_open(path, flags, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", counting_open)
    loaded = store.load("a")
    assert opened.count(validation.WEIGHTS_FILE) == 1
    assert loaded.version == store.get("a").version


@pytest.mark.parametrize("during", [validation.CONFIG_FILE, validation.WEIGHTS_FILE])
def test_a_load_racing_a_replace_never_mixes_two_versions(tmp_path, spec, variants, monkeypatch, during):
    """A config-only replace lands while ``load`` is between the files it reads: the load either fails as
    "replaced" (the caller looks the adapter up again) or returns one version's config and weights, never the old
    weights under the new config or the reverse."""
    store = AdapterStore(tmp_path / "store", spec)
    old = store.register("a", variants["w1"])
    real_open, fired = store_module.os.open, []

    def open_and_replace(path, flags, *args, **kwargs):
        if Path(path).name == during and not fired:
            fired.append(True)
            store.register("a", variants["w1_alpha32"], replace=True)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", open_and_replace)
    try:
        loaded = store.load("a")
    except FailedPrecondition as exc:
        assert "replaced" in str(exc)
    else:  # read entirely from the old version's directory: the old version, whole
        assert loaded.version == old.version and loaded.info.lora_alpha == 8.0
        assert {m.scale for m in loaded.modules.values()} == {8.0 / R}
    monkeypatch.undo()
    assert fired and store.load("a").info.lora_alpha == 32.0
    assert {m.scale for m in store.load("a").modules.values()} == {32.0 / R}


# --- 10c: versions ------------------------------------------------------------------------------------------------


def test_versions_are_monotonic_and_persist(tmp_path, spec, variants):
    root = tmp_path / "store"
    store = AdapterStore(root, spec)
    a1 = store.register("a", variants["w1"])
    a2 = store.register("a", variants["w1_alpha32"], replace=True)  # config-only change: same sha256
    assert a2.sha256 == a1.sha256 and a2.version > a1.version >= 1
    b = store.register("b", variants["w2"])
    store.unregister("b")
    again = AdapterStore(root, spec)
    assert again.get("a") == a2
    b2 = again.register("b", variants["w2"])  # after an unregister and a restart: never an old number
    assert b2.version > b.version > a2.version


def test_store_from_before_versions_gets_versions(tmp_path, spec, variants):
    """Adapters registered by a server without versions get one at start-up, recorded, and later ones go above."""
    import json

    root = tmp_path / "store"
    store = AdapterStore(root, spec)
    store.register("a", variants["w1"])
    store.register("b", variants["w2"])
    for name in ("a", "b"):  # as the metadata looked before
        meta_path = root / name / "qlora_server.json"
        meta = json.loads(meta_path.read_text())
        del meta["version"]
        meta_path.write_text(json.dumps(meta))
    (root / store_module.VERSION_FILE).unlink()
    again = AdapterStore(root, spec)
    versions = {i.adapter_id: i.version for i in again.list()}
    assert sorted(versions.values()) == [1, 2]
    assert AdapterStore(root, spec).list() == again.list()  # recorded: the same after another restart
    assert again.register("c", variants["w1"]).version == 3


def test_alpha_only_replace_during_a_slot_write_is_served_with_the_new_scale(tmp_path, base_dir, variants):
    """A replace that changes only lora_alpha (8 → 32) lands while the old version is being written into a slot:
    that slot is never served, and the next request gets the new scale — its logits equal PEFT's with alpha 32."""
    model = load_nf4(base_dir)
    runner = build_runner(model, EngineConfig(adapter_slots=2, max_lora_rank=16, max_batch_size=2), torch.float32, 128)
    router = runner.banks
    spec = BaseModelSpec.from_model(model, TINY_NAME, max_rank=16)
    store = AdapterStore(tmp_path / "store", spec)
    store.register("x", variants["w1"])
    cache = AdapterCache(store, router, host_capacity=4, metrics=Metrics())
    real_load, calls = router.load, []

    def load_and_replace(slot, adapter):
        real_load(slot, adapter)
        calls.append(adapter.version)
        if len(calls) == 1:  # the first write is of the old version: the replace arrives before it is done
            store.register("x", variants["w1_alpha32"], replace=True)

    router.load = load_and_replace
    old_key = cache.current_key("x")
    slot = None
    for _ in range(int(WAIT_S / 0.01)):  # the request admitted before the replace
        slot = cache.acquire(old_key)
        if slot is not None or len(calls) == 1:
            break
        threading.Event().wait(0.01)
    assert len(calls) == 1, "the old version was never written into a slot"
    assert slot is None, "a slot written while a replace arrived was handed out"

    new_key = cache.current_key("x")  # a request admitted after the replace
    assert new_key != old_key
    slot = None
    for _ in range(int(WAIT_S / 0.01)):
        slot = cache.acquire(new_key)
        if slot is not None:
            break
        threading.Event().wait(0.01)
    assert slot is not None, "the new version never reached a slot"

    ids = torch.randint(1, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = runner.prefill([StepRow(tuple(ids), 0, (1,), slot)])
    ours = logits[0].float()
    want, old = peft_logits(base_dir, variants["w1_alpha32"], ids), peft_logits(base_dir, variants["w1"], ids)
    error = (ours - want).abs().max().item()
    effect = (want - old).abs().max().item()
    assert error < 0.05 * want.abs().max().item(), f"served logits differ from PEFT alpha 32 by {error}"
    assert effect > 20 * error, f"alpha 8 and 32 are not told apart (effect {effect}, error {error})"
    cache.release(slot)
    cache.close()


def peft_logits(base_dir, adapter_dir, ids: list[int]) -> torch.Tensor:
    """Reference: PEFT's PeftModel on the same NF4 base, last position's logits ``[V]`` (float32)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_nf4(base_dir), str(adapter_dir)).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


# --- 10c: every interleaving --------------------------------------------------------------------------------------

IDS = ("a", "b")
VARIANTS = ("w1", "w1_alpha32", "w2")
ALPHA = {"w1": 8.0, "w1_alpha32": 32.0, "w2": 8.0}
change = st.one_of(st.tuples(st.just("replace"), st.sampled_from(IDS), st.sampled_from(VARIANTS)),
                   st.tuples(st.just("unregister"), st.sampled_from(IDS)))
changes = st.lists(change, max_size=2)
#: One round: changes first; requests arrive; an engine step (a disk load starts); the loader reads the adapter
#: with changes landing before it reads the files or after; an engine step with changes landing during the first
#: slot write; another load and step for whoever is still waiting; the running requests finish or keep their slots.
round_ = st.fixed_dictionaries({
    "before": changes, "requests": st.lists(st.sampled_from(IDS), min_size=1, max_size=3),
    "load_point": st.sampled_from(["before_read", "after_read"]), "during_load": changes, "during_write": changes,
    "finish": st.booleans()})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(round_, min_size=1, max_size=4))
@example(rounds=[{"before": [], "requests": ["a"], "load_point": "after_read", "during_load": [],
                  "during_write": [("replace", "a", "w1_alpha32")], "finish": False}])  # alpha-only, during the write
@example(rounds=[{"before": [], "requests": ["a"], "load_point": "after_read",
                  "during_load": [("replace", "a", "w1_alpha32")], "during_write": [], "finish": False}])
def test_no_request_admitted_after_a_change_sees_an_old_version(spec, variants, monkeypatch, rounds):
    """Registrations, replaces (of weights or of the config only), unregisters, disk loads and slot writes in any
    order, with changes injected in the middle of a disk load (before or after it reads the files) and of a slot
    write: whenever the cache hands a request a slot, that slot holds the adapter's current version with that
    version's scale; the cache never fails a request because of a concurrent change."""
    sha256 = {name: hashlib.sha256((path / validation.WEIGHTS_FILE).read_bytes()).hexdigest()
              for name, path in variants.items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore(Path(tmp) / "store", spec)
        router, pool = FakeRouter(2), DeferredPool()
        cache = AdapterCache(store, router, host_capacity=2, metrics=Metrics())
        cache._pool = pool
        registered: dict[str, str] = {}  # id -> the variant registered under it now
        waiting: list[str] = []  # adapter ids of requests not admitted yet
        pinned: list[int] = []  # slots of admitted, running requests

        def apply(op) -> None:
            if op[0] == "replace":
                store.register(op[1], variants[op[2]], replace=True)
                registered[op[1]] = op[2]
            else:
                try:
                    store.unregister(op[1])
                except NotFound:
                    pass
                registered.pop(op[1], None)

        for adapter_id, variant in zip(IDS, ("w1", "w2")):
            apply(("replace", adapter_id, variant))
        load_hooks: dict[str, list] = {"before_read": [], "after_read": []}
        real_read, real_load = store_module._read_files, store.load

        def read_files(*args):
            for op in load_hooks["before_read"]:
                apply(op)
            load_hooks["before_read"] = []
            return real_read(*args)

        def load(adapter_id):
            loaded = real_load(adapter_id)
            for op in load_hooks["after_read"]:
                apply(op)
            load_hooks["after_read"] = []
            return loaded

        def admit(during_write) -> None:
            """One engine step: every waiting request looks its adapter up and tries to get a slot."""
            router.during_load = (lambda ops=during_write: [apply(o) for o in ops])
            for adapter_id in list(waiting):
                try:
                    key = cache.current_key(adapter_id)
                except NotFound:
                    waiting.remove(adapter_id)  # the engine ends it with NOT_FOUND
                    continue
                slot = cache.acquire(key)  # raises on a failed load: never expected here
                if slot is None:
                    continue
                waiting.remove(adapter_id)
                pinned.append(slot)
                assert adapter_id in registered, "a slot was handed out for an unregistered adapter"
                now = registered[adapter_id]
                assert router.content[slot][:3] == (adapter_id, sha256[now], ALPHA[now] / R), "stale slot"
                assert key == (adapter_id, store.get(adapter_id).version) == (adapter_id, router.content[slot][3])
            router.during_load = None

        monkeypatch.setattr(store_module, "_read_files", read_files)
        store.load = load
        try:
            for r in rounds:
                for op in r["before"]:
                    apply(op)
                waiting.extend(r["requests"])
                admit([])
                load_hooks[r["load_point"]] = list(r["during_load"])
                while pool.run_next():
                    load_hooks = {"before_read": [], "after_read": []}
                load_hooks = {"before_read": [], "after_read": []}
                admit(r["during_write"])
                admit([])
                while pool.run_next():
                    pass
                admit([])
                if r["finish"]:
                    while pinned:
                        cache.release(pinned.pop())
                    waiting.clear()
        finally:
            monkeypatch.undo()
            cache.close()


@pytest.mark.parametrize("change", ["replace", "unregister"])
def test_a_load_inside_a_change_in_progress_reports_the_change_not_a_broken_adapter(tmp_path, spec, variants,
                                                                                       monkeypatch, change):
    """A writer renames directories first and updates the registry after. A load that reads in between must say
    "replaced or unregistered" (the cache looks the adapter up again), never "version 2 on disk" or "cannot be
    read" (which would fail the request)."""
    import threading

    store = AdapterStore(tmp_path / "store", spec)
    store.register("a", variants["w1"])
    real_rename = store_module.os.rename
    renamed, release = threading.Event(), threading.Event()

    def rename_then_pause(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        moved_into_place = Path(dst).name == "a" and change == "replace"
        moved_aside = Path(src).name == "a" and change == "unregister"
        if moved_into_place or moved_aside:
            renamed.set()
            assert release.wait(30)

    monkeypatch.setattr(store_module.os, "rename", rename_then_pause)
    writer = threading.Thread(target=(lambda: store.register("a", variants["w1_alpha32"], replace=True))
                              if change == "replace" else (lambda: store.unregister("a")))
    writer.start()
    assert renamed.wait(30)

    class AnnouncingLock:
        """The store's write lock, letting the paused writer go on once the load asks for the lock."""

        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            release.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    store._write_lock = AnnouncingLock(store._write_lock)  # the writer already holds the real one
    outcome = _load_outcome(store)  # inside the change; a load that does not wait fails at once
    release.set()
    writer.join(30)
    assert isinstance(outcome, FailedPrecondition), outcome
    assert "replaced or unregistered" in str(outcome), outcome


def _load_outcome(store):
    try:
        return store.load("a")
    except FailedPrecondition as exc:
        return exc


# --- cold load: a registration warms the host tier with the tensors it validated --------------------------------

def test_a_registration_hands_its_validated_tensors_to_the_cache(tmp_path, spec, variants, monkeypatch):
    """After a registration the cache holds the adapter in host memory without reading its files again, and the
    first request only waits for the slot write; a replace hands over the new version, never the old one."""
    store = AdapterStore(tmp_path / "store", spec)
    banks = FakeRouter(2)
    cache = AdapterCache(store, banks, host_capacity=4, metrics=Metrics())
    opened: list[str] = []
    real_open = store_module.os.open

    def counting_open(path, flags, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    store.register("a", variants["w1"])
    monkeypatch.setattr(store_module.os, "open", counting_open)
    wait_until(lambda: cache.residency("a") == "cpu", "the prefetch into host memory")
    slot = cache.acquire(cache.current_key("a"))
    assert slot is not None and opened.count(validation.WEIGHTS_FILE) == 0
    assert banks.content[slot][3] == store.get("a").version
    cache.release(slot)
    monkeypatch.undo()
    new = store.register("a", variants["w1_alpha32"], replace=True)
    wait_until(lambda: cache.residency("a") == "cpu", "the replaced version's prefetch")
    slot = cache.acquire(cache.current_key("a"))
    assert banks.content[slot][3] == new.version and banks.content[slot][2] == 32 / R  # alpha 32, not 8
    cache.release(slot)
    cache.close()


def test_take_registered_gives_the_current_version_once(tmp_path, spec, variants):
    store = AdapterStore(tmp_path / "store", spec)
    info = store.register("a", variants["w1"])
    taken = store.take_registered("a")
    assert taken is not None and taken.info == info and store.take_registered("a") is None
    store.register("b", variants["w1"])
    store.register("b", variants["w2"], replace=True)
    assert store.take_registered("b").info == store.get("b")  # the replacing version's tensors
    store.register("c", variants["w1"])
    store.unregister("c")
    assert store.take_registered("c") is None
    for i in range(store_module.FRESH_KEEP + 1):
        store.register(f"n{i}", variants["w1"])
    assert store.take_registered("n0") is None  # only the newest FRESH_KEEP are kept
    assert store.take_registered(f"n{store_module.FRESH_KEEP}") is not None
