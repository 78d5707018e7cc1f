"""A small HTTP/1.1 client for Ollama's streamed answers: POST a body, read the answer's
bytes as they come.

It carries the relay's hot path, once per token of every reply: a chunk goes from the
socket (`data_received`) to its reader through one undoing of the chunked framing and one
future. On aiohttp's request and stream reader, chatterd spent up to a sixth more CPU
per relayed event, and added a third to a half more TTFT at 500 streams (README,
Performance, stop 32).

It does only what Ollama's streaming endpoints need: keep-alive connections, the newest
reused first and idle ones closed after KEEPALIVE_SECONDS; at most `limit` connections
per server; http and https; Basic credentials from the URL; answers chunked, sized, or
read to the connection's end. No redirects, proxies or compression (none is asked for).
Timeouts are the caller's: each connection says when it last heard from the server
(`heard_at`), and `fail` ends a read.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from typing import cast
from urllib.parse import unquote, urlsplit

KEEPALIVE_SECONDS = 5.0  # as httpx's default: an idle connection is closed after this
MAX_HEAD = 64 * 1024  # the status line and headers
MAX_SIZE_LINE = 1024  # a chunk's size line


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as this client reads it."""


class AnswerCutOff(ConnectionError):
    """The connection ended before the answer was whole."""


class ChunkedBody:
    """A body sent with `Transfer-Encoding: chunked`, undone: fed the bytes as they come,
    it hands back the payload's pieces; `done` once the last chunk and trailers are in."""

    def __init__(self) -> None:
        self.done = False
        self._rest = b""  # an incomplete size or trailer line
        self._left = 0  # payload bytes of the current chunk still to come
        self._crlf = 0  # bytes of the CRLF after a chunk's payload still to come
        self._trailers = False  # past the last (empty) chunk

    def feed(self, data: bytes) -> list[bytes]:
        if self._rest:
            data, self._rest = self._rest + data, b""
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._left:
                take = min(self._left, end - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._crlf = 2
                continue
            if self._crlf:
                take = min(self._crlf, end - pos)
                if data[pos : pos + take] != b"\r\n"[2 - self._crlf : 2 - self._crlf + take]:
                    raise ProtocolError("a chunk does not end with CRLF")
                pos += take
                self._crlf -= take
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_SIZE_LINE:
                    raise ProtocolError("a chunk's size line is too long")
                self._rest = data[pos:]
                break
            line, pos = data[pos:eol], eol + 2
            if self._trailers:
                self.done = not line  # trailers end with an empty line
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"a chunk's size is not hexadecimal: {line[:40]!r}") from None
            if size < 0:
                raise ProtocolError("a chunk's size is negative")
            if size:
                self._left = size
            else:
                self._trailers = True
        if self.done and pos < end:
            raise ProtocolError("bytes after the answer's end")
        return pieces


class Connection(asyncio.Protocol):
    """One connection to the server, reading one answer at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        """Ready for the next answer."""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False  # the whole answer is in
        self.reusable = False  # and the connection may carry the next request
        self.heard_at = self._loop.time()
        self._head = b""
        self._headed: asyncio.Future[None] = self._loop.create_future()
        self._chunked: ChunkedBody | None = None
        self._size: int | None = None  # a sized answer's bytes still to come
        self._pieces: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None

    def send(self, request: bytes) -> None:
        self._begin()
        assert self.transport is not None
        self.transport.write(request)

    async def head(self) -> None:
        """Wait for the answer's status line and headers."""
        await self._headed

    async def read(self) -> bytes:
        """The answer's next bytes, all that came since the last read; b"" at its end."""
        while not self._pieces:
            if self._failure is not None:
                raise self._failure
            if self.done:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._pieces) == 1:
            return self._pieces.popleft()
        joined = b"".join(self._pieces)
        self._pieces.clear()
        return joined

    def fail(self, failure: BaseException) -> None:
        """End the answer with `failure`: the read under way (or the next) raises it. An
        answer that is all in stays whole."""
        if self.done:
            return
        self.reusable = False
        if self._failure is None:
            self._failure = failure
        if not self._headed.done():
            self._headed.set_exception(failure)
            self._headed.exception()  # retrieved: nobody may be waiting for it
        self._wake()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self._size is None and self._chunked is None and self._headed.done():
            self.done = True  # an answer read to the connection's end
            self._wake()
        elif not self.done:
            self.fail(exc or AnswerCutOff("the server closed the connection mid-answer"))

    def data_received(self, data: bytes) -> None:
        self.heard_at = self._loop.time()
        try:
            if not self._headed.done():
                data = self._read_head(data)
                if not data and not self.done:
                    return
            if self._chunked is not None:
                self._pieces.extend(self._chunked.feed(data))
                self.done = self._chunked.done
            elif self._size is not None:
                if len(data) > self._size:
                    raise ProtocolError("bytes after the answer's end")
                self._size -= len(data)
                if data:
                    self._pieces.append(data)
                self.done = not self._size
            elif data:
                self._pieces.append(data)
        except ProtocolError as exc:
            self.fail(exc)
            self.close()
            return
        self._wake()

    def _read_head(self, data: bytes) -> bytes:
        """Take the status line and headers from what came; return the body's first bytes."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                raise ProtocolError("the answer's headers are too long")
            return b""
        head, body = self._head[:end], self._head[end + 4 :]
        self._head = b""
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        self.status = int(rest[:3])
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise ProtocolError(f"not a header: {line[:80]!r}")
            self.headers[name.strip().lower()] = value.strip()
        keep_alive = version != "HTTP/1.0"
        connection = self.headers.get("connection", "").lower()
        if "close" in connection:
            keep_alive = False
        elif "keep-alive" in connection:
            keep_alive = True
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = ChunkedBody()
            self.reusable = keep_alive
        elif (length := self.headers.get("content-length")) is not None:
            if not length.isdigit():
                raise ProtocolError(f"not a content length: {length[:40]!r}")
            self._size = int(length)
            self.reusable = keep_alive
            self.done = not self._size
        self._headed.set_result(None)
        return body

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connections:
    """The connections to one server: at most `limit` at once, idle ones kept for reuse."""

    def __init__(
        self, base_url: str, *, limit: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http or https URL: {base_url}")
        self._tls = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._prefix = url.path.rstrip("/")
        netloc = url.netloc.rpartition("@")[2]
        fixed = f"Host: {netloc}\r\nUser-Agent: chatterd\r\nContent-Type: application/json\r\n"
        if url.username is not None:
            user, password = unquote(url.username), unquote(url.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            fixed += f"Authorization: Basic {token}\r\n"
        self._fixed_headers = fixed.encode("latin-1")
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[Connection] = []  # the newest last

    async def post(self, path: str, body: bytes, *, connect_timeout: float) -> Connection:
        """Send the request on a kept or a new connection (made within `connect_timeout`);
        the caller waits for its slot, and gives the connection back with `give_back`."""
        await self._slots.acquire()
        try:
            connection = self._kept() or await self._connect(connect_timeout)
        except BaseException:
            self._slots.release()
            raise
        connection.send(
            b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % ((self._prefix + path).encode(), self._fixed_headers, len(body), body)
        )
        return connection

    def give_back(self, connection: Connection) -> None:
        """The connection's answer is over, read whole or not: keep it for the next request,
        if it may carry one, or close it (a server stops generating when its client leaves)."""
        if connection.done and connection.reusable:  # a lost connection is not reusable
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()
        self._slots.release()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _kept(self) -> Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and now - connection.idle_since < KEEPALIVE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, within: float) -> Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            transport, connection = await loop.create_connection(
                lambda: Connection(loop), self._host, self._port, ssl=self._tls
            )
        # uvloop calls connection_made a moment later: the request may be sent before.
        connection.transport = cast(asyncio.Transport, transport)
        return connection
