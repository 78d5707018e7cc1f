"""Starting chatterd: its command, the embedded PostgreSQL, the schema and its migration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import ROOT, chatterd_env, fresh_schema
from sse import chat_body, post

CHATTERD = str(Path(sys.executable).parent / "chatterd")


def test_chatterd_command_serves_on_embedded_postgres_and_keeps_data(
    start_chatterd, tmp_path, ollama, meteo_standin
):
    data_dir = tmp_path / "data"
    env = {
        "DATABASE_URL": "",
        "CHATTERD_DATA_DIR": str(data_dir),
        "OLLAMA_BASE_URL": ollama.url,
        "OPEN_METEO_URL": f"{meteo_standin.url}/v1/forecast",
    }

    first = start_chatterd(env, command=[CHATTERD])
    with httpx.Client(base_url=first.url, timeout=30) as client:
        assert (
            post(client, "/llmchat", chat_body("edu.umich.embedded", "I live in Ann Arbor")).status
            == 200
        )
    assert first.stop() == 0
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()  # PostgreSQL was stopped

    second = start_chatterd(env, command=[CHATTERD])
    with httpx.Client(base_url=second.url, timeout=30) as client:
        answer = post(
            client, "/llmchat", chat_body("edu.umich.embedded", "In what state do I live?")
        )
    assert answer.text() == "You live in Michigan."


def test_a_bad_setting_stops_chatterd_with_a_clear_message():
    result = subprocess.run(
        [CHATTERD, "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "CHATTERD_DB_POOL_MAX": "ten"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "CHATTERD_DB_POOL_MAX must be a whole number, not 'ten'" in result.stderr


def test_an_unreachable_database_stops_chatterd_with_a_clear_message(start_chatterd, ollama):
    server = start_chatterd(
        {
            "DATABASE_URL": "postgresql://chatterd@127.0.0.1:1/chatterdb",
            "OLLAMA_BASE_URL": ollama.url,
        },
        wait=False,
    )
    assert server.process.wait(60) != 0
    assert "cannot use the database" in server.log()


# Migration of the tutorial's table

TUTORIAL_TABLE = """
    CREATE TABLE chatts (
        {role} varchar(255) NOT NULL,
        message text NOT NULL,
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        time TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        appid varchar(155),
        toolcalls text,
        toolschemas text
    )"""

TUTORIAL_ROWS = [  # written in one transaction, as the tutorial does: all share one `time`
    ("edu.umich.tutorial", "system", "You are terse."),
    ("edu.umich.tutorial", "user", "I live in Ann Arbor"),
    ("edu.umich.other", "user", "Another app's question"),
    ("edu.umich.tutorial", "assistant", "Ann Arbo r is in Michigan."),
    ("edu.umich.tutorial", "user", "Thanks"),
    (None, "user", "A row the tutorial stored without an appID"),
]


@pytest.mark.parametrize("role_column", ["username", "name"])
def test_a_tutorial_table_is_migrated_in_place(
    start_chatterd, server_url, ollama, meteo_standin, role_column
):
    with fresh_schema(server_url, "tutorial") as url:
        with psycopg.connect(url) as conn:
            conn.execute(TUTORIAL_TABLE.format(role=role_column))
            for app, role, message in TUTORIAL_ROWS:
                conn.execute(
                    f"INSERT INTO chatts (appid, {role_column}, message) VALUES (%s, %s, %s)",
                    (app, role, message),
                )
        with psycopg.connect(url) as conn:
            before = conn.execute("SELECT id, appid, message FROM chatts").fetchall()

        for _ in range(2):  # the schema is applied at every start, and twice changes nothing
            server = start_chatterd(chatterd_env(url, ollama.url, meteo_standin.url))
            assert server.stop() == 0

        server = start_chatterd(chatterd_env(url, ollama.url, meteo_standin.url))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answer = post(
                client, "/llmchat", chat_body("edu.umich.tutorial", "In what state do I live?")
            )
        server.stop()

        assert answer.text() == "You live in Michigan."
        sent = [(m["role"], m["content"]) for m in ollama.chats()[-1]["messages"]]
        assert sent == [
            (role, message) for app, role, message in TUTORIAL_ROWS if app == "edu.umich.tutorial"
        ] + [("user", "In what state do I live?")]
        with psycopg.connect(url) as conn:
            after = conn.execute("SELECT id, appid, message FROM chatts").fetchall()
            seqs = conn.execute("SELECT seq FROM chatts ORDER BY seq").fetchall()
            (size,) = conn.execute(
                "SELECT messages FROM conversation_sizes WHERE appid = 'edu.umich.tutorial'"
            ).fetchone()
        assert set(before) <= set(after)
        # The tutorial's rows were counted at the first turn, then the turn's two added.
        assert size == len([app for app, _, _ in TUTORIAL_ROWS if app == "edu.umich.tutorial"]) + 2
        assert len(after) == len(before) + 2
        assert len({seq for (seq,) in seqs}) == len(seqs)  # every row has its own place
