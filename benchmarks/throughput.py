"""End-to-end throughput: offline upload, online debits, group commit, card population.

``python -m benchmarks.throughput`` starts its own embedded PostgreSQL and real
``onecard serve`` processes on loopback and drives them from this process over
gRPC, so the figures include protobuf, gRPC, MAC checks, SQL and fsync'd
COMMITs. Each figure is a ratio against a baseline measured in the same run:

- ``upload``: offline records per second, acknowledged after COMMIT (batches of
  500 over several streams, each stream a gateway with its own cards).
- ``online``: unary Debit against a no-op TerminalService (same messages, same
  client, same concurrency, as many processes on the port as the ledger has
  workers): what the ledger costs over gRPC alone.
- ``batching``: the online workload with group commit against one transaction
  per request (``--max-batch 1``).
- ``scale``: upload throughput with a large card population against a small one.

Everything shares the machine's two cores: the client, the server and
PostgreSQL. The server runs in its own processes (``--workers``, as in
production), the client in this one; one client process is enough (it uses
about half a core at the online figure) and a second one would only take CPU
from the server. Every stream and every online channel is its own TCP
connection (a local subchannel pool): gRPC otherwise shares one connection
between channels to the same address, and the kernel's SO_REUSEPORT spreads
connections, not calls, so all load would reach one worker.

The online throughput and its ratio are closed loop (``--concurrency`` calls
in flight, what the server sustains), the no-op and the ledger measured in
``--rounds`` alternating rounds (the upload's small and large populations
likewise); the online p99 comes from a second,
open-loop run at ``--p99-load`` of that rate, latency counted from each call's
intended send time (coordinated omission corrected), because latency at
saturation only measures the queue the client builds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc

from onecard.clients.loadtest import Op, collector_quiet, open_channels, run_ops
from onecard.clients.population import BUS_TERMINALS, METRO_TERMINALS, Population, Zipf, seed_cards
from onecard.ledger.audit import trial_balance
from onecard.ledger.devdata import DEMO_ISSUER, DEV_KEYS, seed_demo_data
from onecard.ledger.engine import ONLINE_COMMITTER
from onecard.ledger.keys import KeyVersion, MemoryKeyStore, parse_key_document
from onecard.ledger.storage.migrate import apply_migrations
from onecard.server.config import ServerConfig
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.v1 import common_pb2, terminal_pb2, terminal_pb2_grpc, upload_pb2, upload_pb2_grpc

KEY_VERSION = 2  # sm4, the suite most cards in the field carry
OPENING_BALANCE = 100_000  # the standard product's purse maximum
WHEN = "20261123073000"
WORKERS = 2  # set from --workers

PG_SETTINGS = {
    # Durability stays as it is (fsync, synchronous_commit on); these only
    # give a checkpoint-free, cache-resident run, as a production box would be.
    # Room for the 10,000,000-card working set (cards, postings, their
    # indexes: about 3.5 GB after the run). With 2 GB, evicting dirty card
    # pages cost the large upload 15% (27,300 against 32,200 records/s).
    "shared_buffers": "6GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "wal_buffers": "64MB",
    # Where the database's time goes, printed after the upload run.
    "shared_preload_libraries": "pg_stat_statements",
}
# BENCH_PG="name=value,..." adds or overrides settings, to compare one in a run.
PG_SETTINGS.update(
    (k, v)
    for k, _, v in (kv.partition("=") for kv in os.environ.get("BENCH_PG", "").split(",") if kv)
)


@dataclass
class Rate:
    count: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @staticmethod
    def merge(rates: Sequence[Rate]) -> Rate:
        return Rate(
            sum(r.count for r in rates),
            sum(r.seconds for r in rates),
            [x for r in rates for x in r.latencies],
        )

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- processes


class ServerProcess:
    """``onecard serve`` (or the no-op servicer) in a child process."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, python: str = sys.executable
    ) -> None:
        self.proc = subprocess.Popen(
            [python, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        banner = ""
        while "serving gRPC on " not in banner:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited before serving:\n{banner}")
            banner += line
        self.address = banner.split("serving gRPC on ")[1].split()[0]
        #: The Prometheus endpoint, when started with --metrics-listen.
        self.metrics_url = (
            banner.split("onecard metrics on ")[1].split()[0]
            if "onecard metrics on " in banner
            else None
        )
        # Keep draining its output: a full pipe would stall the server mid-run.
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        if os.environ.get("BENCH_SERVER_LOG"):
            sys.stderr.writelines(self.log)


def ledger_server(
    dsn: str, keys: Path, data_dir: Path, *extra: str, python: str | None = None
) -> ServerProcess:
    """``onecard serve --workers`` on ``dsn``; ``python`` runs another installation's.

    Another installation's server starts with ``-P``, so that it imports its
    own ``onecard`` rather than this checkout's from the working directory.
    """
    # An operator's personal-data key, as --dsn requires (one per run is enough).
    pii_key = keys.with_name("pii-key")
    if not pii_key.exists():
        pii_key.write_text(os.urandom(32).hex())
        pii_key.chmod(0o600)
    return ServerProcess(
        [
            *(["-P"] if python else []),
            "-m",
            "onecard.server.cli",
            "--log-level",
            os.environ.get("BENCH_SERVER_LOG", "WARNING"),
            "serve",
            "--dsn",
            dsn,
            "--keys",
            str(keys),
            "--pii-key-file",
            str(pii_key),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--pool-size",
            "4",
            "--workers",
            str(WORKERS),
            *extra,
        ],
        python=python or sys.executable,
    )


class _NoopTerminal(terminal_pb2_grpc.TerminalServiceServicer):  # type: ignore[misc]
    async def Debit(
        self, request: terminal_pb2.DebitRequest, context: object
    ) -> terminal_pb2.DebitReply:
        return terminal_pb2.DebitReply(
            status=common_pb2.TXN_STATUS_APPROVED, balance_after=OPENING_BALANCE
        )


#: gRPC servers per process, the ledger's default (``onecard serve --acceptors``).
ACCEPTORS = ServerConfig().acceptors


async def _noop_main(listen: str, acceptors: int) -> None:
    servers = []
    port = 0
    for _ in range(acceptors):
        server = grpc.aio.server()  # gRPC sets SO_REUSEPORT: several may share the port
        terminal_pb2_grpc.add_TerminalServiceServicer_to_server(_NoopTerminal(), server)
        port = server.add_insecure_port(listen if not port else f"127.0.0.1:{port}")
        await server.start()
        servers.append(server)
    print(f"no-op serving gRPC on 127.0.0.1:{port}", flush=True)
    await servers[0].wait_for_termination()


def start_noops(count: int, acceptors: int = ACCEPTORS) -> list[ServerProcess]:
    """``count`` no-op servicer processes sharing one port, as the ledger's workers do.

    One process tops out at one core (1.03 cores at 3,860 calls/s), which
    would make the baseline a single process's limit rather than gRPC's cost.
    Each process runs as many gRPC servers as a ledger worker (``acceptors``),
    so the baseline takes calls the way the ledger does.
    """
    noop = ["-m", "benchmarks.throughput", "--noop-server", "--noop-acceptors", str(acceptors)]
    noops = [ServerProcess(noop)]
    while len(noops) < count:
        noops.append(ServerProcess([*noop, "--noop-listen", noops[0].address]))
    return noops


def histogram_buckets(url: str, metric: str, **labels: str) -> dict[float, float]:
    """Cumulative counts by upper bound (seconds) of one of the server's histograms.

    Series whose labels include ``labels`` are summed (with ``--workers`` the
    parent serves the workers' sum already).
    """
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "_bucket{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            le = math.inf if found["le"] == "+Inf" else float(found["le"])
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def call_buckets(url: str, method: str) -> dict[float, float]:
    """The call histogram of ``method``, OK calls (request in, reply after COMMIT)."""
    return histogram_buckets(url, "onecard_rpc_duration_seconds", method=method, code="OK")


#: What the open-loop run scrapes besides the calls: the online flushes and
#: the workers' event-loop lag, so the p99 can be split by where it was spent.
INSIDE_HISTOGRAMS: tuple[tuple[str, dict[str, str]], ...] = (
    ("onecard_flush_duration_seconds", {"committer": ONLINE_COMMITTER}),
    ("onecard_event_loop_lag_seconds", {}),
)


def inside_buckets(url: str) -> list[dict[float, float]]:
    return [histogram_buckets(url, metric, **labels) for metric, labels in INSIDE_HISTOGRAMS]


def bucket_p99(before: dict[float, float], after: dict[float, float]) -> tuple[float, int]:
    """(upper bound in ms of the bucket holding the p99, calls) between two scrapes."""
    cum = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = cum[-1][1] if cum else 0.0
    for le, n in cum:
        if n >= 0.99 * total:
            return le * 1e3, int(total)
    return math.inf, int(total)


# --------------------------------------------------------------------------- workloads


def upload_streams(
    pop: Population, streams: int, records: int, batch: int, seq_base: int, rng: random.Random
) -> list[list[upload_pb2.UploadBatch]]:
    """Per stream (gateway), its batches; each card belongs to one stream, records in chip order."""
    terminals = BUS_TERMINALS + METRO_TERMINALS
    per_stream = records // streams
    out = []
    for s in range(streams):
        terminal = terminals[s % len(terminals)]
        seq0 = seq_base + s * per_stream
        recs = []
        for i in range(per_stream):
            index = rng.randrange(pop.count // streams) * streams + s
            recs.append(
                pop.offline_record(index, rng.randrange(100, 400), terminal, seq0 + i, WHEN)
            )
        out.append(
            [
                upload_pb2.UploadBatch(
                    batch_id=f"s{s}-{j}",
                    records=recs[j : j + batch],
                    claimed_count=len(recs[j : j + batch]),
                    claimed_total=sum(r.amount for r in recs[j : j + batch]),
                )
                for j in range(0, per_stream, batch)
            ]
        )
    return out


async def run_upload(address: str, streams: list[list[upload_pb2.UploadBatch]]) -> Rate:
    channels = open_channels(address, len(streams))
    try:
        latencies: list[float] = []
        counted = 0

        async def one(batches: Sequence[upload_pb2.UploadBatch], channel: grpc.aio.Channel) -> None:
            nonlocal counted
            stub = upload_pb2_grpc.UploadServiceStub(channel)
            sent: list[float] = []

            async def gen() -> AsyncIterator[upload_pb2.UploadBatch]:
                for b in batches:
                    sent.append(time.perf_counter())
                    yield b

            i = 0
            async for reply in stub.UploadRecords(gen()):
                latencies.append(time.perf_counter() - sent[i])
                i += 1
                bad = [
                    r
                    for r in reply.results
                    if r.outcome
                    not in (
                        upload_pb2.RECORD_OUTCOME_POSTED,
                        upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION,
                    )
                ]
                if bad:
                    raise RuntimeError(f"unexpected outcome in {reply.batch_id}: {bad[0]}")
                counted += len(reply.results)

        with collector_quiet():
            began = time.perf_counter()
            await asyncio.gather(*(one(s, c) for s, c in zip(streams, channels, strict=True)))
            return Rate(counted, time.perf_counter() - began, latencies)
    finally:
        for c in channels:
            await c.close(None)


def debit_requests(
    pop: Population,
    n: int,
    seq_base: int,
    rng: random.Random,
    *,
    zipf_s: float = 1.0,
    fare: int = 20,
) -> list[terminal_pb2.DebitRequest]:
    """``n`` signed debits at the gates, cards drawn by popularity (Zipf, ``zipf_s``)."""
    zipf = Zipf(pop.count, zipf_s, rng)
    gates = METRO_TERMINALS + BUS_TERMINALS
    return [
        pop.debit_request(zipf.draw(), fare, gates[i % len(gates)], seq_base + i, WHEN)
        for i in range(n)
    ]


async def run_online(
    address: str, requests: list[terminal_pb2.DebitRequest], concurrency: int, channels: int
) -> Rate:
    chans = open_channels(address, channels)
    try:
        stubs = [terminal_pb2_grpc.TerminalServiceStub(c) for c in chans]
        latencies: list[float] = []
        it = iter(requests)
        refused = 0

        async def worker(stub: terminal_pb2_grpc.TerminalServiceStub) -> None:
            nonlocal refused
            for req in it:
                t = time.perf_counter()
                reply = await stub.Debit(req)
                latencies.append(time.perf_counter() - t)
                if reply.status != common_pb2.TXN_STATUS_APPROVED:
                    refused += 1

        with collector_quiet():
            began = time.perf_counter()
            await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
            elapsed = time.perf_counter() - began
        if refused:
            raise RuntimeError(f"{refused} debits were not approved")
        return Rate(len(latencies), elapsed, latencies)
    finally:
        for c in chans:
            await c.close(None)


async def run_online_open(
    address: str, requests: list[terminal_pb2.DebitRequest], rate: float, channels: int
) -> tuple[float, float, int]:
    """(p99 ms from the intended send time, achieved calls/s, calls not approved)."""
    ops = [Op("debit", i / rate, req) for i, req in enumerate(requests)]
    report = await run_ops(address, ops, rate, 0, channels=channels)
    summary = report.summary()
    others = {k: n for k, n in report.outcomes.items() if k != "debit APPROVED"}
    if others:
        # Which ones: a status (the cards' purses ran out) or a gRPC error
        # (CANCELLED when the server's backlog overflowed) call for different fixes.
        print(f"    not approved at {rate:,.0f}/s: {others}", flush=True)
    return (
        summary["latency_ms"]["debit"]["p99"],
        len(requests) / report.seconds,
        sum(others.values()),
    )


# --------------------------------------------------------------------------- setup


async def empty_db(pg: EmbeddedPostgres, name: str) -> str:
    """A new database ``name`` (dropped first if a run left it): its DSN."""
    admin = await asyncpg.connect(pg.dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return pg.dsn(name)


async def prepare_db(pg: EmbeddedPostgres, name: str, cards: int, index_fill: int = 0) -> str:
    """A database of ``cards`` cards, each with its opening load posted.

    Seeding posts the opening loads in card order, which packs the leaves of
    the postings' card index (``postings_card_idx``) 90% full, as B-tree
    appends do; every leaf then splits the first time records land on it at
    random, and at 10,000,000 cards the measured rounds pay that split storm
    on nearly every leaf (100 MB more WAL for 600,000 records; README,
    Performance, 2026-12-03 evening). A ledger that has taken rides for a
    while has leaves about 70% full, as random inserts leave them.
    ``index_fill`` (percent) rebuilds the index that full after seeding; 0
    leaves it as seeding built it.
    """
    dsn = await empty_db(pg, name)
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        await seed_demo_data(conn)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        began = time.perf_counter()
        await seed_cards(conn, cards, OPENING_BALANCE, KEY_VERSION)
        print(f"  seeded {cards:,} cards in {time.perf_counter() - began:.1f}s ({name})")
        if index_fill:
            await conn.execute(f"ALTER INDEX postings_card_idx SET (fillfactor = {index_fill})")
            await conn.execute("REINDEX INDEX postings_card_idx")
            await conn.execute("ALTER INDEX postings_card_idx RESET (fillfactor)")
            print(f"  postings_card_idx rebuilt with leaves {index_fill}% full ({name})")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return dsn


async def reset_statements(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def show_statements(dsn: str, seconds: float) -> None:
    """The statements that took the database's time, as a share of the run's wall time."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT calls, total_exec_time, total_plan_time, rows, wal_bytes, wal_fpi,"
            " regexp_replace(query, '\\s+', ' ', 'g') AS q"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT 8"
        )
    finally:
        await conn.close()
    # WAL per statement: full-page images (the first change to a page after a
    # checkpoint) are what a large card population costs.
    print(
        f"    {'calls':>7}{'ms total':>10}{'% of run':>9}{'plan ms':>9}{'rows':>9}{'WAL MB':>8}"
        f"{'FPIs':>8}"
        "  statement"
    )
    for r in rows:
        share = r["total_exec_time"] / 1e3 / seconds * 100
        print(
            f"    {r['calls']:>7}{r['total_exec_time']:>10.0f}{share:>8.0f}%"
            f"{r['total_plan_time']:>9.0f}{r['rows']:>9}"
            f"{int(r['wal_bytes']) / 1e6:>8.1f}{r['wal_fpi']:>8}  {r['q'][:60]}"
        )


async def check_books(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        tb = await trial_balance(conn)
        if tb != 0:
            raise SystemExit(f"trial balance is {tb} fen, not zero: money was created or lost")
    finally:
        await conn.close()


def describe(label: str, r: Rate, unit: str, extra: str = "") -> None:
    print(
        f"  {label:<28}{r.count:>9,} {unit} in {r.seconds:6.2f}s = {r.per_second:>9,.0f}/s"
        f"   p50 {r.percentile(0.5) * 1e3:6.1f} ms  p99 {r.percentile(0.99) * 1e3:6.1f} ms{extra}"
    )


async def wal_written(dsn: str) -> tuple[float, int]:
    """(MB of WAL, full-page images) written by the statements since the last reset."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(wal_bytes), 0) AS b, coalesce(sum(wal_fpi), 0) AS f"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["b"]) / 1e6, int(row["f"])


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system, all threads) of ``root`` and its descendants, from /proc.

    The ledger's workers are children of ``onecard serve``; PostgreSQL's
    backends are children of the postmaster. Every process here lives through
    the round (pooled connections), so nothing is lost to an exit.
    """
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    total, todo = 0.0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


@dataclass
class CpuMeter:
    """CPU seconds of the ledger server, PostgreSQL and this client, summed over rounds."""

    postmaster: int
    used: dict[str, float]
    #: What the servers measured are called in the printout.
    label: str = "ledger"

    def sample(self, *servers: ServerProcess) -> dict[str, float]:
        t = os.times()
        return {
            self.label: sum(tree_cpu(server.proc.pid) for server in servers),
            "PostgreSQL": tree_cpu(self.postmaster),
            "client": t.user + t.system,
        }

    def add(self, before: dict[str, float], after: dict[str, float]) -> None:
        for k in after:
            self.used[k] = self.used.get(k, 0.0) + after[k] - before[k]

    def per_record(self, records: int, seconds: float, unit: str = "record") -> str:
        parts = [f"{k} {v / records * 1e6:.1f}" for k, v in self.used.items()]
        busy = sum(self.used.values()) / seconds / (os.cpu_count() or 1)
        return f"CPU a {unit} (us): {', '.join(parts)}; cores {busy:.0%} busy"


async def table_pages(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_relation_size($1::regclass) / 8192", table))
    finally:
        await conn.close()


def dev_card_keys(tmp: Path) -> tuple[KeyVersion, Path]:
    """The card key version the populations are made with, and a key file for the servers.

    The development keys of PROTOCOL.md, written where only this run reads them.
    """
    version = MemoryKeyStore(parse_key_document(DEV_KEYS, "dev keys")).get(DEMO_ISSUER, KEY_VERSION)
    assert version is not None
    key_file = tmp / "keys.json"
    key_file.write_text(json.dumps(DEV_KEYS))
    key_file.chmod(0o600)
    return version, key_file


async def run(args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-bench-"))
    version, key_file = dev_card_keys(tmp)
    pg = EmbeddedPostgres(tmp / "pg", settings=PG_SETTINGS)
    await asyncio.to_thread(pg.start)
    results: dict[str, float] = {}
    bench = _Bench(args, rng, version, tmp, key_file, pg)
    try:
        print("setting up")
        small = await prepare_db(pg, "small", args.small, args.card_index_fill)
        if args.only in ("all", "upload"):
            large = await prepare_db(pg, "large", args.large, args.card_index_fill)
            results.update(await bench.uploads(small, large))
        if args.only in ("all", "online"):
            results.update(await bench.onlines(small))
    finally:
        await asyncio.to_thread(pg.stop)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    print()
    if "upload" in results:
        print(f"upload: {results['upload']:.0f} records/s durable")
    if "online" in results:
        print(
            f"online: {results['online']:.0f} debits/s, p99 {results['online_p99_ms']:.1f} ms, "
            f"{results['online_ratio']:.2f} of no-op"
        )
        print(f"batching: {results['batching']:.1f}x")
    if "scale" in results:
        print(f"scale: {results['scale']:.2f} of small")
    return results


@dataclass
class _Bench:
    args: argparse.Namespace
    rng: random.Random
    version: KeyVersion
    tmp: Path
    key_file: Path
    pg: EmbeddedPostgres

    async def uploads(self, small: str, large: str) -> dict[str, float]:
        """Offline upload on both populations: the upload and scale figures.

        Throughput is measured in steady state. Right after a checkpoint the
        first change to each page writes the whole page to WAL; a population
        of 10,000,000 cards has about 130,000 card pages, so at the target rate
        that lasts some ten seconds of every checkpoint interval (30 minutes
        here), and a five-second sample taken then would measure the interval's
        first seconds only. That round is timed and shown on its own line
        (``right after a checkpoint``) with its WAL; the figures come from
        rounds after every card page has been written once since.
        """
        args, rng = self.args, self.rng
        print("offline upload")
        pops, servers = {}, {}
        dsns = {"small": small, "large": large}
        counts = {"small": args.small, "large": args.large}
        per_round = args.records // args.rounds
        after: dict[str, Rate] = {}
        rounds: dict[str, list[Rate]] = {"small": [], "large": []}
        try:
            for name, dsn in dsns.items():
                pops[name] = Population(self.version, counts[name], OPENING_BALANCE)
                servers[name] = ledger_server(dsn, self.key_file, self.tmp / f"srv-{name}")
                # Connections and caches up, a few thousand records only.
                warm = upload_streams(
                    pops[name], args.streams, args.streams * 500, 500, 10_000_000, rng
                )
                await run_upload(servers[name].address, warm)
                await reset_statements(dsn)
            for name, dsn in dsns.items():
                streams = upload_streams(pops[name], args.streams, per_round, 500, 1_000_000, rng)
                after[name] = await run_upload(servers[name].address, streams)
                wal_mb, fpis = await wal_written(dsn)
                describe(
                    f"{counts[name]:,} cards, right after a checkpoint",
                    after[name],
                    "records",
                    f", {wal_mb:,.0f} MB WAL, {fpis:,} full pages",
                )
            # Every card page of the large population written once since the
            # checkpoint, as through all but the first seconds of an interval:
            # three records per page touch 95% of pages (1 - e^-3).
            pages = await table_pages(large, "cards")
            warm = upload_streams(pops["large"], args.streams, 3 * pages, 500, 30_000_000, rng)
            await run_upload(servers["large"].address, warm)
            for dsn in dsns.values():
                await reset_statements(dsn)
            # Small and large populations in alternating rounds, both servers
            # up, so that the machine's drift hits both alike.
            postmaster = int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])
            meters = {name: CpuMeter(postmaster, {}) for name in dsns}
            for r in range(args.rounds):
                for name in dsns:
                    streams = upload_streams(
                        pops[name], args.streams, per_round, 500, 20_000_000 + r * per_round, rng
                    )
                    before = meters[name].sample(servers[name])
                    rounds[name].append(await run_upload(servers[name].address, streams))
                    meters[name].add(before, meters[name].sample(servers[name]))
        finally:
            for server in servers.values():
                server.stop()
        rates = {name: Rate.merge(rs) for name, rs in rounds.items()}
        for name, dsn in dsns.items():
            describe(f"{counts[name]:,} cards, batches of 500", rates[name], "records")
            print(f"    {meters[name].per_record(rates[name].count, rates[name].seconds)}")
            await show_statements(dsn, rates[name].seconds)
            await check_books(dsn)
        print(
            f"  scale right after a checkpoint: "
            f"{after['large'].per_second / after['small'].per_second:.2f} of small"
            f" (one round each; {pages:,} card pages in the large population)"
        )
        return {
            "upload": rates["small"].per_second,
            "scale": rates["large"].per_second / rates["small"].per_second,
        }

    async def onlines(self, small: str) -> dict[str, float]:
        """Online debits against the no-op servicer and with and without group commit."""
        args, rng, tmp, key_file = self.args, self.rng, self.tmp, self.key_file
        print("online debits")
        pop = Population(self.version, args.small, OPENING_BALANCE)
        n = args.debits
        # The no-op and the ledger are measured in alternating rounds, both
        # servers up (an idle one costs nothing), so that the machine's drift
        # (a shared 2-core VM moves by a fifth within minutes) hits both alike.
        noops = start_noops(WORKERS)
        # Its metrics endpoint tells how much of the client's latency the
        # servicers themselves account for (request in to reply after COMMIT).
        server = ledger_server(
            small, key_file, tmp / "srv-online", "--metrics-listen", "127.0.0.1:0"
        )
        try:
            await run_online(
                server.address,
                debit_requests(pop, n // 5, 50_000_000, rng, zipf_s=args.zipf),
                args.concurrency,
                args.channels,
            )
            bases, onlines = [], []
            per_round = n // args.rounds
            await reset_statements(small)
            postmaster = int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])
            noop_cpu = CpuMeter(postmaster, {}, "no-op")
            ledger_cpu = CpuMeter(postmaster, {})
            for r in range(args.rounds):
                # Requests are signed before the meters start: that is not the call's cost.
                reqs = debit_requests(pop, per_round, r * per_round, rng, zipf_s=args.zipf)
                before = noop_cpu.sample(*noops)
                bases.append(
                    await run_online(noops[0].address, reqs, args.concurrency, args.channels)
                )
                noop_cpu.add(before, noop_cpu.sample(*noops))
                seq0 = 60_000_000 + r * per_round
                reqs = debit_requests(pop, per_round, seq0, rng, zipf_s=args.zipf)
                before = ledger_cpu.sample(server)
                onlines.append(
                    await run_online(server.address, reqs, args.concurrency, args.channels)
                )
                ledger_cpu.add(before, ledger_cpu.sample(server))
            base, online = Rate.merge(bases), Rate.merge(onlines)
            await show_statements(small, online.seconds)
            open_rate = online.per_second * args.p99_load
            open_n = int(open_rate * args.p99_seconds)
            # The same open-loop run against the no-op first: what the client
            # and gRPC alone add to the p99 at this rate on these two cores.
            noop_p99, noop_achieved, _ = await run_online_open(
                noops[0].address,
                debit_requests(pop, open_n, 80_000_000, rng, zipf_s=args.zipf),
                open_rate,
                args.channels,
            )
            assert server.metrics_url is not None
            method = "TerminalServicer.Debit"
            calls_before = await asyncio.to_thread(call_buckets, server.metrics_url, method)
            inside_before = await asyncio.to_thread(inside_buckets, server.metrics_url)
            p99, achieved, refused = await run_online_open(
                server.address,
                debit_requests(pop, open_n, 65_000_000, rng, zipf_s=args.zipf),
                open_rate,
                args.channels,
            )
            calls_after = await asyncio.to_thread(call_buckets, server.metrics_url, method)
            inside_after = await asyncio.to_thread(inside_buckets, server.metrics_url)
            servicer_p99, servicer_calls = bucket_p99(calls_before, calls_after)
            (flush_p99, flushes), (lag_p99, lags) = (
                bucket_p99(b, a) for b, a in zip(inside_before, inside_after, strict=True)
            )
            if refused:
                raise RuntimeError(f"{refused} open-loop debits were not approved or failed")
        finally:
            server.stop()
            for noop in noops:
                noop.stop()
        describe("no-op servicer", base, "debits")
        print(f"    {noop_cpu.per_record(base.count, base.seconds, 'debit')}")
        describe("group commit", online, "debits")
        print(f"    {ledger_cpu.per_record(online.count, online.seconds, 'debit')}")
        for label, rate_p99, done in (
            ("open loop, no-op", noop_p99, noop_achieved),
            ("open loop", p99, achieved),
        ):
            print(
                f"  {label:<28}{open_rate:>9,.0f}/s offered, {done:,.0f}/s done"
                f"   p99 {rate_p99:6.1f} ms from the intended send time"
            )
        print(
            f"  {'open loop, in the servicers':<28}{servicer_calls:>9,} calls"
            f"{'':>21}p99 <= {servicer_p99:g} ms (server histogram: request in, reply after COMMIT)"
        )
        print(
            f"  {'open loop, online flushes':<28}{flushes:>9,} flushes"
            f"{'':>19}p99 <= {flush_p99:g} ms (one transaction, MAC checks to COMMIT)"
        )
        print(
            f"  {'open loop, event loop lag':<28}{lags:>9,} samples"
            f"{'':>19}p99 <= {lag_p99:g} ms (a 10 ms timer's lateness in the workers)"
        )
        naive_server = ledger_server(small, key_file, tmp / "srv-naive", "--max-batch", "1")
        try:
            naive = await run_online(
                naive_server.address,
                debit_requests(pop, n // 2, 70_000_000, rng, zipf_s=args.zipf),
                args.concurrency,
                args.channels,
            )
        finally:
            naive_server.stop()
        describe("one transaction per debit", naive, "debits")
        await check_books(small)
        return {
            "online": online.per_second,
            "online_p99_ms": p99,
            "online_servicer_p99_ms": servicer_p99,
            "online_ratio": online.per_second / base.per_second,
            "batching": online.per_second / naive.per_second,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--small", type=int, default=100_000, help="cards in the small population")
    parser.add_argument("--large", type=int, default=10_000_000, help="cards in the large one")
    parser.add_argument(
        "--records",
        type=int,
        default=600_000,
        help="offline records per population, over --rounds (rounds of 66,000 moved scale by 0.2)",
    )
    parser.add_argument("--streams", type=int, default=8, help="concurrent upload streams")
    parser.add_argument(
        "--card-index-fill",
        type=int,
        choices=range(0, 101),
        metavar="PERCENT",
        default=70,
        help="rebuild the postings' card index this full after seeding, as a ledger in "
        "use has it (0: as seeding in card order packs it, 90%%)",
    )
    parser.add_argument("--debits", type=int, default=20_000, help="online debits per run")
    parser.add_argument("--concurrency", type=int, default=128, help="debits in flight")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds: no-op/ledger (online), small/large (upload)",
    )
    parser.add_argument("--channels", type=int, default=8, help="client TCP connections")
    parser.add_argument(
        "--p99-load", type=float, default=0.8, help="open-loop rate for the p99, x closed loop"
    )
    parser.add_argument("--p99-seconds", type=float, default=10.0, help="open-loop run length")
    parser.add_argument(
        "--zipf",
        type=float,
        default=1.0,
        help="online card skew (0.0001: about uniform; s = 1 puts 8%% of debits on one card)",
    )
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--workers", type=int, default=2, help="onecard serve --workers")
    parser.add_argument("--quick", action="store_true", help="a 1,000,000-card large population")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--only",
        choices=("all", "upload", "online"),
        default="all",
        help="run one workload (upload includes scale)",
    )
    parser.add_argument("--noop-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--noop-listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    parser.add_argument("--noop-acceptors", type=int, default=ACCEPTORS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.noop_server:
        import uvloop

        uvloop.run(_noop_main(args.noop_listen, args.noop_acceptors))
        return 0
    global WORKERS
    WORKERS = args.workers
    if args.quick:
        args.large = min(args.large, 1_000_000)
    import uvloop

    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
