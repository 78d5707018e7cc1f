"""The history store: each app's conversation and declared device tools, in PostgreSQL.

Every method takes a pooled connection for its own statements and gives it back before
returning, so no connection is ever held while the model is talking.

A turn's rows are written as `pending` and become part of the conversation only when the
turn completes (`complete`), in one transaction with its last rows. Pending rows are
never read as history; those a dead process left behind are removed by the next turn.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ollama import ROLES, Message

SCHEMA = Path(__file__).with_name("schema.sql")


class StoreError(Exception):
    """The database could not do what was asked. The message is safe to show a client."""

    status = 503


@dataclass
class Turn:
    """A conversation as it stands once a request's messages are stored."""

    history: list[Message]
    device_tools: list[dict[str, Any]]
    stored: list[int]  # seq of each row this request wrote, so a failed turn can be undone


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


def name_tool_results(history: list[Message], incoming: list[Message]) -> list[Message]:
    """Fill `tool_name` on tool results that lack it, from the calls they answer.

    The apps post a device tool's result as a bare `{"role": "tool", "content": ...}`;
    Ollama wants to know which tool it comes from. The pending calls are those of the
    last assistant message that called tools, less the ones already answered after it.
    """
    pending: list[str] = []
    is_incoming = {id(message) for message in incoming}
    for message in [*history, *incoming]:
        if message.role == "assistant" and message.tool_calls:
            pending = [call.get("function", {}).get("name", "") for call in message.tool_calls]
        elif message.role == "tool":
            if message.tool_name is None and id(message) in is_incoming and pending:
                message.tool_name = pending[0]
            if message.tool_name in pending:
                pending.remove(message.tool_name)
        elif message.role == "user":
            pending = []
    return incoming


class History:
    def __init__(self, pool: AsyncConnectionPool, role_column: str) -> None:
        self.pool = pool
        role = sql.Identifier(role_column)
        self._select = sql.SQL(
            "SELECT {role}, message, toolcalls, toolname FROM chatts"
            " WHERE appid = %s AND NOT pending ORDER BY seq"
        ).format(role=role)
        self._insert = sql.SQL(
            "INSERT INTO chatts (appid, {role}, message, thinking, toolcalls, toolname, pending)"
            " VALUES (%s, %s, %s, %s, %s, %s, true) RETURNING seq"
        ).format(role=role)

    async def record(
        self, app_id: str, incoming: list[Message], device_tools: list[dict[str, Any]] | None
    ) -> Turn:
        """Store a request's messages (and device tools) and read back the whole conversation.

        The caller holds the conversation's lease, so pending rows are a dead turn's.
        """
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute("DELETE FROM chatts WHERE appid = %s AND pending", (app_id,))
                history = [
                    _message(row)
                    for row in await (await conn.execute(self._select, (app_id,))).fetchall()
                ]
                name_tool_results(history, incoming)
                stored = await self._insert_rows(conn, app_id, [(m, None) for m in incoming])
                if device_tools:
                    await self._save_device_tools(conn, app_id, device_tools)
                cursor = await conn.execute(
                    "SELECT declaration FROM device_tools WHERE appid = %s ORDER BY name",
                    (app_id,),
                )
                tools = [row[0] for row in await cursor.fetchall()]
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the request: {_reason(exc)}") from exc
        return Turn([*history, *incoming], tools, stored)

    async def append(self, app_id: str, messages: list[tuple[Message, str | None]]) -> list[int]:
        """Store a turn's messages, each with the model's thinking (or None); return their seqs."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await self._insert_rows(conn, app_id, messages)
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the reply: {_reason(exc)}") from exc

    async def complete(
        self, app_id: str, messages: list[tuple[Message, str | None]], turn: list[int]
    ) -> None:
        """Store a turn's last messages and make the whole turn part of the conversation."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                turn = turn + await self._insert_rows(conn, app_id, messages)
                await conn.execute(
                    "UPDATE chatts SET pending = false WHERE appid = %s AND seq = ANY(%s)",
                    (app_id, turn),
                )
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the reply: {_reason(exc)}") from exc

    async def remove(self, app_id: str, seqs: list[int]) -> None:
        """Delete the rows a failed turn wrote, so the conversation is as it was before it."""
        if not seqs:
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM chatts WHERE appid = %s AND seq = ANY(%s)", (app_id, seqs)
                )
        except psycopg.Error as exc:
            raise StoreError(f"the database could not undo the turn: {_reason(exc)}") from exc

    async def status(self) -> dict[str, Any]:
        """Whether the database answers, and how many pooled connections are in use."""
        try:
            async with self.pool.connection(timeout=3) as conn:
                await conn.execute("SELECT 1")
            report: dict[str, Any] = {"reachable": True}
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            report = {"reachable": False, "error": _reason(exc)}
        stats = self.pool.get_stats()
        report["connections_in_use"] = stats["pool_size"] - stats["pool_available"]
        return report

    async def take_lease(self, app_id: str, holder: uuid.UUID, seconds: float) -> bool:
        """Take the conversation's lease if nobody holds it (or the holder's has expired)."""
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "INSERT INTO conversation_leases AS lease (appid, holder, expires)"
                    " VALUES (%s, %s, now() + make_interval(secs => %s))"
                    " ON CONFLICT (appid) DO UPDATE"
                    " SET holder = EXCLUDED.holder, expires = EXCLUDED.expires"
                    " WHERE lease.expires < now() OR lease.holder = EXCLUDED.holder"
                    " RETURNING holder",
                    (app_id, holder, seconds),
                )
                return await cursor.fetchone() is not None
        except psycopg.Error as exc:
            raise StoreError(f"the database is unavailable: {_reason(exc)}") from exc

    async def drop_lease(self, app_id: str, holder: uuid.UUID) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM conversation_leases WHERE appid = %s AND holder = %s",
                    (app_id, holder),
                )
        except psycopg.Error as exc:
            raise StoreError(f"the database is unavailable: {_reason(exc)}") from exc

    async def _insert_rows(
        self,
        conn: psycopg.AsyncConnection[Any],
        app_id: str,
        messages: list[tuple[Message, str | None]],
    ) -> list[int]:
        seqs = []
        async with conn.cursor() as cursor:
            await cursor.executemany(
                self._insert,
                [
                    (
                        app_id,
                        message.role,
                        message.content,
                        thinking or None,
                        json.dumps(message.tool_calls) if message.tool_calls else None,
                        message.tool_name,
                    )
                    for message, thinking in messages
                ],
                returning=True,
            )
            while True:
                row = await cursor.fetchone()
                if row is not None:
                    seqs.append(row[0])
                if not cursor.nextset():
                    break
        return seqs

    async def _save_device_tools(
        self, conn: psycopg.AsyncConnection[Any], app_id: str, tools: list[dict[str, Any]]
    ) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO device_tools (appid, name, declaration) VALUES (%s, %s, %s)"
                " ON CONFLICT (appid, name) DO UPDATE SET declaration = EXCLUDED.declaration",
                [(app_id, tool["function"]["name"], Jsonb(tool)) for tool in tools],
            )


def _message(row: tuple[Any, ...]) -> Message:
    role, content, tool_calls, tool_name = row
    return Message(
        role if role in ROLES else "user",  # tutorial rows may hold anything here
        content or "",
        tool_calls=_tool_calls(tool_calls),
        tool_name=tool_name,
    )


def _tool_calls(stored: str | None) -> list[dict[str, Any]] | None:
    """Tool calls from their JSON text; a tutorial row's unreadable text counts as none."""
    if not stored:
        return None
    try:
        calls = json.loads(stored)
    except ValueError:
        return None
    return calls if isinstance(calls, list) and calls else None


def _reason(exc: psycopg.Error) -> str:
    """A one-line reason without SQL text: the server's primary message, or the error's kind."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag else None
    return primary or type(exc).__name__
