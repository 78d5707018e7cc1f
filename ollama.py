"""Ollama's wire format: the message types chatterd stores and sends, and the chat stream.

Field names mirror Ollama's `/api/chat` protocol, so a `Message` is exactly what Ollama
reads and writes. A stream hands back each NDJSON line as Ollama sent it: the caller
relays it unchanged and parses it once. This is the only module that speaks HTTP to
Ollama (its streams through ollama_http.py, chatterd's own small client); which server a
request goes to is servers.py's and admission.py's business.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from dataclasses_json import config, dataclass_json

from ollama_http import Connection, Connections

ROLES = ("system", "user", "assistant", "tool")


OMIT_IF_NONE = config(exclude=lambda value: value is None)


@dataclass_json
@dataclass(slots=True)
class Message:
    """One message of a conversation, as Ollama's `/api/chat` takes it."""

    role: str
    content: str
    # Tool calls as Ollama sends them: [{"id"?, "function": {"index"?, "name", "arguments": {}}}]
    tool_calls: list[dict[str, Any]] | None = field(default=None, metadata=OMIT_IF_NONE)
    tool_name: str | None = field(default=None, metadata=OMIT_IF_NONE)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object Ollama expects; hand-written because it runs once per stored message."""
        wire: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            wire["tool_calls"] = self.tool_calls
        if self.tool_name is not None:
            wire["tool_name"] = self.tool_name
        return wire


def function_name(call_or_tool: Any) -> str:
    """The function name of a tool call or a tool declaration; "" when it has none."""
    function = call_or_tool.get("function") if isinstance(call_or_tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else ""


@dataclass
class Reply:
    """What the model said in one round: the pieces of every line, joined as they came."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    began: bool = False  # Ollama took the request (its first line came)
    done: bool = False

    def add(self, message: dict[str, Any]) -> None:
        self.content += message.get("content") or ""
        self.thinking += message.get("thinking") or ""
        self.tool_calls.extend(message.get("tool_calls") or ())

    def as_message(self) -> Message:
        return Message("assistant", self.content, tool_calls=self.tool_calls or None)

    def spoken(self) -> Message:
        """What was said, without the tool calls: a stopped round's calls are never run."""
        return Message("assistant", self.content)


class OllamaError(Exception):
    """Ollama could not serve a request. `status` is the HTTP status to answer the client with.

    `retry_elsewhere`: the generation never began (the server is unreachable, answered 5xx,
    or broke off before its first line), so another server may run it. `unreachable`: the
    server itself is out of reach, not just this request.
    """

    def __init__(
        self, status: int, error: str, *, retry_elsewhere: bool = False, unreachable: bool = False
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_elsewhere = retry_elsewhere
        self.unreachable = unreachable


def error_text(body: bytes, status: int) -> str:
    """The `error` of an Ollama error body, or a description of a body that has none."""
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    return f"Ollama answered HTTP {status} without an error message"


# What a stream's connection can fail with: ConnectionError (ollama_http's own failures
# among them) and ssl's errors are OSErrors; silence is a TimeoutError.
STREAM_FAILURES = (OSError, TimeoutError)


class Streams:
    """The streamed generations of one Ollama server (`/api/chat`, `/api/generate`).

    They go over chatterd's own small HTTP/1.1 client (ollama_http.py): this is the
    relay's hot path, where aiohttp's request and stream reader cost up to a sixth more
    CPU per relayed event (README, Performance). The server's small JSON calls
    (`model_names`, `version`) stay on httpx.
    """

    def __init__(
        self,
        base_url: str,
        shown_url: str,
        *,
        connect_timeout: float,
        timeout: float,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connections = Connections(base_url, limit=max_connections, ssl_context=ssl_context)
        self._shown_url = shown_url  # without credentials, for error messages
        self._connect_timeout = connect_timeout  # seconds to make a new connection
        self.timeout = timeout  # seconds Ollama may stay silent; also the wait for a slot

    def close(self) -> None:
        self._connections.close()

    async def open(self, path: str, body: bytes) -> Opened:
        """POST a generation and wait for its first line.

        Raises OllamaError: with Ollama's status and error when it refuses, 502 when it
        cannot be reached, breaks off or says nothing; `retry_elsewhere` set when the
        generation did not begin.
        """
        try:
            async with asyncio.timeout(self.timeout):  # a free slot among the connections
                connection = await self._connections.post(
                    path, body, connect_timeout=self._connect_timeout
                )
        except STREAM_FAILURES as exc:
            raise self._unreachable(exc) from exc
        silence = Silence(connection, self.timeout)
        try:
            try:
                await connection.head()
            except STREAM_FAILURES as exc:
                raise self._unreachable(exc) from exc
            if connection.status >= 400:
                raise await self._refusal(connection)
            first = b""
            try:
                while chunk := await connection.read():
                    first += chunk
                    if b"\n" in chunk:
                        return Opened(self._connections, connection, first, silence)
            except STREAM_FAILURES as exc:
                raise OllamaError(
                    502, broken(exc, "before its first line", self.timeout), retry_elsewhere=True
                ) from exc
            if first.strip():  # one line without its newline, and the end
                return Opened(self._connections, connection, first, silence)
            raise OllamaError(
                502, "Ollama's stream ended before its first line", retry_elsewhere=True
            )
        except BaseException:  # OllamaError, or cancelled: a stop, or shutdown
            silence.cancel()
            self._connections.give_back(connection)
            raise

    def _unreachable(self, exc: BaseException) -> OllamaError:
        kind = "timed out" if isinstance(exc, TimeoutError) else "is unreachable"
        return OllamaError(
            502,
            f"Ollama at {self._shown_url} {kind}: {type(exc).__name__}",
            retry_elsewhere=True,
            unreachable=True,
        )

    async def _refusal(self, connection: Connection) -> OllamaError:
        """Ollama's error answer, read whole: its status and `error`."""
        error_body = b""
        try:
            while chunk := await connection.read():
                error_body += chunk
        except STREAM_FAILURES:
            error_body = b""
        status = connection.status
        # Ollama's own failures are a bad gateway to chatterd's clients; 503 (busy) stays 503.
        answer = 502 if status >= 500 and status != 503 else status
        return OllamaError(answer, error_text(error_body, status), retry_elsewhere=status >= 500)


class Silence:
    """Ends a connection's answer with a TimeoutError once the server has sent nothing for
    `timeout` seconds. One timer, which looks when it comes whether bytes came meanwhile
    (a timer set again for every chunk would cost microseconds each). Bytes that came but
    wait for a slow reader count as heard: the timeout is Ollama's silence."""

    def __init__(self, connection: Connection, timeout: float) -> None:
        self._connection = connection
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        quiet = self._loop.time() - self._connection.heard_at
        if quiet < self.timeout:
            self._timer = self._loop.call_later(self.timeout - quiet, self._check)
        else:
            self._connection.fail(TimeoutError())

    def cancel(self) -> None:
        self._timer.cancel()


def split_lines(rest: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole non-blank lines of what came so far (`rest`, then `chunk`), and what is left."""
    if b"\n" not in chunk:
        return [], rest + chunk
    *lines, rest = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
    return [line for line in lines if line.strip()], rest


class Opened:
    """A streamed answer of Ollama's whose first line has arrived: the generation has begun."""

    def __init__(
        self, connections: Connections, connection: Connection, first: bytes, silence: Silence
    ) -> None:
        self._connections = connections
        self._connection = connection
        self._first = first  # what was read before: at least one whole line
        self._silence: Silence | None = silence
        self._timeout = silence.timeout  # for the error of a stream that goes silent

    @property
    def content_type(self) -> str:
        return self._connection.headers.get("content-type", "application/x-ndjson")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's bytes as they come, the first ones included."""
        yield self._first
        try:
            while chunk := await self._connection.read():
                yield chunk
        except STREAM_FAILURES as exc:
            raise OllamaError(502, broken(exc, "mid-stream", self._timeout)) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        """The answer's NDJSON lines, each exactly as Ollama wrote it (as bytes).

        Lines are split from the connection's chunks here, in one generator: this is the
        hot path, run once per token of every reply.
        """
        lines, rest = split_lines(b"", self._first)
        for line in lines:
            yield line
        read = self._connection.read
        try:
            while chunk := await read():
                lines, rest = split_lines(rest, chunk)
                for line in lines:
                    yield line
        except STREAM_FAILURES as exc:
            raise OllamaError(502, broken(exc, "mid-stream", self._timeout)) from exc
        if rest.strip():
            yield rest

    async def aclose(self) -> None:
        """Let go of the connection: kept for the next request when the answer was read to
        its end, else closed, and Ollama stops generating (it does when its client goes away)."""
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None  # once: the connection's slot is given back once
            self._connections.give_back(self._connection)


def broken(exc: BaseException, when: str, timeout: float) -> str:
    """Why a stream could not be read on: it went silent past the timeout (Silence), or its
    connection broke."""
    if isinstance(exc, TimeoutError):
        return f"Ollama said nothing {when} for {timeout:g} s (CHATTERD_OLLAMA_TIMEOUT)"
    return f"the connection to Ollama broke {when}: {type(exc).__name__}"


async def model_names(client: httpx.AsyncClient, path: str) -> frozenset[str]:
    """The models `/api/tags` (installed) or `/api/ps` (loaded now) lists, tags included.

    Raises httpx.HTTPError (or ValueError for a body that is not such a list).
    """
    response = await client.get(path)
    response.raise_for_status()
    body = response.json()
    entries = body.get("models") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no list of models")
    names = set()
    for entry in entries:
        if isinstance(entry, dict):
            names.update(
                full_model_name(entry[key])
                for key in ("name", "model")
                if isinstance(entry.get(key), str)
            )
    return frozenset(names)


def full_model_name(name: str) -> str:
    """A model's name with its tag: Ollama reads `llama3.2` as `llama3.2:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


async def version(client: httpx.AsyncClient) -> str | None:
    """Ollama's version, from `/api/version`; None when it does not say."""
    response = await client.get("/api/version")
    response.raise_for_status()
    body = response.json()
    found = body.get("version") if isinstance(body, dict) else None
    return found if isinstance(found, str) else None


def empty_line(model: str, *, done: bool = False, **fields: Any) -> bytes:
    """A line shaped as Ollama's, with empty content, carrying chatterd's own `fields`.

    The apps treat an event name they don't know as plain data and decode it as an Ollama
    line, so a notice in this shape reads to them as an empty piece of the reply.
    """
    stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    line = {
        "model": model,
        "created_at": stamp,
        "message": {"role": "assistant", "content": ""},
        "done": done,
        **fields,
    }
    return json.dumps(line, separators=(",", ":")).encode()
