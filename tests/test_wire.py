"""The hot path's parsing and framing, for any input (hypothesis): Ollama's chunked answer
undone and its NDJSON split into lines wherever the bytes are cut, SSE events that a
standard parser reads back as they were sent, and the notifications that tell workers of
new events, always within PostgreSQL's limit."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

import bus
from eventstream import frame
from ollama import Opened, Silence
from ollama_http import ChunkedBody, Connection, Connections, ProtocolError

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


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` as it may arrive from a socket: in pieces, cut at `cuts`."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds) if end > start]


def chunked(payload: bytes, sizes: list[int]) -> bytes:
    """`payload` framed as `Transfer-Encoding: chunked`, in chunks of about these sizes."""
    framed, start = b"", 0
    for size in [*sizes, len(payload)]:
        piece = payload[start : start + max(size, 1)]
        if piece:
            framed += b"%x\r\n%s\r\n" % (len(piece), piece)
        start += len(piece)
    return framed + b"0\r\n\r\n"


def lines_of(data: bytes, cuts: list[int]) -> list[bytes]:
    """What Opened.lines() hands on, for a chunked answer carrying `data` that arrives cut
    at `cuts`: each piece fed to the connection as its transport would, one at a time."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(data, [7])

    async def read() -> list[bytes]:
        connection = Connection(asyncio.get_running_loop())

        async def arrive() -> None:
            for piece in cut(answer, [c % len(answer) for c in cuts]):
                connection.data_received(piece)
                await asyncio.sleep(0)  # the reader takes what came

        arriving = asyncio.create_task(arrive())
        await connection.head()
        first = await connection.read()
        silence = Silence(connection, 10.0)
        opened = Opened(Connections("http://127.0.0.1:9", limit=1), connection, first, silence)
        try:
            return [line async for line in opened.lines()]
        finally:
            silence.cancel()
            await arriving

    return asyncio.run(read())


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300), data=st.data())
def test_a_chunked_answer_cut_at_any_byte_gives_back_its_payload(payload, data):
    sizes = data.draw(st.lists(st.integers(1, 64), max_size=8))
    framed = chunked(payload, sizes)
    cuts = data.draw(st.lists(st.integers(1, len(framed) - 1), max_size=12, unique=True))
    body = ChunkedBody()
    pieces = [piece for part in cut(framed, cuts) for piece in body.feed(part)]
    assert b"".join(pieces) == payload
    assert body.done


def test_a_chunked_answer_with_extensions_and_trailers_is_read_to_its_end():
    body = ChunkedBody()
    assert body.feed(b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n") == [b"hello"]
    assert body.done


@pytest.mark.parametrize(
    "framed",
    [b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"0\r\n\r\nmore", b"1" * 2000],
    ids=["size not hex", "no CRLF after the payload", "bytes after the end", "endless size line"],
)
def test_a_broken_chunked_answer_is_a_protocol_error(framed):
    with pytest.raises(ProtocolError):
        ChunkedBody().feed(framed)


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
