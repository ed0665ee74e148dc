"""The manager's side of a job's life, with a scripted stand-in for the worker process (no model): phases, the
``training_*`` gauges before, during and after a job, and how a job ends (shutdown vs client cancel vs crash)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.types import BaseModelSpec
from server.config import ModelConfig
from server.errors import InvalidArgument, NotFound
from server.metrics import Metrics
from server.training.jobs import (
    CANCELLED,
    DB_FILE,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    JobRequest,
    JobStore,
)
from server.training.manager import TrainingManager
from tests.training.conftest import wait_for

#: The stand-in worker: run as ``FAKE -m server.training.worker JOBDIR`` (as the manager runs its Python), it
#: follows the plan in $FAKE_WORKER_PLAN: ``["emit", record]`` appends a progress line, ``["wait", name]`` waits
#: for the file JOBDIR/name (the test creates it), ``["exit", code]`` exits.
FAKE_WORKER = """
import json, os, sys, time
job_dir = sys.argv[3]
with open(os.path.join(job_dir, "progress.jsonl"), "a", buffering=1) as progress:
    for action, arg in json.loads(os.environ["FAKE_WORKER_PLAN"]):
        if action == "emit":
            progress.write(json.dumps(arg) + "\\n")
            progress.flush()
        elif action == "wait":
            while not os.path.exists(os.path.join(job_dir, arg)):
                time.sleep(0.02)
        elif action == "exit":
            sys.exit(arg)
"""


def step(n: int, loss: float, tps: float) -> list:
    return ["emit", {"event": "step", "phase": "training", "step": n, "total_steps": 10, "loss": loss,
                     "tokens_per_second": tps}]


def phase(name: str) -> list:
    return ["emit", {"event": "phase", "phase": name, "step": 0, "total_steps": 0, "loss": None}]


@pytest.fixture
def fake_python(tmp_path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    path.chmod(0o755)
    return str(path)


def _manager(state_dir: Path, python: str, metrics=None) -> TrainingManager:
    # A base with every module the trainer's default target set adapts, so the servability check passes.
    linears = {f"model.layers.0.{m}": (8, 8) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")}
    base = BaseModelSpec(name="unused", linear_shapes=linears, other_modules=frozenset({"lm_head"}), max_rank=64)
    store = SimpleNamespace(get=lambda _id: (_ for _ in ()).throw(NotFound("no adapter")), register=None, base=base)
    return TrainingManager(store, JobStore(state_dir / DB_FILE), state_dir, metrics,
                           model_config=ModelConfig(model="unused"), python=python, terminate_grace_s=5.0,
                           poll_interval_s=0.05)


def _dataset(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return path


def _go(job: Job, name: str) -> None:
    (Path(job.output_dir) / name).touch()


def test_training_gauges_have_no_loss_before_the_first_step_and_carry_the_job_id(tmp_path, fake_python,
                                                                                  monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([phase("loading"), ["wait", "go-step"], phase("training"),
                                                      step(1, 2.5, 100.0), ["wait", "go-end"], ["exit", 3]]))
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    manager = _manager(tmp_path / "state", fake_python, metrics).start()
    try:
        for name in ("loss", "step", "tokens_per_second"):  # no job yet: no sample at all (not 0.0)
            assert _samples(_exposition(metrics), f"qlora_server_training_{name}") == []
        first = manager.create(JobRequest("a1", str(_dataset(tmp_path))))
        wait_for(lambda: manager.get(first.job_id).state == RUNNING and manager.get(first.job_id).pid,
                 what="the job to run")
        labels = {"job_id": first.job_id}
        exposition = _exposition(metrics)
        assert f'qlora_server_training_step{{job_id="{first.job_id}"}} 0.0' in exposition
        assert _samples(exposition, "qlora_server_training_loss") == []  # before the first step: absent, not 0.0
        assert _samples(exposition, "qlora_server_training_tokens_per_second") == []
        _go(manager.get(first.job_id), "go-step")
        wait_for(lambda: sample("qlora_server_training_loss", labels) is not None, what="the first step")
        assert (sample("qlora_server_training_step", labels), sample("qlora_server_training_loss", labels),
                sample("qlora_server_training_tokens_per_second", labels)) == (1, 2.5, 100.0)
        _go(manager.get(first.job_id), "go-end")
        wait_for(lambda: manager.get(first.job_id).state == FAILED, what="the job to end")
        wait_for(lambda: sample("qlora_server_training_tokens_per_second", labels) == 0, what="throughput 0")
        # After the end: its last step and loss stay, labelled with its id.
        assert (sample("qlora_server_training_step", labels), sample("qlora_server_training_loss", labels)) == \
            (1, 2.5)

        second = manager.create(JobRequest("a2", str(_dataset(tmp_path))))
        wait_for(lambda: manager.get(second.job_id).state == RUNNING, what="the second job to run")
        wait_for(lambda: sample("qlora_server_training_step", {"job_id": second.job_id}) == 0, what="its series")
        exposition = _exposition(metrics)
        assert first.job_id not in exposition  # the ended job's series are gone once another starts
        assert _samples(exposition, "qlora_server_training_loss") == []
        _go(manager.get(second.job_id), "go-step")
        _go(manager.get(second.job_id), "go-end")
        wait_for(lambda: manager.get(second.job_id).terminal, what="the second job to end")
    finally:
        manager.close()


def _samples(exposition: str, name: str) -> list[str]:
    """The sample lines of metric ``name`` in a text exposition (labelled or not)."""
    return [line for line in exposition.splitlines() if line.startswith((f"{name}{{", f"{name} "))]


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_phases_are_stored_and_published_in_order(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([
        phase("loading"), phase("training"), step(1, 2.0, 50.0), phase("evaluating"),
        ["emit", {"event": "eval_progress", "phase": "evaluating", "step": 1, "total_steps": 10,
                  "eval_examples_done": 2, "eval_examples_total": 4}],
        phase("saving"), ["wait", "go-end"], ["exit", 3]]))
    manager = _manager(tmp_path / "state", fake_python).start()
    try:
        job = manager.create(JobRequest("a1", str(_dataset(tmp_path))))
        assert job.phase == ""
        watch = manager.watch(job.job_id)
        events = []
        for event in watch:
            events.append(event)
            if event.job.phase == "saving":
                assert manager.get(job.job_id).phase == "saving"  # stored, so GetTrainingJob shows it too
                _go(event.job, "go-end")
        phases = [e.job.phase for e in events]
        seen = [p for i, p in enumerate(phases) if p and (i == 0 or phases[i - 1] != p)]
        assert seen == ["loading", "training", "evaluating", "saving"]
        assert "evaluating 2/4 examples" in [e.message for e in events]
        assert events[-1].job.state == FAILED and events[-1].job.phase == "saving"  # where it was when it ended
    finally:
        manager.close()


def test_shutdown_interrupts_for_resume_unlike_a_client_cancel_or_a_crash(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([phase("loading"), phase("training"), step(1, 2.0, 50.0),
                                                      ["wait", "never"]]))
    state = tmp_path / "state"
    manager = _manager(state, fake_python).start()
    by_client = manager.create(JobRequest("a1", str(_dataset(tmp_path))))
    wait_for(lambda: manager.get(by_client.job_id).step == 1, what="the first job's step")
    cancelled = manager.cancel(by_client.job_id)
    assert (cancelled.state, cancelled.error, cancelled.restarts) == (CANCELLED, "", 0)  # a client's cancel
    assert not Path(cancelled.output_dir).exists()  # ... removes the job directory
    at_shutdown = manager.create(JobRequest("a2", str(_dataset(tmp_path))))
    wait_for(lambda: manager.get(at_shutdown.job_id).step == 1, what="the second job's step")
    watch = manager.watch(at_shutdown.job_id)
    manager.close()  # what SIGTERM / Ctrl-C to the server does
    job = JobStore(state / DB_FILE).get(at_shutdown.job_id)
    assert (job.state, job.error, job.restarts, job.phase) == (QUEUED, "", 1, "")  # interrupted, to resume
    assert Path(job.output_dir).is_dir()  # its directory (checkpoints) is kept
    events = list(_drain(watch))
    assert events[-1].job.state == QUEUED and "resumes from its last checkpoint" in events[-1].message

    again = _manager(state, fake_python).start()  # a restarted server resumes it: same directory, resume asked
    try:
        wait_for(lambda: again.get(at_shutdown.job_id).state == RUNNING and again.get(at_shutdown.job_id).pid
                 and again.get(at_shutdown.job_id).pid != job.pid, what="the resumed run")
        spec = json.loads((Path(job.output_dir) / "job.json").read_text())
        assert spec["resume"] is True and again.get(at_shutdown.job_id).restarts == 1
        assert again.get(by_client.job_id).error == ""
    finally:
        again.close()
    assert JobStore(state / DB_FILE).get(at_shutdown.job_id).restarts == 2

    # A crash reads differently again.
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([phase("loading"), ["exit", 3]]))
    third = _manager(state, fake_python).start()
    try:
        crashed = third.create(JobRequest("a3", str(_dataset(tmp_path))))
        wait_for(lambda: third.get(crashed.job_id).terminal, what="the crash")
        assert third.get(crashed.job_id).state == FAILED
        assert "worker exited with code 3" in third.get(crashed.job_id).error
    finally:
        third.close()


def _drain(watch):
    try:
        yield from watch
    except Exception:  # noqa: BLE001 - a watch ends with Cancelled at shutdown, after the final event
        return


def test_a_version_1_database_gains_the_phase_column(tmp_path):
    path = tmp_path / DB_FILE
    with sqlite3.connect(path) as raw:  # the schema before phases existed
        raw.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, adapter_id TEXT NOT NULL,
                replace INTEGER NOT NULL, dataset_path TEXT NOT NULL, config TEXT NOT NULL,
                step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, loss REAL, eval_loss REAL,
                error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, started_at REAL, finished_at REAL,
                output_dir TEXT NOT NULL, pid INTEGER);
            INSERT INTO jobs (id, state, adapter_id, replace, dataset_path, config, created_at, output_dir)
                VALUES ('old', 'succeeded', 'a', 0, '/d.jsonl', '{}', 1.0, '/o');
            PRAGMA user_version=1;""")
    store = JobStore(path)
    try:
        old = store.get("old")
        assert (old.phase, old.state, old.resumed_from_step, old.restarts) == ("", "succeeded", 0, 0)
        store.create(Job(job_id="new", state="queued", adapter_id="b", created_at=2.0, output_dir="/o2"))
        store.transition("new", RUNNING, phase="loading")
        assert store.update("new", phase="evaluating").phase == "evaluating"
        with pytest.raises(InvalidArgument) as info:
            store.update("new", phase="dreaming")
        assert info.value.field == "phase"
    finally:
        store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.floats(0.0, 20.0)), max_size=4), min_size=1, max_size=5))
def test_training_gauges_only_ever_show_the_current_or_last_job(jobs):
    """Any sequence of jobs, each with any number of steps (None = a step event without a loss): loss and throughput
    exist only after a step that set them, only for one job, and the ended job keeps its last values."""
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    for n, losses in enumerate(jobs):
        job_id = f"job-{n}"
        metrics.training_job_started(job_id)
        last_loss = None
        for step_no, loss in enumerate(losses, start=1):
            metrics.training_job_progress(job_id, step=step_no, loss=loss, tokens_per_second=10.0 * step_no)
            last_loss = loss if loss is not None else last_loss
            assert sample("qlora_server_training_loss", {"job_id": job_id}) == last_loss
        metrics.training_job_ended(job_id)
        exposition = _exposition(metrics)
        for name in ("step", "loss", "tokens_per_second"):
            assert {line.split('"')[1] for line in _samples(exposition, f"qlora_server_training_{name}")} <= {job_id}
        assert sample("qlora_server_training_step", {"job_id": job_id}) == len(losses)
        assert sample("qlora_server_training_loss", {"job_id": job_id}) == last_loss
        assert sample("qlora_server_training_tokens_per_second", {"job_id": job_id}) == (0 if losses else None)
