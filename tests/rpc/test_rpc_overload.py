"""Overload limits of the RPC layer: the Generation and stream caps leave health checks, watches and short calls
answering; configurable message size, stop-string limits; the serve / client flags that set them."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_fakes import PROMPT_BLOCK, FakeApp, wait_for, write_adapter_dir

from server.cli import build_parser, config_from_args
from server.config import EngineConfig, ServerConfig
from server.rpc.client import Client
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.interceptor import FIELD_METADATA_KEY

WAIT = 10.0


@pytest.fixture
def app(tmp_path) -> FakeApp:
    app = FakeApp(tmp_path / "adapters", max_generations=2, max_streams=2, max_message_bytes=8192)
    app.config = app.config.replace(engine=EngineConfig(max_new_tokens=64, max_stop_strings=2, max_stop_chars=5))
    return app


def _health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT).status


def test_saturated_generation_leaves_health_watch_and_admin_calls_answering(app, channel, generation, adapters):
    held = [generation.GenerateStream(pb.GenerateRequest(prompt=PROMPT_BLOCK), timeout=60) for _ in range(2)]
    wait_for(lambda: len(app.engine.streams) == 2, "two generations in flight")

    for call in (generation.Generate, generation.GenerateStream):
        with pytest.raises(grpc.RpcError) as err:
            reply = call(pb.GenerateRequest(prompt="hello"), timeout=WAIT)
            list(reply) if call is generation.GenerateStream else reply
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-generations" in err.value.details() and "2 generation" in err.value.details()

    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    training = pb_grpc.TrainingStub(channel)
    job = training.CreateTrainingJob(pb.CreateTrainingJobRequest(adapter_id="a", dataset_path="/d.jsonl"),
                                     timeout=WAIT)
    events = list(training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id), timeout=WAIT))
    assert events[-1].job.state == pb.JOB_STATE_SUCCEEDED
    adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=WAIT)

    held[0].cancel()  # a freed slot is taken again
    wait_for(lambda: any(s.cancelled.is_set() for s in app.engine.streams), "the cancelled stream to end")

    def admitted() -> bool:
        try:
            return generation.Generate(pb.GenerateRequest(prompt="hello again"), timeout=WAIT).text == "hello again"
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    wait_for(admitted, "a generation slot to come back")
    held[1].cancel()
    exhausted = app.metrics.requests.labels("qlora_server.v1.Generation/Generate", "RESOURCE_EXHAUSTED")._value.get()
    assert exhausted >= 1


def test_stream_cap_refuses_a_third_upload_or_watch_and_health_still_answers(app, channel, adapters):
    release = threading.Event()

    def slow_upload():
        yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="slow", replace=True))
        release.wait(30)

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        _code(lambda: adapters.UploadAdapter(slow_upload(), timeout=60)))) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        training = pb_grpc.TrainingStub(channel)

        def refused() -> bool:
            code = _code(lambda: list(training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id="x"),
                                                                timeout=WAIT)))
            return code == grpc.StatusCode.RESOURCE_EXHAUSTED

        wait_for(refused, "the two uploads to hold the stream cap")  # (NOT_FOUND until both are in)
        with pytest.raises(grpc.RpcError) as err:
            list(training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id="x"), timeout=WAIT))
        assert "--max-streams" in err.value.details()
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        for t in threads:
            t.join(WAIT)
    assert len(results) == 2  # both uploads ended (INVALID_ARGUMENT: no files), freeing the cap
    assert _code(lambda: list(training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id="x"), timeout=WAIT))) \
        == grpc.StatusCode.NOT_FOUND


def _code(fn):
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_messages_over_max_message_bytes_are_refused_and_the_client_chunks_below_it(app, address, generation,
                                                                                     tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        generation.Generate(pb.GenerateRequest(prompt="x" * 9000), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert generation.Generate(pb.GenerateRequest(prompt="y" * 4000), timeout=WAIT).text == "y" * 4000

    src = write_adapter_dir(tmp_path / "big", weights=b"FAKE-SAFETENSORS" + b"\0" * 30000)  # > 3 messages
    with Client(address, timeout=WAIT, max_message_bytes=8192) as client:
        info, _ = client.upload_adapter("big", src)
    assert info.size_bytes == 30016


@pytest.mark.parametrize("stop, option", [(["a", "b", "c"], "--max-stop-strings"), (["abcdef"], "--max-stop-chars")])
def test_stop_limits_are_configurable_and_named(generation, stop, option):
    with pytest.raises(grpc.RpcError) as err:
        generation.Generate(pb.GenerateRequest(prompt="hi", stop=stop), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and option in err.value.details()
    assert (FIELD_METADATA_KEY, "stop") in tuple(err.value.trailing_metadata())
    assert generation.Generate(pb.GenerateRequest(prompt="hi", stop=["a", "bcdef"]), timeout=WAIT).text == "hi"


def test_serve_and_client_flags():
    args = build_parser().parse_args(
        ["serve", "--max-generations", "3", "--max-streams", "2", "--max-message-bytes", "65536",
         "--max-prompt-tokens", "100", "--max-stop-strings", "4", "--max-stop-chars", "32"])
    config = config_from_args(args)
    assert (config.generation_cap, config.max_streams, config.max_message_bytes) == (3, 2, 65536)
    assert (config.engine.max_prompt_tokens, config.engine.max_stop_strings, config.engine.max_stop_chars) == \
        (100, 4, 32)
    assert config.rpc_workers == 3 + 2 + 16  # the caps plus spare threads for health and short calls
    defaults = config_from_args(build_parser().parse_args(["serve"]))
    assert defaults.generation_cap == defaults.engine.max_batch_size + defaults.engine.max_queue
    for argv in (["generate", "--prompt", "x"], ["adapters", "list"], ["jobs", "list"]):
        assert build_parser().parse_args(argv).max_message_bytes == ServerConfig().max_message_bytes
    assert build_parser().parse_args(["generate", "--prompt", "x", "--max-message-bytes", "8192"]) \
        .max_message_bytes == 8192
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-message-bytes", "10"])
