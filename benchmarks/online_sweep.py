"""Open-loop p99 of online debits against the no-op servicer, rate by rate.

``python -m benchmarks.online_sweep [--rates 1000,2000,3000,4000,5000]``

Where ``benchmarks.throughput`` measures the p99 at one rate (80% of the
ledger's closed-loop rate), this finds the knee: at each offered rate, the
no-op servicer (as many processes as the ledger has workers) and then the
ledger (``onecard serve --workers 2``) get the same open-loop run, latency
counted from each call's intended send time. The no-op is the baseline in the
same run: what the client and gRPC alone cost at that rate on these cores.
One line per rate::

    sweep <R>/s: no-op p99 <A> ms, ledger p99 <B> ms, <B/A>x, servicers p99 <= <C> ms,
    flushes p99 <= <F> ms, loop lag p99 <= <L> ms

where C is the ledger servicers' own p99 (request in, reply after COMMIT) from
the server's call histogram: what of B the ledger's code and its database
account for, the rest being gRPC's backlog, the transports and the client.
F is the online group-commit transactions' p99 and L the workers' event-loop
lag (a 10 ms timer's lateness): whether the process itself was the wait.

Arguments after ``--`` go to ``onecard serve`` (``-- --linger-ms 5``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import throughput as bt
from onecard.clients.population import Population
from onecard.server.embedded_pg import EmbeddedPostgres


async def run(
    args: argparse.Namespace, serve_args: Sequence[str]
) -> list[tuple[int, float, float]]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-sweep-"))
    version, key_file = bt.dev_card_keys(tmp)
    pg = EmbeddedPostgres(tmp / "pg", settings=bt.PG_SETTINGS)
    await asyncio.to_thread(pg.start)
    out: list[tuple[int, float, float]] = []
    try:
        dsn = await bt.prepare_db(pg, "small", args.cards)
        pop = Population(version, args.cards, bt.OPENING_BALANCE)
        noops = bt.start_noops(bt.WORKERS)
        server = bt.ledger_server(
            dsn, key_file, tmp / "srv", "--metrics-listen", "127.0.0.1:0", *serve_args
        )
        assert server.metrics_url is not None
        method = "TerminalServicer.Debit"
        try:
            warm = bt.debit_requests(pop, 2_000, 50_000_000, rng, zipf_s=args.zipf)
            await bt.run_online(server.address, warm, 64, args.channels)
            seq = 1_000_000
            for rate in args.rates:
                n = int(rate * args.seconds)
                p99s, refused = [], 0
                # The no-op, then the ledger; the histogram is scraped around the ledger's run.
                before = await asyncio.to_thread(bt.call_buckets, server.metrics_url, method)
                inside_before = await asyncio.to_thread(bt.inside_buckets, server.metrics_url)
                for address in (noops[0].address, server.address):
                    seq += n
                    reqs = bt.debit_requests(pop, n, seq, rng, zipf_s=args.zipf)
                    p99, _, refused = await bt.run_online_open(address, reqs, rate, args.channels)
                    p99s.append(p99)
                after = await asyncio.to_thread(bt.call_buckets, server.metrics_url, method)
                inside_after = await asyncio.to_thread(bt.inside_buckets, server.metrics_url)
                servicers, _ = bt.bucket_p99(before, after)
                flush_p99, lag_p99 = (
                    bt.bucket_p99(b, a)[0] for b, a in zip(inside_before, inside_after, strict=True)
                )
                out.append((rate, p99s[0], p99s[1]))
                # Past the knee the ledger refuses (a full queue answers
                # RESOURCE_EXHAUSTED at once): a result, said on the line.
                note = f" ({refused:,} of {n:,} not approved)" if refused else ""
                print(
                    f"sweep {rate}/s: no-op p99 {p99s[0]:.1f} ms, ledger p99 {p99s[1]:.1f} ms, "
                    f"{p99s[1] / p99s[0]:.1f}x, servicers p99 <= {servicers:g} ms, "
                    f"flushes p99 <= {flush_p99:g} ms, loop lag p99 <= {lag_p99:g} ms{note}",
                    flush=True,
                )
        finally:
            server.stop()
            for noop in noops:
                noop.stop()
        await bt.check_books(dsn)
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.online_sweep", description=__doc__)
    parser.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 2000, 3000, 4000, 5000],
        help="offered debits/s, comma-separated",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="open-loop run per rate")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--zipf", type=float, default=1.0, help="card skew (0.0001: ~uniform)")
    parser.add_argument("--channels", type=int, default=8, help="client TCP connections")
    parser.add_argument("--seed", type=int, default=20261201)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(run(args, serve_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
