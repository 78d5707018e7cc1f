"""What operators see at GET /metrics: Prometheus metrics, made with prometheus-client.

The rest of chatterd calls the plain functions below and never touches a metric itself.
Every worker process writes its figures to files in one directory (prometheus-client's
multiprocess mode), so one scrape of any worker sums them all. Labels are bounded: routes
by their template, statuses, Ollama servers from the configuration, models that produced
tokens, tool names of the server's own tools; never an appID, a key or an address.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


# The directory must be known before prometheus_client is imported: its value class is
# chosen then. `chatterd` sets it for its workers (a fresh directory per run); workers
# started by plain granian agree on one named after their parent process.
def _run_name() -> str:
    """The parent process (granian's main), by pid and start time: a pid alone is reused."""
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return str(parent)
    return f"{parent}-{started}"


os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(Path(tempfile.gettempdir()) / f"chatterd-metrics-{_run_name()}")
)
METRICS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
METRICS_DIR.mkdir(parents=True, exist_ok=True)

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ollama import full_model_name  # noqa: E402

WAIT_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SPEED_BUCKETS = (1, 2.5, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500)

_requests = Counter(
    "chatterd_requests_total",
    "HTTP requests answered, by route, method and status",
    ["route", "method", "status"],
)
_streams = Gauge(
    "chatterd_streams_active",
    "SSE streams open to clients now (new replies and resumed ones)",
    multiprocess_mode="livesum",
)
_waiting = Gauge(
    "chatterd_queue_waiting",
    "Generations waiting in the admission queue",
    multiprocess_mode="livesum",
)
_wait = Histogram(
    "chatterd_queue_wait_seconds",
    "Time a generation waited in the admission queue for a slot",
    buckets=WAIT_BUCKETS,
)
_first_token = Histogram(
    "chatterd_time_to_first_token_seconds",
    "From the request to the first relayed line of the model's reply",
    ["route"],
    buckets=FIRST_TOKEN_BUCKETS,
)
_tokens = Counter(
    "chatterd_reply_tokens_total", "Lines of model output relayed to clients", ["model"]
)
_speed = Histogram(
    "chatterd_model_tokens_per_second",
    "The model's own generation speed, from Ollama's eval_count / eval_duration",
    ["model"],
    buckets=SPEED_BUCKETS,
)
_up = Gauge(
    "chatterd_ollama_up",
    "Whether an Ollama server answers (1) or is marked down (0)",
    ["server"],
    multiprocess_mode="livemin",
)
_in_flight = Gauge(
    "chatterd_ollama_in_flight",
    "Generations running on an Ollama server now",
    ["server"],
    multiprocess_mode="livesum",
)
_stops = Counter(
    "chatterd_stops_total", "Turns stopped by POST .../stop, by where they were", ["state"]
)
_disconnects = Counter(
    "chatterd_client_disconnects_total", "Streams whose client went away before their end"
)
_resumed = Counter("chatterd_resumed_streams_total", "Streams resumed with GET and Last-Event-ID")
_tool_calls = Counter(
    "chatterd_tool_calls_total",
    "Tool calls by the model, by tool (device tools as one) and outcome",
    ["tool", "outcome"],
)
_tool_rounds = Counter(
    "chatterd_tool_rounds_total", "Model rounds that called tools and were asked again"
)
_errors = Counter("chatterd_errors_total", "Failures reported to clients, by kind", ["kind"])
_pool = Gauge(
    "chatterd_db_pool_connections",
    "Database connections of the pools, in use or idle",
    ["state"],
    multiprocess_mode="livesum",
)


def request(route: str, method: str, status: int) -> None:
    _requests.labels(route, method, str(status)).inc()


def stream_opened() -> None:
    _streams.inc()


def stream_closed() -> None:
    _streams.dec()


def queue_waiting(change: int) -> None:
    _waiting.inc(change)


def queue_wait(seconds: float) -> None:
    _wait.observe(seconds)


def first_token(route: str, seconds: float) -> None:
    _first_token.labels(route).observe(seconds)


def reply_tokens(model: str, count: int) -> None:
    if count:
        _tokens.labels(full_model_name(model)).inc(count)


def model_speed(model: str, eval_count: object, eval_duration: object) -> None:
    """Ollama's own figures from a done line: tokens, and nanoseconds spent making them."""
    if isinstance(eval_count, int) and isinstance(eval_duration, int) and eval_duration > 0:
        _speed.labels(full_model_name(model)).observe(eval_count / (eval_duration / 1e9))


def ollama_up(server: str, up: bool) -> None:
    _up.labels(server).set(1 if up else 0)


def ollama_in_flight(server: str, count: int) -> None:
    _in_flight.labels(server).set(count)


def stopped(state: str) -> None:
    _stops.labels(state).inc()


def client_disconnected() -> None:
    _disconnects.inc()


def resumed() -> None:
    _resumed.inc()


def tool_call(tool: str, outcome: str) -> None:
    _tool_calls.labels(tool, outcome).inc()


def tool_round() -> None:
    _tool_rounds.inc()


def error(kind: str) -> None:
    _errors.labels(kind).inc()


def pool(in_use: int, idle: int) -> None:
    _pool.labels("in_use").set(in_use)
    _pool.labels("idle").set(idle)


def exposition() -> tuple[bytes, str]:
    """Every worker's metrics, summed, in Prometheus' text format, and its content type."""
    _forget_dead_workers()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(METRICS_DIR))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exits() -> None:
    """A worker's live gauges leave the sums when it stops (its counters stay in them)."""
    multiprocess.mark_process_dead(os.getpid(), str(METRICS_DIR))


def _forget_dead_workers() -> None:
    """Drop the live gauges of workers that died without `worker_exits` (killed)."""
    for path in METRICS_DIR.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(METRICS_DIR))
        except PermissionError:
            pass  # alive, another user's
