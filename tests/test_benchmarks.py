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


def test_throughput_benchmark_prints_its_four_lines_and_what_limits_them() -> None:
    args = ["--small", "2000", "--large", "6000", "--records", "6000", "--streams", "2"]
    args += ["--debits", "600", "--rounds", "2", "--concurrency", "16", "--channels", "2"]
    args += ["--p99-seconds", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BENCH_PG": "shared_buffers=128MB"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-4:]
    assert re.fullmatch(r"upload: \d+ records/s durable", last[0]), last
    assert re.fullmatch(r"online: \d+ debits/s, p99 [\d.]+ ms, [\d.]+ of no-op", last[1]), last
    assert re.fullmatch(r"batching: [\d.]+x", last[2]), last
    assert re.fullmatch(r"scale: [\d.]+ of small", last[3]), last
    # What limits each figure: CPU per record and per debit, the statements, the
    # round right after a checkpoint, the no-op's own open-loop p99.
    assert out.stdout.count("CPU a record (us): ledger") == 2
    assert "CPU a debit (us): no-op" in out.stdout
    assert "CPU a debit (us): ledger" in out.stdout
    assert out.stdout.count("right after a checkpoint") >= 3
    assert "open loop, no-op" in out.stdout
    assert "WAL MB" in out.stdout


def test_mac_benchmark_prints_a_line_per_suite() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.mac", "--records", "300", "--cards", "30"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for suite in ("pboc-3des", "sm4", "aes"):
        line = rf"mac {suite}: \d+ ns/record fast, \d+ ns/record reference, [\d.]+x"
        assert re.search(line, out.stdout), out.stdout


def test_upload_sql_benchmark_prints_its_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.upload_sql", "--sizes", "200", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    line = r"upload sql 200 records: unnest [\d.]+ ms, copy [\d.]+ ms, copy/unnest [\d.]+"
    assert re.search(line, out.stdout), out.stdout
