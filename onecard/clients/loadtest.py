"""``onecard loadtest``: many terminals against a running server, then a check of the books.

Every request is built and signed before the clock starts, so the run
measures the server. In open-loop mode (``--rate``) each request has an
intended send time from the profile and its latency is counted from that
moment, not from when it was actually sent: a stalled server cannot hide its
stall by slowing the generator down (coordinated omission). ``--rate 0`` is
closed loop: ``--concurrency`` requests in flight, each sent when one returns.

Requests go over ``--channels`` separate connections: gRPC would otherwise
share one TCP connection between channels to the same address, and with
``onecard serve --workers N`` the kernel spreads connections, not requests,
so one connection would keep every worker but one idle.

Afterwards every acknowledged posting is looked up in the database (present
exactly once) and the trial balance must be zero. The database is ``--dsn``
or, for a server started by ``onecard serve`` on its embedded PostgreSQL in
``--data-dir``, that one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from hdrh.histogram import HdrHistogram

from onecard.clients.population import Population, Zipf, seed_cards, seed_terminals
from onecard.ledger.audit import trial_balance
from onecard.ledger.devdata import DEMO_ISSUER, DEV_KEYS
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.v1 import (
    common_pb2,
    terminal_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
)

KINDS = ("debit", "load", "upload")
PURSE_MAX = 100_000  # the demo standard product's


@dataclass
class Op:
    kind: str
    at: float  # intended send time, seconds from start (open loop)
    request: Any
    records: int = 1


@dataclass
class Report:
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    hist: dict[str, HdrHistogram] = field(default_factory=dict)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (done at, latency)
    acknowledged: list[tuple[int, int]] = field(default_factory=list)  # (terminal, seq)
    records: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # first detail per error kind

    def record(self, kind: str, latency: float, done_at: float) -> None:
        h = self.hist.get(kind)
        if h is None:
            h = self.hist[kind] = HdrHistogram(1, 600_000_000, 3)
        h.record_value(max(1, int(latency * 1e6)))
        self.timeline.append((done_at, latency))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 3),
            "requests": sum(h.get_total_count() for h in self.hist.values()),
            "records": self.records,
            "records_per_second": round(self.records / self.seconds, 1) if self.seconds else 0,
            "outcomes": dict(sorted(self.outcomes.items())),
            "errors": self.errors,
            "latency_ms": {},
        }
        for kind, h in sorted(self.hist.items()):
            out["latency_ms"][kind] = {
                q: h.get_value_at_percentile(p) / 1e3
                for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
            }
        return out


def _profile_times(n: int, rate: float, profile: str) -> list[float]:
    """Intended send times: evenly spaced (steady) or a morning peak (rush)."""
    if rate <= 0:
        return [0.0] * n
    if profile == "steady":
        return [i / rate for i in range(n)]
    # rush: the rate rises to 3x the base in the middle of the run and falls back
    # (a raised-cosine hump), the shape of a morning peak compressed in time.
    duration = n / (rate * 2.0)  # the hump's mean rate is twice the base rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        x = min(1.0, t / duration)
        t += 1.0 / (rate * (1.0 + (1.0 - math.cos(2 * math.pi * x))))
    return times


def build_ops(
    pop: Population,
    terminals: list[str],
    mix: dict[str, int],
    count: int,
    batch: int,
    rate: float,
    profile: str,
    zipf_s: float,
    seed: int,
) -> list[Op]:
    rng = random.Random(seed)
    zipf = Zipf(pop.count, zipf_s, rng)
    seqs = dict.fromkeys(terminals, 0)
    base = (int(time.time()) % 4_000) * 1_000_000  # fresh (terminal, seq) range per run
    when = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 8 * 3600))
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=count)
    times = _profile_times(count, rate, profile)
    ops: list[Op] = []
    for kind, at in zip(kinds, times, strict=True):
        terminal = rng.choice(terminals)
        if kind == "upload":
            recs = []
            for _ in range(batch):
                index, amount = zipf.draw(), rng.randrange(100, 400)
                if pop.chip(index).balance < amount:
                    continue  # a card refuses a ride it cannot pay for
                seqs[terminal] += 1
                recs.append(
                    pop.offline_record(index, amount, terminal, base + seqs[terminal], when)
                )
            if not recs:
                continue
            req: Any = upload_pb2.UploadBatch(
                batch_id=f"{terminal}-{seqs[terminal]}",
                records=recs,
                claimed_count=len(recs),
                claimed_total=sum(r.amount for r in recs),
            )
            ops.append(Op(kind, at, req, len(recs)))
            continue
        seqs[terminal] += 1
        seq = base + seqs[terminal]
        index = zipf.draw()
        amount = rng.choice([100, 200, 300, 400])
        if kind == "debit" and pop.chip(index).balance < amount:
            kind = "load"  # an empty card: its holder tops up instead of riding
        if kind == "load" and pop.chip(index).balance + 5_000 > PURSE_MAX:
            kind = "debit"  # a full purse: the holder rides instead
        if kind == "load":
            req = pop.load_request(index, 5_000, terminal, seq, when, rng.randbytes(4))
        else:
            req = pop.debit_request(index, amount, terminal, seq, when)
        ops.append(Op(kind, at, req))
    return ops


async def _send(
    op: Op,
    terminal: terminal_pb2_grpc.TerminalServiceStub,
    upload: upload_pb2_grpc.UploadServiceStub,
    report: Report,
) -> None:
    try:
        if op.kind == "upload":
            replies = [r async for r in upload.UploadRecords(iter([op.request]))]
            for res, rec in zip(replies[0].results, op.request.records, strict=True):
                name = upload_pb2.RecordOutcome.Name(res.outcome).removeprefix("RECORD_OUTCOME_")
                report.outcomes[f"upload {name}"] += 1
                if res.outcome in (
                    upload_pb2.RECORD_OUTCOME_POSTED,
                    upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION,
                ):
                    report.acknowledged.append((int(rec.terminal_id), rec.terminal_seq))
            report.records += op.records
            return
        call = terminal.Debit if op.kind == "debit" else terminal.Load
        reply = await call(op.request)
        name = common_pb2.TxnStatus.Name(reply.status).removeprefix("TXN_STATUS_")
        report.outcomes[f"{op.kind} {name}"] += 1
        if reply.status == common_pb2.TXN_STATUS_APPROVED:
            report.acknowledged.append((int(op.request.terminal_id), op.request.terminal_seq))
        report.records += 1
    except grpc.aio.AioRpcError as exc:
        key = f"{op.kind} error {exc.code().name}"
        report.outcomes[key] += 1
        report.errors.setdefault(key, exc.details() or "")


def open_channels(target: str, n: int) -> list[grpc.aio.Channel]:
    """``n`` channels on ``n`` TCP connections (a local subchannel pool each)."""
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(n)]


@contextlib.contextmanager
def collector_quiet() -> Iterator[None]:
    """Keep this process's garbage collection out of the latencies it reports.

    Open loop, every call meant to start during a pause of the client starts
    late and is counted from its intended time: full collections over the
    prepared requests took 50-110 ms each and made the p99 of a no-op server
    10-50 ms at 2,000 calls/s and 97-111 ms at 3,000 (without them: 2.7-5.5
    and 24-43 ms; benchmarks.throughput's open loop). A timed run
    makes no reference cycles (a collection after one found none), so the
    collector is simply off while it lasts, after one collection beforehand.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def run_ops(
    target: str,
    ops: list[Op],
    rate: float,
    concurrency: int,
    progress: Any = None,
    channels: int = 8,
    duration: float | None = None,
) -> Report:
    with collector_quiet():
        return await _run_ops(target, ops, rate, concurrency, progress, channels, duration)


async def _run_ops(
    target: str,
    ops: list[Op],
    rate: float,
    concurrency: int,
    progress: Any,
    channels: int,
    duration: float | None,
) -> Report:
    report = Report()
    chans = open_channels(target, max(1, channels))
    try:
        stubs = [
            (terminal_pb2_grpc.TerminalServiceStub(c), upload_pb2_grpc.UploadServiceStub(c))
            for c in chans
        ]
        start = time.perf_counter()
        deadline = start + duration if duration and rate <= 0 else math.inf
        sent = 0

        async def timed(op: Op, intended: float) -> None:
            nonlocal sent
            terminal, upload = stubs[sent % len(stubs)]
            sent += 1
            await _send(op, terminal, upload, report)
            done = time.perf_counter()
            report.record(op.kind, done - intended, done - start)
            if progress is not None:
                progress()

        if rate > 0:
            tasks = []
            for op in ops:
                intended = start + op.at
                delay = intended - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(timed(op, intended)))
            await asyncio.gather(*tasks)
        else:
            it = iter(ops)

            async def worker() -> None:
                for op in it:
                    now = time.perf_counter()
                    if now >= deadline:
                        return
                    await timed(op, now)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.perf_counter() - start
    finally:
        for c in chans:
            await c.close(None)
    return report


def embedded_dsn(data_dir: Path) -> str | None:
    """The DSN of the embedded PostgreSQL that ``onecard serve`` runs in ``data_dir``.

    Read from PostgreSQL's own ``postmaster.pid`` (its fourth line is the port),
    so the server needs to publish nothing for the load generator.
    """
    from onecard.server.app import EMBEDDED_DATABASE

    try:
        lines = (data_dir / "pg" / "postmaster.pid").read_text().splitlines()
        port = int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    return f"postgresql://postgres@127.0.0.1:{port}/{EMBEDDED_DATABASE}"


async def check_database(dsn: str, acknowledged: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(acknowledged missing, acknowledged posted more than once, trial balance)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT k.terminal_id, k.terminal_seq, count(p.posting_id) AS n
            FROM unnest($1::bigint[], $2::bigint[]) AS k(terminal_id, terminal_seq)
            LEFT JOIN postings p ON p.terminal_id = k.terminal_id
                                AND p.terminal_seq = k.terminal_seq
                                AND p.kind IN (1, 2)
            GROUP BY 1, 2
            """,
            [t for t, _ in acknowledged],
            [s for _, s in acknowledged],
        )
        missing = sum(1 for r in rows if r["n"] == 0)
        doubled = sum(1 for r in rows if r["n"] > 1)
        return missing, doubled, int(await trial_balance(conn))
    finally:
        await conn.close()


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = max(1, math.ceil(report.seconds))
    done = [0] * seconds
    worst = [0.0] * seconds
    for at, latency in report.timeline:
        i = min(seconds - 1, int(at))
        done[i] += 1
        worst[i] = max(worst[i], latency * 1e3)
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    a.plot(range(seconds), done)
    a.set_ylabel("requests done / s")
    b.plot(range(seconds), worst, color="tab:red")
    b.set_ylabel("max latency (ms)")
    b.set_xlabel("seconds since start")
    a.set_title("onecard loadtest")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_mix(text: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in KINDS or not weight.isdigit():
            raise argparse.ArgumentTypeError(
                f"--mix takes kind=weight pairs of {', '.join(KINDS)}, got {part!r}"
            )
        mix[name] = int(weight)
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("--mix needs at least one positive weight")
    return mix


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="server address (default: DATA_DIR/server.addr)")
    p.add_argument("--data-dir", type=Path, default=Path(".onecard"))
    p.add_argument(
        "--dsn",
        help="database to seed the population in and check afterwards "
        "(default: the embedded PostgreSQL of the server in --data-dir)",
    )
    p.add_argument("--cards", type=int, default=100_000, help="card population")
    p.add_argument("--terminals", type=int, default=2_000, help="terminals played")
    p.add_argument("--card-balance", type=int, default=20_000, help="opening balance, fen")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("debit=70,load=5,upload=25"))
    p.add_argument("--batch", type=int, default=100, help="records per upload batch")
    p.add_argument("--count", type=int, default=10_000, help="requests (an upload batch is one)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds; with --rate sets the count; closed loop stops at it or at --count",
    )
    p.add_argument("--rate", type=float, default=0.0, help="requests/s, open loop; 0: closed")
    p.add_argument("--concurrency", type=int, default=64, help="in flight, closed loop")
    p.add_argument(
        "--channels", type=int, default=8, help="TCP connections (spread over --workers)"
    )
    p.add_argument("--profile", choices=["steady", "rush"], default="steady")
    p.add_argument("--zipf", type=float, default=1.0, help="card popularity skew")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="draw throughput and latency over time (PNG)")


async def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    target = args.target or (args.data_dir / "server.addr").read_text().strip()
    if not args.dsn and not args.target:
        args.dsn = embedded_dsn(args.data_dir)
    keys = MemoryKeyStore(parse_key_document(DEV_KEYS, "dev keys"))
    version = keys.get(DEMO_ISSUER, 2)
    assert version is not None
    terminals: list[str]
    if args.dsn:
        conn = await asyncpg.connect(args.dsn)
        try:
            with console.status(f"seeding {args.cards:,} cards and {args.terminals:,} terminals"):
                await seed_cards(conn, args.cards, args.card_balance, version.kv)
                terminals = await seed_terminals(conn, args.terminals)
        finally:
            await conn.close()
    else:
        terminals = ["310400000001", "310400000002", "310400000003", "310400000004"]
    count = int(args.rate * args.duration) if args.duration and args.rate else args.count
    pop = Population(version, args.cards, args.card_balance)
    with console.status(f"signing {count:,} requests ahead"):
        ops = build_ops(
            pop,
            terminals,
            args.mix,
            count,
            args.batch,
            args.rate,
            args.profile,
            args.zipf,
            args.seed,
        )
    with Progress(
        TextColumn("[bold]load"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("ops", total=len(ops))
        report = await run_ops(
            target,
            ops,
            args.rate,
            args.concurrency,
            lambda: progress.advance(task),
            args.channels,
            args.duration,
        )
    summary = report.summary()
    table = Table(title=f"onecard loadtest: {summary['requests']:,} requests, "
                  f"{summary['records']:,} transactions in {summary['seconds']:.1f}s "
                  f"= {summary['records_per_second']:,.0f}/s")  # fmt: skip
    for col in ("kind", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for kind, lat in summary["latency_ms"].items():
        table.add_row(kind, *(f"{lat[q]:.1f}" for q in ("p50", "p95", "p99", "max")))
    console.print(table)
    for name, n in summary["outcomes"].items():
        console.print(f"  {name:<40}{n:>9,}")
        if name in report.errors:
            console.print(f"    first: {report.errors[name]}")
    code = 0
    if args.dsn:
        missing, doubled, tb = await check_database(args.dsn, report.acknowledged)
        summary["check"] = {
            "acknowledged": len(report.acknowledged),
            "missing": missing,
            "doubled": doubled,
            "trial_balance": tb,
        }
        ok = missing == 0 and doubled == 0 and tb == 0
        console.print(
            f"books: {len(report.acknowledged):,} acknowledged postings, {missing} missing, "
            f"{doubled} doubled, trial balance {tb} fen: "
            + ("[green]consistent[/green]" if ok else "[red]NOT CONSISTENT[/red]")
        )
        code = 0 if ok else 1
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + os.linesep)
    if args.plot:
        plot(report, args.plot)
    return code
