"""Calls that end in a gRPC error are failures in the report, not fast answers.

A full queue refuses at once: timed with the answered calls, its refusals
pulled the percentiles down exactly when the server was overloaded, and a run
whose calls were mostly refused read as a fast, clean one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from onecard.clients.loadtest import Op, Report, add_arguments, run, run_ops
from onecard.clients.population import Population, seed_cards, seed_terminals
from onecard.ledger.devdata import DEMO_ISSUER
from onecard.ledger.engine import BatchSettings
from onecard.server.app import RunningServer
from onecard.v1 import upload_pb2
from tests.support import dev_keys, start_test_server


@pytest_asyncio.fixture(loop_scope="session")
async def tiny_queue_server(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server whose online queue holds one debit: most of a burst is refused."""
    running = await start_test_server(
        db_dsn, tmp_path, dev_keys(), batching=BatchSettings(max_batch=1, max_queue=1, linger=0.02)
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_refused_calls_are_counted_as_failures_and_timed_apart(
    tiny_queue_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tiny_queue_server
    report_file = tmp_path / "r.json"
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--target", server.address, "--dsn", server.dsn, "--cards", "200", "--terminals", "8",
         "--mix", "debit=1", "--count", "300", "--concurrency", "32", "--json", str(report_file)]
    )  # fmt: skip
    assert await run(args) == 0  # the books are right: refusals posted nothing
    report = json.loads(report_file.read_text())
    outcomes = report["outcomes"]
    errors = sum(n for k, n in outcomes.items() if " error " in k)
    answers = sum(n for k, n in outcomes.items() if " error " not in k)
    assert outcomes.get("debit error RESOURCE_EXHAUSTED", 0) > 0 and answers > 0
    assert (report["failed"], report["answered"]) == (errors, answers)
    assert report["requests"] == errors + answers == 300
    assert report["latency_ms"]["debit"]["calls"] == answers
    assert report["failed_latency_ms"]["debit"]["calls"] == errors
    assert report["check"]["unanswered"] == errors and report["check"]["ok"]
    out = " ".join(capsys.readouterr().out.split())
    assert f"{errors:,} FAILED" in out
    assert f"calls failed: {errors:,} of 300" in out


def test_an_error_is_kept_out_of_the_answered_latencies() -> None:
    report = Report()
    report.record("debit", 0.010, 1.0)
    report.record("debit", 0.001, 1.0, ok=False)
    report.record("debit", 0.001, 1.0, ok=False)
    summary = report.summary()
    assert summary["latency_ms"]["debit"]["calls"] == 1
    assert summary["latency_ms"]["debit"]["p50"] == pytest.approx(10, rel=0.01)
    assert summary["failed_latency_ms"]["debit"]["calls"] == 2
    assert (summary["requests"], summary["answered"], summary["failed"]) == (3, 1, 2)


async def test_upload_outcomes_count_transactions_whether_answered_or_failed(
    server: RunningServer,
) -> None:
    """An answered upload added one count per record to the outcomes ("upload
    POSTED"), a failed one one count per batch ("upload error ..."): the counts
    added up neither to the transactions nor to the calls sent (found by review)."""
    version = dev_keys().get(DEMO_ISSUER, 2)
    assert version is not None
    conn = await asyncpg.connect(server.dsn)
    try:
        await seed_cards(conn, 10, 20_000, version.kv)
        terminals = await seed_terminals(conn, 2)
    finally:
        await conn.close()
    pop = Population(version, 10, 20_000)
    when = "20250101080000"
    good = [pop.offline_record(i, 100, terminals[0], 1 + i, when) for i in range(5)]
    bad = [pop.offline_record(i, 100, terminals[1], 1 + i, when) for i in range(4)]
    ops = [
        Op("upload", 0, upload_pb2.UploadBatch(
            batch_id="good", records=good, claimed_count=5, claimed_total=500), 5),
        Op("upload", 0, upload_pb2.UploadBatch(
            batch_id="bad", records=bad, claimed_count=4, claimed_total=401), 4),
    ]  # fmt: skip
    report = await run_ops(server.address, ops, 0, 1)
    summary = report.summary()
    assert summary["outcomes"] == {"upload POSTED": 5, "upload error INVALID_ARGUMENT": 4}
    assert (summary["records"], summary["failed_records"]) == (5, 4)
    assert (summary["answered"], summary["failed"]) == (1, 1)
