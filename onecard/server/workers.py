"""``onecard serve --workers N``: N server processes sharing one port.

Python runs one thread of ledger code per process, so a second core needs a
second process. The parent owns what must exist once (the embedded
PostgreSQL, migrations, the development keys and demo data), then starts N
workers that each bind the same address (gRPC sets SO_REUSEPORT, the kernel
spreads connections) and keep their own pool and group committer. Cards are
locked in card-number order in every batch, so workers' concurrent
transactions cannot deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg

from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.storage.migrate import apply_migrations
from onecard.server.config import ServerConfig
from onecard.server.listen import WORKER_ENV, check_port_free
from onecard.server.metrics import MULTIPROC_ENV, MetricsServer, workers_dir

log = logging.getLogger("onecard.server")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker_argv(
    argv: list[str], dsn: str, listen: str, keys: Path | None, pii_key: Path
) -> list[str]:
    """The parent's own command line, pinned to one worker, its database and port.

    A worker always gets ``--dsn`` (the parent's embedded PostgreSQL or the
    one named), so it also gets the personal-data key file explicitly: with a
    DSN a worker refuses to make up a key of its own.
    """
    # -P: not the current directory first on sys.path, as -m would put it.
    # Started from a source checkout after `pip install .`, a worker would
    # otherwise import the checkout (no built extension there) instead of the
    # package the parent runs, and die before serving.
    out = [sys.executable, "-P", "-m", "onecard.server.cli", *argv, "--workers", "1"]
    out += ["--dsn", dsn, "--listen", listen, "--pii-key-file", str(pii_key)]
    if keys is not None:
        out += ["--keys", str(keys)]
    return out


async def _prepare(cfg: ServerConfig) -> tuple[str, Path | None, Path, object]:
    from onecard.server.app import load_keys, load_pii_key, start_embedded_postgres

    keys, dev = load_keys(cfg)
    key_path = getattr(keys, "path", None)
    # Settled here, once, before the database is touched: with --dsn and no
    # --pii-key-file this refuses as a single server does; on the embedded
    # database the key is made once (workers making it at the same moment
    # could read each other's half-written file).
    load_pii_key(cfg)
    pii_path = cfg.pii_key_file or cfg.data_dir / "pii-key"
    embedded = None
    dsn = cfg.dsn
    if not dsn:
        embedded, dsn = await start_embedded_postgres(cfg)
    conn = await asyncpg.connect(dsn)
    try:
        applied = await apply_migrations(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        if dev:
            await seed_demo_data(conn)
    finally:
        await conn.close()
    return dsn, key_path, pii_path, embedded


def run_workers(cfg: ServerConfig, workers: int, argv: list[str]) -> int:
    """Start, supervise and stop ``workers`` processes; returns the exit code."""
    from onecard.server.embedded_pg import EmbeddedPostgres

    check_port_free(cfg.listen)  # before the database starts, as one process does
    dsn, key_path, pii_path, embedded = asyncio.run(_prepare(cfg))
    host, _, port = cfg.listen.rpartition(":")
    if int(port) == 0:
        port = str(_free_port(host.strip("[]")))
    listen = f"{host}:{port}"
    procs: list[subprocess.Popen[str]] = []
    code = 0
    stopping = False
    env = {**os.environ, WORKER_ENV: "1"}
    metrics: MetricsServer | None = None
    metrics_dir: Path | None = None

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGINT, signal.SIGTERM):
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        if cfg.metrics_listen:
            # Workers record into files here; this process serves their sum.
            metrics_dir = workers_dir(cfg.data_dir)
            env[MULTIPROC_ENV] = str(metrics_dir)
            metrics = MetricsServer(cfg.metrics_listen, metrics_dir)
        for _ in range(workers):
            proc = subprocess.Popen(
                _worker_argv(argv, dsn, listen, key_path, pii_path),
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            procs.append(proc)
            assert proc.stdout is not None
            banner = ""
            while "serving gRPC on" not in banner:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"a worker exited before serving:\n{banner}")
                banner += line
        where = cfg.data_dir / "pg" if embedded is not None else dsn.rsplit("@", 1)[-1]
        if metrics is not None:
            print(f"onecard metrics on {metrics.url}", flush=True)
        print(
            f"onecard serving gRPC on {listen}\n"
            f"  workers: {workers} (pids {', '.join(str(p.pid) for p in procs)})\n"
            f"  database: {'embedded PostgreSQL in ' if embedded else 'PostgreSQL at '}{where}",
            flush=True,
        )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        (cfg.data_dir / "server.addr").write_text(listen)
        while procs:
            for p in list(procs):
                try:
                    rc = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                procs.remove(p)
                if rc != 0:
                    code = rc
                    if not stopping:
                        log.error("worker %d exited with %d; stopping the others", p.pid, rc)
                        forward(signal.SIGTERM, None)
        print("onecard: stopped cleanly" if code == 0 else "onecard: a worker failed", flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        if metrics is not None:
            metrics.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()
    return code
