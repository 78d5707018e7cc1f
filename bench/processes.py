"""What the benchmarks share to start their processes: a free port, waiting for it, and
the paced Ollama stand-in (bench/paced_ollama.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, process: subprocess.Popen | None = None, log: str = "", timeout: float = 120
) -> None:
    """Until something listens on `port`; an error if `process` exits first (see `log`)."""
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited{see}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}{see}")


def start_standin(tokens: int, gap: float) -> tuple[subprocess.Popen, int]:
    """bench/paced_ollama.py: every request, whatever its path, gets the paced reply."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "paced_ollama.py"), str(port), str(tokens), str(gap)]
    )
    wait_for_port(port, process, "the stand-in's output")
    return process, port
