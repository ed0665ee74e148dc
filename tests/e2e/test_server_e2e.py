"""The real server as a subprocess, over real gRPC, on a tiny NF4 model: adapters, mixed batches, errors, restart."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from tests.server_process import start_server
from tests.tiny import make_adapter, save_tiny_base
from tests.tiny_tokenizer import save_byte_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base = save_tiny_base(root)
    save_byte_tokenizer(base)
    adapters = {
        "ad-r4": make_adapter(base, root / "src-r4", seed=1, r=4, lora_alpha=8),
        "ad-r16": make_adapter(base, root / "src-r16", seed=2, r=16, lora_alpha=16,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]),
    }
    server = start_server(str(base), root / "store", root / "server.log", "--max-lora-rank", "16")
    yield root, base, adapters, server
    server.stop()


def gen_req(adapter="", prompt="hello world", n=10, **kw):
    return pb.GenerateRequest(adapter_id=adapter, prompt=prompt, max_new_tokens=n, **kw)


def test_health_and_reflection(world):
    _, _, _, server = world
    health = health_pb2_grpc.HealthStub(server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"qlora_server.v1.Generation", "qlora_server.v1.Adapters", "grpc.health.v1.Health"} <= names


def test_register_list_and_mixed_batch(world):
    _, _, adapters, server = world
    gen, ad = server.stubs()
    for name, path in adapters.items():
        info = ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=str(path), replace=True))
        assert info.adapter_id == name and len(info.sha256) == 64 and info.size_bytes > 0
    listed = {a.adapter_id: a for a in ad.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert listed["ad-r4"].rank == 4 and listed["ad-r16"].rank == 16
    with pytest.raises(grpc.RpcError) as err:
        ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="ad-r4", path=str(adapters["ad-r4"])))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    alone = {a: gen.Generate(gen_req(a)).text for a in ["", *adapters]}
    assert len(set(alone.values())) == 3  # each adapter changes the answer

    # The same requests concurrently, with an unknown adapter in the same moment: it alone fails.
    results, errors = {}, {}

    def call(key, adapter):
        try:
            results[key] = gen.Generate(gen_req(adapter)).text
        except grpc.RpcError as e:
            errors[key] = e.code()

    threads = [threading.Thread(target=call, args=(f"{a}#{i}", a)) for i in range(2)
               for a in ["", *adapters, "missing"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {"missing#0": grpc.StatusCode.NOT_FOUND, "missing#1": grpc.StatusCode.NOT_FOUND}
    for key, text in results.items():
        assert text == alone[key.split("#")[0]], key
    residency = {a.adapter_id: a.residency for a in ad.ListAdapters(pb.ListAdaptersRequest()).adapters}
    # Both were just used, so both sit in accelerator slots (the engine's LoRA banks).
    assert residency == {name: pb.RESIDENCY_GPU for name in adapters}


def test_stream_equals_unary(world):
    _, _, _, server = world
    gen, _ = server.stubs()
    unary = gen.Generate(gen_req(n=12))
    pieces = list(gen.GenerateStream(gen_req(n=12)))
    assert "".join(p.text for p in pieces) == unary.text
    assert pieces[-1].completion_tokens == unary.completion_tokens == 12
    assert unary.prompt_tokens == len("hello world")
    assert unary.timings.ttft_seconds > 0 and unary.timings.total_seconds >= unary.timings.ttft_seconds


def test_bad_arguments_name_the_field(world):
    _, _, _, server = world
    gen, ad = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        gen.Generate(gen_req(temperature=-1.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="x", path="/nonexistent"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        gen.Generate(gen_req(prompt="x" * 500))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancel_and_deadline_free_the_row(world):
    _, _, _, server = world
    gen, _ = server.stubs()
    stream = gen.GenerateStream(gen_req(n=100))
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        gen.Generate(gen_req(n=100), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running = None
    for _ in range(300):  # bounded wait for the engine to retire both rows
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
        running = next(l for l in text.splitlines() if l.startswith("qlora_server_running_requests "))
        if running.endswith(" 0.0"):
            break
        time.sleep(0.05)
    assert running.endswith(" 0.0"), running
    assert "process_resident_memory_bytes" in text


def test_unregister_then_restart_keeps_the_registry(world):
    root, base, adapters, server = world
    gen, ad = server.stubs()
    ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="ad-r4", path=str(adapters["ad-r4"]), replace=True))
    ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="ad-r16", path=str(adapters["ad-r16"]), replace=True))
    before = gen.Generate(gen_req("ad-r16")).text
    ad.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="ad-r4"))
    with pytest.raises(grpc.RpcError) as err:
        gen.Generate(gen_req("ad-r4"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.stop() == 0
    again = start_server(str(base), root / "store", root / "server2.log", "--max-lora-rank", "16")
    try:
        gen2, ad2 = again.stubs()
        assert [a.adapter_id for a in ad2.ListAdapters(pb.ListAdaptersRequest()).adapters] == ["ad-r16"]
        assert gen2.Generate(gen_req("ad-r16")).text == before
    finally:
        again.stop()


def test_startup_log_names_the_compute_dtype_and_carries_no_library_noise(world):
    """The log says which compute dtype "auto" chose and why; progress bars and the bitsandbytes warning about an
    optional hub kernel (not the user's concern) stay out of it."""
    _, _, _, server = world
    log = server.log_path.read_text(errors="replace")
    assert "INFO server.model.dtype: compute dtype " in log and ": auto: CPU " in log
    assert "Loading weights" not in log and "kernels-community" not in log
