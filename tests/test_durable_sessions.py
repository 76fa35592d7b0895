"""The ledger acknowledges only what a crash cannot take back, whatever the database's defaults.

DESIGN.md decision 3: a reply goes out after COMMIT, with synchronous_commit
on. The embedded PostgreSQL refuses to run without it, but a --dsn server's
sessions took whatever the database, role or DSN set: with
``synchronous_commit = off`` a load was APPROVED (its MAC2 credited on the
chip) on a COMMIT whose WAL was not yet on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from onecard.clients.terminal import Terminal
from onecard.ledger.devdata import write_dev_key_file
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.pii import load_or_create_key
from onecard.ledger.storage.pool import NotDurable, _durable_session
from onecard.server.cli import main
from onecard.server.errors import guarded
from onecard.v1 import common_pb2
from tests.support import issue, start_test_server


async def _database_default(dsn: str, setting: str, value: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = {value}')
    finally:
        await conn.close()


@pytest.mark.parametrize(("default", "session"), [("off", "on"), ("remote_apply", "remote_apply")])
async def test_sessions_commit_durably_whatever_the_database_default(
    db_dsn: str, keys: MemoryKeyStore, tmp_path: Path, default: str, session: str
) -> None:
    await _database_default(db_dsn, "synchronous_commit", default)
    running = await start_test_server(db_dsn, tmp_path, keys)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            card = await issue(channel, keys)
            reply = await Terminal(channel, "310400000009", 1).load(card, 5000)
            assert reply.status == common_pb2.TXN_STATUS_APPROVED
        async with running.pool.acquire() as conn:
            # A stronger setting (waiting for a standby too) is left as the DBA set it.
            assert await conn.fetchval("SHOW synchronous_commit") == session
    finally:
        await running.stop()


class _Settings:
    """A connection that reports the given server settings and records what is set."""

    def __init__(self, **settings: str) -> None:
        self.settings = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
        self.settings.update(settings)
        self.executed: list[str] = []

    async def fetchrow(self, query: str) -> dict[str, str]:
        return dict(self.settings)

    async def execute(self, query: str) -> None:
        self.executed.append(query)


@pytest.mark.parametrize("setting", ["fsync", "full_page_writes"])
async def test_a_database_that_could_lose_confirmed_commits_is_refused(setting: str) -> None:
    conn: Any = _Settings(**{setting: "off"})
    with pytest.raises(NotDurable, match=f"{setting} = off"):
        await _durable_session(conn)
    assert conn.executed == []


def test_serve_refuses_a_database_that_could_lose_confirmed_commits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async def not_durable(*args: object, **kwargs: object) -> None:
        raise NotDurable("the database runs with fsync = off: a crash could lose ...")

    keys, pii = tmp_path / "keys.json", tmp_path / "pii-key"
    write_dev_key_file(keys)
    load_or_create_key(pii)
    monkeypatch.setattr("onecard.server.app.create_ledger_pool", not_durable)
    argv = ["serve", "--dsn", "postgresql:///nowhere", "--keys", str(keys)]
    code = main([*argv, "--pii-key-file", str(pii), "--listen", "127.0.0.1:0"])
    assert code == 2
    assert "fsync = off" in capsys.readouterr().err


async def test_a_connection_refused_for_durability_mid_run_is_retryable() -> None:
    """A pool connection opened after fsync was turned off: UNAVAILABLE, not UNKNOWN."""

    async def flush() -> None:
        raise NotDurable("the database runs with fsync = off: ...")

    class _Context:
        def __init__(self) -> None:
            self.status: tuple[grpc.StatusCode, str] | None = None

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.status = (code, details)
            raise grpc.aio.AbortError()

    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        await guarded(cast(Any, context), flush)
    assert context.status == (grpc.StatusCode.UNAVAILABLE, "ledger database unavailable; retry")
