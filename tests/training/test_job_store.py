"""JobStore (SQLite) and the manager's restart behaviour, without a model: state machine, order, persistence."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest

from server.config import ModelConfig
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.metrics import Metrics
from server.training.jobs import (
    CANCELLED,
    DB_FILE,
    FAILED,
    INTERRUPTED_ERROR,
    MAX_RESTARTS,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
)
from server.training.manager import TrainingManager, describe_exit


def job(job_id: str, created_at: float, state: str = QUEUED, **kw) -> Job:
    return Job(job_id=job_id, state=state, adapter_id=f"ad-{job_id}", created_at=created_at,
               output_dir=f"/tmp/{job_id}", dataset_path="/data.jsonl", config={"r": 4}, **kw)


def test_nothing_is_written_before_the_first_job(tmp_path):
    store = JobStore(tmp_path / "state" / DB_FILE)
    assert store.list() == [] and store.next_queued() is None and store.count_by_state()[QUEUED] == 0
    assert store.recover_interrupted(now=1.0) == [] and store.journal_mode() is None
    with pytest.raises(NotFound):
        store.get("job-x")
    assert not (tmp_path / "state").exists()
    store.create(job("a", 1.0))
    assert store.journal_mode() == "wal"
    store.close()


def test_rows_round_trip_and_order(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    created = store.create(job("a", 1.0, replace=True))
    assert created == job("a", 1.0, replace=True)
    store.create(job("b", 2.0))
    store.create(job("c", 2.0))  # same instant: insertion order breaks the tie
    assert [j.job_id for j in store.list()] == ["c", "b", "a"]  # newest first
    assert store.next_queued().job_id == "a"  # FIFO
    assert [j.job_id for j in store.active_for_adapter("ad-b")] == ["b"]
    with pytest.raises(FailedPrecondition):
        store.create(job("a", 3.0))
    with pytest.raises(InvalidArgument) as info:
        store.create(job("d", 3.0, state="paused"))
    assert info.value.field == "state"
    store.close()


def test_state_machine(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    store.create(job("a", 1.0))
    with pytest.raises(FailedPrecondition):
        store.transition("a", SUCCEEDED)  # queued cannot succeed without running
    running = store.transition("a", RUNNING, started_at=2.0, pid=123)
    assert running.state == RUNNING and running.started_at == 2.0 and running.pid == 123
    progressed = store.update("a", step=3, total_steps=10, loss=1.5)
    assert (progressed.step, progressed.total_steps, progressed.loss, progressed.eval_loss) == (3, 10, 1.5, None)
    done = store.transition("a", SUCCEEDED, finished_at=3.0)
    assert done.terminal and done.finished_at == 3.0
    for state in (RUNNING, FAILED, CANCELLED, QUEUED):
        with pytest.raises(FailedPrecondition) as info:
            store.transition("a", state)
        assert info.value.field == "job_id"
    with pytest.raises(InvalidArgument) as info:
        store.update("a", adapter_id="other")
    assert info.value.field == "adapter_id"
    with pytest.raises(NotFound):
        store.transition("zzz", RUNNING)
    assert store.count_by_state() == {QUEUED: 0, RUNNING: 0, SUCCEEDED: 1, FAILED: 0, CANCELLED: 0}
    store.close()


def test_a_new_store_sees_the_jobs_and_requeues_the_interrupted_one_first(tmp_path):
    path = tmp_path / DB_FILE
    first = JobStore(path)
    first.create(job("old", 1.0))
    first.transition("old", RUNNING, started_at=1.5)
    first.transition("old", SUCCEEDED, finished_at=2.0)
    first.create(job("mid", 3.0))
    first.transition("mid", RUNNING, started_at=3.5, pid=999999)
    first.update("mid", step=4, total_steps=10, loss=0.5)
    first.create(job("new", 4.0))
    # No close(): the server died. A second connection is what a restarted server opens.
    second = JobStore(path)
    changed = second.recover_interrupted(now=5.0)
    assert [j.job_id for j in changed] == ["mid"]
    mid = second.get("mid")
    assert (mid.state, mid.error, mid.finished_at, mid.step, mid.loss, mid.restarts) == \
        (QUEUED, "", None, 4, 0.5, 1)
    assert second.get("old").state == SUCCEEDED and second.get("new").state == QUEUED  # queued jobs run again
    assert second.next_queued().job_id == "mid"  # created before "new": it keeps its place in the FIFO queue
    assert [j.job_id for j in second.list()] == ["new", "mid", "old"]
    first.close()
    second.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _manager(state_dir, metrics=None) -> TrainingManager:
    store = SimpleNamespace(get=lambda _id: (_ for _ in ()).throw(NotFound("no adapter")), register=None)
    return TrainingManager(store, JobStore(state_dir / DB_FILE), state_dir, metrics,
                           model_config=ModelConfig(model="unused"))


def test_manager_restart_recovers_jobs_and_owns_its_state_dir(tmp_path):
    state = tmp_path / "state"
    store = JobStore(state / DB_FILE)
    store.create(job("done", 1.0))
    store.transition("done", RUNNING)
    store.transition("done", CANCELLED, finished_at=2.0)
    store.create(job("left", 3.0, restarts=MAX_RESTARTS))  # resumed as often as allowed: this time it fails
    store.transition("left", RUNNING, started_at=3.0, pid=999999)
    store.close()

    metrics = Metrics()
    manager = _manager(state, metrics).start()
    try:
        assert manager.get("left").state == FAILED
        assert manager.get("left").error.startswith(f"{INTERRUPTED_ERROR}: interrupted {MAX_RESTARTS + 1} times")
        assert [j.job_id for j in manager.list()] == ["left", "done"]
        assert metrics.registry.get_sample_value("qlora_server_training_jobs", {"state": "failed"}) == 1
        assert metrics.registry.get_sample_value("qlora_server_training_jobs", {"state": "running"}) == 0
        with pytest.raises(FailedPrecondition) as info:
            _manager(state).start()  # a second server on the same state dir
        assert info.value.field == "state_dir"
        with pytest.raises(FailedPrecondition):
            manager.cancel("left")
        events = list(manager.watch("left"))
        assert [e.job.state for e in events] == [FAILED]
    finally:
        manager.close()
    again = _manager(state).start()  # the lock is released by close()
    assert again.get("done").state == CANCELLED
    again.close()


def test_describe_exit(tmp_path):
    assert describe_exit(-9, tmp_path) == f"worker killed by signal 9 (SIGKILL); see {tmp_path / 'worker.log'}"
    assert describe_exit(3, tmp_path).startswith("worker exited with code 3; see ")
    (tmp_path / "error.json").write_text('{"code": "INVALID_ARGUMENT", "message": "dataset: bad", "field": null}')
    assert describe_exit(1, tmp_path) == "INVALID_ARGUMENT: dataset: bad (worker exited with code 1)"
