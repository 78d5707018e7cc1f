"""GET /metrics: Prometheus' text format, one scrape summing every worker; what it says about
the traffic sent; who may read it; and the examples in deploy/ that use it.

Most tests scrape one chatterd of two granian workers that run one generation at a time
each (CHATTERD_OLLAMA_PARALLEL=1), before and after traffic of a known size, and parse the
scrapes with prometheus-client's own parser. Each request goes over a connection of its
own, so both workers serve some; which worker gets which is the kernel's choice, so the
tests assert on the sums, which is what a scrape shows. A request is counted once its
response has ended, a little after the client has read it, so scrapes are repeated until
the traffic shows (`scrape_when`), and then compared exactly.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from conftest import ROOT, Chatterd, chatterd_env
from sse import Answer, Streaming, chat_body, parse_events, post, wait_until
from standins import Received, Stream, chat_line, done_line, text_stream, tool_call

CHATTERD = str(Path(sys.executable).parent / "chatterd")
MODEL = "gemma3:270m"
PROMPT_MODEL = "tinyllama:latest"
TOOL_MODEL = "qwen3:0.6b"
HERE = {"latitude": 42.28, "longitude": -83.74}
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC_NAME = re.compile(r"chatterd_[a-z_]+")

REQUESTS = "chatterd_requests_total"
STREAMS = "chatterd_streams_active"
WAITING = "chatterd_queue_waiting"
IN_FLIGHT = "chatterd_ollama_in_flight"
TOKENS = "chatterd_reply_tokens_total"
FIRST_TOKEN = "chatterd_time_to_first_token_seconds_count"
SPEED = "chatterd_model_tokens_per_second_count"
QUEUE_WAIT = "chatterd_queue_wait_seconds_count"

# Every family, as prometheus-client exposes it (the parser names counters without _total).
FAMILIES = {
    "chatterd_requests": "counter",
    "chatterd_streams_active": "gauge",
    "chatterd_queue_waiting": "gauge",
    "chatterd_queue_wait_seconds": "histogram",
    "chatterd_time_to_first_token_seconds": "histogram",
    "chatterd_reply_tokens": "counter",
    "chatterd_model_tokens_per_second": "histogram",
    "chatterd_ollama_up": "gauge",
    "chatterd_ollama_in_flight": "gauge",
    "chatterd_stops": "counter",
    "chatterd_client_disconnects": "counter",
    "chatterd_resumed_streams": "counter",
    "chatterd_tool_calls": "counter",
    "chatterd_tool_rounds": "counter",
    "chatterd_errors": "counter",
    "chatterd_db_pool_connections": "gauge",
}


@dataclass
class Scrape:
    """One GET /metrics, parsed by prometheus-client."""

    text: str

    def __post_init__(self) -> None:
        self.families = list(text_string_to_metric_families(self.text))
        self.samples: list[Sample] = [s for family in self.families for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` that have these labels (0 when none has)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def answered(self) -> float:
        """Requests answered, of every route but /metrics itself."""
        return sum(
            s.value for s in self.samples if s.name == REQUESTS and s.labels["route"] != "/metrics"
        )

    def gauges(self) -> dict[str, float]:
        return {name: self.value(name) for name in (STREAMS, WAITING, IN_FLIGHT)}


IDLE = {STREAMS: 0, WAITING: 0, IN_FLIGHT: 0}


def scrape(server: Chatterd, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


def scrape_when(
    server: Chatterd, condition: Callable[[Scrape], bool], what: str, **scrape_options
) -> Scrape:
    """Scrape until `condition` holds, and return that scrape."""
    last: list[Scrape] = []

    def holds() -> bool:
        last[:] = [scrape(server, **scrape_options)]
        return condition(last[0])

    wait_until(holds, what=what)
    return last[0]


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def new_app() -> str:
    return f"test.metrics.{uuid.uuid4().hex[:8]}"


def connection(server: Chatterd) -> httpx.Client:
    """A client of its own: a connection of its own, to either worker."""
    return httpx.Client(base_url=server.url, timeout=30)


def tokens_of(answer: Answer) -> int:
    """The lines of model output in a /llmchat or /llmtools answer (all but the done lines)."""
    return sum(1 for line in answer.data() if not line["done"])


def done_lines_of(answer: Answer) -> int:
    return sum(1 for line in answer.data() if line["done"])


def held_until(gate: threading.Event, model: str = MODEL) -> Stream:
    """A reply that sends one piece, then waits for the gate before it ends."""
    return Stream([chat_line(model, "a"), done_line(model)], hold_after=1, release=gate)


def held_prompt(gate: threading.Event) -> Stream:
    line = {"model": PROMPT_MODEL, "created_at": "2026-11-22T12:00:00Z", "response": "An"}
    return Stream(
        [{**line, "done": False}, {**done_line(PROMPT_MODEL), "response": ""}],
        hold_after=1,
        release=gate,
    )


def metrics_dir(server: Chatterd) -> Path:
    """Where the workers of a chatterd started by plain granian keep their figures: a
    directory named after their parent, granian, by its pid and start time (metrics.py).
    (The tests start every chatterd without PROMETHEUS_MULTIPROC_DIR, see
    conftest.inherited_environment.)"""
    pid = server.process.pid
    started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return Path(tempfile.gettempdir()) / f"chatterd-metrics-{pid}-{started}"


def per_worker(server: Chatterd, name: str, **labels: str) -> dict[int, float]:
    """Each worker's own count of a counter, read from its file in the metrics directory."""
    counts: dict[int, float] = {}
    for path in metrics_dir(server).glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            for sample in metric.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    counts[pid] = counts.get(pid, 0) + sample.value
    return counts


@pytest.fixture(scope="module")
def two_workers(module_chatterd, database_url, ollama_standin, meteo_standin) -> Chatterd:
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_OLLAMA_PARALLEL": "1",
    }
    return module_chatterd(env, "--workers", "2")


@pytest.fixture
def gate(ollama) -> Iterator[threading.Event]:
    """Held replies wait for this; it is opened at the end of the test in any case."""
    gate = threading.Event()
    yield gate
    gate.set()


# What the traffic shows


def test_counters_grow_by_exactly_the_traffic_sent(two_workers, ollama):
    chats_served = per_worker(two_workers, REQUESTS, route="/llmchat", status="200")
    before = scrape_when(two_workers, lambda s: s.gauges() == IDLE, "an idle server")
    chats: list[Answer] = []
    prompts: list[httpx.Response] = []

    def workers_that_served_chats() -> int:
        now = per_worker(two_workers, REQUESTS, route="/llmchat", status="200")
        return sum(1 for pid, count in now.items() if count > chats_served.get(pid, 0))

    while len(chats) < 3 or workers_that_served_chats() < 2:
        assert len(chats) < 40, "one worker took every connection"
        with connection(two_workers) as client:
            chats.append(post(client, "/llmchat", chat_body(new_app(), f"hello {len(chats)}")))
        with connection(two_workers) as client:
            prompt = {"model": PROMPT_MODEL, "prompt": f"prompt {len(prompts)}"}
            prompts.append(client.post("/llmprompt", json=prompt))
    with connection(two_workers) as client:
        unknown_model = post(client, "/llmchat", chat_body(new_app(), "hi", model="nonesuch:7b"))
    with connection(two_workers) as client:
        no_model = client.post("/llmprompt", json={"prompt": "which model?"})

    assert all(answer.status == 200 for answer in chats)
    assert all(response.status_code == 200 for response in prompts)
    assert unknown_model.status == 404 and no_model.status_code == 422
    chats_sent, prompts_sent = len(chats), len(prompts)
    after = scrape_when(
        two_workers,
        lambda s: s.answered() - before.answered() >= chats_sent + prompts_sent + 2,
        "every request to be counted",
    )
    assert grew(before, after, REQUESTS, route="/llmchat", status="200") == chats_sent
    assert grew(before, after, REQUESTS, route="/llmprompt", status="200") == prompts_sent
    assert grew(before, after, REQUESTS, route="/llmchat", status="404") == 1
    assert grew(before, after, REQUESTS, route="/llmprompt", status="422") == 1
    assert after.answered() - before.answered() == chats_sent + prompts_sent + 2
    assert grew(before, after, TOKENS, model=MODEL) == sum(tokens_of(a) for a in chats)
    assert grew(before, after, FIRST_TOKEN, route="/llmchat") == chats_sent
    assert grew(before, after, FIRST_TOKEN, route="/llmprompt") == prompts_sent
    assert grew(before, after, SPEED, model=MODEL) == sum(done_lines_of(a) for a in chats)
    assert grew(before, after, QUEUE_WAIT) == chats_sent + prompts_sent  # waited or not
    assert grew(before, after, "chatterd_errors_total", kind="model_not_found") == 1
    assert grew(before, after, "chatterd_errors_total") == 1  # a 422 is the client's error
    assert after.gauges() == IDLE
    assert after.value("chatterd_ollama_up", server=ollama.url) == 1
    # The scrape is the sum of the workers' own counts, and both served chats.
    own = per_worker(two_workers, REQUESTS, route="/llmchat", status="200")
    assert len(own) == 2 and sum(own.values()) == after.value(
        REQUESTS, route="/llmchat", status="200"
    )
    assert workers_that_served_chats() == 2


def test_gauges_count_work_in_progress_and_return_to_zero(two_workers, ollama, gate):
    ollama.script = lambda received: held_until(gate)
    before = scrape_when(two_workers, lambda s: s.gauges() == IDLE, "an idle server")
    # Three at once on two workers that run one generation each: one at least waits.
    streams = {
        app_id: Streaming(two_workers.url, "/llmchat", chat_body(app_id, "hold on"))
        for app_id in (new_app(), new_app(), new_app())
    }
    for stream in streams.values():
        stream.wait_for(lambda s: s.events, what="a first line, or a place in line")

    during = scrape_when(
        two_workers,
        lambda s: s.value(STREAMS) == 3 and s.value(WAITING) + s.value(IN_FLIGHT) == 3,
        "three streams: running or waiting",
    )
    waiting = [app_id for app_id, stream in streams.items() if stream.positions()]
    assert during.value(WAITING) == len(waiting) in (1, 2)
    assert during.value(IN_FLIGHT, server=ollama.url) == ollama.in_flight == 3 - len(waiting)

    # Stop one that waits and one that runs (the stop may reach either worker).
    running = next(app_id for app_id in streams if app_id not in waiting)
    for app_id in (waiting[0], running):
        with connection(two_workers) as client:
            assert client.post(f"/conversations/{app_id}/stop").status_code == 200
    gate.set()
    for stream in streams.values():
        assert stream.finish().status == 200

    after = scrape_when(
        two_workers,
        lambda s: s.gauges() == IDLE and s.answered() - before.answered() >= 5,
        "the streams and the stops to end and be counted",
    )
    assert grew(before, after, "chatterd_stops_total", state="waiting") == 1
    assert grew(before, after, "chatterd_stops_total", state="running") == 1
    assert grew(before, after, "chatterd_stops_total") == 2
    # Every wait counts, the one that ended in a stop too (it never got a slot).
    assert grew(before, after, QUEUE_WAIT) == 3
    assert grew(before, after, FIRST_TOKEN, route="/llmchat") == 2
    if len(waiting) == 2:  # the other one waited, until the running one was stopped
        assert grew(before, after, "chatterd_queue_wait_seconds_sum") > 0
    assert grew(before, after, REQUESTS, route="/llmchat", status="200") == 3


def test_a_client_that_leaves_mid_stream_counts_as_a_disconnect(two_workers, ollama, gate):
    """A stream counts as disconnected when its client leaves while it is quiet (the
    response is cancelled), not only when a write to it fails."""
    prompt_gate = threading.Event()
    ollama.script = lambda r: (
        held_until(gate) if r.path == "/api/chat" else held_prompt(prompt_gate)
    )
    before = scrape_when(two_workers, lambda s: s.gauges() == IDLE, "an idle server")
    try:
        with (
            connection(two_workers) as client,
            client.stream("POST", "/llmchat", json=chat_body(new_app(), "bye")) as answer,
        ):
            assert answer.status_code == 200
            next(answer.iter_lines())  # the first event; then the phone loses its network
        gate.set()  # the reply goes on without its client, and is stored; its slot is freed
        scrape_when(two_workers, lambda s: s.gauges() == IDLE, "the reply to end")
        prompt = {"model": PROMPT_MODEL, "prompt": "p"}
        with (
            connection(two_workers) as client,
            client.stream("POST", "/llmprompt", json=prompt) as answer,
        ):
            assert answer.status_code == 200
            next(answer.iter_lines())
        wait_until(lambda: ollama.abandoned == 1, what="the prompt's generation to be closed")
    finally:
        prompt_gate.set()

    after = scrape_when(
        two_workers,
        lambda s: s.gauges() == IDLE and s.answered() - before.answered() >= 2,
        "both requests to end",
    )
    assert grew(before, after, "chatterd_client_disconnects_total") == 2


def test_a_resumed_stream_is_counted_and_relays_no_new_tokens(two_workers, ollama):
    app_id = new_app()
    start = scrape(two_workers)
    with connection(two_workers) as client:
        original = post(client, "/llmchat", chat_body(app_id, "I live in Ann Arbor"))
    assert original.status == 200
    before = scrape_when(
        two_workers, lambda s: s.answered() - start.answered() >= 1, "the chat to be counted"
    )

    with connection(two_workers) as client:
        rest = client.get(
            "/llmchat", params={"appID": app_id}, headers={"Last-Event-ID": original.events[0].id}
        )
    with connection(two_workers) as client:
        nothing_more = client.get(
            "/llmchat", params={"appID": app_id}, headers={"Last-Event-ID": original.events[-1].id}
        )

    assert rest.status_code == 200 and nothing_more.status_code == 204
    assert parse_events(rest.text) == original.events[1:]
    after = scrape_when(
        two_workers,
        lambda s: s.answered() - before.answered() >= 2 and s.gauges() == IDLE,
        "both resumes to be counted",
    )
    assert grew(before, after, "chatterd_resumed_streams_total") == 1  # not the 204
    assert grew(before, after, REQUESTS, route="/llmchat", status="200") == 1
    assert grew(before, after, REQUESTS, route="/llmchat", status="204") == 1
    assert grew(before, after, TOKENS) == 0  # the model said nothing new
    assert grew(before, after, FIRST_TOKEN) == 0
    assert grew(before, after, QUEUE_WAIT) == 0


def test_tool_calls_and_rounds_are_counted_by_tool_and_outcome(two_workers, ollama, meteo):
    made = [
        tool_call("get_weather", HERE, 0),
        tool_call("get_weather", {"latitude": 100, "longitude": 0}, 1),  # refused by the tool
        tool_call("get_time", {"zone": "UTC"}, 2),  # no such tool
    ]

    def model(received: Received) -> Stream:
        if received.body["messages"][-1]["role"] == "tool":
            return text_stream(TOOL_MODEL, "It is mild.")
        return Stream([chat_line(TOOL_MODEL, "", tool_calls=made), done_line(TOOL_MODEL)])

    ollama.script = model
    before = scrape(two_workers)
    with connection(two_workers) as client:
        answer = post(client, "/llmtools", chat_body(new_app(), "Weather?", model=TOOL_MODEL))

    assert answer.status == 200 and answer.text() == "It is mild."
    assert len(meteo.received) == 1
    after = scrape_when(
        two_workers, lambda s: s.answered() - before.answered() >= 1, "the request to be counted"
    )
    calls = "chatterd_tool_calls_total"
    assert grew(before, after, calls, tool="get_weather", outcome="ok") == 1
    assert grew(before, after, calls, tool="get_weather", outcome="error") == 1
    assert grew(before, after, calls, tool="unknown", outcome="error") == 1
    assert grew(before, after, calls) == 3
    assert "get_time" not in after.text  # tool names the model makes up are not labels
    assert grew(before, after, "chatterd_tool_rounds_total") == 1
    assert grew(before, after, REQUESTS, route="/llmtools", status="200") == 1
    assert grew(before, after, FIRST_TOKEN, route="/llmtools") == 1  # the first round only
    assert grew(before, after, TOKENS, model=TOOL_MODEL) == tokens_of(answer) == 5
    assert grew(before, after, SPEED, model=TOOL_MODEL) == done_lines_of(answer) == 2
    assert grew(before, after, QUEUE_WAIT) == 2  # one generation per round


def test_a_device_tool_call_is_counted_under_one_label(two_workers, ollama):
    """Calls forwarded to the app count too, all under one label ("device"): device tool
    names come from the apps and would make the labels unbounded."""
    location = {
        "type": "function",
        "function": {"name": "get_location", "description": "Where I am", "parameters": None},
    }
    ollama.script = lambda received: Stream(
        [
            chat_line(TOOL_MODEL, "", tool_calls=[tool_call("get_location", {})]),
            done_line(TOOL_MODEL),
        ]
    )
    before = scrape(two_workers)
    with connection(two_workers) as client:
        body = chat_body(new_app(), "Where am I?", model=TOOL_MODEL, tools=[location])
        answer = post(client, "/llmtools", body)

    assert answer.status == 200 and len(answer.named("tool_calls")) == 1
    after = scrape_when(
        two_workers, lambda s: s.answered() - before.answered() >= 1, "the request to be counted"
    )
    assert grew(before, after, "chatterd_tool_calls_total") == 1
    assert "get_location" not in after.text  # the app's own names are not labels


def test_prompts_count_their_tokens_and_the_models_speed(two_workers, ollama):
    """/llmprompt counts what it relays (its lines, and Ollama's own speed from the done
    line) as the chat routes do, though it relays Ollama's bytes as they are."""
    before = scrape(two_workers)
    responses = []
    for prompt in ("one", "and two"):
        with connection(two_workers) as client:
            responses.append(
                client.post("/llmprompt", json={"model": PROMPT_MODEL, "prompt": prompt})
            )
    lines = [json.loads(line) for r in responses for line in r.text.splitlines()]

    assert all(r.status_code == 200 for r in responses)
    after = scrape_when(
        two_workers, lambda s: s.answered() - before.answered() >= 2, "the prompts to be counted"
    )
    assert grew(before, after, TOKENS, model=PROMPT_MODEL) == sum(not x["done"] for x in lines)
    assert grew(before, after, SPEED, model=PROMPT_MODEL) == sum(x["done"] for x in lines) == 2


def test_labels_never_hold_an_app_id(two_workers, ollama):
    canary = f"edu.umich.Canary-{uuid.uuid4().hex[:10]}"
    before = scrape(two_workers)
    with connection(two_workers) as client:
        assert post(client, "/llmchat", chat_body(canary, "hello")).status == 200
        assert post(client, "/llmtools", chat_body(canary, "hello again")).status == 200
        assert client.get("/llmchat", params={"appID": canary}).status_code == 200
        assert client.get(f"/conversations/{canary}").status_code == 200
        assert client.post(f"/conversations/{canary}/stop").status_code == 404
        assert post(client, "/llmchat", chat_body(canary, "x", model="nonesuch:7b")).status == 404
        assert client.post("/llmchat", json={"appID": canary, "model": MODEL}).status_code == 422
        assert client.get(f"/nothing/{canary}").status_code == 404
        assert client.delete(f"/conversations/{canary}").status_code == 204
    after = scrape_when(
        two_workers, lambda s: s.answered() - before.answered() >= 9, "every request counted"
    )
    assert canary.lower() not in after.text.lower()
    values = {value for sample in after.samples for value in sample.labels.values()}
    assert not any("canary" in value.lower() for value in values)
    routes = {s.labels["route"] for s in after.samples if s.name == REQUESTS}
    assert "unmatched" in routes  # a path no route has is one label, whatever the path


def test_routes_are_labelled_by_their_template(two_workers, ollama):
    """A route is labelled by its path without converters (`/conversations/{appID}/stop`,
    not `{appID:appID}`), and its trailing-slash form as the route (`/llmchat/` is
    `/llmchat`)."""
    app_id = new_app()
    before = scrape(two_workers)
    with connection(two_workers) as client:
        assert post(client, "/llmchat/", chat_body(app_id, "slash")).status == 200
        assert client.get(f"/conversations/{app_id}").status_code == 200
        assert client.post(f"/conversations/{app_id}/stop").status_code == 404
    after = scrape_when(
        two_workers, lambda s: s.answered() - before.answered() >= 3, "every request counted"
    )
    assert grew(before, after, REQUESTS, route="/conversations/{appID}/stop", status="404") == 1
    assert grew(before, after, REQUESTS, route="/conversations/{appID}", status="200") == 1
    assert grew(before, after, REQUESTS, route="/llmchat", status="200") == 1


# Every family, with traffic of every kind


@pytest.fixture(scope="module")
def busy_scrape(two_workers, ollama_standin, meteo_standin) -> Scrape:
    """A scrape of a server that has served every kind of traffic, so that every family
    shows with its labels (a labelled family shows only once it has a child)."""
    ollama_standin.reset()
    meteo_standin.reset()
    gate = threading.Event()
    before = scrape(two_workers)
    try:
        with connection(two_workers) as client:
            post(client, "/llmchat", chat_body(app_id := new_app(), "hello"))
            client.get("/llmchat", params={"appID": app_id})  # a resume
            client.post("/llmprompt", json={"model": PROMPT_MODEL, "prompt": "p"})
            post(client, "/llmchat", chat_body(new_app(), "x", model="nonesuch:7b"))  # an error

            call = chat_line(TOOL_MODEL, "", tool_calls=[tool_call("get_weather", HERE)])
            weather = Stream([call, done_line(TOOL_MODEL)])
            ollama_standin.script = lambda r: (
                text_stream(TOOL_MODEL, "Mild.")
                if r.body["messages"][-1]["role"] == "tool"
                else weather
            )
            post(client, "/llmtools", chat_body(new_app(), "Weather?", model=TOOL_MODEL))

            ollama_standin.script = lambda r: held_until(gate)
            held = Streaming(two_workers.url, "/llmchat", chat_body(app_id := new_app(), "hold"))
            held.wait_for(lambda s: s.events, what="the held reply's first line")
            client.post(f"/conversations/{app_id}/stop")
            held.finish()
    finally:
        gate.set()
        ollama_standin.reset()
        meteo_standin.reset()
    return scrape_when(
        two_workers,
        lambda s: s.answered() - before.answered() >= 7 and s.gauges() == IDLE,
        "every request to be counted",
    )


def test_every_family_is_exposed_with_its_type(busy_scrape):
    exposed = {family.name: family.type for family in busy_scrape.families}
    assert exposed == FAMILIES
    for family in busy_scrape.families:
        assert family.documentation, f"{family.name} has no HELP"
    histogram = "chatterd_time_to_first_token_seconds"
    suffixes = {
        s.name.removeprefix(histogram) for s in busy_scrape.samples if s.name.startswith(histogram)
    }
    assert suffixes == {"_bucket", "_count", "_sum"}


def test_the_database_pools_are_idle_when_the_server_is(two_workers, busy_scrape):
    """Each worker reports its own pool every 2 s; the scrape sums them (one idle each)."""
    pools = "chatterd_db_pool_connections"
    scrape_when(
        two_workers,
        lambda s: s.value(pools, state="in_use") == 0 and s.value(pools, state="idle") >= 2,
        "both workers' pools to be idle",
    )


def test_the_dashboard_uses_only_metrics_a_scrape_has(busy_scrape):
    dashboard = json.loads(DASHBOARD.read_text())
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    assert dashboard["schemaVersion"] >= 36 and dashboard["id"] is None
    exposed = {sample.name for sample in busy_scrape.samples}
    panels = dashboard["panels"]
    assert panels
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= exposed, f"{panel['title']}: no such metric {names - exposed}"
            if "histogram_quantile" in target["expr"]:
                assert all(name.endswith("_bucket") for name in names), target["expr"]
                assert re.search(r"by \(le\b", target["expr"]), target["expr"]
            used |= names
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE
        assert set(METRIC_NAME.findall(variable["definition"])) <= exposed
    # And every family shows somewhere.
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    unused = [f for f in FAMILIES if not any(f + suffix in used for suffix in suffixes)]
    assert unused == []


def test_the_prometheus_example_scrapes_with_a_bearer_token_over_https():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chatterd"]
    assert job["metrics_path"] == "/metrics" and job["scheme"] == "https"
    assert job["scrape_interval"] == "15s"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/")
    assert job["tls_config"]["ca_file"].endswith(".crt")
    assert job["static_configs"][0]["targets"]
    assert "CHATTERD_METRICS_KEY" in PROMETHEUS_CONFIG.read_text()


# Who may read the metrics


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def keyed(module_chatterd, database_url, ollama_standin, meteo_standin) -> Chatterd:
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_API_KEYS": "app-key-1,app-key-2",
    }
    return module_chatterd(env)


@pytest.fixture(scope="module")
def metrics_keyed(module_chatterd, database_url, ollama_standin, meteo_standin) -> Chatterd:
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_API_KEYS": "app-key-1",
        "CHATTERD_METRICS_KEY": "scrape-secret",
    }
    return module_chatterd(env)


def test_with_api_keys_the_metrics_need_an_app_key(keyed):
    refusals = ({}, bearer("not-a-key"), {"Authorization": "Basic app-key-1"})
    for headers in refusals:
        refused = httpx.get(f"{keyed.url}/metrics", headers=headers, timeout=10)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "chatterd_" not in refused.text
    with_key = scrape_when(
        keyed,
        lambda s: s.value(REQUESTS, route="/metrics", status="401") >= len(refusals),
        "the refusals to be counted",
        headers=bearer("app-key-2"),
    )
    assert with_key.value(REQUESTS, route="/metrics", status="401") == len(refusals)
    assert "app-key" not in with_key.text  # no key is a label


def test_with_a_metrics_key_only_that_token_opens_the_metrics(metrics_keyed):
    url = metrics_keyed.url
    for path in ("/metrics", "/metrics/"):
        for headers in ({}, bearer("app-key-1"), bearer("scrape-secret-")):
            refused = httpx.get(f"{url}{path}", headers=headers, timeout=10)
            assert refused.status_code in (401, 404), (path, headers)
            assert "chatterd_" not in refused.text, (path, headers)
    assert httpx.get(f"{url}/metrics", headers=bearer("app-key-1")).status_code == 401
    # ...and the metrics key opens nothing else.
    chat = chat_body(new_app(), "hello")
    assert (
        httpx.post(f"{url}/llmchat", json=chat, headers=bearer("scrape-secret")).status_code == 401
    )
    assert httpx.get(f"{url}/conversations/x", headers=bearer("scrape-secret")).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    scraped = scrape(metrics_keyed, bearer("scrape-secret"))
    assert "scrape-secret" not in scraped.text and "app-key" not in scraped.text


# The chatterd command


def test_the_chatterd_command_gives_its_workers_a_fresh_directory_and_removes_it(
    start_chatterd, database_url, ollama, meteo_standin, tmp_path
):
    env = {**chatterd_env(database_url, ollama.url, meteo_standin.url), "TMPDIR": str(tmp_path)}
    server = start_chatterd(env, "--workers", "2", command=[CHATTERD])
    (directory,) = tmp_path.glob("chatterd-metrics-*")

    def workers() -> set[int]:
        """The processes with live gauges there, but chatterd's own (granian's main
        process: cli.py imports main.py for the configuration, so it has files too)."""
        found = {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("gauge_live*.db")}
        return found - {server.process.pid}

    wait_until(lambda: len(workers()) == 2, what="both workers' files")
    before = scrape(server)
    for _ in range(4):
        with connection(server) as client:
            assert post(client, "/llmchat", chat_body(new_app(), "hi")).status == 200
    after = scrape_when(
        server, lambda s: s.answered() - before.answered() >= 4, "the chats to be counted"
    )
    assert grew(before, after, REQUESTS, route="/llmchat", status="200") == 4
    assert server.stop() == 0
    assert not directory.exists()
