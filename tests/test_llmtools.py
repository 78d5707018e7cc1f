"""POST /llmtools: resident tools run on the server, device tools go to the app."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx

from conftest import chatterd_env
from sse import chat_body, post, stored
from standins import (
    Received,
    Reply,
    Stream,
    chat_line,
    done_line,
    temperature_at,
    text_stream,
    tool_call,
)

MODEL = "qwen3:0.6b"
GET_LOCATION = {
    "type": "function",
    "function": {"name": "get_location", "description": "Get current location", "parameters": None},
}


def calls_then_answers(*calls: dict[str, Any], one_line: bool = True):
    """A model that calls tools when the user speaks, then answers with the tools' results."""

    def script(received: Received) -> Stream:
        last = received.body["messages"][-1]
        if last["role"] == "user":
            if one_line:
                lines = [chat_line(MODEL, "", tool_calls=list(calls))]
            else:
                lines = [chat_line(MODEL, "", tool_calls=[call]) for call in calls]
            return Stream([*lines, done_line(MODEL)])
        messages = received.body["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        results = [m["content"] for m in messages[last_user:] if m["role"] == "tool"]
        return text_stream(MODEL, "Answer: " + " | ".join(results))

    return script


def weather(latitude: float, longitude: float) -> str:
    return (
        f"Weather at lat: {latitude}, lon: {longitude} is {temperature_at(latitude, longitude)}ºF"
    )


def test_a_resident_tool_runs_and_the_model_continues_in_the_same_stream(
    client, ollama, meteo, db, app_id
):
    # The model orders the arguments its own way and sends one of them as a string.
    call = tool_call("get_weather", {"longitude": "-83.74", "latitude": 42.28})
    ollama.script = calls_then_answers(call)

    answer = post(client, "/llmtools", chat_body(app_id, "What's the weather here?", model=MODEL))

    result = weather(42.28, -83.74)
    assert answer.status == 200
    assert answer.text() == f"Answer: {result}"
    assert answer.named("error") == [] and answer.named("tool_calls") == []
    assert meteo.received[-1].query == {
        "latitude": ["42.28"],
        "longitude": ["-83.74"],
        "current": ["temperature_2m"],
        "temperature_unit": ["fahrenheit"],
    }
    first, second = ollama.chats()
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert first["messages"] == [{"role": "user", "content": "What's the weather here?"}]
    assert second["messages"] == [
        {"role": "user", "content": "What's the weather here?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result, "tool_name": "get_weather"},
    ]
    rows = db.execute(
        "SELECT username, message, toolcalls, toolname FROM chatts WHERE appid = %s ORDER BY seq",
        (app_id,),
    ).fetchall()
    assert [(role, message, name) for role, message, _, name in rows] == [
        ("user", "What's the weather here?", None),
        ("assistant", "", None),
        ("tool", result, "get_weather"),
        ("assistant", f"Answer: {result}", None),
    ]
    assert json.loads(rows[1][2]) == [call]


def test_a_failing_resident_tool_tells_the_model_why(client, ollama, meteo, app_id):
    ollama.script = calls_then_answers(tool_call("get_weather", {"latitude": 42.28}))
    answer = post(client, "/llmtools", chat_body(app_id, "weather?", model=MODEL))
    assert answer.text() == "Answer: Error: missing required argument(s): longitude"

    meteo.forced = Reply(
        400,
        {
            "error": True,
            "reason": "Cannot initialize WeatherVariable from invalid String value tempeture_2m.",
        },
    )
    ollama.script = calls_then_answers(tool_call("get_weather", {"latitude": 1, "longitude": 2}))
    answer = post(client, "/llmtools", chat_body(app_id, "weather?", model=MODEL))
    assert "Open-Meteo answered HTTP 400: Cannot initialize WeatherVariable" in answer.text()

    ollama.script = calls_then_answers(
        tool_call("get_weather", {"latitude": "north", "longitude": 2})
    )
    answer = post(client, "/llmtools", chat_body(app_id, "weather?", model=MODEL))
    assert answer.text() == "Answer: Error: argument latitude must be a number, not 'north'"


def test_several_resident_calls_in_one_turn_run_concurrently(client, ollama, meteo, app_id):
    meteo.delay = 0.5
    places = [(42.28, -83.74), (40.71, -74.01), (37.77, -122.42)]
    calls = [
        tool_call("get_weather", {"latitude": la, "longitude": lo}, i)
        for i, (la, lo) in enumerate(places)
    ]
    ollama.script = calls_then_answers(*calls, one_line=False)

    answer = post(client, "/llmtools", chat_body(app_id, "weather in three cities?", model=MODEL))

    assert answer.text() == "Answer: " + " | ".join(weather(*place) for place in places)
    assert meteo.most_in_flight == 3
    tool_messages = [m for m in ollama.chats()[-1]["messages"] if m["role"] == "tool"]
    assert [m["tool_name"] for m in tool_messages] == ["get_weather"] * 3


def test_a_call_to_a_tool_nobody_has_is_answered_to_the_model(client, ollama, app_id):
    ollama.script = calls_then_answers(tool_call("launch_rockets", {"count": 3}))
    answer = post(client, "/llmtools", chat_body(app_id, "go", model=MODEL))
    assert answer.named("tool_calls") == []
    assert answer.text() == "Answer: Error: there is no tool named 'launch_rockets'."


def test_a_device_tool_call_goes_to_the_app_and_its_result_continues_the_chat(
    client, ollama, db, app_id
):
    location = tool_call("get_location", {})
    ollama.script = calls_then_answers(location)

    asked = post(
        client, "/llmtools", chat_body(app_id, "Where am I?", model=MODEL, tools=[GET_LOCATION])
    )

    # The call comes before the round's done line, and only once it is stored.
    assert [event.event for event in asked.events] == ["tool_calls", "message"]
    assert asked.events[1].json()["done"] is True
    line = asked.events[0].json()
    assert line["model"] == MODEL and "created_at" in line
    assert line["message"]["tool_calls"] == [location]
    assert [t["function"]["name"] for t in ollama.chats()[0]["tools"]] == [
        "get_weather",
        "get_location",
    ]

    # The app runs the tool and posts its result, without tools.
    answered = post(
        client,
        "/llmtools",
        {
            "appID": app_id,
            "model": MODEL,
            "messages": [{"role": "tool", "content": "latitude: 42.28, longitude: -83.74"}],
        },
    )

    assert answered.text() == "Answer: latitude: 42.28, longitude: -83.74"
    continued = ollama.chats()[-1]
    assert continued["messages"][-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [location]},
        {
            "role": "tool",
            "content": "latitude: 42.28, longitude: -83.74",
            "tool_name": "get_location",
        },
    ]
    assert [t["function"]["name"] for t in continued["tools"]] == ["get_weather", "get_location"]
    assert [role for role, _ in stored(db, app_id)] == ["user", "assistant", "tool", "assistant"]


def test_a_device_call_the_app_never_answers_gets_a_result_saying_so(client, ollama, db, app_id):
    """The app sends a new message instead of the tool's result: the history stays valid."""
    location = tool_call("get_location", {})
    ollama.script = calls_then_answers(location)
    asked = post(client, "/llmtools", chat_body(app_id, "Where am I?", tools=[GET_LOCATION]))
    assert asked.named("tool_calls")
    ollama.script = lambda received: text_stream(MODEL, "Hello!")

    post(client, "/llmtools", chat_body(app_id, "Never mind. Hi!", model=MODEL))

    assert ollama.chats()[-1]["messages"] == [
        {"role": "user", "content": "Where am I?"},
        {"role": "assistant", "content": "", "tool_calls": [location]},
        {
            "role": "tool",
            "content": "Error: the app did not return a result for this call.",
            "tool_name": "get_location",
        },
        {"role": "user", "content": "Never mind. Hi!"},
    ]
    assert [role for role, _ in stored(db, app_id)] == [
        "user",
        "assistant",
        "tool",
        "user",
        "assistant",
    ]


def test_device_tools_are_remembered_once_each_and_the_latest_declaration_wins(
    client, ollama, app_id
):
    newer = {
        "type": "function",
        "function": {**GET_LOCATION["function"], "description": "Where the phone is"},
    }
    post(client, "/llmtools", chat_body(app_id, "one", model=MODEL, tools=[GET_LOCATION]))
    post(client, "/llmtools", chat_body(app_id, "two", model=MODEL, tools=[newer, GET_LOCATION]))
    post(client, "/llmtools", chat_body(app_id, "three", model=MODEL, tools=[newer]))
    post(client, "/llmtools", chat_body(app_id, "four", model=MODEL))

    offered = ollama.chats()[-1]["tools"]
    assert offered == [ollama.chats()[0]["tools"][0], newer]


def test_a_device_tool_may_not_take_a_resident_tools_name(client, ollama, app_id):
    impostor = {"type": "function", "function": {"name": "get_weather", "parameters": None}}
    answer = post(client, "/llmtools", chat_body(app_id, "hi", model=MODEL, tools=[impostor]))
    assert answer.status == 422
    assert "get_weather" in answer.body["error"] and answer.body["error"].startswith("tools[0]")
    assert ollama.chats() == []


def test_resident_and_device_calls_in_one_turn(client, ollama, meteo, db, app_id):
    """Resident calls run at once; the device calls then go to the app, and the turn waits."""
    weather_call = tool_call("get_weather", {"latitude": 42.28, "longitude": -83.74}, 0)
    location = tool_call("get_location", {}, 1)
    ollama.script = calls_then_answers(weather_call, location)

    asked = post(
        client,
        "/llmtools",
        chat_body(app_id, "Weather here and there?", model=MODEL, tools=[GET_LOCATION]),
    )

    assert [event.event for event in asked.events] == [
        "tool_call",  # the server's call, shown as it runs
        "tool_result",
        "tool_calls",  # the app's call, for the app to run
        "message",
    ]
    assert asked.named("tool_calls")[0].json()["message"]["tool_calls"] == [location]
    assert len(meteo.received) == 1
    assert stored(db, app_id)[-1] == ("tool", weather(42.28, -83.74))

    answered = post(client, "/llmtools", chat_body(app_id, "at home", model=MODEL, role="tool"))
    assert answered.text() == f"Answer: {weather(42.28, -83.74)} | at home"
    names = [m.get("tool_name") for m in ollama.chats()[-1]["messages"] if m["role"] == "tool"]
    assert names == ["get_weather", "get_location"]


def test_the_tool_loop_is_bounded_and_ends_with_an_answer(client, ollama, meteo, db, app_id):
    post(client, "/llmtools", chat_body(app_id, "hello", model=MODEL))
    rounds = itertools.count()

    def always_a_new_call(received: Received) -> Stream:
        if "tools" not in received.body:  # asked without tools: it has to answer
            return text_stream(MODEL, "I give up looking.")
        call = tool_call("get_weather", {"latitude": next(rounds), "longitude": 2})
        return Stream([chat_line(MODEL, "", tool_calls=[call]), done_line(MODEL)])

    ollama.script = always_a_new_call
    answer = post(client, "/llmtools", chat_body(app_id, "loop forever", model=MODEL))

    assert len(ollama.chats()) == 1 + 8 + 1  # eight tool rounds, then one without tools
    assert "tools" not in ollama.chats()[-1]
    [notice] = answer.named("notice")
    assert notice.json()["notice"]["kind"] == "tools_withdrawn"
    assert notice.json()["notice"]["reason"] == "round_limit"
    assert answer.text() == "I give up looking."
    assert answer.named("error") == []
    rows = stored(db, app_id)
    assert rows[-1] == ("assistant", "I give up looking.")
    assert [role for role, _ in rows].count("tool") == 8


def test_llmchat_offers_no_tools(client, ollama, app_id):
    post(client, "/llmtools", chat_body(app_id, "one", model=MODEL, tools=[GET_LOCATION]))
    post(client, "/llmchat", chat_body(app_id, "two", model=MODEL))
    assert "tools" not in ollama.chats()[-1]


# GET /weather


def test_weather_from_a_json_body_as_the_tutorial_sends_it(client, meteo):
    response = client.request(
        "GET",
        "/weather",
        content=b'{"lat":"42.28","lon":"-83.74"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json() == weather(42.28, -83.74)


def test_weather_from_query_parameters(client, meteo):
    response = client.get("/weather", params={"lat": "-33.87", "lon": "151.21"})
    assert response.status_code == 200
    assert response.json() == weather(-33.87, 151.21)


def test_weather_rejects_bad_coordinates(client, meteo):
    for params, says in [
        ({"lon": "1"}, "lat: required, a number from -90 to 90"),
        ({"lat": "north", "lon": "1"}, "lat: must be a number"),
        ({"lat": "91", "lon": "1"}, "lat: must be a number from -90 to 90"),
        ({"lat": "1", "lon": "-181"}, "lon: must be a number from -180 to 180"),
        ({"lat": "nan", "lon": "1"}, "lat: must be a number from -90 to 90"),
    ]:
        response = client.get("/weather", params=params)
        assert response.status_code == 422, params
        assert says in response.json()["error"]
    response = client.request("GET", "/weather", content=b"[1]")
    assert response.status_code == 422
    assert meteo.received == []


def test_weather_reports_open_meteo_failures_as_502(
    client, meteo, start_chatterd, database_url, ollama_standin
):
    meteo.forced = Reply(500, {"error": True, "reason": "Internal error"})
    response = client.get("/weather", params={"lat": "1", "lon": "2"})
    assert response.status_code == 502
    assert response.json() == {"error": "Open-Meteo answered HTTP 500: Internal error"}

    meteo.forced, meteo.delay = None, 3
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo.url),
        "CHATTERD_WEATHER_TIMEOUT": "0.5",
    }
    slow = start_chatterd(env)
    response = httpx.get(f"{slow.url}/weather", params={"lat": "1", "lon": "2"}, timeout=30)
    assert response.status_code == 502
    assert response.json()["error"].startswith("Open-Meteo timed out")
