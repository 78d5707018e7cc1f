"""The HTTP edge: read and check requests, hand them on, and shape the responses.

Every error a client can cause or see is a JSON `{"error": "..."}` with a fitting status,
raised here as ClientError and rendered by main's exception handler.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import events
import metrics
import toolbox
from admission import Admission, Shed
from conversation import Chat, ChatRequest, Refusal, error_kind
from events import EventLog
from history import StoreError
from leases import ConversationBusy
from ollama import ROLES, Message, OllamaError
from servers import NoServer, Servers

MAX_APP_ID = 155  # the tutorial's VARCHAR(155)
STOP_WAIT_SECONDS = 5.0  # how long POST .../stop waits for the stopped turn to be stored
T = TypeVar("T")
OLLAMA_FIELDS = ("options", "format", "keep_alive", "think")


class ClientError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def invalid(error: str) -> ClientError:
    return ClientError(422, error)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit."""
    limit = request.app.state.config.max_body_bytes
    too_large = ClientError(413, f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ClientError(400, "the body is not valid UTF-8") from None
    except ValueError as exc:
        raise ClientError(400, f"the body is not valid JSON: {exc}") from None


async def read_json(request: Request) -> Any:
    return parse_json(await read_body(request))


# POST /llmprompt


async def llmprompt(request: Request) -> Response:
    """Relay Ollama's /api/generate, byte for byte, as it streams.

    It waits its turn in the admission queue like any generation, silently (the NDJSON
    stream has no place for notices). A client that goes away, while it waits or while
    the answer streams, stops the generation at once: nothing is stored for it.
    """
    body = await read_body(request)
    prompt = parse_json(body)
    if not isinstance(prompt, dict):
        raise invalid("body: must be a JSON object")
    model = prompt.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model: must be a non-empty string")
    admission: Admission = request.app.state.admission
    received = asyncio.get_running_loop().time()
    try:
        generation = await until_disconnected(
            request, admission.generate(request.state.client, model, "/api/generate", body)
        )
    except (OllamaError, NoServer, Shed) as exc:
        metrics.error(error_kind(exc))
        return refusal(exc.status, str(exc), getattr(exc, "retry_after", None))
    if generation is None:
        metrics.client_disconnected()
        return Response(status_code=499)  # nobody is there to read it
    metrics.first_token("/llmprompt", asyncio.get_running_loop().time() - received)

    async def relay() -> AsyncIterator[bytes]:
        with streaming():
            try:
                async for chunk in generation.chunks():
                    yield chunk
            except OllamaError:
                pass  # Ollama broke off: the client sees the stream end without a done line
            finally:
                await generation.aclose()

    return StreamingResponse(relay(), media_type="application/x-ndjson")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it and return None if the client goes away first.

    Once the body has been read, the next ASGI message is the client's disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None


def refusal(status: int, error: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": error}, status, headers=headers)


# POST /llmchat and POST /llmtools


async def llmchat(request: Request) -> Response:
    return await _chat(request, with_tools=False)


async def llmtools(request: Request) -> Response:
    return await _chat(request, with_tools=True)


async def _chat(request: Request, *, with_tools: bool) -> Response:
    config = request.app.state.config
    received = asyncio.get_running_loop().time()
    chat_request = parse_chat(await read_json(request), config.max_messages, with_tools=with_tools)
    chat_request.client, chat_request.received = request.state.client, received
    request.state.app_id = chat_request.app_id
    if config.log_content:
        request.state.content = [message.content for message in chat_request.messages]
    chat: Chat = request.app.state.chat
    outbox = chat.start(chat_request)
    first = await outbox.first()
    if isinstance(first, Refusal):
        return refusal(first.status, first.error, first.retry_after)

    async def stream() -> AsyncIterator[bytes]:
        if first is None:
            return
        with streaming():
            yield sse(*first)
            async for batch in outbox.rest():  # one write for all the events that are waiting
                yield b"".join([sse(*event) for event in batch])

    return EventSourceResponse(stream(), sep="\n", ping=15)


@contextmanager
def streaming() -> Iterator[None]:
    """Count a stream while it is open, and a client that left before its end."""
    metrics.stream_opened()
    try:
        yield
    except GeneratorExit:
        metrics.client_disconnected()
        raise
    finally:
        metrics.stream_closed()


def sse(event_id: int | None, event: str | None, data: bytes) -> bytes:
    """One SSE event. `data` is one line of JSON: Ollama's NDJSON never holds a raw newline."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


# GET /llmchat and GET /llmtools: resume a reply's stream


async def resume(request: Request) -> Response:
    """The events of a reply the client lost: those after `Last-Event-ID`, then the rest live.

    Without `Last-Event-ID`, the appID's newest reply (running or finished) from its start.
    204 when there is nothing more to send, which also stops a browser's EventSource.
    """
    app_id = parse_app_id(request.query_params.get("appID"))
    request.state.app_id = app_id
    event_log: EventLog = request.app.state.chat.event_log
    last = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if last:
        after = parse_whole_number("Last-Event-ID", last, 0, 10**18 - 1)
        reply = events.reply_of(after)
    else:
        latest = await event_log.latest_reply(app_id)
        if latest is None:
            raise ClientError(404, "there is no reply to resume for this appID")
        reply, after = latest, events.first_id(latest) - 1
    missed = await event_log.read(app_id, reply, after)
    if not missed and not await event_log.live(app_id, reply):
        missed = await event_log.read(app_id, reply, after)  # it may have just ended
        if not missed:
            last_logged = await event_log.last_id(app_id, reply)
            if last_logged is None:
                raise ClientError(
                    404, "no events are kept for that reply: they expire, or it never began"
                )
            if after == last_logged + 1:
                return Response(status_code=204)  # it has had the cut-off notice (not logged)
    if [event.event for event in missed] == [events.END]:
        return Response(status_code=204)  # the client has seen the whole reply

    async def replay() -> AsyncIterator[bytes]:
        with streaming():
            try:
                async for batch in event_log.follow(app_id, reply, after, missed):
                    yield b"".join([sse(e.id, e.event, e.data) for e in batch])
            except StoreError as exc:
                yield sse(None, "error", json.dumps({"error": str(exc)}).encode())

    metrics.resumed()

    return EventSourceResponse(replay(), sep="\n", ping=15)


# GET and DELETE /conversations/{appID}


async def conversation(request: Request) -> Response:
    """The stored conversation, oldest first, a page at a time."""
    app_id = parse_app_id(request.path_params["appID"])
    request.state.app_id = app_id
    limit = parse_whole_number("limit", request.query_params.get("limit", "100"), 1, 1000)
    after = parse_whole_number("after", request.query_params.get("after", "0"), 0, 2**62)
    chat: Chat = request.app.state.chat
    page = await chat.history.page(app_id, after, limit + 1)  # one more: is there a next page?
    more = len(page) > limit
    page = page[:limit]
    body = {
        "appID": app_id,
        "messages": [
            {
                "role": stored.message.role,
                "content": stored.message.content,
                "tool_calls": stored.message.tool_calls,
                "tool_name": stored.message.tool_name,
                "created_at": stored.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "seq": stored.seq,
            }
            for stored in page
        ],
        "next": page[-1].seq if more else None,
    }
    return JSONResponse(body)


async def forget(request: Request) -> Response:
    """Delete the conversation and the app's device tools, once a running turn has ended."""
    app_id = parse_app_id(request.path_params["appID"])
    request.state.app_id = app_id
    chat: Chat = request.app.state.chat
    try:
        async with chat.leases.hold(app_id, on_lost=lambda: None):
            await chat.history.forget(app_id)
    except ConversationBusy as exc:
        raise ClientError(exc.status, str(exc)) from None
    return Response(status_code=204)


async def stop(request: Request) -> Response:
    """Stop the appID's running or waiting turn; what was said so far is stored."""
    app_id = parse_app_id(request.path_params["appID"])
    request.state.app_id = app_id
    chat: Chat = request.app.state.chat
    if not await chat.stop(app_id, STOP_WAIT_SECONDS):
        raise ClientError(404, "no turn of this appID is running or waiting")
    return JSONResponse({"appID": app_id, "stopped": True})


def parse_whole_number(name: str, raw: str, lowest: int, highest: int) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) < 20 and lowest <= int(raw) <= highest):
        raise invalid(
            f"{name}: must be a whole number from {lowest} to {highest}, not {raw[:40]!r}"
        )
    return int(raw)


def parse_app_id(app_id: Any) -> str:
    if not isinstance(app_id, str) or not app_id.strip() or len(app_id) > MAX_APP_ID:
        raise invalid(f"appID: must be a non-empty string of at most {MAX_APP_ID} characters")
    check_text("appID", app_id)
    return app_id


def parse_chat(body: Any, max_messages: int, *, with_tools: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid("body: must be a JSON object")
    app_id = parse_app_id(body.get("appID"))
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model: must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list of messages")
    if len(messages) > max_messages:
        raise invalid(f"messages: at most {max_messages} in one request")
    declared = parse_tools(body.get("tools")) if with_tools else None
    check_text("model", model)
    return ChatRequest(
        app_id=app_id,
        model=model,
        messages=[parse_message(i, message) for i, message in enumerate(messages)],
        ollama_fields=parse_ollama_fields(body),
        declared_tools=declared,
        with_tools=with_tools,
    )


def parse_message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where}: must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise invalid(f"{where}.role: must be one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise invalid(f"{where}.content: must be a string")
    check_text(f"{where}.content", content)
    tool_name = message.get("tool_name")
    if tool_name is not None and (role != "tool" or not isinstance(tool_name, str)):
        raise invalid(f"{where}.tool_name: must be a string, on a tool message")
    check_text(f"{where}.tool_name", tool_name)
    return Message(role, content, tool_name=tool_name)


def parse_ollama_fields(body: dict[str, Any]) -> dict[str, Any]:
    fields = {name: body[name] for name in OLLAMA_FIELDS if body.get(name) is not None}
    if "options" in fields and not isinstance(fields["options"], dict):
        raise invalid("options: must be an object")
    if "format" in fields and not isinstance(fields["format"], str | dict):
        raise invalid('format: must be "json" or a JSON schema object')
    if "think" in fields and not isinstance(fields["think"], bool | str):
        raise invalid('think: must be true, false, "low", "medium" or "high"')
    keep_alive = fields.get("keep_alive")
    if keep_alive is not None and (
        isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float)
    ):
        raise invalid('keep_alive: must be a duration such as "5m" or a number of seconds')
    for name, value in fields.items():
        check_text(name, value)
    return fields


def parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Device tools as the apps declare them; `"parameters": null` is allowed."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("tools: must be a list of tool declarations")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise invalid(f"tools[{i}].function.name: must be a non-empty string")
        if name in toolbox.TOOLBOX:
            raise invalid(f"tools[{i}]: {name!r} is a resident tool's name; choose another")
        if tool.get("type", "function") != "function":
            raise invalid(f'tools[{i}].type: must be "function"')
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters: must be an object or null")
        check_text(f"tools[{i}]", tool)
    return tools


def check_text(where: str, value: Any) -> None:
    """Refuse text PostgreSQL cannot store: NUL characters and lone UTF-16 surrogates."""
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(f"{where}: must not contain the NUL character")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise invalid(f"{where}: must not contain a lone surrogate (\\ud800)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(where, key)
            check_text(where, item)
    elif isinstance(value, list):
        for item in value:
            check_text(where, item)


# GET /weather


async def weather(request: Request) -> Response:
    """The weather tool for clients: coordinates as a JSON body or as query parameters."""
    if request.query_params:
        where: Any = request.query_params
    else:
        where = await read_json(request) if await request.body() else {}
        if not isinstance(where, dict):
            raise invalid("body: must be a JSON object with lat and lon")
    latitude = parse_coordinate(where, "lat")
    longitude = parse_coordinate(where, "lon")
    try:
        toolbox.check_coordinates(latitude, longitude)
    except toolbox.ToolError as exc:
        raise invalid(str(exc)) from None
    try:
        report = await toolbox.get_weather(request.app.state.tool_env, latitude, longitude)
    except toolbox.ToolError as exc:
        raise ClientError(502, str(exc)) from None
    return JSONResponse(report)


def parse_coordinate(where: Any, name: str) -> float:
    value = where.get(name)
    if value is None:
        raise invalid(f"{name}: required, as a number")
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(f"{name}: must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise invalid(f"{name}: must be a finite number")
    return number


# GET /health and GET /openapi.json


async def health(request: Request) -> Response:
    """200 while the database answers, 503 when it doesn't; the Ollama servers' last known
    state is reported (the background check keeps it, so this stays quick)."""
    chat: Chat = request.app.state.chat
    servers: Servers = request.app.state.servers
    database = await chat.history.status()
    ollama_servers = servers.status()
    up = [server for server in ollama_servers if server["up"]]
    healthy = database["reachable"] and bool(up)
    body = {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "ollama": {
            "reachable": bool(up),
            "version": up[0]["version"] if up else None,
            "servers": ollama_servers,
        },
        "streams": chat.running,
        "queue": {"waiting": chat.admission.waiting},
    }
    return JSONResponse(body, 200 if database["reachable"] else 503)


async def metrics_page(request: Request) -> Response:
    """Prometheus' text format, summed over every worker of this chatterd."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


async def openapi_json(request: Request) -> Response:
    import openapi

    return JSONResponse(openapi.document())
