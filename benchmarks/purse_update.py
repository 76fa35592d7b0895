"""An upload's card access: lock then update (the ledger's) against one UPDATE.

``python -m benchmarks.purse_update [--cards 100000,2000000] [--batch 1500]``

An upload locks its cards (``SELECT ... ORDER BY card_no FOR UPDATE``) and
then updates their purses, finding each card again through the primary key:
two B-tree descents and two heap visits a card, which at a large population
miss the CPU's caches both times. The alternative measured here, not kept,
does both in one ``UPDATE ... RETURNING OLD`` (PostgreSQL 18, the embedded
one): the purse moves are known before the lock (every trusted new record of
a known card is posted), and the batch would decide against the old state it
returns. The two forms run in alternating transactions on the real schema,
fresh cards drawn for each, timed from the client (encoding, round trips,
execution). One line per population::

    purse update <N> cards, <B> a batch: lock then update <A> us/card,
        one update <C> us/card, one/two <R>

(one line in the output). What it saved end to end, and why it was not
kept: README Performance. (An earlier version measured updating by the
``ctid`` the lock returned: 1.54x and 1.11x the time at 100,000 and
2,000,000 cards, not kept either.)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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
from onecard.ledger.storage.offline_batch import _LOCK_CARDS, _UPDATE_BALANCES
from onecard.ledger.storage.terminal_batch import hot_accounts
from onecard.server.embedded_pg import EmbeddedPostgres

# The same purse update, locking as it goes, returning the rows as they were.
# Rows are locked in the order the plan emits them; with sequential and
# bitmap scans of cards ruled out, every plan left emits them in card order
# (a plan over a sequential scan did not, for 100 cards on a table whose rows
# had moved).
_LOCK_AND_MOVE = f"""
WITH purses AS (
    UPDATE cards AS c
    SET purse_balance = c.purse_balance + d.delta,
        offline_counter = greatest(c.offline_counter, d.counter),
        last_used_at = now()
    FROM unnest($1::bigint[], $2::bigint[], $3::integer[]) AS d(card_no, delta, counter)
    WHERE c.card_no = ANY($1::bigint[]) AND c.card_no = d.card_no
    RETURNING old.card_no, old.status, old.purse_balance, old.offline_counter, old.lost_at,
              old.replaced_by
), {hot_accounts(4)}
SELECT * FROM purses
"""
RIDE_TIME = dt.datetime(2026, 12, 3, 8, 0)
_ORDERED_SCANS = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"


async def measure(pg: EmbeddedPostgres, cards: int, batch: int, repeat: int) -> dict[str, float]:
    conn = await asyncpg.connect(await prepare_db(pg, f"purse{cards}", cards))
    try:
        await conn.execute("SET random_page_cost = 1.1")  # as ledger sessions run
        account = await conn.fetchval("SELECT account_id FROM accounts ORDER BY 1 LIMIT 1")
        rng = random.Random(1)
        times: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(repeat):
            for form in times:
                keys = sorted({BASE_CARD + rng.randrange(cards) for _ in range(batch)})
                n = len(keys)
                args = (keys, [-1] * n, [1] * n, [account], [n])
                # The ledger's update also takes each card's highest record time.
                update_args = (keys, [-1] * n, [1] * n, [RIDE_TIME] * n, [account], [n])
                async with conn.transaction():
                    if form == "one":  # the ledger's own statements run as they do
                        await conn.execute(_ORDERED_SCANS)
                    began = time.perf_counter()
                    if form == "two":
                        rows = await conn.fetch(_LOCK_CARDS, keys)
                        await conn.execute(_UPDATE_BALANCES, *update_args)
                    else:
                        rows = await conn.fetch(_LOCK_AND_MOVE, *args)
                    times[form].append((time.perf_counter() - began) * 1e6 / n)
                assert len(rows) == n
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
                f"purse update {cards} cards, {args.batch} a batch: lock then update "
                f"{r['two']:.2f} us/card, one update {r['one']:.2f} us/card, "
                f"one/two {r['one'] / r['two']:.2f}",
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
