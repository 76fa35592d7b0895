"""Upload purse update: through the primary key (the ledger's) against the locked rows' ctid.

``python -m benchmarks.purse_update [--cards 100000,2000000] [--batch 1500]``

An upload locks its cards, then updates their purses, finding each card
again through the primary key. The alternative, not kept, reaches each row
by the ctid its lock returned (a locked row cannot move until this
transaction updates it): a TID scan instead of a second B-tree descent. The
ledger's statement (``offline_batch._UPDATE_BALANCES``) and the alternative
run in alternating transactions on the real schema, each after the same
ordered lock, timed from the client (encoding, round trip, execution). One
line per population::

    purse update <N> cards, <B> a batch: primary key <A> us/card, ctid <C> us/card, ctid/pk <R>
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from benchmarks.throughput import prepare_db
from onecard.clients.population import BASE_CARD
from onecard.ledger.storage.offline_batch import _UPDATE_BALANCES
from onecard.ledger.storage.terminal_batch import hot_accounts
from onecard.server.embedded_pg import EmbeddedPostgres

_LOCK = """
SELECT card_no, ctid FROM cards WHERE card_no = ANY($1::bigint[]) ORDER BY card_no FOR UPDATE
"""
# A join on ctid alone plans as a hash join over every card; the ANY gives the TID scan.
_UPDATE_BY_CTID = f"""
WITH purses AS (
    UPDATE cards AS c
    SET purse_balance = c.purse_balance + d.delta,
        offline_counter = greatest(c.offline_counter, d.counter),
        last_used_at = now()
    FROM unnest($1::tid[], $2::bigint[], $3::integer[]) AS d(row_id, delta, counter)
    WHERE c.ctid = ANY($1::tid[]) AND c.ctid = d.row_id
), {hot_accounts(4)}
SELECT 1
"""


async def measure(pg: EmbeddedPostgres, cards: int, batch: int, repeat: int) -> dict[str, float]:
    conn = await asyncpg.connect(await prepare_db(pg, f"purse{cards}", cards))
    try:
        await conn.execute("SET random_page_cost = 1.1")  # as ledger sessions run
        account = await conn.fetchval("SELECT account_id FROM accounts ORDER BY 1 LIMIT 1")
        rng = random.Random(1)
        times: dict[str, list[float]] = {"pk": [], "ctid": []}
        for _ in range(repeat):
            for form in times:
                keys = sorted({BASE_CARD + rng.randrange(cards) for _ in range(batch)})
                async with conn.transaction():
                    rows = await conn.fetch(_LOCK, keys)
                    ids = [r["ctid"] if form == "ctid" else r["card_no"] for r in rows]
                    n = len(rows)
                    began = time.perf_counter()
                    await conn.execute(
                        _UPDATE_BY_CTID if form == "ctid" else _UPDATE_BALANCES,
                        ids,
                        [-1] * n,
                        [1] * n,
                        [account],
                        [n],
                    )
                    times[form].append((time.perf_counter() - began) * 1e6 / n)
    finally:
        await conn.close()
    skip = min(5, repeat // 4)  # plans and caches settle in the first few
    return {form: statistics.median(ts[skip:]) for form, ts in times.items()}


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="onecard-purse-"))
    pg = EmbeddedPostgres(tmp / "pg", settings={"shared_buffers": "2GB"})
    await asyncio.to_thread(pg.start)
    try:
        for cards in args.cards:
            r = await measure(pg, cards, args.batch, args.repeat)
            print(
                f"purse update {cards} cards, {args.batch} a batch: primary key {r['pk']:.2f} "
                f"us/card, ctid {r['ctid']:.2f} us/card, ctid/pk {r['ctid'] / r['pk']:.2f}",
                flush=True,
            )
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.purse_update", description=__doc__)
    parser.add_argument(
        "--cards",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100_000, 2_000_000],
        help="populations, comma-separated",
    )
    parser.add_argument("--batch", type=int, default=1500, help="cards drawn per transaction")
    parser.add_argument("--repeat", type=int, default=40, help="transactions of each form")
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
