"""The history store, used directly against the real PostgreSQL.

The routes' tests cover what the store keeps and sends. Here is what a route cannot make
happen on purpose: many turns' reads asked for in the same instant, which the store
sends as one statement (`together.Together`).
"""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import AsyncConnectionPool

import database
from history import History, Turn
from ollama import Message


def stored_conversation(app: str, turns: int) -> list[tuple[str, str]]:
    """A system message, then `turns` questions and answers, each naming the app."""
    rows = [("system", f"You are {app}.")]
    for turn in range(turns):
        rows += [("user", f"question {turn} of {app}"), ("assistant", f"answer {turn} of {app}")]
    return rows


async def record_together(database_url: str, apps: list[str], window: int) -> list[Turn]:
    """Read every app's conversation with a new question, all asked for at once."""
    role_column = await database.apply_schema(database_url)  # as chatterd does at start
    async with AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    ) as pool:
        store = History(pool, role_column, window)
        return await asyncio.gather(
            *(
                store.record(app, [Message("user", f"new to {app}")], None, with_tools=False)
                for app in apps
            )
        )


def test_reads_asked_for_together_each_get_their_own_conversation(
    database_url: str, db: psycopg.Connection, app_id: str
) -> None:
    asyncio.run(database.apply_schema(database_url))  # the tables, when run on its own
    apps = [f"{app_id}.{number}" for number in range(10)]
    conversations = {app: stored_conversation(app, number) for number, app in enumerate(apps)}
    for app, rows in conversations.items():
        for role, content in rows:
            db.execute(
                "INSERT INTO chatts (appid, username, message) VALUES (%s, %s, %s)",
                (app, role, content),
            )
    new_app = f"{app_id}.new"  # nothing stored yet

    turns = asyncio.run(record_together(database_url, [*apps, new_app], window=3))

    for app, turn in zip(apps, turns[:-1], strict=True):
        rows = conversations[app]
        # The newest three (the window), and the system message before them.
        expected = [rows[0], *rows[-3:]] if len(rows) > 3 else rows
        read = [(message.role, message.content) for message in turn.history]
        assert read == [*expected, ("user", f"new to {app}")]
        assert turn.new == 1
        assert turn.unread == len(rows) - len(expected)
    new_turn = turns[-1]
    assert [(m.role, m.content) for m in new_turn.history] == [("user", f"new to {new_app}")]
    assert new_turn.unread == 0
