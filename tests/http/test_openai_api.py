"""The OpenAI-compatible API through the official openai client, over the fake App (echo engine)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpc_fakes import PROMPT_EXHAUST

from server.cli import build_parser, config_from_args
from server.config import ServerConfig
from server.engine.types import GenerationEvent, ResponseFormat
from server.errors import DeadlineExceeded, InvalidArgument, ServerError


def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list()] == ["fake/base", "alpha"]


def test_completion_reaches_the_engine_with_the_sampling_fields(client, app):
    out = client.completions.create(model="alpha", prompt="hello there world", max_tokens=7, temperature=0.5,
                                    top_p=0.9, seed=11, stop=["zz"])
    assert out.choices[0].text == "hello there world" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 3 and out.model == "alpha"
    req = app.engine.submitted[-1]
    assert req.adapter_id == "alpha" and req.prompt == "hello there world"
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.stop) == (7, 0.5, 0.9, 11, ("zz",))
    client.completions.create(model="fake/base", prompt="hi", stop="x")
    assert app.engine.submitted[-1].adapter_id == "" and app.engine.submitted[-1].params.stop == ("x",)


def test_chat_completion_passes_messages_to_the_engine(client, app):
    out = client.chat.completions.create(model="fake/base", messages=[{"role": "system", "content": "be brief"},
                                                                      {"role": "user", "content": "hi"}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "system: be brief user: hi"
    assert [(m.role, m.content) for m in app.engine.submitted[-1].messages] == [("system", "be brief"),
                                                                                ("user", "hi")]


@pytest.mark.parametrize("chat", [False, True])
def test_stream_chunks_concatenate_to_the_unary_text(client, chat):
    if chat:
        kw = {"model": "alpha", "messages": [{"role": "user", "content": "one two three"}], "seed": 1}
        whole = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        kw = {"model": "alpha", "prompt": "one two three", "seed": 1}
        whole = client.completions.create(**kw).choices[0].text
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
    assert len(chunks) > 1 and text == whole
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens >= 3
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(client):
    req = urllib.request.Request(f"{client.base_url}completions", method="POST",
                                 data=json.dumps({"model": "alpha", "prompt": "a b", "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.read().decode().split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi")
    assert info.value.code == "model_not_found" and info.value.param == "model"


@pytest.mark.parametrize("param, kw", [
    ("n", {"n": 2}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
])
def test_unsupported_params_are_bad_requests_naming_them(client, param, kw):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], **kw)
    assert info.value.param == param and param in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_logprob_params_reach_the_engine_and_bad_ones_name_the_param(client, app):
    """Chat: logprobs (bool) + top_logprobs (0..20, needs logprobs); completions: logprobs = k."""
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                   top_logprobs=3)
    assert (app.engine.submitted[-1].params.logprobs, app.engine.submitted[-1].params.top_logprobs) == (True, 3)
    client.completions.create(model="alpha", prompt="hi", logprobs=2)
    assert (app.engine.submitted[-1].params.logprobs, app.engine.submitted[-1].params.top_logprobs) == (True, 2)
    client.completions.create(model="alpha", prompt="hi", logprobs=0)  # the chosen token's only
    assert (app.engine.submitted[-1].params.logprobs, app.engine.submitted[-1].params.top_logprobs) == (True, 0)
    client.completions.create(model="alpha", prompt="hi")
    assert not app.engine.submitted[-1].params.wants_logprobs
    bad = [("top_logprobs", lambda: client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)),
           ("top_logprobs", lambda: client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=21)),
           ("logprobs", lambda: client.completions.create(model="alpha", prompt="hi", logprobs=21)),
           ("logprobs", lambda: client.completions.create(model="alpha", prompt="hi", logprobs=-1))]
    for param, call in bad:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == param


def test_echo_returns_the_prompt_then_the_completion(client, app):
    out = client.completions.create(model="alpha", prompt="hello there", echo=True)
    assert out.choices[0].text == "hello there" + "hello there" and out.choices[0].logprobs is None
    assert app.engine.submitted[-1].params.prompt_logprobs is None  # no logprobs asked: the prompt is not scored


def test_echo_with_logprobs_covers_the_prompt_tokens_first(client, app):
    """The fake scores prompt word i (i >= 1) at -i/4 with alternatives p{i}, p200 and generates the prompt again,
    word i at -i/8."""
    out = client.completions.create(model="alpha", prompt="hello there", echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert app.engine.submitted[-1].params.prompt_logprobs == 2 and app.engine.submitted[-1].params.top_logprobs == 2
    assert lp.tokens == ["hello", " there", "hello", " there"]
    assert lp.token_logprobs == [None, -0.25, 0.0, -0.125]  # the first prompt token has none, as OpenAI's
    assert lp.top_logprobs == [None, {"p1": -0.25, "p200": -4.0}, {"t0": 0.0, "t100": -3.0},
                               {"t1": -0.125, "t100": -3.0}]
    assert lp.text_offset == [0, 5, 11, 16]
    text = out.choices[0].text
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 2


def test_echo_with_max_tokens_0_scores_the_prompt_only(client, app):
    out = client.completions.create(model="alpha", prompt="a b c", echo=True, logprobs=0, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == "a b c" and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert choice.logprobs.tokens == ["a", " b", " c"] and choice.logprobs.token_logprobs == [None, -0.25, -0.5]
    assert choice.logprobs.top_logprobs == [None, {}, {}] and choice.logprobs.text_offset == [0, 1, 3]
    params = app.engine.submitted[-1].params
    assert (params.max_new_tokens, params.prompt_logprobs, params.wants_logprobs) == (1, 0, False)
    plain = client.completions.create(model="alpha", prompt="a b c", echo=True, max_tokens=0)
    assert plain.choices[0].text == "a b c" and plain.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [None, 0])
def test_streamed_echo_sends_the_prompt_first_and_equals_the_unary_answer(client, max_tokens):
    kw = {"model": "alpha", "prompt": "one two three", "echo": True, "logprobs": 1, "max_tokens": max_tokens}
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].text == "one two three"
    assert chunks[0].choices[0].logprobs.tokens == ["one", " two", " three"]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    merged = {key: [v for c in chunks if c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == {key: getattr(whole.logprobs, key) for key in merged}
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == (0 if max_tokens == 0 else 3)


def test_echo_errors_name_the_param(client):
    with pytest.raises(openai.BadRequestError) as info:  # chat completions have no echo
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"echo": True})
    assert info.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="hi", extra_body={"echo": "yes"})
    assert info.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as info:  # 0 only to score a prompt
        client.completions.create(model="alpha", prompt="hi", max_tokens=0)
    assert info.value.param == "max_tokens" and "echo" in info.value.message


def test_invalid_values_name_the_openai_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="hi", max_tokens=65)  # the fake's cap is 64
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="hi", top_p=1.5)
    assert info.value.param == "top_p"


def test_engine_errors_map_to_statuses(client):
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="alpha", prompt=PROMPT_EXHAUST)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="alpha", prompt="crash")
    assert "secret" not in str(info.value)


def test_http_port_flag_is_validated():
    parser = build_parser()
    assert config_from_args(parser.parse_args(["serve"])).http_port is None
    assert config_from_args(parser.parse_args(["serve", "--http-port", "8000"])).http_port == 8000
    for bad in ("-1", "65536", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--http-port", bad])
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(http_port=70000)
    assert info.value.field == "http_port"
    # the HTTP API takes the gRPC port's keys and TLS (tests/http/test_http_security.py)
    assert ServerConfig(http_port=8000, api_keys_file="keys.yaml", tls_cert="c.pem", tls_key="k.pem").http_port == 8000


@pytest.mark.parametrize("kw, want", [
    ({"response_format": {"type": "json_object"}}, ResponseFormat("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                 "schema": {"type": "object"}}}},
     ResponseFormat("json_schema", '{"type": "object"}')),
    ({"response_format": {"type": "text"}}, None),
    ({"extra_body": {"guided_regex": "[a-z]+"}}, ResponseFormat("regex", "[a-z]+")),
    ({"extra_body": {"guided_choice": ["yes", "no"]}}, ResponseFormat("choice", choices=("yes", "no"))),
    ({"extra_body": {"guided_json": {"type": "object"}}}, ResponseFormat("json_schema", '{"type": "object"}')),
    ({"extra_body": {"guided_json": '{"type":"array"}'}}, ResponseFormat("json_schema", '{"type":"array"}')),
])
def test_response_format_reaches_the_engine(client, app, kw, want):
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], **kw)
    assert app.engine.submitted[-1].params.response_format == want


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
    ({"extra_body": {"guided_choice": "yes"}}, "guided_choice"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_choice": ["a", ""]}}, "guided_choice"),
    ({"extra_body": {"guided_regex": ""}}, "guided_regex"),
    ({"extra_body": {"guided_json": "{oops"}}, "guided_json"),
    ({"extra_body": {"guided_json": 5}}, "guided_json"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ({"extra_body": {"guided_grammar": "root ::= \"a\""}}, "guided_grammar"),
    ({"extra_body": {"guided_regex": 5}}, "guided_regex"),
])
def test_bad_response_formats_name_the_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], **kw)
    assert info.value.param == param, info.value.message


class _RaisingStream:
    """An engine stream that yields ``n`` text events, then raises ``exc`` (as RequestStream raises a request's
    error); ``cancel`` records that the HTTP layer gave up on it."""

    def __init__(self, n: int, exc: Exception) -> None:
        self.n, self.exc, self.cancelled = n, exc, False

    def __iter__(self):
        for i in range(self.n):
            yield GenerationEvent("r", text=f"t{i}", token_ids=(i,))
        raise self.exc

    def cancel(self, error=None) -> None:
        self.cancelled = True


@given(n=st.integers(0, 4), chat=st.booleans(),
       exc=st.sampled_from([InvalidArgument("bad regex", field="response_format.regex"),
                            DeadlineExceeded("the deadline passed"), ServerError("decode failed"),
                            RuntimeError("a secret detail")]))
@settings(max_examples=40, deadline=None)
def test_an_error_the_engine_stream_raises_is_sent_as_an_error_chunk(n, chat, exc):
    """Whenever the engine's stream raises (before the first token or after some), the SSE body ends with one
    ``data: {"error": ...}`` chunk carrying the OpenAI error body, after the chunks already produced; nothing
    internal leaks."""
    from server.http import convert
    from server.http.api import EventStream
    from server.http.errors import error_response

    stream = _RaisingStream(n, exc)
    body = {"guided_regex": "x"}  # the client's parameter: an INVALID_ARGUMENT about the regex names it
    chunks = list(EventStream(stream, chat, "r", "alpha", rename=lambda e: convert.renamed(e, body)))
    assert len(chunks) == n + 2 and chunks[-1] == "data: [DONE]\n\n"
    error = json.loads(chunks[-2].removeprefix("data: "))
    want = convert.renamed(exc, body) if isinstance(exc, InvalidArgument) else exc
    assert error == error_response(want)[1]
    if isinstance(exc, InvalidArgument):
        assert error["error"]["param"] == "guided_regex"
    assert "secret" not in chunks[-2]
    assert stream.cancelled  # the request did not finish: the engine is told to stop it


@given(text=st.text(min_size=1, max_size=12), cuts=st.lists(st.integers(1, 6), min_size=1, max_size=40),
       chat=st.booleans())
@settings(max_examples=80, deadline=None)
def test_logprob_bytes_and_offsets_follow_the_token_bytes(text, cuts, chat):
    """Tokens that split a text's UTF-8 bytes anywhere (byte-level BPE cuts inside characters): chat reports each
    token's exact bytes; the legacy echo shape's text_offset of each token is the index of the character its first
    byte belongs to (oracle: the number of whole characters in the bytes before it)."""
    from server.engine.types import TokenLogprob, TopLogprob
    from server.http import convert

    raw = text.encode()
    pieces, at = [], 0
    for cut in cuts:
        if at >= len(raw):
            break
        pieces.append(raw[at:at + cut])
        at += cut
    if at < len(raw):
        pieces.append(raw[at:])
    entries = tuple(TokenLogprob(i, p.decode(errors="replace"), -1.0, (TopLogprob(i, "x", -1.0, p),), p)
                    for i, p in enumerate(pieces))
    if chat:
        body = convert.logprobs_body(entries, chat=True, asked=True)
        assert [bytes(c["bytes"]) for c in body["content"]] == pieces
        assert [bytes(t["bytes"]) for c in body["content"] for t in c["top_logprobs"]] == pieces
        return
    body = convert.prompt_logprobs_body(text, entries[1:])  # the engine scores tokens 1..n-1
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    assert body["text_offset"] == [len(raw[:s].decode("utf-8", errors="ignore")) for s in starts]
    assert body["token_logprobs"][0] is None and len(body["tokens"]) == len(pieces)


def test_max_completion_tokens_is_max_tokens_on_both_endpoints(client, app):
    client.completions.create(model="alpha", prompt="a b", extra_body={"max_completion_tokens": 3})
    assert app.engine.submitted[-1].params.max_new_tokens == 3
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                   max_completion_tokens=4, max_tokens=4)
    assert app.engine.submitted[-1].params.max_new_tokens == 4
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=4, max_tokens=5)
    assert info.value.param == "max_completion_tokens"


def test_framework_refusals_have_the_openai_error_shape(client):
    """A body FastAPI cannot parse (nested too deep for the JSON parser) and an unknown route: OpenAI-style
    ``{"error": {...}}`` bodies, not FastAPI's ``{"detail": ...}``."""
    base = str(client.base_url).rstrip("/")
    deep = "[" * 100_000 + "]" * 100_000
    for path, data in (("/completions", deep.encode()), ("/nope", b"{}")):
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        body = json.loads(info.value.read())
        assert set(body) == {"error"} and body["error"]["message"], body
        assert 400 <= info.value.code < 500
