"""Tool rounds that end well with small models, and that a person can follow on the stream.

The stand-in model here answers by script: tool calls while it is offered tools, then words
(or nothing) when it is asked without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from sse import Answer, chat_body, post
from standins import Received, Stream, chat_line, done_line, temperature_at, text_stream, tool_call

MODEL = "qwen3:0.6b"
HERE = {"latitude": 42.28, "longitude": -83.74}


def weather(latitude: float, longitude: float) -> str:
    return (
        f"Weather at lat: {latitude}, lon: {longitude} is {temperature_at(latitude, longitude)}ºF"
    )


def calls(*made: dict) -> Stream:
    return Stream([chat_line(MODEL, "", tool_calls=list(made)), done_line(MODEL)])


def model(offered: Callable[[int], Stream], without_tools: Stream | None = None):
    """A script: `offered(round)` while tools are offered, `without_tools` once they are not."""
    rounds = iter(range(100))

    def answer(received: Received) -> Stream:
        if "tools" not in received.body:
            return without_tools or text_stream(MODEL, "no tools")
        return offered(next(rounds))

    return answer


def notices(answer: Answer) -> list[str]:
    """The names of the events that are not Ollama's own lines, in order."""
    return [event.event for event in answer.events if event.event != "message"]


def rows(db, app_id: str) -> list[tuple[str, str, list | None]]:
    found = db.execute(
        "SELECT username, message, toolcalls FROM chatts WHERE appid = %s ORDER BY seq", (app_id,)
    ).fetchall()
    return [(role, content, json.loads(calls) if calls else None) for role, content, calls in found]


def assert_valid_history(messages: list[dict]) -> None:
    """Every assistant message that calls tools is followed by one result per call."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("tool_calls"):
            results = messages[i + 1 : i + 1 + len(message["tool_calls"])]
            assert [m["role"] for m in results] == ["tool"] * len(message["tool_calls"])


def test_a_call_repeated_forever_runs_once_and_ends_in_words(client, ollama, meteo, db, app_id):
    the_call = tool_call("get_weather", HERE)
    ollama.script = model(lambda _: calls(the_call), text_stream(MODEL, "It is mild."))

    answer = post(client, "/llmtools", chat_body(app_id, "Weather? Use the tools.", model=MODEL))

    assert len(meteo.received) == 1  # run once; the repeat got the same answer again
    assert len(ollama.chats()) == 3  # the repeat limit (2) plus one round without tools
    assert "tools" in ollama.chats()[1] and "tools" not in ollama.chats()[2]
    assert notices(answer) == ["tool_call", "tool_result", "tool_call", "tool_result", "notice"]
    first, again = (e.json()["tool_result"] for e in answer.named("tool_result"))
    assert first == {
        "name": "get_weather",
        "content": weather(**HERE),
        "error": False,
        "reused": False,
    }
    assert again == {**first, "reused": True}
    shown = answer.named("tool_call")[0].json()
    assert shown["tool_call"] == {"name": "get_weather", "arguments": HERE}
    assert shown["message"] == {"role": "assistant", "content": ""}  # an Ollama line to old apps
    notice = answer.named("notice")[0].json()["notice"]
    assert notice["kind"] == "tools_withdrawn" and notice["reason"] == "repeated_call"
    assert "get_weather 2 times" in notice["text"]
    assert answer.text() == "It is mild."
    # Stored as it happened: both calls and both answers, then the words.
    assert rows(db, app_id) == [
        ("user", "Weather? Use the tools.", None),
        ("assistant", "", [the_call]),
        ("tool", weather(**HERE), None),
        ("assistant", "", [the_call]),
        ("tool", weather(**HERE), None),
        ("assistant", "It is mild.", None),
    ]

    ollama.script = None
    post(client, "/llmtools", chat_body(app_id, "Thanks", model=MODEL))
    sent = ollama.chats()[-1]["messages"]
    assert len(sent) == 7 and sent[-1] == {"role": "user", "content": "Thanks"}
    assert_valid_history(sent)


def test_two_different_tools_then_an_answer(client, ollama, meteo, db, app_id):
    weather_call = tool_call("get_weather", HERE)
    clock_call = tool_call("get_time", {"zone": "America/Detroit"})
    ollama.script = model(
        lambda round: [calls(weather_call), calls(clock_call), text_stream(MODEL, "Done.")][round]
    )

    answer = post(client, "/llmtools", chat_body(app_id, "Weather and time?", model=MODEL))

    assert notices(answer) == ["tool_call", "tool_result", "tool_call", "tool_result"]
    shown = [e.json()["tool_call"]["name"] for e in answer.named("tool_call")]
    assert shown == ["get_weather", "get_time"]
    results = [e.json()["tool_result"] for e in answer.named("tool_result")]
    assert results[0]["content"] == weather(**HERE) and results[0]["error"] is False
    assert results[1] == {
        "name": "get_time",
        "content": "Error: there is no tool named 'get_time'.",
        "error": True,
        "reused": False,
    }
    assert answer.text() == "Done."
    assert len(meteo.received) == 1
    assert [role for role, _, _ in rows(db, app_id)] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]


@pytest.mark.parametrize("rounds_before", [1, 2])
def test_an_empty_answer_after_tools_is_explained(client, ollama, meteo, db, app_id, rounds_before):
    places = [HERE, {"latitude": 40.71, "longitude": -74.01}]
    made = [tool_call("get_weather", place) for place in places[:rounds_before]]
    silence = Stream([done_line(MODEL)])
    ollama.script = model(lambda round: calls(made[round]) if round < rounds_before else silence)

    answer = post(client, "/llmtools", chat_body(app_id, "Weather?", model=MODEL))

    assert notices(answer)[-1] == "notice"
    notice = answer.named("notice")[0].json()["notice"]
    assert notice["kind"] == "empty_reply"
    assert f"after {rounds_before} tool round" in notice["text"]
    assert notice["tried"] == [
        {"name": "get_weather", "arguments": p} for p in places[:rounds_before]
    ]
    assert answer.text() == "" and answer.named("error") == []
    stored = rows(db, app_id)
    assert stored[-1] == ("assistant", "", None)
    assert len(stored) == 1 + 2 * rounds_before + 1

    ollama.script = None
    follow_up = post(client, "/llmtools", chat_body(app_id, "Hello?", model=MODEL))
    assert follow_up.text() == "You said: Hello?"
    assert_valid_history(ollama.chats()[-1]["messages"])
