"""Generated bodies thrown at every route: never a 5xx, never a stack trace, always JSON errors."""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse import parse_events

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same bodies on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text with what breaks naive servers: NUL, lone surrogates, control and non-ASCII characters.
awkward_text = st.text(
    st.characters(codec=None, exclude_categories=()) | st.sampled_from(["\x00", "\ud800", "\n"]),
    max_size=20,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | awkward_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(awkward_text, children, max_size=3)
    ),
    max_leaves=10,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | json_values,
        "content": awkward_text | json_values,
    },
    optional={"tool_name": awkward_text | json_values},
)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function") | json_values,
        "function": st.fixed_dictionaries(
            {"name": awkward_text | json_values},
            optional={"description": awkward_text, "parameters": st.none() | json_values},
        ),
    }
)
chat_body = st.fixed_dictionaries(
    {},
    optional={
        "appID": st.text(max_size=160) | awkward_text | json_values,
        "model": st.sampled_from(["gemma3:270m", "missing:1b", ""]) | json_values,
        "messages": st.lists(message | json_values, max_size=4) | json_values,
        "tools": st.lists(tool | json_values, max_size=3) | json_values,
        "options": json_values,
        "format": json_values,
        "keep_alive": json_values,
        "think": json_values,
    },
)
prompt_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["gemma3:270m", "missing:1b"]) | json_values,
        "prompt": awkward_text | json_values,
        "stream": json_values,
    },
)
weather_body = st.fixed_dictionaries(
    {},
    optional={
        "lat": st.floats() | awkward_text | json_values,
        "lon": st.floats() | awkward_text | json_values,
    },
)


def encode(body: object) -> bytes:
    # ensure_ascii keeps lone surrogates sendable, as \ud800 escapes, the way apps could send them
    return json.dumps(body).encode()


def check(response) -> None:
    assert response.status_code < 500, response.text
    text = response.text
    for leak in ("Traceback", 'File "', "psycopg", "/work/", "site-packages"):
        assert leak not in text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert isinstance(error, str) and error
    elif response.status_code == 204:
        assert response.content == b""
    elif response.headers["content-type"].startswith("text/event-stream"):
        for event in parse_events(text):
            json.loads(event.data)


@SETTINGS
@given(body=chat_body | json_values)
def test_llmchat_survives_any_body(client, ollama, body):
    check(client.post("/llmchat", content=encode(body)))


@SETTINGS
@given(body=chat_body | json_values)
def test_llmtools_survives_any_body(client, ollama, meteo, body):
    check(client.post("/llmtools", content=encode(body)))


@SETTINGS
@given(body=prompt_body | json_values)
def test_llmprompt_survives_any_body(client, ollama, body):
    check(client.post("/llmprompt", content=encode(body)))


@SETTINGS
@given(
    body=weather_body | json_values,
    query=st.dictionaries(
        st.sampled_from(["lat", "lon", "x"]), awkward_text.filter(lambda t: "\ud800" not in t)
    ),
)
def test_weather_survives_any_body_or_query(client, meteo, body, query):
    check(client.request("GET", "/weather", content=encode(body), params=query))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_any_bytes_get_an_answer(client, ollama, raw):
    for path in ("/llmchat", "/llmtools", "/llmprompt"):
        check(client.post(path, content=raw))


# Text a URL can carry: lone surrogates cannot be encoded as UTF-8 at all.
query_text = awkward_text.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t))


@SETTINGS
@given(
    app_id=query_text,
    last_event_id=st.none()
    | st.text(st.characters(min_codepoint=32, max_codepoint=126)).map(str.strip),
    path=st.sampled_from(["/llmchat", "/llmtools"]),
)
def test_resume_survives_any_app_id_and_last_event_id(client, app_id, last_event_id, path):
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    check(client.get(path, params={"appID": app_id}, headers=headers))


@SETTINGS
@given(
    app_id=query_text.filter(lambda t: t.strip("/.") != ""),
    query=st.dictionaries(st.sampled_from(["limit", "after", "x"]), query_text),
)
def test_conversations_survive_any_app_id_and_query(client, app_id, query):
    check(client.get(f"/conversations/{quote(app_id, safe='')}", params=query))
    check(client.delete(f"/conversations/{quote(app_id, safe='')}"))
