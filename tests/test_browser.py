"""The playground in a real browser: headless Chromium driven over WebDriver (browser.py).

Two chatterds serve it: one open (no API keys) that lets a page on another origin in
(CHATTERD_CORS_ORIGINS), with one generation at a time and a short history budget so
that the queue and the context notice can be seen; and one with API keys and CORS off.
The page on another origin is served by a tiny HTTP server of its own on another port.
Skipped where Chromium or chromedriver is not installed.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import browser as webdriver
from conftest import chatterd_env
from sse import Streaming, chat_body, parse_events, wait_until
from standins import (
    MODELS,
    Received,
    Stream,
    chat_line,
    done_line,
    pieces,
    temperature_at,
    text_stream,
    tool_call,
)

if reason := webdriver.missing():
    pytest.skip(reason, allow_module_level=True)

MODEL = "qwen3:0.6b"
KEY = "k3y-for-the-playground"
HERE = {"latitude": 42.28, "longitude": -83.74}
WORDS = [f"w{i} " for i in range(12)]


# The parts: the browser, the other origin, the two chatterds.


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Browser]:
    with webdriver.Browser(width=1200, height=900) as session:
        yield session


class OtherOrigin(BaseHTTPRequestHandler):
    PAGE = (
        b'<!doctype html><meta charset="utf-8"><title>another site</title>'
        b'<link rel="icon" href="data:,"><p id="here">another site</p>'
    )

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.PAGE)))
        self.end_headers()
        self.wfile.write(self.PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def other_origin() -> Iterator[str]:
    """A page on another origin (another port of loopback): its URL, which is its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtherOrigin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def open_server(module_chatterd, database_url, ollama_standin, meteo_standin, other_origin):
    return module_chatterd(
        {
            **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
            "CHATTERD_CORS_ORIGINS": other_origin,
            "CHATTERD_OLLAMA_PARALLEL": "1",
            "CHATTERD_HISTORY_MAX_MESSAGES": "4",
        }
    )


@pytest.fixture(scope="module")
def keyed_server(module_chatterd, database_url, ollama_standin, meteo_standin):
    return module_chatterd(
        {
            **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
            "CHATTERD_API_KEYS": f"another-key,{KEY}",
        }
    )


@pytest.fixture
def gate(ollama) -> Iterator[threading.Event]:
    """Held replies wait for this; it is opened at the end of the test in any case."""
    gate = threading.Event()
    yield gate
    gate.set()


@pytest.fixture
def app_id() -> str:
    return f"test.playground.{uuid.uuid4().hex[:8]}"


def held(gate: threading.Event, words: list[str], after: int, model: str = MODEL) -> Stream:
    """A reply of `words` that stops after `after` of them until the gate opens."""
    lines = [chat_line(model, word) for word in words] + [done_line(model)]
    return Stream(lines, hold_after=after, release=gate)


def last_content(received: Received) -> str:
    return received.body["messages"][-1]["content"]


# The page, as a person uses it.


class Playground:
    def __init__(self, browser: webdriver.Browser, server: Any) -> None:
        self.browser, self.server = browser, server

    def open(self, app_id: str, *, models: bool = True) -> Playground:
        """A fresh tab's page (nothing remembered) on `app_id`."""
        self.browser.get(f"{self.server.url}/health")  # same origin, without the page's script
        self.browser.run("sessionStorage.clear()")
        self.browser.get(f"{self.server.url}/playground")
        if models:
            self.wait_models()
        self.browser.run(
            "const field = document.getElementById('app-id');"
            " field.value = arguments[0]; field.dispatchEvent(new Event('change'));",
            app_id,
        )
        return self

    def wait_models(self) -> None:
        self.browser.wait(
            "return document.getElementById('model').dataset.state === 'ready'", what="models"
        )

    def models(self) -> list[str]:
        return self.browser.run(
            "return [...document.querySelectorAll('#model option')].map(o => o.value)"
        )

    def pick(self, model: str) -> None:
        self.browser.find(f'#model option[value="{model}"]').click()

    def say(self, text: str, *, sent: bool = True, enter: bool = False) -> None:
        """Type `text` and press Send (or Enter); wait until it shows as sent, unless told
        otherwise."""
        before = len(self.items())
        prompt = self.browser.find("#prompt")
        prompt.clear()
        prompt.type(text + (webdriver.ENTER if enter else ""))
        if not enter:
            self.browser.find("#send").click()
        if sent:
            self.browser.wait(
                lambda: len(items := self.items()) > before and items[before]["kind"] == "user",
                what=f"{text!r} sent",
            )

    def items(self) -> list[dict[str, Any]]:
        """What the transcript shows: each item's kind, its text and its parts."""
        return self.browser.run(
            "return [...document.querySelectorAll('#transcript > .item')].map(e => ({"
            " kind: e.dataset.kind, text: e.textContent,"
            " content: e.querySelector('.content')?.textContent ?? null,"
            " thinking: e.querySelector('.thinking')?.textContent ?? null,"
            " stopped: !!e.querySelector('.stopped-mark')}))"
        )

    def replies(self) -> list[str]:
        return [item["content"] for item in self.items() if item["kind"] == "assistant"]

    def wait_reply(self, text: str, what: str = "") -> None:
        self.browser.wait(lambda: text in self.replies(), what=what or f"the reply {text!r}")

    def state(self) -> str:
        return self.browser.run("return document.getElementById('status').dataset.state")

    def status(self) -> str:
        return self.browser.text("#status")

    def wait_state(self, state: str, timeout: float = 10) -> None:
        self.browser.wait(lambda: self.state() == state, timeout=timeout, what=f"state {state}")

    def stored(self) -> list[tuple[str, str]]:
        """Press Show and read the stored conversation the page lists: (role, content)."""
        self.browser.run("document.getElementById('stored-note').textContent = ''")
        self.browser.find("#show-stored").click()
        self.browser.wait(
            "const note = document.getElementById('stored-note').textContent;"
            " return note && note !== 'Loading…'",
            what="the stored conversation",
        )
        return [
            (role.rstrip(":").split(" ")[0], content)
            for role, content in self.browser.run(
                "return [...document.querySelectorAll('#stored li')].map(li => ["
                " li.querySelector('.role').textContent,"
                " li.querySelector('.content').textContent])"
            )
        ]

    def saved_reply(self) -> dict[str, Any] | None:
        raw = self.browser.session_storage().get("chatterd.reply")
        return json.loads(raw) if raw else None


# (a) the models and a streamed reply


def test_the_playground_lists_the_models_and_streams_a_reply(
    browser, open_server, ollama, gate, app_id
):
    page = Playground(browser, open_server).open(app_id)
    assert page.models() == sorted(MODELS)
    page.pick(MODEL)
    ollama.script = lambda r: Stream(
        [
            chat_line(MODEL, "", thinking="The user greets me. "),
            chat_line(MODEL, "", thinking="I greet back."),
            *(chat_line(MODEL, piece) for piece in pieces("Hello! How can I help?")),
            done_line(MODEL),
        ],
        hold_after=4,
        release=gate,
    )

    page.say("Hi there")
    page.wait_reply("Hello!", "the first pieces, while the model is still generating")
    assert page.state() == "streaming"
    assert browser.find("#stop").enabled and not browser.find("#send").enabled
    gate.set()
    page.wait_state("idle")

    [you, reply] = page.items()
    assert (you["kind"], you["content"]) == ("user", "Hi there")
    assert reply["kind"] == "assistant" and reply["content"] == "Hello! How can I help?"
    assert reply["thinking"] == "The user greets me. I greet back."
    muted = browser.run(
        "const style = (s) => getComputedStyle(document.querySelector(s));"
        " return [style('#transcript .thinking').fontStyle, style('#transcript .thinking').color,"
        " style('#transcript .assistant .content').color]"
    )
    assert muted[0] == "italic" and muted[1] != muted[2]  # thinking looks apart from the reply
    assert page.status() == "Ready."
    [sent] = ollama.chats()
    assert sent["model"] == MODEL
    assert sent["messages"] == [{"role": "user", "content": "Hi there"}]
    assert page.stored() == [("user", "Hi there"), ("assistant", "Hello! How can I help?")]


def test_tools_the_queue_notices_and_errors_are_shown(
    browser, open_server, ollama, meteo, gate, app_id
):
    page = Playground(browser, open_server).open(app_id)
    page.pick(MODEL)
    browser.find("#tools").click()
    weather_call = tool_call("get_weather", HERE)

    def model(received: Received) -> Stream:
        said = last_content(received) if received.body["messages"][-1]["role"] == "user" else ""
        if said == "block":
            return held(gate, ["busy"], after=1)
        if said == "Hello from the phone":
            return text_stream(MODEL, "Hello, phone.")
        if said == "Where am I?":
            return Stream(
                [chat_line(MODEL, "", tool_calls=[tool_call("get_location", {})]), done_line(MODEL)]
            )
        if "tools" in received.body:  # a small model that keeps calling the same tool
            return Stream([chat_line(MODEL, "", tool_calls=[weather_call]), done_line(MODEL)])
        if said == "And tomorrow?":
            return Stream([chat_line(MODEL, "I can"), {"error": "the model ran out of memory"}])
        return text_stream(MODEL, "It is mild in Ann Arbor.")

    ollama.script = model

    # The server's tool, called again and again: shown, reused, then withdrawn.
    page.say("Weather in Ann Arbor?")
    page.wait_state("idle")
    weather = f"Weather at lat: 42.28, lon: -83.74 is {temperature_at(**HERE)}ºF"
    shown = [(item["kind"], item["text"]) for item in page.items()]
    assert shown == [
        ("user", "youWeather in Ann Arbor?"),
        ("tool", f"Looking up the weather at latitude: 42.28, longitude: -83.74…{weather}"),
        (
            "tool",
            "Looking up the weather at latitude: 42.28, longitude: -83.74…"
            f"{weather} (asked again: the same answer)",
        ),
        ("notice", shown[3][1]),
        ("assistant", f"{MODEL}It is mild in Ann Arbor."),
    ]
    assert "get_weather 2 times" in shown[3][1]
    assert len(meteo.received) == 1

    # Waiting in line behind another client's reply, then part of the history left out,
    # then Ollama breaking off.
    browser.find("#tools").click()
    blocker = Streaming(open_server.url, "/llmchat", chat_body(f"{app_id}.other", "block"))
    wait_until(lambda: ollama.in_flight == 1, what="the other reply generating")
    page.say("And tomorrow?")
    browser.wait(
        lambda: any(item["text"] == "Waiting, place 1" for item in page.items()), what="queued"
    )
    assert page.status() == "Waiting, place 1"
    gate.set()
    page.wait_state("idle")
    blocker.finish()
    kinds = [item["kind"] for item in page.items()[5:]]
    assert kinds == ["user", "context", "assistant", "error"]  # the place in line is gone
    context, partial, error = page.items()[6:]
    assert "earlier messages not sent" in context["text"]
    assert partial["content"] == "I can"
    assert error["text"] == "Ollama: the model ran out of memory"

    # A device tool, declared by the app that shares this appID: its call is shown.
    with httpx.Client(base_url=open_server.url, timeout=30) as app:
        declared = app.post(
            "/llmtools",
            json=chat_body(
                app_id,
                "Hello from the phone",
                tools=[{"type": "function", "function": {"name": "get_location"}}],
            ),
        )
        assert declared.status_code == 200
    browser.find("#tools").click()
    page.say("Where am I?")
    page.wait_state("idle")
    device = page.items()[-1]
    assert device["kind"] == "device"
    assert device["content"].startswith("get_location()\nThe app that declared this tool runs it")


# (b) a reload mid-reply resumes it


def test_a_reload_mid_reply_resumes_it_where_it_was(browser, open_server, ollama, gate, app_id):
    page = Playground(browser, open_server).open(app_id)
    ollama.script = lambda r: held(gate, WORDS, after=4)
    page.say("count")
    page.wait_reply("".join(WORDS[:4]))
    saved = page.saved_reply()
    assert saved["appID"] == app_id and saved["route"] == "llmchat"
    assert saved["token"] is None  # no keys: no token
    assert int(saved["lastEventId"]) % 1_000_000 == 3  # the fourth event of its reply

    browser.refresh()
    page.wait_state("streaming")  # the EventSource is connected, the reply still held
    assert page.replies() == ["".join(WORDS[:4])]  # what was shown before the reload
    assert "Resumed" in page.status()
    gate.set()
    page.wait_state("idle")

    assert page.replies() == ["".join(WORDS)]  # the whole reply, nothing twice
    assert page.saved_reply() is None
    assert len(ollama.generations()) == 1
    assert page.stored() == [("user", "count"), ("assistant", "".join(WORDS))]


def test_a_reload_before_the_reply_began_says_where_to_find_it(
    browser, open_server, ollama, gate, app_id
):
    ollama.script = lambda r: (
        held(gate, ["first"], after=1) if last_content(r) == "first" else text_stream(MODEL, "2")
    )
    first = Streaming(open_server.url, "/llmchat", chat_body(app_id, "first"))  # another client
    wait_until(lambda: ollama.in_flight == 1, what="the first reply generating")
    page = Playground(browser, open_server).open(app_id)
    page.say("second")  # it waits for the first turn of this appID: no answer yet
    assert page.state() == "sending" and page.saved_reply()["began"] is False

    browser.refresh()
    page.wait_models()
    assert page.state() == "idle" and page.saved_reply() is None
    assert "reloaded before the reply began" in page.items()[-1]["text"]
    gate.set()
    first.finish()
    wait_until(lambda: len(ollama.generations()) == 2, what="the second turn")
    browser.wait(lambda: ("assistant", "2") in page.stored(), what="the second reply stored")


# (c) with API keys


def test_with_api_keys_the_key_is_needed_and_a_reload_resumes_through_the_token(
    browser, keyed_server, ollama, meteo, gate, app_id
):
    page = Playground(browser, keyed_server).open(app_id, models=False)  # /playground: no key
    browser.wait(
        "return document.getElementById('model').dataset.state === 'failed'", what="a refusal"
    )
    assert "needs an API key" in browser.text("#models-note")
    assert page.models() == []
    page.say("hello?", sent=False)  # no model to pick: the page says why
    assert "needs an API key" in page.status()
    assert page.items() == [] and ollama.generations() == []

    browser.find("#key").type(KEY + "\ue004")  # Tab: the field's change loads the models
    page.wait_models()
    assert page.models() == sorted(MODELS)
    browser.find("#tools").click()

    def model(received: Received) -> Stream:  # words, held; a call to the server's tool; words
        if received.body["messages"][-1]["role"] == "tool":
            return text_stream(MODEL, "".join(WORDS))
        lines = [
            chat_line(MODEL, "", thinking="A place: the weather tool."),
            chat_line(MODEL, "Let me look. "),
            chat_line(MODEL, "", tool_calls=[tool_call("get_weather", HERE)]),
            done_line(MODEL),
        ]
        return Stream(lines, hold_after=2, release=gate)

    ollama.script = model
    page.say("Weather in Ann Arbor?")
    page.wait_reply("Let me look. ")
    saved = page.saved_reply()
    assert saved["route"] == "llmtools"
    assert re.fullmatch(r"[0-9]+\.[A-Za-z0-9_-]+", saved["token"])

    browser.refresh()
    assert browser.find("#key").prop("value") == KEY  # kept for the tab
    page.wait_state("streaming")  # an EventSource: no Authorization header, the token instead
    gate.set()
    page.wait_state("idle")
    weather = f"Weather at lat: 42.28, lon: -83.74 is {temperature_at(**HERE)}ºF"
    shown = [(item["kind"], item["thinking"], item["content"]) for item in page.items()]
    assert [(kind, thinking) for kind, thinking, _ in shown] == [
        ("user", None),
        ("assistant", "A place: the weather tool."),
        ("tool", None),
        ("assistant", None),
    ]
    assert [content for _, _, content in shown] == [
        "Weather in Ann Arbor?",
        "Let me look. ",
        None,
        "".join(WORDS),
    ]
    assert page.items()[2]["text"].endswith(weather)  # the named events came resumed too
    assert page.status() == "Ready (the reply was resumed)."
    assert page.stored() == [
        ("user", "Weather in Ann Arbor?"),
        ("assistant", "Let me look. "),
        ("tool", weather),
        ("assistant", "".join(WORDS)),
    ]
    assert len(ollama.generations()) == 2

    without_token = httpx.get(f"{keyed_server.url}/llmtools", params={"appID": app_id})
    assert without_token.status_code == 401  # what the resume would get without the token


# (d) the stop button


def test_stop_ends_a_held_reply_and_the_partial_reply_is_stored(
    browser, open_server, ollama, gate, app_id
):
    page = Playground(browser, open_server).open(app_id)
    ollama.script = lambda r: held(gate, ["Hello", " wor", "ld, and more"], after=2)
    page.say("tell me", enter=True)
    page.wait_reply("Hello wor")

    browser.find("#stop").click()
    page.wait_state("idle")

    [reply] = [item for item in page.items() if item["kind"] == "assistant"]
    assert reply["content"] == "Hello wor" and reply["stopped"]
    assert page.status() == "Stopped."
    assert not gate.is_set()  # ended while the model was still "generating"
    wait_until(lambda: ollama.abandoned == 1, what="Ollama's stream to be closed")
    assert page.stored() == [("user", "tell me"), ("assistant", "Hello wor")]


# (e) a page on another origin, with CORS on and off

FETCH = """
const [url, options, done] = arguments;
fetch(url, options).then(
  async (r) => {
    try {
      done({ok: true, status: r.status, text: await r.text(),
            token: r.headers.get('Chatterd-Resume-Token')});
    } catch (e) { done({ok: false, error: String(e), status: r.status}); }
  },
  (e) => done({ok: false, error: String(e)}));
"""

FOLLOW = """
const [url, done] = arguments;
const seen = [];
const source = new EventSource(url);
source.onmessage = (e) => {
  seen.push({id: e.lastEventId, data: JSON.parse(e.data)});
  if (seen[seen.length - 1].data.done) { source.close(); done({ok: true, seen}); }
};
source.onerror = () => {
  if (source.readyState === EventSource.CLOSED) done({ok: false, seen});
};
"""


def json_post(body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """A preflighted request: Content-Type application/json, and Authorization."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return {"method": "POST", "headers": headers, "body": json.dumps(body)}


def reply_of(text: str) -> str:
    return "".join(
        e.json()["message"]["content"] for e in parse_events(text) if e.event == "message"
    )


def test_a_page_on_another_origin_streams_only_when_cors_lets_it(
    browser, open_server, keyed_server, other_origin, ollama, app_id
):
    browser.get(other_origin)
    assert browser.run("return location.origin") == other_origin

    # CORS on for this origin: a simple request (a text/plain body, no preflight) streams...
    simple = {"method": "POST", "body": json.dumps(chat_body(app_id, "hi from afar"))}
    answer = browser.run_async(FETCH, f"{open_server.url}/llmchat", simple)
    assert answer["ok"] and answer["status"] == 200
    assert reply_of(answer["text"]) == "You said: hi from afar"
    # ... a preflighted one too ...
    answer = browser.run_async(
        FETCH, f"{open_server.url}/llmchat", json_post(chat_body(app_id, "again"), KEY)
    )
    assert answer["ok"] and reply_of(answer["text"]) == "You said: again"
    # ... and the page's own EventSource can follow the reply again.
    followed = browser.run_async(FOLLOW, f"{open_server.url}/llmchat?appID={app_id}")
    assert followed["ok"]
    assert "".join(e["data"]["message"]["content"] for e in followed["seen"]) == "You said: again"
    assert all(e["id"] for e in followed["seen"])
    assert len(ollama.generations()) == 2

    # CORS off: the same requests are refused; the preflighted one never reaches chatterd.
    refused = browser.run_async(
        FETCH, f"{keyed_server.url}/llmchat", json_post(chat_body(app_id, "let me in"), KEY)
    )
    assert refused == {"ok": False, "error": "TypeError: Failed to fetch"}
    assert len(ollama.generations()) == 2
    # A simple request is sent and answered, but the page may not read the answer.
    refused = browser.run_async(FETCH, f"{keyed_server.url}/health", {})
    assert refused == {"ok": False, "error": "TypeError: Failed to fetch"}


# The README's picture


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_a_screenshot_of_a_conversation(browser, keyed_server, ollama, meteo, tmp_path):
    """A picture of the playground mid-conversation; written to $CHATTERD_PLAYGROUND_PNG when
    that is set (docs/playground.png is made so)."""
    demo = "edu.umich.playground.demo"
    httpx.delete(
        f"{keyed_server.url}/conversations/{demo}", headers={"Authorization": f"Bearer {KEY}"}
    )
    page = Playground(browser, keyed_server).open(demo, models=False)
    browser.find("#key").type(KEY + "\ue004")
    page.wait_models()
    page.pick(MODEL)
    weather = f"{temperature_at(**HERE)}ºF"

    def model(received: Received) -> Stream:
        if received.body["messages"][-1]["role"] == "tool":
            return text_stream(MODEL, f"It is {weather} in Ann Arbor right now: a mild day.")
        if "tools" in received.body:
            return Stream(
                [
                    chat_line(MODEL, "", thinking="Ann Arbor is at 42.28, -83.74. "),
                    chat_line(MODEL, "", thinking="I should call get_weather."),
                    chat_line(MODEL, "", tool_calls=[tool_call("get_weather", HERE)]),
                    done_line(MODEL),
                ]
            )
        return Stream(
            [
                chat_line(MODEL, "", thinking="A greeting; I answer briefly."),
                *(
                    chat_line(MODEL, p)
                    for p in pieces(
                        "Hi! I'm a small model on Ollama, relayed by chatterd. Ask me anything."
                    )
                ),
                done_line(MODEL),
            ]
        )

    ollama.script = model
    page.say("Hello! Who are you?")
    page.wait_state("idle")
    browser.find("#tools").click()
    page.say("What's the weather in Ann Arbor?")
    page.wait_state("idle")
    page.stored()
    browser.find("#prompt").type("And tomorrow?")

    picture = browser.screenshot()
    width, height = png_size(picture)
    assert width == 1200 and height > 600
    (tmp_path / "playground.png").write_bytes(picture)
    if target := os.environ.get("CHATTERD_PLAYGROUND_PNG"):
        Path(target).write_bytes(picture)
