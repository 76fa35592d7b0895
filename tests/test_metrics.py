"""Prometheus metrics (every call counted with its method and status, summed over
workers) and gRPC's backlog of calls not yet taken by the event loop."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest

from onecard.clients.terminal import Terminal
from onecard.server.cli import main as cli_main
from onecard.v1 import common_pb2, terminal_pb2, terminal_pb2_grpc
from tests.support import (
    assert_card_paid,
    cli_server_env,
    dev_keys,
    fetch,
    issue,
    start_cli_server,
    stop_cli_server,
)


def _scrape(url: str) -> dict[str, float]:
    """Sample lines of the exposition, name{labels} -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.mark.parametrize("workers", [1, 2])
async def test_calls_and_flushes_are_counted_across_workers(
    db_dsn: str, tmp_path: Path, workers: int
) -> None:
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_METRICS_LISTEN="127.0.0.1:0")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", str(workers)], env)
    try:
        assert banner.index("onecard metrics on http://127.0.0.1:") < banner.index("serving gRPC")
        url = banner.split("onecard metrics on ")[1].split()[0]
        address = banner.split("serving gRPC on ")[1].split()[0]
        keys = dev_keys()
        # Separate connections, so that with two workers the kernel gives each some.
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(6)
        ]
        card = await issue(channels[0], keys)
        await Terminal(channels[0], "310400000009").load(card, 10_000)
        buses = [Terminal(ch, "310400000001", 1 + 100 * i) for i, ch in enumerate(channels)]
        replies = await asyncio.gather(*(bus.debit(card, 10) for bus in buses for _ in range(3)))
        assert all(r.status == common_pb2.TXN_STATUS_APPROVED for r in replies)
        # A malformed debit: refused before the ledger, counted with its status.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await terminal_pb2_grpc.TerminalServiceStub(channels[0]).Debit(
                terminal_pb2.DebitRequest(card_number="12")
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for ch in channels:
            await ch.close(grace=None)

        m = await asyncio.to_thread(_scrape, url)
        debit = 'onecard_rpc_duration_seconds_count{code="OK",method="TerminalServicer.Debit"}'
        bad = (
            'onecard_rpc_duration_seconds_count{code="INVALID_ARGUMENT",'
            'method="TerminalServicer.Debit"}'
        )
        assert m[debit] == 18
        assert m[bad] == 1
        assert (
            m['onecard_rpc_duration_seconds_count{code="OK",method="TerminalServicer.Load"}'] == 1
        )
        # Every approved debit and the load went through a flush of the online committer.
        assert m['onecard_flush_items_sum{committer="group-commit"}'] == 19
        assert m['onecard_flush_duration_seconds_count{committer="group-commit"}'] >= 1
        assert not any(card.card_no in key for key in m)  # no card numbers in labels
        assert m["onecard_event_loop_lag_seconds_count"] > 0  # sampled in every worker
        # Nothing waits once every call has its reply (the gauge is sampled every 10 ms).
        queued = ['onecard_queued_items{committer="group-commit"}']
        queued.append('onecard_queued_items{committer="group-commit-uploads"}')
        for _ in range(100):
            m = await asyncio.to_thread(_scrape, url)
            if [m[q] for q in queued] == [0, 0]:
                break
            await asyncio.sleep(0.02)
        assert [m[q] for q in queued] == [0, 0]
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopped cleanly" in out
    # The workers' metric files go with the parent.
    assert not list((tmp_path / "data").glob("metrics-*"))


async def test_a_stalled_server_shows_in_the_event_loop_lag(db_dsn: str, tmp_path: Path) -> None:
    """A 0.4 s stall of the server process (SIGSTOP) is one lag sample past 0.25 s."""
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_METRICS_LISTEN="127.0.0.1:0")
    proc, banner = await asyncio.to_thread(start_cli_server, [], env)
    try:
        url = banner.split("onecard metrics on ")[1].split()[0]
        late = 'onecard_event_loop_lag_seconds_bucket{le="0.25"}'
        total = "onecard_event_loop_lag_seconds_count"
        await asyncio.sleep(0.2)
        before = await asyncio.to_thread(_scrape, url)
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.4)
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)
        after = await asyncio.to_thread(_scrape, url)
        assert before[total] > 0
        # Samples: one late past 0.25 s; every one before the stall was early enough.
        assert after[total] - after[late] == before[total] - before[late] + 1
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out


def test_a_malformed_metrics_address_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["serve", "--data-dir", str(tmp_path), "--metrics-listen", "localhost:99999"])
    err = capsys.readouterr().err
    assert code != 0
    assert "--metrics-listen" in err and "65535" in err
    assert not (tmp_path / "pg").exists()  # refused before anything started


async def _burst(
    address: str, requests: list[terminal_pb2.DebitRequest]
) -> list[terminal_pb2.DebitReply | BaseException]:
    """Every request at once, each on the same connection; replies or the errors raised."""
    async with grpc.aio.insecure_channel(address) as chan:
        stub = terminal_pb2_grpc.TerminalServiceStub(chan)
        await chan.channel_ready()
        calls: list[Awaitable[terminal_pb2.DebitReply]] = [stub.Debit(r) for r in requests]
        return await asyncio.gather(*calls, return_exceptions=True)


async def test_calls_past_the_pending_backlog_are_shed_cancelled_and_a_retry_posts_once(
    db_dsn: str, tmp_path: Path
) -> None:
    """gRPC's own backlog: calls the event loop has not taken yet are shed past the limit.

    The server is stopped (SIGSTOP) while a burst is sent, so when it resumes
    its gRPC threads receive the whole burst before the event loop has taken
    more than one call. Past --max-pending-calls (and all past three times
    it) gRPC answers CANCELLED without the ledger seeing the call: nothing
    of it is written, and sending the same request again posts it once.
    """
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_METRICS_LISTEN="127.0.0.1:0")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--max-pending-calls", "1"], env)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, dev_keys())
            await Terminal(chan, "310400000009").load(card, 10_000)
            bus = Terminal(chan, "310400000001")  # signs the burst's requests
            requests = [bus.debit_request(card, 10) for _ in range(40)]
        proc.send_signal(signal.SIGSTOP)
        try:
            sending = asyncio.create_task(_burst(address, requests))
            await asyncio.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGCONT)
        replies = await sending
        shed = [r for r, rep in zip(requests, replies, strict=True) if isinstance(rep, Exception)]
        assert shed, "a 40-call burst past a backlog of 1 (3 hard) was taken whole"
        for rep in replies:
            if isinstance(rep, Exception):
                assert isinstance(rep, grpc.aio.AioRpcError)
                assert rep.code() == grpc.StatusCode.CANCELLED
            else:
                assert isinstance(rep, terminal_pb2.DebitReply), rep
                assert rep.status == common_pb2.TXN_STATUS_APPROVED
        posted = await fetch(
            db_dsn,
            "SELECT count(*) AS n FROM postings WHERE card_no = $1 AND kind = 1",
            int(card.card_no),
        )
        assert posted[0]["n"] == len(requests) - len(shed)
        # The terminal sends the shed ones again, one at a time: each posts once.
        async with grpc.aio.insecure_channel(address) as chan:
            stub = terminal_pb2_grpc.TerminalServiceStub(chan)
            for r in shed:
                assert (await stub.Debit(r)).status == common_pb2.TXN_STATUS_APPROVED
            for r in requests:  # and every one of the 40 again is a duplicate
                assert (await stub.Debit(r)).status == common_pb2.TXN_STATUS_DUPLICATE
        await assert_card_paid(db_dsn, card, purchases=40, balance=10_000 - 40 * 10)
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out


def test_a_taken_metrics_port_is_refused_naming_the_flag_before_the_database_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(
            ["serve", "--data-dir", str(tmp_path), "--metrics-listen", f"127.0.0.1:{port}"]
        )
    err = capsys.readouterr().err
    assert code == 2
    assert f"--metrics-listen: cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "pg").exists()  # refused before the embedded PostgreSQL started
