"""Resume with the real trainer (tiny NF4 Llama, CPU, float32): a job stopped by a shutdown or a server killed
with SIGKILL continues from its checkpoint in a new manager / server on the same state directory."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import torch  # noqa: E402

from server.adapters.types import BaseModelSpec  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.errors import NotFound  # noqa: E402
from server.training.jobs import DB_FILE, QUEUED, SUCCEEDED, JobRequest, JobStore  # noqa: E402
from server.training.manager import TrainingManager  # noqa: E402
from server.training.worker import TEST_PAUSE_ENV  # noqa: E402
from tests.tiny import save_tiny_base  # noqa: E402
from tests.tiny_tokenizer import save_byte_tokenizer  # noqa: E402
from tests.training.conftest import WAIT_S, wait_for, write_dataset  # noqa: E402

#: The job: 4 optimizer steps with a checkpoint after each, dropout on (so the restored RNG state matters).
CONFIG = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "max_steps": 4, "batch_size": 2,
          "max_seq_length": 32, "eval_fraction": 0.0, "seed": 0, "optim": "paged_adamw_32bit", "save_steps": 1,
          "lora_dropout": 0.1}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = save_tiny_base(tmp_path_factory.mktemp("resume"))
    save_byte_tokenizer(path)
    return path


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _manager(state_dir: Path, base: Path, registered: list) -> TrainingManager:
    linears = {f"model.layers.0.self_attn.{m}": (64, 64) for m in ("q_proj", "v_proj")}
    spec = BaseModelSpec(name=str(base), linear_shapes=linears, other_modules=frozenset({"lm_head"}), max_rank=64)
    store = SimpleNamespace(get=lambda _id: (_ for _ in ()).throw(NotFound("no adapter")), base=spec,
                            register=lambda adapter_id, path, replace: registered.append((adapter_id, Path(path))))
    return TrainingManager(store, JobStore(state_dir / DB_FILE), state_dir, model_config=ModelConfig(
        model=str(base), device="cpu", compute_dtype="float32"), terminate_grace_s=WAIT_S, poll_interval_s=0.05)


def test_a_job_stopped_by_shutdown_resumes_and_ends_as_an_uninterrupted_run(base, tmp_path, monkeypatch):
    from trainer.config import TrainConfig
    from trainer.train import train

    state, registered = tmp_path / "state", []
    data = write_dataset(tmp_path / "data.jsonl")
    monkeypatch.setenv(TEST_PAUSE_ENV, "2")  # the worker holds after step 2 until the shutdown asks it to stop
    first = _manager(state, base, registered).start()
    try:
        job = first.create(JobRequest("resumed", str(data), config=CONFIG))
        wait_for(lambda: first.get(job.job_id).step == 2, what="step 2")
    finally:
        first.close()  # SIGTERM: the worker ends step 2 with a checkpoint and exits
    stopped = JobStore(state / DB_FILE).get(job.job_id)
    assert (stopped.state, stopped.restarts, stopped.step) == (QUEUED, 1, 2)
    checkpoints = Path(job.output_dir) / "output" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]

    monkeypatch.delenv(TEST_PAUSE_ENV)
    second = _manager(state, base, registered).start()  # the server comes back on the same state dir
    try:
        wait_for(lambda: second.get(job.job_id).terminal, what="the resumed job to end")
        done = second.get(job.job_id)
    finally:
        second.close()
    assert (done.state, done.error, done.resumed_from_step, done.restarts, done.step) == (SUCCEEDED, "", 2, 1, 4)
    [(adapter_id, adapter_dir)] = registered
    assert adapter_id == "resumed" and not checkpoints.exists()

    # The oracle: the same config and seed trained in one go, in this process.
    ref = train(TrainConfig.from_dict(dict(job.config)).replace(output_dir=tmp_path / "ref"))
    a, b = _adapter_tensors(ref.adapter_dir), _adapter_tensors(adapter_dir)
    assert a.keys() == b.keys() and len(a) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # it trained


def test_a_server_killed_mid_job_resumes_it_on_restart_and_registers_the_adapter(base, tmp_path, monkeypatch):
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
    from server.rpc.training import training_config_to_proto
    from tests.server_process import start_server

    data = write_dataset(tmp_path / "data.jsonl")
    state = tmp_path / "state"
    flags = ("--state-dir", str(state), "--compute-dtype", "float32")
    monkeypatch.setenv(TEST_PAUSE_ENV, "2")  # after step 2, before its checkpoint: checkpoint-1 is the last
    server = start_server(str(base), tmp_path / "store", tmp_path / "server1.log", *flags)
    try:
        training = pb_grpc.TrainingStub(server.channel())
        job = training.CreateTrainingJob(pb.CreateTrainingJobRequest(
            adapter_id="survivor", dataset_path=str(data), config=training_config_to_proto(CONFIG)))
        wait_for(lambda: training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id)).step == 2,
                 what="step 2")
    finally:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
    monkeypatch.delenv(TEST_PAUSE_ENV)
    server = start_server(str(base), tmp_path / "store", tmp_path / "server2.log", *flags)
    try:
        training = pb_grpc.TrainingStub(server.channel())
        events = list(training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id), timeout=WAIT_S))
        done = events[-1].job
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert (done.resumed_from_step, done.restarts, done.step) == (1, 1, 4)
        assert "resuming from the checkpoint at step 1" in [e.message for e in events]
        listed = {j.job_id: j for j in training.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs}
        assert (listed[job.job_id].resumed_from_step, listed[job.job_id].restarts) == (1, 1)
        _, adapters = server.stubs()
        info = adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="survivor"))
        assert info.adapter_id == "survivor" and info.rank == 4
    finally:
        server.stop()
