"""The HTTP API over the real App (tiny NF4 Llama on the CPU): an adapter picked by ``model`` answers as gRPC."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import torch  # noqa: E402

from server.app import build_app  # noqa: E402
from server.config import EngineConfig, ModelConfig, ServerConfig  # noqa: E402
from server.engine.types import GenerationRequest, ResponseFormat, SamplingParams  # noqa: E402
from server.http.server import HttpServer, bind_http_socket  # noqa: E402
from server.model.base import BaseModelInfo  # noqa: E402
from server.rpc.client import Client  # noqa: E402
from server.rpc.server import build_grpc_server  # noqa: E402
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base  # noqa: E402
from tests.tiny_tokenizer import byte_tokenizer  # noqa: E402


def openai_key(t) -> str:
    """How OpenAI's legacy completions shape names a token: its text, or ``bytes:\\xNN`` for bytes that are no
    complete UTF-8 text (the byte tokenizer's ids >= 128 alone)."""
    try:
        t.token_bytes.decode("utf-8")
        return t.token
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in t.token_bytes)


class Pet(BaseModel):
    """A bounded object (enum, small integer, short lowercase string) so a random model completes it in time."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    name: str = Field(pattern="^[a-z]{1,5}$")


def test_adapter_by_model_matches_grpc_generate(tmp_path):
    base_dir = save_tiny_base(tmp_path)
    adapter_dir = make_adapter(base_dir, tmp_path / "src-a", seed=3)
    config = ServerConfig(model=ModelConfig(model=str(base_dir), device="cpu"),
                          engine=EngineConfig(adapter_slots=2, cpu_adapter_cache=2, max_lora_rank=8,
                                              max_new_tokens=64),
                          adapters_dir=tmp_path / "store", state_dir=tmp_path / "state", grpc_workers=4)
    info = BaseModelInfo(name=TINY_NAME, path=str(base_dir), device=torch.device("cpu"), weight_bytes=0,
                         model_type="llama", max_positions=128)
    app = build_app(config, model=load_nf4(base_dir), tokenizer=byte_tokenizer(), base_info=info)
    grpc_server, port = build_grpc_server(app, "127.0.0.1", 0)
    grpc_server.start()
    http = HttpServer(app, bind_http_socket("127.0.0.1", 0)).start()
    try:
        app.store.register("alpha", adapter_dir)
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0,
                            timeout=120)
        assert [m.id for m in oai.models.list()] == [TINY_NAME, "alpha"]
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            want = client.generate(GenerationRequest(request_id="", adapter_id="alpha", prompt="hello",
                                                     params=SamplingParams(max_new_tokens=6)))
        got = oai.completions.create(model="alpha", prompt="hello", max_tokens=6, temperature=0)
        assert got.choices[0].text == want.text and got.usage.completion_tokens == want.completion_tokens
        streamed = oai.completions.create(model="alpha", prompt="hello", max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want.text
        chat = oai.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert chat.usage.prompt_tokens > len("hi")  # the chat template was applied

        # Log-probabilities: the same values as gRPC Generate's (tests/engine/test_logprobs.py checks those against
        # transformers), unary and streamed, in both OpenAI shapes.
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            ref = client.generate(GenerationRequest(request_id="", adapter_id="alpha", prompt="hello",
                                                    params=SamplingParams(max_new_tokens=6, top_logprobs=3)))
        assert len(ref.logprobs) == ref.completion_tokens > 0
        lp = oai.completions.create(model="alpha", prompt="hello", max_tokens=6, temperature=0, logprobs=3)
        got = lp.choices[0].logprobs
        assert got.tokens == [openai_key(e) for e in ref.logprobs]
        assert got.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-6)
        assert got.top_logprobs == [{openai_key(t): pytest.approx(t.logprob, abs=1e-6) for t in e.top_logprobs}
                                    for e in ref.logprobs]
        streamed = oai.completions.create(model="alpha", prompt="hello", max_tokens=6, temperature=0, logprobs=3,
                                          stream=True)
        tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        assert tokens == got.tokens
        chat_lp = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
        content = chat_lp.choices[0].logprobs.content
        assert len(content) == chat_lp.usage.completion_tokens
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy: the top one

        # Structured output: the official client's own parse() (a pydantic model → strict json_schema), sampled
        # from a random tiny model, still gives a valid object; a schema that does not compile is a 400.
        parsed = oai.chat.completions.parse(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                            response_format=Pet, max_tokens=64, temperature=1.0, seed=4)
        pet = parsed.choices[0].message.parsed
        assert isinstance(pet, Pet) and parsed.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "foo"}}})
        assert info.value.param == "response_format.json_schema" and "foo" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:  # the engine's compile error names vLLM's parameter
            oai.completions.create(model="alpha", prompt="x", max_tokens=4, extra_body={"guided_regex": "(a"})
        assert info.value.param == "guided_regex"
        with pytest.raises(openai.APIError) as info:  # a grammar that fails mid-stream: an error chunk, not a drop
            for _ in oai.completions.create(model="alpha", prompt="x", max_tokens=8, stream=True,
                                            extra_body={"guided_regex": "((a{100}){100}){100}"}):
                pass
        assert "structured output failed" in str(info.value)
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            fmt = ResponseFormat("choice", choices=("cat", "dog", "fish"))
            want = client.generate(GenerationRequest(request_id="", adapter_id="alpha", prompt="pet:",
                                                     params=SamplingParams(max_new_tokens=8, response_format=fmt)))
        got = oai.completions.create(model="alpha", prompt="pet:", max_tokens=8, temperature=0,
                                     extra_body={"guided_choice": ["cat", "dog", "fish"]})
        assert got.choices[0].text == want.text and want.text in ("cat", "dog", "fish")
        # Echo: the prompt's log-probabilities are gRPC's prompt_logprobs (tests/engine/test_prompt_logprobs.py checks
        # those against transformers), the first prompt token null; then the completion's, offsets into the text.
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            ref = client.generate(GenerationRequest(request_id="", adapter_id="alpha", prompt="hello world",
                                                    params=SamplingParams(max_new_tokens=4, top_logprobs=2,
                                                                          prompt_logprobs=2)))
        assert len(ref.prompt_logprobs) == ref.prompt_tokens - 1 == len("hello world") - 1  # byte tokens, no BOS
        echo = oai.completions.create(model="alpha", prompt="hello world", max_tokens=4, temperature=0, logprobs=2,
                                      echo=True)
        got = echo.choices[0]
        assert got.text == "hello world" + ref.text
        want = [None] + [e.logprob for e in ref.prompt_logprobs] + [e.logprob for e in ref.logprobs]
        assert got.logprobs.token_logprobs == pytest.approx(want, abs=1e-6)
        assert got.logprobs.tokens[:len("hello world")] == list("hello world")
        assert got.logprobs.top_logprobs[0] is None and got.logprobs.top_logprobs[1] == {
            openai_key(t): pytest.approx(t.logprob, abs=1e-6) for t in ref.prompt_logprobs[0].top_logprobs}
        assert [got.text[o:o + len(t)] for o, t in zip(got.logprobs.text_offset, got.logprobs.tokens)
                ][:len("hello world")] == list("hello world")
        scored = oai.completions.create(model="alpha", prompt="hello world", max_tokens=0, logprobs=0, echo=True)
        assert scored.choices[0].text == "hello world" and scored.usage.completion_tokens == 0
        assert scored.choices[0].logprobs.token_logprobs == pytest.approx(want[:len("hello world")], abs=1e-6)
    finally:
        http.stop()
        grpc_server.stop(None)
        app.close()
