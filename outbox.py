"""The events of one reply: to the client that asked for it, and to the event log.

The pipeline writes events as they come (`send`), or a failure (`fail`); the HTTP
response reads them (`first`, then `take`, in batches). Once the turn has its reply
number (`begin`), every event also goes to the event log under its id, so that a client
that lost its stream can resume it; the END marker closes the reply in the log.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass

from events import END, EventLog, first_id

# An SSE event: its id (None before the turn has one), its name (None: a plain data event)
# and its data, one line of JSON.
Event = tuple[int | None, str | None, bytes]
PING = "ping"  # in an Outbox's queue: the response should send a keep-alive comment
QUIET = "quiet"  # from Outbox.first: nothing yet, and the stream begins anyway


@dataclass
class Refusal:
    """A failure before any event was sent: the client gets this status and JSON error."""

    status: int
    error: str
    retry_after: int | None = None  # seconds, for a Retry-After header


class Outbox:
    """The events of one response: written by the pipeline, read by the HTTP response.

    Once the turn has its reply number (`begin`), each event also goes to the event log.
    """

    def __init__(self, app_id: str, event_log: EventLog) -> None:
        # What the response has yet to read; None marks the end. A plain deque and one
        # waiter, not an asyncio.Queue: this is the hot path's hand-off, once per event.
        self._items: deque[Refusal | Event | str | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # once: on 3.11 each lookup costs a getpid
        self._app_id = app_id
        self._log = event_log
        self._next_id: int | None = None
        self._last_id = 0
        self._began = asyncio.Event()  # the turn holds its lease
        self.started = False
        self.failed = False

    # The pipeline's side.
    def begin(self, reply: int) -> None:
        self._began.set()
        self._next_id = first_id(reply)
        # The last id in the reply's range is for its END; events past the range would
        # take the next reply's ids, so they are relayed without an id and not logged.
        self._last_id = first_id(reply + 1) - 1

    def send(self, event: str | None, data: bytes) -> None:
        self.started = True
        self._put((self._log_event(event, data), event, data))

    def fail(self, status: int, error: str, retry_after: int | None = None) -> None:
        """Report a failure: as an HTTP status while nothing was sent, else as an error event."""
        if self.failed:
            return
        self.failed = True
        data = json.dumps({"error": error}, ensure_ascii=False).encode()
        if self.started:
            self.send("error", data)
        else:
            self._log_event("error", data)  # a resumed stream hears of it too
            self._put(Refusal(status, error, retry_after))

    def end(self) -> None:
        """Mark the end of the reply in the log; later events go to this response only."""
        if self._next_id is not None:
            self._log.append(self._app_id, min(self._next_id, self._last_id), END, b"")
        self._next_id = None

    def close(self) -> None:
        self._put(None)

    def _put(self, item: Refusal | Event | str | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _log_event(self, event: str | None, data: bytes) -> int | None:
        event_id = self._next_id
        if event_id is not None and event_id < self._last_id:
            self._next_id = event_id + 1
            self._log.append(self._app_id, event_id, event, data)
            return event_id
        return None  # not logged: the turn has none yet, or a million events already

    # The response's side.
    async def first(self, within: float) -> Refusal | Event | str | None:
        """The first event, or the refusal; QUIET when neither has come `within` seconds
        after the turn took its lease (Ollama loading a model sends nothing): the stream
        then begins with a ping, so that proxies keep it open, and a failure from then on
        is an error event. While the turn waits for its lease, it waits (409 stays 409)."""
        arrived = self._arrival()
        began = asyncio.ensure_future(self._began.wait())
        try:
            await asyncio.wait({arrived, began}, return_when=asyncio.FIRST_COMPLETED)
            if not arrived.done():
                await asyncio.wait({arrived}, timeout=within)
        finally:
            began.cancel()
        if self._items:
            return self._items.popleft()
        self.started = True
        return QUIET

    def ping(self) -> None:
        """Ask the response for a keep-alive comment: it comes as an empty batch."""
        self._put(PING)

    async def take(self) -> list[Event] | None:
        """The next events, all that are waiting (an empty batch is a ping); None at the end."""
        if not self._items:
            await self._arrival()
        items = self._items
        batch: list[Event] = []
        pinged = False
        while items:
            item = items.popleft()
            if item is None:
                if batch or pinged:
                    items.appendleft(None)  # the end, for the next call
                    return batch
                return None
            if item is PING:
                pinged = True
            else:
                assert isinstance(item, tuple)  # a Refusal can only come first
                batch.append(item)
        return batch

    def _arrival(self) -> asyncio.Future[None]:
        """A future that is done once an item waits to be read."""
        waiter = self._loop.create_future()
        if self._items:
            waiter.set_result(None)
        else:
            self._waiter = waiter
        return waiter
