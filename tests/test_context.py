"""The context budget: what part of a long history goes to the model, and telling the client."""

from __future__ import annotations

import json

import httpx
import pytest

import budget
from budget import Budget
from conftest import chatterd_env
from ollama import Message
from sse import Streaming, chat_body, post
from standins import Stream, chat_line, done_line, text_stream, tool_call

MODEL = "qwen3:0.6b"


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str) -> Message:
    return Message("assistant", text)


def calls(name: str) -> Message:
    return Message("assistant", "", tool_calls=[tool_call(name, {})])


def result(name: str) -> Message:
    return Message("tool", "done", tool_name=name)


def contents(messages: list[Message]) -> list[str]:
    """Each message as role:text, a tool call as the name of the tool it calls."""
    return [
        f"{m.role}:{m.content or m.tool_name or m.tool_calls[0]['function']['name']}"
        for m in messages
    ]


# The rules, on the function that applies them.


def test_a_history_within_the_budget_is_sent_whole():
    history = [Message("system", "be brief"), user("a"), assistant("b"), user("c")]

    fitted = budget.fit(history, new=1, budget=Budget(10, 1000))

    assert fitted.messages == history and fitted.omitted == 0


def test_system_messages_and_the_newest_messages_are_kept():
    history = [Message("system", "be brief"), user("a"), assistant("b"), user("c"), assistant("d")]

    fitted = budget.fit([*history, user("e")], new=1, budget=Budget(4, 1000))

    assert contents(fitted.messages) == ["system:be brief", "user:c", "assistant:d", "user:e"]
    assert fitted.omitted == 2


def test_a_trimmed_history_starts_at_a_user_message():
    history = [user("a"), assistant("b"), user("c"), assistant("d")]

    fitted = budget.fit([*history, user("e")], new=1, budget=Budget(4, 1000))

    assert contents(fitted.messages) == ["user:c", "assistant:d", "user:e"]


def test_a_tool_call_is_never_separated_from_its_result():
    history = [user("a"), calls("get_weather"), result("get_weather"), assistant("b")]

    fitted = budget.fit([*history, user("c")], new=1, budget=Budget(3, 1000))

    # Keeping the result without its call would be invalid, so both go.
    assert contents(fitted.messages) == ["user:c"]
    assert fitted.omitted == 4


def test_a_result_this_request_brings_keeps_the_call_it_answers():
    history = [user("a"), assistant("b"), user("where?"), calls("get_location")]

    fitted = budget.fit([*history, result("get_location")], new=1, budget=Budget(3, 1000))

    assert contents(fitted.messages) == ["user:where?", "assistant:get_location", "tool:done"]


def test_the_token_budget_counts_too():
    history = [user("x" * 400), assistant("y" * 400), user("short"), assistant("ok")]

    fitted = budget.fit([*history, user("z")], new=1, budget=Budget(100, 60))

    assert contents(fitted.messages) == ["user:short", "assistant:ok", "user:z"]


def test_the_request_messages_always_go_even_over_the_budget():
    fitted = budget.fit([user("a"), user("x" * 4000)], new=1, budget=Budget(1, 10))

    assert contents(fitted.messages) == [f"user:{'x' * 4000}"]


# Through chatterd, with a small budget.


@pytest.fixture(scope="module")
def small_budget(module_chatterd, database_url, ollama_standin, meteo_standin):
    env = {
        **chatterd_env(database_url, ollama_standin.url, meteo_standin.url),
        "CHATTERD_HISTORY_MAX_MESSAGES": "4",
    }
    server = module_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_the_model_gets_the_newest_messages_and_the_client_is_told(
    small_budget, ollama, db, app_id
):
    post(small_budget, "/llmchat", chat_body(app_id, "Answer briefly.", role="system"))
    for question in ("one", "two", "three"):
        post(small_budget, "/llmchat", chat_body(app_id, question))
    ollama.reset()

    answer = post(small_budget, "/llmchat", chat_body(app_id, "four"))

    sent = ollama.chats()[0]["messages"]
    assert [m["content"] for m in sent] == [
        "Answer briefly.",
        "three",
        "You said: three",
        "four",
    ]
    (notice,) = answer.named("context")
    trimmed = notice.json()["trimmed"]
    assert trimmed["by"] == "chatterd"
    assert trimmed["omitted_messages"] == 5 and trimmed["sent_messages"] == 4
    # An app that doesn't know the event decodes it as an Ollama line with no content.
    assert notice.json()["model"] == "gemma3:270m" and "created_at" in notice.json()
    assert notice.json()["message"] == {"role": "assistant", "content": ""}
    assert answer.events[0].event == "context"  # before the reply, after Ollama accepted
    stored = db.execute("SELECT count(*) FROM chatts WHERE appid = %s", (app_id,)).fetchone()[0]
    assert stored == 10  # the history itself is kept whole


def test_nothing_is_said_when_nothing_is_left_out(client, app_id):
    answer = post(client, "/llmchat", chat_body(app_id, "hello"))

    assert answer.named("context") == []


def test_turns_that_start_together_each_read_their_own_conversation(
    small_budget, ollama, db, app_id
):
    """Twelve apps' turns start side by side (their histories are read together when they
    come while a read is under way: tests/test_history.py): each gets its own newest
    messages, its own system message, and its own count of what was left out."""
    apps = [f"{app_id}.{number}" for number in range(12)]
    conversations = {
        app: [("system", f"You are {app}.")]
        + [
            (role, f"{role} {turn} of {app}")
            for turn in range(2 + number)
            for role in ("user", "assistant")
        ]
        for number, app in enumerate(apps)
    }
    for app, rows in conversations.items():  # stored as the tutorial did: never counted
        for role, content in rows:
            db.execute(
                "INSERT INTO chatts (appid, username, message) VALUES (%s, %s, %s)",
                (app, role, content),
            )
    ollama.reset()

    base_url = str(small_budget.base_url)
    turns = {app: Streaming(base_url, "/llmchat", chat_body(app, f"new to {app}")) for app in apps}

    for turn in turns.values():
        assert turn.finish().status == 200

    asked = {chat["messages"][-1]["content"]: chat["messages"] for chat in ollama.chats()}
    for app, turn in turns.items():
        rows = conversations[app]
        sent = [(m["role"], m["content"]) for m in asked[f"new to {app}"]]
        assert sent == [rows[0], *rows[-2:], ("user", f"new to {app}")]
        (notice,) = turn.named("context")
        trimmed = notice.json()["trimmed"]
        assert trimmed["omitted_messages"] == len(rows) - 3
        assert trimmed["sent_messages"] == 4


def test_a_refusal_stays_an_http_status_when_the_history_was_trimmed(small_budget, app_id):
    for question in ("one", "two", "three"):
        post(small_budget, "/llmchat", chat_body(app_id, question))

    answer = post(small_budget, "/llmchat", chat_body(app_id, "four", model="missing:1b"))

    assert answer.status == 404


def test_the_client_is_told_when_ollama_cut_the_prompt(client, ollama, app_id):
    """Over the context window (`options.num_ctx`), Ollama cuts from the front without a word."""
    ollama.script = lambda received: Stream(
        [chat_line(MODEL, "ok"), done_line(MODEL, prompt_eval_count=128)]
    )
    long_question = "word " * 400  # about 500 tokens

    answer = post(client, "/llmchat", chat_body(app_id, long_question, options={"num_ctx": 128}))

    (notice,) = answer.named("context")
    assert notice.json()["trimmed"] == {
        "by": "ollama",
        "prompt_eval_count": 128,
        "num_ctx": 128,
        "estimated_tokens": budget.approx_tokens(Message("user", long_question)),
    }
    assert [e.event for e in answer.events][-2:] == ["context", "message"]  # before the done line


def test_the_token_budget_follows_the_requests_num_ctx(client, ollama, app_id):
    for question in ("a" * 400, "b" * 400, "c"):
        post(client, "/llmchat", chat_body(app_id, question))
    ollama.reset()
    ollama.script = lambda received: text_stream(MODEL, "ok")

    # num_ctx 200: about 150 tokens for the history, so the 400-character messages go.
    answer = post(client, "/llmchat", chat_body(app_id, "d", options={"num_ctx": 200}))

    sent = ollama.chats()[0]["messages"]
    assert [m["content"] for m in sent] == ["c", "You said: c", "d"]
    assert json.loads(answer.named("context")[0].data)["trimmed"]["omitted_messages"] == 4
