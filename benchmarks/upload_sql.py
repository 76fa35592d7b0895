"""Upload SQL: arrays through ``unnest`` against binary COPY into a staging table.

Run from the project root::

    python -m benchmarks.upload_sql [--sizes 500,1000,2000,5000] [--repeat 15]

DESIGN.md allows either form for a batch's set-based writes. This times the
upload flush's biggest statement (the records into ``terminal_txns`` with
their purchase postings derived in the same statement, as
``onecard.ledger.storage.offline_batch`` does) both ways, on an embedded
PostgreSQL with the real schema, alternating the two so that drift on a
shared machine hits both alike. Each figure is the median of ``--repeat``
transactions, client encoding, round trips and COMMIT included (COMMIT
also empties the staging table, so it belongs to COPY's cost; its WAL flush
is the same for both). One line per batch size::

    upload sql <N> records: unnest <A> ms, copy <B> ms, copy/unnest <R>
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.model import TxnKind, TxnStatus
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage.migrate import apply_migrations
from onecard.ledger.storage.offline_batch import (
    CREATE_STAGE,
    INSERT_STAGED_TXNS,
    STAGE_COLUMNS,
    STAGE_TABLE,
)
from onecard.server.embedded_pg import EmbeddedPostgres

TERMINAL = 310400000001
# The alternative the ledger does not use: the same statement fed by one
# array per column (the form terminal_batch.py uses for online batches).
_INSERT_TXNS_UNNEST = """
WITH t AS (
    INSERT INTO terminal_txns (terminal_id, terminal_seq, card_no, kind, amount, fingerprint,
                               status, balance_after, card_balance, txn_time, exceptions,
                               offline_counter)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[], $5::bigint[],
                         $6::bytea[], $7::smallint[], $8::bigint[], $9::bigint[],
                         $10::timestamp[], $11::integer[], $12::integer[])
    ON CONFLICT DO NOTHING
    RETURNING terminal_id, terminal_seq, card_no, amount, status
), p AS (
    INSERT INTO postings (card_no, debit_account, credit_account, amount, kind,
                          terminal_id, terminal_seq)
    SELECT t.card_no, 10000000000000000 + t.card_no, a.account_id, t.amount, 1,
           t.terminal_id, t.terminal_seq
    FROM t
    JOIN unnest($13::bigint[], $14::bigint[]) AS a(terminal_id, account_id) USING (terminal_id)
    WHERE t.status = 1
    RETURNING 1
)
SELECT (SELECT count(*) FROM t) AS txns, (SELECT count(*) FROM p) AS postings
"""

_seqs = itertools.count(1)


def rows(n: int) -> list[tuple[object, ...]]:
    """A batch as the flush builds it: fresh (terminal, seq) keys, 10,000 cards."""
    when = dt.datetime(2026, 11, 23, 8, 0, 0)
    out: list[tuple[object, ...]] = []
    for _ in range(n):
        seq = next(_seqs)
        card = 3104000000000000 + seq % 10_000
        out.append(
            (
                TERMINAL,
                seq,
                card,
                int(TxnKind.OFFLINE),
                200,
                os.urandom(16),
                int(TxnStatus.APPROVED),
                4800,
                5000,
                when,
                0,
                seq % 60_000 + 1,
            )
        )
    return out


async def by_unnest(
    conn: asyncpg.Connection, batch: list[tuple[object, ...]], payable: int
) -> float:
    began = time.perf_counter()
    async with conn.transaction():
        columns = (list(col) for col in zip(*batch, strict=True))
        counts = await conn.fetchrow(_INSERT_TXNS_UNNEST, *columns, [TERMINAL], [payable])
    elapsed = time.perf_counter() - began
    assert counts is not None and counts["postings"] == len(batch)
    return elapsed


async def by_copy(conn: asyncpg.Connection, batch: list[tuple[object, ...]], payable: int) -> float:
    began = time.perf_counter()
    async with conn.transaction():
        await conn.execute(CREATE_STAGE)  # as each flush does; a no-op after the first
        await conn.copy_records_to_table(STAGE_TABLE, records=batch, columns=STAGE_COLUMNS)
        counts = await conn.fetchrow(INSERT_STAGED_TXNS, [TERMINAL], [payable])
    elapsed = time.perf_counter() - began
    assert counts is not None and counts["postings"] == len(batch)
    return elapsed


async def run(sizes: Sequence[int], repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="onecard-upload-sql-"))
    pg = EmbeddedPostgres(tmp / "pg", settings={"shared_buffers": "512MB"})
    await asyncio.to_thread(pg.start)
    try:
        conn = await asyncpg.connect(pg.dsn())
        try:
            await apply_migrations(conn)
            await seed_demo_data(conn)
            # The terminal's payable, as the ledger's reference data maps it.
            payable = (await ReferenceData.load(conn)).terminal_payable[TERMINAL]
            for size in sizes:
                for _ in range(3):  # warm caches, plans and the staging table
                    await by_unnest(conn, rows(size), payable)
                    await by_copy(conn, rows(size), payable)
                unnest: list[float] = []
                copy: list[float] = []
                for _ in range(repeat):
                    unnest.append(await by_unnest(conn, rows(size), payable))
                    copy.append(await by_copy(conn, rows(size), payable))
                a, b = statistics.median(unnest) * 1e3, statistics.median(copy) * 1e3
                print(
                    f"upload sql {size} records: unnest {a:.1f} ms, copy {b:.1f} ms, "
                    f"copy/unnest {b / a:.2f}"
                )
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000,5000")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    asyncio.run(run([int(s) for s in args.sizes.split(",")], args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
