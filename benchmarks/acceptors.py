"""``onecard serve --acceptors``: gRPC servers per process, the default against one.

``python -m benchmarks.acceptors [--rate 4500] [--rounds 6]``

grpc.aio asks gRPC core for the next call of a method only after the
previous one has reached the event loop, through gRPC's poller thread, so a
server takes calls single file. Under load, calls wait in gRPC's backlog
before any servicer sees them, and the ledger's busier event loop makes that
file slower than a no-op's. Several servers in a process, on the one port,
take calls several at a time.

Four servers on one embedded PostgreSQL (100,000 cards): the ledger (``onecard
serve --workers 2``) with ``--acceptors 1`` and with the default, each on
its own copy of the cards, and the no-op servicer (two processes) with one
server a process and with as many as the ledger's default. Closed-loop
rounds (128 debits in flight) and open-loop rounds at ``--rate`` (latency
from each call's intended send time) alternate between the two of each
pair, their order swapped every round, so the machine's drift hits both
alike. One line per comparison::

    acceptors closed loop, ledger: 1 -> <A>/s, <K> -> <B>/s, <B/A>x
    acceptors closed loop, no-op: 1 -> <A>/s, <K> -> <B>/s, <B/A>x
    acceptors open loop <R>/s, ledger: p99 1 -> <A> ms, <K> -> <B> ms, <B/A>x
    acceptors open loop <R>/s, no-op: p99 1 -> <A> ms, <K> -> <B> ms, <B/A>x

Rates are the mean of the rounds, p99s their median; every round's figure
follows in brackets.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import throughput as bt
from onecard.clients.population import Population
from onecard.server.embedded_pg import EmbeddedPostgres

#: Fen a debit: small, so the hottest cards (Zipf s = 1) last every round.
FARE = 2


async def run(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-acceptors-"))
    version, key_file = bt.dev_card_keys(tmp)
    pg = EmbeddedPostgres(tmp / "pg", settings=bt.PG_SETTINGS)
    await asyncio.to_thread(pg.start)
    many = bt.ACCEPTORS
    lines: list[str] = []
    try:
        dsns = [await bt.prepare_db(pg, f"cards{i}", args.cards) for i in (1, 2)]
        pop = Population(version, args.cards, bt.OPENING_BALANCE)
        ledgers = [
            bt.ledger_server(dsns[0], key_file, tmp / "srv1", "--acceptors", "1"),
            bt.ledger_server(dsns[1], key_file, tmp / "srv2", "--acceptors", str(many)),
        ]
        noop_groups = [bt.start_noops(bt.WORKERS, 1), bt.start_noops(bt.WORKERS, many)]
        pairs = {
            "ledger": [s.address for s in ledgers],
            "no-op": [g[0].address for g in noop_groups],
        }
        closed: dict[str, list[list[float]]] = {k: [[], []] for k in pairs}
        p99s: dict[str, list[list[float]]] = {k: [[], []] for k in pairs}
        not_approved: dict[str, list[int]] = {k: [0, 0] for k in pairs}
        seq = 1_000_000
        try:
            for addresses in pairs.values():
                for address in addresses:
                    warm = bt.debit_requests(pop, 2_000, seq, rng, fare=FARE)
                    await bt.run_online(address, warm, 64, args.channels)
                    seq += 2_000
            n_open = int(args.rate * args.seconds)
            for i in range(args.rounds):
                for name, addresses in pairs.items():
                    order = (0, 1) if i % 2 == 0 else (1, 0)
                    for j in order:
                        reqs = bt.debit_requests(pop, args.closed, seq, rng, fare=FARE)
                        seq += args.closed
                        rate = await bt.run_online(addresses[j], reqs, 128, args.channels)
                        closed[name][j].append(rate.per_second)
                    for j in order:
                        reqs = bt.debit_requests(pop, n_open, seq, rng, fare=FARE)
                        seq += n_open
                        p99, _, refused = await bt.run_online_open(
                            addresses[j], reqs, args.rate, args.channels
                        )
                        # Past what the machine takes, gRPC sheds calls (CANCELLED)
                        # or the queue refuses them: a result, said on the line.
                        not_approved[name][j] += refused
                        p99s[name][j].append(p99)
        finally:
            for ledger in ledgers:
                ledger.stop()
            for group in noop_groups:
                for noop in group:
                    noop.stop()
        for dsn in dsns:
            await bt.check_books(dsn)
        for name in pairs:
            one, k = (statistics.fmean(r) for r in closed[name])
            lines.append(
                f"acceptors closed loop, {name}: 1 -> {one:,.0f}/s, {many} -> {k:,.0f}/s, "
                f"{k / one:.2f}x {_rounds(closed[name], '{:.0f}')}"
            )
        for name in pairs:
            one, k = (statistics.median(r) for r in p99s[name])
            lost = not_approved[name]
            note = (
                f" ({lost[0]:,} and {lost[1]:,} of {n_open * args.rounds:,} not approved)"
                if any(lost)
                else ""
            )
            lines.append(
                f"acceptors open loop {args.rate:g}/s, {name}: p99 1 -> {one:.1f} ms, "
                f"{many} -> {k:.1f} ms, {k / one:.2f}x {_rounds(p99s[name], '{:.1f}')}{note}"
            )
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


def _rounds(pair: list[list[float]], fmt: str) -> str:
    return " ".join("[" + ", ".join(fmt.format(x) for x in side) + "]" for side in pair)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.acceptors", description=__doc__)
    parser.add_argument("--rate", type=float, default=4500.0, help="open-loop debits/s")
    parser.add_argument("--seconds", type=float, default=8.0, help="one open-loop round")
    parser.add_argument("--closed", type=int, default=20_000, help="debits a closed-loop round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=8, help="client TCP connections")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args(argv)
    import uvloop

    for line in uvloop.run(run(args)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
