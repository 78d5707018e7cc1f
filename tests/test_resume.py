"""Resumable streams: every event has an id, and a lost stream is picked up where it broke."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import chatterd_env
from sse import Event, chat_body, parse_events, post
from standins import Stream, chat_line, done_line

MODEL = "gemma3:270m"
WORDS = [f"w{i} " for i in range(30)]


def paced_reply(gap: float = 0.05) -> Stream:
    return Stream([*(chat_line(MODEL, word) for word in WORDS), done_line(MODEL)], gap=gap)


def text(events: list[Event]) -> str:
    return "".join(e.json()["message"]["content"] for e in events if e.event == "message")


def resume(client: httpx.Client, path: str, app_id: str, last_id: str | None = None):
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    return client.get(path, params={"appID": app_id}, headers=headers)


def read_then_drop(client: httpx.Client, body: dict, events_wanted: int) -> list[Event]:
    """POST, read a few events, and close the connection as a phone losing its network does."""
    received = ""
    with client.stream("POST", "/llmchat", json=body) as response:
        for chunk in response.iter_text():
            received += chunk
            if len(parse_events(received)) >= events_wanted:
                break
    return parse_events(received)[:events_wanted]


@pytest.fixture(scope="module")
def second_server(module_chatterd, database_url, ollama_standin, meteo_standin):
    """Another chatterd on the same database: another worker, deterministically."""
    return module_chatterd(chatterd_env(database_url, ollama_standin.url, meteo_standin.url))


def test_every_event_carries_an_id_increasing_within_the_app(client, app_id):
    first = post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    second = post(client, "/llmchat", chat_body(app_id, "In what state do I live?"))

    ids = [int(event.id) for event in first.events + second.events if event.id is not None]
    assert len(ids) == len(first.events) + len(second.events)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_dropped_stream_resumes_on_another_worker_from_its_last_event_id(
    client, second_server, ollama, db, app_id
):
    ollama.script = lambda received: paced_reply()
    before = read_then_drop(client, chat_body(app_id, "count"), events_wanted=5)

    with httpx.Client(base_url=second_server.url, timeout=30) as other:
        resumed = resume(other, "/llmchat", app_id, before[-1].id)

    assert resumed.status_code == 200
    after = parse_events(resumed.text)
    ids = [int(event.id) for event in before + after]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # nothing missed, nothing twice
    assert text(before + after) == "".join(WORDS)
    assert after[-1].json()["done"] is True
    stored = db.execute(
        "SELECT message FROM chatts WHERE appid = %s AND username = 'assistant'", (app_id,)
    ).fetchall()
    assert stored == [("".join(WORDS),)]


def test_resuming_a_running_reply_follows_it_live(client, ollama, db, app_id):
    ollama.script = lambda received: paced_reply(gap=0.1)  # three seconds in all
    before = read_then_drop(client, chat_body(app_id, "count"), events_wanted=2)

    def replies_stored() -> int:
        return db.execute(
            "SELECT count(*) FROM chatts WHERE appid = %s AND username = 'assistant'"
            " AND NOT pending",
            (app_id,),
        ).fetchone()[0]

    stored_at_first_chunk = None
    received = ""
    with client.stream("GET", "/llmchat", params={"appID": app_id}) as response:
        for chunk in response.iter_text():
            if stored_at_first_chunk is None:
                stored_at_first_chunk = replies_stored()
            received += chunk

    # Without Last-Event-ID: the reply from its start, as it is being written.
    after = parse_events(received)
    assert [e.id for e in after[:2]] == [e.id for e in before]
    assert text(after) == "".join(WORDS)
    assert stored_at_first_chunk == 0  # the reply was still under way
    assert replies_stored() == 1  # and the resumed stream lasted until it was stored


def test_a_finished_reply_replays_whole_and_then_has_nothing_more(client, app_id):
    original = post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))

    replay = resume(client, "/llmtools", app_id)  # either route serves the appID's replies
    again = resume(client, "/llmchat", app_id, original.events[-1].id)

    assert replay.status_code == 200
    assert [(e.id, e.event, e.data) for e in parse_events(replay.text)] == [
        (e.id, e.event, e.data) for e in original.events
    ]
    # 204 is what makes a browser's EventSource stop reconnecting.
    assert again.status_code == 204


def test_an_error_event_is_replayed_too(client, ollama, app_id):
    ollama.script = lambda received: Stream([chat_line(MODEL, "Hel"), "not json"])
    original = post(client, "/llmchat", chat_body(app_id, "hello"))

    replay = parse_events(resume(client, "/llmchat", app_id).text)

    assert [e.event for e in original.events] == ["message", "error"]
    assert [(e.id, e.event, e.data) for e in replay] == [
        (e.id, e.event, e.data) for e in original.events
    ]


@pytest.mark.parametrize(
    ("params", "headers", "status", "error"),
    [
        ({}, {}, 422, "appID: must be a string of 1 to 155 characters"),
        ({"appID": "x" * 156}, {}, 422, "appID: must be a string of 1 to 155 characters"),
        ({"appID": "never.seen"}, {"Last-Event-ID": ""}, 422, "Last-Event-ID: must be"),
        ({"appID": "never.seen"}, {}, 404, "there is no reply to resume"),
        ({"appID": "never.seen"}, {"Last-Event-ID": "abc"}, 422, "Last-Event-ID: must be"),
        ({"appID": "never.seen"}, {"Last-Event-ID": "9" * 40}, 422, "Last-Event-ID: must be"),
        ({"appID": "never.seen"}, {"Last-Event-ID": "5000000"}, 404, "no events are kept"),
    ],
)
def test_resume_refusals(client, params, headers, status, error):
    answer = client.get("/llmchat", params=params, headers=headers)

    assert answer.status_code == status
    assert answer.json()["error"].startswith(error)


def test_events_expire_after_the_configured_time(
    start_chatterd, database_url, ollama, meteo, app_id
):
    env = {**chatterd_env(database_url, ollama.url, meteo.url), "CHATTERD_EVENTS_KEEP": "1"}
    server = start_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        original = post(client, "/llmchat", chat_body(app_id, "hello"))
        assert resume(client, "/llmchat", app_id).status_code == 200

        deadline = time.monotonic() + 10
        while resume(client, "/llmchat", app_id, original.events[0].id).status_code != 404:
            assert time.monotonic() < deadline, "the events were never dropped"
            time.sleep(0.2)
    server.stop()  # it would drop other tests' events too
