"""The toolbox's argument rules: matched by name, converted only where the conversion is clean."""

from __future__ import annotations

import pytest

from toolbox import TOOLBOX, ToolError, convert_arguments

PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "latitude": {"type": "number"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
        "anything": {},
    },
    "required": ["city"],
}


def test_arguments_are_matched_by_name_whatever_their_order():
    converted = convert_arguments(PARAMETERS, {"latitude": 42.28, "city": "Ann Arbor"})
    assert converted == {"city": "Ann Arbor", "latitude": 42.28}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"city": 48104}, {"city": "48104"}),  # a number where the schema says string
        ({"city": 42.5}, {"city": "42.5"}),
        ({"city": "x", "latitude": "42.28"}, {"city": "x", "latitude": 42.28}),  # and the reverse
        ({"city": "x", "latitude": " -83.74 "}, {"city": "x", "latitude": -83.74}),
        ({"city": "x", "latitude": 7}, {"city": "x", "latitude": 7.0}),
        ({"city": "x", "days": "3"}, {"city": "x", "days": 3}),
        ({"city": "x", "days": 3.0}, {"city": "x", "days": 3}),
        ({"city": "x", "metric": True}, {"city": "x", "metric": True}),
        ({"city": "x", "anything": [1, "a"]}, {"city": "x", "anything": [1, "a"]}),
    ],
)
def test_clean_conversions_are_made(arguments, expected):
    assert convert_arguments(PARAMETERS, arguments) == expected


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({}, "missing required argument(s): city"),
        ({"city": "x", "zoom": 3}, "unknown argument(s): zoom"),
        ({"city": "x", "latitude": "north"}, "argument latitude must be a number, not 'north'"),
        ({"city": "x", "latitude": "nan"}, "argument latitude must be a number"),
        ({"city": "x", "latitude": True}, "argument latitude must be a number, not True"),
        ({"city": "x", "days": "2.5"}, "argument days must be an integer"),
        ({"city": ["a"]}, "argument city must be a string"),
        ({"city": "x", "metric": "yes"}, "argument metric must be true or false"),
        ("city=x", "arguments must be a JSON object"),
    ],
)
def test_unclean_arguments_are_refused_with_a_reason(arguments, says):
    with pytest.raises(ToolError) as raised:
        convert_arguments(PARAMETERS, arguments)
    assert says in str(raised.value)


def test_every_resident_tool_declares_itself_under_its_own_name():
    for name, tool in TOOLBOX.items():
        assert tool.schema["type"] == "function"
        assert tool.schema["function"]["name"] == name
        assert tool.schema["function"]["parameters"]["type"] == "object"
