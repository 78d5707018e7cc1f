"""The history store, used directly against the real PostgreSQL.

The routes' tests cover what the store keeps and sends. Here is what a route cannot make
happen on purpose: many turns' reads, or many turns' writes, asked for in the same
instant, which the store sends as one statement each (`together.Together`), and one turn
of such a batch that the database refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import database
from database import StoreError
from history import History, Turn
from ollama import Message
from sse import refusing, stored


def stored_conversation(app: str, turns: int) -> list[tuple[str, str]]:
    """A system message, then `turns` questions and answers, each naming the app."""
    rows = [("system", f"You are {app}.")]
    for turn in range(turns):
        rows += [("user", f"question {turn} of {app}"), ("assistant", f"answer {turn} of {app}")]
    return rows


def new_question(app: str) -> list[Message]:
    return [Message("user", f"new to {app}")]


def leases_at(db: psycopg.Connection, replies: dict[str, int]) -> None:
    """The leases' rows as the apps' last takes left them: each appID's reply number."""
    for app, reply in replies.items():
        db.execute(
            "INSERT INTO conversation_leases (appid, holder, expires, replies)"
            " VALUES (%s, gen_random_uuid(), 'infinity', %s)",
            (app, reply),
        )


async def read_together(store: History, apps: list[str]) -> list[Turn]:
    """Every app's conversation with a new question, all asked for at once."""
    return await asyncio.gather(
        *(store.record(app, new_question(app), None, with_tools=False) for app in apps)
    )


def turns_together(apps: list[str], reply: int) -> Callable[[History], Awaitable[list[Any]]]:
    """A scenario: every app's turn (reply number `reply`) read, then stored with an
    answer, all at once; the outcome of each store (None, or what it raised)."""

    async def scenario(store: History) -> list[Any]:
        turns = await read_together(store, apps)
        return await asyncio.gather(
            *(
                store.complete(app, reply, turn, [(Message("assistant", f"reply to {app}"), None)])
                for app, turn in zip(apps, turns, strict=True)
            ),
            return_exceptions=True,
        )

    return scenario


def with_store(
    database_url: str, window: int, scenario: Callable[[History], Awaitable[Any]]
) -> Any:
    """Run `scenario` with a History on a pool of its own, as chatterd would."""

    async def run() -> Any:
        role_column = await database.apply_schema(database_url)
        async with AsyncConnectionPool(
            database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool:
            return await scenario(History(pool, role_column, window))

    return asyncio.run(run())


@pytest.fixture
def conversations(
    database_url: str, db: psycopg.Connection, app_id: str
) -> dict[str, list[tuple[str, str]]]:
    """Ten apps' conversations of growing length, stored as the tutorial did (not counted)."""
    asyncio.run(database.apply_schema(database_url))  # the tables, when run on its own
    apps = [f"{app_id}.{number}" for number in range(10)]
    conversations = {app: stored_conversation(app, number) for number, app in enumerate(apps)}
    for app, rows in conversations.items():
        for role, content in rows:
            db.execute(
                "INSERT INTO chatts (appid, username, message) VALUES (%s, %s, %s)",
                (app, role, content),
            )
    return conversations


def test_reads_asked_for_together_each_get_their_own_conversation(
    database_url: str,
    db: psycopg.Connection,
    conversations: dict[str, list[tuple[str, str]]],
    app_id: str,
) -> None:
    apps = [*conversations, f"{app_id}.new"]  # the last has nothing stored yet
    for app in list(conversations)[::2]:  # every other one counted, as chatterd keeps them
        db.execute(
            "INSERT INTO conversation_sizes (appid, messages) VALUES (%s, %s)",
            (app, len(conversations[app])),
        )

    turns = with_store(database_url, 3, lambda store: read_together(store, apps))

    for app, turn in zip(apps, turns, strict=True):
        rows = conversations.get(app, [])
        # The newest three (the window), and the system message before them.
        expected = [rows[0], *rows[-3:]] if len(rows) > 3 else rows
        read = [(message.role, message.content) for message in turn.history]
        assert read == [*expected, ("user", f"new to {app}")]
        assert turn.new == 1
        assert turn.unread == len(rows) - len(expected)


def test_turns_stored_together_are_each_stored_whole_unless_their_lease_moved_on(
    database_url: str,
    db: psycopg.Connection,
    conversations: dict[str, list[tuple[str, str]]],
) -> None:
    apps = list(conversations)
    moved_on = apps[-1]  # its turn lost the lease: another turn (reply 4) has it now
    leases_at(db, {app: 4 if app == moved_on else 3 for app in apps})

    outcomes = dict(zip(apps, with_store(database_url, 3, turns_together(apps, 3)), strict=True))

    for app in apps[:-1]:
        assert outcomes[app] is None
        assert stored(db, app) == [
            *conversations[app],
            ("user", f"new to {app}"),
            ("assistant", f"reply to {app}"),
        ]
    assert isinstance(outcomes[moved_on], StoreError)
    assert "took the conversation over" in str(outcomes[moved_on])
    assert stored(db, moved_on) == conversations[moved_on]
    sizes = dict(
        db.execute(
            "SELECT appid, messages FROM conversation_sizes WHERE appid = ANY(%s)", (apps,)
        ).fetchall()
    )
    # Counted at the turn's start (the tutorial's rows), then each stored turn's two added.
    assert sizes == {
        app: len(rows) + (0 if app == moved_on else 2) for app, rows in conversations.items()
    }


def test_a_turn_the_database_refuses_is_the_only_one_of_its_batch_lost(
    database_url: str,
    db: psycopg.Connection,
    conversations: dict[str, list[tuple[str, str]]],
) -> None:
    apps = list(conversations)
    refused = apps[3]
    moved_on = apps[5]  # tried again on its own, it is still fenced out
    leases_at(db, {app: 2 if app == moved_on else 1 for app in apps})

    with refusing(db, "chatts", refused):
        outcomes = dict(
            zip(apps, with_store(database_url, 3, turns_together(apps, 1)), strict=True)
        )

    assert isinstance(outcomes[refused], StoreError)
    assert "could not store the reply" in str(outcomes[refused])
    assert stored(db, refused) == conversations[refused]
    assert "took the conversation over" in str(outcomes[moved_on])
    assert stored(db, moved_on) == conversations[moved_on]
    for app in apps:
        if app not in (refused, moved_on):
            assert outcomes[app] is None
            assert stored(db, app)[-2:] == [
                ("user", f"new to {app}"),
                ("assistant", f"reply to {app}"),
            ]
