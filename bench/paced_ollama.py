"""A paced Ollama stand-in for the benchmark: `/api/chat` answers N tokens, G seconds apart.

    python bench/paced_ollama.py PORT TOKENS GAP

Each reply's lines are encoded once, up front, so the stand-in costs as little CPU as it
can: the benchmark measures chatterd, not this.
"""

from __future__ import annotations

import asyncio
import json
import sys


def reply_chunks(tokens: int) -> list[bytes]:
    """Ollama's NDJSON lines for one reply, each already framed as an HTTP chunk."""
    lines = [
        {
            "model": "bench",
            "created_at": f"2026-11-22T12:00:00.{i:09d}Z",
            "message": {"role": "assistant", "content": f"tok{i} "},
            "done": False,
        }
        for i in range(tokens)
    ]
    lines.append(
        {
            "model": "bench",
            "created_at": "2026-11-22T12:00:01.000000000Z",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1,
            "load_duration": 1,
            "prompt_eval_count": 1,
            "prompt_eval_duration": 1,
            "eval_count": tokens,
            "eval_duration": 1,
        }
    )
    chunks = []
    for line in lines:
        data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
        chunks.append(b"%x\r\n%s\r\n" % (len(data), data))
    return chunks


async def serve(port: int, tokens: int, gap: float) -> None:
    chunks = reply_chunks(tokens)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in header.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)  # the request body is read, then ignored
                writer.write(head)
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    if gap:
                        await asyncio.sleep(gap)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
