"""The database's plumbing, for every module that uses it: its errors, the schema, and
the connections' settings (keepalives, prepared statements, the pool's check).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

SCHEMA = Path(__file__).with_name("schema.sql")


class StoreError(Exception):
    """The database could not do what was asked. The message is safe to show a client."""

    status = 503


async def apply_schema(conninfo: str) -> str:
    """Create or migrate the tables; return the name of the role column this database uses."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute(SCHEMA.read_text())
        cursor = await conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'chatts'"
            " AND column_name IN ('username', 'name')"
        )
        columns = {row[0] for row in await cursor.fetchall()}
    return "username" if "username" in columns else "name"


# chatterd's statements are few and fixed, and each runs thousands of times: psycopg
# prepares each at its first use on a connection (not its fifth), and PostgreSQL plans it
# once, for any parameters. Its default, a fresh plan at every execution while it weighs a
# generic one, kept planning the history read: half a millisecond of a lone request's six.
PREPARE_THRESHOLD = 0


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """The session settings of each connection chatterd runs its statements on."""
    await conn.execute("SET plan_cache_mode = force_generic_plan")


class RecentCheck:
    """The pool's check when it hands out a connection: a round trip of its own, so made
    only for a connection that has not been used for CHECK_AFTER_SECONDS. `forget` makes
    every connection be checked again, as after the database was away."""

    def __init__(self) -> None:
        self._used: WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = WeakKeyDictionary()

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        last, self._used[conn] = self._used.get(conn), now
        if last is None or now - last >= CHECK_AFTER_SECONDS:
            await AsyncConnectionPool.check_connection(conn)

    def forget(self) -> None:
        self._used.clear()


CHECK_AFTER_SECONDS = 2.0


# A database host that vanishes (no FIN, no RST) is noticed by TCP keepalives in about three
# seconds, instead of the system's two hours, and one that does not answer a connection in
# three. libpq ignores the keepalives on Unix sockets.
CLIENT_KEEPALIVES = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 2000,
}


def with_keepalives(conninfo: str, server_side: str = "") -> str:
    """The conninfo with TCP keepalives, and PostgreSQL's own for this session if given."""
    extra: dict[str, Any] = dict(CLIENT_KEEPALIVES)
    if server_side:
        options = conninfo_to_dict(conninfo).get("options")
        extra["options"] = " ".join(filter(None, [options, server_side]))
    return make_conninfo(conninfo, **extra)


def reason(exc: psycopg.Error) -> str:
    """A one-line reason without SQL text: the server's primary message, or the error's kind."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag else None
    return primary or type(exc).__name__
