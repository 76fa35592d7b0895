"""Offline upload of this checkout against another installation, rounds alternating.

``python -m benchmarks.upload_ab --baseline-python OTHER/.venv/bin/python``

A change to the upload's write path is worth what it moves end to end, and
on a shared machine that drifts by a factor of two within an hour, two runs
of ``benchmarks.throughput`` made at different times do not say it. Here both
servers (``onecard serve --workers 2`` of each installation) run on the same
database at once, and rounds of the same workload alternate between them,
so drift hits both alike. The baseline is any other installation, e.g. an
earlier commit cloned and installed beside this one (``git clone . /tmp/old
&& git -C /tmp/old checkout REV && python3 -m venv /tmp/old/.venv &&
/tmp/old/.venv/bin/pip install -e /tmp/old``). The database is migrated by
this checkout; a baseline that is older ignores migrations it does not know.
Per population::

    upload A/B <N> cards: baseline <X>/s, this <Y>/s, this/baseline <R>
      CPU a record (us): baseline ledger <..>, PostgreSQL <..>; this ledger <..>, PostgreSQL <..>
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

from benchmarks.throughput import (
    OPENING_BALANCE,
    PG_SETTINGS,
    CpuMeter,
    Rate,
    check_books,
    dev_card_keys,
    ledger_server,
    prepare_db,
    run_upload,
    table_pages,
    upload_streams,
)
from onecard.clients.population import Population
from onecard.server.embedded_pg import EmbeddedPostgres

BATCH = 500


async def run(args: argparse.Namespace) -> dict[int, float]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-upload-ab-"))
    version, key_file = dev_card_keys(tmp)
    pg = EmbeddedPostgres(tmp / "pg", settings=PG_SETTINGS)
    await asyncio.to_thread(pg.start)
    ratios: dict[int, float] = {}
    try:
        postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        for cards in args.cards:
            dsn = await prepare_db(pg, f"ab{cards}", cards)
            pop = Population(version, cards, OPENING_BALANCE)
            servers = {
                "baseline": ledger_server(
                    dsn, key_file, tmp / f"base-{cards}", python=args.baseline_python
                ),
                "this": ledger_server(dsn, key_file, tmp / f"this-{cards}"),
            }
            try:
                seq = 10_000_000
                streams_of = {"baseline": args.baseline_streams, "this": args.streams}
                for name, server in servers.items():  # connections and caches up
                    n = streams_of[name]
                    await run_upload(
                        server.address, upload_streams(pop, n, n * BATCH, BATCH, seq, rng)
                    )
                    seq += 1_000_000
                # Every card page written once since the checkpoint (steady
                # state; benchmarks.throughput explains the three a page).
                warm = 3 * await table_pages(dsn, "cards")
                await run_upload(
                    servers["this"].address,
                    upload_streams(pop, args.streams, warm, BATCH, seq, rng),
                )
                seq += 30_000_000
                rates: dict[str, list[Rate]] = {name: [] for name in servers}
                meters = {name: CpuMeter(postmaster, {}) for name in servers}
                for _ in range(args.rounds):
                    for name, server in servers.items():
                        streams = upload_streams(
                            pop, streams_of[name], args.records, BATCH, seq, rng
                        )
                        seq += args.records
                        before = meters[name].sample(server)
                        rates[name].append(await run_upload(server.address, streams))
                        meters[name].add(before, meters[name].sample(server))
            finally:
                for server in servers.values():
                    server.stop()
            merged = {name: Rate.merge(rs) for name, rs in rates.items()}
            ratio = merged["this"].per_second / merged["baseline"].per_second
            ratios[cards] = ratio
            print(
                f"upload A/B {cards} cards: baseline {merged['baseline'].per_second:.0f}/s, "
                f"this {merged['this'].per_second:.0f}/s, this/baseline {ratio:.2f}"
            )
            for name in servers:
                r = merged[name]
                print(f"  {name}: {meters[name].per_record(r.count, r.seconds)}", flush=True)
            await check_books(dsn)
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upload_ab", description=__doc__)
    parser.add_argument("--baseline-python", required=True, help="python of the other install")
    parser.add_argument(
        "--cards",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100_000, 10_000_000],
        help="populations, comma-separated",
    )
    parser.add_argument("--records", type=int, default=200_000, help="records a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each installation")
    parser.add_argument("--streams", type=int, default=8, help="upload streams of this checkout")
    parser.add_argument(
        "--baseline-streams",
        type=int,
        default=8,
        help="upload streams of the baseline (with --baseline-python this checkout's own "
        "python: how many streams it takes to fill the cores)",
    )
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
