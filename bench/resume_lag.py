"""Resume lag and database load with many followers of one reply, for one or more checkouts.

    uv run python bench/resume_lag.py [--followers 100] [--hosts 1] [--tokens 200]
        [--gap 0.05] [--pause-after 40] [--pause 8] [--chatterd-dir DIR ...]

It starts PostgreSQL (an embedded one in a temporary directory, with pg_stat_statements
loaded; or DATABASE_URL, where each checkout gets a database of its own), a paced Ollama
stand-in whose reply (`--tokens` lines `--gap` s apart) falls silent for `--pause` s after
`--pause-after` lines, and, for each `--chatterd-dir` in turn (default: this checkout),
chatterd (granian, one worker; `--hosts 2` starts two, on the same database, and the
followers follow across them). Then one live client POSTs /llmchat and, as soon as its
first event has come, `--followers` clients resume the same reply (GET /llmchat?appID=...
with Last-Event-ID: that first event's id, as README "Resuming a lost stream" says).

Printed, per checkout:
- the resume lag: for every event that the live client got after all followers were
  connected, its arrival at each follower less its arrival at the live client
  (p50/p90/p99/max over all events and followers), and events a follower never got;
- PostgreSQL's load in two fixed windows, while the reply is silent (the followers idle)
  and while it streams (the followers active): statements per second from
  pg_stat_statements (BEGIN/COMMIT/ROLLBACK left out; exact), transactions per second
  from pg_stat_database (xact_commit + xact_rollback; backends report these up to a
  second late, so they are approximate), the CPU seconds per second of chatterd (granian
  and its workers) and of PostgreSQL, and the statements that ran most.

To compare the implementation before LISTEN/NOTIFY (it polled every 0.2 s and flushed
events every 0.1 s):

    git -C /work/main worktree add /work/wt-before 4457a0d
    uv run python bench/resume_lag.py --chatterd-dir /work/wt-before --chatterd-dir .

Another checkout runs on this project's environment, its own modules first on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fairness import (  # this directory's helpers
    ROOT,
    Chatterd,
    Database,
    body_chunks,
    cpu_seconds,
    start_chatterd,
    start_database,
    start_own_standin,
)

# Clients


@dataclass(eq=False)
class Stream:
    """One SSE response: when each event id arrived (time.perf_counter())."""

    arrivals: dict[int, float] = field(default_factory=dict)
    status: int = 0
    ready: float | None = None  # its headers came
    lines: int = 0  # Ollama lines (plain data events)
    failure: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def open_sse(
    port: int, method: str, path: str, stream: Stream, body: bytes = b"", **headers: str
) -> None:
    """Send the request and note every event of the response as it arrives."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        stream.failure = f"connect: {type(exc).__name__}"
        stream.changed.set()
        return
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    try:
        status = await reader.readline()
        stream.status = int(status.split(b" ", 2)[1]) if status.startswith(b"HTTP/") else 0
        if stream.status != 200:
            rest = (await reader.read(4096)).decode(errors="replace")
            stream.failure = (
                f"{status.decode(errors='replace').strip()} {rest[rest.find('{') :][:200]}"
            )
            return
        stream.ready = time.perf_counter()
        stream.changed.set()
        pending, event_id, name = b"", None, None
        async for chunk in body_chunks(reader):
            now = time.perf_counter()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"id: "):
                    event_id = int(line[4:])
                elif line.startswith(b"event: "):
                    name = line[7:]
                elif line.startswith(b"data: "):
                    if event_id is not None:
                        stream.arrivals.setdefault(event_id, now)
                    if name is None:
                        stream.lines += 1
                    elif name == b"error":
                        stream.failure = "event: error " + line[6:].decode(errors="replace")
                elif not line:
                    event_id, name = None, None
            stream.changed.set()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        stream.failure = f"read: {type(exc).__name__}"
    finally:
        stream.changed.set()
        writer.close()


async def until(stream: Stream, condition, seconds: float = 60) -> None:
    """Wait until `condition()` holds, looking again whenever the stream changes."""
    async with asyncio.timeout(seconds):
        while not condition():
            stream.changed.clear()
            await stream.changed.wait()


# The database's side


class Stats:
    """Snapshots of pg_stat_statements and pg_stat_database for one database."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.admin_url = admin_url
        self.database = database
        self.statements = True

    async def snapshot(self, chatterd: list[Chatterd], db: Database) -> dict:
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as conn:
            xacts = await (
                await conn.execute(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                    (self.database,),
                )
            ).fetchone()
            queries: dict[int, tuple[str, int]] = {}
            if self.statements:
                try:
                    rows = await (
                        await conn.execute(
                            "SELECT queryid, query, calls FROM pg_stat_statements"
                            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
                            (self.database,),
                        )
                    ).fetchall()
                    queries = {queryid: (query, calls) for queryid, query, calls in rows}
                except psycopg.Error:
                    self.statements = False  # not loaded: transactions only
        return {
            "time": time.perf_counter(),
            "xacts": xacts[0] if xacts else 0,
            "queries": queries,
            "chatterd_cpu": sum(cpu_seconds(server.process.pid) for server in chatterd),
            "db_cpu": db.cpu(),
        }


def window(before: dict, after: dict) -> dict:
    seconds = after["time"] - before["time"]
    calls = {}
    for queryid, (query, count) in after["queries"].items():
        done = count - before["queries"].get(queryid, ("", 0))[1]
        if done:
            calls[query] = calls.get(query, 0) + done
    control = {"BEGIN", "COMMIT", "ROLLBACK"}
    statements = sum(n for query, n in calls.items() if query.strip().upper() not in control)
    controls = sum(n for query, n in calls.items() if query.strip().upper() in control)
    return {
        "seconds": seconds,
        "statements": statements / seconds if after["queries"] else float("nan"),
        "control": controls / seconds if after["queries"] else float("nan"),
        "xacts": (after["xacts"] - before["xacts"]) / seconds,
        "chatterd_cpu": (after["chatterd_cpu"] - before["chatterd_cpu"]) / seconds,
        "db_cpu": (after["db_cpu"] - before["db_cpu"]) / seconds,
        "top": sorted(
            ((n / seconds, query) for query, n in calls.items() if query.upper() not in control),
            reverse=True,
        )[:4],
    }


# One measurement


@dataclass
class Result:
    label: str
    count: int  # followers
    lags: list[float]
    missing: int
    followers: int
    failures: list[str]
    idle: dict
    active: dict
    late_ready: bool  # some follower connected only after the silence began


async def measure(
    servers: list[Chatterd],
    db: Database,
    stats: Stats,
    args: argparse.Namespace,
    label: str,
    count: int,
) -> Result:
    app_id = f"resume-lag.{uuid.uuid4().hex[:12]}"
    body = json.dumps(
        {"appID": app_id, "model": "bench", "messages": [{"role": "user", "content": "Hello"}]}
    ).encode()
    live = Stream()
    tasks = [asyncio.ensure_future(open_sse(servers[0].port, "POST", "/llmchat", live, body))]
    await until(live, lambda: live.arrivals or live.failure)
    if live.failure:
        raise RuntimeError(f"the live stream failed: {live.failure}")
    first = min(live.arrivals)
    followers = [Stream() for _ in range(count)]
    path = f"/llmchat?appID={app_id}"
    for follower in followers:
        tasks.append(
            asyncio.ensure_future(
                open_sse(servers[-1].port, "GET", path, follower, Last_Event_ID=str(first))
            )
        )
    for follower in followers:
        await until(follower, lambda f=follower: f.ready or f.failure or f.status)
    ready = time.perf_counter()

    # The silence: the followers idle.
    await until(live, lambda: live.lines >= args.pause_after)
    silent = time.perf_counter()
    late_ready = ready > silent
    await asyncio.sleep(max(0.0, silent + 1.5 - time.perf_counter()))
    start = await stats.snapshot(servers, db)
    await asyncio.sleep(max(0.5, silent + args.pause - 0.5 - time.perf_counter()))
    idle = window(start, await stats.snapshot(servers, db))

    # The reply streams again: the followers active.
    await until(live, lambda: live.lines > args.pause_after, args.pause + 30)
    resumed = time.perf_counter()
    streaming = (args.tokens - args.pause_after) * args.gap
    active_seconds = max(1.0, min(6.0, streaming - 2.0))
    await asyncio.sleep(max(0.0, resumed + 1.0 - time.perf_counter()))
    start = await stats.snapshot(servers, db)
    await asyncio.sleep(active_seconds)
    active = window(start, await stats.snapshot(servers, db))

    await asyncio.gather(*tasks)
    lags, missing = [], 0
    counted = [event_id for event_id, at in live.arrivals.items() if at >= ready]
    for follower in followers:
        for event_id in counted:
            got = follower.arrivals.get(event_id)
            if got is None:
                missing += 1
            else:
                lags.append(got - live.arrivals[event_id])
    failures = [s.failure for s in [live, *followers] if s.failure]
    return Result(label, count, lags, missing, len(followers), failures, idle, active, late_ready)


def label_of(directory: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "log", "-1", "--format=%h"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return directory.name
    return f"{directory.name}@{head}{'+' if dirty else ''}"


# Figures


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:.0f}ms"


def report(results: list[Result], wholes: dict[str, dict], args: argparse.Namespace) -> None:
    where = "on the same host" if args.hosts == 1 else "on the other host (--hosts 2)"
    print(
        f"\n## Resume lag: one live /llmchat stream and its followers {where}"
        f"\n(a reply of {args.tokens} lines {args.gap * 1000:g} ms apart, silent for"
        f" {args.pause:g} s after {args.pause_after}; lag = arrival at a follower - at the live"
        " client)"
    )
    width = max(len(r.label) for r in results) + 2
    print(
        f"{'checkout':<{width}} {'followers':>9} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}"
        f" {'mean':>7} {'samples':>8} {'missing':>7}"
    )
    for r in results:
        print(
            f"{r.label:<{width}} {r.count:>9} {ms(quantile(r.lags, 0.5)):>7}"
            f" {ms(quantile(r.lags, 0.9)):>7} {ms(quantile(r.lags, 0.99)):>7}"
            f" {ms(max(r.lags, default=float('nan'))):>7}"
            f" {ms(statistics.fmean(r.lags) if r.lags else float('nan')):>7}"
            f" {len(r.lags):>8} {r.missing:>7}"
        )
        if r.failures:
            print(f"  failures: {len(r.failures)} {sorted(set(r.failures))[:3]}")
        if r.late_ready:
            print("  (some followers connected only after the silence began)")
    print("\n## PostgreSQL's load, per second, with the followers idle (reply silent) and active")
    print(
        f"{'checkout':<{width}} {'followers':>9} {'':>6} {'statements':>10} {'BEGIN/END':>9}"
        f" {'xacts':>7} {'chatterd CPU':>12} {'PG CPU':>7} {'window':>7}"
    )
    for r in results:
        for name, w in (("idle", r.idle), ("active", r.active)):
            print(
                f"{r.label:<{width}} {r.count:>9} {name:>6} {w['statements']:>10.0f}"
                f" {w['control']:>9.0f} {w['xacts']:>7.0f} {w['chatterd_cpu']:>11.0%}"
                f" {w['db_cpu']:>7.0%} {w['seconds']:>6.1f}s"
            )
    print(
        "statements: pg_stat_statements' calls (exact), BEGIN/COMMIT/ROLLBACK apart (BEGIN/END);"
        "\nxacts: pg_stat_database's xact_commit + xact_rollback, which idle backends report up"
        " to\n10 s late (PGSTAT_IDLE_INTERVAL): the whole-run figures below are the exact ones."
        "\nCPU: share of one core, chatterd's processes and PostgreSQL's"
    )
    for label, whole in wholes.items():
        if whole["statements"] == whole["statements"]:
            per = whole["xacts"] / whole["statements"] if whole["statements"] else float("nan")
            print(
                f"{label}, whole run ({whole['seconds']:.0f} s, chatterd stopped at its end):"
                f" {whole['statements'] * whole['seconds']:.0f} statements,"
                f" {whole['xacts'] * whole['seconds']:.0f} transactions: {per:.2f} per statement"
            )
    biggest = max(r.count for r in results)
    for r in results:
        if r.count != biggest:
            continue
        for name, w in (("idle", r.idle), ("active", r.active)):
            if w["top"]:
                print(f"\n{r.label}, {r.count} followers {name}: the statements that ran most")
                for rate, query in w["top"]:
                    print(f"  {rate:>7.0f}/s  {' '.join(query.split())[:110]}")


def prepare_database(db: Database, name: str) -> str:
    """A fresh database for one checkout; its URL."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(db.url, dbname=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--followers", default="100", help="resumed streams; a list (1,10,100) runs each (100)"
    )
    parser.add_argument(
        "--hosts", type=int, choices=(1, 2), default=1,
        help="chatterd processes on one database (1); with 2, the followers use the other",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=200, help="lines in the reply (200)")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between lines (0.05)")
    parser.add_argument("--pause-after", type=int, default=40, help="lines before the silence")
    parser.add_argument("--pause", type=float, default=8.0, help="seconds of silence (8)")
    parser.add_argument(
        "--chatterd-dir", type=Path, action="append",
        help="a checkout to run chatterd from; repeat to compare (default: this one)",
    )  # fmt: skip
    args = parser.parse_args()
    directories = [d.resolve() for d in args.chatterd_dir or [ROOT]]
    counts = [int(n) for n in args.followers.split(",")]

    db = start_database(preload="pg_stat_statements")
    standin, standin_port = start_own_standin(
        args.tokens, args.gap, 0, args.pause_after, args.pause
    )
    results, wholes = [], {}
    try:
        with psycopg.connect(db.url, autocommit=True) as conn:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            except psycopg.Error as exc:
                print(f"(no pg_stat_statements: {str(exc).strip()}; transactions only)")
        for number, directory in enumerate(directories):
            label = label_of(directory)
            name = f"resume_lag_{number}"
            url = prepare_database(db, name)
            stats = Stats(db.url, name)
            servers = []
            try:
                for _ in range(args.hosts):
                    servers.append(
                        start_chatterd(url, [f"http://127.0.0.1:{standin_port}"], {}, directory)
                    )
                first = asyncio.run(stats.snapshot([], db))
                for count in counts:
                    results.append(asyncio.run(measure(servers, db, stats, args, label, count)))
                    print(f"measured {label} with {count} followers", flush=True)
                for server in servers:
                    server.stop()  # its backends end, and report their counts
                    server.log.unlink(missing_ok=True)  # kept when something went wrong
            finally:
                for server in servers:
                    server.stop()
            time.sleep(0.5)
            wholes[label] = window(first, asyncio.run(stats.snapshot([], db)))
        report(results, wholes, args)
    finally:
        standin.terminate()
        standin.wait(10)
        db.close()


if __name__ == "__main__":
    main()
