"""Interrupted jobs in the store, without a model: back to the queue in FIFO place, bounded restarts, migration."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import FailedPrecondition
from server.training.jobs import (
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
from tests.training.test_job_store import job as _job




def test_a_version_2_database_gains_the_resume_columns(tmp_path):
    path = tmp_path / DB_FILE
    with sqlite3.connect(path) as raw:  # the schema before resume existed (version 2: with phase)
        raw.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, adapter_id TEXT NOT NULL,
                replace INTEGER NOT NULL, dataset_path TEXT NOT NULL, config TEXT NOT NULL,
                step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, loss REAL, eval_loss REAL,
                error TEXT NOT NULL DEFAULT '', phase TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
                started_at REAL, finished_at REAL, output_dir TEXT NOT NULL, pid INTEGER);
            INSERT INTO jobs (id, state, adapter_id, replace, dataset_path, config, step, phase, created_at,
                              output_dir)
                VALUES ('left', 'running', 'a', 0, '/d.jsonl', '{}', 3, 'training', 1.0, '/o');
            PRAGMA user_version=2;""")
    store = JobStore(path)
    try:
        left = store.get("left")
        assert (left.resumed_from_step, left.restarts, left.step) == (0, 0, 3)
        [recovered] = store.recover_interrupted(now=5.0)  # an old server's interrupted job resumes too
        assert (recovered.job_id, recovered.state, recovered.restarts, recovered.phase) == ("left", QUEUED, 1, "")
        store.transition("left", RUNNING)
        assert store.update("left", resumed_from_step=2).resumed_from_step == 2
    finally:
        store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = {r[1] for r in raw.execute("PRAGMA table_info(jobs)")}
    assert {"resumed_from_step", "restarts"} <= columns


def test_only_a_running_job_can_be_interrupted(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    try:
        store.create(_job("q", 1.0))
        with pytest.raises(FailedPrecondition) as info:
            store.requeue_interrupted("q", now=2.0)
        assert info.value.field == "job_id" and store.get("q").restarts == 0
    finally:
        store.close()


#: One event in a job's life: the scheduler starts it, the server shuts down gracefully while it runs (the manager
#: requeues it), or the server dies while it runs (a new store recovers it).
_EVENTS = st.lists(st.sampled_from(["run", "shutdown", "crash"]), max_size=4 * (MAX_RESTARTS + 2))


@settings(max_examples=60, deadline=None)
@given(_EVENTS)
def test_interruptions_requeue_in_fifo_place_until_the_bound_then_fail(events):
    """Any sequence of runs, graceful shutdowns and crashes: every interruption up to ``MAX_RESTARTS`` puts the job
    back in the queue ahead of a job created after it, counted in ``restarts``; the next one fails it, naming the
    count; it never leaves a terminal state."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DB_FILE
        store = JobStore(path)
        store.create(_job("first", 1.0))
        store.create(_job("later", 2.0))
        interruptions = 0
        try:
            for event in events:
                job = store.get("first")
                if event == "run":
                    if job.state == QUEUED:
                        assert store.next_queued().job_id == "first"  # ahead of the job created after it
                        store.transition("first", RUNNING, phase="loading")
                    continue
                if job.state != RUNNING:
                    continue
                interruptions += 1
                if event == "shutdown":
                    job = store.requeue_interrupted("first", now=10.0)
                else:
                    store.close()  # the server died; a restarted one opens the file again
                    store = JobStore(path)
                    [job] = store.recover_interrupted(now=10.0)
                if interruptions <= MAX_RESTARTS:
                    assert (job.state, job.restarts, job.error, job.finished_at) == (QUEUED, interruptions, "", None)
                else:
                    assert (job.state, job.restarts, job.finished_at) == (FAILED, MAX_RESTARTS, 10.0)
                    assert job.error.startswith(f"{INTERRUPTED_ERROR}: interrupted {interruptions} times")
                    assert job.output_dir in job.error  # where its checkpoints are
                assert store.get("later").state == QUEUED  # the other job is never touched
            final = store.get("first")
            assert final.restarts == min(interruptions, MAX_RESTARTS)
            assert (final.state == FAILED) == (interruptions > MAX_RESTARTS)
        finally:
            store.close()


def test_a_finished_job_is_not_recovered(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    try:
        store.create(_job("done", 1.0))
        store.transition("done", RUNNING)
        store.transition("done", SUCCEEDED, finished_at=2.0)
        assert store.recover_interrupted(now=3.0) == []
        with pytest.raises(FailedPrecondition):
            store.requeue_interrupted("done", now=3.0)
        assert store.get("done").state == SUCCEEDED
    finally:
        store.close()


def test_the_cli_shows_restarts_and_the_resume_step(capsys):
    from server.training.commands import _jobs_list, _watch, job_json
    from server.training.jobs import JobEvent

    resumed = Job(job_id="job-r", state=RUNNING, adapter_id="a", step=5, total_steps=8, phase="training",
                  resumed_from_step=4, restarts=2, created_at=1.0)
    fresh = Job(job_id="job-f", state=QUEUED, adapter_id="b", created_at=2.0)
    done = Job(job_id="job-r", state=SUCCEEDED, adapter_id="a", step=8, total_steps=8, resumed_from_step=4,
               restarts=2, created_at=1.0)
    client = type("Client", (), {"list_training_jobs": lambda self: [fresh, resumed],
                                 "watch_training_job": lambda self, _id: iter([JobEvent(resumed, "step 5/8"),
                                                                               JobEvent(done, "registered")])})()
    assert (job_json(resumed)["resumed_from_step"], job_json(resumed)["restarts"]) == (4, 2)  # jobs get / --json
    _jobs_list(client, type("Args", (), {"json": False})())
    header, line_fresh, line_resumed = capsys.readouterr().out.splitlines()
    assert "RESTARTS" in header.split()
    assert "2 (from step 4)" in line_resumed and "from step" not in line_fresh
    assert _watch(client, "job-r") == 0
    assert capsys.readouterr().out.splitlines() == ["job-r running/training 5/8 [restart 2 from step 4] step 5/8",
                                                    "job-r succeeded 8/8 [restart 2 from step 4] registered"]


def test_a_job_that_had_written_its_result_is_registered_without_training_again(tmp_path):
    import json
    from types import SimpleNamespace

    from server.config import ModelConfig
    from server.training.manager import TrainingManager
    from tests.training.conftest import wait_for

    state = tmp_path / "state"
    job_dir = state / "jobs" / "job-x"
    (job_dir / "output" / "adapter").mkdir(parents=True)
    (job_dir / "result.json").write_text(json.dumps({"adapter_dir": str(job_dir / "output" / "adapter")}))
    store = JobStore(state / DB_FILE)  # the server died after the worker's success, before registering
    store.create(Job(job_id="job-x", state=QUEUED, adapter_id="ad", created_at=1.0, output_dir=str(job_dir)))
    store.transition("job-x", RUNNING, phase="saving")
    store.close()
    registered = []
    adapters = SimpleNamespace(register=lambda adapter_id, path, replace: registered.append((adapter_id, path)))
    manager = TrainingManager(adapters, JobStore(state / DB_FILE), state, model_config=ModelConfig(model="unused"),
                              python=str(tmp_path / "no-such-python"), poll_interval_s=0.05).start()
    try:
        wait_for(lambda: manager.get("job-x").terminal, what="the job to end")
        job = manager.get("job-x")
    finally:
        manager.close()
    assert (job.state, job.restarts, job.error) == (SUCCEEDED, 1, "")  # no worker could have run
    assert registered == [("ad", job_dir / "output" / "adapter")]
