"""Online debits while uploads are offered far beyond capacity, by upload transaction bound.

``python -m benchmarks.upload_surge [--flush-records 1000]``

Buses coming back into coverage upload their day at once while passengers
keep tapping at gates. For the default server and then for one with
``--upload-flush-records N`` (same run, a fresh server and population each),
``onecard loadtest`` plays a mixed open-loop overload (by default 1,500
requests/s, a quarter of them 500-record upload batches: 187,500 records/s
offered) against ``onecard serve --workers 2``; the load generator checks the
books afterwards. It prints the debits' latency (from the intended send time)
and the upload transactions' size and duration from the server's flush log::

    surge <label>: debit p50 <A> ms, p99 <B> ms; upload transactions <N> records, p50 <C> ms
      online statements sampled: {'CPU': <n>, 'Lock:transactionid': <n>, ...}
    surge: debit p99 with --upload-flush-records <N>: <R> of default

An upload holds its cards' locks until its COMMIT, and the load generator's
skewed card draw puts the hottest cards in every upload and many debits, so
the debits mostly wait on those locks (README, Performance).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from benchmarks.throughput import ServerProcess
from onecard.clients.loadtest import embedded_dsn

_FLUSH = re.compile(r"group-commit-uploads: (\d+) items in ([\d.]+) ms")
# The online flush's statements read online_counter or write mac2; the
# upload's name its staging table, the card lock or the purse update.
_ACTIVITY = """
SELECT CASE WHEN query LIKE '%online_counter%' OR query LIKE '%mac2%' THEN 'online'
            WHEN query ~ 'offline_stage|FOR UPDATE|purses|replaced_by' THEN 'upload' END AS kind,
       coalesce(wait_event_type || ':' || wait_event, 'CPU') AS wait
FROM pg_stat_activity
WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


async def sample_waits(data: Path, proc: subprocess.Popen[str]) -> Counter[tuple[str, str]]:
    """What the ledger's statements are doing, sampled every 0.1 s while the load runs.

    Keyed by (online or upload, wait event or CPU): a debit waiting for an
    upload's COMMIT shows as Lock:transactionid.
    """
    dsn = embedded_dsn(data)
    assert dsn is not None, "the server's embedded PostgreSQL is not running"
    conn = await asyncpg.connect(dsn)
    counts: Counter[tuple[str, str]] = Counter()
    try:
        while proc.poll() is None:
            for r in await conn.fetch(_ACTIVITY):
                if r["kind"] is not None:
                    counts[(r["kind"], r["wait"])] += 1
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return counts


def surge(
    args: argparse.Namespace, tmp: Path, label: str, extra: Sequence[str]
) -> dict[str, float]:
    data = tmp / label
    serve = ["-m", "onecard.server.cli", "--log-level", "DEBUG", "serve", "--data-dir", str(data)]
    server = ServerProcess([*serve, "--workers", "2", "--listen", "127.0.0.1:0", *extra])
    report = tmp / f"{label}.json"
    try:
        # With --data-dir (no --target) it finds the server and its embedded
        # database: it seeds the population there and checks the books after.
        load = [sys.executable, "-m", "onecard.server.cli", "loadtest", "--data-dir", str(data)]
        load += ["--cards", str(args.cards), "--terminals", "500", "--seed", "7"]
        load += ["--rate", str(args.rate), "--duration", str(args.duration)]
        load += ["--mix", "debit=70,load=5,upload=25", "--json", str(report)]
        proc = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waits = asyncio.run(sample_waits(data, proc))
        stdout, stderr = proc.communicate(timeout=900)
        run = subprocess.CompletedProcess(load, proc.returncode, stdout, stderr)
    finally:
        server.stop()
    if run.returncode != 0:  # the books check failed, or the run did
        raise SystemExit(f"loadtest failed ({label}):\n{run.stdout}\n{run.stderr}")
    summary = json.loads(report.read_text())
    if "books" not in run.stdout or "consistent" not in run.stdout:
        raise SystemExit(f"loadtest did not check the books ({label}):\n{run.stdout}")
    approved = summary["outcomes"].get("debit APPROVED", 0)
    if approved < summary["outcomes"].get("debit UNKNOWN_CARD", 0) + 1:
        raise SystemExit(f"the population was not seeded ({label}): {summary['outcomes']}")
    debit = summary["latency_ms"]["debit"]
    flushes = [(int(m[1]), float(m[2])) for line in server.log if (m := _FLUSH.search(line))]
    records = statistics.mean(n for n, _ in flushes)
    ms = statistics.median(t for _, t in flushes)
    print(
        f"surge {label}: debit p50 {debit['p50']:.0f} ms, p99 {debit['p99']:.0f} ms; "
        f"upload transactions {records:.0f} records, p50 {ms:.0f} ms",
        flush=True,
    )
    for kind in ("online", "upload"):
        seen = {w: n for (k, w), n in sorted(waits.items()) if k == kind}
        print(f"  {kind} statements sampled: {seen}", flush=True)
    return {"p50": debit["p50"], "p99": debit["p99"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upload_surge", description=__doc__)
    parser.add_argument("--flush-records", type=int, default=1000, help="the bound compared")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1500, help="requests/s offered")
    parser.add_argument("--duration", type=float, default=8, help="seconds of offered load")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-surge-"))
    try:
        base = surge(args, tmp, "default", [])
        bounded = surge(
            args,
            tmp,
            f"--upload-flush-records {args.flush_records}",
            ["--upload-flush-records", str(args.flush_records)],
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"surge: debit p99 with --upload-flush-records {args.flush_records}: "
        f"{bounded['p99'] / base['p99']:.2f} of default"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
