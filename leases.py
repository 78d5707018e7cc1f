"""One turn at a time per conversation, across all workers and hosts: the leases.

A turn holds its appID's lease as a session-level advisory lock on its worker's one lock
connection. PostgreSQL lets go of every lock of a session the moment the session ends, so
the conversations of a worker that dies are free again at once: a killed process's socket
is closed by its kernel, and a host that vanishes is noticed by TCP keepalives within
seconds. Nothing is written while a turn runs; the `conversation_leases` row of an appID
only counts its turns, which numbers their stream events.

If the lock connection itself is lost, so are the leases held on it: those turns are told
(`on_lost`) and must not store anything, since another worker may now hold the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from bus import Bus
from database import PREPARE_THRESHOLD, StoreError, configure, reason, with_keepalives
from together import Asked, Together

log = logging.getLogger("chatterd")

HEARTBEAT_SECONDS = 1.0  # how often the lock connection is checked
RECONNECT_SECONDS = 0.2
RETRY_SECONDS = 0.5  # how often a waiting turn tries again without being told of a release
# PostgreSQL lets go of a vanished host's locks once its TCP keepalives give up, in about
# four seconds (idle 2 s, then 2 probes 1 s apart, or 4 s of unacknowledged data). The
# worker must know it lost them before that, so that two hosts never both believe they
# hold a lease: its own keepalives and heartbeat give up within three seconds.
SERVER_KEEPALIVES = (
    "-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=2"
    " -c tcp_user_timeout=4000"
)


class ConversationBusy(Exception):
    """Another request for the same appID held the conversation for too long."""

    status = 409


def _taking() -> None:
    """The mark of a lease being taken: nothing to tell if it is lost meanwhile."""


class Leases:
    def __init__(self, conninfo: str, bus: Bus, wait: float, db_timeout: float) -> None:
        self._conninfo = with_keepalives(conninfo, server_side=SERVER_KEEPALIVES)
        self._bus = bus
        self.wait = wait  # seconds a turn waits for another of its appID to finish
        self._db_timeout = db_timeout  # seconds to wait for the lock connection to return
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._ready = asyncio.Event()
        self._held: dict[str, Callable[[], None]] = {}  # appID -> tell its turn it was lost
        self._holder = uuid.uuid4()  # this worker, as written in the leases' rows
        self._takes = Together(self._take_all, abandoned=self._abandoned)
        self._releases = Together(self._let_go_all)

    async def open(self) -> None:
        await self._connect()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def run(self) -> None:
        """Check the lock connection every second; when it is lost, connect again."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS if self._ready.is_set() else RECONNECT_SECONDS)
            try:
                if self._ready.is_set():
                    await self._execute("SELECT 1")
                else:
                    await self._connect()
            except (psycopg.Error, StoreError):
                pass  # _execute has let the turns know; try again shortly

    @asynccontextmanager
    async def hold(self, app_id: str, on_lost: Callable[[], None]) -> AsyncIterator[int]:
        """Hold the appID's lease while the block runs; yield the turn's reply number.

        Waits up to `wait` seconds for a turn that holds it to finish (ConversationBusy
        past that). `on_lost` is called if the lease is lost before the block ends.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        with self._bus.watch("free", app_id) as freed:
            while True:
                freed.clear()  # before trying: a release that comes meanwhile is not missed
                if (reply := await self._take(app_id)) is not None:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    raise ConversationBusy(
                        f"another request for this appID has been running for over"
                        f" {self.wait:g} s; try again when it has finished"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(RETRY_SECONDS, left)):
                        await freed.wait()
        self._held[app_id] = on_lost
        try:
            yield reply
        finally:
            del self._held[app_id]
            await asyncio.shield(self._let_go(app_id))

    def taking(self, app_id: str) -> bool:
        """Whether a turn of this worker is taking the appID's lease right now."""
        return self._held.get(app_id) is _taking

    async def held_anywhere(self, app_id: str) -> bool:
        """Whether a turn of the appID runs now, on any worker or host."""
        if app_id in self._held:
            return True
        await self._wait_ready()
        rows = await self._execute("SELECT chatterd_lease_held(%s)", (app_id,))
        return bool(rows and rows[0][0])

    async def _take(self, app_id: str) -> int | None:
        # A session's advisory locks are reentrant: this worker's own turns (and those
        # taking the lock right now) are kept apart here, so a batch never holds an appID
        # twice. A take whose turn is cancelled once its statement went out is let go of
        # by the batch (`_abandoned`), when the statement has said whether it took it.
        if app_id in self._held:
            return None
        self._held[app_id] = _taking
        try:
            await self._wait_ready()
            return await self._takes.ask(app_id)
        finally:
            del self._held[app_id]

    async def _let_go(self, app_id: str) -> None:
        try:
            await self._releases.ask(app_id)
        except StoreError:
            pass  # the connection is gone, and the lock with it

    def _abandoned(self, app_id: str, reply: int | None) -> None:
        """A take's turn was cancelled while its statement was under way: if it took the
        lease, let go of it (after the take, on the same connection)."""
        if reply is not None:
            self._releases.tell(app_id)

    async def _take_all(self, asked: Asked) -> dict[str, int]:
        """Try the leases of these appIDs at once; the reply numbers of those taken."""
        app_ids = [app_id for app_id, _ in asked]
        try:
            rows = await self._execute(
                "WITH taken AS (SELECT appid FROM unnest(%(apps)b::text[]) AS appid"
                " WHERE pg_try_advisory_lock(chatterd_lease_key(appid)))"
                " INSERT INTO conversation_leases AS lease (appid, holder, expires, replies)"
                " SELECT appid, %(holder)s, 'infinity', 1 FROM taken"
                " ON CONFLICT (appid) DO UPDATE"
                " SET holder = EXCLUDED.holder, replies = lease.replies + 1"
                " RETURNING appid, replies",
                {"apps": app_ids, "holder": self._holder},
            )
        except StoreError:
            # A refused statement is undone, but not the advisory locks it took: they are
            # the session's. Let go of them, or these appIDs stay locked for good.
            with contextlib.suppress(StoreError):
                await self._let_go_all(asked)
            raise
        return dict(rows)

    async def _let_go_all(self, asked: Asked) -> dict[str, None]:
        """Let go of these appIDs' leases, and tell every worker that each is free."""
        await self._execute(
            "SELECT pg_advisory_unlock(chatterd_lease_key(appid)), pg_notify(%s, 'free ' || appid)"
            " FROM unnest(%b::text[]) AS appid",
            (self._bus.channel, [app_id for app_id, _ in asked]),
        )
        return {}

    async def _wait_ready(self) -> None:
        try:
            async with asyncio.timeout(self._db_timeout):
                await self._ready.wait()
        except TimeoutError:
            raise StoreError("the database is unavailable: no connection for the leases") from None

    async def _execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        conn = self._conn
        if conn is None or not self._ready.is_set():
            raise StoreError("the database is unavailable: no connection for the leases")
        try:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall() if cursor.description else []
        except psycopg.OperationalError as exc:
            self._lost(reason(exc))
            raise StoreError(f"the database is unavailable: {reason(exc)}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"the database refused a lease: {reason(exc)}") from exc

    async def _connect(self) -> None:
        old, self._conn = self._conn, None
        if old is not None:
            await old.close()
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, prepare_threshold=PREPARE_THRESHOLD
        )
        try:
            await configure(conn)
        except psycopg.Error:
            await conn.close()
            raise
        self._conn = conn
        self._ready.set()

    def _lost(self, why: str) -> None:
        """The lock connection broke: every lease on it is gone."""
        if not self._ready.is_set():
            return
        self._ready.clear()
        log.warning(
            "lost the lock connection (%s): %d turns lose their lease", why, len(self._held)
        )
        for tell in list(self._held.values()):
            tell()
