"""The Ollama servers chatterd sends generations to: what each has, whether it is up.

`OLLAMA_BASE_URL` names one server or several. A background check asks each one every
`check_seconds` for its models (`/api/tags`) and those it has loaded (`/api/ps`); a
server that refuses connections or times out, there or during a generation, is marked
down and skipped until a check finds it answering again. Which server a generation goes
to is decided by `ranked` (the admission queue takes the first with a free slot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

import metrics
import ollama
from ollama import full_model_name

log = logging.getLogger("chatterd")

REFRESH_ON_MISS_SECONDS = 2.0  # how often an unknown model may trigger a fresh /api/tags
CHECK_TIMEOUT_SECONDS = 5.0  # a server that takes longer to say what it has is down


@dataclass(eq=False)
class Server:
    url: str
    http: httpx.AsyncClient  # for its checks
    streams: ollama.Streams  # for its generations
    up: bool = True  # until a check or a generation finds otherwise
    models: frozenset[str] | None = None  # installed; None until a check has listed them
    loaded: frozenset[str] = frozenset()  # in memory now
    in_flight: int = 0  # generations running on it now; the admission queue counts them
    version: str | None = None
    error: str | None = None  # why it is down
    _refreshed: float = field(default=float("-inf"), repr=False)

    @property
    def name(self) -> str:
        """The URL without its credentials, if it has any: for /health, logs and metrics."""
        return without_credentials(self.url)

    def has(self, model: str) -> bool:
        return self.models is None or model in self.models

    def status(self) -> dict[str, Any]:
        return {
            "url": self.name,
            "up": self.up,
            "version": self.version,
            "models": None if self.models is None else sorted(self.models),
            "loaded": sorted(self.loaded),
            "in_flight": self.in_flight,
            **({"error": self.error} if self.error and not self.up else {}),
        }


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class NoServer(Exception):
    """No server can take a generation of this model: `status` 404 or 502 for the client."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class Servers:
    def __init__(self, servers: list[Server], check_seconds: float) -> None:
        self.all = servers
        self.check_seconds = check_seconds
        self.on_change: Callable[[], None] = lambda: None  # the admission queue listens here

    def ranked(self, model: str, exclude: frozenset[Server] = frozenset()) -> list[Server]:
        """The servers that may run `model`, best first: loaded it, then least busy.

        Servers that are down come only when no server that has the model is up: a check
        may not have noticed that one is back. Raises NoServer.
        """
        name = full_model_name(model)
        having = [server for server in self.all if server.has(name)]
        if not having:
            raise NoServer(404, f"model '{model}' not found")
        usable = [server for server in having if server not in exclude]
        if not usable:
            raise NoServer(502, f"no Ollama server could run model '{model}'")
        up = [server for server in usable if server.up] or usable
        return sorted(up, key=lambda server: (name not in server.loaded, server.in_flight))

    async def refresh_for(self, model: str) -> None:
        """Look again at the models of servers that don't list `model`: it may be new."""
        loop = asyncio.get_running_loop()
        name = full_model_name(model)
        stale = [
            server
            for server in self.all
            if not server.has(name) and loop.time() - server._refreshed > REFRESH_ON_MISS_SECONDS
        ]
        if stale:
            await asyncio.gather(*(self.check(server) for server in stale))

    def mark_down(self, server: Server, reason: str) -> None:
        if server.up:
            log.warning("Ollama at %s is down: %s", server.name, reason)
        server.up, server.error = False, reason
        metrics.ollama_up(server.name, False)
        self.on_change()

    async def check(self, server: Server) -> None:
        """Ask one server what it has; mark it up or down by whether it answers."""
        server._refreshed = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                models = await ollama.model_names(server.http, "/api/tags")
                loaded = await ollama.model_names(server.http, "/api/ps")
                version = await ollama.version(server.http)
        except (httpx.HTTPError, TimeoutError) as exc:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
                self._answered(server, None, frozenset(), None)  # an Ollama without these routes
            else:
                self.mark_down(server, type(exc).__name__)
        except ValueError as exc:
            self._answered(server, None, frozenset(), None)
            log.warning("Ollama at %s answered oddly: %s", server.name, exc)
        else:
            self._answered(server, models, loaded, version)

    def _answered(
        self,
        server: Server,
        models: frozenset[str] | None,
        loaded: frozenset[str],
        version: str | None,
    ) -> None:
        came_back = not server.up
        server.up, server.error = True, None
        metrics.ollama_up(server.name, True)
        server.models, server.loaded, server.version = models, loaded, version
        if came_back:
            log.info("Ollama at %s is up again", server.name)
            self.on_change()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(server) for server in self.all))

    async def run(self) -> None:
        """Check every server again every `check_seconds` (the lifespan checked them first)."""
        while True:
            await asyncio.sleep(self.check_seconds)
            await self.check_all()

    def status(self) -> list[dict[str, Any]]:
        return [server.status() for server in self.all]

    async def aclose(self) -> None:
        for server in self.all:
            server.streams.close()
            await server.http.aclose()
