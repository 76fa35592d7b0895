"""``onecard loadtest`` against a real server: its report, its files, and its check of the books."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from onecard.clients import loadtest
from onecard.clients.loadtest import add_arguments, collector_quiet, embedded_dsn, run
from onecard.server.app import EMBEDDED_DATABASE, RunningServer
from onecard.v1 import terminal_pb2, terminal_pb2_grpc, upload_pb2, upload_pb2_grpc
from tests.support import dev_keys, start_test_server


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("mode", [["--count", "300"], ["--rate", "400", "--duration", "1"]])
async def test_loadtest_reports_and_checks_the_books(
    server: RunningServer, tmp_path: Path, mode: list[str]
) -> None:
    report_file, plot_file = tmp_path / "r.json", tmp_path / "r.png"
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "500",
        "--terminals", "20", "--batch", "20", "--profile", "rush",
        "--json", str(report_file), "--plot", str(plot_file), *mode,
    )  # fmt: skip
    assert await run(args) == 0
    report = json.loads(report_file.read_text())
    outcomes = report["outcomes"]
    assert report["requests"] == (300 if "--count" in mode else 400)
    assert not [k for k in outcomes if "error" in k], report["errors"]
    assert outcomes.get("debit APPROVED", 0) > 0
    assert outcomes.get("upload POSTED", 0) > 0
    check = report["check"]
    assert check["acknowledged"] > 0
    assert (check["missing"], check["doubled"], check["trial_balance"]) == (0, 0, 0)
    assert set(report["latency_ms"]) <= {"debit", "load", "upload"}
    assert all(v["p50"] <= v["p99"] <= v["max"] for v in report["latency_ms"].values())
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_closed_loop_stops_at_the_duration(server: RunningServer, tmp_path: Path) -> None:
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "200",
        "--terminals", "4", "--mix", "debit=1", "--count", "20000",
        "--rate", "0", "--concurrency", "4", "--duration", "0.5", "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0
    report = json.loads(report_file.read_text())
    assert 0 < report["requests"] < 20_000
    # an emptied card tops up instead of riding, so loads are acknowledged too
    approved = sum(n for k, n in report["outcomes"].items() if k.endswith(" APPROVED"))
    assert report["check"]["acknowledged"] == approved > 0


def test_embedded_dsn_comes_from_the_postmaster_pid(tmp_path: Path) -> None:
    assert embedded_dsn(tmp_path) is None
    (tmp_path / "pg").mkdir()
    pid = tmp_path / "pg" / "postmaster.pid"
    pid.write_text("4242\n/data\n1700000000\n54321\n")
    assert embedded_dsn(tmp_path) is None  # no socket line: not a server we can reach
    pid.write_text("4242\n/data\n1700000000\n54321\n/data/pg\n\n")
    assert embedded_dsn(tmp_path) == (
        f"postgresql://postgres@/{EMBEDDED_DATABASE}?host=/data/pg&port=54321"
    )


async def test_the_generator_collects_no_garbage_while_it_times_calls(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own collector pauses would be counted as the server's latency (a bug, measured)."""
    during: list[bool] = []
    send = loadtest._send

    async def watched(*args: object) -> bool:
        during.append(gc.isenabled())
        return await send(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loadtest, "_send", watched)
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "100",
        "--terminals", "4", "--mix", "debit=1", "--count", "50", "--rate", "200",
    )  # fmt: skip
    assert await run(args) == 0
    assert during and not any(during)
    assert gc.isenabled()


def test_the_collector_comes_back_even_when_a_run_fails() -> None:
    with pytest.raises(RuntimeError), collector_quiet():
        assert not gc.isenabled()
        raise RuntimeError("the run broke")
    assert gc.isenabled()


async def test_without_a_database_the_report_says_the_books_were_not_checked(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--target alone: no --dsn, no embedded PostgreSQL in --data-dir. Silence read as a pass."""
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--data-dir", str(tmp_path / "none"), "--cards", "20",
        "--terminals", "4", "--mix", "debit=1", "--count", "10", "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0  # not asked to check: nothing failed
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("books:"))
    assert line.startswith("books: not checked: ") and line.endswith("give --dsn")
    assert "--target given without --dsn" in line
    check = json.loads(report_file.read_text())["check"]
    assert check["checked"] is False and "--target given without --dsn" in check["reason"]


async def test_with_target_the_embedded_database_of_the_data_dir_is_still_checked(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test server's database plays the embedded one that --data-dir's postmaster.pid names."""
    data = tmp_path / "data"
    monkeypatch.setattr(loadtest, "embedded_dsn", lambda d: server.dsn if d == data else None)
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--data-dir", str(data), "--cards", "50",
        "--terminals", "4", "--mix", "debit=1", "--count", "20", "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0
    check = json.loads(report_file.read_text())["check"]
    assert check["checked"] is True and check["ok"] is True
    assert check["database"] == f"the embedded PostgreSQL in {data / 'pg'}"
    assert check["acknowledged"] > 0


async def test_a_second_run_on_the_same_database_uses_fresh_terminal_seqs(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seqs came from the clock modulo 4,000 s: runs that far apart reused each other's.

    The second run's requests were then answered DUPLICATE or CONFLICT, and
    its figures measured the duplicate path. They now start above the
    highest seq the database holds for the generator's terminals. The clock
    is pinned here, so both runs would get the same range the old way.
    """
    import time as real_time
    from types import SimpleNamespace

    pinned = SimpleNamespace(**vars(real_time))
    pinned.time = lambda: 1_700_000_000.0
    monkeypatch.setattr(loadtest, "time", pinned)
    for n in (1, 2):
        report_file = tmp_path / f"r{n}.json"
        args = _args(
            "--target", server.address, "--dsn", server.dsn, "--cards", "500",
            "--terminals", "10", "--batch", "10", "--count", "200", "--seed", "5",
            "--json", str(report_file),
        )  # fmt: skip
        assert await run(args) == 0
        outcomes = json.loads(report_file.read_text())["outcomes"]
        assert not [k for k in outcomes if "DUPLICATE" in k or "CONFLICT" in k], (n, outcomes)


async def test_a_population_short_of_money_uploads_full_batches_and_its_books_hold(
    server: RunningServer, tmp_path: Path
) -> None:
    """Records of empty cards were dropped from their batches, and empty batches from
    the run: 43 requests of --count 50 here, 1 to 71 records a batch of --batch 100.
    Holders now top up (loads in upload slots), which the books check must still
    find exact (found by review)."""
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "100",
        "--card-balance", "1000", "--terminals", "4", "--mix", "upload=1", "--batch", "100",
        "--count", "50", "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0
    report = json.loads(report_file.read_text())
    assert report["requests"] == 50
    uploads = report["latency_ms"]["upload"]["calls"]
    assert report["records"] == uploads * 100 + report["latency_ms"]["load"]["calls"]
    assert report["check"]["ok"] and report["check"]["acknowledged"] == report["records"]


class _Stalled(  # the generated servicers are untyped
    terminal_pb2_grpc.TerminalServiceServicer,  # type: ignore[misc]
    upload_pb2_grpc.UploadServiceServicer,  # type: ignore[misc]
):
    """A server stuck behind a lock: it takes calls and never answers them."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def Debit(self, request: Any, context: Any) -> terminal_pb2.DebitReply:
        await self.never.wait()
        return terminal_pb2.DebitReply()

    async def UploadRecords(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[upload_pb2.UploadBatchReply]:
        await self.never.wait()
        yield upload_pb2.UploadBatchReply()


@pytest.mark.parametrize("kind", ["debit", "upload"])
async def test_a_run_ends_near_its_duration_and_reports_when_the_server_stalls(
    kind: str, tmp_path: Path
) -> None:
    """--duration ends a closed-loop run by time, but calls carried no deadline and
    the duration was looked at only before the next send: a server that stopped
    answering (the very thing a load test must show) kept the run, its report and
    its books check waiting for ever. A call now fails DEADLINE_EXCEEDED after
    --timeout (found by review)."""
    stalled = _Stalled()
    server = grpc.aio.server()
    terminal_pb2_grpc.add_TerminalServiceServicer_to_server(stalled, server)
    upload_pb2_grpc.add_UploadServiceServicer_to_server(stalled, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", f"127.0.0.1:{port}", "--data-dir", str(tmp_path), "--cards", "10",
        "--terminals", "2", "--mix", f"{kind}=1", "--batch", "5", "--count", "20",
        "--concurrency", "2", "--duration", "0.5", "--timeout", "1", "--json", str(report_file),
    )  # fmt: skip
    began = time.perf_counter()
    try:
        try:
            code = await asyncio.wait_for(run(args), timeout=15)
        except TimeoutError:
            pytest.fail("--duration 0.5 --timeout 1 run still waiting on its calls after 15 s")
    finally:
        stalled.never.set()
        await server.stop(0)
    assert code == 0 and time.perf_counter() - began < 10
    report = json.loads(report_file.read_text())
    assert report["answered"] == 0 and report["failed"] == 2  # the two in flight
    assert set(report["outcomes"]) == {f"{kind} error DEADLINE_EXCEEDED"}
    assert report["check"]["checked"] is False


async def test_calls_past_the_timeout_are_unanswered_in_the_books_check(
    server: RunningServer, tmp_path: Path
) -> None:
    """A call that ran out of time may still be posted by the server: the books
    check holds it to at most one posting, as any call without an answer."""
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "50", "--terminals", "4",
        "--mix", "debit=1,upload=1", "--batch", "5", "--count", "40", "--timeout", "0.0001",
        "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0
    report = json.loads(report_file.read_text())
    timed_out = sum(n for k, n in report["outcomes"].items() if k.endswith("DEADLINE_EXCEEDED"))
    assert timed_out > 0 and report["check"]["ok"]
    assert report["check"]["unanswered"] == report["failed_records"] >= timed_out


@pytest_asyncio.fixture(loop_scope="session")
async def few_streams_server(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server that takes 4 upload streams at once (64 by default)."""
    running = await start_test_server(db_dsn, tmp_path, dev_keys(), max_upload_streams=4)
    try:
        yield running
    finally:
        await running.stop()


async def test_upload_batches_share_a_few_long_lived_streams_as_gateways_do(
    few_streams_server: RunningServer, tmp_path: Path
) -> None:
    """The generator opened a stream for every batch: a burst of batches held more
    streams than the server's --max-upload-streams and was refused
    RESOURCE_EXHAUSTED ("64 upload streams are open": the open-loop rush run failed
    3 of 4 times on 2 CPUs), a load no fleet of gateways makes (found by review)."""
    server = few_streams_server
    report_file = tmp_path / "r.json"
    args = _args(
        "--target", server.address, "--dsn", server.dsn, "--cards", "500", "--terminals", "8",
        "--mix", "upload=1", "--batch", "20", "--count", "80", "--rate", "800",
        "--upload-streams", "4", "--json", str(report_file),
    )  # fmt: skip
    assert await run(args) == 0
    report = json.loads(report_file.read_text())
    assert report["failed"] == 0, report["errors"]
    assert sum(report["outcomes"].values()) == report["records"] == 80 * 20
    assert report["check"]["acknowledged"] == 80 * 20
