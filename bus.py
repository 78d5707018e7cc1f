"""Messages between chatterd's workers and hosts, over PostgreSQL's LISTEN/NOTIFY.

Each worker listens on one dedicated connection and fans what arrives out in memory: to
code that waits for a message about one appID (`watch`), and to handlers of a kind of
message (`handle`). A message is `<kind> <payload>`:

- `events ["appID", ...]`: the event log wrote new events of these appIDs;
- `free <appID>`: a conversation's lease was let go;
- `stop <appID>`: stop the appID's turn, wherever it runs.

A message goes out with `send`, or with `pg_notify(bus.channel, message)` in a statement
of the sender's own (the event log's write, a lease's release).
While the listening connection is down, messages are missed: every watcher is woken when
it is back, so that each looks again for itself. Its loss and its coming back are also the
signs that the database went away (`lost`) and is back (`back`), sooner than the pool's
own back-off would find out. The channel is named after the schema, so that chatterds on
other schemas of the same database don't hear each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from database import StoreError, reason, with_keepalives

log = logging.getLogger("chatterd")

RECONNECT_SECONDS = 0.2  # how soon to try again when the database is away
HEARTBEAT_SECONDS = 1.0
CONNECT_SECONDS = 3


class Bus:
    def __init__(self, conninfo: str, pool: AsyncConnectionPool) -> None:
        self._conninfo = with_keepalives(conninfo)
        self._pool = pool  # to send with
        self.channel = "chatterd"  # named after the schema once connected
        self._watchers: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._handlers: dict[str, Callable[[str], None]] = {}
        self.listening = asyncio.Event()
        self.lost = asyncio.Event()  # set when the database goes away
        self.back = asyncio.Event()  # set when the database is back after an outage

    async def open(self) -> None:
        """Learn the channel's name (from the schema), before anyone sends."""
        async with await psycopg.AsyncConnection.connect(self._conninfo) as conn:
            schema = (await (await conn.execute("SELECT current_schema()")).fetchone())[0]
        self.channel = "chatterd" if schema == "public" else f"chatterd.{schema}"

    async def send(self, message: str) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, message))
        except psycopg.Error as exc:
            raise StoreError(f"the database is unavailable: {reason(exc)}") from exc

    def handle(self, kind: str, handler: Callable[[str], None]) -> None:
        """Call `handler(payload)` for every message of this kind."""
        self._handlers[kind] = handler

    @contextmanager
    def watch(self, kind: str, key: str) -> Iterator[asyncio.Event]:
        """An event that is set whenever a message of `kind` about `key` arrives (clear it
        to wait for the next one), and when the bus reconnects."""
        woken = asyncio.Event()
        watchers = self._watchers.setdefault((kind, key), set())
        watchers.add(woken)
        try:
            yield woken
        finally:
            watchers.discard(woken)
            if not watchers:
                del self._watchers[(kind, key)]

    async def run(self) -> None:
        """Listen, and listen again whenever the connection is lost.

        Between waits for messages a `SELECT 1` checks the connection, so that a database
        that went away is noticed within a few seconds even when nothing is said.
        """
        lost = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=CONNECT_SECONDS
                ) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.listening.set()
                    self._wake_everyone()  # what was sent while away is for them to look up
                    if lost:
                        log.info("the database is back")
                        self.back.set()
                    while True:
                        async for notify in conn.notifies(timeout=HEARTBEAT_SECONDS):
                            self._dispatch(notify.payload)
                        await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                if self.listening.is_set():
                    log.warning("lost the database's notifications: %s", reason(exc))
                    self.lost.set()
                self.listening.clear()
                lost = True
                await asyncio.sleep(RECONNECT_SECONDS)

    def _dispatch(self, message: str) -> None:
        kind, _, payload = message.partition(" ")
        try:
            keys = json.loads(payload) if kind == "events" else [payload]
        except ValueError:
            keys = None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            log.warning("ignored a notification that is not chatterd's: %.80r", message)
            return
        for key in keys:
            for woken in self._watchers.get((kind, key), ()):
                woken.set()
        if handler := self._handlers.get(kind):
            for key in keys:
                handler(key)

    def _wake_everyone(self) -> None:
        for watchers in self._watchers.values():
            for woken in watchers:
                woken.set()


def messages(kind: str, keys: list[str], limit: int = 7999) -> list[str]:
    """`events` messages for these keys, each under PostgreSQL's 8000-byte payload limit."""
    found: list[str] = []
    batch: list[str] = []
    size = len(kind) + 3  # "<kind> []"
    for key in keys:
        cost = _quoted_size(key) + 1  # and its comma
        if batch and size + cost > limit:
            found.append(_message(kind, batch))
            batch, size = [], len(kind) + 3
        batch.append(key)
        size += cost
    if batch:
        found.append(_message(kind, batch))
    return found


def _quoted_size(key: str) -> int:
    """The bytes of `key` as a JSON string; most keys need no escape (the cheap case)."""
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return len(key) + 2
    return len(json.dumps(key, ensure_ascii=False).encode())


def _message(kind: str, keys: list[str]) -> str:
    return f"{kind} {json.dumps(keys, ensure_ascii=False, separators=(',', ':'))}"
