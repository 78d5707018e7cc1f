"""The admission queue: chatterd's own line in front of the Ollama servers.

At most `parallel` generations run at once on each Ollama server; the rest wait here,
where they can be told their place, rather than silently in Ollama's queue. The line
serves clients in turn (round robin between clients, first come first served within
one), so a client with many waiting requests delays another client's one request by at
most one turn. A client is whatever the HTTP edge says it is (an API key, or an address).

The line is bounded, in all and per client; past a bound a request is refused at once
(`Shed`) with a status and a Retry-After estimate. Each worker process keeps its own line.

`generate` is the one way in: it waits for a slot, opens the generation on the server the
slot is on, and moves it to another server that has the model when that one fails before
the generation began.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import metrics
from ollama import OllamaError, Opened
from servers import NoServer, Server, Servers

INITIAL_GENERATION_SECONDS = 10.0  # the guess for Retry-After before any generation ended
NOTICE_SECONDS = 1.0  # how often a request further back is told its place, at most
TOLD_AT_ONCE = 3  # places near the front that are told at once


@dataclass(frozen=True)
class Limits:
    parallel: int  # generations at once on each Ollama server
    queue_max: int  # requests waiting, in all
    queue_per_client: int  # requests waiting, of one client
    notice_seconds: float = NOTICE_SECONDS  # how often a place further back is told


class Shed(Exception):
    """The line is full: 503 when it is full in all, 429 when the client's share is."""

    def __init__(self, status: int, error: str, retry_after: int) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


OnPosition = Callable[[int], None]


@dataclass(eq=False)
class _Ticket:
    client: str
    model: str
    exclude: frozenset[Server]
    on_position: OnPosition | None
    granted: asyncio.Future[Server] = field(default_factory=asyncio.Future)
    position: int = 0  # its place now
    told: int = 0  # the place it was last told
    told_at: float = float("-inf")


class Admission:
    def __init__(self, servers: Servers, limits: Limits) -> None:
        self.servers = servers
        self.limits = limits
        self._lines: dict[str, deque[_Ticket]] = {}  # clients with waiting tickets, in turn order
        self._waiting = 0
        self._generation_seconds = INITIAL_GENERATION_SECONDS  # a moving average
        self._retell: asyncio.TimerHandle | None = None  # to tell places held back
        servers.on_change = self._dispatch

    @property
    def waiting(self) -> int:
        return self._waiting

    async def generate(
        self,
        client: str,
        model: str,
        path: str,
        body: bytes,
        on_position: OnPosition | None = None,
        *,
        continuing: bool = False,
    ) -> Generation:
        """Wait for a slot, then open the generation on a server that has `model`.

        A server that fails before the generation begins is left for another one that
        has the model (the slot moves with it); only when none is left does the error
        reach the caller. `continuing` (a later round of a turn already begun) puts the
        request first among its client's. Raises Shed, NoServer or OllamaError.
        """
        tried: set[Server] = set()
        failure: OllamaError | None = None  # the last server's, when it failed
        while True:
            try:
                server = await self.acquire(
                    client, model, on_position, frozenset(tried), continuing or bool(tried)
                )
            except NoServer:
                if failure is not None:
                    raise failure from None
                raise
            try:
                opened = await server.streams.open(path, body)
            except BaseException as exc:
                if isinstance(exc, OllamaError) and exc.unreachable:
                    self.servers.mark_down(server, exc.error)  # before its slot is given on
                self.release(server, None)
                if not isinstance(exc, OllamaError) or not exc.retry_elsewhere:
                    raise
                tried.add(server)
                failure = exc
                continue
            return Generation(self, server, opened)

    async def acquire(
        self,
        client: str,
        model: str,
        on_position: OnPosition | None = None,
        exclude: frozenset[Server] = frozenset(),
        first_of_client: bool = False,
    ) -> Server:
        """A slot on a server that may run `model`, at once or after waiting in line; give
        it back with `release`. Raises Shed or NoServer."""
        try:
            ranked = self.servers.ranked(model, exclude)
        except NoServer as exc:
            if exc.status != 404:
                raise
            await self.servers.refresh_for(model)
            ranked = self.servers.ranked(model, exclude)
        if server := self._free(ranked):
            self._grant(server)
            metrics.queue_wait(0.0)
            return server
        if not first_of_client:  # a later round of a turn already begun is never refused
            self._refuse_if_full(client)
        ticket = _Ticket(client, model, exclude, on_position)
        line = self._lines.setdefault(client, deque())
        if first_of_client:
            line.appendleft(ticket)
        else:
            line.append(ticket)
        self._waiting += 1
        metrics.queue_waiting(+1)
        loop = asyncio.get_running_loop()
        since = loop.time()
        self._tell_positions()
        try:
            server = await ticket.granted
        except asyncio.CancelledError:
            metrics.queue_wait(loop.time() - since)  # a wait that ended in a stop counts too
            granted = ticket.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release(granted.result(), None)  # granted just as it was cancelled
            elif self._remove(ticket):
                self._tell_positions()
            raise
        metrics.queue_wait(loop.time() - since)
        return server

    def _refuse_if_full(self, client: str) -> None:
        line = self._lines.get(client)
        if line is not None and len(line) >= self.limits.queue_per_client:
            raise Shed(
                429,
                f"this client already has {len(line)} requests waiting"
                f" (CHATTERD_QUEUE_PER_CLIENT); try again later",
                self._retry_after(),
            )
        if self._waiting >= self.limits.queue_max:
            raise Shed(
                503,
                f"chatterd's queue is full: {self._waiting} requests are waiting"
                f" (CHATTERD_QUEUE_MAX); try again later",
                self._retry_after(),
            )

    def _free(self, ranked: list[Server]) -> Server | None:
        for server in ranked:
            if server.in_flight < self.limits.parallel:
                return server
        return None

    def _grant(self, server: Server) -> None:
        server.in_flight += 1
        metrics.ollama_in_flight(server.name, server.in_flight)

    def release(self, server: Server, seconds: float | None) -> None:
        """Give back a slot, after a generation of `seconds` (None: it never began)."""
        server.in_flight -= 1
        metrics.ollama_in_flight(server.name, server.in_flight)
        if seconds is not None:
            self._generation_seconds += (seconds - self._generation_seconds) / 5
        self._dispatch()

    def _remove(self, ticket: _Ticket) -> bool:
        line = self._lines.get(ticket.client)
        if line is None or ticket not in line:
            return False
        line.remove(ticket)
        if not line:
            del self._lines[ticket.client]
        self._waiting -= 1
        metrics.queue_waiting(-1)
        return True

    def _dispatch(self) -> None:
        """Grant every free slot that a waiting ticket can use, clients taking turns."""
        granted = True
        while granted and self._waiting:
            granted = False
            for client, line in list(self._lines.items()):
                for ticket in line:
                    if ticket.granted.done():  # cancelled: its task has yet to take it out
                        self._remove(ticket)
                        granted = True
                        break
                    try:
                        server = self._free(self.servers.ranked(ticket.model, ticket.exclude))
                    except NoServer as exc:  # its servers went away while it waited
                        self._remove(ticket)
                        ticket.granted.set_exception(exc)
                        granted = True
                        break
                    if server is None:
                        continue
                    self._remove(ticket)
                    ticket.granted.set_result(server)
                    self._grant(server)
                    if client in self._lines:  # it had its turn: to the back of the line
                        self._lines[client] = self._lines.pop(client)
                    granted = True
                    break
                if granted:
                    break
        self._tell_positions()

    def _tell_positions(self) -> None:
        """Give each waiting ticket its place, in the order turns would serve them.

        Tickets count only against those that wait for the same servers, so that a
        request for a model on a free server is not told it waits behind another's. A
        ticket is told at once when it is near the front, else at most once every
        `notice_seconds` (a long line would otherwise hear of every grant).
        """
        if self._retell is not None:
            self._retell.cancel()
            self._retell = None
        if not self._waiting:
            return
        now = asyncio.get_running_loop().time()
        late = False
        counts: dict[frozenset[str], int] = {}
        lines = list(self._lines.values())
        depth = 0
        while lines:
            for line in lines:
                ticket = line[depth]
                try:
                    ranked = self.servers.ranked(ticket.model, ticket.exclude)
                except NoServer:
                    continue
                group = frozenset(server.url for server in ranked)
                counts[group] = ticket.position = counts.get(group, 0) + 1
                if ticket.position == ticket.told or ticket.on_position is None:
                    continue
                due = now - ticket.told_at >= self.limits.notice_seconds
                if ticket.position <= TOLD_AT_ONCE or due:
                    ticket.told, ticket.told_at = ticket.position, now
                    ticket.on_position(ticket.position)
                else:
                    late = True
            depth += 1
            lines = [line for line in lines if len(line) > depth]
        if late and self._retell is None:
            loop = asyncio.get_running_loop()
            self._retell = loop.call_later(self.limits.notice_seconds, self._tell_positions)

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the waiting share of each slot's time."""
        slots = self.limits.parallel * max(1, sum(server.up for server in self.servers.all))
        estimate = self._generation_seconds * (self._waiting + 1) / slots
        return max(1, min(3600, math.ceil(estimate)))


class Generation:
    """A generation running on a server, holding its slot until it is closed."""

    def __init__(self, admission: Admission, server: Server, opened: Opened) -> None:
        self.server = server
        self._admission = admission
        self._opened = opened
        self._started = asyncio.get_running_loop().time()
        self._closed = False

    @property
    def content_type(self) -> str:
        return self._opened.content_type

    def lines(self) -> AsyncIterator[bytes]:
        return self._opened.lines()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._opened.chunks()

    async def aclose(self) -> None:
        """Close the stream (Ollama stops generating) and give the slot to the next."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._opened.aclose()
        finally:
            seconds = asyncio.get_running_loop().time() - self._started
            self._admission.release(self.server, seconds)
