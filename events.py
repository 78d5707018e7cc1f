"""The event log: every SSE event of a reply, kept in PostgreSQL so a lost stream can resume.

Each event of a reply gets an id, increasing within an appID: the reply's number (counted
by the conversation's lease, one per turn) times IDS_PER_REPLY, plus the event's place in
the reply. A worker appends the events it sends to a buffer that it writes to the
`stream_events` table FLUSH_SECONDS after the first is buffered, in one statement for all
its streams, so the relay never waits on the database. The same statement tells every
worker which appIDs have new events (bus.py). A reply's last row is an END marker, written
before its turn lets go of the lease: a reply with no END whose lease is gone was cut off.

A client that lost its stream follows the log from any worker (resume.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

import bus
from bus import Bus
from database import StoreError, reason

log = logging.getLogger("chatterd")

IDS_PER_REPLY = 1_000_000
END = "end"  # the event name of a reply's END marker: never sent to a client
FLUSH_SECONDS = 0.01  # how far the log may lag behind the live stream
MAX_BUFFERED = 100_000  # events kept for a later write while the database is away
RETRY_SECONDS = 0.5  # after a failed write
WRITTEN_WAIT_SECONDS = 1.0  # how long `written` waits for the next flush before its own


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
    def __init__(self, pool: AsyncConnectionPool, keep_seconds: float, messages: Bus) -> None:
        self.pool = pool
        self.keep_seconds = keep_seconds
        self._bus = messages
        self._buffer: list[tuple[str, int, str | None, bytes]] = []
        self._buffered = asyncio.Event()
        self._writing = asyncio.Lock()
        self._retry_at = 0.0  # after a failed write, not before this
        self._waiting: list[asyncio.Future[None]] = []  # turns waiting for their END's write

    def append(self, app_id: str, event_id: int, event: str | None, data: bytes) -> None:
        self._buffer.append((app_id, event_id, event, data))
        self._buffered.set()

    async def written(self) -> None:
        """Wait until what is buffered now has been written, or its write failed.

        The next flush writes it with every other stream's events, rather than in a statement
        of its own: a turn's END costs no round trip. Should that flush not come (the loop
        is restarting), the buffer is written here.
        """
        if not self._buffer:
            async with self._writing:  # a write under way may hold it
                return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        self._buffered.set()
        try:
            async with asyncio.timeout(WRITTEN_WAIT_SECONDS):
                await asyncio.shield(done)
        except TimeoutError:
            await self.flush()

    async def run(self) -> None:
        """Write the buffer soon after events come, and drop events past their keeping time
        (apart, so that a long delete never holds up a write, nor a turn's END)."""
        async with asyncio.TaskGroup() as loops:  # one fails: both end, and start again
            loops.create_task(self._write_soon())
            loops.create_task(self._expire_now_and_then())

    async def _write_soon(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._buffered.wait()
            # What comes meanwhile goes in this write; after a failure, wait a little.
            await asyncio.sleep(max(FLUSH_SECONDS, self._retry_at - loop.time()))
            await self.flush()

    async def _expire_now_and_then(self) -> None:
        while True:
            await self._expire()
            await asyncio.sleep(min(60.0, self.keep_seconds / 2))

    async def flush(self) -> None:
        """Write what is buffered; on failure keep it for the next try (up to a bound)."""
        async with self._writing:
            batch, self._buffer = self._buffer, []
            waiting, self._waiting = self._waiting, []
            self._buffered.clear()
            try:
                if batch:
                    await self._write(batch)
            finally:
                for done in waiting:
                    if not done.done():
                        done.set_result(None)

    async def _write(self, batch: list[tuple[str, int, str | None, bytes]]) -> None:
        app_ids, ids, names, datas = (list(column) for column in zip(*batch, strict=True))
        told = bus.messages("events", list(dict.fromkeys(app_ids)))
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "WITH written AS ("
                    " INSERT INTO stream_events (appid, id, event, data)"
                    " SELECT * FROM unnest(%b::text[], %b::bigint[], %b::text[], %b::bytea[])"
                    " ON CONFLICT DO NOTHING)"
                    " SELECT pg_notify(%s, message) FROM unnest(%b::text[]) AS message",
                    (app_ids, ids, names, datas, self._bus.channel, told),
                )
        except psycopg.OperationalError as exc:  # the database is away: try again later
            log.warning("could not write %d stream events: %s", len(batch), reason(exc))
            self._buffer = (batch + self._buffer)[-MAX_BUFFERED:]
            self._retry_at = asyncio.get_running_loop().time() + RETRY_SECONDS
            self._buffered.set()
        except psycopg.Error as exc:  # these events can't be written: don't try forever
            log.error("dropped %d stream events: %s", len(batch), reason(exc))

    async def _expire(self) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM stream_events WHERE created < now() - make_interval(secs => %s)",
                    (self.keep_seconds,),
                )
        except psycopg.Error as exc:
            log.warning("could not drop expired stream events: %s", reason(exc))

    async def read(
        self, app_id: str, reply: int, after: int, upto: int | None = None
    ) -> list[LoggedEvent]:
        """The reply's logged events after the id `after` (up to `upto`), END included."""
        end = first_id(reply + 1) - 1 if upto is None else upto
        rows = await self._query(
            "SELECT id, event, data FROM stream_events"
            " WHERE appid = %s AND id > %s AND id <= %s ORDER BY id",
            (app_id, after, end),
        )
        return [LoggedEvent(*row) for row in rows]

    async def not_running(self, replies: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Those of the (appID, reply) pairs whose turn no longer runs; one query for all."""
        rows = await self._query(
            # One look at the lock table for them all (chatterd_lease_held looks once each).
            "WITH held AS MATERIALIZED ("
            " SELECT (classid::bigint << 32) | objid::bigint AS key FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
            " SELECT f.appid, f.reply"
            " FROM unnest(%s::text[], %s::bigint[]) AS f(appid, reply)"
            " WHERE NOT EXISTS (SELECT 1 FROM conversation_leases AS lease"
            " WHERE lease.appid = f.appid AND lease.replies = f.reply"
            " AND chatterd_lease_key(lease.appid) IN (SELECT key FROM held))",
            ([app_id for app_id, _ in replies], [reply for _, reply in replies]),
        )
        return [(app_id, reply) for app_id, reply in rows]

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
            " (SELECT replies FROM conversation_leases"
            "  WHERE appid = %s AND chatterd_lease_held(appid)))",
            (IDS_PER_REPLY, app_id, app_id),
        )
        return rows[0][0]

    async def live(self, app_id: str, reply: int) -> bool:
        """Whether the reply's turn still runs: its lease is held."""
        rows = await self._query(
            "SELECT 1 FROM conversation_leases"
            " WHERE appid = %s AND replies = %s AND chatterd_lease_held(appid)",
            (app_id, reply),
        )
        return bool(rows)

    async def _query(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not read the stream: {reason(exc)}") from exc
