"""Tests of server.adapters.store.AdapterStore: registration, replace, failure atomicity, persistence, events."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from server.adapters.store import VERSION_FILE, AdapterStore
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.tiny import edit_config

WEIGHTS = "adapter_model.safetensors"
FILES = {"adapter_config.json", WEIGHTS, "qlora_server.json"}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` → its bytes (None for a directory): equal trees are byte-identical. The version
    counter is left out: a failed change may use up a version number (versions need only increase)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))
            if p.name != VERSION_FILE}


def hidden(root: Path) -> list[str]:
    """Dot-named entries of ``root`` (staging / moved-aside directories), the version counter excepted."""
    return [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != VERSION_FILE]


@pytest.fixture
def store(tmp_path, spec) -> AdapterStore:
    return AdapterStore(tmp_path / "store", spec)


@pytest.fixture(scope="module")
def good(adapter) -> Path:
    return adapter(seed=1)


@pytest.fixture(scope="module")
def other(adapter) -> Path:
    """A second valid adapter with different weights and ranks."""
    return adapter(seed=2, r=8, lora_alpha=16, target_modules=["k_proj", "down_proj"])


def test_register_get_list_load(store, good):
    info = store.register("alpha", good)
    assert info.adapter_id == "alpha" and info.module_count == 4 and info.rank == 4
    assert info.path == str(store.root / "alpha")
    assert {p.name for p in (store.root / "alpha").iterdir()} == FILES
    assert (store.root / "alpha" / WEIGHTS).read_bytes() == (good / WEIGHTS).read_bytes()
    meta = json.loads((store.root / "alpha" / "qlora_server.json").read_text())
    assert meta["sha256"] == info.sha256 and meta["registered_at"] == info.registered_at > 0
    assert store.get("alpha") == info
    assert store.list() == [info]
    loaded = store.load("alpha")
    assert loaded.info == info and loaded.version == info.version == 1
    assert set(loaded.modules) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert hidden(store.root) == []


def test_list_sorted(store, good):
    for name in ("b", "a", "c"):
        store.register(name, good)
    assert [i.adapter_id for i in store.list()] == ["a", "b", "c"]


@pytest.mark.parametrize("bad_id", ["", ".hidden", "../escape", "a/b", "x" * 129, "abc\n", "-lead", 7])
def test_invalid_id(store, good, bad_id):
    before = tree(store.root)
    with pytest.raises(InvalidArgument) as info:
        store.register(bad_id, good)
    assert info.value.field == "adapter_id"
    assert tree(store.root) == before


def test_existing_without_replace(store, good, other):
    store.register("alpha", good)
    before = tree(store.root)
    with pytest.raises(AlreadyExists) as info:
        store.register("alpha", other)
    assert info.value.field == "adapter_id"
    assert tree(store.root) == before


def test_replace(store, good, other):
    events = []
    store.subscribe(lambda *e: events.append(e))
    old = store.register("alpha", good)
    new = store.register("alpha", other, replace=True)
    assert new.sha256 != old.sha256 and new.rank == 8
    assert (store.root / "alpha" / WEIGHTS).read_bytes() == (other / WEIGHTS).read_bytes()
    assert {p.name for p in (store.root / "alpha").iterdir()} == FILES
    assert hidden(store.root) == []  # the old copy is gone
    assert store.load("alpha").version == new.version == old.version + 1
    assert set(store.load("alpha").modules) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                                for m in ("self_attn.k_proj", "mlp.down_proj")}
    assert events == [("alpha", "registered"), ("alpha", "replaced")]


def test_replace_absent_registers(store, good):
    events = []
    store.subscribe(lambda *e: events.append(e))
    store.register("alpha", good, replace=True)
    assert events == [("alpha", "registered")]


def broken_copies(tmp_path, good):
    """Invalid adapters: DoRA-flagged config, truncated weights, garbage weights, missing weights, pickle only."""
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    dora = edit_config(copy("dora"), use_dora=True)
    truncated = copy("truncated")
    (truncated / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:-7])
    garbage = copy("garbage")
    (garbage / WEIGHTS).write_bytes(os.urandom(2048))
    missing = copy("missing")
    (missing / WEIGHTS).unlink()
    pickled = copy("pickled")
    torch.save({}, pickled / "adapter_model.bin")
    (pickled / WEIGHTS).unlink()
    return {"dora": dora, "truncated": truncated, "garbage": garbage, "missing": missing, "pickled": pickled}


@pytest.mark.parametrize("kind", ["dora", "truncated", "garbage", "missing", "pickled"])
@pytest.mark.parametrize("replace", [False, True])
def test_failed_registration_leaves_store_identical(tmp_path, store, good, kind, replace):
    store.register("alpha", good)
    source = broken_copies(tmp_path, good)[kind]
    before, events = tree(store.root), []
    store.subscribe(lambda *e: events.append(e))
    with pytest.raises(InvalidArgument):
        store.register("alpha" if replace else "beta", source, replace=replace)
    assert tree(store.root) == before
    assert [i.adapter_id for i in store.list()] == ["alpha"] and events == []
    assert store.load("alpha").version == store.get("alpha").version


def test_missing_source(store, tmp_path):
    with pytest.raises(InvalidArgument) as info:
        store.register("alpha", tmp_path / "nowhere")
    assert info.value.field == "path"
    assert tree(store.root) == {}


def test_failure_while_renaming_into_place(store, good, other, monkeypatch):
    store.register("alpha", good)
    before = tree(store.root)
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp-") and Path(dst).name == "alpha":
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk on fire"):
        store.register("alpha", other, replace=True)
    monkeypatch.undo()
    assert tree(store.root) == before
    assert store.load("alpha").version == store.get("alpha").version >= 1


def test_register_files_moves_and_consumes(store, good):
    staged = store.new_staging_dir()
    for name in ("adapter_config.json", WEIGHTS):
        shutil.copy(good / name, staged / name)
    (staged / "README.md").write_text("extra")
    info = store.register_files("up", staged)
    assert not staged.exists()
    assert {p.name for p in (store.root / "up").iterdir()} == FILES
    assert store.load("up").version == info.version
    assert hidden(store.root) == []


def test_register_files_failure_consumes_staging(store, tmp_path, good):
    staged = tmp_path / "staged"
    shutil.copytree(good, staged)
    edit_config(staged, modules_to_save=["lm_head"])
    with pytest.raises(InvalidArgument) as info:
        store.register_files("up", staged)
    assert info.value.field == "modules_to_save"
    assert not staged.exists() and tree(store.root) == {}


def test_register_files_from_symlinked_dir_copies(store, tmp_path, good):
    link = tmp_path / "link"
    link.symlink_to(good, target_is_directory=True)
    store.register_files("up", link)
    assert not (store.root / "up").is_symlink() and not (store.root / "up" / WEIGHTS).is_symlink()
    assert (good / WEIGHTS).exists()  # the link's target is not touched


def test_source_extra_files_not_copied(store, tmp_path, good):
    source = tmp_path / "src"
    shutil.copytree(good, source)
    (source / "README.md").write_text("hi")
    (source / "adapter_model.bin").write_bytes(b"pickle")
    store.register("alpha", source)
    assert {p.name for p in (store.root / "alpha").iterdir()} == FILES


def test_unregister(store, good):
    events = []
    store.register("alpha", good)
    store.subscribe(lambda *e: events.append(e))
    store.unregister("alpha")
    assert not (store.root / "alpha").exists() and hidden(store.root) == []
    assert events == [("alpha", "unregistered")]
    with pytest.raises(NotFound) as info:
        store.get("alpha")
    assert info.value.field == "adapter_id"
    with pytest.raises(NotFound):
        store.load("alpha")
    with pytest.raises(NotFound):
        store.unregister("alpha")
    assert store.list() == []


def test_unsubscribe_and_failing_listener(store, good):
    events = []
    unsubscribe = store.subscribe(lambda *e: events.append(e))

    def broken(*_):
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    store.register("alpha", good)
    unsubscribe()
    store.unregister("alpha")
    assert events == [("alpha", "registered")]


def test_get_missing(store):
    with pytest.raises(NotFound) as info:
        store.get("nope")
    assert info.value.field == "adapter_id"


def test_persists_across_restart(store, spec, good, other):
    a = store.register("alpha", good)
    b = store.register("beta", other)
    store.register("gamma", good)
    store.unregister("gamma")
    again = AdapterStore(store.root, spec)
    assert again.list() == [a, b]
    assert again.load("beta").version == b.version


def test_startup_cleans_leftovers_and_finishes_interrupted_replace(store, spec, good, other):
    a = store.register("alpha", good)
    store.register("beta", other)
    (store.root / ".tmp-0123").mkdir()
    (store.root / ".tmp-0123" / WEIGHTS).write_bytes(b"partial")
    (store.root / ".del-9f-beta").mkdir()
    (store.root / ".upload-x1y2").mkdir()
    # crash after moving alpha aside, before the new copy was renamed in: alpha must come back
    os.rename(store.root / "alpha", store.root / f".old-{'a' * 32}-alpha")
    # crash after the new beta was in place, before the old one was deleted: the old one goes
    shutil.copytree(store.root / "beta", store.root / f".old-{'b' * 32}-beta")
    (store.root / ".gitkeep").write_text("")
    again = AdapterStore(store.root, spec)
    assert [i.adapter_id for i in again.list()] == ["alpha", "beta"] and again.get("alpha") == a
    assert sorted(hidden(store.root)) == [".gitkeep"]


def test_startup_skips_but_keeps_adapters_that_no_longer_validate(store, spec, good, other):
    store.register("alpha", good)
    store.register("wide", other)  # rank 8
    narrow = dataclasses.replace(spec, max_rank=4)
    again = AdapterStore(store.root, narrow)
    assert [i.adapter_id for i in again.list()] == ["alpha"]
    assert (store.root / "wide" / WEIGHTS).exists()
    with pytest.raises(AlreadyExists):  # its directory is still taken
        again.register("wide", good)
    again.register("wide", good, replace=True)
    assert [i.adapter_id for i in again.list()] == ["alpha", "wide"]


def test_startup_skips_tampered_and_unregistered_dirs(store, spec, good, other):
    store.register("alpha", good)
    store.register("beta", good)
    (store.root / "beta" / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    shutil.copytree(good, store.root / "manual")  # no qlora_server.json: never registered
    again = AdapterStore(store.root, spec)
    assert [i.adapter_id for i in again.list()] == ["alpha"]
    assert (store.root / "beta").exists() and (store.root / "manual").exists()


def test_load_detects_changed_weights(store, good, adapter):
    store.register("alpha", good)
    same_shape = adapter(seed=99)
    (store.root / "alpha" / WEIGHTS).write_bytes((same_shape / WEIGHTS).read_bytes())
    with pytest.raises(FailedPrecondition) as info:
        store.load("alpha")
    assert info.value.field == "adapter_id" and "sha256" in str(info.value)


def test_load_detects_deleted_files(store, good):
    store.register("alpha", good)
    (store.root / "alpha" / WEIGHTS).unlink()
    with pytest.raises(FailedPrecondition):
        store.load("alpha")


def test_concurrent_registrations(store, good, other):
    errors = []

    def work(i):
        try:
            store.register(f"id{i}", good if i % 2 else other)
            store.register("shared", good, replace=True)
        except Exception as exc:  # collected: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.adapter_id for i in store.list()] == [f"id{i}" for i in range(6)] + ["shared"]
    assert hidden(store.root) == []
    for info in store.list():
        assert store.load(info.adapter_id).version == info.version


@pytest.mark.parametrize("replace", [False, True])
def test_a_stray_file_in_the_store_is_not_an_adapter(store, good, replace):
    (store.root / "notes.md").write_text("operator's notes")
    with pytest.raises(InvalidArgument) as err:
        store.register("notes.md", good, replace=replace)
    assert err.value.field == "adapter_id"
    assert (store.root / "notes.md").read_text() == "operator's notes"
    assert [a.adapter_id for a in store.list()] == []
