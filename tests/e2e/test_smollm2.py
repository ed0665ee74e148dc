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


def test_schema_makes_the_base_model_emit_valid_json_on_every_heldout_prompt(smol):
    """Structured output's acceptance test: the base SmolLM2, which fails the extraction demo as free text, emits
    JSON valid against the answer's schema (checked by jsonschema) for all 100 held-out prompts when the request
    carries the schema; the demo's own scorer (examples/extraction/eval_server.py) does the work."""
    import sys
    from pathlib import Path

    from server.rpc.client import Client

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "extraction"))
    from eval_server import score
    from evaluate import load_cases

    server, _ = smol
    cases = load_cases(Path(__file__).resolve().parents[2] / "examples" / "extraction" / "heldout.jsonl")
    assert len(cases) == 100
    with Client(server.target, timeout=600) as client:
        constrained = score(client, "", cases, max_new_tokens=96, concurrency=16, schema=True)
        free = score(client, "", cases[:16], max_new_tokens=64, concurrency=16, schema=False)
    assert constrained["schema_valid"] == 1.0, constrained
    assert free["schema_valid"] < 1.0, free  # unconstrained, the base model does not manage it
