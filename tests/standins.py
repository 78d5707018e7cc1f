"""Stand-ins for Ollama and Open-Meteo: real HTTP servers on loopback, speaking their wire formats.

Each runs its own asyncio loop in a thread and writes HTTP/1.1 by hand, so a test can make
it do what the real servers do when things go wrong: refuse with a status, stay silent
before the headers, send a line that is not JSON, or cut the connection mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Stream:
    """An NDJSON answer: each item is one line (a dict is written as compact JSON)."""

    lines: list[dict[str, Any] | str]
    gap: float = 0.0  # seconds between lines
    headers_delay: float = 0.0  # silence before the headers, as while Ollama loads a model
    cut_after: int | None = None  # abort the connection after this many lines
    hold_after: int | None = None  # after this many lines, wait until `release` is set
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Reply:
    """A whole JSON answer with a status, as for errors."""

    status: int
    body: dict[str, Any] | str
    headers_delay: float = 0.0


Answer = Stream | Reply


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HTTPStandIn:
    """A tiny HTTP/1.1 server whose answers come from `self.answer(received)`."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self.in_flight = 0  # requests being answered now
        self.most_in_flight = 0  # the most ever answered at once
        self.abandoned = 0  # streams whose client closed the connection before their end
        self.connections = 0  # connections accepted so far
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started, port, tls), daemon=True)
        self._thread.start()
        started.wait()
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def answer(self, received: Received) -> Answer:
        raise NotImplementedError

    def counts(self, received: Received) -> bool:
        """Whether a request counts in `in_flight` (Ollama's: only generations)."""
        return True

    def close(self) -> None:
        """Stop serving and cut every connection, as a server that is killed. Idempotent."""
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _serve(self, started: threading.Event, port: int, tls: ssl.SSLContext | None) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", port, ssl=tls)
        )
        started.set()
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while received := await self._read_request(reader):
                self.received.append(received)
                counted = self.counts(received)
                self.in_flight += counted
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    if not await self._write(reader, writer, self.answer(received)):
                        return
                finally:
                    self.in_flight -= counted
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the stand-in is closing
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Received | None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        url = urlsplit(target)
        return Received(method, url.path, parse_qs(url.query), body, headers)

    async def _write(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer
    ) -> bool:
        """Write one answer; False when the connection was cut on purpose."""
        await asyncio.sleep(answer.headers_delay)
        if isinstance(answer, Reply):
            body = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, 'Status')}\r\n"
                f"Content-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for count, line in enumerate(answer.lines):
            if answer.cut_after is not None and count >= answer.cut_after:
                writer.transport.abort()
                return False
            text = line if isinstance(line, str) else json.dumps(line, separators=(",", ":"))
            chunk = (text + "\n").encode()
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            if answer.gap:
                await asyncio.sleep(answer.gap)
            if count + 1 == answer.hold_after:
                while not answer.release.is_set():  # as a model that takes its time
                    if reader.at_eof():  # the client went away: Ollama stops generating
                        self.abandoned += 1
                        return False
                    await asyncio.sleep(0.005)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


# Ollama


def created_at() -> str:
    """RFC 3339 UTC with nanoseconds, as Ollama writes it."""
    now = time.time_ns()
    stamp = datetime.fromtimestamp(now // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{now % 1_000_000_000:09d}Z"


def chat_line(model: str, content: str = "", **message: Any) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": created_at(),
        "message": {"role": "assistant", "content": content, **message},
        "done": False,
    }


def done_line(model: str, content: str = "", prompt_eval_count: int = 26) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": created_at(),
        "message": {"role": "assistant", "content": content},
        "done": True,
        "done_reason": "stop",
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": 342546000,
        "eval_count": 282,
        "eval_duration": 4535599000,
    }


def pieces(text: str, size: int = 3) -> list[str]:
    """Split text into token-like pieces, whitespace and all."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def text_stream(model: str, text: str, **stream: Any) -> Stream:
    return Stream(
        [*(chat_line(model, piece) for piece in pieces(text)), done_line(model)], **stream
    )


def tool_call(name: str, arguments: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return {
        "id": f"call_{name}_{index}",
        "function": {"index": index, "name": name, "arguments": arguments},
    }


def remembering_brain(messages: list[dict[str, Any]]) -> str:
    """The stand-in model: answers from the history it is sent, nothing else."""
    question = messages[-1]["content"] if messages else ""
    if "In what state do I live?" in question:
        for message in messages:
            if message["role"] == "user" and "I live in Ann Arbor" in message["content"]:
                return "You live in Michigan."
        return "I do not know where you live."
    return f"You said: {question}"


MODELS = ("gemma3:270m", "gemma3:12b", "qwen3:0.6b", "tinyllama:latest")


def model_entry(name: str, **extra: Any) -> dict[str, Any]:
    """A model as /api/tags and /api/ps list it."""
    return {
        "name": name,
        "model": name,
        "size": 291554930,
        "digest": "e4a6a0ef64ba6f0e3e9a8f8d1fbd8b1e3e6fd29e0f7f1a1b3c0b2f1c6c1f7d4a",
        "details": {"format": "gguf", "family": name.split(":")[0], "parameter_size": "268M"},
        **extra,
    }


# The types Ollama's Go decoder wants for the fields it knows; others it ignores.
FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "/api/generate": {
        "prompt": (str,),
        "suffix": (str,),
        "system": (str,),
        "template": (str,),
        "images": (list,),
        "format": (str, dict),
        "options": (dict,),
        "stream": (bool,),
        "raw": (bool,),
        "keep_alive": (str, int, float),
        "think": (bool, str),
        "context": (list,),
    },
    "/api/chat": {
        "messages": (list,),
        "tools": (list,),
        "format": (str, dict),
        "options": (dict,),
        "stream": (bool,),
        "keep_alive": (str, int, float),
        "think": (bool, str),
    },
}


def wrongly_typed(path: str, body: dict[str, Any]) -> str | None:
    """Ollama's 400 for a field of the wrong JSON type, as its decoder words it."""
    for name, kinds in FIELD_TYPES.get(path, {}).items():
        value = body.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return f"json: cannot unmarshal {type(value).__name__} into Go struct field {name}"
    return None


class OllamaStandIn(HTTPStandIn):
    """Ollama's /api/chat, /api/generate, /api/tags and /api/ps. By default it answers with
    `remembering_brain`; a test sets `script` to answer otherwise, one call per request.
    It has the `models` installed (others are 404, as Ollama says) and `loaded` in memory."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.script: Callable[[Received], Answer] | None = None
        self.models: set[str] = set(MODELS)
        self.loaded: set[str] = set()
        super().__init__(port, tls)

    def reset(self) -> None:
        self.script = None
        self.models, self.loaded = set(MODELS), set()
        self.received.clear()
        self.most_in_flight = self.abandoned = 0

    def generations(self) -> list[Received]:
        """The /api/chat and /api/generate requests received so far."""
        return [r for r in self.received if self.counts(r)]

    def counts(self, received: Received) -> bool:
        return received.path in ("/api/chat", "/api/generate")

    def chats(self) -> list[dict[str, Any]]:
        """The bodies of the /api/chat requests received so far."""
        return [r.body for r in self.received if r.path == "/api/chat"]

    def answer(self, received: Received) -> Answer:
        if received.path == "/api/version":
            return Reply(200, {"version": "0.33.0"})
        if received.path == "/api/tags":
            stamp = "2026-11-01T10:00:00.000000000Z"
            return Reply(200, {"models": [model_entry(m, modified_at=stamp) for m in self.models]})
        if received.path == "/api/ps":
            stamp = "2026-12-01T10:05:00.000000000Z"
            return Reply(200, {"models": [model_entry(m, expires_at=stamp) for m in self.loaded]})
        if received.path not in ("/api/chat", "/api/generate"):
            return Reply(404, "404 page not found")
        body = received.body
        if not isinstance(body, dict):
            return Reply(400, {"error": "invalid character 'x' looking for beginning of value"})
        model = body.get("model")
        if not model:
            return Reply(400, {"error": "model is required"})
        if not isinstance(model, str):
            return Reply(
                400, {"error": "json: cannot unmarshal value into field model of type string"}
            )
        if (model if ":" in model else f"{model}:latest") not in self.models:
            return Reply(404, {"error": f"model '{model}' not found"})
        if wrong := wrongly_typed(received.path, body):
            return Reply(400, {"error": wrong})
        if self.script is not None:
            return self.script(received)
        if received.path == "/api/generate" and body.get("stream") is False:
            done = {**done_line(model), "response": f"Prompted: {body.get('prompt', '')}"}
            return Reply(200, done)
        if received.path == "/api/generate":
            lines = [
                {"model": model, "created_at": created_at(), "response": piece, "done": False}
                for piece in pieces(f"Prompted: {body.get('prompt', '')}")
            ]
            return Stream([*lines, {**done_line(model), "response": "", "context": [1, 2, 3]}])
        return text_stream(model, remembering_brain(body.get("messages") or []))


# Open-Meteo


def temperature_at(latitude: float, longitude: float) -> float:
    """The stand-in's weather: a function of the place, so swapped coordinates show."""
    return round(latitude - longitude / 10, 1)


class OpenMeteoStandIn(HTTPStandIn):
    """Open-Meteo's /v1/forecast, with its real response shape and its 400 errors."""

    def __init__(self) -> None:
        self.delay = 0.0  # silence before answering, as when Open-Meteo is slow
        self.forced: Answer | None = None  # an answer to give instead, as for a failure
        super().__init__()

    def reset(self) -> None:
        self.delay, self.forced = 0.0, None
        self.received.clear()
        self.most_in_flight = 0

    def answer(self, received: Received) -> Answer:
        if self.forced is not None:
            return self.forced
        query = {name: values[0] for name, values in received.query.items()}
        try:
            latitude, longitude = float(query["latitude"]), float(query["longitude"])
        except (KeyError, ValueError):
            return Reply(400, {"error": True, "reason": "Parameter 'latitude' is required"})
        if not -90 <= latitude <= 90:
            return Reply(
                400,
                {
                    "error": True,
                    "reason": f"Latitude must be in range of -90 to 90°. Given: {latitude}.",
                },
            )
        return Reply(
            200,
            {
                "latitude": latitude,
                "longitude": longitude,
                "generationtime_ms": 0.07,
                "utc_offset_seconds": 0,
                "timezone": "GMT",
                "timezone_abbreviation": "GMT",
                "elevation": 256.0,
                "current_units": {"time": "iso8601", "interval": "seconds", "temperature_2m": "°F"},
                "current": {
                    "time": "2026-11-22T12:00",
                    "interval": 900,
                    "temperature_2m": temperature_at(latitude, longitude),
                },
            },
            headers_delay=self.delay,
        )


@dataclass
class Scripted:
    """A script of answers given in turn, one per request: the last one repeats."""

    answers: list[Answer] = field(default_factory=list)
    calls: int = 0

    def __call__(self, received: Received) -> Answer:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return answer
