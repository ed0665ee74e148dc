"""A training job must not train what the server will refuse: CreateTrainingJob refuses, naming the ``config.``
field, every config whose adapter registration would refuse, and accepts every other one."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.adapters.store import AdapterStore
from server.adapters.types import BaseModelSpec
from server.config import ModelConfig
from server.errors import InvalidArgument
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.training.jobs import JobRequest, JobStore
from server.training.manager import TrainingManager
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base
from tests.training.conftest import fast_config, write_dataset

MAX_RANK = 8
ids = itertools.count()  # a fresh adapter id per job
ROUTABLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Names a user may try: routable layers, the LM head and embeddings, a norm, containers, a full module path,
#: and a name the model lacks.
NAMES = [*ROUTABLE, "lm_head", "embed_tokens", "norm", "self_attn", "mlp", "layers.0.self_attn.q_proj", "c_attn"]


@pytest.mark.parametrize("config,field", [
    (fast_config(r=65, target_modules=["q_proj"], max_steps=1), "config.r"),  # the case
    (fast_config(r=MAX_RANK + 1), "config.r"),
    (fast_config(target_modules=["lm_head"], max_steps=1), "config.target_modules"),
    (fast_config(target_modules=["q_proj", "embed_tokens"]), "config.target_modules"),
    (fast_config(target_modules=["q_proj", "c_attn"]), "config.target_modules"),  # not in this model
    (fast_config(target_modules=["mlp"]), "config.target_modules"),  # a container, not a linear layer
], ids=["r65", "r9", "lm_head", "embed_tokens", "absent", "container"])
def test_create_refuses_what_registration_would_refuse(served, config, field):
    """Over gRPC, on a server with ``max_lora_rank`` 8: refused at once with INVALID_ARGUMENT naming the field,
    and no job is created."""
    assert served.app.store.base.max_rank == MAX_RANK
    stub = served.training
    before = len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTrainingJob(pb.CreateTrainingJobRequest(adapter_id=f"never{next(ids)}",
                                                           dataset_path=str(served.dataset), config=config),
                               timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(field + ": "), err.details()
    assert ("qlora-error-field", field) in err.trailing_metadata()
    assert len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest()).jobs) == before


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, its spec (max rank 8), an empty adapter store, a dataset and a training manager that is never
    started (accepted jobs stay queued, nothing trains)."""
    root = tmp_path_factory.mktemp("servable")
    base_dir = save_tiny_base(root)
    spec = BaseModelSpec.from_model(load_nf4(base_dir), TINY_NAME, MAX_RANK)
    store = AdapterStore(root / "store", spec)
    manager = TrainingManager(store, JobStore(root / "state" / "jobs.db"), root / "state",
                              model_config=ModelConfig(model=str(base_dir), device="cpu"))
    yield base_dir, store, manager, write_dataset(root / "data.jsonl")
    manager.close(timeout_s=5)


def registry_accepts(base_dir: Path, store: AdapterStore, r: int, target_modules) -> bool:
    """The oracle: make a real PEFT adapter of that config on the tiny base and register it. A config PEFT itself
    cannot build (a norm, a container, a name the model lacks) cannot be trained either: refused."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = make_adapter(base_dir, Path(tmp) / "a", r=r, lora_alpha=2 * r,
                                target_modules="all-linear" if target_modules is None else target_modules)
        except (ValueError, TypeError, RuntimeError):
            return False
        try:
            store.register("oracle", path, replace=True)
        except InvalidArgument:
            return False
        store.unregister("oracle")
        return True


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 2 * MAX_RANK),
       target_modules=st.one_of(st.none(), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)))
@example(r=MAX_RANK, target_modules=["q_proj"])
@example(r=MAX_RANK + 1, target_modules=["q_proj"])
@example(r=4, target_modules=["lm_head"])
@example(r=4, target_modules=None)
def test_create_accepts_exactly_what_registration_accepts(world, r, target_modules):
    """Accepted by CreateTrainingJob ⇔ registration accepts a real PEFT adapter of that config; a refusal names
    ``config.r`` or ``config.target_modules``."""
    base_dir, store, manager, dataset = world
    config = {"r": r, "lora_alpha": float(2 * r), "max_steps": 1}
    if target_modules is not None:
        config["target_modules"] = target_modules
    expected = registry_accepts(base_dir, store, r, target_modules)
    try:
        job = manager.create(JobRequest(adapter_id=f"job{next(ids)}", dataset_path=str(dataset), config=config))
    except InvalidArgument as exc:
        assert not expected, f"refused a job whose adapter registration accepts: {exc}"
        assert exc.field in ("config.r", "config.target_modules"), exc
    else:
        assert expected, f"accepted a job whose adapter registration refuses ({job.job_id})"
        manager.cancel(job.job_id)
        shutil.rmtree(Path(job.output_dir), ignore_errors=True)
