"""The HTTP edge: read and check requests, hand them on, and shape the responses.

Every error a client can cause or see is a JSON `{"error": "..."}` with a fitting status,
raised here as ClientError and rendered by main's exception handler.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.convertors import Convertor
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

import events
import metrics
import toolbox
from admission import Admission, Generation, Shed
from checks import (
    APP_ID,
    LATITUDE,
    LONGITUDE,
    MODEL,
    PAGE_AFTER,
    PAGE_LIMIT,
    ClientError,
    invalid,
    parse_chat,
    parse_json,
    parse_last_event_id,
    parse_object,
)
from conversation import Chat, ChatRequest, error_kind
from database import StoreError
from events import EventLog
from eventstream import PING, EventStream, frame
from leases import ConversationBusy
from middleware import resume_token
from ollama import OllamaError
from outbox import QUIET, Refusal
from resume import Followers
from servers import NoServer, Servers

STOP_WAIT_SECONDS = 5.0  # how long POST .../stop waits for the stopped turn to be stored


Endpoint = Callable[[Request], Awaitable[Response]]


def by_method(endpoints: dict[str, Endpoint]) -> Endpoint:
    """One endpoint for a path that answers several methods, each with its own handler."""

    async def endpoint(request: Request) -> Response:
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


class AppIDConvertor(Convertor[str]):
    """An appID in a path: one segment of any characters, newlines too, so that the handler
    (not a 404) says what is wrong with one."""

    regex = "[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit."""
    limit = request.app.state.config.max_body_bytes
    too_large = ClientError(413, f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if re.fullmatch("[0-9]{1,19}", declared) and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


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
    model = MODEL.check("model", parse_object(parse_json(body)).get("model"))
    admission: Admission = request.app.state.admission
    received = asyncio.get_running_loop().time()
    try:
        generation = await generate_unless_disconnected(
            request, admission.generate(request.state.client, model, "/api/generate", body)
        )
    except (OllamaError, NoServer, Shed) as exc:
        metrics.error(error_kind(exc))
        return refusal(exc.status, str(exc), getattr(exc, "retry_after", None))
    if generation is None:
        metrics.client_disconnected()
        return Response(status_code=499)  # nobody is there to read it

    async def relay() -> AsyncIterator[bytes]:
        output = PromptOutput(model)
        with streaming():
            try:
                async for chunk in generation.chunks():
                    if not output.began:
                        loop_time = asyncio.get_running_loop().time()
                        metrics.first_token("/llmprompt", loop_time - received)
                    output.feed(chunk)
                    yield chunk
            except OllamaError:
                pass  # Ollama broke off: the client sees the stream end without a done line
            finally:
                output.report()

    return Relay(generation, relay())


class Relay(StreamingResponse):
    """A generation's answer relayed as it comes. The generation is closed (Ollama stops,
    the slot goes to the next) however the response ends: even when the client leaves
    before the stream began, and the body's generator never ran."""

    def __init__(self, generation: Generation, chunks: AsyncIterator[bytes]) -> None:
        super().__init__(chunks, media_type=generation.content_type)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.aclose()


class PromptOutput:
    """What /llmprompt relays, counted line by line for the metrics; the bytes relayed are
    Ollama's, untouched (a line may span chunks)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.began = False
        self.tokens = 0  # lines before the done line
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self.began = True
        *lines, self._tail = (self._tail + chunk).split(b"\n")
        for line in lines:
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if not isinstance(parsed, dict):
                continue
            if parsed.get("done") is True:
                metrics.model_speed(
                    self.model, parsed.get("eval_count"), parsed.get("eval_duration")
                )
            else:
                self.tokens += 1

    def report(self) -> None:
        metrics.reply_tokens(self.model, self.tokens)


async def generate_unless_disconnected(
    request: Request, admitting: Awaitable[Generation]
) -> Generation | None:
    """Await the admission of a generation; None, with the generation given back, when
    the client goes away first (once the body is read, the next ASGI message is the
    client's disconnect)."""
    task = asyncio.ensure_future(admitting)
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself is cancelled
        await _abandon(task)
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    await _abandon(task)
    return None


async def _abandon(task: asyncio.Task[Generation]) -> None:
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        await task.result().aclose()  # it was admitted just as the client left


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
    checked = parse_chat(await read_json(request), config.max_messages, with_tools=with_tools)
    chat_request = ChatRequest(
        app_id=checked.app_id,
        model=checked.model,
        messages=checked.messages,
        ollama_fields=checked.ollama_fields,
        declared_tools=checked.declared_tools,
        with_tools=with_tools,
        client=request.state.client,
        received=received,
    )
    request.state.app_id = chat_request.app_id
    if config.log_content:
        request.state.content = [message.content for message in chat_request.messages]
    chat: Chat = request.app.state.chat
    outbox = chat.start(chat_request)
    first = await outbox.first(within=config.ping_seconds)
    if isinstance(first, Refusal):
        return refusal(first.status, first.error, first.retry_after)

    headers = {}
    if config.api_keys:  # lets a browser's EventSource resume this appID without a key
        headers["Chatterd-Resume-Token"] = resume_token(config, chat_request.app_id)
    opening = None if first is None else PING if first == QUIET else frame(*first)
    return EventStream(outbox, opening, config.ping_seconds, headers)


@contextmanager
def streaming() -> Iterator[None]:
    """Count a stream while it is open, and a client that left before its end."""
    metrics.stream_opened()
    try:
        yield
    except (GeneratorExit, asyncio.CancelledError):  # closed mid-write, or cancelled idle
        metrics.client_disconnected()
        raise
    finally:
        metrics.stream_closed()


# GET /llmchat and GET /llmtools: resume a reply's stream


async def resume(request: Request) -> Response:
    """The events of a reply the client lost: those after `Last-Event-ID`, then the rest live.

    Without `Last-Event-ID`, the appID's newest reply (running or finished) from its start.
    204 when there is nothing more to send, which also stops a browser's EventSource.
    """
    app_id = APP_ID.check("appID", request.query_params.get("appID"))
    request.state.app_id = app_id
    event_log: EventLog = request.app.state.chat.event_log
    followers: Followers = request.app.state.followers
    last = parse_last_event_id(
        request.headers.get("last-event-id"), request.query_params.get("lastEventId")
    )
    if last is not None:
        after = last
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
                async for batch in followers.follow(app_id, reply, after, missed):
                    yield b"".join([frame(e.id, e.event, e.data) for e in batch])
            except StoreError as exc:
                yield frame(None, "error", json.dumps({"error": str(exc)}).encode())

    metrics.resumed()

    ping = request.app.state.config.ping_seconds
    return EventSourceResponse(replay(), sep="\n", ping=ping)


# GET and DELETE /conversations/{appID}


async def conversation(request: Request) -> Response:
    """The stored conversation, oldest first, a page at a time."""
    app_id = APP_ID.check("appID", request.path_params["appID"])
    request.state.app_id = app_id
    limit = PAGE_LIMIT.check("limit", request.query_params.get("limit", "100"))
    after = PAGE_AFTER.check("after", request.query_params.get("after", "0"))
    chat: Chat = request.app.state.chat
    page = await chat.history.page(app_id, after, limit + 1)  # one more: is there a next page?
    if not page and not await chat.history.has_any(app_id):
        raise ClientError(404, "nothing is stored for this appID")
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
    app_id = APP_ID.check("appID", request.path_params["appID"])
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
    app_id = APP_ID.check("appID", request.path_params["appID"])
    request.state.app_id = app_id
    chat: Chat = request.app.state.chat
    if not await chat.stop(app_id, STOP_WAIT_SECONDS):
        raise ClientError(404, "no turn of this appID is running or waiting")
    return JSONResponse({"appID": app_id, "stopped": True})


# GET /weather


async def weather(request: Request) -> Response:
    """The weather tool for clients: coordinates as a JSON body or as query parameters."""
    if request.query_params:
        where: Any = request.query_params
    else:
        body = await read_body(request)
        where = parse_json(body) if body else {}
        if not isinstance(where, dict):
            raise invalid("body: must be a JSON object with lat and lon")
    latitude = LATITUDE.check("lat", where.get("lat"))
    longitude = LONGITUDE.check("lon", where.get("lon"))
    try:
        report = await toolbox.get_weather(request.app.state.tool_env, latitude, longitude)
    except toolbox.ToolError as exc:
        raise ClientError(502, str(exc)) from None
    return JSONResponse(report)


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


# GET /models and GET /playground


async def models(request: Request) -> Response:
    """The models the Ollama servers have, and whether one has it loaded now."""
    servers: Servers = request.app.state.servers
    found: dict[str, bool] = {}
    for server in servers.all:
        if server.up and server.models is not None:
            for name in server.models:
                found[name] = found.get(name, False) or name in server.loaded
    listed = [{"name": name, "loaded": loaded} for name, loaded in sorted(found.items())]
    return JSONResponse({"models": listed})


PLAYGROUND = Path(__file__).with_name("playground.html")


async def playground(request: Request) -> Response:
    """One self-contained page to try this chatterd in a browser."""
    return HTMLResponse(PLAYGROUND.read_bytes())


async def metrics_page(request: Request) -> Response:
    """Prometheus' text format, summed over every worker of this chatterd."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


async def openapi_json(request: Request) -> Response:
    import openapi

    if not hasattr(request.app.state, "openapi"):
        request.app.state.openapi = openapi.document(request.app.state.config)
    return JSONResponse(request.app.state.openapi)
