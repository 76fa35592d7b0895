"""A stop that comes while the server waits to start ends the start.

A server starting beside another that is migrating waits for the migration
lock however long the other holds it (a migration on a large table can take
hours). The stop was only noted: the single process and the ``--workers``
parent went on waiting, and a supervisor's stop hung until the other server
let go. A worker starting when the stop came was not signalled either.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from onecard.ledger.storage.migrate import _LOCK_KEY
from tests.support import cli_server_env
from tests.test_workers import Output, children, kill_all, start_parent


async def _waiting_for_migration_lock(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = $1",
            _LOCK_KEY,
        )
    )


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_stop_while_waiting_for_the_migration_lock_stops_at_once(
    db_dsn: str, tmp_path: Path, workers: str
) -> None:
    env = await cli_server_env(db_dsn, tmp_path)
    other = await asyncpg.connect(db_dsn)  # another server, migrating
    try:
        await other.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        proc, out = start_parent(["--workers", workers], env)
        try:
            deadline = time.monotonic() + 60
            while not await _waiting_for_migration_lock(other):
                assert time.monotonic() < deadline and proc.poll() is None, out.text
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            text = await asyncio.to_thread(out.rest, 30.0)
        finally:
            kill_all(proc)
        assert proc.returncode == 0, text
        assert "stopped cleanly (stopped while starting)" in text, text
        assert "Traceback" not in text, text
        assert not children(proc.pid)
        # It let go of what it had taken: nobody waits for the lock any more.
        assert not await _waiting_for_migration_lock(other)
    finally:
        await other.close()


async def test_a_reload_while_starting_is_done_once_up(db_dsn: str, tmp_path: Path) -> None:
    """SIGHUP (reload the keys) to a server still starting: its default action ended
    the process, the embedded PostgreSQL of a single process left running."""
    env = await cli_server_env(db_dsn, tmp_path)
    other = await asyncpg.connect(db_dsn)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        proc, out = start_parent([], env)
        try:
            deadline = time.monotonic() + 60
            while not await _waiting_for_migration_lock(other):
                assert time.monotonic() < deadline and proc.poll() is None, out.text
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGHUP)
            await other.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
            # Reloaded as soon as it is up, before its banner.
            await asyncio.to_thread(out.wait_for, "key file reloaded")
            await asyncio.to_thread(out.wait_for, "serving gRPC on")
            assert proc.poll() is None, out.text
            proc.send_signal(signal.SIGTERM)
            text = await asyncio.to_thread(out.rest, 30.0)
        finally:
            kill_all(proc)
        assert proc.returncode == 0, text
        assert "onecard: stopped cleanly" in text, text
    finally:
        await other.close()


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _grpc_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "cygrpc" in maps.read()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
async def test_a_signal_while_the_command_imports_the_server_is_kept(
    db_dsn: str, tmp_path: Path, workers: str, sig: signal.Signals
) -> None:
    """SIGHUP or SIGTERM to ``onecard serve`` in its first moments, while it imports
    the server (most of a second): the default action applied, so a reload right
    after a supervisor's start killed it and a stop ended it with 143. Now the
    command notes them first thing: the keys are reloaded once it is up, and a
    stop ends the start cleanly."""
    env = await cli_server_env(db_dsn, tmp_path)
    command = Path(sys.executable).with_name("onecard")  # the console script
    proc = subprocess.Popen(
        [str(command), "serve", "--workers", workers],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGHUP):
            assert time.monotonic() < deadline and proc.poll() is None, out.rest()
            await asyncio.sleep(0.001)
        before_grpc = not _grpc_loaded(proc.pid)
        proc.send_signal(sig)
        if sig == signal.SIGHUP:
            if workers == "1":  # the server read its keys before: it reads them again
                await asyncio.to_thread(out.wait_for, "key file reloaded")
            # (The workers of a parent start after the signal and read them then.)
            await asyncio.to_thread(out.wait_for, "serving gRPC on")
            assert proc.poll() is None, out.text
            proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest, 60.0)
    finally:
        kill_all(proc)
    assert before_grpc, "the handler came only with the server's imports"
    assert proc.returncode == 0, text
    if sig == signal.SIGTERM:
        assert "stopped cleanly (stopped while starting)" in text, text
    else:
        assert "onecard: stopped cleanly" in text, text
    assert "Traceback" not in text, text
