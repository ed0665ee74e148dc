"""Fixtures: the real server (tiny NF4 Llama on the CPU, real TrainingManager and workers) over real gRPC."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from server.app import App, build_app  # noqa: E402
from server.config import EngineConfig, ModelConfig, ServerConfig  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc  # noqa: E402
from server.rpc.server import build_grpc_server  # noqa: E402
from server.rpc.training import TrainingServicer  # noqa: E402
from tests.tiny import save_tiny_base  # noqa: E402
from tests.tiny_tokenizer import save_byte_tokenizer  # noqa: E402

#: Bound of every wait for a job condition (seconds); generous for a loaded 2-core machine, never a timing check.
WAIT_S = 180.0


def fast_config(**changes) -> pb.TrainingConfig:
    """A TrainingConfig that trains the tiny model in a few seconds."""
    fields = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "max_steps": 2, "batch_size": 2,
              "max_seq_length": 32, "eval_fraction": 0.0, "seed": 0, "optim": "paged_adamw_32bit"}
    fields.update(changes)
    return pb.TrainingConfig(**fields)


def write_dataset(path: Path, n: int = 8) -> Path:
    """A tiny prompt/completion JSONL file."""
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f" ok {i}!"}) + "\n" for i in range(n)))
    return path


def wait_for(cond: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Served:
    """The running server and what tests need to talk to it."""

    app: App
    target: str
    channel: grpc.Channel
    root: Path
    base_dir: Path
    dataset: Path

    @property
    def training(self) -> pb_grpc.TrainingStub:
        return pb_grpc.TrainingStub(self.channel)

    @property
    def adapters(self) -> pb_grpc.AdaptersStub:
        return pb_grpc.AdaptersStub(self.channel)

    @property
    def generation(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)

    def watch_to_end(self, job_id: str) -> list[pb.TrainingJobEvent]:
        """Every event of a WatchTrainingJob stream (bounded by ``WAIT_S``)."""
        return list(self.training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job_id), timeout=WAIT_S))


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("training")
    base = save_tiny_base(root)
    save_byte_tokenizer(base)
    config = ServerConfig(model=ModelConfig(model=str(base), device="cpu"),
                          engine=EngineConfig(adapter_slots=2, cpu_adapter_cache=2, max_lora_rank=8,
                                              max_new_tokens=16),
                          adapters_dir=root / "store", state_dir=root / "state", grpc_workers=8, metrics_port=-1)
    app = build_app(config)
    server, port = build_grpc_server(app, "127.0.0.1", 0, training_servicer=TrainingServicer(app.training))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(app, f"127.0.0.1:{port}", channel, root, base, write_dataset(root / "data.jsonl"))
    finally:
        channel.close()
        server.stop(None)
        app.close()
