"""The hot path's parsing and framing, for any input (hypothesis): Ollama's NDJSON split into
lines whatever the chunks, SSE events that a standard parser reads back as they were sent,
and the notifications that tell workers of new events, always within PostgreSQL's limit."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

import bus
from eventstream import frame
from ollama import Opened

json_text = st.text(st.characters(codec="utf-8"), max_size=40)
ollama_line = st.fixed_dictionaries(
    {
        "model": json_text,
        "created_at": st.just("2026-11-22T12:00:00.123456789Z"),
        "message": st.fixed_dictionaries(
            {"role": st.just("assistant"), "content": json_text},
            optional={"thinking": json_text},
        ),
        "done": st.booleans(),
    }
).map(lambda line: json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode())


async def chunks(data: bytes, cuts: list[int]):
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            yield data[start:cut]
            start = cut


def lines_of(data: bytes, cuts: list[int]) -> list[bytes]:
    """What Opened.lines() hands on, for `data` arriving cut at `cuts`."""

    async def read() -> list[bytes]:
        pieces = chunks(data, cuts)
        first = await anext(pieces)
        response = SimpleNamespace(connection=None)  # aiohttp's, once all of it is in
        return [line async for line in Opened(response, pieces, first, 1.0).lines()]  # type: ignore[arg-type]

    return asyncio.run(read())


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(ollama_line, min_size=1, max_size=8), data=st.data())
def test_ndjson_cut_at_any_byte_gives_the_same_lines(lines, data):
    body = b"".join(line + b"\n" for line in lines)
    cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=12, unique=True))
    assert lines_of(body, cuts) == lines


@settings(max_examples=50, deadline=None)
@given(lines=st.lists(ollama_line, min_size=1, max_size=4))
def test_a_last_line_without_its_newline_is_still_a_line(lines):
    body = b"\n".join(lines)
    assert lines_of(body, []) == lines


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 10**18 - 1),
            st.none() | st.sampled_from(["queued", "context", "tool_calls", "error"]),
            ollama_line,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_sse_framing_reads_back_with_a_standard_parser(events):
    body = b"".join(frame(*event) for event in events)
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    parsed = list(EventSource(response).iter_sse())
    assert [(e.id, e.event, e.data) for e in parsed] == [
        (str(event_id), name or "message", data.decode()) for event_id, name, data in events
    ]


@settings(max_examples=100, deadline=None)
@given(app_ids=st.lists(st.text(min_size=1, max_size=155), max_size=400))
def test_new_event_notices_stay_under_postgresqls_payload_limit(app_ids):
    sent = bus.messages("events", app_ids)
    assert all(len(message.encode()) < 8000 for message in sent)
    told = [key for message in sent for key in json.loads(message.partition(" ")[2])]
    assert told == app_ids
