"""``onecard serve --workers N``: several processes, one port, one set of books."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc

from onecard.clients.terminal import Terminal
from onecard.v1 import common_pb2
from tests.support import (
    assert_books_balance,
    assert_simulation_passes,
    cli_server_env,
    dev_keys,
    fetch,
    issue,
    start_cli_server,
    stop_cli_server,
)


async def test_two_workers_share_the_port_and_the_books(db_dsn: str, tmp_path: Path) -> None:
    env = await cli_server_env(db_dsn, tmp_path)
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        pids = banner.split("(pids ")[1].split(")")[0].split(", ")
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)

        keys = dev_keys()
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, keys)
            await Terminal(chan, "310400000009").load(card, 10_000)
        # many connections, so the kernel hands some to each worker (channels with
        # equal options would share one connection through gRPC's subchannel pool)
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        buses = [Terminal(ch, "310400000001", 1 + 100 * i) for i, ch in enumerate(channels)]
        replies = await asyncio.gather(*(bus.debit(card, 10) for bus in buses for _ in range(5)))
        for ch in channels:
            await ch.close()
        assert all(r.status == common_pb2.TXN_STATUS_APPROVED for r in replies)
        rows = await fetch(
            db_dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
        )
        assert rows[0]["purse_balance"] == 10_000 - 40 * 10
        backends = await fetch(
            db_dsn,
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_type = 'client backend'",
        )
        assert backends[0]["n"] >= 3  # two pools of at least two, and ours
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopped cleanly" in out
    await assert_books_balance(db_dsn)


def test_two_workers_on_the_embedded_database(tmp_path: Path) -> None:
    """``onecard serve --workers 2`` with no database named: the README's setup, two cores.

    Workers reach the parent's embedded PostgreSQL through a DSN, so they must be
    handed the personal-data key the parent made; they refused to start without it.
    """
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    proc, banner = start_cli_server(["--workers", "2"], env)
    try:
        assert "workers: 2" in banner and "embedded PostgreSQL" in banner, banner
        assert_simulation_passes(env)
    finally:
        out = stop_cli_server(proc)
    assert proc.returncode == 0, banner + out
    assert "stopped cleanly" in out
    assert (data / "pii-key").stat().st_mode & 0o077 == 0  # made once, owner-only


def test_workers_run_the_parents_package_not_the_current_directory(tmp_path: Path) -> None:
    """`pip install .` then `onecard serve --workers 2` from the checkout.

    Workers were started with ``python -m``, which puts the current directory
    first on sys.path: from a source checkout they imported the checkout
    (without the built extension) instead of the installed package, and died.
    """
    shadow = tmp_path / "onecard"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        'raise ImportError("imported the current directory, not the installed package")\n'
    )
    env = {
        **os.environ,
        "ONECARD_DATA_DIR": str(tmp_path / "data"),
        "ONECARD_LISTEN": "127.0.0.1:0",
    }
    # The parent is found as installed (-P); the workers must find the same.
    proc, banner = start_cli_server(["--workers", "2"], env, cwd=tmp_path, python_flags=("-P",))
    try:
        assert "workers: 2" in banner
    finally:
        out = stop_cli_server(proc)
    assert proc.returncode == 0, banner + out
    assert "stopped cleanly" in out
