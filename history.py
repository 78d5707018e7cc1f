"""The history store: each app's conversation and declared device tools, in PostgreSQL.

Every method takes a pooled connection for its own statements and gives it back before
returning, so no connection is ever held while the model is talking.

A turn's rows are written as `pending` and become part of the conversation only when the
turn completes (`complete`), in one transaction with its last rows. Pending rows are
never read as history; those a dead process left behind are removed by the next turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from database import StoreError, reason
from ollama import ROLES, Message, function_name


@dataclass
class Turn:
    """A conversation as it stands once a request's messages are stored."""

    history: list[Message]  # the newest stored messages, then this request's
    new: int  # how many of them are this request's (the last ones)
    unread: int  # older stored messages left unread: beyond the window asked for
    device_tools: list[dict[str, Any]]
    stored: list[int]  # seq of each row this request wrote, so a failed turn can be undone


@dataclass
class StoredMessage:
    message: Message
    seq: int  # its place in the conversation
    created_at: datetime


UNANSWERED = "Error: the app did not return a result for this call."


def settle_tool_calls(history: list[Message], incoming: list[Message]) -> list[Message]:
    """The request's messages as they are stored: every tool call answered, in order.

    The apps post a device tool's result as a bare `{"role": "tool", "content": ...}`; its
    `tool_name` is filled from the call it answers. A call the app never answered (it sent
    a new message instead) gets a result saying so, before whatever comes next, so that
    the history stays a valid conversation for Ollama.
    """
    unanswered = _unanswered_calls(history)
    settled: list[Message] = []
    for message in incoming:
        if message.role == "tool":
            if message.tool_name is None and unanswered:
                message.tool_name = unanswered[0]
            if message.tool_name in unanswered:
                unanswered.remove(message.tool_name)
        else:
            settled += [Message("tool", UNANSWERED, tool_name=name) for name in unanswered]
            unanswered = _call_names(message)
        settled.append(message)
    settled += [Message("tool", UNANSWERED, tool_name=name) for name in unanswered]
    return settled


def _unanswered_calls(history: list[Message]) -> list[str]:
    """Names of the last tool-calling message's calls that no result has answered yet."""
    unanswered: list[str] = []
    for message in history:
        if message.role == "tool":
            if message.tool_name in unanswered:
                unanswered.remove(message.tool_name)
            elif unanswered:
                unanswered.pop(0)  # a tutorial-era result without a name
        else:
            unanswered = _call_names(message)
    return unanswered


def _call_names(message: Message) -> list[str]:
    if message.role != "assistant" or not message.tool_calls:
        return []
    return [function_name(call) for call in message.tool_calls]


class History:
    """The store's statements. Each is one round trip where it can be: a turn costs a
    statement to read the history and store the request (two when it carries tool
    results, whose names come from the stored calls, or leaves calls unanswered; one more
    on /llmtools, which also reads the device tools), one per tool round, and one to
    complete it."""

    def __init__(self, pool: AsyncConnectionPool, role_column: str) -> None:
        self.pool = pool
        role = sql.Identifier(role_column)
        # Clear a dead turn's pending rows, and read the newest messages, the system
        # messages before them (those always count) and how many messages are stored.
        # (The DELETE and the SELECT see the same snapshot; pending rows are never read.)
        window = (
            "WITH cleared AS (DELETE FROM chatts WHERE appid = %(app)s::text AND pending),"
            " recent AS ("
            " SELECT seq, {role} AS role, message, toolcalls, toolname FROM chatts"
            " WHERE appid = %(app)s::text AND NOT pending ORDER BY seq DESC LIMIT %(window)s),"
            " earlier AS ("
            " SELECT seq, {role} AS role, message, toolcalls, toolname FROM chatts"
            " WHERE appid = %(app)s::text AND NOT pending AND {role} = 'system'"
            " AND seq < (SELECT min(seq) FROM recent))"
        )
        read = (
            " SELECT 0 AS part, seq, role, message, toolcalls, toolname,"
            " (SELECT messages FROM conversation_sizes WHERE appid = %(app)s::text)"
            " FROM (SELECT * FROM recent UNION ALL SELECT * FROM earlier) AS rows"
        )
        # Each statement rendered to text once: psycopg renders a Composed at every execute.
        self._read_window = sql.SQL(window + read + " ORDER BY seq").format(role=role).as_string()
        self._select_page = (
            sql.SQL(
                "SELECT {role}, message, toolcalls, toolname, seq, time::timestamptz FROM chatts"
                " WHERE appid = %s AND NOT pending AND seq > %s ORDER BY seq LIMIT %s"
            )
            .format(role=role)
            .as_string()
        )
        # The rows as one JSON parameter (_rows): psycopg dumps a list parameter element
        # by element in Python and scans it for its type, a third of the statement's CPU.
        rows = (
            " SELECT %(app)s::text, role, message, thinking, toolcalls, toolname, %(pending)s"
            " FROM json_to_recordset(%(rows)s::json) AS given("
            "role text, message text, thinking text, toolcalls text, toolname text)"
        )
        columns = sql.SQL("chatts (appid, {role}, message, thinking, toolcalls, toolname, pending)")
        self._insert = (
            sql.SQL("INSERT INTO {columns}" + rows + " RETURNING seq")
            .format(columns=columns.format(role=role))
            .as_string()
        )
        # The same read, and the request's rows stored pending (the read does not see
        # them: one snapshot): the rows of part 1 are their seqs.
        self._read_and_insert = (
            sql.SQL(
                window
                + ", added AS (INSERT INTO {columns}"
                + rows
                + " RETURNING seq)"
                + read
                + " UNION ALL SELECT 1, seq, NULL, NULL, NULL, NULL, NULL FROM added"
                " ORDER BY part, seq"
            )
            .format(role=role, columns=columns.format(role=role))
            .as_string()
        )
        # A turn's last rows, the earlier ones made part of the conversation, and the
        # count of stored messages: one statement, so all or nothing. It is fenced by the
        # turn's reply number: if another turn has taken the lease since (this one lost
        # it without knowing yet), nothing is written.
        self._complete = (
            sql.SQL(
                "WITH fence AS (SELECT 1 FROM conversation_leases"
                " WHERE appid = %(app)s::text AND replies = %(reply)s),"
                " added AS (INSERT INTO {columns}" + rows + " WHERE EXISTS (SELECT 1 FROM fence)"
                " RETURNING seq),"
                " made AS (UPDATE chatts SET pending = false"
                " WHERE appid = %(app)s::text AND pending"
                " AND seq IN (SELECT value::bigint FROM json_array_elements_text(%(turn)s::json))"
                " AND EXISTS (SELECT 1 FROM fence) RETURNING seq),"
                " sized AS (INSERT INTO conversation_sizes AS size (appid, messages)"
                " SELECT %(app)s::text, (SELECT count(*) FROM added) + (SELECT count(*) FROM made)"
                " WHERE EXISTS (SELECT 1 FROM fence)"
                " ON CONFLICT (appid) DO UPDATE SET messages = size.messages + EXCLUDED.messages)"
                " SELECT EXISTS (SELECT 1 FROM fence)"
            )
            .format(columns=columns.format(role=role))
            .as_string()
        )
        self._count = sql.SQL(
            "INSERT INTO conversation_sizes AS size (appid, messages)"
            " SELECT %(app)s::text, count(*) FROM chatts"
            " WHERE appid = %(app)s::text AND NOT pending"
            " ON CONFLICT (appid) DO UPDATE SET messages = EXCLUDED.messages"
            " RETURNING messages"
        )

    async def record(
        self,
        app_id: str,
        incoming: list[Message],
        device_tools: list[dict[str, Any]] | None,
        window: int,
        *,
        with_tools: bool,
    ) -> Turn:
        """Store a request's messages (and device tools) and read back the conversation.

        Reads the newest `window` stored messages and every system message before them,
        and, on /llmtools, the app's device tools. The caller holds the conversation's
        lease, so pending rows are a dead turn's. The request's rows are stored pending:
        if a later statement fails, the next turn clears them.
        """
        try:
            async with self.pool.connection() as conn:
                if any(message.role == "tool" for message in incoming):
                    # Results of device calls: their names come from the stored calls.
                    history, total = await self._read(conn, app_id, window)
                    incoming = settle_tool_calls(history, incoming)
                    stored = await self._insert_rows(conn, app_id, [(m, None) for m in incoming])
                else:  # the common case: read and store in one round trip
                    history, total, stored = await self._read_and_store(
                        conn, app_id, window, incoming
                    )
                    settled = settle_tool_calls(history, incoming)
                    if len(settled) != len(incoming):  # calls the app left unanswered
                        await self._delete_pending(conn, app_id, stored)
                        incoming = settled  # their results go first
                        stored = await self._insert_rows(
                            conn, app_id, [(m, None) for m in incoming]
                        )
                tools = await self._device_tools(conn, app_id, device_tools) if with_tools else []
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the request: {reason(exc)}") from exc
        return Turn([*history, *incoming], len(incoming), total - len(history), tools, stored)

    async def append(self, app_id: str, messages: list[tuple[Message, str | None]]) -> list[int]:
        """Store a turn's messages, each with the model's thinking (or None); return their seqs."""
        try:
            async with self.pool.connection() as conn:
                return await self._insert_rows(conn, app_id, messages)
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the reply: {reason(exc)}") from exc

    async def complete(
        self,
        app_id: str,
        reply: int,
        messages: list[tuple[Message, str | None]],
        turn: list[int],
    ) -> None:
        """Store a turn's last messages and make the whole turn part of the conversation,
        unless the turn (reply number `reply`) no longer holds the appID's lease."""
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    self._complete,
                    {
                        "app": app_id,
                        "reply": reply,
                        "turn": json.dumps(turn),
                        **_rows(messages, pending=False),
                    },
                )
                fenced = await cursor.fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the reply: {reason(exc)}") from exc
        if not (fenced and fenced[0]):
            raise StoreError(
                "another request for this appID took the conversation over; the reply was"
                " not stored"
            )

    async def remove(self, app_id: str, seqs: list[int]) -> None:
        """Delete the rows a failed turn wrote, so the conversation is as it was before it.

        Only rows still pending: a turn whose last statement did complete it (its answer
        lost on the way back) keeps it whole rather than losing its question.
        """
        if not seqs:
            return
        try:
            async with self.pool.connection() as conn:
                await self._delete_pending(conn, app_id, seqs)
        except psycopg.Error as exc:
            raise StoreError(f"the database could not undo the turn: {reason(exc)}") from exc

    async def status(self) -> dict[str, Any]:
        """Whether the database answers, and how many pooled connections are in use."""
        try:
            async with self.pool.connection(timeout=3) as conn:
                await conn.execute("SELECT 1")
            report: dict[str, Any] = {"reachable": True}
        except psycopg.Error as exc:
            report = {"reachable": False, "error": reason(exc)}
        stats = self.pool.get_stats()
        report["connections_in_use"] = stats["pool_size"] - stats["pool_available"]
        return report

    async def page(self, app_id: str, after: int, limit: int) -> list[StoredMessage]:
        """Up to `limit` messages of the conversation, oldest first, after the seq `after`."""
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(self._select_page, (app_id, after, limit))
                rows = await cursor.fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not read the history: {reason(exc)}") from exc
        return [StoredMessage(_message(row), row[4], row[5]) for row in rows]

    async def has_any(self, app_id: str) -> bool:
        """Whether the appID has any stored message."""
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM chatts WHERE appid = %s AND NOT pending)",
                    (app_id,),
                )
                row = await cursor.fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not read the history: {reason(exc)}") from exc
        return bool(row and row[0])

    async def forget(self, app_id: str) -> None:
        """Delete the conversation, the app's device tools and its kept stream events."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                for table in ("chatts", "device_tools", "stream_events", "conversation_sizes"):
                    await conn.execute(
                        sql.SQL("DELETE FROM {} WHERE appid = %s").format(sql.Identifier(table)),
                        (app_id,),
                    )
        except psycopg.Error as exc:
            raise StoreError(f"the database could not delete it: {reason(exc)}") from exc

    async def _insert_rows(
        self,
        conn: psycopg.AsyncConnection[Any],
        app_id: str,
        messages: list[tuple[Message, str | None]],
    ) -> list[int]:
        """Store messages as pending rows, in one statement; return their seqs, in order."""
        if not messages:
            return []
        cursor = await conn.execute(self._insert, {"app": app_id, **_rows(messages, pending=True)})
        return sorted(row[0] for row in await cursor.fetchall())  # seqs grow row by row

    async def _read(
        self, conn: psycopg.AsyncConnection[Any], app_id: str, window: int
    ) -> tuple[list[Message], int]:
        """The history's window (see _read_window) and how many messages are stored."""
        cursor = await conn.execute(self._read_window, {"app": app_id, "window": window})
        rows = await cursor.fetchall()
        history = [_message(row[2:6]) for row in rows]
        return history, await self._total(conn, app_id, rows)

    async def _read_and_store(
        self, conn: psycopg.AsyncConnection[Any], app_id: str, window: int, incoming: list[Message]
    ) -> tuple[list[Message], int, list[int]]:
        """The history's window, the count, and the seqs of `incoming`, stored pending."""
        cursor = await conn.execute(
            self._read_and_insert,
            {
                "app": app_id,
                "window": window,
                **_rows([(m, None) for m in incoming], pending=True),
            },
        )
        rows = await cursor.fetchall()
        read = [row for row in rows if row[0] == 0]
        history = [_message(row[2:6]) for row in read]
        stored = [row[1] for row in rows if row[0] == 1]  # in order: ORDER BY part, seq
        return history, await self._total(conn, app_id, read), stored

    async def _total(
        self, conn: psycopg.AsyncConnection[Any], app_id: str, read: list[tuple[Any, ...]]
    ) -> int:
        """How many messages are stored, from the window's rows; counted when not yet kept."""
        if not read:
            return 0  # nothing stored: a new conversation
        total = read[0][6]
        if total is None:  # not counted yet: a tutorial's conversation, say
            cursor = await conn.execute(self._count, {"app": app_id})
            total = (await cursor.fetchone() or (0,))[0]
        return total

    async def _delete_pending(
        self, conn: psycopg.AsyncConnection[Any], app_id: str, seqs: list[int]
    ) -> None:
        """Delete those of the rows that are still pending."""
        await conn.execute(
            "DELETE FROM chatts WHERE appid = %s AND seq = ANY(%s) AND pending", (app_id, seqs)
        )

    async def _device_tools(
        self,
        conn: psycopg.AsyncConnection[Any],
        app_id: str,
        declared: list[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        """Store the tools this request declares (the latest of a name wins); return all the
        app's, by name."""
        if declared:
            cursor = await conn.execute(
                "WITH saved AS ("
                " INSERT INTO device_tools (appid, name, declaration)"
                " SELECT %(app)s::text, * FROM unnest(%(names)s::text[], %(tools)s::jsonb[])"
                " ON CONFLICT (appid, name) DO UPDATE SET declaration = EXCLUDED.declaration"
                " RETURNING name, declaration)"
                " SELECT declaration FROM ("
                " SELECT name, declaration FROM saved UNION ALL"
                " SELECT name, declaration FROM device_tools"
                " WHERE appid = %(app)s::text AND name <> ALL(%(names)s)) AS tools ORDER BY name",
                {
                    "app": app_id,
                    "names": [tool["function"]["name"] for tool in latest(declared)],
                    "tools": [Jsonb(storable_json(tool)) for tool in latest(declared)],
                },
            )
        else:
            cursor = await conn.execute(
                "SELECT declaration FROM device_tools WHERE appid = %s ORDER BY name", (app_id,)
            )
        return [row[0] for row in await cursor.fetchall()]


def latest(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One declaration per name: the last one given."""
    return list({tool["function"]["name"]: tool for tool in tools}.values())


def _rows(messages: list[tuple[Message, str | None]], *, pending: bool) -> dict[str, Any]:
    """Messages as the JSON rows the insert statements read (json_to_recordset)."""
    rows = [
        {
            "role": message.role,
            "message": storable(message.content),
            "thinking": storable(thinking) or None,
            "toolcalls": json.dumps(message.tool_calls) if message.tool_calls else None,
            "toolname": storable(message.tool_name),
        }
        for message, thinking in messages
    ]
    return {"rows": json.dumps(rows), "pending": pending}


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, and lone UTF-16 surrogates


def storable(text: str | None) -> str | None:
    """Text as PostgreSQL can hold it: NUL and lone surrogates become U+FFFD.

    Models do write NUL now and then; refusing it would lose the turn. (Tool calls are
    stored as JSON text, where json.dumps writes it as an escape that reads back exactly.)
    """
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return UNSTORABLE.sub("\ufffd", text)


def storable_json(value: Any) -> Any:
    """A JSON value with every string (keys too) made storable, for a jsonb column."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(key): storable_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    return value


def _message(row: tuple[Any, ...]) -> Message:
    role, content, tool_calls, tool_name = row[:4]
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
