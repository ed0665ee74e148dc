"""Conversion between protobuf messages and plain types: defaults, presence, field-named errors, round trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.types import AdapterInfo
from server.engine.types import (MAX_TOP_LOGPROBS, ChatMessage, GenerationEvent, GenerationRequest,
                                 GenerationResult, ResponseFormat, SamplingParams, Timings, TokenLogprob, TopLogprob)
from server.errors import InvalidArgument
from server.rpc import convert
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb

LIMIT = 512


def _convert(msg: pb.GenerateRequest, **kw) -> GenerationRequest:
    return convert.generation_request_from_proto(msg, default_request_id="rid", max_new_tokens_limit=LIMIT, **kw)


def _field_error(msg: pb.GenerateRequest) -> str | None:
    with pytest.raises(InvalidArgument) as info:
        _convert(msg)
    return info.value.field


def test_prompt_request_takes_defaults_for_unset_fields():
    req = _convert(pb.GenerateRequest(prompt="hi"))
    assert req.prompt == "hi" and req.messages == () and req.adapter_id == "" and req.request_id == "rid"
    assert req.params == SamplingParams()  # max_new_tokens 256, top_p 1, repetition_penalty 1, greedy, no seed
    assert req.deadline is None


def test_explicit_fields_and_zero_seed_are_kept():
    msg = pb.GenerateRequest(request_id="mine", adapter_id="a1", prompt="p", max_new_tokens=7, temperature=0.5,
                             top_p=0.9, top_k=40, repetition_penalty=1.2, seed=0, stop=["\n\n", "END"])
    req = _convert(msg, deadline=123.0)
    assert req.request_id == "mine" and req.adapter_id == "a1" and req.deadline == 123.0
    assert req.params == SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40,
                                        repetition_penalty=1.2, seed=0, stop=("\n\n", "END"))


def test_messages_are_converted_in_order():
    msg = pb.GenerateRequest(messages=[pb.ChatMessage(role="system", content="be brief"),
                                       pb.ChatMessage(role="user", content="hi")])
    req = _convert(msg)
    assert req.prompt is None
    assert req.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))


@pytest.mark.parametrize("msg, field", [
    (pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]), "prompt"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(content="b")]),
     "messages[1].role"),
    (pb.GenerateRequest(prompt="x", temperature=-1), "temperature"),
    (pb.GenerateRequest(prompt="x", temperature=float("nan")), "temperature"),
    (pb.GenerateRequest(prompt="x", top_p=0.0), "top_p"),  # explicitly 0 is not "unset"
    (pb.GenerateRequest(prompt="x", max_new_tokens=0), "max_new_tokens"),
    (pb.GenerateRequest(prompt="x", max_new_tokens=LIMIT + 1), "max_new_tokens"),
    (pb.GenerateRequest(prompt="x", top_k=-1), "top_k"),
    (pb.GenerateRequest(prompt="x", repetition_penalty=0.0), "repetition_penalty"),
    (pb.GenerateRequest(prompt="x", stop=[""]), "stop"),
    (pb.GenerateRequest(prompt="x", request_id="r" * 300), "request_id"),
])
def test_bad_requests_name_the_proto_field(msg, field):
    assert _field_error(msg) == field


def test_both_prompt_and_messages_message_is_clear():
    with pytest.raises(InvalidArgument, match="exactly one of prompt and messages"):
        _convert(pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]))


def test_client_request_round_trips_through_the_wire():
    req = GenerationRequest(request_id="r1", adapter_id="a", messages=(ChatMessage("user", "hello"),),
                            params=SamplingParams(max_new_tokens=9, temperature=0.25, top_p=0.5, top_k=3,
                                                  repetition_penalty=1.5, seed=42, stop=("x",)))
    wire = pb.GenerateRequest.FromString(convert.generate_request_to_proto(req).SerializeToString())
    assert convert.generation_request_from_proto(wire, default_request_id="unused",
                                                 max_new_tokens_limit=LIMIT) == req


def test_client_request_leaves_defaults_unset():
    msg = convert.generate_request_to_proto(GenerationRequest(request_id="", prompt="p"))
    assert msg.prompt == "p"
    assert not any(msg.HasField(f) for f in ("seed", "max_new_tokens", "top_p", "repetition_penalty"))
    assert convert.generate_request_to_proto(GenerationRequest(request_id="", prompt="p", params=SamplingParams(
        seed=0, top_p=0.5))).seed == 0



def test_ignore_eos_defaults_off_and_round_trips():
    assert _convert(pb.GenerateRequest(prompt="p")).params.ignore_eos is False
    assert _convert(pb.GenerateRequest(prompt="p", ignore_eos=True)).params.ignore_eos is True
    req = GenerationRequest(request_id="r", prompt="p", params=SamplingParams(max_new_tokens=5, ignore_eos=True))
    msg = convert.generate_request_to_proto(req)
    assert msg.ignore_eos is True
    wire = pb.GenerateRequest.FromString(msg.SerializeToString())
    assert convert.generation_request_from_proto(wire, default_request_id="x", max_new_tokens_limit=LIMIT) == req
    assert convert.generate_request_to_proto(GenerationRequest(request_id="", prompt="p")).ignore_eos is False


def test_logprobs_fields_default_off_round_trip_and_are_validated():
    assert _convert(pb.GenerateRequest(prompt="p")).params.wants_logprobs is False
    params = _convert(pb.GenerateRequest(prompt="p", top_logprobs=MAX_TOP_LOGPROBS)).params
    assert params.top_logprobs == MAX_TOP_LOGPROBS and params.wants_logprobs  # k > 0 implies logprobs
    assert _convert(pb.GenerateRequest(prompt="p", logprobs=True)).params.wants_logprobs
    for k in (-1, MAX_TOP_LOGPROBS + 1, 2**31 - 1):
        assert _field_error(pb.GenerateRequest(prompt="p", top_logprobs=k)) == "top_logprobs"
    req = GenerationRequest(request_id="r", prompt="p",
                            params=SamplingParams(max_new_tokens=5, logprobs=True, top_logprobs=3))
    wire = pb.GenerateRequest.FromString(convert.generate_request_to_proto(req).SerializeToString())
    assert convert.generation_request_from_proto(wire, default_request_id="x", max_new_tokens_limit=LIMIT) == req


_formats = st.one_of(
    st.builds(lambda t: ResponseFormat("json_schema", t), st.sampled_from(['{"type": "object"}', "true",
                                                                         '{"enum": ["a\\"b", "é"]}'])),
    st.just(ResponseFormat("json_object")),
    st.builds(lambda t: ResponseFormat("regex", t), st.text(min_size=1, max_size=20)),
    st.builds(lambda c: ResponseFormat("choice", choices=tuple(c)),
              st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5)),
)


@given(fmt=_formats)
@settings(max_examples=50, deadline=None)
def test_response_format_round_trips_through_the_wire(fmt):
    req = GenerationRequest(request_id="r", prompt="p", params=SamplingParams(max_new_tokens=5, response_format=fmt))
    wire = pb.GenerateRequest.FromString(convert.generate_request_to_proto(req).SerializeToString())
    assert convert.generation_request_from_proto(wire, default_request_id="x", max_new_tokens_limit=LIMIT) == req


@pytest.mark.parametrize("fmt, field", [
    (pb.ResponseFormat(), "response_format"),
    (pb.ResponseFormat(json_object=False), "response_format.json_object"),
    (pb.ResponseFormat(json_schema="{oops"), "response_format.json_schema"),
    (pb.ResponseFormat(json_schema="[]"), "response_format.json_schema"),
    (pb.ResponseFormat(regex=""), "response_format.regex"),
    (pb.ResponseFormat(choice=pb.Choices()), "response_format.choice"),
    (pb.ResponseFormat(choice=pb.Choices(values=["a", ""])), "response_format.choice"),
])
def test_bad_response_formats_name_the_field(fmt, field):
    assert _field_error(pb.GenerateRequest(prompt="p", response_format=fmt)) == field


LOGPROBS = (TokenLogprob(5, "a", -0.5, (TopLogprob(5, "a", -0.5, b"a"), TopLogprob(7, "<s>", -1.25))),
            TokenLogprob(9, " b", -float("inf"), (), b" b"),
            TokenLogprob(11, "\ufffd", -2.0, (TopLogprob(11, "\ufffd", -2.0, b"\xe6\x97"),), b"\xe6\x97"))


def test_logprobs_round_trip_in_responses_and_stream_events():
    result = GenerationResult("r", "a b", (5, 9), "length", 2, 2, TIMINGS_FOR_LOGPROBS, LOGPROBS)
    wire = pb.GenerateResponse.FromString(convert.generate_response_to_proto(result).SerializeToString())
    assert convert.generation_result_from_proto(wire).logprobs == LOGPROBS  # values exact in float32
    for event in (GenerationEvent("r", text="a b", token_ids=(5, 9), logprobs=LOGPROBS),
                  GenerationEvent("r", text="", finished=True, finish_reason="eos", logprobs=LOGPROBS[:1],
                                  timings=TIMINGS_FOR_LOGPROBS)):
        msg = pb.GenerateStreamResponse.FromString(convert.stream_event_to_proto(event).SerializeToString())
        assert convert.stream_event_from_proto(msg).logprobs == event.logprobs
    assert not convert.generate_response_to_proto(dataclasses.replace(result, logprobs=())).logprobs


TIMINGS_FOR_LOGPROBS = Timings(queue_seconds=0.5, ttft_seconds=1.0, total_seconds=3.0, tpot_seconds=0.25)


def test_prompt_logprobs_field_presence_round_trip_and_validation():
    """Unset = None (no scoring); 0 is a value of its own (set on the wire); 0..20 accepted, else INVALID_ARGUMENT
    naming prompt_logprobs."""
    assert _convert(pb.GenerateRequest(prompt="p")).params.prompt_logprobs is None
    for k in (0, 1, MAX_TOP_LOGPROBS):
        assert _convert(pb.GenerateRequest(prompt="p", prompt_logprobs=k)).params.prompt_logprobs == k
    for k in (-1, MAX_TOP_LOGPROBS + 1, 2**31 - 1):
        assert _field_error(pb.GenerateRequest(prompt="p", prompt_logprobs=k)) == "prompt_logprobs"
    for k in (None, 0, 7):
        req = GenerationRequest(request_id="r", prompt="p", params=SamplingParams(max_new_tokens=5,
                                                                                  prompt_logprobs=k))
        msg = convert.generate_request_to_proto(req)
        assert msg.HasField("prompt_logprobs") == (k is not None)
        wire = pb.GenerateRequest.FromString(msg.SerializeToString())
        assert convert.generation_request_from_proto(wire, default_request_id="x", max_new_tokens_limit=LIMIT) == req
    with pytest.raises(InvalidArgument) as info:  # a value the int32 cannot hold names the field client-side too
        convert.generate_request_to_proto(GenerationRequest(request_id="r", prompt="p",
                                                            params=SamplingParams(prompt_logprobs=2**40)))
    assert info.value.field == "prompt_logprobs"


def test_prompt_logprobs_round_trip_in_responses_and_stream_events():
    result = GenerationResult("r", "a b", (5, 9, 11), "length", 4, 3, TIMINGS_FOR_LOGPROBS, LOGPROBS,
                              prompt_logprobs=LOGPROBS[::-1])
    msg = convert.generate_response_to_proto(result)
    assert [m.token_id for m in msg.prompt_logprobs] == [11, 9, 5] and len(msg.logprobs) == 3
    wire = pb.GenerateResponse.FromString(msg.SerializeToString())
    assert convert.generation_result_from_proto(wire).prompt_logprobs == LOGPROBS[::-1]
    for event in (GenerationEvent("r", prompt_logprobs=LOGPROBS),  # the engine's first event: no text
                  GenerationEvent("r", text="", finished=True, finish_reason="eos", prompt_logprobs=LOGPROBS[:1],
                                  timings=TIMINGS_FOR_LOGPROBS)):
        msg = pb.GenerateStreamResponse.FromString(convert.stream_event_to_proto(event).SerializeToString())
        back = convert.stream_event_from_proto(msg)
        assert back.prompt_logprobs == event.prompt_logprobs and back.finished == event.finished
    assert not convert.generate_response_to_proto(dataclasses.replace(result, prompt_logprobs=())).prompt_logprobs


TIMINGS = Timings(queue_seconds=0.5, ttft_seconds=1.0, total_seconds=3.0, tpot_seconds=0.25)


def test_result_round_trip():
    result = GenerationResult(request_id="r", text="hello", token_ids=(), finish_reason="stop", prompt_tokens=3,
                              completion_tokens=2, timings=TIMINGS)
    msg = convert.generate_response_to_proto(result)
    assert msg.finish_reason == pb.FINISH_REASON_STOP and msg.timings.ttft_seconds == 1.0
    assert convert.generation_result_from_proto(msg) == result


def test_stream_events():
    mid = convert.stream_event_to_proto(GenerationEvent("r", text="he", token_ids=(1,)))
    assert mid.text == "he" and mid.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert mid.completion_tokens == 0 and not mid.HasField("timings")
    assert convert.stream_event_from_proto(mid) == GenerationEvent("r", text="he")

    last = GenerationEvent("r", text="llo", finished=True, finish_reason="eos", prompt_tokens=4, completion_tokens=5,
                           timings=TIMINGS)
    msg = convert.stream_event_to_proto(last)
    assert msg.finish_reason == pb.FINISH_REASON_EOS and msg.completion_tokens == 5
    assert convert.stream_event_from_proto(msg) == last


def test_finish_reasons():
    for name, value in [("length", pb.FINISH_REASON_LENGTH), ("stop", pb.FINISH_REASON_STOP),
                        ("eos", pb.FINISH_REASON_EOS)]:
        assert convert.finish_reason_to_proto(name) == value
        assert convert.finish_reason_from_proto(value) == name
    assert convert.finish_reason_to_proto(None) == pb.FINISH_REASON_UNSPECIFIED
    with pytest.raises(ValueError):
        convert.finish_reason_to_proto("tired")


def test_adapter_round_trip():
    info = AdapterInfo(adapter_id="a", base_model="base", rank=16, lora_alpha=0.1, target_modules=("q_proj", "v_proj"),
                       module_count=60, use_rslora=True, size_bytes=123456789012, sha256="f" * 64, path="/store/a",
                       registered_at=1700000000.25, ranks={"v_proj": 8}, alphas={"v_proj": 32.0}, version=2**40 + 3)
    msg = convert.adapter_to_proto(info, "cpu")
    assert msg.residency == pb.RESIDENCY_CPU and msg.rank_pattern["v_proj"] == 8 and msg.version == 2**40 + 3
    back, residency = convert.adapter_from_proto(pb.Adapter.FromString(msg.SerializeToString()))
    assert residency == "cpu"
    assert back == AdapterInfo(**{**info.__dict__, "path": ""})  # float32 alpha 0.1 reads back as 0.1


def test_residency_mapping():
    assert [convert.residency_to_proto(r) for r in ("disk", "cpu", "gpu", "?")] == [
        pb.RESIDENCY_DISK, pb.RESIDENCY_CPU, pb.RESIDENCY_GPU, pb.RESIDENCY_UNSPECIFIED]
    assert convert.residency_from_proto(pb.RESIDENCY_UNSPECIFIED) == "unknown"


def test_unset_max_new_tokens_is_capped_by_a_lower_server_limit():
    req = convert.generation_request_from_proto(pb.GenerateRequest(prompt="x"), default_request_id="r",
                                                max_new_tokens_limit=64)
    assert req.params.max_new_tokens == 64


WIRE_RANGES = {"max_new_tokens": (-(2**31), 2**31 - 1), "top_k": (-(2**31), 2**31 - 1), "seed": (0, 2**64 - 1)}


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(WIRE_RANGES)), value=st.integers(-(2**70), 2**70))
def test_client_request_out_of_wire_range_names_the_field(name, value):
    req = GenerationRequest("r", prompt="x", params=dataclasses.replace(SamplingParams(), **{name: value}))
    lo, hi = WIRE_RANGES[name]
    if lo <= value <= hi:
        msg = convert.generate_request_to_proto(req)
        if name == "max_new_tokens" and value == SamplingParams().max_new_tokens:
            assert not msg.HasField(name)  # the default is left unset (the server applies its own, capped one)
        else:
            assert getattr(msg, name) == value
    else:
        with pytest.raises(InvalidArgument) as info:
            convert.generate_request_to_proto(req)
        assert info.value.field == name
