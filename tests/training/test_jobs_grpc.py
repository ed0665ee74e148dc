"""Training jobs through the real gRPC server and real worker processes: success, crash, cancel, watch, errors."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.training.worker import LOG_FILE, OUTPUT_SUBDIR, TEST_EXIT_ENV
from tests.tiny import make_adapter
from tests.training.conftest import WAIT_S, fast_config, wait_for

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def generate(served, adapter_id: str = "") -> pb.GenerateResponse:
    return served.generation.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="say 3", max_new_tokens=4),
                                      timeout=60)


def test_invalid_requests_name_the_field_and_create_no_job(served, tmp_path):
    stub = served.training
    before = len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a", "completion": "b"}\nnot json\n{"prompt": "x"}\n')
    ds = str(served.dataset)
    cases = [
        (pb.CreateTrainingJobRequest(adapter_id="bad id!", dataset_path=ds), "adapter_id: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=""), "dataset_path: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=str(tmp_path / "missing.jsonl")),
         "dataset_path: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=str(tmp_path)), "dataset_path: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=str(bad_jsonl)), "dataset_path: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=ds, config=pb.TrainingConfig(r=0)), "config.r: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=ds, config=pb.TrainingConfig(lora_dropout=1.5)),
         "config.lora_dropout: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=ds, config=pb.TrainingConfig(optim="sgd")),
         "config.optim: "),
        (pb.CreateTrainingJobRequest(adapter_id="ok", dataset_path=ds, config=pb.TrainingConfig(eval_fraction=1.0)),
         "config.eval_fraction: "),
    ]
    for request, prefix in cases:
        err = rpc_error(stub.CreateTrainingJob, request, timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.details())
        assert err.details().startswith(prefix), (prefix, err.details())
        assert ("qlora-error-field", prefix[:-2]) in err.trailing_metadata()
    assert "line 2" in rpc_error(stub.CreateTrainingJob, cases[4][0], timeout=30).details()

    served.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
        adapter_id="taken", path=str(make_adapter(served.base_dir, tmp_path / "taken", seed=1))), timeout=30)
    err = rpc_error(stub.CreateTrainingJob, pb.CreateTrainingJobRequest(adapter_id="taken", dataset_path=ds,
                                                                         config=fast_config()), timeout=30)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and err.details().startswith("adapter_id: ")
    assert len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs) == before

    for call, request in ((stub.GetTrainingJob, pb.GetTrainingJobRequest(job_id="job-nope")),
                          (stub.CancelTrainingJob, pb.CancelTrainingJobRequest(job_id="job-nope"))):
        assert rpc_error(call, request, timeout=30).code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: list(stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id="job-nope"), timeout=30)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.GetTrainingJob, pb.GetTrainingJobRequest(), timeout=30).code() == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_job_succeeds_registers_the_adapter_and_it_serves(served):
    stub = served.training
    job = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(adapter_id="trained", dataset_path=str(served.dataset),
                                                             config=fast_config()), timeout=30)
    assert job.state == pb.JOB_STATE_QUEUED and job.job_id and job.created_at > 0
    assert not job.HasField("started_at") and Path(job.output_dir).parent == served.root / "state" / "jobs"

    events = served.watch_to_end(job.job_id)
    states = [e.job.state for e in events]
    assert states[0] in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and states[-1] == pb.JOB_STATE_SUCCEEDED
    assert all(s not in TERMINAL for s in states[:-1])
    steps = [e.job.step for e in events]
    assert steps == sorted(steps) and max(steps) == 2
    step_events = [e for e in events if e.message.startswith("step ")]
    assert step_events and all(e.job.total_steps == 2 and e.job.HasField("loss") for e in step_events)

    final = stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id), timeout=30)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.error == "" and final.step == 2
    assert final.created_at <= final.started_at <= final.finished_at
    assert served.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="trained"), timeout=30).rank == 4
    assert generate(served, "trained").completion_tokens >= 1
    listed = stub.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs
    assert listed[0].job_id == job.job_id  # newest first
    out = Path(final.output_dir)
    assert (out / LOG_FILE).is_file() and not (out / OUTPUT_SUBDIR / "checkpoints").exists()

    again = served.watch_to_end(job.job_id)  # a finished job: its final state, then the end
    assert [e.job.state for e in again] == [pb.JOB_STATE_SUCCEEDED]
    err = rpc_error(stub.CancelTrainingJob, pb.CancelTrainingJobRequest(job_id=job.job_id), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    registry = served.app.metrics.registry
    assert registry.get_sample_value("qlora_server_training_jobs", {"state": "succeeded"}) >= 1
    labels = {"job_id": job.job_id}  # an ended job's series carry its id (until the next job starts)
    assert registry.get_sample_value("qlora_server_training_step", labels) == 2
    assert registry.get_sample_value("qlora_server_training_loss", labels) == pytest.approx(final.loss)
    assert registry.get_sample_value("qlora_server_training_tokens_per_second", labels) == 0


def test_watch_shows_every_phase_in_order(served):
    """loading → training → evaluating → saving → registering, each seen over WatchTrainingJob (the evaluation with
    its progress), and the job ends succeeded in the last one."""
    job = served.training.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="phased", dataset_path=str(served.dataset), config=fast_config(eval_fraction=0.25)), timeout=30)
    assert job.phase == pb.JOB_PHASE_UNSPECIFIED  # queued: not started
    events = served.watch_to_end(job.job_id)
    phases = [e.job.phase for e in events]
    seen = [p for i, p in enumerate(phases) if p != pb.JOB_PHASE_UNSPECIFIED and (i == 0 or phases[i - 1] != p)]
    assert seen == [pb.JOB_PHASE_LOADING, pb.JOB_PHASE_TRAINING, pb.JOB_PHASE_EVALUATING, pb.JOB_PHASE_SAVING,
                    pb.JOB_PHASE_REGISTERING], [pb.JobPhase.Name(p) for p in phases]
    evaluating = [e.message for e in events if e.job.phase == pb.JOB_PHASE_EVALUATING]
    assert "evaluating 2/2 examples" in evaluating  # 8 rows, a quarter held out
    assert all(e.job.HasField("loss") for e in events if e.job.phase == pb.JOB_PHASE_EVALUATING)
    final = events[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.phase == pb.JOB_PHASE_REGISTERING
    got = served.training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id), timeout=30)
    assert got.phase == pb.JOB_PHASE_REGISTERING


def test_worker_crash_fails_the_job_and_serving_goes_on(served, monkeypatch):
    monkeypatch.setenv(TEST_EXIT_ENV, "1:3")  # the worker os._exit(3)s right after step 1 (see worker.py)
    stub = served.training
    job = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(adapter_id="crashed", dataset_path=str(served.dataset),
                                                             config=fast_config(max_steps=5)), timeout=30)
    events = served.watch_to_end(job.job_id)
    final = events[-1].job
    assert final.state == pb.JOB_STATE_FAILED and final.HasField("finished_at")
    assert "worker exited with code 3" in final.error and final.step == 1
    err = rpc_error(served.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="crashed"), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert generate(served).completion_tokens >= 1
    assert (Path(final.output_dir) / LOG_FILE).is_file()  # kept for inspection


def test_worker_killed_by_a_signal_fails_the_job(served):
    """What the kernel's OOM killer does to a worker: SIGKILL mid-run."""
    stub = served.training
    job = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(adapter_id="oom", dataset_path=str(served.dataset),
                                                             config=fast_config(max_steps=500)), timeout=30)
    killed = False
    for event in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id), timeout=WAIT_S):
        if event.job.step >= 1 and not killed:
            os.kill(served.app.training.get(job.job_id).pid, signal.SIGKILL)
            killed = True
        final = event.job
    assert final.state == pb.JOB_STATE_FAILED and "worker killed by signal 9 (SIGKILL)" in final.error
    assert generate(served).completion_tokens >= 1


def test_cancel_queued_and_running_jobs(served):
    stub = served.training
    manager = served.app.training
    running = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="cancel-me", dataset_path=str(served.dataset), config=fast_config(max_steps=500)), timeout=30)
    queued = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="never-runs", dataset_path=str(served.dataset), config=fast_config()), timeout=30)

    # A client that cancels its watch ends it on the server.
    call = stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=queued.job_id), timeout=WAIT_S)
    assert next(call).job.state == pb.JOB_STATE_QUEUED
    wait_for(lambda: manager.watcher_count(queued.job_id) == 1, what="the watch to register")
    call.cancel()
    wait_for(lambda: manager.watcher_count(queued.job_id) == 0, what="the cancelled watch to end")

    cancelled = stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=queued.job_id), timeout=30)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and not cancelled.HasField("started_at")

    stream = stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=running.job_id), timeout=WAIT_S)
    for event in stream:
        if event.job.state == pb.JOB_STATE_RUNNING and event.job.step >= 1:
            break
    else:
        pytest.fail("the job ended before it trained a step")
    result = {}
    canceller = threading.Thread(target=lambda: result.update(job=stub.CancelTrainingJob(
        pb.CancelTrainingJobRequest(job_id=running.job_id), timeout=WAIT_S)))
    canceller.start()
    rest = list(stream)  # the open watch sees the cancellation as its last event
    canceller.join(WAIT_S)
    assert rest[-1].job.state == pb.JOB_STATE_CANCELLED
    assert result["job"].state == pb.JOB_STATE_CANCELLED and result["job"].error == ""
    assert not Path(result["job"].output_dir).exists()
    err = rpc_error(served.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="cancel-me"), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(stub.CancelTrainingJob, pb.CancelTrainingJobRequest(job_id=running.job_id), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=queued.job_id), timeout=30).state == \
        pb.JOB_STATE_CANCELLED  # it never ran
    assert generate(served).completion_tokens >= 1
