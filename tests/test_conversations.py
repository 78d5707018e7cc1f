"""GET and DELETE /conversations/{appID}: see a conversation, and reset it."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest

from sse import chat_body, post
from standins import Stream, chat_line, done_line, text_stream, tool_call

MODEL = "qwen3:0.6b"
GET_LOCATION = {
    "type": "function",
    "function": {"name": "get_location", "description": "Get current location", "parameters": None},
}


def test_the_conversation_is_listed_in_order_with_its_tool_calls(client, ollama, app_id):
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor", role="system"))
    call = tool_call("get_location", {})
    ollama.script = lambda received: Stream(
        [chat_line(MODEL, "", tool_calls=[call]), done_line(MODEL)]
    )
    post(client, "/llmtools", chat_body(app_id, "Where am I?", model=MODEL, tools=[GET_LOCATION]))
    ollama.script = lambda received: text_stream(MODEL, "You are in Ann Arbor.")
    post(client, "/llmtools", chat_body(app_id, "lat: 42.28", role="tool", model=MODEL))

    answer = client.get(f"/conversations/{app_id}")

    assert answer.status_code == 200
    body = answer.json()
    assert body["appID"] == app_id and body["next"] is None
    assert [(m["role"], m["content"], m["tool_calls"]) for m in body["messages"]] == [
        ("system", "I live in Ann Arbor", None),
        ("assistant", "You said: I live in Ann Arbor", None),
        ("user", "Where am I?", None),
        ("assistant", "", [call]),
        ("tool", "lat: 42.28", None),
        ("assistant", "You are in Ann Arbor.", None),
    ]
    assert body["messages"][4]["tool_name"] == "get_location"
    times = [datetime.fromisoformat(m["created_at"]) for m in body["messages"]]
    assert times == sorted(times) and all(t.utcoffset().total_seconds() == 0 for t in times)


def test_a_question_is_dated_when_it_was_asked_and_its_reply_when_it_was_said(
    client, ollama, app_id
):
    """The turn is stored once it is over, the question with the time it came."""
    ollama.script = lambda received: Stream(
        [chat_line(MODEL, "Slowly"), chat_line(MODEL, " said."), done_line(MODEL)], gap=0.2
    )
    post(client, "/llmchat", chat_body(app_id, "Take your time", model=MODEL))

    messages = client.get(f"/conversations/{app_id}").json()["messages"]

    asked, said = (datetime.fromisoformat(m["created_at"]) for m in messages)
    assert (said - asked).total_seconds() >= 0.4  # the reply's three lines, 0.2 s apart


def test_a_long_conversation_comes_a_page_at_a_time(client, app_id):
    sent = [f"message {i}" for i in range(7)]
    post(client, "/llmchat", chat_body(app_id, *sent))

    pages, after = [], 0
    while after is not None:
        answer = client.get(f"/conversations/{app_id}", params={"limit": 3, "after": after})
        pages.append([m["content"] for m in answer.json()["messages"]])
        after = answer.json()["next"]

    assert pages == [sent[0:3], sent[3:6], [sent[6], "You said: message 6"]]


def test_an_app_with_nothing_stored_is_404(client):
    answer = client.get("/conversations/never.seen.app")

    assert answer.status_code == 404
    assert answer.json() == {"error": "nothing is stored for this appID"}


def test_delete_forgets_the_history_and_the_device_tools(client, ollama, db, app_id):
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    ollama.script = lambda received: text_stream(MODEL, "ok")
    post(client, "/llmtools", chat_body(app_id, "hi", model=MODEL, tools=[GET_LOCATION]))
    ollama.script = None

    deleted = client.delete(f"/conversations/{app_id}")
    answer = post(client, "/llmchat", chat_body(app_id, "In what state do I live?"))

    assert deleted.status_code == 204 and deleted.content == b""
    assert answer.text() == "I do not know where you live."
    assert (
        db.execute("SELECT count(*) FROM device_tools WHERE appid = %s", (app_id,)).fetchone()[0]
        == 0
    )
    assert [m["content"] for m in client.get(f"/conversations/{app_id}").json()["messages"]] == [
        "In what state do I live?",
        "I do not know where you live.",
    ]


def test_delete_waits_for_a_running_reply_and_removes_it_too(client, ollama, app_id):
    ollama.script = lambda received: Stream(
        [*(chat_line(MODEL, f"w{i} ") for i in range(10)), done_line(MODEL)], gap=0.1
    )
    streaming = threading.Thread(target=post, args=(client, "/llmchat", chat_body(app_id, "go")))
    streaming.start()
    deadline = time.monotonic() + 10
    while not ollama.chats():  # the turn holds the conversation once it asks the model
        assert time.monotonic() < deadline
        time.sleep(0.01)

    deleted = client.delete(f"/conversations/{app_id}")
    finished_first = not streaming.is_alive()
    streaming.join()

    assert deleted.status_code == 204
    assert finished_first
    assert client.get(f"/conversations/{app_id}").status_code == 404


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("limit=0", "limit: must be a whole number from 1 to 1000"),
        ("limit=1001", "limit: must be a whole number from 1 to 1000"),
        ("after=-1", "after: must be a whole number"),
        ("after=abc", "after: must be a whole number"),
    ],
)
def test_paging_refusals(client, query, error):
    answer = client.get(f"/conversations/some.app?{query}")

    assert answer.status_code == 422
    assert answer.json()["error"].startswith(error)


def test_an_app_id_over_155_characters_is_refused(client):
    for method in ("GET", "DELETE"):
        answer = client.request(method, f"/conversations/{'x' * 156}")
        assert answer.status_code == 422
        assert answer.json()["error"].startswith("appID:")
