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

Calls that end in a gRPC error (a full queue's RESOURCE_EXHAUSTED, a
cancellation, an outage, no answer within ``--timeout``: DEADLINE_EXCEEDED,
so a stalled server cannot keep the run from its report) are counted as
outcomes of their own and timed apart: a refusal answered in a millisecond
would otherwise pull the answered calls' percentiles down exactly when the
server is overloaded.

Afterwards the books are checked in the database, set-based: every
acknowledged request has exactly one posting with its card, amount, kind and
direction; a request answered as not posted has none under its identity; an
unanswered one has at most one; the trial balance is zero and every balance
equals its postings. The database is ``--dsn`` or, for a server started by
``onecard serve`` on its embedded PostgreSQL in ``--data-dir``, that one; when
there is neither, the report says the books were not checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from hdrh.histogram import HdrHistogram

from onecard.clients.population import Population, Zipf, seed_cards, seed_terminals
from onecard.clients.terminal import approved
from onecard.ledger.accounts import PURSE_BASE
from onecard.ledger.audit import balance_discrepancies, trial_balance
from onecard.ledger.devdata import DEMO_ISSUER, DEV_KEYS
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.ledger.model import PostingKind
from onecard.server.dsn import dsn_problem
from onecard.v1 import (
    common_pb2,
    terminal_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
)

KINDS = ("debit", "load", "upload")
PURSE_MAX = 100_000  # the demo standard product's
#: The most a chip's purse can hold: 4 bytes on the card (PROTOCOL.md); the
#: records the run uploads carry it as ``card_balance_before``.
CHIP_BALANCE_MAX = 0xFFFFFFFF
#: The rush profile's rate is the mean times ``1 - RUSH_SWING * cos(2 pi x)`` at
#: fraction x of the run: half the mean at its ends, 1.5 times it at the peak.
RUSH_SWING = 0.5
#: Seconds of schedule between two loads of one card. A card is at one top-up
#: machine at a time; two of its loads in flight at once could reach the
#: ledger in the other order, and the later counter first makes the earlier
#: load a stale one (STALE_COUNTER), which no real card ever sees.
LOAD_GAP = 10.0
#: Cards drawn for one offline ride before its holder must top up (build_ops).
RIDE_DRAWS = 100
#: Terminal seqs are unsigned 32-bit on the wire (PROTOCOL.md).
MAX_TERMINAL_SEQ = 2**32 - 1


def _new_histogram() -> HdrHistogram:
    return HdrHistogram(1, 600_000_000, 3)


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
    #: latency of calls the server answered, per kind
    hist: dict[str, HdrHistogram] = field(default_factory=dict)
    #: latency of calls that ended in a gRPC error, per kind
    failed_hist: dict[str, HdrHistogram] = field(default_factory=dict)
    timeline: list[tuple[float, float, bool]] = field(default_factory=list)  # (done at, s, ok)
    #: (op, reply) of every answered call, read only after the run (see expectations)
    answered: list[tuple[Op, Any]] = field(default_factory=list)
    #: ops whose call ended in a gRPC error: the server may or may not have posted them
    unanswered: list[Op] = field(default_factory=list)
    #: transactions (an upload batch's records, or a debit or load) of answered calls
    records: int = 0
    #: transactions of calls that ended in a gRPC error
    failed_records: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # first detail per error kind

    def record(self, kind: str, latency: float, done_at: float, ok: bool = True) -> None:
        hists = self.hist if ok else self.failed_hist
        h = hists.get(kind)
        if h is None:
            h = hists[kind] = _new_histogram()
        h.record_value(max(1, int(latency * 1e6)))
        self.timeline.append((done_at, latency, ok))

    def summary(self) -> dict[str, Any]:
        answered = sum(h.get_total_count() for h in self.hist.values())
        failed = sum(h.get_total_count() for h in self.failed_hist.values())
        requests = answered + failed
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 3),
            "requests": requests,
            "answered": answered,
            "failed": failed,
            "failed_share": round(failed / requests, 4) if requests else 0.0,
            "records": self.records,
            "records_per_second": round(self.records / self.seconds, 1) if self.seconds else 0,
            "failed_records": self.failed_records,
            "outcomes": dict(sorted(self.outcomes.items())),
            "errors": self.errors,
            "latency_ms": _percentiles(self.hist),
            "failed_latency_ms": _percentiles(self.failed_hist),
        }
        return out


def _percentiles(hists: dict[str, HdrHistogram]) -> dict[str, dict[str, float]]:
    return {
        kind: {
            "calls": h.get_total_count(),
            **{
                q: h.get_value_at_percentile(p) / 1e3
                for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
            },
        }
        for kind, h in sorted(hists.items())
    }


def _profile_times(n: int, rate: float, profile: str) -> list[float]:
    """Intended send times of ``n`` requests at a mean of ``rate`` a second.

    Both profiles span ``n / rate`` seconds, so ``--duration`` and ``--rate``
    mean the same whatever the profile. Rush is the shape of a morning peak
    compressed in time, a raised-cosine hump (RUSH_SWING) whose mean is the
    mean asked for. Each time inverts the cumulative count exactly (Newton):
    summing per-request gaps drifts, and the run would not end on time.
    """
    if rate <= 0:
        return [0.0] * n
    span = n / rate
    if profile == "steady":
        return [i / rate for i in range(n)]
    # Requests due by fraction x of the span, as a fraction of n:
    # g(x) = x - RUSH_SWING sin(2 pi x) / (2 pi), g' = 1 - RUSH_SWING cos(2 pi x) > 0.
    two_pi, a = 2 * math.pi, RUSH_SWING
    times, x = [], 0.0
    for i in range(n):
        target = i / n
        for _ in range(50):
            g = x - a * math.sin(two_pi * x) / two_pi
            step = (g - target) / (1 - a * math.cos(two_pi * x))
            x -= step
            if abs(step) < 1e-12:
                break
        times.append(x * span)
    return times


async def last_terminal_seq(conn: asyncpg.Connection, terminals: list[str]) -> int:
    """The highest terminal seq any of ``terminals`` has used (0 if none).

    One backward index probe per terminal: a max() over the range of
    terminals would read every transaction they ever made.
    """
    last = await conn.fetchval(
        """SELECT coalesce(max(x.seq), 0)
           FROM unnest($1::bigint[]) AS t(id),
           LATERAL (SELECT terminal_seq AS seq FROM terminal_txns
                    WHERE terminal_id = t.id ORDER BY terminal_seq DESC LIMIT 1) AS x""",
        [int(t) for t in terminals],
    )
    return int(last)


def _rides(
    pop: Population, zipf: Zipf, rng: random.Random, n: int
) -> tuple[list[tuple[int, int]], list[int] | None]:
    """An upload batch's ``n`` rides (card, fen), each by a card that can pay for it.

    A card refuses a ride it cannot pay for; the next rider's card is drawn
    instead (up to ``RIDE_DRAWS`` draws a ride). When none of them could pay,
    the cards drawn are returned second: one of their holders must top up
    first. Nothing is signed here, so no chip moves for a batch not sent.
    """
    rides: list[tuple[int, int]] = []
    spent: Counter[int] = Counter()
    for _ in range(n):
        amount = rng.randrange(100, 400)
        tried = []
        for _ in range(RIDE_DRAWS):
            index = zipf.draw()
            if pop.chip(index).balance - spent[index] >= amount:
                break
            tried.append(index)
        else:
            return rides, tried
        spent[index] += amount
        rides.append((index, amount))
    return rides, None


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
    seq_base: int | None = None,
) -> list[Op]:
    """The run's requests, signed, in send order.

    ``seq_base``: every terminal's seqs start above it (the highest the
    database holds for these terminals). Without a database the range comes
    from the clock, and runs 4,000 s apart could reuse one another's
    (terminal, seq) and be answered DUPLICATE or CONFLICT.
    """
    rng = random.Random(seed)
    zipf = Zipf(pop.count, zipf_s, rng)
    seqs = dict.fromkeys(terminals, 0)
    base = (int(time.time()) % 4_000) * 1_000_000 if seq_base is None else seq_base
    when = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 8 * 3600))
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=count)
    times = _profile_times(count, rate, profile)
    ops: list[Op] = []
    loaded_at: dict[int, float] = {}  # each card's last load, in schedule time
    for kind, at in zip(kinds, times, strict=True):
        terminal = rng.choice(terminals)
        if kind == "upload":
            rides, short = _rides(pop, zipf, rng, batch)
            if short is None:
                recs = []
                for index, amount in rides:
                    seqs[terminal] += 1
                    recs.append(
                        pop.offline_record(index, amount, terminal, base + seqs[terminal], when)
                    )
                req: Any = upload_pb2.UploadBatch(
                    batch_id=f"{terminal}-{seqs[terminal]}",
                    records=recs,
                    claimed_count=len(recs),
                    claimed_total=sum(r.amount for r in recs),
                )
                ops.append(Op(kind, at, req, len(recs)))
                continue
            # No rider found who could pay: one of them tops up in this slot
            # instead (the batch waits for the next upload slot), as an empty
            # debit's holder does.
            free = [
                i
                for i in short
                if at - loaded_at.get(i, -LOAD_GAP) >= LOAD_GAP
                and pop.chip(i).balance + 5_000 <= PURSE_MAX
            ]
            if not free:
                continue  # no card free to top up now: the batch waits (a rare miss)
            kind, index, amount = "load", free[0], 0
        else:
            index = zipf.draw()
            amount = rng.choice([100, 200, 300, 400])
            for _ in range(100):  # a card that just topped up stays at the gate
                if at - loaded_at.get(index, -LOAD_GAP) >= LOAD_GAP or (
                    kind == "debit" and pop.chip(index).balance >= amount
                ):
                    break
                index = zipf.draw()
        seqs[terminal] += 1
        seq = base + seqs[terminal]
        if kind == "debit" and pop.chip(index).balance < amount:
            kind = "load"  # an empty card: its holder tops up instead of riding
        if kind == "load" and pop.chip(index).balance + 5_000 > PURSE_MAX:
            kind = "debit"  # a full purse: the holder rides instead
        if kind == "load" and at - loaded_at.get(index, -LOAD_GAP) < LOAD_GAP:
            continue  # no card free to top up now: this one waits (a rare miss)
        if kind == "load":
            loaded_at[index] = at
            req = pop.load_request(index, 5_000, terminal, seq, when, rng.randbytes(4))
        else:
            req = pop.debit_request(index, amount, terminal, seq, when)
        ops.append(Op(kind, at, req))
    return ops


class UploadStreams:
    """A few long-lived upload streams, as gateways keep, that every batch of the run shares.

    Every open stream holds one of the server's ``--max-upload-streams``
    places (64 a process): a stream per batch, as the generator once
    opened, took more than that in a burst and was refused
    RESOURCE_EXHAUSTED, which no fleet of gateways causes. A batch waits
    for a free stream (inside its deadline, and counted in its latency),
    sends, and has its reply read before the stream takes the next batch. A
    stream that failed or ran out of time is dropped (what it was sending
    has no answer) and the next batch opens a new one on its channel; the
    streams are spread over the channels.
    """

    def __init__(self, stubs: list[upload_pb2_grpc.UploadServiceStub], n: int) -> None:
        self._stubs = stubs
        self._free: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        for i in range(n):
            self._free.put_nowait((i, None))  # opened on first use

    async def send(self, batch: upload_pb2.UploadBatch, timeout: float) -> Any:
        """The batch's reply; AioRpcError DEADLINE_EXCEEDED when none came within ``timeout``."""
        slot, call = -1, None
        try:
            async with asyncio.timeout(timeout):
                slot, call = await self._free.get()
                if call is None or call.done():  # never opened, or ended by the server (idle)
                    call = self._stubs[slot % len(self._stubs)].UploadRecords()
                await call.write(batch)
                reply = await call.read()
            if not isinstance(reply, upload_pb2.UploadBatchReply):  # EOF: the stream ended
                code = await call.code()
                raise _rpc_error(code, "the upload stream ended without a reply")
        except BaseException as exc:
            if call is not None:
                call.cancel()
            if slot >= 0:
                self._free.put_nowait((slot, None))
            if isinstance(exc, TimeoutError):
                raise _rpc_error(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s"
                ) from None
            raise
        self._free.put_nowait((slot, call))
        return reply

    async def close(self) -> None:
        """Ends the streams as a gateway does, by closing its side; cancels what does not end."""
        while not self._free.empty():
            _, call = self._free.get_nowait()
            if call is None or call.done():
                continue
            try:
                async with asyncio.timeout(5):
                    await call.done_writing()
                    await call.code()
            except (TimeoutError, grpc.aio.AioRpcError):
                call.cancel()


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


async def _send(
    op: Op,
    terminal: terminal_pb2_grpc.TerminalServiceStub,
    upload: UploadStreams,
    report: Report,
    timeout: float = 30.0,
) -> bool:
    """Sends one op and counts its outcome per transaction (an upload batch's
    records each, answered or not); False when the call ended in a gRPC error.

    The reply is kept as it came: what it acknowledged is worked out after
    the run (see expectations), so the books check costs the timed loop one
    append per call.
    """
    try:
        if op.kind == "upload":
            batch_reply = await upload.send(op.request, timeout)
            for res in batch_reply.results:
                name = upload_pb2.RecordOutcome.Name(res.outcome).removeprefix("RECORD_OUTCOME_")
                report.outcomes[f"upload {name}"] += 1
            report.answered.append((op, batch_reply))
            report.records += op.records
            return True
        call = terminal.Debit if op.kind == "debit" else terminal.Load
        reply = await call(op.request, timeout=timeout)
        name = common_pb2.TxnStatus.Name(reply.status).removeprefix("TXN_STATUS_")
        report.outcomes[f"{op.kind} {name}"] += 1
        report.answered.append((op, reply))
        report.records += 1
        return True
    except grpc.aio.AioRpcError as exc:
        key = f"{op.kind} error {exc.code().name}"
        report.outcomes[key] += op.records  # per transaction, as the answered ones
        report.failed_records += op.records
        report.errors.setdefault(key, exc.details() or "")
        report.unanswered.append(op)
        return False


#: What the books must show for one request's identity (terminal, seq).
POSTED = 1  # acknowledged: exactly one posting, with the request's content
REFUSED = 0  # answered as not posted: no posting at all under its identity
#: CONFLICT: the identity belongs to an earlier request (another run's, say), so
#: only a posting made during this run would be this request's.
CONFLICTED = 2
UNANSWERED = 3  # no answer (a gRPC error): at most one posting, with its content

_POSTED_RECORD = (upload_pb2.RECORD_OUTCOME_POSTED, upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION)


def _online_expect(reply: Any) -> int:
    if approved(reply) or reply.status == common_pb2.TXN_STATUS_ALREADY_REVERSED:
        return POSTED  # a reversal is a posting of its own; the original stays
    if reply.status == common_pb2.TXN_STATUS_CONFLICT:
        return CONFLICTED
    return REFUSED


def _offline_expect(result: Any) -> int:
    if result.outcome in _POSTED_RECORD or (
        result.outcome == upload_pb2.RECORD_OUTCOME_DUPLICATE
        and result.original_outcome in _POSTED_RECORD
    ):
        return POSTED
    if result.outcome == upload_pb2.RECORD_OUTCOME_CONFLICT:
        return CONFLICTED
    return REFUSED


Expectation = tuple[int, int, int, int, int, int]  # terminal, seq, card, amount, kind, expect


def _row(message: Any, kind: PostingKind, expect: int) -> Expectation:
    return (
        int(message.terminal_id),
        message.terminal_seq,
        int(message.card_number),
        message.amount,
        int(kind),
        expect,
    )


def expectations(report: Report) -> list[Expectation]:
    """Per request of the run, its identity and content and what the books must show."""
    rows: list[Expectation] = []
    for op, reply in report.answered:
        if op.kind == "upload":
            for rec, res in zip(op.request.records, reply.results, strict=True):
                rows.append(_row(rec, PostingKind.PURCHASE, _offline_expect(res)))
        else:
            kind = PostingKind.PURCHASE if op.kind == "debit" else PostingKind.LOAD
            rows.append(_row(op.request, kind, _online_expect(reply)))
    for op in report.unanswered:
        if op.kind == "upload":
            rows.extend(_row(rec, PostingKind.PURCHASE, UNANSWERED) for rec in op.request.records)
        else:
            kind = PostingKind.PURCHASE if op.kind == "debit" else PostingKind.LOAD
            rows.append(_row(op.request, kind, UNANSWERED))
    return rows


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
    timeout: float = 30.0,
    upload_streams: int = 8,
) -> Report:
    """Sends ``ops`` and times them; a call not answered within ``timeout`` seconds
    is a failed one (DEADLINE_EXCEEDED), so a stalled server cannot hold the run.
    Upload batches go over ``upload_streams`` long-lived streams (UploadStreams)."""
    with collector_quiet():
        return await _run_ops(
            target, ops, rate, concurrency, progress, channels, duration, timeout, upload_streams
        )


async def _run_ops(
    target: str,
    ops: list[Op],
    rate: float,
    concurrency: int,
    progress: Any,
    channels: int,
    duration: float | None,
    timeout: float,
    upload_streams: int,
) -> Report:
    report = Report()
    chans = open_channels(target, max(1, channels))
    uploads = UploadStreams([upload_pb2_grpc.UploadServiceStub(c) for c in chans], upload_streams)
    try:
        stubs = [terminal_pb2_grpc.TerminalServiceStub(c) for c in chans]
        start = time.perf_counter()
        deadline = start + duration if duration and rate <= 0 else math.inf
        sent = 0

        async def timed(op: Op, intended: float) -> None:
            nonlocal sent
            terminal = stubs[sent % len(stubs)]
            sent += 1
            ok = await _send(op, terminal, uploads, report, timeout)
            done = time.perf_counter()
            report.record(op.kind, done - intended, done - start, ok)
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
        await uploads.close()
        for c in chans:
            await c.close(None)
    return report


def embedded_dsn(data_dir: Path) -> str | None:
    """The DSN of the embedded PostgreSQL that ``onecard serve`` runs in ``data_dir``.

    Read from PostgreSQL's own ``postmaster.pid`` (its fourth line is the port,
    its fifth the socket's directory: the server listens on no TCP port), so
    the server needs to publish nothing for the load generator.
    """
    from onecard.server.app import EMBEDDED_DATABASE
    from onecard.server.embedded_pg import socket_dsn

    try:
        lines = (data_dir / "pg" / "postmaster.pid").read_text().splitlines()
        port = int(lines[3])
        socket_dir = lines[4].strip()
    except (OSError, IndexError, ValueError):
        return None
    if not socket_dir:
        return None
    return socket_dsn(Path(socket_dir), port, EMBEDDED_DATABASE)


_CHECK_POSTINGS = """
WITH j AS (
    SELECT e.i, e.terminal_id, e.terminal_seq, e.card_no, e.amount, e.kind, e.expect,
           count(p.posting_id) AS n_any,
           count(p.posting_id) FILTER (WHERE p.kind IN (1, 2)) AS n,
           count(p.posting_id) FILTER (
               WHERE p.kind = e.kind AND p.card_no = e.card_no AND p.amount = e.amount
                 AND CASE WHEN e.kind = 1 THEN p.debit_account
                          ELSE p.credit_account END = $1 + e.card_no
           ) AS n_right,
           count(p.posting_id) FILTER (WHERE $2::timestamptz IS NULL OR p.posted_at >= $2)
               AS n_during,
           string_agg(format('#%s %s fen kind %s card %s, account %s to %s', p.posting_id,
                             p.amount, p.kind, p.card_no, p.debit_account, p.credit_account),
                      '; ' ORDER BY p.posting_id) AS found
    FROM loadtest_expected e
    LEFT JOIN postings p ON p.terminal_id = e.terminal_id AND p.terminal_seq = e.terminal_seq
    GROUP BY e.i
), problems AS (
    SELECT CASE
               WHEN expect = 1 AND n = 0 THEN 'missing'
               WHEN expect IN (1, 3) AND n > 1 THEN 'doubled'
               WHEN expect IN (1, 3) AND n = 1 AND n_right = 0 THEN 'wrong'
               WHEN expect = 0 AND n_any > 0 THEN 'refused_posted'
               WHEN expect = 2 AND n_during > 0 THEN 'refused_posted'
           END AS problem, j.*
    FROM j
), ranked AS (
    SELECT problems.*, count(*) OVER w AS total, row_number() OVER (w ORDER BY i) AS k
    FROM problems WHERE problem IS NOT NULL
    WINDOW w AS (PARTITION BY problem)
)
SELECT * FROM ranked WHERE k <= $3 ORDER BY problem, k
"""

PROBLEMS = {
    "missing": "acknowledged but not posted",
    "doubled": "posted more than once",
    "wrong": "posted with another card, amount, kind or direction",
    "refused_posted": "answered as not posted, posted anyway",
}


@dataclass
class BooksCheck:
    """What the database shows against what the server answered."""

    acknowledged: int
    refused: int
    unanswered: int
    problems: dict[str, int]
    examples: dict[str, list[str]]
    trial_balance: int
    discrepancies: int
    discrepancy_examples: list[str]

    @property
    def ok(self) -> bool:
        clean = not any(self.problems.values())
        return clean and self.trial_balance == 0 and self.discrepancies == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "checked": True,
            "ok": self.ok,
            "acknowledged": self.acknowledged,
            "refused": self.refused,
            "unanswered": self.unanswered,
            **self.problems,
            "trial_balance": self.trial_balance,
            "balance_discrepancies": self.discrepancies,
            "examples": {
                **{k: v for k, v in self.examples.items() if v},
                **(
                    {"balance_discrepancies": self.discrepancy_examples}
                    if self.discrepancy_examples
                    else {}
                ),
            },
        }

    def lines(self) -> list[str]:
        """The verdict on one line, then a few examples of each failure."""
        seen = (
            f"{self.acknowledged:,} acknowledged, {self.refused:,} refused, "
            f"{self.unanswered:,} unanswered requests; trial balance {self.trial_balance} fen"
        )
        if self.ok:
            return [
                f"books: consistent: {seen}: every acknowledged request posted once with "
                "its card, amount, kind and direction, no refused one posted, no unanswered "
                "one posted twice or wrongly, every balance equal to its postings"
            ]
        failed = [f"{n:,} {PROBLEMS[k]}" for k, n in self.problems.items() if n]
        if self.trial_balance:
            failed.append(f"trial balance {self.trial_balance} fen, not 0")
        if self.discrepancies:
            failed.append(f"{self.discrepancies:,} balances differ from their postings")
        out = [f"books: NOT CONSISTENT: {'; '.join(failed)} ({seen})"]
        for k, examples in self.examples.items():
            out.extend(f"  {k}: {e}" for e in examples)
        out.extend(f"  balance: {e}" for e in self.discrepancy_examples)
        return out


async def check_database(
    dsn: str,
    expected: list[Expectation],
    since: dt.datetime | None = None,
    examples: int = 3,
) -> BooksCheck:
    """Proves the books against the answers, in a few set-based statements.

    The run's identities go into a temporary table by COPY and are joined
    with the postings once: a query per request would make the check take
    longer than the run. ``since`` is when the run began (the database's
    clock): a CONFLICT's identity may hold an earlier run's posting.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """CREATE TEMPORARY TABLE loadtest_expected (
                   i integer PRIMARY KEY, terminal_id bigint, terminal_seq bigint,
                   card_no bigint, amount bigint, kind smallint, expect smallint)"""
        )
        await conn.copy_records_to_table(
            "loadtest_expected", records=[(i, *row) for i, row in enumerate(expected)]
        )
        await conn.execute("ANALYZE loadtest_expected")
        rows = await conn.fetch(_CHECK_POSTINGS, PURSE_BASE, since, examples)
        problems = dict.fromkeys(PROBLEMS, 0)
        shown: dict[str, list[str]] = {k: [] for k in PROBLEMS}
        for r in rows:
            problems[r["problem"]] = r["total"]
            what = "load" if r["kind"] == PostingKind.LOAD else "purchase"
            shown[r["problem"]].append(
                f"terminal {r['terminal_id']} seq {r['terminal_seq']}: {what} of {r['amount']} "
                f"fen on card {r['card_no']}; found {r['found'] or 'no posting'}"
            )
        tb = int(await trial_balance(conn))
        wrong = await balance_discrepancies(conn)
    finally:
        await conn.close()
    expects = Counter(row[5] for row in expected)
    return BooksCheck(
        acknowledged=expects[POSTED],
        refused=expects[REFUSED] + expects[CONFLICTED],
        unanswered=expects[UNANSWERED],
        problems=problems,
        examples=shown,
        trial_balance=tb,
        discrepancies=len(wrong),
        discrepancy_examples=[
            f"account {d.account}: balance {d.balance} fen, postings say {d.from_postings}"
            for d in wrong[:examples]
        ],
    )


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = max(1, math.ceil(report.seconds))
    done = [0] * seconds
    failed = [0] * seconds
    worst = [0.0] * seconds
    for at, latency, ok in report.timeline:
        i = min(seconds - 1, int(at))
        if ok:
            done[i] += 1
            worst[i] = max(worst[i], latency * 1e3)
        else:
            failed[i] += 1
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    a.plot(range(seconds), done, label="answered")
    if any(failed):
        a.plot(range(seconds), failed, color="tab:orange", label="failed (gRPC error)")
        a.legend()
    a.set_ylabel("requests done / s")
    b.plot(range(seconds), worst, color="tab:red")
    b.set_ylabel("max latency, answered (ms)")
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
                f"takes kind=weight pairs of {', '.join(KINDS)} with whole-number weights "
                f">= 0, got {part!r}"
            )
        mix[name] = int(weight)
    if not any(mix.values()):
        raise argparse.ArgumentTypeError(
            f"needs at least one weight > 0 (a kind to run), got {text!r}"
        )
    return mix


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _finite_number(*, zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above 0 (or 0 too, when ``zero`` means something)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        limit = ">= 0" if zero else "> 0"
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be finite and {limit}, got {text}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="server address (default: DATA_DIR/server.addr)")
    p.add_argument("--data-dir", type=Path, default=Path(".onecard"))
    p.add_argument(
        "--dsn",
        help="database to seed the population in and check afterwards "
        "(default: the embedded PostgreSQL of the server in --data-dir, if it runs there)",
    )
    p.add_argument("--cards", type=_whole(1), default=100_000, help="card population")
    p.add_argument("--terminals", type=_whole(1), default=2_000, help="terminals played")
    p.add_argument(
        "--card-balance",
        type=_whole(0, CHIP_BALANCE_MAX),
        default=20_000,
        help="opening balance, fen",
    )
    p.add_argument("--mix", type=parse_mix, default=parse_mix("debit=70,load=5,upload=25"))
    p.add_argument("--batch", type=_whole(1), default=100, help="records per upload batch")
    p.add_argument(
        "--count", type=_whole(1), default=10_000, help="requests (an upload batch is one)"
    )
    p.add_argument(
        "--duration",
        type=_finite_number(zero=False),
        help="seconds; with --rate sets the count; closed loop stops at it or at --count",
    )
    p.add_argument(
        "--rate",
        type=_finite_number(zero=True),
        default=0.0,
        help="mean requests/s over the run, open loop, whatever the profile; 0: closed loop",
    )
    p.add_argument(
        "--timeout",
        type=_finite_number(zero=False),
        default=30.0,
        help="seconds a call may take; one unanswered by then fails (DEADLINE_EXCEEDED)",
    )
    p.add_argument("--concurrency", type=_whole(1), default=64, help="in flight, closed loop")
    p.add_argument(
        "--channels", type=_whole(1), default=8, help="TCP connections (spread over --workers)"
    )
    p.add_argument(
        "--upload-streams",
        type=_whole(1),
        default=8,
        help="long-lived upload streams the batches share, as gateways keep "
        "(the server takes --max-upload-streams, 64, a process)",
    )
    p.add_argument(
        "--profile",
        choices=["steady", "rush"],
        default="steady",
        help="open loop: evenly spaced, or a hump from half the mean rate to 1.5 times it",
    )
    p.add_argument(
        "--zipf",
        type=_finite_number(zero=True),
        default=1.0,
        help="card popularity skew s (popularity ~ 1/rank^s); 0: every card alike",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="draw throughput and latency over time (PNG)")


def _refuse(message: str) -> int:
    """Refuses options that would run nothing, before anything runs (argparse's exit code)."""
    print(f"onecard loadtest: error: {message}", file=sys.stderr)
    return 2


def _database(args: argparse.Namespace) -> tuple[str | None, str]:
    """The database to seed and check, and how it was found or why there is none."""
    if args.dsn:
        return args.dsn, "--dsn"
    dsn = embedded_dsn(args.data_dir)
    pid = args.data_dir / "pg" / "postmaster.pid"
    if dsn:
        return dsn, f"the embedded PostgreSQL in {args.data_dir / 'pg'}"
    why = "--target given without --dsn, and " if args.target else ""
    return None, f"{why}no embedded PostgreSQL running in {args.data_dir} ({pid} not found)"


def _request_count(args: argparse.Namespace) -> int:
    return int(args.rate * args.duration) if args.duration and args.rate else args.count


async def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        # Written after the run: a directory that is not there would lose the report.
        if path is not None and not path.parent.is_dir():
            return _refuse(f"{option}: directory {path.parent} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            # Found now, not after the run: the plot is drawn last.
            return _refuse(
                "--plot needs matplotlib, which `pip install .` does not install: "
                "install onecard with its [plot] extra (pip install '.[plot]') or matplotlib"
            )
    count = _request_count(args)
    if count < 1:
        return _refuse(
            f"--rate {args.rate:g} for --duration {args.duration:g} s makes {count} requests; "
            "the run needs at least 1"
        )
    if args.target:
        target = args.target
    else:
        addr = args.data_dir / "server.addr"
        try:
            target = addr.read_text().strip()
        except FileNotFoundError:
            target = ""
        if not target:
            return _refuse(
                f"no server address in {addr}: start the server "
                f"(onecard serve --data-dir {args.data_dir}) or give --target HOST:PORT"
            )
    dsn, source = _database(args)
    problem = dsn_problem(args.dsn) if args.dsn else None
    if problem:
        return _refuse(f"--dsn: {problem}")
    keys = MemoryKeyStore(parse_key_document(DEV_KEYS, "dev keys"))
    version = keys.get(DEMO_ISSUER, 2)
    assert version is not None
    terminals: list[str]
    since: dt.datetime | None = None
    seq_base: int | None = None
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            with console.status(f"seeding {args.cards:,} cards and {args.terminals:,} terminals"):
                await seed_cards(conn, args.cards, args.card_balance, version.kv)
                terminals = await seed_terminals(conn, args.terminals)
                seq_base = await last_terminal_seq(conn, terminals)
                if seq_base + count * args.batch > MAX_TERMINAL_SEQ:
                    raise SystemExit(
                        f"onecard loadtest: the load generator's terminals have used seqs up to "
                        f"{seq_base:,}; {count:,} more requests would pass the protocol's "
                        f"{MAX_TERMINAL_SEQ:,}: run it against a fresh database"
                    )
            since = await conn.fetchval("SELECT now()")
        finally:
            await conn.close()
    else:
        terminals = ["310400000001", "310400000002", "310400000003", "310400000004"]
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
            seq_base,
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
            args.timeout,
            args.upload_streams,
        )
    summary = report.summary()
    title = (
        f"onecard loadtest: {summary['requests']:,} requests in {summary['seconds']:.1f}s: "
        f"{summary['answered']:,} answered, {summary['records']:,} transactions "
        f"= {summary['records_per_second']:,.0f}/s"
    )
    if summary["failed"]:
        title += f"; {summary['failed']:,} FAILED ({summary['failed_share']:.0%})"
    table = Table(title=title)
    for col in ("kind", "calls", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for label, lats in (("", summary["latency_ms"]), (" failed", summary["failed_latency_ms"])):
        for kind, lat in lats.items():
            table.add_row(
                kind + label,
                f"{lat['calls']:,}",
                *(f"{lat[q]:.1f}" for q in ("p50", "p95", "p99", "max")),
            )
    console.print(table)
    console.print(
        f"outcomes per transaction (an upload batch's records each): "
        f"{summary['records']:,} answered, {summary['failed_records']:,} in failed calls",
        highlight=False,
    )
    for name, n in summary["outcomes"].items():
        console.print(f"  {name:<40}{n:>9,}", highlight=False)
        if name in report.errors:
            console.print(
                f"    first: {report.errors[name]}", highlight=False, soft_wrap=True, markup=False
            )
    if summary["failed"]:
        console.print(
            f"[bold red]calls failed: {summary['failed']:,} of {summary['requests']:,} "
            f"({summary['failed_share']:.0%}) ended in a gRPC error, not an answer[/bold red]; "
            "their latencies are the 'failed' rows, not the answered ones",
            soft_wrap=True,
        )
    code = 0
    if dsn:
        with console.status("checking the books"):
            check = await check_database(dsn, expectations(report), since)
        summary["check"] = {"database": source, **check.as_json()}
        style = "green" if check.ok else "bold red"
        for i, line in enumerate(check.lines()):
            console.print(
                f"[{style}]{line}[/{style}]" if i == 0 else line,
                soft_wrap=True,
                highlight=False,
                markup=i == 0,
            )
        code = 0 if check.ok else 1
    else:
        reason = f"no database: {source}"
        summary["check"] = {"checked": False, "reason": reason}
        console.print(
            f"[yellow]books: not checked: {reason}; give --dsn[/yellow]",
            soft_wrap=True,
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + os.linesep)
    if args.plot:
        plot(report, args.plot)
    return code
