"""The history store: each app's conversation and declared device tools, in PostgreSQL.

Every method takes a pooled connection for its own statements and gives it back before
returning, so no connection is ever held while the model is talking.

A turn is read at its start (`record`) and written only when it completes (`complete`):
the request's messages and every row of the reply, in one statement, so a turn that fails
or dies leaves nothing to undo. (Rows marked `pending`, which earlier versions wrote
while a turn ran, are never read as history, and the next turn removes them.)
"""

from __future__ import annotations

import asyncio
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
from together import Asked, Together


@dataclass
class Turn:
    """A conversation as it stands with a request's messages, which are not stored yet."""

    history: list[Message]  # the newest stored messages, then this request's
    new: int  # how many of them are this request's (the last ones)
    unread: int  # older stored messages left unread: beyond the window asked for
    device_tools: list[dict[str, Any]]
    asked_at: datetime  # the database's time when the request was read: its rows' `time`

    @property
    def asked(self) -> list[Message]:
        """The request's messages, as they are stored (tool calls settled)."""
        return self.history[len(self.history) - self.new :]


@dataclass
class StoredMessage:
    message: Message
    seq: int  # its place in the conversation
    created_at: datetime


# A conversation's stored window, as read: its rows (appid, seq, role, message, toolcalls,
# toolname), the kept count of stored messages (None if not counted yet), and the time.
Window = tuple[list[tuple[Any, ...]], int | None, datetime]

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
    """The store's statements. A turn costs two round trips: one to read the history (one
    more on /llmtools, which also stores and reads the device tools), and one to store
    the whole turn once it is over, however many tool rounds it took. Both are shared
    with the turns that start, or end, at the same time."""

    def __init__(self, pool: AsyncConnectionPool, role_column: str, window: int) -> None:
        self.pool = pool
        self.window = window  # how many of the newest messages a turn reads
        role = sql.Identifier(role_column)
        # The turns that start together read their conversations in one statement
        # (`Together`): in a burst of hundreds, each read's own wait for one of the pool's
        # connections cost more than the read itself. For each appID: clear a dead
        # turn's pending rows, and read the newest messages and the system messages
        # before them (those always count). (The DELETE and the SELECT see the same
        # snapshot; pending rows are never read.)
        window_of_each = (
            "WITH apps AS (SELECT DISTINCT appid FROM unnest(%(apps)s::text[]) AS appid),"
            " cleared AS (DELETE FROM chatts WHERE appid = ANY(%(apps)s::text[]) AND pending),"
            " recent AS (SELECT apps.appid, newest.* FROM apps, LATERAL ("
            " SELECT seq, {role} AS role, message, toolcalls, toolname FROM chatts"
            " WHERE chatts.appid = apps.appid AND NOT pending"
            " ORDER BY seq DESC LIMIT %(window)s) AS newest),"
            " earlier AS (SELECT bounds.appid, system.* FROM ("
            " SELECT appid, min(seq) AS first FROM recent GROUP BY appid) AS bounds, LATERAL ("
            " SELECT seq, {role} AS role, message, toolcalls, toolname FROM chatts"
            " WHERE chatts.appid = bounds.appid AND NOT pending AND {role} = 'system'"
            " AND seq < bounds.first) AS system)"
        )
        # Then one more row per appID, its last (its seq is NULL): the kept count of
        # stored messages, and the time, which the request's rows get when they are
        # stored (`time`'s default, were they stored now).
        read = (
            " SELECT appid, seq, role, message, toolcalls, toolname, NULL::bigint,"
            " NULL::timestamp FROM recent"
            " UNION ALL SELECT appid, seq, role, message, toolcalls, toolname, NULL, NULL"
            " FROM earlier"
            " UNION ALL SELECT apps.appid, NULL, NULL, NULL, NULL, NULL, sizes.messages,"
            " localtimestamp FROM apps LEFT JOIN conversation_sizes AS sizes USING (appid)"
            " ORDER BY 1, 2"
        )
        # Each statement rendered to text once: psycopg renders a Composed at every execute.
        self._read_windows = sql.SQL(window_of_each + read).format(role=role).as_string()
        self._select_page = (
            sql.SQL(
                "SELECT {role}, message, toolcalls, toolname, seq, time::timestamptz FROM chatts"
                " WHERE appid = %s AND NOT pending AND seq > %s ORDER BY seq LIMIT %s"
            )
            .format(role=role)
            .as_string()
        )
        # The turns that end together are stored together too (`Together`), each turn
        # all or nothing: its rows, and its count of stored messages. The rows come as one
        # JSON parameter (_rows): psycopg dumps a list parameter element by element in
        # Python, a third of the statement's CPU. A turn's rows get growing seqs in their
        # order (`n`). Each turn is fenced by its reply number: if another turn has taken
        # the lease since (this one lost it without knowing yet), its rows are not written.
        self._store_turns = (
            sql.SQL(
                "WITH given AS (SELECT * FROM json_to_recordset(%(rows)s::json) AS given("
                "appid text, reply bigint, n int, role text, message text, thinking text,"
                " toolcalls text, toolname text, time timestamp)),"
                " fenced AS (SELECT DISTINCT appid, reply FROM given WHERE EXISTS ("
                " SELECT 1 FROM conversation_leases AS lease"
                " WHERE lease.appid = given.appid AND lease.replies = given.reply)),"
                " added AS (INSERT INTO chatts"
                " (appid, {role}, message, thinking, toolcalls, toolname, time)"
                " SELECT appid, role, message, thinking, toolcalls, toolname,"
                " coalesce(time, localtimestamp)"
                " FROM given JOIN fenced USING (appid, reply) ORDER BY n RETURNING appid),"
                " sized AS (INSERT INTO conversation_sizes AS size (appid, messages)"
                " SELECT appid, count(*) FROM added GROUP BY appid"
                " ON CONFLICT (appid) DO UPDATE SET messages = size.messages + EXCLUDED.messages)"
                " SELECT appid, reply FROM fenced"
            )
            .format(role=role)
            .as_string()
        )
        self._count = sql.SQL(
            "INSERT INTO conversation_sizes AS size (appid, messages)"
            " SELECT %(app)s::text, count(*) FROM chatts"
            " WHERE appid = %(app)s::text AND NOT pending"
            " ON CONFLICT (appid) DO UPDATE SET messages = EXCLUDED.messages"
            " RETURNING messages"
        )
        self._reads = Together(self._read_all)
        self._stores = Together(self._store_all)

    async def record(
        self,
        app_id: str,
        incoming: list[Message],
        device_tools: list[dict[str, Any]] | None,
        *,
        with_tools: bool,
    ) -> Turn:
        """Read the conversation, with a request's messages after it (and store the device
        tools the request declares).

        Reads the newest `window` stored messages and every system message before them,
        and, on /llmtools, the app's device tools. The caller holds the conversation's
        lease, so pending rows are a dead turn's of an earlier version: they are removed.
        The request's messages are stored with the turn (`complete`).
        """
        read, kept, asked_at = await self._reads.ask(app_id)
        uncounted = bool(read) and kept is None  # a tutorial's conversation, say
        tools: list[dict[str, Any]] = []
        if uncounted or with_tools:
            try:
                async with self.pool.connection() as conn:
                    if uncounted:
                        kept = await self._count_stored(conn, app_id)
                    if with_tools:
                        tools = await self._device_tools(conn, app_id, device_tools)
            except psycopg.Error as exc:
                raise StoreError(f"the database could not read the history: {reason(exc)}") from exc
        total = (kept or 0) if read else 0  # nothing read: a new conversation
        history = [_message(row[2:6]) for row in read]
        # Results of device calls get their names from the stored calls; calls the app
        # left unanswered get a result saying so.
        asked = settle_tool_calls(history, incoming)
        return Turn([*history, *asked], len(asked), total - len(history), tools, asked_at)

    async def complete(
        self, app_id: str, reply: int, turn: Turn, messages: list[tuple[Message, str | None]]
    ) -> None:
        """Store a turn: the request's messages, then the turn's `messages`, each with the
        model's thinking (or None); unless the turn (reply number `reply`) no longer holds
        the appID's lease."""
        rows = [(message, None, turn.asked_at) for message in turn.asked]
        rows += [(message, thinking, None) for message, thinking in messages]
        stored = await self._stores.ask(app_id, _rows(app_id, reply, rows))
        if stored != reply:
            raise StoreError(
                "another request for this appID took the conversation over; the reply was"
                " not stored"
            )

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

    async def _read_all(self, asked: Asked) -> dict[str, Window]:
        """The stored window of each of these appIDs' conversations."""
        app_ids = [app_id for app_id, _ in asked]
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    self._read_windows, {"apps": app_ids, "window": self.window}
                )
                rows = await cursor.fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"the database could not read the history: {reason(exc)}") from exc
        windows: dict[str, Window] = {}
        read: list[tuple[Any, ...]] = []
        for row in rows:
            if row[1] is None:  # the appID's last row: its count and the time
                windows[row[0]] = (read, row[6], row[7])
                read = []
            else:
                read.append(row)
        return windows

    async def _store_all(self, asked: Asked) -> dict[str, int | Exception]:
        """Store these turns (each its rows, as _rows gives them); the reply number of each
        appID whose turn was stored.

        If the database refuses the statement (not a lost connection or a timeout, which
        are every turn's), perhaps for one turn's rows, each turn is tried on its own, so
        that only a turn whose rows it refuses is lost (its StoreError is its answer).
        """
        try:
            return await self._store_turns_of(asked)
        except StoreError as exc:
            if len(asked) == 1 or isinstance(exc.__cause__, psycopg.OperationalError):
                raise
        alone = await asyncio.gather(
            *(self._store_turns_of([turn]) for turn in asked), return_exceptions=True
        )
        answers: dict[str, int | Exception] = {}
        for (app_id, _), outcome in zip(asked, alone, strict=True):
            answers[app_id] = outcome if isinstance(outcome, Exception) else outcome.get(app_id)
        return answers

    async def _store_turns_of(self, asked: Asked) -> dict[str, int]:
        rows = json.dumps([row for _, turn_rows in asked for row in turn_rows])
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(self._store_turns, {"rows": rows})
                return dict(await cursor.fetchall())
        except psycopg.Error as exc:
            raise StoreError(f"the database could not store the reply: {reason(exc)}") from exc

    async def _count_stored(self, conn: psycopg.AsyncConnection[Any], app_id: str) -> int:
        """Count the conversation's stored messages, and keep the count."""
        cursor = await conn.execute(self._count, {"app": app_id})
        return (await cursor.fetchone() or (0,))[0]

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


def _rows(
    app_id: str, reply: int, rows: list[tuple[Message, str | None, datetime | None]]
) -> list[dict[str, Any]]:
    """A turn's rows (a message, its thinking, its time or None for now) as the JSON the
    statement reads (json_to_recordset)."""
    return [
        {
            "appid": app_id,
            "reply": reply,
            "n": n,
            "role": message.role,
            "message": storable(message.content),
            "thinking": storable(thinking) or None,
            "toolcalls": json.dumps(message.tool_calls) if message.tool_calls else None,
            "toolname": storable(message.tool_name),
            "time": time.isoformat() if time else None,
        }
        for n, (message, thinking, time) in enumerate(rows)
    ]


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
