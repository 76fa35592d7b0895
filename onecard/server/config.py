"""Server settings. Every flag has an ``ONECARD_*`` environment twin, shown in ``--help``."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.engine import ONLINE_COMMITTER, UPLOAD_COMMITTER, BatchSettings
from onecard.ledger.lifecycle import DeskSettings
from onecard.ledger.validation import Limits
from onecard.server.dsn import dsn_problem
from onecard.v1 import upload_pb2


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    #: May hold the database password: kept out of repr, as the key bytes are.
    dsn: str | None = field(default=None, repr=False)
    data_dir: Path = field(default_factory=lambda: Path(".onecard"))
    keys: Path | None = None
    allow_slow_crypto: bool = False
    key_cache_size: int = 1_000_000
    pool_size: int = 8
    #: How long a ledger statement waits for a row lock before its batch is
    #: refused as UNAVAILABLE (0: for ever). Longer than any flush of this
    #: ledger holds a card (a 5,000-record upload flush: well under a second),
    #: so it only ends waits for a lock nobody is about to release.
    lock_timeout_ms: int = 5000
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
    #: Upload streams open at once per process. Each may hold a few MB of
    #: batches in gRPC's buffers (its flow-control window) while it waits
    #: for the ledger; past this a new stream is refused RESOURCE_EXHAUSTED.
    max_upload_streams: int = 64
    #: Of those, how many one connection may hold, so that a gateway opening
    #: stream after stream on its connection (a retry loop that never closes
    #: one) cannot take every place and shut the other gateways out.
    max_upload_streams_per_connection: int = 16
    #: Seconds a connection may be silent before the server pings it; a peer
    #: that does not answer as long again (KEEPALIVE_TIMEOUT_S at most) is
    #: dropped and its calls end (an upload stream's place with them). 0, the
    #: default: gRPC's own (two hours). Off by default because gRPC core then
    #: re-arms a timer on every read: 8-12% more CPU a debit, 0.05 off the
    #: online ratio (python -m benchmarks.throughput --only online, A/B).
    keepalive_s: int = 0
    #: Seconds an upload stream may go without a batch before it is ended,
    #: giving its --max-upload-streams place back (0: never).
    upload_idle_s: int = 300
    limits: Limits = field(default_factory=Limits)
    batching: BatchSettings = field(default_factory=BatchSettings)
    shutdown_grace: float = 10.0
    #: Seconds a stop then waits for the ledger to commit what it holds; past
    #: them a database that does not answer is given up on (Ledger.close).
    shutdown_drain_s: float = 10.0
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


class _FromEnv(str):
    """A setting's text as its ``ONECARD_*`` twin gave it, so a refusal can say where it came from.

    argparse converts a string default only once it knows the option was not
    on the command line, through the option's ``type``: conversion (and its
    refusal) then happens for the subcommand being run, not for every
    subcommand while the parser is built.
    """

    env: str

    def __new__(cls, text: str, env: str) -> _FromEnv:
        self = super().__new__(cls, text)
        self.env = env
        return self


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_EXPECTED = {
    int: "an integer",
    float: "a finite number",
    _finite: "a finite number",
    _boolean: f"one of {', '.join(_TRUE + _FALSE)}",
}


def _expected(flag: str, kind: Callable[[str], Any]) -> str:
    low, high = _BOUNDS.get(flag, (None, None))
    words = _EXPECTED.get(kind, "a valid value")
    if low is not None and high is not None:
        return f"{words} from {low} to {high}"
    if low is not None:
        return f"{words} of at least {low}"
    return words


def _converter(
    flag: str, kind: Callable[[str], Any], choices: Sequence[Any] | None
) -> Callable[[str], Any]:
    """``type=`` for an option: parse, check choices and bounds, and name the env twin if used."""
    if kind is float:
        kind = _finite

    def convert(text: str) -> Any:
        source = f" (from {text.env})" if isinstance(text, _FromEnv) else ""
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {_expected(flag, kind)}, got {text!r}{source}"
            ) from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(map(str, choices))}, got {text!r}{source}"
            )
        try:
            check_setting(flag, value)
        except FieldError as exc:
            raise argparse.ArgumentTypeError(f"{exc.rule}{source}") from None
        return value

    return convert


class _Switch(argparse.Action):
    """``store_true`` whose default (from the env twin) argparse converts, and may refuse."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        default: Any = False,
        type: Callable[[str], Any] | None = None,
        help: str | None = None,
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, type=type, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)


def add_option(
    parser: argparse.ArgumentParser, flag: str, *, help: str, default: Any = None, **kw: Any
) -> None:
    """An option whose default comes from its ``ONECARD_*`` twin when that is set (and not empty).

    The twin's text is converted and checked (type, choices, ``_BOUNDS``) as a
    command-line value is, when the subcommand is parsed; a refusal names the
    flag, the rule and the variable, and exits 2 before anything starts.
    """
    env = env_name(flag)
    raw = os.environ.get(env) or None
    shown = f" (default: {default})" if default not in (None, False) else ""
    full_help = f"{help}{shown} [env {env}]"
    if kw.pop("action", None) == "store_true":
        parser.add_argument(
            flag,
            action=_Switch,
            default=_FromEnv(raw, env) if raw is not None else bool(default),
            type=_converter(flag, _boolean, None),
            help=full_help,
        )
        return
    kind = kw.pop("type", str)
    parser.add_argument(
        flag,
        default=_FromEnv(raw, env) if raw is not None else default,
        type=_converter(flag, kind, kw.get("choices")),
        help=full_help,
        **kw,
    )


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
    add_option(
        p,
        "--dsn",
        type=dsn_setting,
        help="PostgreSQL DSN; without it an embedded PostgreSQL is started",
    )
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
        "--lock-timeout-ms",
        type=int,
        default=d.lock_timeout_ms,
        help="how long a statement waits for a row lock before its batch is answered "
        "UNAVAILABLE (0: for ever)",
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
        "--max-upload-streams",
        type=int,
        default=d.max_upload_streams,
        help="upload streams open at once per process; one more is refused RESOURCE_EXHAUSTED",
    )
    add_option(
        p,
        "--max-upload-streams-per-connection",
        type=int,
        default=d.max_upload_streams_per_connection,
        help="of those, upload streams one connection may hold; one more on it is refused "
        "RESOURCE_EXHAUSTED",
    )
    add_option(
        p,
        "--upload-idle-s",
        type=int,
        default=d.upload_idle_s,
        help="seconds an upload stream may go without a batch before the server ends it, "
        "freeing its place (0: never)",
    )
    add_option(
        p,
        "--keepalive-s",
        type=int,
        default=d.keepalive_s,
        help="seconds of silence before the server pings a connection; one that does not "
        f"answer as long again (at most {KEEPALIVE_TIMEOUT_S}s) is dropped with its calls "
        "(default 0: gRPC's own, two hours; pings cost CPU on every call)",
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
#: The longest a pinged connection has to answer before it is dropped.
KEEPALIVE_TIMEOUT_S = 20

#: Options that count something the server cannot run with none of.
_COUNTS = (
    "--workers",
    "--pool-size",
    "--max-batch",
    "--max-queue",
    "--upload-flushers",
    "--upload-flush-records",
    "--max-upload-batch",
    "--max-upload-queue",
    "--max-upload-streams",
    "--max-upload-streams-per-connection",
    "--max-pending-calls",
)

#: Every numeric setting's range (inclusive; None: no bound). Checked when
#: the command line is parsed, for the flag and its ONECARD_* twin alike, and
#: again in ``config_from_args`` for callers that build a namespace themselves.
#: A negative gRPC message size would mean "unlimited", a negative cache size
#: reaches the extension, a negative hold or window would refund or reverse
#: at once: none of them is what an operator meant.
_BOUNDS: dict[str, tuple[int | None, int | None]] = {
    **{flag: (1, None) for flag in _COUNTS},
    "--acceptors": (1, MAX_ACCEPTORS),
    "--linger-ms": (0, 1000),
    "--key-cache-size": (0, 0x3FFFFFFF),  # the extension's own ceiling
    "--max-message-bytes": (1, 2**31 - 1),  # gRPC's is a C int; -1 there is "unlimited"
    "--max-amount": (1, 0xFFFFFFFF),  # amount is 4 bytes on the card (PROTOCOL.md)
    # gRPC's hard limit is three times it, in a C int: a larger value passed
    # every check and stopped the start-up after the database had started.
    "--max-pending-calls": (1, 10_000_000),
    # Ten years: further on, a refund's due date passed PostgreSQL's and
    # Python's year 9999, and every cancellation of an unreadable card failed.
    "--refund-hold": (0, 315_360_000),
    "--refund-job-interval": (0, 86_400),
    # A year: 10^13 seconds was taken, and every reversal then failed in
    # make_interval; a cashier's mistake is undone within minutes.
    "--reversal-window": (0, 31_536_000),
    "--lock-timeout-ms": (0, 3_600_000),
    "--keepalive-s": (0, 86_400),
    "--upload-idle-s": (0, 86_400),
}

#: Ledger settings (and group committers) by the flag that sets them, for
#: errors that must name the limit they hit (the ledger does not know flags).
LIMIT_FLAGS = {
    "max_amount": "--max-amount",
    "max_upload_batch": "--max-upload-batch",
    ONLINE_COMMITTER: "--max-queue",
    UPLOAD_COMMITTER: "--max-upload-queue",
    "max_upload_streams": "--max-upload-streams",
    "max_upload_streams_per_connection": "--max-upload-streams-per-connection",
    "upload_idle_s": "--upload-idle-s",
    "lock_timeout_ms": "--lock-timeout-ms",
}


def dsn_setting(text: str) -> str:
    """``type=`` of ``--dsn``: a DSN asyncpg can use, refused naming the flag (and its twin)."""
    problem = dsn_problem(text) if text else None
    if problem:
        source = f" (from {text.env})" if isinstance(text, _FromEnv) else ""
        raise argparse.ArgumentTypeError(f"{problem}{source}")
    return text


def checked_dsn(dsn: str | None) -> str | None:
    """``dsn`` (None for none), or a FieldError naming ``--dsn`` if asyncpg could not use it."""
    problem = dsn_problem(dsn) if dsn else None
    if problem:
        raise FieldError(f"--dsn ({env_name('--dsn')})", problem)
    return dsn or None


def flag_for(setting: str) -> str | None:
    """``--max-queue (ONECARD_MAX_QUEUE)`` for a ledger setting's name, if a flag sets it."""
    flag = LIMIT_FLAGS.get(setting)
    return f"{flag} ({env_name(flag)})" if flag else None


def check_setting(flag: str, value: Any) -> None:
    """Refuse ``value`` for ``flag`` outside its range, naming the flag and the limit."""
    if flag in ("--listen", "--metrics-listen") and value:
        parse_host_port(flag, value)
    if flag not in _BOUNDS or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(flag, f"must be a finite number, got {value}")
    low, high = _BOUNDS[flag]
    if low is not None and value < low:
        raise FieldError(flag, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise FieldError(flag, f"must be at most {high}, got {value}")


def parse_host_port(flag: str, listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), or a FieldError naming ``flag``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise FieldError(flag, f"must be HOST:PORT with a port up to 65535, got {listen!r}")
    return host.strip("[]"), int(port)


#: The gateway's own name for a batch, echoed back: room kept for it and the
#: batch's other fields in the message-size check.
BATCH_ENVELOPE_BYTES = 1024


def upload_batch_bytes(records: int) -> int:
    """The most ``records`` valid offline records can take on the wire, as one UploadBatch.

    Every field at its widest (a negative balance is a ten-byte varint), so
    that a batch --max-upload-batch allows always fits --max-message-bytes:
    gRPC refuses a larger message itself, before the ledger sees it, with a
    RESOURCE_EXHAUSTED a gateway takes for "retry later", and would resend
    the same batch for ever.
    """
    widest = upload_pb2.OfflineRecord(
        card_number="9" * 16,
        amount=2**32 - 1,
        transaction_type=2**32 - 1,
        terminal_id="9" * 12,
        terminal_seq=2**32 - 1,
        date_time="9" * 14,
        key_version=2**32 - 1,
        tac=b"\xff" * 8,
        offline_counter=2**32 - 1,
        card_balance_before=-1,
    )
    one = upload_pb2.UploadBatch(records=[widest]).ByteSize()
    return records * one + BATCH_ENVELOPE_BYTES


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    for flag in ("--listen", "--metrics-listen", *_BOUNDS):
        dest = flag[2:].replace("-", "_")
        if hasattr(args, dest):
            check_setting(flag, getattr(args, dest))
    if upload_batch_bytes(args.max_upload_batch) > args.max_message_bytes:
        raise FieldError(
            "--max-message-bytes",
            f"must hold an upload batch of --max-upload-batch {args.max_upload_batch} records, "
            f"up to {upload_batch_bytes(args.max_upload_batch)} bytes; "
            f"got {args.max_message_bytes}",
        )
    return ServerConfig(
        listen=args.listen,
        dsn=checked_dsn(args.dsn),
        data_dir=Path(args.data_dir),
        keys=Path(args.keys) if args.keys else None,
        allow_slow_crypto=args.allow_slow_crypto,
        key_cache_size=args.key_cache_size,
        pool_size=args.pool_size,
        lock_timeout_ms=args.lock_timeout_ms,
        max_message_bytes=args.max_message_bytes,
        max_pending_calls=args.max_pending_calls,
        acceptors=args.acceptors,
        max_upload_streams=args.max_upload_streams,
        max_upload_streams_per_connection=args.max_upload_streams_per_connection,
        keepalive_s=args.keepalive_s,
        upload_idle_s=args.upload_idle_s,
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
