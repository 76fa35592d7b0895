"""What a terminal registration costs each server process, by terminals registered.

``python -m benchmarks.refdata_reread [--terminals 50000,300000] [--repeat 7]``

Every process keeps a copy of the reference data and re-reads it when the
database notifies a change (refdata_watch.py). Until migration 0019 a
terminal registered or moved made every process re-read everything, one row
per terminal; now the notification names the terminal and only it is read,
and a whole re-read (after a reconnection, or a change to another table)
reads one row per operator with its terminals in an array. Three forms, in
alternating rounds on one database, each timed from the client, with the
longest time the event loop went without a turn while it ran (a 1 ms ticker
beside it: every call a process holds waits that long)::

    refdata <N> terminals: row a terminal <A> ms (loop held <a> ms),
        whole <B> ms (<b> ms), one terminal <C> ms (<c> ms), row/whole <R>

(one line in the output; medians over the rounds). "row a terminal" is the
0017-era re-read, kept here as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg

from benchmarks.throughput import empty_db
from onecard.ledger.accounts import payable_code
from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage.migrate import apply_migrations
from onecard.server.embedded_pg import EmbeddedPostgres

FIRST_TERMINAL = 500_000_000_000


async def row_a_terminal(ref: ReferenceData, conn: asyncpg.Connection) -> None:
    """The whole re-read as it was before 0019: a row per terminal, built in one piece."""
    terminal_operator = {
        r["terminal_id"]: r["operator_id"]
        for r in await conn.fetch("SELECT terminal_id, operator_id FROM terminals")
    }
    account_ids = {
        r["code"]: r["account_id"]
        for r in await conn.fetch("SELECT account_id, code FROM accounts")
    }
    ref.terminal_operator, ref.account_ids = terminal_operator, account_ids
    ref.terminal_payable = {
        terminal: account_ids[code]
        for terminal, operator in terminal_operator.items()
        if (code := payable_code(operator)) in account_ids
    }


async def timed(action: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(milliseconds the action took, longest milliseconds the loop went without a turn)."""
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    gaps.clear()
    began = time.perf_counter()
    await action()
    took = time.perf_counter() - began
    running = False
    await tick
    return took * 1e3, max(gaps, default=0.0) * 1e3


async def measure(pg: EmbeddedPostgres, terminals: int, repeat: int) -> dict[str, list[float]]:
    conn = await asyncpg.connect(await empty_db(pg, f"refdata{terminals}"))
    try:
        await apply_migrations(conn)
        await seed_demo_data(conn)
        # The demo operators, alternately: a real province has a few dozen.
        await conn.execute(
            "INSERT INTO terminals (terminal_id, operator_id, kind)"
            " SELECT $1::bigint + g, CASE WHEN g % 2 = 0 THEN 'SZBUS' ELSE 'SZMETRO' END, 'bus'"
            " FROM generate_series(0, $2::bigint - 1) g",
            FIRST_TERMINAL,
            terminals,
        )
        await conn.execute("VACUUM ANALYZE terminals")
        ref = await ReferenceData.load(conn)
        assert len(ref.terminal_operator) >= terminals
        forms: dict[str, Callable[[], Awaitable[None]]] = {
            "row": lambda: row_a_terminal(ref, conn),
            "whole": lambda: ref.refresh(conn),
            "one": lambda: ref.refresh_terminals(conn, {FIRST_TERMINAL + terminals // 2}),
        }
        results: dict[str, list[float]] = {f"{form} {what}": [] for form in forms for what in "tl"}
        for _ in range(repeat):
            for form, action in forms.items():
                took, held = await timed(action)
                results[f"{form} t"].append(took)
                results[f"{form} l"].append(held)
        assert len(ref.terminal_operator) >= terminals
        return results
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="onecard-refdata-"))
    pg = EmbeddedPostgres(tmp / "pg")
    await asyncio.to_thread(pg.start)
    try:
        for terminals in args.terminals:
            r = {
                k: statistics.median(v)
                for k, v in (await measure(pg, terminals, args.repeat)).items()
            }
            print(
                f"refdata {terminals} terminals: row a terminal {r['row t']:.1f} ms "
                f"(loop held {r['row l']:.1f} ms), whole {r['whole t']:.1f} ms "
                f"({r['whole l']:.1f} ms), one terminal {r['one t']:.2f} ms "
                f"({r['one l']:.2f} ms), row/whole {r['row t'] / r['whole t']:.2f}",
                flush=True,
            )
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.refdata_reread", description=__doc__
    )
    parser.add_argument(
        "--terminals",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[50_000, 300_000],
        help="terminals registered, comma-separated",
    )
    parser.add_argument("--repeat", type=int, default=7, help="rounds of the three forms")
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
