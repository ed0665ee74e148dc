"""Validation of the plain request types: stop strings and response formats name the bad field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.engine.types import MAX_CHOICES, MAX_RESPONSE_FORMAT_CHARS, ResponseFormat, SamplingParams
from server.errors import InvalidArgument


@given(stops=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4))
def test_stop_strings_with_a_replacement_character_are_refused(stops):
    """U+FFFD in output text is a decoder's placeholder for bytes that are not a complete character (yet): a stop
    string containing it anywhere is refused, every other non-empty one is accepted."""
    params = SamplingParams(stop=tuple(stops))
    if any("\ufffd" in s for s in stops):
        with pytest.raises(InvalidArgument, match="U\\+FFFD") as info:
            params.validate(256)
        assert info.value.field == "stop"
    else:
        params.validate(256)


@given(schema=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=8))
def test_json_schema_must_be_an_object_or_boolean(schema):
    fmt = ResponseFormat("json_schema", json.dumps(schema))
    if isinstance(schema, (dict, bool)):
        fmt.validate()
    else:
        with pytest.raises(InvalidArgument) as info:
            fmt.validate()
        assert info.value.field == "response_format.json_schema"


@pytest.mark.parametrize("fmt, field", [
    (ResponseFormat("json_schema", "x" * (MAX_RESPONSE_FORMAT_CHARS + 1)), "response_format.json_schema"),
    (ResponseFormat("choice", choices=tuple(str(i) for i in range(MAX_CHOICES + 1))), "response_format.choice"),
    (ResponseFormat("regex", "a", choices=("a",)), "response_format.regex"),
    (ResponseFormat("json_object", "{}"), "response_format.json_object"),
    (ResponseFormat("xml"), "response_format"),
])
def test_response_format_limits_name_the_field(fmt, field):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(response_format=fmt).validate(256)
    assert info.value.field == field
