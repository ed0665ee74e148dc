"""The embedded default model end to end: SmolLM2-135M-Instruct in NF4 answers a chat question over gRPC."""

from __future__ import annotations

import pytest

from server.model.embedded import converted_dir, ensure_converted
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from tests.server_process import start_server
from tests.tiny import make_adapter

QUESTION = [pb.ChatMessage(role="user", content="What is the capital of France?")]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    cache = converted_dir(_cache_dir()).parent.parent
    model_dir = ensure_converted(cache)  # converts the GGUF once (~25 s), then reuses it
    # A small random adapter on the attention projections: the answer should change but stay language.
    adapter = make_adapter(model_dir, root / "nudge", seed=3, r=8, lora_alpha=16, std=0.02,
                           target_modules=["q_proj", "v_proj"])
    server = start_server("smollm2", root / "store", root / "server.log", "--cache-dir", str(cache))
    yield server, adapter
    server.stop()


def _cache_dir():
    from server.config import ModelConfig

    return ModelConfig().cache_dir


def test_chat_answer_with_and_without_adapter(smol):
    server, adapter = smol
    gen, ad = server.stubs()
    base = gen.Generate(pb.GenerateRequest(messages=QUESTION, max_new_tokens=24))
    assert "Paris" in base.text, base.text
    assert base.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    info = ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="nudge", path=str(adapter)))
    assert info.base_model.endswith("SmolLM2-135M-Instruct")
    tuned = gen.Generate(pb.GenerateRequest(adapter_id="nudge", messages=QUESTION, max_new_tokens=24))
    assert tuned.text and tuned.text != base.text
    again = gen.Generate(pb.GenerateRequest(messages=QUESTION, max_new_tokens=24))
    assert again.text == base.text  # the base model is untouched by the adapter's slot
