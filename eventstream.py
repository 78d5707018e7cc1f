"""Server-Sent Events: the wire format, and the response that streams a new reply's events.

The response reads the reply's Outbox and writes to ASGI itself, one send per batch of
events, past the middleware once the response has started (middleware.PassBodyThrough).
sse-starlette's response puts a cancel scope and a queue hand-off around every send,
which cost more CPU than the rest of the relay on the hot path; it still serves resumed
streams (handlers.resume), where a few events a second are no burden.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import metrics
from middleware import BODY_SEND
from outbox import Outbox

PING = b": ping\n\n"  # a comment, every CHATTERD_PING_SECONDS of a quiet stream
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
]


def frame(event_id: int | None, event: str | None, data: bytes) -> bytes:
    """One SSE event. `data` is one line of JSON: Ollama's NDJSON never holds a raw newline."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


class EventStream(Response):
    """A text/event-stream of a new reply: `first` (its first event, framed, or a ping;
    None when it ended without one), then the outbox's events, one send for each batch
    that is waiting.

    Every `ping_seconds` while the stream is open, the outbox is asked for a PING between
    its events (proxies close streams that stay quiet). A client that goes away ends the
    stream at once: granian does not fail a send to a closed connection, so the response
    listens for the disconnect itself. The pipeline goes on regardless (conversation.py).
    """

    def __init__(
        self,
        outbox: Outbox,
        first: bytes | None,
        ping_seconds: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.outbox = outbox
        self.first = first
        self.ping_seconds = ping_seconds
        self.status_code = 200
        self.raw_headers = HEADERS + [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()
        ]
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        send = scope.get(BODY_SEND, send)  # past the middleware (PassBodyThrough)
        this = asyncio.current_task()
        assert this is not None
        left = finished = False

        def client_left(_: object) -> None:  # stop waiting for the next batch, at once
            nonlocal left
            left = True
            this.cancel()

        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(client_left)
        take = self.outbox.take
        ticks = _Ticker(asyncio.get_running_loop(), self.outbox.ping, self.ping_seconds)
        metrics.stream_opened()
        try:
            chunk: bytes | None = self.first
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                batch = await take()
                if batch is None:
                    finished = True
                    break
                chunk = b"".join([frame(*event) for event in batch]) if batch else PING
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left or this.uncancel():  # cancelled from outside too
                raise
        finally:
            ticks.cancel()
            gone.remove_done_callback(client_left)
            gone.cancel()
            metrics.stream_closed()
            if left and not finished:  # it went away before the reply's end
                metrics.client_disconnected()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Ticker:
    """Calls `tick` every `seconds` until cancelled: one timer, whatever the traffic."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, tick: Callable[[], None], seconds: float
    ) -> None:
        self._loop, self._tick, self._seconds = loop, tick, seconds
        self._handle = loop.call_later(seconds, self._fire)

    def _fire(self) -> None:
        self._tick()
        self._handle = self._loop.call_later(self._seconds, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()
