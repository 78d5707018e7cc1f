"""Ollama's wire format: the message types chatterd stores and sends, and the chat stream.

Field names mirror Ollama's `/api/chat` protocol, so a `Message` is exactly what Ollama
reads and writes. The stream hands back each NDJSON line as Ollama sent it: the caller
relays it unchanged and parses it once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

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
    done: bool = False

    def add(self, message: dict[str, Any]) -> None:
        self.content += message.get("content") or ""
        self.thinking += message.get("thinking") or ""
        self.tool_calls.extend(message.get("tool_calls") or ())

    def as_message(self) -> Message:
        return Message("assistant", self.content, tool_calls=self.tool_calls or None)


class OllamaError(Exception):
    """Ollama could not serve a request. `status` is the HTTP status to answer the client with."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def error_text(body: bytes, status: int) -> str:
    """The `error` of an Ollama error body, or a description of a body that has none."""
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    return f"Ollama answered HTTP {status} without an error message"


def unreachable(base_url: str, exc: httpx.HTTPError) -> OllamaError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
    return OllamaError(502, f"Ollama at {base_url} {kind}: {type(exc).__name__}")


async def post(client: httpx.AsyncClient, path: str, body: bytes) -> httpx.Response:
    """POST `body` to Ollama; return the streaming response once its headers say it accepted.

    Raises OllamaError when Ollama refuses (its status and error) or cannot be reached
    (502). The caller closes the response it gets.
    """
    request = client.build_request(
        "POST", path, content=body, headers={"Content-Type": "application/json"}
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise unreachable(str(client.base_url), exc) from exc
    if response.status_code < 400:
        return response
    try:
        error_body = await response.aread()
    except httpx.HTTPError:
        error_body = b""
    finally:
        await response.aclose()
    raise OllamaError(response.status_code, error_text(error_body, response.status_code))


async def version(client: httpx.AsyncClient) -> dict[str, Any]:
    """Whether Ollama answers, and its version."""
    try:
        response = await client.get("/api/version", timeout=3)
        response.raise_for_status()
        return {"reachable": True, "version": response.json().get("version")}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return {"reachable": False, "error": type(exc).__name__}


async def chat_lines(client: httpx.AsyncClient, request: dict[str, Any]) -> AsyncIterator[bytes]:
    """Stream `/api/chat`, one NDJSON line at a time, exactly as Ollama wrote it (as bytes).

    Lines are split from the raw bytes here rather than by httpx's text layers: this is
    the hot path, run once per token of every reply.

    Raises OllamaError: before the first line when Ollama refuses or is unreachable, and
    with status 502 when the connection breaks mid-stream.
    """
    body = json.dumps(request, ensure_ascii=False).encode()
    response = await post(client, "/api/chat", body)
    try:
        rest = b""
        async for chunk in response.aiter_bytes():
            *lines, rest = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
            for line in lines:
                if line.strip():
                    yield line
        if rest.strip():
            yield rest
    except httpx.HTTPError as exc:
        raise OllamaError(
            502, f"the connection to Ollama broke mid-stream: {type(exc).__name__}"
        ) from exc
    finally:
        await response.aclose()
