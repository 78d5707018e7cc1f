"""POST /llmchat: the conversation is stored, sent whole to Ollama, and streamed back as SSE."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest

from conftest import chatterd_env, free_port
from sse import Answer, chat_body, post, stored
from standins import Received, Reply, Stream, chat_line, done_line, text_stream


def test_context_is_carried_across_requests(client, ollama, db, app_id):
    first = post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    assert first.status == 200
    second = post(client, "/llmchat", chat_body(app_id, "In what state do I live?"))

    assert second.text() == "You live in Michigan."
    sent = ollama.chats()[-1]["messages"]
    assert [m["content"] for m in sent] == [
        "I live in Ann Arbor",
        "You said: I live in Ann Arbor",
        "In what state do I live?",
    ]
    assert stored(db, app_id)[-1] == ("assistant", "You live in Michigan.")


def test_another_app_does_not_see_the_conversation(client, ollama, app_id):
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    other = post(client, "/llmchat", chat_body(app_id + ".other", "In what state do I live?"))
    assert other.text() == "I do not know where you live."


def test_each_ollama_line_is_one_data_event_unchanged(client, ollama, app_id):
    lines = [
        '{"model":"gemma3:270m","created_at":"2026-11-22T12:00:00.123456789Z",'
        '"message":{"role":"assistant","content":"Hi \\"there\\"\\n"},"done":false}',
        '{"model":"gemma3:270m","created_at":"2026-11-22T12:00:00.2Z",'
        '"message":{"role":"assistant","content":"ünïcödé ✓"},"done":false}',
        json.dumps(done_line("gemma3:270m"), separators=(",", ":")),
    ]
    ollama.script = lambda received: Stream(list(lines))

    answer = post(client, "/llmchat", chat_body(app_id, "hello"))

    assert answer.status == 200
    assert answer.content_type.startswith("text/event-stream")
    assert [event.data for event in answer.events] == lines
    assert all(event.event == "message" for event in answer.events)


def test_reply_is_stored_exactly_as_the_model_produced_it(client, ollama, db, app_id):
    reply = (
        "Here is code:\n\n```python\ndef f(x):\n\treturn  x  *  2\n```\n"
        "  Ann Arbor  is\tin Michigan.\r\nEnd.  "
    )
    # Split at awkward places, as a tokenizer does: mid-word, before and after whitespace.
    cuts = [0, 1, 5, 9, 13, 14, 22, 30, 31, 38, 44, 45, 52, 60, 61, 70, len(reply)]
    tokens = [reply[a:b] for a, b in itertools.pairwise(cuts)]
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", token) for token in tokens), done_line("gemma3:270m")]
    )

    answer = post(client, "/llmchat", chat_body(app_id, "show me code"))

    assert answer.text() == reply
    assert stored(db, app_id) == [("user", "show me code"), ("assistant", reply)]


def test_content_on_the_done_line_is_part_of_the_reply(client, ollama, db, app_id):
    ollama.script = lambda received: Stream(
        [chat_line("qwen3:0.6b", "Hello"), done_line("qwen3:0.6b", content=", world")]
    )
    post(client, "/llmchat", chat_body(app_id, "hi", model="qwen3:0.6b"))
    assert stored(db, app_id)[-1] == ("assistant", "Hello, world")


def test_many_messages_in_one_request_keep_their_order(client, ollama, db, app_id):
    contents = [f"message {i:03d}" for i in range(120)]
    body = chat_body(app_id, *contents)
    body["messages"][0]["role"] = "system"

    post(client, "/llmchat", body)
    post(client, "/llmchat", chat_body(app_id, "and one more"))

    expected = [*contents, f"You said: {contents[-1]}", "and one more"]
    assert [m["content"] for m in ollama.chats()[-1]["messages"]] == expected
    rows = stored(db, app_id)
    assert [content for _, content in rows][: len(expected)] == expected
    assert rows[0][0] == "system"


def test_ollama_fields_pass_through_and_app_id_does_not(client, ollama, app_id):
    body = chat_body(
        app_id,
        "hi",
        options={"temperature": 0.2, "num_ctx": 4096},
        format="json",
        keep_alive="10m",
        think=False,
        stream=False,
        unknown_field="ignored",
    )
    assert post(client, "/llmchat", body).status == 200
    sent = ollama.chats()[-1]
    assert sent["options"] == {"temperature": 0.2, "num_ctx": 4096}
    assert sent["format"] == "json"
    assert sent["keep_alive"] == "10m"
    assert sent["think"] is False
    assert sent["stream"] is True  # chatterd always streams
    assert "appID" not in sent and "unknown_field" not in sent


def test_thinking_is_kept_apart_from_the_reply(client, ollama, db, app_id):
    ollama.script = lambda received: Stream(
        [
            chat_line("qwen3:0.6b", "", thinking="The user greets me. "),
            chat_line("qwen3:0.6b", "", thinking="I greet back."),
            chat_line("qwen3:0.6b", "Hello!"),
            done_line("qwen3:0.6b"),
        ]
    )
    answer = post(client, "/llmchat", chat_body(app_id, "hi", model="qwen3:0.6b"))
    assert [e.json()["message"].get("thinking") for e in answer.events][:2] == [
        "The user greets me. ",
        "I greet back.",
    ]
    row = db.execute(
        "SELECT message, thinking FROM chatts WHERE appid = %s AND username = 'assistant'",
        (app_id,),
    ).fetchone()
    assert row == ("Hello!", "The user greets me. I greet back.")

    ollama.script = None
    post(client, "/llmchat", chat_body(app_id, "again", model="qwen3:0.6b"))
    assert all("thinking" not in m for m in ollama.chats()[-1]["messages"])


# Validation: 422 (or 400 for a body that is not JSON) with a JSON error, and nothing stored.


def _valid() -> dict:
    return {
        "appID": "edu.umich.test",
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "hi"}],
    }


INVALID = {
    "no appID": ({k: v for k, v in _valid().items() if k != "appID"}, "appID"),
    "empty appID": ({**_valid(), "appID": ""}, "appID"),
    "blank appID": ({**_valid(), "appID": "   "}, "appID"),
    "appID too long": ({**_valid(), "appID": "a" * 156}, "appID"),
    "appID not a string": ({**_valid(), "appID": 42}, "appID"),
    "no model": ({k: v for k, v in _valid().items() if k != "model"}, "model"),
    "empty model": ({**_valid(), "model": ""}, "model"),
    "model not a string": ({**_valid(), "model": ["gemma3"]}, "model"),
    "no messages": ({k: v for k, v in _valid().items() if k != "messages"}, "messages"),
    "empty messages": ({**_valid(), "messages": []}, "messages"),
    "messages not a list": ({**_valid(), "messages": {"role": "user"}}, "messages"),
    "message not an object": ({**_valid(), "messages": ["hi"]}, "messages[0]"),
    "unknown role": (
        {**_valid(), "messages": [{"role": "bot", "content": "x"}]},
        "messages[0].role",
    ),
    "missing role": ({**_valid(), "messages": [{"content": "x"}]}, "messages[0].role"),
    "content not a string": (
        {**_valid(), "messages": [{"role": "user", "content": 7}]},
        "messages[0].content",
    ),
    "missing content": ({**_valid(), "messages": [{"role": "user"}]}, "messages[0].content"),
    "options not an object": ({**_valid(), "options": "fast"}, "options"),
    "body not an object": ([1, 2], "body"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_requests_get_422_naming_the_field(client, ollama, db, case):
    body, field = INVALID[case]
    if isinstance(body, dict) and "appID" in body and body["appID"] == "edu.umich.test":
        body = {**body, "appID": f"test.invalid.{case}"}
    answer = post(client, "/llmchat", body)
    assert answer.status == 422
    assert answer.content_type.startswith("application/json")
    assert answer.body["error"].startswith(field)
    assert ollama.chats() == []
    assert stored(db, f"test.invalid.{case}") == []


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"appID": "x", '])
def test_malformed_json_gets_400(client, raw):
    answer = post(client, "/llmchat", raw)
    assert answer.status == 400
    assert "not valid JSON" in answer.body["error"]


# Ollama's failures


def test_ollama_404_stays_a_404_and_nothing_is_stored(client, ollama, db, app_id):
    answer = post(client, "/llmchat", chat_body(app_id, "hi", model="missing:1b"))
    assert answer.status == 404
    assert answer.body == {"error": "model 'missing:1b' not found"}
    assert stored(db, app_id) == []


def test_ollama_busy_is_passed_on(client, ollama, db, app_id):
    busy = "server busy, please try again.  maximum pending requests exceeded"
    ollama.script = lambda received: Reply(503, {"error": busy})
    answer = post(client, "/llmchat", chat_body(app_id, "hi"))
    assert (answer.status, answer.body) == (503, {"error": busy})


def test_ollama_unreachable_is_502(start_chatterd, database_url, meteo_standin, db, app_id):
    closed = f"http://127.0.0.1:{free_port()}"
    server = start_chatterd(chatterd_env(database_url, closed, meteo_standin.url))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = post(client, "/llmchat", chat_body(app_id, "hi"))
        prompt = client.post("/llmprompt", json={"model": "gemma3:270m", "prompt": "hi"})
    assert answer.status == 502
    assert "unreachable" in answer.body["error"]
    assert prompt.status_code == 502 and "unreachable" in prompt.json()["error"]
    assert stored(db, app_id) == []


def _failing_stream(last_line: str | None = None, cut_after: int | None = None) -> Stream:
    lines: list = [chat_line("gemma3:270m", "Partial "), chat_line("gemma3:270m", "answer")]
    if last_line is not None:
        lines.append(last_line)
    return Stream(lines, cut_after=cut_after)


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (
            _failing_stream('{"error":"an error was encountered while running the model"}'),
            "an error was encountered while running the model",
        ),
        (_failing_stream("<html>502 Bad Gateway</html>"), "not a JSON object"),
        (_failing_stream(json.dumps(done_line("gemma3:270m")), cut_after=2), "broke mid-stream"),
        (_failing_stream(), "ended before its last (done) line"),
    ],
    ids=["error line", "line not JSON", "connection cut", "no done line"],
)
def test_failure_mid_stream_is_an_error_event_and_the_turn_is_undone(
    client, ollama, db, app_id, stream, says
):
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    before = stored(db, app_id)
    ollama.script = lambda received: stream

    answer = post(client, "/llmchat", chat_body(app_id, "tell me more"))

    assert answer.status == 200
    assert [event.event for event in answer.events] == ["message", "message", "error"]
    assert says in answer.events[-1].json()["error"]
    assert stored(db, app_id) == before


def test_a_refused_reply_insert_is_an_error_event(client, ollama, db, app_id):
    db.execute("""
        CREATE OR REPLACE FUNCTION refuse_replies() RETURNS trigger AS $$
        BEGIN
            IF NEW.username = 'assistant' AND NEW.appid LIKE '%.refuse' THEN
                RAISE EXCEPTION 'replies refused for this test';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""")
    db.execute(
        "CREATE OR REPLACE TRIGGER refuse_replies BEFORE INSERT ON chatts"
        " FOR EACH ROW EXECUTE FUNCTION refuse_replies()"
    )
    try:
        answer = post(client, "/llmchat", chat_body(app_id + ".refuse", "hi"))
    finally:
        db.execute("DROP TRIGGER refuse_replies ON chatts")

    assert answer.status == 200
    assert answer.text() == "You said: hi"
    error = answer.events[-1]
    assert error.event == "error"
    assert "replies refused for this test" in error.json()["error"]
    assert stored(db, app_id + ".refuse") == []


def test_a_client_that_disconnects_still_gets_its_reply_stored(client, ollama, db, app_id):
    words = [f"word{i} " for i in range(30)]
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", w) for w in words), done_line("gemma3:270m")], gap=0.05
    )
    with client.stream("POST", "/llmchat", json=chat_body(app_id, "count")) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # hang up after the first event

    deadline = time.monotonic() + 10
    while len(stored(db, app_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored(db, app_id) == [("user", "count"), ("assistant", "".join(words))]
    # Nothing is left running or held: no pipeline, no database connection.
    health = client.get("/health").json()
    assert health["streams"] == 0
    assert health["database"]["connections_in_use"] == 0


def test_no_database_connection_is_held_while_ollama_thinks(
    start_chatterd, database_url, ollama, meteo_standin, app_id
):
    """With a pool of one connection, a slow stream must not block another request."""
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_DB_POOL_MIN": "1",
        "CHATTERD_DB_POOL_MAX": "1",
        "CHATTERD_DB_TIMEOUT": "2",
    }
    server = start_chatterd(env)

    def script(received: Received):
        last = received.body["messages"][-1]["content"]
        if last == "slow":
            return text_stream("gemma3:270m", "slowly", headers_delay=4, gap=0.2)
        return text_stream("gemma3:270m", "quickly")

    ollama.script = script
    with httpx.Client(base_url=server.url, timeout=30) as client:
        slow: list[Answer] = []
        waiting = threading.Thread(
            target=lambda: slow.append(post(client, "/llmchat", chat_body(app_id + ".s", "slow")))
        )
        waiting.start()
        deadline = time.monotonic() + 10
        while not ollama.chats():  # chatterd now waits on Ollama, which says nothing for 4 s
            assert time.monotonic() < deadline
            time.sleep(0.01)

        quick = post(client, "/llmchat", chat_body(app_id + ".quick", "fast"))
        slow_still_waiting = waiting.is_alive()
        waiting.join()

    # A held connection would have made the quick request wait 2 s and fail with 503.
    assert quick.status == 200 and quick.text() == "quickly"
    assert slow_still_waiting
    assert slow[0].text() == "slowly"
