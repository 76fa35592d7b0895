"""Prometheus metrics: every call counted with its method and status, summed over workers."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest

from onecard.clients.terminal import Terminal
from onecard.server.cli import main as cli_main
from onecard.v1 import common_pb2, terminal_pb2, terminal_pb2_grpc
from tests.support import cli_server_env, dev_keys, issue, start_cli_server, stop_cli_server


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
            await ch.close()

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
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopped cleanly" in out
    # The workers' metric files go with the parent.
    assert not list((tmp_path / "data").glob("metrics-*"))


def test_a_malformed_metrics_address_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["serve", "--data-dir", str(tmp_path), "--metrics-listen", "localhost:99999"])
    err = capsys.readouterr().err
    assert code != 0
    assert "--metrics-listen" in err and "65535" in err
    assert not (tmp_path / "pg").exists()  # refused before anything started
