"""The `chatterd` command: `chatterd [granian options]` serves main:server; `chatterd gencert`
makes the certificate the phones trust.

Without DATABASE_URL, the embedded PostgreSQL is started here, once, and the workers
inherit its URL; it is stopped when granian returns. The workers' metrics go to a fresh
directory of this run's, which is set before anything imports prometheus-client (see
metrics.py) and removed at the end.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["gencert"]:
        import certificates

        certificates.gencert(args[1:])
        return
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chatterd-metrics-")
    try:
        serve(args)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def serve(args: list[str]) -> None:
    """Serve main:server with granian's own flags and defaults.

    Workers that are still streaming `CHATTERD_SHUTDOWN_GRACE` seconds after SIGTERM are
    killed (granian's `--workers-kill-timeout`), and their unfinished turns are left out of
    the history.
    """
    from granian.cli import cli as granian

    from main import Config, ConfigError, start_embedded_postgres

    try:
        config = Config.from_env(os.environ)  # fail before spawning workers when it is wrong
    except ConfigError as exc:
        sys.exit(f"chatterd: {exc}")
    if "--workers-kill-timeout" not in args:
        args = ["--workers-kill-timeout", str(math.ceil(config.shutdown_grace)), *args]
    if "--ssl-protocol-min" not in args:  # granian's default, TLS 1.3, shuts out older phones
        args = ["--ssl-protocol-min", "tls1.2", *args]
    if "--loop" not in args:  # uvloop relays for less CPU (README, Performance)
        args = ["--loop", "uvloop", *args]
    embedded = None
    if config.database_url is None:
        embedded, os.environ["DATABASE_URL"] = start_embedded_postgres(config.data_dir)
    try:
        granian.main(args=["--interface", "asgi", *args, "main:server"], prog_name="chatterd")
    finally:
        if embedded is not None:
            embedded.cleanup()
