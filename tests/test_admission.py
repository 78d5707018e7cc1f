"""The admission queue: a parallel limit per Ollama server, turns by client, load shedding,
places in line, and the stop button.

The server here runs one generation at a time (CHATTERD_OLLAMA_PARALLEL=1) with a short
line (two waiting per client, three in all), and three API keys: three clients.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from functools import partial

import httpx
import pytest

from admission import Admission, Limits, Shed
from conftest import chatterd_env
from servers import Server, Servers
from sse import Streaming, chat_body, post, stored, wait_until
from standins import Received, Stream, chat_line, done_line, text_stream

MODEL = "gemma3:270m"
KEYS = ("key-a", "key-b", "key-c")


def key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{name}"}


@pytest.fixture(scope="module")
def line_server(module_chatterd, database_url, ollama_standin, meteo_standin):
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_OLLAMA_PARALLEL": "1",
        "CHATTERD_QUEUE_PER_CLIENT": "2",
        "CHATTERD_QUEUE_MAX": "3",
        "CHATTERD_API_KEYS": ",".join(KEYS),
    }
    return module_chatterd(env)


@pytest.fixture
def gate(ollama) -> Iterator[threading.Event]:
    """Held replies wait for this; it is opened at the end of the test in any case."""
    gate = threading.Event()
    yield gate
    gate.set()


def held_until(gate: threading.Event, *pieces: str) -> Stream:
    """A reply that sends `pieces`, then waits for the gate before it ends."""
    lines = [chat_line(MODEL, piece) for piece in pieces] + [done_line(MODEL)]
    return Stream(lines, hold_after=len(pieces), release=gate)


def last_content(received: Received) -> str:
    return received.body["messages"][-1]["content"]


def new_app() -> str:
    return f"test.admission.{uuid.uuid4().hex[:8]}"


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def test_clients_take_turns_and_are_told_their_place(line_server, ollama, gate):
    ollama.script = lambda r: (
        held_until(gate, "a") if last_content(r) == "A1" else text_stream(MODEL, last_content(r))
    )
    a1 = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "A1"), key("a"))
    wait_until(lambda: ollama.in_flight == 1, what="A1 generating")
    a2 = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "A2"), key("a"))
    a2.wait_for(lambda s: s.positions() == [1])
    a3 = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "A3"), key("a"))
    a3.wait_for(lambda s: s.positions() == [2])
    # Client b's one request goes before client a's second waiting one.
    b1 = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "B1"), key("b"))
    b1.wait_for(lambda s: s.positions() == [2])
    a3.wait_for(lambda s: s.positions() == [2, 3])

    gate.set()
    for stream in (a1, a2, a3, b1):
        stream.finish()

    assert [last_content(r) for r in ollama.generations()] == ["A1", "A2", "B1", "A3"]
    assert ollama.most_in_flight == 1
    assert a2.positions() == [1]
    assert b1.positions() == [2, 1]
    assert a3.positions() == [2, 3, 2, 1]
    for stream, said in ((a2, "A2"), (a3, "A3"), (b1, "B1")):
        assert stream.status == 200
        replies = [e.json() for e in stream.events if e.event == "message"]
        assert "".join(line["message"]["content"] for line in replies) == said
    queued = a3.named("queued")[0].json()  # an Ollama line with no content, for older apps
    assert queued["message"] == {"role": "assistant", "content": ""}
    assert queued["model"] == MODEL and queued["done"] is False and "created_at" in queued
    assert all(event.id for event in a3.events)  # so a resumed stream sees them too


def test_a_full_line_is_refused_with_retry_after(line_server, ollama, gate, db):
    ollama.script = lambda r: (
        held_until(gate, "a") if last_content(r) == "A1" else text_stream(MODEL, last_content(r))
    )
    a1 = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "A1"), key("a"))
    wait_until(lambda: ollama.in_flight == 1, what="A1 generating")
    waiting = []
    for name, content in (("a", "A2"), ("a", "A3"), ("b", "B1")):
        waiting.append(
            Streaming(line_server.url, "/llmchat", chat_body(new_app(), content), key(name))
        )
        waiting[-1].wait_for(lambda s: s.positions(), what=f"{content} queued")

    with httpx.Client(base_url=line_server.url, timeout=30) as client:
        too_many_of_a = client.post(
            "/llmchat", json=chat_body(a4 := new_app(), "A4"), headers=key("a")
        )
        line_full = client.post(
            "/llmtools", json=chat_body(c1 := new_app(), "C1"), headers=key("c")
        )

    assert too_many_of_a.status_code == 429
    assert "CHATTERD_QUEUE_PER_CLIENT" in too_many_of_a.json()["error"]
    assert line_full.status_code == 503
    assert "CHATTERD_QUEUE_MAX" in line_full.json()["error"]
    for refused in (too_many_of_a, line_full):
        assert int(refused.headers["retry-after"]) >= 1
    assert stored(db, a4) == [] and stored(db, c1) == []  # nothing is stored for a refusal

    gate.set()
    for stream in (a1, *waiting):
        assert stream.finish().status == 200
    assert "A4" not in [last_content(r) for r in ollama.generations()]
    wait_until(lambda: health(line_server)["queue"]["waiting"] == 0)


def test_stop_ends_a_running_reply_and_stores_what_was_said(line_server, ollama, gate, db):
    app_id = new_app()
    ollama.script = lambda r: held_until(gate, "Hello", " wor")
    reply = Streaming(line_server.url, "/llmchat", chat_body(app_id, "tell me"), key("a"))
    reply.wait_for(lambda s: len(s.events) == 2, what="the first two pieces")

    with httpx.Client(base_url=line_server.url, timeout=30, headers=key("b")) as client:
        stopped = client.post(f"/conversations/{app_id}/stop")
        assert stopped.status_code == 200
        assert stopped.json() == {"appID": app_id, "stopped": True}
        # The stop answers once the turn has ended: the reply is stored by then.
        assert stored(db, app_id) == [("user", "tell me"), ("assistant", "Hello wor")]
        reply.finish()
        assert not gate.is_set()  # the stream ended while the model was still "generating"
        assert ollama.abandoned == 1  # chatterd closed its stream: Ollama stops generating
        last = reply.events[-1].json()
        assert last["done"] is True and last["done_reason"] == "stopped"
        assert last["message"]["content"] == "" and last["model"] == MODEL

        ollama.script = None
        follow_up = post(client, "/llmchat", chat_body(app_id, "go on"))
    assert follow_up.status == 200
    assert ollama.chats()[-1]["messages"] == [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "Hello wor"},
        {"role": "user", "content": "go on"},
    ]


def test_stop_takes_a_waiting_turn_out_of_the_line(line_server, ollama, gate, db):
    ollama.script = lambda r: (
        held_until(gate, "a") if last_content(r) == "first" else text_stream(MODEL, "b")
    )
    first = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "first"), key("a"))
    wait_until(lambda: ollama.in_flight == 1, what="the first generating")
    app_id = new_app()
    waiting = Streaming(line_server.url, "/llmtools", chat_body(app_id, "second"), key("b"))
    waiting.wait_for(lambda s: s.positions() == [1])

    stopped = httpx.post(f"{line_server.url}/conversations/{app_id}/stop", headers=key("b"))

    assert stopped.status_code == 200
    waiting.finish()
    assert [event.event for event in waiting.events] == ["queued", "message"]
    last = waiting.events[-1].json()
    assert last["done"] is True and last["done_reason"] == "stopped"
    assert health(line_server)["queue"]["waiting"] == 0
    gate.set()
    first.finish()
    assert [last_content(r) for r in ollama.generations()] == ["first"]  # never reached Ollama
    assert stored(db, app_id) == []  # nothing was said: the turn is not kept


def test_stop_without_a_turn_is_404(line_server):
    answer = httpx.post(f"{line_server.url}/conversations/{new_app()}/stop", headers=key("a"))
    assert answer.status_code == 404
    assert answer.json() == {"error": "no turn of this appID is running or waiting"}


def test_a_prompt_client_that_leaves_stops_the_generation(line_server, ollama, gate):
    ollama.script = lambda r: Stream(
        [{"model": MODEL, "created_at": "2026-11-22T12:00:00Z", "response": "An", "done": False}],
        hold_after=1,
        release=gate,
    )
    with httpx.Client(base_url=line_server.url, timeout=30, headers=key("a")) as client:
        with client.stream("POST", "/llmprompt", json={"model": MODEL, "prompt": "p"}) as answer:
            assert answer.status_code == 200
            next(answer.iter_lines())
    wait_until(lambda: ollama.abandoned == 1, what="Ollama's stream to be closed")
    wait_until(lambda: health(line_server)["ollama"]["servers"][0]["in_flight"] == 0)


def test_a_waiting_prompt_whose_client_leaves_never_reaches_ollama(line_server, ollama, gate):
    ollama.script = lambda r: (
        held_until(gate, "a") if r.path == "/api/chat" else text_stream(MODEL, "never")
    )
    first = Streaming(line_server.url, "/llmchat", chat_body(new_app(), "first"), key("a"))
    wait_until(lambda: ollama.in_flight == 1, what="the first generating")
    with pytest.raises(httpx.ReadTimeout):  # the prompt waits silently; the client gives up
        httpx.post(
            f"{line_server.url}/llmprompt",
            json={"model": MODEL, "prompt": "p"},
            headers=key("b"),
            timeout=httpx.Timeout(30, read=0.5),
        )
    wait_until(lambda: health(line_server)["queue"]["waiting"] == 0, what="it to leave")
    gate.set()
    first.finish()
    assert [r.path for r in ollama.generations()] == ["/api/chat"]


def test_behind_a_trusted_proxy_each_forwarded_address_is_a_client(
    start_chatterd, database_url, ollama, meteo_standin, gate
):
    server = start_chatterd(
        {
            **chatterd_env(database_url, ollama.url, meteo_standin.url),
            "CHATTERD_OLLAMA_PARALLEL": "1",
            "CHATTERD_TRUSTED_PROXIES": "127.0.0.0/8",
        }
    )
    ollama.script = lambda r: (
        held_until(gate, "a") if last_content(r) == "x1" else text_stream(MODEL, "b")
    )

    def send(content: str, address: str) -> Streaming:
        return Streaming(
            server.url, "/llmchat", chat_body(new_app(), content), {"X-Forwarded-For": address}
        )

    x1 = send("x1", "203.0.113.1")
    wait_until(lambda: ollama.in_flight == 1, what="x1 generating")
    x2 = send("x2", "203.0.113.1")
    x2.wait_for(lambda s: s.positions() == [1])
    x3 = send("x3", "203.0.113.1")
    x3.wait_for(lambda s: s.positions() == [2])
    y1 = send("y1", "198.51.100.9, 127.0.0.1")  # the proxy's own hop is skipped
    y1.wait_for(lambda s: s.positions() == [2])
    gate.set()
    for stream in (x1, x2, x3, y1):
        stream.finish()
    assert [last_content(r) for r in ollama.generations()] == ["x1", "x2", "y1", "x3"]


# The line itself, without HTTP: a real Admission over a server that is never called.


def line_of(parallel: int, notice_seconds: float = 60):
    servers = Servers([Server("http://ollama.invalid", http=None, streams=None)], check_seconds=60)
    limits = Limits(parallel, queue_max=100, queue_per_client=100, notice_seconds=notice_seconds)
    return servers.all[0], Admission(servers, limits)


def test_turns_stopped_as_a_slot_frees_lose_no_slot():
    """A stopped turn's ticket may still be in line when the next grant comes: it is passed
    over, and the slot goes to the next one (it used to be counted and lost)."""

    async def scenario() -> None:
        server, admission = line_of(1)
        await admission.acquire("a", MODEL)
        waiting = [asyncio.ensure_future(admission.acquire(f"c{i}", MODEL)) for i in range(4)]
        last = asyncio.ensure_future(admission.acquire("z", MODEL))
        await asyncio.sleep(0)  # all of them in line
        assert admission.waiting == 5
        for task in waiting:
            task.cancel()  # stopped, all at once...
        admission.release(server, 1.0)  # ...as the running one ends, before they unwind
        assert await last is server
        await asyncio.gather(*waiting, return_exceptions=True)
        assert server.in_flight == 1 and admission.waiting == 0
        admission.release(server, 1.0)
        assert server.in_flight == 0

    asyncio.run(scenario())


def test_a_long_line_is_told_its_places_at_most_once_a_while_except_near_the_front():
    async def scenario() -> None:
        server, admission = line_of(1, notice_seconds=0.05)
        await admission.acquire("first", MODEL)
        told: dict[int, list[int]] = {i: [] for i in range(8)}
        last_told = asyncio.Event()

        def tell(i: int, position: int) -> None:
            told[i].append(position)
            if i == 7:
                last_told.set()

        tasks = [
            asyncio.ensure_future(admission.acquire(f"c{i}", MODEL, partial(tell, i)))
            for i in range(8)
        ]
        await asyncio.sleep(0)
        for _ in range(3):  # three grants in quick succession
            admission.release(server, 0.1)
            await asyncio.sleep(0)
        assert told[0] == [1] and told[1] == [2, 1] and told[3] == [4, 3, 2, 1]
        assert told[7] == [8]  # far back: the moves of the last moment are held back...
        last_told.clear()
        async with asyncio.timeout(10):
            await last_told.wait()
        assert told[7] == [8, 5]  # ...and told, once, when the moment is over
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_turns_later_round_is_never_refused_even_when_the_line_is_full():
    """A tool round of a turn already begun waits its turn; refusing it would undo the
    turn halfway."""

    async def scenario() -> None:
        server = Server("http://ollama.invalid", http=None, streams=None)
        servers = Servers([server], check_seconds=60)
        admission = Admission(servers, Limits(1, queue_max=2, queue_per_client=1))
        await admission.acquire("a", MODEL)
        waiting = [asyncio.ensure_future(admission.acquire(c, MODEL)) for c in ("a", "b")]
        await asyncio.sleep(0)
        with pytest.raises(Shed):  # a new request of a's: its share is taken
            await admission.acquire("a", MODEL)
        later_round = asyncio.ensure_future(admission.acquire("a", MODEL, first_of_client=True))
        await asyncio.sleep(0)
        assert admission.waiting == 3 and not later_round.done()
        admission.release(server, 1.0)
        assert await later_round is server  # and it goes first among a's
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(scenario())
