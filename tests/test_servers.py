"""Several Ollama servers behind one chatterd: routing by model and load, health, failover.

Two stand-ins, `north` and `south`, each with its own models; chatterd runs one generation
at a time on each (CHATTERD_OLLAMA_PARALLEL=1) and checks them five times a second.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from conftest import chatterd_env
from sse import Streaming, chat_body, post, stored, wait_until
from standins import OllamaStandIn, Reply, Stream, chat_line, done_line


@pytest.fixture(scope="module")
def north() -> Iterator[OllamaStandIn]:
    standin = OllamaStandIn()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def south_port() -> int:
    from conftest import free_port

    return free_port()


@pytest.fixture
def south(south_port) -> Iterator[OllamaStandIn]:
    """A fresh `south` for each test, on the same port, so a test may kill and restart it."""
    standin = OllamaStandIn(south_port)
    standin.models = {"gemma3:270m", "gemma3:12b"}
    yield standin
    standin.close()


@pytest.fixture
def servers(north, south) -> Iterator[tuple[OllamaStandIn, OllamaStandIn]]:
    north.reset()
    north.models = {"gemma3:270m", "qwen3:0.6b"}
    yield north, south
    north.reset()


@pytest.fixture(scope="module")
def fleet(module_chatterd, database_url, north, south_port, meteo_standin):
    env = {
        **chatterd_env(database_url, north.url, meteo_standin.url),
        "OLLAMA_BASE_URL": f"{north.url},http://127.0.0.1:{south_port}/api",
        "CHATTERD_OLLAMA_PARALLEL": "1",
        "CHATTERD_OLLAMA_CHECK_SECONDS": "0.2",
    }
    return module_chatterd(env)


def new_app() -> str:
    return f"test.servers.{uuid.uuid4().hex[:8]}"


def health(fleet) -> dict:
    return httpx.get(f"{fleet.url}/health", timeout=10).json()


def server_state(fleet, standin: OllamaStandIn) -> dict:
    [state] = [s for s in health(fleet)["ollama"]["servers"] if s["url"] == standin.url]
    return state


def wait_for_models(fleet, north, south) -> None:
    """Until chatterd's check has seen what each stand-in has now."""
    wait_until(
        lambda: (
            server_state(fleet, north)["models"] == sorted(north.models)
            and server_state(fleet, south)["models"] == sorted(south.models)
            and server_state(fleet, south)["loaded"] == sorted(south.loaded)
            and all(s["up"] for s in health(fleet)["ollama"]["servers"])
        ),
        what="the servers' models",
    )


def test_a_model_goes_only_to_the_servers_that_have_it(fleet, servers):
    north, south = servers
    wait_for_models(fleet, north, south)
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for _ in range(4):
            assert (
                post(client, "/llmchat", chat_body(new_app(), "hi", model="gemma3:12b")).status
                == 200
            )
            assert (
                post(client, "/llmchat", chat_body(new_app(), "hi", model="qwen3:0.6b")).status
                == 200
            )
        missing = post(client, "/llmchat", chat_body(new_app(), "hi", model="llama3.2"))
    assert {r.body["model"] for r in south.generations()} == {"gemma3:12b"}
    assert {r.body["model"] for r in north.generations()} == {"qwen3:0.6b"}
    assert missing.status == 404 and missing.body == {"error": "model 'llama3.2' not found"}


def test_a_model_without_its_tag_is_found_as_latest(fleet, servers):
    north, south = servers
    north.models.add("tinyllama:latest")
    wait_for_models(fleet, north, south)
    answer = post(
        httpx.Client(base_url=fleet.url, timeout=30),
        "/llmchat",
        chat_body(new_app(), "hi", model="tinyllama"),
    )
    assert answer.status == 200
    assert [r.body["model"] for r in north.generations()] == ["tinyllama"]


def test_requests_spread_over_both_within_each_ones_limit(fleet, servers):
    north, south = servers
    wait_for_models(fleet, north, south)
    gate = threading.Event()
    for standin in servers:
        standin.script = lambda r: Stream(
            [chat_line("gemma3:270m", "x"), done_line("gemma3:270m")], hold_after=1, release=gate
        )
    try:
        first = Streaming(fleet.url, "/llmchat", chat_body(new_app(), "1"))
        second = Streaming(fleet.url, "/llmchat", chat_body(new_app(), "2"))
        wait_until(lambda: north.in_flight == 1 and south.in_flight == 1, what="one on each")
        third = Streaming(fleet.url, "/llmchat", chat_body(new_app(), "3"))
        third.wait_for(lambda s: s.positions() == [1])  # both are full: it waits its turn
    finally:
        gate.set()
    for stream in (first, second, third):
        assert stream.finish().status == 200
    assert north.most_in_flight == 1 and south.most_in_flight == 1
    assert len(north.generations()) + len(south.generations()) == 3


def test_a_loaded_model_is_preferred(fleet, servers):
    north, south = servers
    south.loaded = {"gemma3:270m"}
    wait_for_models(fleet, north, south)
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for _ in range(3):
            assert post(client, "/llmchat", chat_body(new_app(), "hi")).status == 200
    assert len(south.generations()) == 3 and north.generations() == []


def test_a_dead_server_is_skipped_without_an_error_and_taken_back(fleet, servers, south_port):
    north, south = servers
    south.loaded = {"gemma3:270m"}  # so south is the first choice while it is up
    wait_for_models(fleet, north, south)
    south.close()  # killed; chatterd has not noticed yet
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for _ in range(3):
            answer = post(client, "/llmchat", chat_body(new_app(), "hi"))
            assert answer.status == 200 and answer.text() == "You said: hi"
    assert len(north.generations()) == 3
    state = server_state(fleet, south)
    assert state["up"] is False and state["error"]

    revived = OllamaStandIn(south_port)  # restarted on the same address
    try:
        revived.loaded = {"gemma3:270m"}
        wait_until(lambda: server_state(fleet, revived)["up"], what="south to be taken back")
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            assert post(client, "/llmchat", chat_body(new_app(), "hi")).status == 200
        assert len(revived.generations()) == 1
    finally:
        revived.close()


def test_a_server_error_before_the_first_line_goes_to_the_other(fleet, servers, db):
    north, south = servers
    south.loaded = {"gemma3:270m"}
    wait_for_models(fleet, north, south)
    south.script = lambda r: Reply(500, {"error": "llama runner process has terminated"})
    app_id = new_app()
    answer = post(httpx.Client(base_url=fleet.url, timeout=30), "/llmchat", chat_body(app_id, "hi"))
    assert answer.status == 200 and answer.text() == "You said: hi"
    assert len(south.generations()) == 1 and len(north.generations()) == 1
    assert stored(db, app_id) == [("user", "hi"), ("assistant", "You said: hi")]


def test_a_failure_after_the_first_line_is_an_error_event_and_not_run_again(fleet, servers, db):
    north, south = servers
    south.loaded = {"gemma3:270m"}
    wait_for_models(fleet, north, south)
    south.script = lambda r: Stream(
        [chat_line("gemma3:270m", "It is"), chat_line("gemma3:270m", " sunny")], cut_after=1
    )
    app_id = new_app()
    answer = post(httpx.Client(base_url=fleet.url, timeout=30), "/llmchat", chat_body(app_id, "hi"))
    assert answer.status == 200
    assert answer.text() == "It is"
    assert "broke" in answer.named("error")[0].json()["error"]
    assert len(south.generations()) == 1 and north.generations() == []  # never run twice
    assert stored(db, app_id) == []


def test_health_lists_every_server(fleet, servers):
    north, south = servers
    wait_for_models(fleet, north, south)
    listed = health(fleet)["ollama"]["servers"]
    assert [s["url"] for s in listed] == [north.url, south.url]
    for state in listed:
        assert state["up"] is True and state["in_flight"] == 0 and state["version"] == "0.33.0"
