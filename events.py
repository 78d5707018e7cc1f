"""The event log: every SSE event of a reply, kept in PostgreSQL so a lost stream can resume.

Each event of a reply gets an id, increasing within an appID: the reply's number (counted
by the conversation's lease, one per turn) times IDS_PER_REPLY, plus the event's place in
the reply. A worker appends the events it sends to a buffer that it writes to the
`stream_events` table every FLUSH_SECONDS, in one statement for all its streams, so the
relay never waits on the database. A reply's last row is an END marker, written before
its turn lets go of the lease: a reply with no END whose lease is gone was cut off.

A client that lost its stream follows the log (`follow`), from any worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from history import StoreError, reason

log = logging.getLogger("chatterd")

IDS_PER_REPLY = 1_000_000
END = "end"  # the event name of a reply's END marker: never sent to a client
FLUSH_SECONDS = 0.1  # how far the log may lag behind the live stream
POLL_SECONDS = 0.2  # how often a resumed stream looks for new events
MAX_BUFFERED = 100_000  # events kept for a later write while the database is away
CUT_OFF = b'{"error":"the reply was cut off before it ended (chatterd stopped); it was not stored"}'


@dataclass(frozen=True)
class LoggedEvent:
    id: int
    event: str | None  # None: a plain data event
    data: bytes


def first_id(reply: int) -> int:
    return reply * IDS_PER_REPLY


def reply_of(event_id: int) -> int:
    return event_id // IDS_PER_REPLY


class EventLog:
    def __init__(self, pool: AsyncConnectionPool, keep_seconds: float) -> None:
        self.pool = pool
        self.keep_seconds = keep_seconds
        self._buffer: list[tuple[str, int, str | None, bytes]] = []
        self._writing = asyncio.Lock()

    def append(self, app_id: str, event_id: int, event: str | None, data: bytes) -> None:
        self._buffer.append((app_id, event_id, event, data))

    async def run(self) -> None:
        """Write the buffer every FLUSH_SECONDS, and drop events past their keeping time."""
        loop = asyncio.get_running_loop()
        next_expiry = loop.time()
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()
            if loop.time() >= next_expiry:
                await self._expire()
                next_expiry = loop.time() + min(60.0, self.keep_seconds / 2)

    async def flush(self) -> None:
        """Write what is buffered; on failure keep it for the next try (up to a bound)."""
        async with self._writing:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            app_ids, ids, names, datas = (list(column) for column in zip(*batch, strict=True))
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "INSERT INTO stream_events (appid, id, event, data)"
                        " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bytea[])"
                        " ON CONFLICT DO NOTHING",
                        (app_ids, ids, names, datas),
                    )
            except psycopg.Error as exc:
                log.warning("could not write %d stream events: %s", len(batch), reason(exc))
                self._buffer = (batch + self._buffer)[-MAX_BUFFERED:]

    async def _expire(self) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM stream_events WHERE created < now() - make_interval(secs => %s)",
                    (self.keep_seconds,),
                )
        except psycopg.Error as exc:
            log.warning("could not drop expired stream events: %s", reason(exc))

    async def read(self, app_id: str, reply: int, after: int) -> list[LoggedEvent]:
        """The reply's logged events after the id `after`, END marker included."""
        rows = await self._query(
            "SELECT id, event, data FROM stream_events"
            " WHERE appid = %s AND id > %s AND id < %s ORDER BY id",
            (app_id, after, first_id(reply + 1)),
        )
        return [LoggedEvent(*row) for row in rows]

    async def last_id(self, app_id: str, reply: int) -> int | None:
        """The id of the reply's last logged event (or END marker); None when none is kept."""
        rows = await self._query(
            "SELECT max(id) FROM stream_events WHERE appid = %s AND id >= %s AND id < %s",
            (app_id, first_id(reply), first_id(reply + 1)),
        )
        return rows[0][0]

    async def latest_reply(self, app_id: str) -> int | None:
        """The newest reply of the appID that is running or has events kept."""
        rows = await self._query(
            "SELECT greatest("
            " (SELECT max(id) / %s FROM stream_events WHERE appid = %s),"
            " (SELECT replies FROM conversation_leases WHERE appid = %s AND expires > now()))",
            (IDS_PER_REPLY, app_id, app_id),
        )
        return rows[0][0]

    async def live(self, app_id: str, reply: int) -> bool:
        """Whether the reply's turn still runs: its lease is held."""
        rows = await self._query(
            "SELECT 1 FROM conversation_leases"
            " WHERE appid = %s AND replies = %s AND expires > now()",
            (app_id, reply),
        )
        return bool(rows)

    async def _query(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not read the stream: {reason(exc)}") from exc

    async def follow(
        self, app_id: str, reply: int, after: int, read: list[LoggedEvent] | None = None
    ) -> AsyncIterator[list[LoggedEvent]]:
        """The reply's events after `after`, in batches as they are logged, until its end.

        `read` is what the caller has already read after `after`, if anything. A reply
        that was cut off (its turn's lease is gone and it has no END) ends with an error
        event, whose id is one past the last: a client that reconnects with it has seen
        everything.
        """
        events = read
        while True:
            if events is None:
                events = await self.read(app_id, reply, after)
            if not events:
                if await self.live(app_id, reply):
                    await asyncio.sleep(POLL_SECONDS)
                    events = None
                    continue
                events = await self.read(app_id, reply, after)  # it may have just ended
                if not events:
                    yield [LoggedEvent(after + 1, "error", CUT_OFF)]
                    return
            sendable = [event for event in events if event.event != END]
            if sendable:
                yield sendable
            if len(sendable) < len(events):
                return
            after, events = events[-1].id, None
