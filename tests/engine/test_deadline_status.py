"""Issue 7, 4a, with the real engine behind the real gRPC server: a client deadline is DEADLINE_EXCEEDED in the
request log and in ``qlora_server_requests_total`` on every path (unary / streaming, running / still queued)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from server.config import ServerConfig
from server.model.runner import ModelRunner
from server.engine.types import GenerationRequest, SamplingParams
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg
from server.rpc.server import build_grpc_server
from tests.engine_harness import build_engine
from tests.tiny import save_tiny_base

WAIT = 30.0  # bounded waits for liveness, never asserted on
METHODS = {"unary": "qlora_server.v1.Generation/Generate", "stream": "qlora_server.v1.Generation/GenerateStream"}


class _Log:
    """Collects the request log's fields (what ``RequestLog.finished`` is given)."""

    def __init__(self):
        self.lines: list[dict] = []
        self.lock = threading.Lock()

    def finished(self, request, request_id, **fields):
        with self.lock:
            self.lines.append({"request_id": request_id, **fields})
        return fields


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("deadline"))


@pytest.fixture
def world(tmp_path, base, monkeypatch):
    real_decode = ModelRunner.decode

    def slow_decode(*args, **kwargs):  # ~20 ms per step, so a 126-token answer outlives a short deadline
        time.sleep(0.02)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(ModelRunner, "decode", slow_decode)
    log = _Log()
    eng, store, metrics = build_engine(tmp_path, base, {}, request_log=log, max_batch_size=1)
    app = SimpleNamespace(config=ServerConfig(engine=eng.config, grpc_workers=8), engine=eng, store=store,
                          adapter_cache=eng.cache, metrics=metrics)
    server, port = build_grpc_server(app, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield eng, pbg.GenerationStub(channel), metrics, log
    channel.close()
    server.stop(None)
    eng.stop()


def _wait_for(predicate):
    end = time.monotonic() + WAIT
    while time.monotonic() < end and not predicate():
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("queued", [False, True], ids=["running", "queued"])
@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_client_deadline_is_deadline_exceeded_everywhere(world, kind, queued):
    eng, gen, metrics, log = world
    blocker = None
    if queued:  # the only batch row is taken: the request is still waiting when its deadline passes
        blocker = eng.submit(GenerationRequest("blocker", prompt="hi", params=SamplingParams(max_new_tokens=120)))
    req = pb.GenerateRequest(prompt="hi", max_new_tokens=120)
    with pytest.raises(grpc.RpcError) as info:
        if kind == "unary":
            gen.Generate(req, timeout=0.5)  # the README's Python snippet path
        else:
            list(gen.GenerateStream(req, timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    if blocker is not None:
        blocker.cancel()

    def count(code):
        return metrics.registry.get_sample_value("qlora_server_requests_total",
                                                 {"method": METHODS[kind], "code": code}) or 0.0

    assert _wait_for(lambda: count("DEADLINE_EXCEEDED") == 1)
    assert count("CANCELLED") == 0
    assert _wait_for(lambda: any(line["request_id"] != "blocker" for line in log.lines))
    statuses = [line["status"] for line in log.lines if line["request_id"] != "blocker"]
    assert statuses == ["DEADLINE_EXCEEDED"]
