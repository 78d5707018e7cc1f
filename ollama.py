"""Ollama's wire format: the message types chatterd stores and sends, and the chat stream.

Field names mirror Ollama's `/api/chat` protocol, so a `Message` is exactly what Ollama
reads and writes. A stream hands back each NDJSON line as Ollama sent it: the caller
relays it unchanged and parses it once. This is the only module that speaks HTTP to
Ollama; which server a request goes to is servers.py's and admission.py's business.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from dataclasses_json import config, dataclass_json

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


STREAM_FAILURES = (aiohttp.ClientError, TimeoutError)  # aiohttp's timeouts are TimeoutErrors


class Streams:
    """The streamed generations of one Ollama server (`/api/chat`, `/api/generate`).

    They go over aiohttp directly: this is the relay's hot path, and httpx's streamed
    response, even on aiohttp's transport, passes each chunk through three more async
    generators of its own (6 to 13% of the CPU per relayed event, README, Performance). The
    server's small JSON calls stay on httpx (`model_names`, `version`), over the same
    aiohttp session: one pool of connections, one limit.
    """

    def __init__(
        self,
        base_url: str,
        shown_url: str,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float,
        timeout: float,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._shown_url = shown_url  # without credentials, for error messages
        self._session = session
        # As httpx's Timeout(timeout, connect=connect_timeout) on aiohttp's transport: a
        # connection within connect_timeout, then no more than `timeout` without a byte
        # (sock_read until the first line, then Opened's own deadline).
        self._client_timeout = aiohttp.ClientTimeout(
            sock_connect=connect_timeout, sock_read=timeout, connect=timeout
        )
        self.timeout = timeout  # seconds, for the error of a stream that goes silent

    async def open(self, path: str, body: bytes) -> Opened:
        """POST a generation and wait for its first line.

        Raises OllamaError: with Ollama's status and error when it refuses, 502 when it
        cannot be reached, breaks off or says nothing; `retry_elsewhere` set when the
        generation did not begin.
        """
        response = await self._post(path, body)
        raw = response.content.iter_any()
        first = b""
        try:
            async for chunk in raw:
                first += chunk
                if b"\n" in chunk:
                    return Opened(response, raw, first, self.timeout)
        except STREAM_FAILURES as exc:
            response.close()
            raise OllamaError(
                502, broken(exc, "before its first line", self.timeout), retry_elsewhere=True
            ) from exc
        except BaseException:  # cancelled: a stop, or shutdown
            response.close()
            raise
        if first.strip():  # one line without its newline, and the end
            return Opened(response, raw, first, self.timeout)
        response.close()
        raise OllamaError(502, "Ollama's stream ended before its first line", retry_elsewhere=True)

    async def _post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """The response, once its headers say Ollama accepted; the caller closes it."""
        try:
            response = await self._session.post(
                self._base_url + path,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=self._client_timeout,
                allow_redirects=False,  # as httpx: a redirected POST would lose its body
            )
        except STREAM_FAILURES as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else "is unreachable"
            raise OllamaError(
                502,
                f"Ollama at {self._shown_url} {kind}: {type(exc).__name__}",
                retry_elsewhere=True,
                unreachable=True,
            ) from exc
        if response.status < 400:
            return response
        status = response.status
        try:
            error_body = await response.read()
        except STREAM_FAILURES:
            error_body = b""
        finally:
            response.release()
        # Ollama's own failures are a bad gateway to chatterd's clients; 503 (busy) stays 503.
        answer = 502 if status >= 500 and status != 503 else status
        raise OllamaError(answer, error_text(error_body, status), retry_elsewhere=status >= 500)


def split_lines(rest: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole non-blank lines of what came so far (`rest`, then `chunk`), and what is left."""
    if b"\n" not in chunk:
        return [], rest + chunk
    *lines, rest = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
    return [line for line in lines if line.strip()], rest


class Opened:
    """A streamed answer of Ollama's whose first line has arrived: the generation has begun."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        raw: AsyncIterator[bytes],
        first: bytes,
        timeout: float,
    ) -> None:
        self._response = response
        self._raw = raw  # the rest of the body, as it comes
        self._first = first  # what was read before: at least one whole line
        self._timeout = timeout
        # From here on silence is watched by one deadline that looks, when it comes, whether
        # anything came meanwhile; aiohttp's sock_read would cancel and set a timer for every
        # chunk, about 3.5 µs each (README, Performance).
        self._loop = asyncio.get_running_loop()
        self._heard_at = self._loop.time()  # when the last chunk was read
        self._read = len(first)  # bytes read so far: more arrived means the reader is behind
        connection = response.connection  # None once the whole answer is in
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = None  # its timer now set goes at the next chunk
        self._deadline = self._loop.call_later(timeout, self._check_silence)

    def _check_silence(self) -> None:
        now = self._loop.time()
        if self._response.content.total_bytes > self._read:  # a slow client, not Ollama
            self._heard_at = now
        quiet = now - self._heard_at
        if quiet < self._timeout:
            self._deadline = self._loop.call_later(self._timeout - quiet, self._check_silence)
        else:  # the read under way (or the next) raises it
            self._response.content.set_exception(TimeoutError())

    @property
    def content_type(self) -> str:
        return self._response.headers.get("Content-Type", "application/x-ndjson")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's bytes as they come, the first ones included."""
        yield self._first
        try:
            async for chunk in self._raw:
                self._heard_at = self._loop.time()
                self._read += len(chunk)
                yield chunk
        except STREAM_FAILURES as exc:
            raise OllamaError(502, broken(exc, "mid-stream", self._timeout)) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        """The answer's NDJSON lines, each exactly as Ollama wrote it (as bytes).

        Lines are split from the transport's chunks here, in one generator: this is the
        hot path, run once per token of every reply.
        """
        lines, rest = split_lines(b"", self._first)
        for line in lines:
            yield line
        try:
            async for chunk in self._raw:
                self._heard_at = self._loop.time()
                self._read += len(chunk)
                lines, rest = split_lines(rest, chunk)
                for line in lines:
                    yield line
        except STREAM_FAILURES as exc:
            raise OllamaError(502, broken(exc, "mid-stream", self._timeout)) from exc
        if rest.strip():
            yield rest

    async def aclose(self) -> None:
        """Let go of the connection: back to the pool when the answer was read to its end,
        else closed, and Ollama stops generating (it does when its client goes away)."""
        self._deadline.cancel()
        self._response.release()
        await self._response.wait_for_close()


def broken(exc: BaseException, when: str, timeout: float) -> str:
    """Why a stream could not be read on: it went silent past the timeout (aiohttp's
    `sock_read` before the first line, Opened's deadline after), or its connection broke."""
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
