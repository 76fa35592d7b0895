"""The benchmarks run and print what the README quotes; no figure is judged here.

Speed is never asserted in a test. These only keep the harnesses working, on
populations small enough for the test run, so that a figure in the README can
always be produced again by its command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def _bench(module: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``python -m benchmarks.MODULE ARGS``; its output, after checking that it succeeded."""
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_throughput_benchmark_prints_its_four_lines_and_what_limits_them() -> None:
    args = ["--small", "2000", "--large", "6000", "--records", "6000", "--streams", "2"]
    args += ["--debits", "600", "--rounds", "2", "--concurrency", "16", "--channels", "2"]
    args += ["--p99-seconds", "1"]
    stdout = _bench("throughput", *args, env={"BENCH_PG": "shared_buffers=128MB"})
    last = stdout.strip().splitlines()[-4:]
    assert re.fullmatch(r"upload: \d+ records/s durable", last[0]), last
    assert re.fullmatch(r"online: \d+ debits/s, p99 [\d.]+ ms, [\d.]+ of no-op", last[1]), last
    assert re.fullmatch(r"batching: [\d.]+x", last[2]), last
    assert re.fullmatch(r"scale: [\d.]+ of small", last[3]), last
    # What limits each figure: CPU per record and per debit, the statements, the
    # round right after a checkpoint, the no-op's own open-loop p99.
    assert stdout.count("CPU a record (us): ledger") == 2
    assert "CPU a debit (us): no-op" in stdout
    assert "CPU a debit (us): ledger" in stdout
    assert stdout.count("right after a checkpoint") >= 3
    assert "open loop, no-op" in stdout
    # The servicers' own p99 from the server's histogram, beside the client's.
    assert re.search(r"open loop, in the servicers +[\d,]+ calls +p99 <= [\d.]+ ms", stdout)
    # and where else it could be spent inside the server: flushes, the event loop
    assert re.search(r"open loop, online flushes +[\d,]+ flushes +p99 <= [\d.]+ ms", stdout)
    assert re.search(r"open loop, event loop lag +[\d,]+ samples +p99 <= [\d.]+ ms", stdout)
    assert "WAL MB" in stdout


def test_mac_benchmark_prints_a_line_per_suite() -> None:
    stdout = _bench("mac", "--records", "300", "--cards", "30")
    for suite in ("pboc-3des", "sm4", "aes"):
        line = rf"mac {suite}: \d+ ns/record fast, \d+ ns/record reference, [\d.]+x"
        assert re.search(line, stdout), stdout


def test_upload_sql_benchmark_prints_its_line() -> None:
    stdout = _bench("upload_sql", "--sizes", "200", "--repeat", "2")
    line = r"upload sql 200 records: unnest [\d.]+ ms, copy [\d.]+ ms, copy/unnest [\d.]+"
    assert re.search(line, stdout), stdout


def test_online_sweep_prints_both_p99s_per_rate() -> None:
    stdout = _bench("online_sweep", "--rates", "200,400", "--seconds", "1", "--cards", "3000")
    for rate in (200, 400):
        line = rf"sweep {rate}/s: no-op p99 [\d.]+ ms, ledger p99 [\d.]+ ms, [\d.]+x, "
        line += r"servicers p99 <= [\d.]+ ms, flushes p99 <= [\d.]+ ms, loop lag p99 <= [\d.]+ ms"
        assert re.search(line, stdout), stdout


def test_upload_surge_compares_the_transaction_bound_and_samples_waits() -> None:
    args = ["--cards", "3000", "--rate", "100", "--duration", "2", "--flush-records", "2"]
    stdout = _bench("upload_surge", *args)
    line = r"surge {}: debit p50 \d+ ms, p99 \d+ ms; upload transactions \d+ records, p50 \d+ ms"
    assert re.search(line.format("default"), stdout), stdout
    assert re.search(line.format("--upload-flush-records 2"), stdout), stdout
    assert stdout.count("online statements sampled:") == 2
    assert re.search(r"surge: debit p99 with --upload-flush-records 2: [\d.]+ of default", stdout)


def test_purse_update_benchmark_prints_both_forms() -> None:
    stdout = _bench("purse_update", "--cards", "3000", "--batch", "100", "--repeat", "4")
    line = (
        r"purse update 3000 cards, 100 a batch: lock then update [\d.]+ us/card, "
        r"one update [\d.]+ us/card, one/two [\d.]+"
    )
    assert re.search(line, stdout), stdout


def test_refdata_reread_benchmark_prints_the_three_forms() -> None:
    stdout = _bench("refdata_reread", "--terminals", "2000", "--repeat", "2")
    line = (
        r"refdata 2000 terminals: row a terminal [\d.]+ ms \(loop held [\d.]+ ms\), "
        r"whole [\d.]+ ms \([\d.]+ ms\), one terminal [\d.]+ ms \([\d.]+ ms\), "
        r"row/whole [\d.]+"
    )
    assert re.search(line, stdout), stdout


def test_upload_ab_benchmark_compares_two_installations() -> None:
    # This installation against itself: the form, not a figure.
    args = ["--baseline-python", sys.executable, "--cards", "2000", "--records", "4000"]
    stdout = _bench("upload_ab", *args, "--rounds", "1", env={"BENCH_PG": "shared_buffers=128MB"})
    line = r"upload A/B 2000 cards: baseline \d+/s, this \d+/s, this/baseline [\d.]+"
    assert re.search(line, stdout), stdout
    assert re.search(r"  baseline: CPU a record \(us\): ledger [\d.]+, PostgreSQL", stdout)


def test_pending_backlog_prints_a_line_per_limit_and_the_no_op() -> None:
    args = ["--limits", "1,1000", "--rate", "300", "--seconds", "1", "--cards", "3000"]
    stdout = _bench("pending_backlog", *args)
    for name in ("1", "1000", "no-op"):
        line = (
            rf"backlog {name}: [\d,]+ of 300 debits CANCELLED, [\d,]+ other errors, p99 [\d.]+ ms"
        )
        assert re.search(line, stdout), stdout


def test_metrics_cost_prints_its_line() -> None:
    stdout = _bench("metrics_cost", "--calls", "2000")
    line = r"metrics: [\d.]+ us a call in one process, [\d.]+ us with worker files \(baseline"
    assert re.search(line, stdout), stdout


def test_acceptors_benchmark_compares_one_server_a_process_with_the_default() -> None:
    args = ["--rate", "300", "--seconds", "1", "--closed", "500", "--rounds", "2"]
    stdout = _bench("acceptors", *args, "--cards", "3000")
    for name in ("ledger", "no-op"):
        closed = rf"acceptors closed loop, {name}: 1 -> [\d,]+/s, \d+ -> [\d,]+/s, [\d.]+x"
        opened = rf"acceptors open loop 300/s, {name}: p99 1 -> [\d.]+ ms, \d+ -> [\d.]+ ms"
        assert re.search(closed, stdout), stdout
        assert re.search(opened, stdout), stdout
