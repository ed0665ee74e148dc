"""End to end over gRPC with the real App (tiny NF4 Llama on the CPU): upload, generate, stream, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import torch  # noqa: E402

from server.app import build_app  # noqa: E402
from server.config import EngineConfig, ModelConfig, ServerConfig  # noqa: E402
from server.engine.types import ChatMessage, GenerationRequest, SamplingParams  # noqa: E402
from server.model.base import BaseModelInfo  # noqa: E402
from server.rpc.client import Client, ClientError  # noqa: E402
from server.rpc.server import build_grpc_server  # noqa: E402
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base  # noqa: E402
from tests.tiny_tokenizer import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpc-e2e")
    base_dir = save_tiny_base(root)
    adapter_dir = make_adapter(base_dir, root / "src-a", seed=3)
    config = ServerConfig(model=ModelConfig(model=str(base_dir), device="cpu"),
                          engine=EngineConfig(adapter_slots=2, cpu_adapter_cache=2, max_lora_rank=8,
                                              max_new_tokens=16),
                          adapters_dir=root / "store", grpc_workers=4)
    model = load_nf4(base_dir)
    info = BaseModelInfo(name=TINY_NAME, path=str(base_dir), device=torch.device("cpu"), weight_bytes=0,
                         model_type="llama", max_positions=128)
    app = build_app(config, model=model, tokenizer=byte_tokenizer(), base_info=info)
    server, port = build_grpc_server(app, "127.0.0.1", 0)
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=120) as client:
        yield client, adapter_dir, app
    server.stop(None)
    app.close()


def test_upload_then_generate_with_the_adapter(served):
    client, adapter_dir, app = served
    info, residency = client.upload_adapter("alpha", adapter_dir, chunk_bytes=4096)
    assert info.adapter_id == "alpha" and info.rank == 4 and residency in ("disk", "cpu", "gpu")
    assert not list(app.store.root.glob(".upload-*"))
    assert [i.adapter_id for i, _ in client.list_adapters()] == ["alpha"]

    params = SamplingParams(max_new_tokens=6)
    base = client.generate(GenerationRequest(request_id="", prompt="hello", params=params))
    tuned = client.generate(GenerationRequest(request_id="", adapter_id="alpha", prompt="hello", params=params))
    assert base.completion_tokens >= 1 and tuned.completion_tokens >= 1
    assert base.finish_reason in ("length", "eos") and base.prompt_tokens > 0

    events = list(client.generate_stream(GenerationRequest(request_id="s1", adapter_id="alpha", prompt="hello",
                                                           params=params)))
    assert events[-1].finished and events[-1].request_id == "s1"
    assert "".join(e.text for e in events) == tuned.text  # greedy: same answer streamed or not


def test_errors_from_the_real_engine(served):
    client, _, _ = served
    with pytest.raises(ClientError) as info:
        client.generate(GenerationRequest(request_id="", adapter_id="missing", prompt="hi"))
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(ClientError) as info:
        client.generate(GenerationRequest(request_id="", prompt="hi", params=SamplingParams(max_new_tokens=17)))
    assert info.value.code == "INVALID_ARGUMENT" and info.value.message.startswith("max_new_tokens: ")


def test_chat_messages_are_rendered_by_the_engine(served):
    client, _, _ = served
    result = client.generate(GenerationRequest(request_id="", messages=(ChatMessage("user", "hi"),),
                                               params=SamplingParams(max_new_tokens=2)))
    assert result.completion_tokens >= 1 and result.prompt_tokens > len("hi")  # the template added tokens
