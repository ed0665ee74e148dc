"""A bounded loopback load test and a property test over the real engine (tiny model) behind the real gRPC server:
many clients mixing adapters, cancelling and disconnecting mid-stream see only OK / RESOURCE_EXHAUSTED / CANCELLED,
arbitrary request fields only clean statuses; afterwards no request, KV block or adapter slot is left held."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import ServerConfig
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg
from server.rpc.interceptor import FIELD_METADATA_KEY
from server.rpc.server import build_grpc_server
from tests.engine_harness import build_engine
from tests.tiny import make_adapter, save_tiny_base

WAIT = 60.0  # bounded waits for liveness: a hang fails, it is never a measured time
ADAPTERS = ("", "a0", "a1", "a2")  # three adapters over two slots: they swap under load
CLIENTS, REQUESTS_EACH = 10, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    base = save_tiny_base(root)
    sources = {f"a{i}": make_adapter(base, root / f"src{i}", seed=i, r=4, lora_alpha=8) for i in range(3)}
    eng, store, metrics = build_engine(root, base, sources, compute_dtype=torch.float32, max_batch_size=3,
                                       max_queue=3, adapter_slots=2, max_new_tokens=16, max_prompt_tokens=48)
    # The Generation cap (8) is above batch + queue (6): both the cap and the engine's full queue are met.
    app = SimpleNamespace(config=ServerConfig(engine=eng.config, max_generations=8), engine=eng, store=store,
                          adapter_cache=eng.cache, metrics=metrics)
    server, port = build_grpc_server(app, "127.0.0.1", 0)
    server.start()
    yield SimpleNamespace(engine=eng, metrics=metrics, target=f"127.0.0.1:{port}")
    server.stop(None)
    eng.stop()


def _assert_drained(world) -> None:
    """Every request gone: no running / waiting request, gauges at 0, every KV block free, no slot pinned."""
    eng, metrics = world.engine, world.metrics
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if (eng.counts() == (0, 0) and metrics.running._value.get() == 0 and metrics.waiting._value.get() == 0
                and eng.allocator.free == eng.allocator.capacity and not any(eng.cache._slot_refs)):
            return
        time.sleep(0.05)
    pytest.fail(f"not drained: counts {eng.counts()}, gauges {metrics.running._value.get()} / "
                f"{metrics.waiting._value.get()}, free blocks {eng.allocator.free} of {eng.allocator.capacity}, "
                f"slot pins {eng.cache._slot_refs}")


def _client(seed: int, target: str, outcomes: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(target)
    try:
        for i in range(REQUESTS_EACH):
            req = pb.GenerateRequest(adapter_id=rng.choice(ADAPTERS), prompt=f"client {seed} asks {i}",
                                     max_new_tokens=rng.randint(1, 16), ignore_eos=True,
                                     temperature=rng.choice([0.0, 0.8]), seed=rng.randint(0, 99))
            mode = rng.choice(["unary", "stream", "cancel", "disconnect"])
            stub = pbg.GenerationStub(channel)
            try:
                if mode == "unary":
                    stub.Generate(req, timeout=WAIT)
                else:
                    call = stub.GenerateStream(req, timeout=WAIT)
                    for n, _ in enumerate(call):
                        if mode == "cancel" and n == 0:
                            call.cancel()
                        elif mode == "disconnect" and n == 0:
                            channel.close()  # the whole connection goes away mid-stream
                            channel = grpc.insecure_channel(target)
                            break
                code = "OK" if mode != "disconnect" else "CANCELLED"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                outcomes.append((mode, code))
    finally:
        channel.close()


def test_load_mixing_adapters_with_cancels_and_disconnects(world):
    outcomes: list = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_client, args=(seed, world.target, outcomes, lock), daemon=True)
               for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(outcomes) == CLIENTS * REQUESTS_EACH
    assert {code for _, code in outcomes} <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, outcomes
    assert any(code == "OK" for _, code in outcomes)
    _assert_drained(world)
    served = {(method, code) for (method, code), value in _counts(world.metrics).items() if value}
    assert {code for _, code in served} <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, served
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(world.target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT).status == \
        health_pb2.HealthCheckResponse.SERVING


def _counts(metrics) -> dict:
    out = {}
    for metric in metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[(sample.labels["method"], sample.labels["code"])] = sample.value
    return out


def test_max_prompt_tokens_is_named(world):
    stub = pbg.GenerationStub(grpc.insecure_channel(world.target))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x" * 60, max_new_tokens=2), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-prompt-tokens" in err.value.details() and "limit is 48" in err.value.details()
    assert (FIELD_METADATA_KEY, "prompt") in tuple(err.value.trailing_metadata())
    assert stub.Generate(pb.GenerateRequest(prompt="x" * 40, max_new_tokens=2), timeout=WAIT).completion_tokens >= 1


_F32 = st.floats(width=32)
_CLEAN = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


@st.composite
def _requests(draw):
    kw = {"adapter_id": draw(st.sampled_from(ADAPTERS + ("missing",)) | st.text(max_size=6)),
          "request_id": draw(st.just("") | st.text(max_size=300)),
          "stop": draw(st.lists(st.text(max_size=8), max_size=20)), "ignore_eos": draw(st.booleans()),
          "temperature": draw(_F32), "top_k": draw(st.integers(-2**31, 2**31 - 1))}
    if draw(st.booleans()):
        kw["prompt"] = draw(st.text(max_size=70))
    if draw(st.booleans()):
        kw["messages"] = [pb.ChatMessage(role=r, content=c) for r, c in
                          draw(st.lists(st.tuples(st.text(max_size=6), st.text(max_size=20)), max_size=2))]
    for name, strategy in (("max_new_tokens", st.integers(-2**31, 2**31 - 1)), ("top_p", _F32),
                           ("repetition_penalty", _F32), ("seed", st.integers(0, 2**64 - 1))):
        if draw(st.booleans()):
            kw[name] = draw(strategy)
    return pb.GenerateRequest(**kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests(), streaming=st.booleans())
def test_any_request_gets_a_clean_status(world, request, streaming):
    stub = pbg.GenerationStub(grpc.insecure_channel(world.target))
    try:
        if streaming:
            list(stub.GenerateStream(request, timeout=WAIT))
        else:
            stub.Generate(request, timeout=WAIT)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
        assert exc.details() and "internal" not in exc.details().lower()
    assert code in _CLEAN, (code, request)
    assert world.engine.alive
    _assert_drained(world)
