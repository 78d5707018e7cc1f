"""Reading chatterd's answers the way the course's apps do."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg import sql


@dataclass
class Event:
    event: str  # "message" when the stream names none
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Answer:
    status: int
    content_type: str
    events: list[Event] = field(default_factory=list)
    body: Any = None  # the JSON body of a non-SSE answer

    def data(self) -> list[dict[str, Any]]:
        """The Ollama lines relayed as plain data events."""
        return [event.json() for event in self.events if event.event == "message"]

    def text(self) -> str:
        return "".join(line["message"]["content"] for line in self.data())

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.event == name]


def parse_events(text: str) -> list[Event]:
    """Split an SSE body as the apps do: each line at its first colon, events at blank lines."""
    events, fields = [], {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            if "data" in fields:
                events.append(
                    Event(fields.get("event", "message"), fields["data"], fields.get("id"))
                )
            fields = {}
            continue
        name, _, value = line.partition(":")
        if name:  # a line starting with ":" is a comment (a keep-alive ping)
            fields[name] = value[1:] if value.startswith(" ") else value
    return events


def post(client: httpx.Client, path: str, body: Any) -> Answer:
    """POST a JSON body and read the whole answer, SSE or JSON."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(
        path,
        content=content,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "text/event-streaming",
        },  # the apps' misspelling
    )
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        return Answer(response.status_code, content_type, parse_events(response.text))
    return Answer(response.status_code, content_type, body=response.json())


def chat_body(
    app_id: str, *contents: str, model: str = "gemma3:270m", role: str = "user", **extra: Any
) -> dict[str, Any]:
    return {
        "appID": app_id,
        "model": model,
        "stream": True,
        "messages": [{"role": role, "content": content} for content in contents],
        **extra,
    }


def stored(db: psycopg.Connection, app_id: str) -> list[tuple[str, str]]:
    """The (role, content) rows of one conversation, in order."""
    return db.execute(
        "SELECT username, message FROM chatts WHERE appid = %s ORDER BY seq", (app_id,)
    ).fetchall()


@contextmanager
def refusing(db: psycopg.Connection, table: str, app_id: str) -> Iterator[None]:
    """While the block runs, the database refuses new rows of `table` for this appID (a
    CHECK constraint, NOT VALID: the rows already there stay as they are)."""
    names = {"table": sql.Identifier(table), "check": sql.Identifier(f"test_refused_{table}")}
    db.execute(
        sql.SQL(
            "ALTER TABLE {table} ADD CONSTRAINT {check} CHECK (appid <> {app}) NOT VALID"
        ).format(**names, app=sql.Literal(app_id))
    )
    try:
        yield
    finally:
        db.execute(sql.SQL("ALTER TABLE {table} DROP CONSTRAINT {check}").format(**names))


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Wait for a condition to hold (a row, a request, an event), never for a set time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.005)


class Streaming(threading.Thread):
    """One streamed request read in a thread, event by event, so a test can act meanwhile."""

    def __init__(
        self,
        base_url: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        params: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        """POST `body` (or GET, without one) and read the answer as it comes."""
        super().__init__(daemon=True)
        self.base_url, self.path, self.body = base_url, path, body
        self.headers, self.params, self.timeout = headers or {}, params, timeout
        self.error: Exception | None = None  # what broke the stream, if anything
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.events: list[Event] = []
        self.body_text = ""  # the whole body, once ended
        self.ended_at: float | None = None  # time.monotonic() at the end of the body
        self.start()

    def run(self) -> None:
        method = "GET" if self.body is None else "POST"
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=self.timeout) as client,
                client.stream(
                    method, self.path, json=self.body, headers=self.headers, params=self.params
                ) as answer,
            ):
                self.response_headers = dict(answer.headers)
                self.status = answer.status_code
                text = ""
                for piece in answer.iter_text():
                    text += piece
                    self.events = parse_events(text)
                self.body_text = text
        except httpx.HTTPError as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.event == name]

    def positions(self) -> list[int]:
        return [event.json()["queued"]["position"] for event in self.named("queued")]

    def wait_for(self, condition: Callable[[Streaming], bool], what: str = "") -> None:
        wait_until(lambda: condition(self), what=what or "a stream's event")

    def finish(self, timeout: float = 30) -> Streaming:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        return self
