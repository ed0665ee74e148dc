"""Fixtures: a fake App served by the real gRPC server on a free localhost port, and stubs to call it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from rpc_fakes import FakeApp, FakeTrainingManager  # tests/rpc is on sys.path (pytest's "prepend" import mode)

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.server import build_grpc_server
from server.rpc.training import TrainingServicer


@pytest.fixture
def app(tmp_path: Path) -> FakeApp:
    return FakeApp(tmp_path / "adapters")


@pytest.fixture
def training() -> FakeTrainingManager:
    return FakeTrainingManager()


@pytest.fixture
def address(app: FakeApp, training: FakeTrainingManager):
    server, port = build_grpc_server(app, "127.0.0.1", 0, training_servicer=TrainingServicer(training))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def channel(address: str):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture
def generation(channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


@pytest.fixture
def adapters(channel) -> pb_grpc.AdaptersStub:
    return pb_grpc.AdaptersStub(channel)
