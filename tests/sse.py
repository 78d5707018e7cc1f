"""Reading chatterd's answers the way the course's apps do."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg


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
