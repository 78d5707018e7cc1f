"""The bench's own bare relay, used when ../shared/bench/floor_relay.py is not there.

A measuring stick, not product code: the least an ASGI app served by granian does per
relayed token. POST /llmchat's JSON body goes to OLLAMA_BASE_URL's /api/chat without its
appID; each NDJSON line that comes back is parsed once (any relay that keeps the reply
must) and written as one SSE event. No database, no history, no checks, no ping.
bench.py serves it as `granian --interface asgi --loop uvloop bare_relay:app`, with
aiohttp and uvloop from `uv run --no-project --with ...`, like the shared floor relay.
"""

import json
import os

import aiohttp

OLLAMA = os.environ["OLLAMA_BASE_URL"].rstrip("/") + "/api/chat"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")],
}
_session: aiohttp.ClientSession | None = None


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _session is not None:
                await _session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send) -> None:
    global _session
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    request = json.loads(b"".join(parts))
    request.pop("appID", None)
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    reply = []
    async with _session.post(OLLAMA, data=json.dumps(request)) as response:
        await send(START)
        event_id = 0
        async for raw in response.content:  # one NDJSON line at a time
            line = raw.strip()
            if line:
                reply.append(json.loads(line)["message"]["content"])
                body = b"id: %d\ndata: %s\n\n" % (event_id, line)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                event_id += 1
    await send({"type": "http.response.body", "body": b"", "more_body": False})
