"""The benchmark's load generator: many concurrent streamed POSTs, from a process of its own.

    python bench/loadgen.py < job.json > result.json

It runs apart from bench.py so that its CPU is its own (bench.py samples the servers
meanwhile), on uvloop when that is installed, and it speaks just enough HTTP/1.1 on an
asyncio Protocol (no StreamReader, no per-line awaits) to count what the servers send:
the status, chunked framing, and one event per SSE `data:` line or NDJSON line. At 500
streams of 64 tokens it must stay well under a core, or it measures itself; bench.py
prints its CPU share so that this can be checked.

The job: {"port", "path", "body" (its "{appid}" is replaced by a fresh appID per
stream), "count", "concurrency", "sse", "limit" (seconds per stream)}. The result:
{"wall", "cpu", "loop", "streams": [[ok, failure, ttft, total, events], ...]}. bench.py
also imports `drive` to send single requests in its own process (the history section).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

DATA = b"data: "


class Exchange(asyncio.Protocol):
    """One request and its streamed response."""

    def __init__(self, request: bytes, sse: bool, started: float, done: asyncio.Future) -> None:
        self.request = request
        self.sse = sse
        self.started = started
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""  # bytes not parsed yet (head, or chunk framing)
        self.pending = b""  # the unfinished line of the body
        self.head = True
        self.chunked = False
        self.status_ok = False
        self.ok = False
        self.failure = ""
        self.ttft = 0.0
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        buffer = self.buffer + data if self.buffer else data
        if self.head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4 :]
            status, _, headers = head.partition(b"\r\n")
            if b" 200 " not in status:
                text = buffer.decode(errors="replace")
                self.finish(f"{status.decode(errors='replace')} {text[text.find('{') :][:120]}")
                return
            self.head = False
            self.chunked = b"transfer-encoding: chunked" in headers.lower()
        if not self.chunked:
            self.buffer = b""
            self.lines(buffer)
            return
        at = 0
        while True:
            eol = buffer.find(b"\r\n", at)
            if eol < 0:
                break
            size = int(buffer[at:eol].split(b";", 1)[0] or b"0", 16)
            if size == 0:
                self.finish("")
                return
            start = eol + 2
            if len(buffer) < start + size + 2:
                break
            self.lines(buffer[start : start + size])
            if self.done.done():
                return
            at = start + size + 2
        self.buffer = buffer[at:]

    def lines(self, payload: bytes) -> None:
        if b"\n" not in payload:
            self.pending += payload
            return
        text = self.pending + payload if self.pending else payload
        *lines, self.pending = text.split(b"\n")
        for line in lines:
            if self.sse:
                if not line.startswith(DATA):
                    if line.startswith(b"event: error"):
                        self.finish("event: error")
                        return
                    continue
            elif not line.startswith(b"{"):
                continue
            if self.events == 0:
                self.ttft = time.perf_counter() - self.started
            self.events += 1
            if b'"done":true' in line:
                self.ok = True

    def finish(self, failure: str) -> None:
        if not self.done.done():
            self.failure = failure
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        if self.chunked or self.head:
            self.finish("read: the server closed the connection mid-response")
        else:
            self.finish("")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.finish(f"read: {type(exc).__name__ if exc else 'connection lost'}")


def request_bytes(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), len(body), body)
    )


async def stream_once(port: int, path: str, body: bytes, sse: bool, limit: float) -> list:
    """[ok, failure, ttft, total, events] of one streamed request."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    done = loop.create_future()
    exchange = Exchange(request_bytes(path, body), sse, started, done)
    try:
        await loop.create_connection(lambda: exchange, "127.0.0.1", port)
    except OSError as exc:
        return [False, f"connect: {type(exc).__name__}", 0.0, 0.0, 0]
    try:
        await asyncio.wait_for(done, limit)
    except TimeoutError:
        exchange.finish(f"timeout after {limit:g} s")
    ok = exchange.ok and not exchange.failure
    failure = exchange.failure or ("" if ok else "the stream ended without a done line")
    return [ok, failure, exchange.ttft, time.perf_counter() - started, exchange.events]


async def drive(
    port: int, path: str, body: str, count: int, concurrency: int, sse: bool, limit: float = 300
) -> tuple[list[list], float]:
    """`count` streams, `concurrency` at a time, each given up after `limit` seconds; each
    gets a fresh appID. Returns (streams, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)
    bodies = [body.replace("{appid}", uuid.uuid4().hex).encode() for _ in range(count)]

    async def one(data: bytes) -> list:
        async with gate:
            return await stream_once(port, path, data, sse, limit)

    started = time.perf_counter()
    streams = await asyncio.gather(*(one(data) for data in bodies))
    return list(streams), time.perf_counter() - started


def main() -> None:
    job = json.load(sys.stdin)
    try:
        import uvloop

        runner, loop_name = uvloop.run, "uvloop"
    except ImportError:
        runner, loop_name = asyncio.run, "asyncio"
    cpu = time.process_time()
    streams, wall = runner(
        drive(
            job["port"],
            job["path"],
            job["body"],
            job["count"],
            job["concurrency"],
            job["sse"],
            job.get("limit", 300),
        )
    )
    result = {"wall": wall, "cpu": time.process_time() - cpu, "loop": loop_name}
    json.dump({**result, "streams": streams}, sys.stdout)


if __name__ == "__main__":
    main()
