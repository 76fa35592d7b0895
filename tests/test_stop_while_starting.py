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
import time
from pathlib import Path

import asyncpg
import pytest

from onecard.ledger.storage.migrate import _LOCK_KEY
from tests.support import cli_server_env
from tests.test_workers import children, kill_all, start_parent


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
