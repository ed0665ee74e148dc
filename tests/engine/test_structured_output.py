"""Structured output through the engine: outputs checked by independent oracles (jsonschema, Python's re, the
choice list, transformers' own logits), constrained and free rows sharing batches, and clear errors."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.types import GenerationRequest, ResponseFormat, SamplingParams
from server.errors import InvalidArgument
from tests.engine_harness import build_engine
from tests.tiny import make_adapter, save_tiny_base

#: Compact JSON (no free whitespace), so a bounded schema has a bounded output length.
COMPACT = {"x-guidance": {"whitespace_flexible": False}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    base_dir = save_tiny_base(root)
    adapters = {name: make_adapter(base_dir, root / name, seed=seed, r=8, lora_alpha=16, std=0.5)
                for name, seed in (("a1", 1), ("a2", 2))}
    eng, _, _ = build_engine(root, base_dir, adapters, compute_dtype=torch.float32, max_batch_size=8)
    yield eng
    eng.stop()


def req(rid, fmt, prompt="hello", adapter="", **params):
    params = {"max_new_tokens": 100, "temperature": 1.0, "seed": 1, "response_format": fmt, **params}
    return GenerationRequest(request_id=rid, adapter_id=adapter, prompt=prompt, params=SamplingParams(**params))


# --- JSON Schema: random bounded schemas, output validated by jsonschema ----------------------------------------------

_leaf = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda n: {"type": "string", "pattern": f"^[a-z]{{0,{n}}}$"}, st.integers(0, 4)),
    st.lists(st.text("abcxyz\"\\é", min_size=1, max_size=3), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}),
)
_schemas = st.dictionaries(st.text("abcdef", min_size=1, max_size=4), _leaf, min_size=1, max_size=3).flatmap(
    lambda props: st.builds(lambda required: {"type": "object", "properties": props, "required": sorted(required),
                                              "additionalProperties": False, **COMPACT},
                            st.sets(st.sampled_from(sorted(props)))))


@given(schema=_schemas, seed=st.integers(0, 2**32), adapter=st.sampled_from(["", "a1"]))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sampled_json_is_valid_against_random_schemas(engine, schema, seed, adapter):
    result = engine.generate(req("js", ResponseFormat("json_schema", json.dumps(schema)), seed=seed,
                                 adapter=adapter))
    assert result.finish_reason == "stop", result  # bounded schema, compact JSON: it always completes
    jsonschema.validate(json.loads(result.text), {k: v for k, v in schema.items() if k != "x-guidance"})


def test_json_object_is_an_object(engine):
    for seed in range(3):
        result = engine.generate(req(f"jo{seed}", ResponseFormat("json_object"), seed=seed, max_new_tokens=120))
        text = result.text.lstrip()
        assert text.startswith("{"), text  # a prefix of an object even when cut short by max_new_tokens
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)


# --- regex and choice: Python's re and the list itself are the oracles ------------------------------------------------

_atoms = st.sampled_from(["a", "b", "[a-c]", "[0-9]", "x", "-", r"\.", "(ab|c)", "é"])
_regexes = st.lists(st.tuples(_atoms, st.sampled_from(["", "?", "{1,3}", "{2}"])), min_size=1, max_size=6).map(
    lambda parts: "".join(a + q for a, q in parts))


@given(pattern=_regexes, seed=st.integers(0, 2**32))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sampled_text_fullmatches_random_regexes(engine, pattern, seed):
    result = engine.generate(req("rx", ResponseFormat("regex", pattern), seed=seed))
    assert result.finish_reason in ("stop", "eos")  # eos: the match was complete and could have gone on
    assert re.fullmatch(pattern, result.text), (pattern, result.text)


@given(choices=st.lists(st.text(min_size=1, max_size=6).filter(lambda s: not {"\x00", "\x02"} & set(s)), min_size=1,
                        max_size=5, unique=True), seed=st.integers(0, 2**32))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sampled_text_is_one_of_random_choices(engine, choices, seed):
    # quotes, backslashes, control characters and non-ASCII text: the choice grammar escapes them all
    result = engine.generate(req("ch", ResponseFormat("choice", choices=tuple(choices)), seed=seed))
    assert result.text in choices, (choices, result.text)
    # ends as soon as nothing can follow (stop), or on EOS when a longer choice could still have followed
    assert result.finish_reason in ("stop", "eos")


# --- batches: constrained and free rows, different formats and adapters ------------------------------------------------

def test_constrained_and_free_rows_share_a_batch(engine):
    free = [req(f"free{i}", None, prompt=p, adapter=a, temperature=0.0, max_new_tokens=12, ignore_eos=True)
            for i, (p, a) in enumerate([("hello", ""), ("zz top", "a1"), ("hello", "a2")])]
    alone = [engine.generate(r).token_ids for r in free]
    formats = [ResponseFormat("regex", "[a-c]{3}-[0-9]{2}"), ResponseFormat("choice", choices=("yes", "no")),
               ResponseFormat("json_schema", json.dumps({"type": "array", "items": {"type": "integer"},
                                                         "maxItems": 3, **COMPACT}))]
    constrained = [req(f"c{i}", f, adapter=a, seed=i) for i, (f, a) in enumerate(zip(formats, ["a2", "", "a1"]))]
    streams = [engine.submit(r) for pair in zip(free, constrained) for r in pair]
    results = [s.result() for s in streams]
    assert [r.token_ids for r in results[0::2]] == alone  # free rows are untouched by their neighbours' masks
    rx, choice, arr = results[1::2]
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", rx.text)
    assert choice.text in ("yes", "no")
    if arr.finish_reason == "stop":
        jsonschema.validate(json.loads(arr.text), {"type": "array", "items": {"type": "integer"}, "maxItems": 3})


def test_greedy_choice_equals_argmax_over_allowed_logits(engine):
    """The first token under a two-choice grammar is the argmax of transformers' logits over the two allowed
    first bytes, and its log-probabilities are the softmax restricted to them."""
    prompt = "hello there"
    request = req("g", ResponseFormat("choice", choices=("yes", "no")), prompt=prompt, temperature=0.0,
                  top_logprobs=5)
    result = engine.generate(request)
    ids = torch.tensor([engine._tokenize(request)])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, -1].float()
    y, n = ord("y"), ord("n")  # the byte tokenizer: id = byte value
    first = y if logits[y] >= logits[n] else n
    assert result.token_ids[0] == first
    assert result.text == ("yes" if first == y else "no")
    top = result.logprobs[0].top_logprobs
    assert {t.token_id for t in top} == {y, n}  # only allowed tokens are listed, fewer than the 5 asked for
    restricted = torch.log_softmax(logits[[y, n]], dim=-1)
    expect = dict(zip((y, n), restricted.tolist()))
    assert all(abs(t.logprob - expect[t.token_id]) < 1e-4 for t in top)
    assert abs(math.fsum(math.exp(t.logprob) for t in top) - 1) < 1e-5


def test_ignore_eos_still_ends_when_the_format_is_complete(engine):
    result = engine.generate(req("ie", ResponseFormat("choice", choices=("ok",)), ignore_eos=True))
    assert (result.text, result.finish_reason) == ("ok", "stop")


def test_stop_string_and_length_still_apply(engine):
    cut = engine.generate(req("len", ResponseFormat("regex", "a{50}"), max_new_tokens=5))
    assert (cut.text, cut.finish_reason) == ("aaaaa", "length")
    stopped = engine.generate(req("st", ResponseFormat("regex", "ab{20}"), stop=("bbb",)))
    assert (stopped.text, stopped.finish_reason) == ("a", "stop")


def test_streamed_text_equals_unary(engine):
    fmt = ResponseFormat("regex", "[a-z]{5,9}")
    events = list(engine.submit(req("s1", fmt, seed=9)))
    assert "".join(e.text for e in events) == engine.generate(req("s2", fmt, seed=9)).text


# --- errors ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, field", [
    (ResponseFormat("json_schema", '{"type": "foo"}'), "response_format.json_schema"),
    (ResponseFormat("json_schema", "{not json"), "response_format.json_schema"),
    (ResponseFormat("json_schema", "[1, 2]"), "response_format.json_schema"),
    (ResponseFormat("json_schema", '{"$ref": "#/nope"}'), "response_format.json_schema"),
    (ResponseFormat("regex", "(unclosed"), "response_format.regex"),
    (ResponseFormat("regex", ""), "response_format.regex"),
    (ResponseFormat("choice"), "response_format.choice"),
    (ResponseFormat("choice", choices=("a", "")), "response_format.choice"),
    (ResponseFormat("yaml", "x"), "response_format"),
    # compile, but admit no output at all
    (ResponseFormat("json_schema", '{"$ref": "#"}'), "response_format.json_schema"),
    (ResponseFormat("json_schema", '{"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, '
                                   '"b": {"$ref": "#/$defs/a"}}}'), "response_format.json_schema"),
    (ResponseFormat("regex", r"[^\x00-\x{10FFFF}]"), "response_format.regex"),
])
def test_bad_formats_are_invalid_argument_naming_the_field(engine, fmt, field):
    with pytest.raises(InvalidArgument) as info:
        engine.submit(req("bad", fmt))
    assert info.value.field == field
    assert engine.counts() == (0, 0)  # nothing was queued


def test_a_failing_matcher_ends_only_its_row(engine, monkeypatch):
    """A matcher that enters its error state mid-request ends that request with a clear error; its batch
    neighbour finishes normally."""
    original = engine.grammar.bitmask

    def bitmask(matchers):
        seq = engine._by_id.get("broken")
        if seq is not None and len(seq.generated) >= 3 and not seq.matcher.is_error():
            assert not seq.matcher.consume_token(ord("0"))  # forbidden by [a-z]{8}: llguidance's error state
        return original(matchers)

    monkeypatch.setattr(engine.grammar, "bitmask", bitmask)
    bad = engine.submit(req("broken", ResponseFormat("regex", "[a-z]{8}")))
    good = engine.submit(req("fine", ResponseFormat("regex", "[0-9]{4}")))
    assert re.fullmatch("[0-9]{4}", good.result().text)
    with pytest.raises(Exception, match="structured output failed"):
        bad.result()


@pytest.mark.parametrize("fmt", [
    # a dead end after a prefix: the property's value can never start
    ResponseFormat("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/properties/a"}},
                                              "required": ["a"]})),
    # too complex for llguidance's lexer once the first token is consumed
    ResponseFormat("regex", "((a{100}){100}){100}"),
])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_format_that_fails_midway_is_an_error_not_a_finished_answer(engine, fmt, ignore_eos):
    """A format that compiles but fails while decoding ends its request with INVALID_ARGUMENT naming the field,
    never with a "complete" finish reason over an output that does not satisfy it."""
    try:
        result = engine.generate(req("dead", fmt, temperature=0.0, ignore_eos=ignore_eos))
    except InvalidArgument as exc:
        assert exc.field == f"response_format.{fmt.kind}" and "structured output failed" in str(exc)
        assert len(str(exc)) < 400  # llguidance's state dump is not passed on
    else:
        pytest.fail(f"finished {result.finish_reason!r} with {result.text!r}")


def test_boolean_schemas(engine):
    """``true`` is any JSON value, ``false`` admits nothing (a 400 at submit, not an internal error)."""
    result = engine.generate(req("any", ResponseFormat("json_schema", "true"), temperature=0.0, max_new_tokens=60))
    if result.finish_reason == "stop":
        json.loads(result.text)
    with pytest.raises(InvalidArgument) as info:
        engine.submit(req("none", ResponseFormat("json_schema", "false")))
    assert info.value.field == "response_format.json_schema" and "admits no output" in str(info.value)


def test_compile_errors_keep_the_reason_and_drop_the_state():
    """llguidance's messages: the reason after a regex's caret line is kept; the parser state is not."""
    from server.engine.grammar import MAX_ERROR_CHARS, short_error

    regex = 'at 1(8): invalid regex "(a" (in regex): regex parse error:\n    (a\n    ^\nerror: unclosed group\n'
    assert "unclosed group" in short_error(regex) and "\n" not in short_error(regex)
    state = "NoExtensionBias\n<state>\nTokens: ⟦⟧\nParser: {\n  \"compute_time_us\": 5\n}"
    assert short_error(state) == "NoExtensionBias"
    assert len(short_error("x" * 5000)) <= MAX_ERROR_CHARS + 3


def test_a_format_only_eos_tokens_could_spell_is_refused_at_submit(engine):
    """Bytes 0 and 2 are the tiny model's EOS ids: a choice made of them can never be generated as text, so the
    format admits no output and is refused at submit (it would otherwise end at once with EOS)."""
    assert {0, 2} <= engine.eos_ids
    with pytest.raises(InvalidArgument) as info:
        engine.submit(req("eos-only", ResponseFormat("choice", choices=("\x02",))))
    assert info.value.field == "response_format.choice" and "admits no output" in str(info.value)
