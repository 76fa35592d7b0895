"""Server settings. Every flag has an ``ONECARD_*`` environment twin, shown in ``--help``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.engine import BatchSettings
from onecard.ledger.lifecycle import DeskSettings
from onecard.ledger.validation import Limits


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    dsn: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".onecard"))
    keys: Path | None = None
    allow_slow_crypto: bool = False
    key_cache_size: int = 1_000_000
    pool_size: int = 8
    max_message_bytes: int = 4 * 1024 * 1024
    #: gRPC's own backlog, per gRPC server (``acceptors`` a process), of
    #: calls received but not yet taken (grpc.server.max_pending_requests;
    #: the hard limit is three times it, as gRPC's defaults 1,000 and 3,000
    #: are). Past it gRPC sheds calls with CANCELLED before they reach the
    #: ledger (README, Performance).
    max_pending_calls: int = 1000
    #: gRPC servers in each process, all on the one port. grpc.aio asks gRPC
    #: core for the next call of a method only once the previous one has
    #: reached the event loop (a hop through gRPC's poller thread), so one
    #: server takes calls single file; under load they wait in gRPC's backlog
    #: while the ledger has room. Two servers take them two at a time
    #: (python -m benchmarks.acceptors measures it against one).
    acceptors: int = 2
    limits: Limits = field(default_factory=Limits)
    batching: BatchSettings = field(default_factory=BatchSettings)
    shutdown_grace: float = 10.0
    desk: DeskSettings = field(default_factory=DeskSettings)
    #: Hex key for holder-data digests; required with --dsn, else DATA_DIR/pii-key, made once.
    pii_key_file: Path | None = None
    #: HOST:PORT of the Prometheus endpoint; empty for none.
    metrics_listen: str = ""

    @property
    def embedded(self) -> bool:
        return not self.dsn


def env_name(flag: str) -> str:
    return "ONECARD_" + flag.lstrip("-").replace("-", "_").upper()


def add_option(
    parser: argparse.ArgumentParser, flag: str, *, help: str, default: Any = None, **kw: Any
) -> None:
    """An option whose default comes from its ``ONECARD_*`` twin when that is set."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if kw.get("action") == "store_true":
        value: Any = raw.lower() in ("1", "true", "yes", "on") if raw else bool(default)
    elif raw is not None:
        value = kw.get("type", str)(raw)
    else:
        value = default
    shown = f" (default: {default})" if default not in (None, False) else ""
    parser.add_argument(flag, default=value, help=f"{help}{shown} [env {env}]", **kw)


def add_server_options(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    add_option(p, "--listen", default=d.listen, help="gRPC address; port 0 picks a free port")
    add_option(
        p,
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each with its own pool",
    )
    add_option(
        p,
        "--metrics-listen",
        default=d.metrics_listen,
        help="HOST:PORT for Prometheus metrics at /metrics (port 0 picks one); empty: none",
    )
    add_option(p, "--dsn", help="PostgreSQL DSN; without it an embedded PostgreSQL is started")
    add_option(
        p,
        "--data-dir",
        type=Path,
        default=d.data_dir,
        help="directory for the embedded PostgreSQL and development keys",
    )
    add_option(
        p,
        "--keys",
        type=Path,
        help="key file (JSON, mode 600); ONECARD_KEYS_JSON may hold the same inline",
    )
    add_option(
        p,
        "--allow-slow-crypto",
        action="store_true",
        help="run on the pure-Python card crypto if the Cython extension is missing",
    )
    add_option(
        p,
        "--key-cache-size",
        type=int,
        default=d.key_cache_size,
        help="derived card keys kept in memory",
    )
    add_option(
        p, "--pool-size", type=int, default=d.pool_size, help="database connections per process"
    )
    add_option(
        p,
        "--max-batch",
        type=int,
        default=d.batching.max_batch,
        help="most requests in one group-commit transaction",
    )
    add_option(
        p,
        "--max-queue",
        type=int,
        default=d.batching.max_queue,
        help="requests waiting for a batch before RESOURCE_EXHAUSTED",
    )
    add_option(
        p,
        "--linger-ms",
        type=float,
        default=d.batching.linger * 1000,
        help="how long a small batch waits for company before flushing",
    )
    add_option(
        p,
        "--max-amount",
        type=int,
        default=d.limits.max_amount,
        help="largest amount in fen any transaction may carry",
    )
    add_option(
        p,
        "--max-upload-batch",
        type=int,
        default=d.limits.max_upload_batch,
        help="most records in one offline upload batch; a larger one is refused whole",
    )
    add_option(
        p,
        "--max-upload-queue",
        type=int,
        default=d.batching.upload_max_queue,
        help="offline records waiting for a batch before RESOURCE_EXHAUSTED",
    )
    add_option(
        p,
        "--upload-flush-records",
        type=int,
        default=d.batching.upload_max_batch,
        help="most records in one upload transaction (gateway batches are never split, so a "
        "larger batch goes alone); fewer hold card locks for less time, at some upload "
        "throughput",
    )
    add_option(
        p,
        "--upload-flushers",
        type=int,
        default=d.batching.upload_flushers,
        help="upload transactions in flight at once per process",
    )
    add_option(
        p,
        "--refund-hold",
        type=float,
        default=d.desk.refund_hold,
        help="seconds a cancelled card's refund waits for late offline records",
    )
    add_option(
        p,
        "--refund-job-interval",
        type=float,
        default=d.desk.refund_job_interval,
        help="seconds between runs of the job that pays held refunds (0: never)",
    )
    add_option(
        p,
        "--reversal-window",
        type=float,
        default=d.desk.reversal_window,
        help="seconds within which a terminal may reverse its last transaction",
    )
    add_option(
        p,
        "--pii-key-file",
        type=Path,
        help="hex key (mode 600) for holder-data digests, the same file on every server of a "
        "database; required with --dsn, else DATA_DIR/pii-key, made once",
    )
    add_option(
        p,
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="largest gRPC message accepted",
    )
    add_option(
        p,
        "--max-pending-calls",
        type=int,
        default=d.max_pending_calls,
        help="calls each gRPC server (--acceptors a process) holds before a servicer takes "
        "them; past this gRPC drops some as CANCELLED, all past three times it",
    )
    add_option(
        p,
        "--acceptors",
        type=int,
        default=d.acceptors,
        help="gRPC servers per process on the one port, each taking calls as they come",
    )


#: More servers per process than this only add idle requests for calls.
MAX_ACCEPTORS = 16

#: Options that count something the server cannot run with none of.
_COUNTS = (
    "--pool-size",
    "--max-batch",
    "--max-queue",
    "--upload-flushers",
    "--upload-flush-records",
    "--max-upload-batch",
    "--max-upload-queue",
    "--max-pending-calls",
    "--acceptors",
)


def parse_host_port(flag: str, listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), or a FieldError naming ``flag``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise FieldError(flag, f"must be HOST:PORT with a port up to 65535, got {listen!r}")
    return host.strip("[]"), int(port)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    for flag in _COUNTS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise FieldError(flag, f"must be at least 1, got {value}")
    parse_host_port("--listen", args.listen)
    if args.metrics_listen:
        parse_host_port("--metrics-listen", args.metrics_listen)
    if args.acceptors > MAX_ACCEPTORS:
        raise FieldError("--acceptors", f"must be at most {MAX_ACCEPTORS}, got {args.acceptors}")
    if not 0 <= args.linger_ms <= 1000:
        raise FieldError("--linger-ms", f"must be between 0 and 1000, got {args.linger_ms}")
    return ServerConfig(
        listen=args.listen,
        dsn=args.dsn or None,
        data_dir=Path(args.data_dir),
        keys=Path(args.keys) if args.keys else None,
        allow_slow_crypto=args.allow_slow_crypto,
        key_cache_size=args.key_cache_size,
        pool_size=args.pool_size,
        max_message_bytes=args.max_message_bytes,
        max_pending_calls=args.max_pending_calls,
        acceptors=args.acceptors,
        limits=Limits(max_amount=args.max_amount, max_upload_batch=args.max_upload_batch),
        batching=BatchSettings(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            linger=args.linger_ms / 1000,
            upload_max_batch=args.upload_flush_records,
            upload_max_queue=args.max_upload_queue,
            upload_flushers=args.upload_flushers,
        ),
        desk=DeskSettings(
            refund_hold=args.refund_hold,
            refund_job_interval=args.refund_job_interval,
            reversal_window=args.reversal_window,
        ),
        pii_key_file=Path(args.pii_key_file) if args.pii_key_file else None,
        metrics_listen=args.metrics_listen,
    )
