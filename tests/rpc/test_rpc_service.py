"""The servicers, interceptor, health and reflection over real gRPC on localhost, with a fake App behind them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rpc_fakes import (ADAPTER_CONFIG, PROMPT_BLOCK, PROMPT_CRASH, PROMPT_DEADLINE, PROMPT_EXHAUST,
                       SAFETENSORS_MAGIC, SECRET, write_adapter_dir)

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.interceptor import FIELD_METADATA_KEY

GENERATE = "qlora_server.v1.Generation/Generate"
GENERATE_STREAM = "qlora_server.v1.Generation/GenerateStream"
UPLOAD = "qlora_server.v1.Adapters/UploadAdapter"
WAIT = 30.0  # upper bound on waits for another thread; never asserted on


def _rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def _count(app, method: str, code: str) -> float:
    return app.metrics.registry.get_sample_value("qlora_server_requests_total",
                                                 {"method": method, "code": code}) or 0.0


def _wait_for(predicate) -> bool:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- Generation ----------------------------------------------------------------------------------------------------


def test_generate_echoes_the_prompt(generation, app):
    resp = generation.Generate(pb.GenerateRequest(prompt="hello there world"))
    assert resp.text == "hello there world"
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert (resp.prompt_tokens, resp.completion_tokens) == (3, 3)
    assert resp.timings.ttft_seconds == 0.5 and resp.timings.tpot_seconds == 0.125
    assert len(resp.request_id) == 32  # made by the server
    assert app.engine.submitted[0].request_id == resp.request_id
    assert app.engine.submitted[0].deadline is None  # no client deadline


def test_generate_keeps_the_callers_request_id_and_renders_messages(generation, app):
    resp = generation.Generate(pb.GenerateRequest(request_id="req-1", messages=[
        pb.ChatMessage(role="user", content="hi")]))
    assert resp.request_id == "req-1" and resp.text == "user: hi"


def test_generate_stream_sends_deltas_then_a_final_message(generation):
    msgs = list(generation.GenerateStream(pb.GenerateRequest(prompt="one two three", max_new_tokens=5)))
    assert "".join(m.text for m in msgs) == "one two three"
    assert len(msgs) == 3
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not m.HasField("timings") for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.prompt_tokens, last.completion_tokens) == (3, 3) and last.timings.total_seconds == 1.5
    assert len({m.request_id for m in msgs}) == 1


@pytest.mark.parametrize("kwargs", [{"logprobs": True}, {"top_logprobs": 2}])
def test_logprobs_in_unary_and_stream_are_the_same(generation, kwargs):
    unary = generation.Generate(pb.GenerateRequest(prompt="one two three", **kwargs))
    chunks = list(generation.GenerateStream(pb.GenerateRequest(prompt="one two three", **kwargs)))
    assert [m.token_id for m in unary.logprobs] == [0, 1, 2]
    assert [m.logprob for m in unary.logprobs] == [0.0, -0.125, -0.25]
    assert [len(m.top_logprobs) for m in unary.logprobs] == [kwargs.get("top_logprobs", 0)] * 3
    assert all(len(c.logprobs) == 1 for c in chunks)  # each chunk carries its own token's entry
    assert [lp for c in chunks for lp in c.logprobs] == list(unary.logprobs)


def test_prompt_logprobs_come_in_the_first_stream_message_and_the_unary_answer(generation):
    unary = generation.Generate(pb.GenerateRequest(prompt="one two three", prompt_logprobs=2))
    chunks = list(generation.GenerateStream(pb.GenerateRequest(prompt="one two three", prompt_logprobs=2)))
    assert [(m.token_id, m.token, m.logprob) for m in unary.prompt_logprobs] == [(1, " two", -0.25),
                                                                                 (2, " three", -0.5)]
    assert [len(m.top_logprobs) for m in unary.prompt_logprobs] == [2, 2]
    assert chunks[0].prompt_logprobs == unary.prompt_logprobs and chunks[0].text == ""
    assert not any(c.prompt_logprobs for c in chunks[1:])
    assert "".join(c.text for c in chunks) == unary.text == "one two three"
    assert not generation.Generate(pb.GenerateRequest(prompt="one two")).prompt_logprobs


def test_no_logprobs_unless_asked(generation):
    assert not generation.Generate(pb.GenerateRequest(prompt="one two")).logprobs
    assert not any(m.logprobs for m in generation.GenerateStream(pb.GenerateRequest(prompt="one two")))


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_adapter_is_not_found(generation, streaming):
    rpc = generation.GenerateStream if streaming else generation.Generate
    err = _rpc_error(rpc, pb.GenerateRequest(prompt="x", adapter_id="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()


@pytest.mark.parametrize("request_kwargs, field", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "messages": [pb.ChatMessage(role="user", content="y")]}, "prompt"),
    ({}, "prompt"),
    ({"messages": [pb.ChatMessage(role="", content="y")]}, "messages[0].role"),
    ({"prompt": "x", "max_new_tokens": 65}, "max_new_tokens"),  # over the server's limit of 64
    ({"prompt": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"prompt": "x", "top_logprobs": -1}, "top_logprobs"),
])
def test_invalid_argument_names_the_field(generation, app, request_kwargs, field):
    err = _rpc_error(generation.Generate, pb.GenerateRequest(**request_kwargs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ")
    assert (FIELD_METADATA_KEY, field) in tuple(err.trailing_metadata())
    assert not app.engine.submitted


def test_resource_exhausted_passes_through(generation):
    err = _rpc_error(generation.Generate, pb.GenerateRequest(prompt=PROMPT_EXHAUST))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.details()


def test_error_event_mid_stream_ends_the_rpc_with_its_status(generation):
    call = generation.GenerateStream(pb.GenerateRequest(prompt=PROMPT_DEADLINE))
    assert next(call).text == "partial"
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unexpected_exception_is_internal_without_details(generation, app):
    err = _rpc_error(generation.Generate, pb.GenerateRequest(prompt=PROMPT_CRASH))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in err.details() and "Traceback" not in err.details()
    assert _count(app, GENERATE, "INTERNAL") == 1


def test_client_cancelling_a_stream_cancels_the_engine_stream(generation, app):
    call = generation.GenerateStream(pb.GenerateRequest(prompt=PROMPT_BLOCK))
    assert app.engine.stream_started.wait(WAIT)
    call.cancel()
    assert app.engine.streams[0].cancelled.wait(WAIT)
    assert _wait_for(lambda: _count(app, GENERATE_STREAM, "CANCELLED") == 1)


def test_client_cancelling_a_unary_call_cancels_the_engine_stream(generation, app):
    future = generation.Generate.future(pb.GenerateRequest(prompt=PROMPT_BLOCK))
    assert app.engine.stream_started.wait(WAIT)
    future.cancel()
    assert app.engine.streams[0].cancelled.wait(WAIT)


def test_expired_client_deadline_is_counted_as_deadline_exceeded(generation, app):
    with pytest.raises(grpc.RpcError) as info:
        generation.Generate(pb.GenerateRequest(prompt=PROMPT_BLOCK), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for(lambda: _count(app, GENERATE, "DEADLINE_EXCEEDED") == 1)
    assert not _count(app, GENERATE, "CANCELLED")


def test_client_deadline_becomes_the_request_deadline(generation, app):
    before = time.monotonic()
    generation.Generate(pb.GenerateRequest(prompt="x"), timeout=600)
    deadline = app.engine.submitted[0].deadline
    # about 600 s after the call started (gRPC rounds the wire timeout, so allow slack both ways)
    assert deadline is not None and 500 < deadline - before < 700


def test_requests_are_counted_by_method_and_code(generation, app):
    generation.Generate(pb.GenerateRequest(prompt="a"))
    generation.Generate(pb.GenerateRequest(prompt="b"))
    list(generation.GenerateStream(pb.GenerateRequest(prompt="c")))
    _rpc_error(generation.Generate, pb.GenerateRequest(prompt="x", adapter_id="nope"))
    _rpc_error(generation.Generate, pb.GenerateRequest(prompt="x", temperature=-1))
    assert _count(app, GENERATE, "OK") == 2
    assert _count(app, GENERATE_STREAM, "OK") == 1
    assert _count(app, GENERATE, "NOT_FOUND") == 1
    assert _count(app, GENERATE, "INVALID_ARGUMENT") == 1


# --- health and reflection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "qlora_server.v1.Generation", "qlora_server.v1.Adapters"])
def test_health_is_serving(channel, service):
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"qlora_server.v1.Generation", "qlora_server.v1.Adapters", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_reflection_describes_the_messages(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="qlora_server.v1.GenerateRequest")
    resp = list(stub.ServerReflectionInfo(iter([req])))[0]
    assert resp.file_descriptor_response.file_descriptor_proto


# --- Adapters ------------------------------------------------------------------------------------------------------


def test_register_get_list_unregister(adapters, app, tmp_path):
    src = write_adapter_dir(tmp_path / "src")
    a = adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="hot-a", path=str(src)))
    assert a.adapter_id == "hot-a" and a.rank == 8 and a.lora_alpha == 16.0 and a.residency == pb.RESIDENCY_GPU
    assert dict(a.rank_pattern) == {"v_proj": 4} and list(a.target_modules) == ["q_proj"]
    adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="b", path=str(src)))
    assert adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="b")).residency == pb.RESIDENCY_DISK
    listed = adapters.ListAdapters(pb.ListAdaptersRequest()).adapters
    assert [x.adapter_id for x in listed] == ["b", "hot-a"]
    err = _rpc_error(adapters.RegisterAdapter, pb.RegisterAdapterRequest(adapter_id="b", path=str(src)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="b"))
    assert _rpc_error(adapters.GetAdapter, pb.GetAdapterRequest(adapter_id="b")).code() == grpc.StatusCode.NOT_FOUND


def test_register_requires_a_path(adapters):
    err = _rpc_error(adapters.RegisterAdapter, pb.RegisterAdapterRequest(adapter_id="a"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("path: ")


def _upload(adapter_id="up", config=None, weights=SAFETENSORS_MAGIC + b"\1" * 100, chunk=7, total=True,
            replace=False, files=None):
    config_bytes = json.dumps(config or ADAPTER_CONFIG).encode()
    files = files or [("adapter_config.json", config_bytes), ("adapter_model.safetensors", weights)]
    header = pb.UploadHeader(adapter_id=adapter_id, replace=replace)
    if total:
        header.total_bytes = sum(len(d) for _, d in files)
    yield pb.UploadAdapterRequest(header=header)
    for name, data in files:
        for i in range(0, len(data), chunk):
            yield pb.UploadAdapterRequest(chunk=pb.FileChunk(filename=name, data=data[i:i + chunk]))


def _staging_dirs(app) -> list[Path]:
    return list(Path(app.store.root).glob(".upload-*"))


def test_upload_registers_the_files_in_order(adapters, app):
    weights = SAFETENSORS_MAGIC + bytes(range(256)) * 3
    a = adapters.UploadAdapter(_upload(weights=weights, chunk=50))
    assert a.adapter_id == "up" and a.size_bytes == len(weights)
    stored = Path(app.store.root) / "up"
    assert (stored / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((stored / "adapter_config.json").read_text()) == ADAPTER_CONFIG
    assert not _staging_dirs(app)
    assert _count(app, UPLOAD, "OK") == 1


def test_upload_without_total_bytes(adapters, app):
    assert adapters.UploadAdapter(_upload(total=False)).adapter_id == "up"


@pytest.mark.parametrize("declare_total", [False, True])
def test_upload_over_the_cap_is_resource_exhausted(adapters, app, declare_total):
    big = SAFETENSORS_MAGIC + b"\0" * (app.config.max_upload_bytes + 1)
    err = _rpc_error(adapters.UploadAdapter, _upload(weights=big, chunk=4096, total=declare_total))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not _staging_dirs(app) and "up" not in app.store.adapters
    assert _count(app, UPLOAD, "RESOURCE_EXHAUSTED") == 1


def test_upload_bad_filename(adapters, app):
    err = _rpc_error(adapters.UploadAdapter, _upload(files=[("../evil.py", b"x")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("chunk.filename: ")
    assert not _staging_dirs(app)


@pytest.mark.parametrize("stream", [
    lambda: iter([pb.UploadAdapterRequest(chunk=pb.FileChunk(filename="adapter_config.json", data=b"{}"))]),
    lambda: iter([]),
])
def test_upload_missing_header(adapters, app, stream):
    err = _rpc_error(adapters.UploadAdapter, stream())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("header: ")
    assert not _staging_dirs(app)


def test_upload_second_header_is_rejected(adapters, app):
    msgs = list(_upload()) + [pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="up"))]
    err = _rpc_error(adapters.UploadAdapter, iter(msgs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("header: ")


def test_upload_truncated(adapters, app):
    msgs = list(_upload())[:-1]  # the header declares more bytes than arrive
    err = _rpc_error(adapters.UploadAdapter, iter(msgs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.details()
    assert not _staging_dirs(app)


def test_upload_missing_file(adapters, app):
    err = _rpc_error(adapters.UploadAdapter, _upload(files=[("adapter_config.json", b"{}")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_model.safetensors" in err.details()


def test_upload_invalid_content_is_rejected_by_the_store(adapters, app):
    err = _rpc_error(adapters.UploadAdapter, _upload(weights=b"not safetensors"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_model.safetensors" in err.details()
    assert not _staging_dirs(app) and "up" not in app.store.adapters


def test_upload_bad_id_and_existing_id(adapters, app):
    err = _rpc_error(adapters.UploadAdapter, _upload(adapter_id="../x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("header.adapter_id: ")
    adapters.UploadAdapter(_upload())
    err = _rpc_error(adapters.UploadAdapter, _upload())
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert adapters.UploadAdapter(_upload(replace=True)).adapter_id == "up"
    assert not _staging_dirs(app)


def test_binding_a_port_in_use_fails_naming_the_port(app, address):
    from server.errors import FailedPrecondition
    from server.rpc.server import build_grpc_server

    with pytest.raises(FailedPrecondition) as info:
        build_grpc_server(app, "127.0.0.1", int(address.rsplit(":", 1)[1]))
    assert info.value.field == "port"
