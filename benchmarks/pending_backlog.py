"""Calls gRPC sheds as CANCELLED when the ledger's event loops fall behind, by backlog limit.

``python -m benchmarks.pending_backlog [--limits 50,1000,100000] [--rate 3400]``

grpc.aio takes one call per event-loop turn; calls received meanwhile wait
inside gRPC, and past ``--max-pending-calls`` (gRPC's
``grpc.server.max_pending_requests``; all past three times it) gRPC drops
arrivals with CANCELLED before the ledger sees them. To make the workers'
loops fall behind on purpose, the load generator's main thread runs at a
higher priority than the servers (``--client-nice``, default -10; needs
root, otherwise it runs at its own and says so), and offers open-loop
debits at ``--rate``. The no-op servicer gets the same run first as the
baseline. One line per server::

    backlog <L>: <C> of <N> debits CANCELLED, <E> other errors, p99 <P> ms

then ``backlog no-op: ...`` for the baseline. The trial balance is checked
after the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import throughput as bt
from onecard.clients.loadtest import Op, run_ops
from onecard.clients.population import Population
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.v1 import terminal_pb2


def _allowed_nice(nice: int) -> int:
    """``nice`` if this process may take it (root), else its own, said once."""
    was = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        print(f"  not allowed to run at nice {nice}: the client runs at its own ({was})")
        return was
    os.setpriority(os.PRIO_PROCESS, 0, was)
    return nice


async def _offer(
    address: str, reqs: list[terminal_pb2.DebitRequest], rate: float, channels: int, nice: int
) -> tuple[int, int, float]:
    """(CANCELLED, other errors, p99 ms) of one open-loop run, this thread at ``nice``."""
    was = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        ops = [Op("debit", i / rate, r) for i, r in enumerate(reqs)]
        report = await run_ops(address, ops, rate, 0, channels=channels)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, was)
    cancelled = report.outcomes.get("debit error CANCELLED", 0)
    errors = sum(n for k, n in report.outcomes.items() if " error " in k) - cancelled
    p99 = report.summary()["latency_ms"].get("debit", {}).get("p99", 0.0)
    return cancelled, errors, p99


async def run(args: argparse.Namespace) -> list[tuple[str, int, int, float]]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-backlog-"))
    version, key_file = bt.dev_card_keys(tmp)
    pg = EmbeddedPostgres(tmp / "pg", settings=bt.PG_SETTINGS)
    await asyncio.to_thread(pg.start)
    nice = _allowed_nice(args.client_nice)
    out: list[tuple[str, int, int, float]] = []
    n = int(args.rate * args.seconds)
    try:
        dsn = await bt.prepare_db(pg, "small", args.cards)
        pop = Population(version, args.cards, bt.OPENING_BALANCE)
        seq = 1_000_000
        noops = bt.start_noops(bt.WORKERS)
        try:
            reqs = bt.debit_requests(pop, n, seq, rng, zipf_s=args.zipf)
            seq += n
            res = await _offer(noops[0].address, reqs, args.rate, args.channels, nice)
            out.append(("no-op", *res))
        finally:
            for noop in noops:
                noop.stop()
        for limit in args.limits:
            server = bt.ledger_server(
                dsn, key_file, tmp / f"srv-{limit}", "--max-pending-calls", str(limit)
            )
            try:
                # One call at a time: a backlog of one must not shed the warm-up.
                warm = bt.debit_requests(pop, 500, seq, rng, zipf_s=args.zipf)
                seq += 500
                await bt.run_online(server.address, warm, 1, 1)
                reqs = bt.debit_requests(pop, n, seq, rng, zipf_s=args.zipf)
                seq += n
                res = await _offer(server.address, reqs, args.rate, args.channels, nice)
                out.append((str(limit), *res))
            finally:
                server.stop()
        await bt.check_books(dsn)
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, cancelled, errors, p99 in [*out[1:], out[0]]:
        print(
            f"backlog {name}: {cancelled:,} of {n:,} debits CANCELLED, {errors:,} other errors, "
            f"p99 {p99:.1f} ms (client at nice {nice}, {args.rate:g}/s offered)"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pending_backlog", description=__doc__
    )
    parser.add_argument(
        "--limits",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[50, 1000, 100_000],
        help="--max-pending-calls of each ledger run, comma-separated",
    )
    parser.add_argument("--rate", type=float, default=3400.0, help="offered debits/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop run per server")
    parser.add_argument("--client-nice", type=int, default=-10, help="the load generator's nice")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--zipf", type=float, default=1.0, help="card skew (0.0001: ~uniform)")
    parser.add_argument("--channels", type=int, default=8, help="client TCP connections")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
