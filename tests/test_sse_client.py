"""A third-party SSE client, httpx-sse, reads chatterd's streams as the spec has them: event
names, ids and data; and resumes a stream with Last-Event-ID from its middle."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from sse import chat_body
from standins import Received, Stream, chat_line, done_line, temperature_at, text_stream, tool_call

MODEL = "qwen3:0.6b"
HERE = {"latitude": 42.28, "longitude": -83.74}
WORDS = [f"w{i} " for i in range(10)]


@pytest.fixture
def client(chatterd) -> Iterator[httpx.Client]:
    """A read timeout under the 15 s keep-alive ping: a resume that hangs fails instead."""
    with httpx.Client(base_url=chatterd.url, timeout=httpx.Timeout(30, read=5)) as client:
        yield client


@pytest.fixture
def gate(ollama) -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()


def weather_then_words(received: Received) -> Stream:
    if received.body["messages"][-1]["role"] == "tool":
        return text_stream(MODEL, "It is mild.")
    return Stream(
        [chat_line(MODEL, "", tool_calls=[tool_call("get_weather", HERE)]), done_line(MODEL)]
    )


def resume(client, path: str, app_id: str, last_id: str):
    """GET the route again with Last-Event-ID, as a client that lost the stream does."""
    return connect_sse(
        client, "GET", path, params={"appID": app_id}, headers={"Last-Event-ID": last_id}
    )


def seen(events: list[ServerSentEvent]) -> list[tuple[str, str, str]]:
    return [(event.id, event.event, event.data) for event in events]


def test_the_events_their_names_and_ids(client, ollama, meteo, app_id):
    ollama.script = weather_then_words
    with connect_sse(
        client, "POST", "/llmtools", json=chat_body(app_id, "Weather?", model=MODEL)
    ) as source:
        assert source.response.status_code == 200
        events = list(source.iter_sse())

    names = [event.event for event in events]  # "message" where the stream names none
    words = len(text_stream(MODEL, "It is mild.").lines)
    assert names == ["message", "message", "tool_call", "tool_result", *["message"] * words]
    ids = [int(event.id) for event in events]
    assert ids[0] % 1_000_000 == 0  # the reply's first event
    assert ids == list(range(ids[0], ids[0] + len(events)))
    assert events[2].json()["tool_call"] == {"name": "get_weather", "arguments": HERE}
    result = events[3].json()["tool_result"]
    weather = f"Weather at lat: 42.28, lon: -83.74 is {temperature_at(**HERE)}ºF"
    assert result == {"name": "get_weather", "content": weather, "error": False, "reused": False}
    lines = [event.json() for event in events if event.event == "message"]
    assert "".join(line["message"]["content"] for line in lines) == "It is mild."
    assert [line["done"] for line in lines].count(True) == 2  # one done line per model round
    assert all(event.retry is None for event in events)

    # Resumed from the middle: the events after it, the same ids, names and data.
    middle = events[3]
    with resume(client, "/llmtools", app_id, middle.id) as source:
        assert source.response.status_code == 200
        rest = list(source.iter_sse())
    assert seen(rest) == seen(events[4:])

    # Resumed after its last event: 204, nothing more (what stops a browser's EventSource).
    with resume(client, "/llmtools", app_id, events[-1].id) as source:
        assert source.response.status_code == 204


def test_a_resume_from_the_middle_of_a_running_reply_goes_on_live(client, ollama, app_id, gate):
    lines = [chat_line(MODEL, word) for word in WORDS] + [done_line(MODEL)]
    ollama.script = lambda r: Stream(lines, hold_after=6, release=gate)
    with connect_sse(
        client, "POST", "/llmchat", json=chat_body(app_id, "count", model=MODEL)
    ) as source:
        iterator = source.iter_sse()
        before = [next(iterator) for _ in range(3)]  # then the connection is dropped
    assert [event.json()["message"]["content"] for event in before] == WORDS[:3]

    with resume(client, "/llmchat", app_id, before[-1].id) as source:
        iterator = source.iter_sse()
        caught_up = [next(iterator) for _ in range(3)]  # the missed ones, while it is held
        gate.set()
        live = list(iterator)

    after = caught_up + live
    ids = [int(event.id) for event in before + after]
    assert ids == list(range(ids[0], ids[0] + len(WORDS) + 1))  # nothing missed, nothing twice
    assert {event.event for event in after} == {"message"}
    contents = [event.json()["message"]["content"] for event in before + after]
    assert "".join(contents) == "".join(WORDS)
    assert after[-1].json()["done"] is True
