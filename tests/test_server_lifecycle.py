"""The process around the ledger: health, reflection, restarts, the CLI, keys and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.loadtest import embedded_dsn
from onecard.clients.terminal import Terminal
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.keys import FileKeyStore, KeyStoreError, MemoryKeyStore
from onecard.ledger.pii import read_key_file
from onecard.ledger.storage.migrate import (
    SchemaNewerThanCode,
    apply_migrations,
    available_migrations,
)
from onecard.server.app import RunningServer, start_server
from onecard.server.config import ServerConfig
from onecard.server.dsn import describe_dsn
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.v1 import common_pb2
from tests.support import (
    assert_books_balance,
    assert_simulation_passes,
    cli_server_env,
    dev_keys,
    fetch,
    issue,
    pii_key_file,
    seed_with_dev_keys,
    start_cli_server,
    start_test_server,
    stop_cli_server,
)


async def test_health_and_reflection(server: RunningServer, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "onecard.v1.TerminalService", "onecard.v1.DeskService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"onecard.v1.TerminalService", "onecard.v1.DeskService"} <= names


async def test_restart_on_same_data_dir_keeps_acknowledged_postings(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data")
    running = await start_server(cfg)
    keys = dev_keys()
    acknowledged = []
    async with grpc.aio.insecure_channel(running.address) as channel:
        card = await issue(channel, keys)
        await Terminal(channel, "310400000009", 1).load(card, 9000)
        bus = Terminal(channel, "310400000001", 1)
        replies = await asyncio.gather(
            *(bus.stub.Debit(bus.debit_request(card, 100)) for _ in range(20))
        )
        acknowledged = [r for r in replies if r.status == common_pb2.TXN_STATUS_APPROVED]
    await running.stop()

    running = await start_server(cfg)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            from onecard.v1 import desk_pb2, desk_pb2_grpc

            view = await desk_pb2_grpc.DeskServiceStub(channel).GetCard(
                desk_pb2.GetCardRequest(card_number=card.card_no),
                metadata=(("x-onecard-operator", "t"),),
            )
        assert len(acknowledged) == 20
        assert view.balance == 9000 - 20 * 100
        await assert_books_balance(running.dsn)
    finally:
        await running.stop()


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(DEV_KEYS))
    path.chmod(0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        FileKeyStore(path)
    path.chmod(0o600)
    assert FileKeyStore(path).get("3104", 2) is not None


def test_keys_never_show_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(DEV_KEYS))
    path.chmod(0o600)
    store = FileKeyStore(path)
    version = store.get("3104", 1)
    assert version is not None
    shown = repr(version) + str(version.mtk) + repr(store)
    for issuer in DEV_KEYS["issuers"].values():
        for entry in issuer.values():
            assert entry["mtk"].lower() not in shown.lower()
            assert entry["mtk"][:8] not in shown
    bad = {
        "issuers": {
            "3104": {
                "1": {
                    "suite": "pboc-3des",
                    "mtk": "00112233445566778899AABBCCDDEEFF00",
                    "mlk": "zz",
                }
            }
        }
    }
    path.write_text(json.dumps(bad))
    with pytest.raises(KeyStoreError) as err:
        store.reload()
    assert "00112233" not in str(err.value)
    assert store.get("3104", 1) is not None  # old keys stay in force


async def test_migrations_are_recorded_and_rerun_applies_nothing(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        applied = await apply_migrations(conn)
        assert len(applied) == len(available_migrations()) >= 1
        assert await apply_migrations(conn) == []
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        assert [v["version"] for v in versions] == [m.version for m in available_migrations()]
    finally:
        await conn.close()


async def test_a_database_migrated_by_a_newer_onecard_is_refused(
    empty_db_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A downgrade: this code's queries do not fit a newer schema (0016 dropped a
    column 0015's code reads), yet the server started and served it without a
    word, and every request that met the difference failed as UNKNOWN."""
    newest = max(m.version for m in available_migrations())
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from_the_future')",
            newest + 1,
        )
        with pytest.raises(SchemaNewerThanCode) as err:
            await apply_migrations(conn)
        assert f"{newest + 1:04d}_from_the_future" in str(err.value)
        # nothing was done, and the lock is not left held
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
    finally:
        await conn.close()
    from onecard.server.cli import main

    # the operator's to fix, as a refused migration is
    assert await asyncio.to_thread(main, ["migrate", "--dsn", empty_db_dsn]) == 2
    assert f"{newest + 1:04d}_from_the_future" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["statement_timeout", "transaction_timeout"])
async def test_migrations_wait_past_the_databases_timeouts(db_dsn: str, setting: str) -> None:
    """A statement_timeout (or, from PostgreSQL 17, a transaction_timeout) the DBA
    set on the database or role cut the wait for another server's migration lock
    short, and the start ended as "cannot reach the database" (exit 3), though
    the lock wait is meant to last however long the other server migrates; a
    migration longer than it was cancelled too."""
    setup = await asyncpg.connect(db_dsn)
    try:
        if await setup.fetchval("SELECT current_setting($1, true)", setting) is None:
            pytest.skip(f"this PostgreSQL has no {setting}")
        await setup.execute(
            f"DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET {setting} = 200',"
            " current_database()); END $$"
        )
        # 0020 again, to be applied while a reader holds audit_log for longer than that
        await setup.execute("DELETE FROM schema_migrations WHERE version = 20")
        await setup.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        await setup.execute("DROP FUNCTION audit_log_is_append_only()")
    finally:
        await setup.close()
    holder = await asyncpg.connect(db_dsn)
    await holder.execute(f"SET {setting} = 0")  # it holds what it holds, not cut short
    conn = await asyncpg.connect(db_dsn)
    try:
        # another server migrating: it holds the migration lock for a second
        await holder.execute("SELECT pg_advisory_lock($1)", 0x0EC4_2D00)
        release = asyncio.get_running_loop().call_later(
            1.0,
            lambda: asyncio.ensure_future(
                holder.execute("SELECT pg_advisory_unlock($1)", 0x0EC4_2D00)
            ),
        )
        assert await apply_migrations(conn) == ["0020_audit_log_append_only"]
        release.cancel()
        # and a migration that waits for a table longer than the timeout
        await conn.execute("DELETE FROM schema_migrations WHERE version = 20")
        await conn.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        await conn.execute("DROP FUNCTION audit_log_is_append_only()")
        reader = holder.transaction()
        await reader.start()
        await holder.execute("LOCK audit_log IN SHARE MODE")
        asyncio.get_running_loop().call_later(1.0, lambda: asyncio.ensure_future(reader.commit()))
        assert await apply_migrations(conn) == ["0020_audit_log_append_only"]
        # the session's own timeout is back
        assert await conn.fetchval(f"SHOW {setting}") == "200ms"
    finally:
        await conn.close()
        await holder.close()


async def test_a_connection_lost_during_a_migration_is_an_outage_and_a_retry_applies_it(
    db_dsn: str,
) -> None:
    """The database restarting (or the session killed) in the middle of a migration
    ended the start in a traceback of asyncpg's InterfaceError, exit 1: the
    transaction's exit and the lock's release each raised on the closed
    connection over the loss, which had itself been called a refused migration."""
    holder = await asyncpg.connect(db_dsn)
    try:
        await holder.execute("DELETE FROM schema_migrations WHERE version = 20")
        await holder.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        await holder.execute("DROP FUNCTION audit_log_is_append_only()")
        reader = holder.transaction()
        await reader.start()
        await holder.execute("LOCK audit_log IN SHARE MODE")  # 0020 waits for it
        conn = await asyncpg.connect(db_dsn)
        pid = conn.get_server_pid()
        migrating = asyncio.ensure_future(apply_migrations(conn))
        for _ in range(100):
            waiting = await holder.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting
        await holder.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(asyncpg.PostgresConnectionError):  # "cannot reach the database", 3
            await migrating
        await reader.rollback()
        assert not await holder.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE version = 20"
        )
    finally:
        await holder.close()
    retry = await asyncpg.connect(db_dsn)
    try:
        assert await apply_migrations(retry) == ["0020_audit_log_append_only"]
    finally:
        await retry.close()


@pytest.mark.parametrize(
    ("table", "column"),
    [("postings", "amount = amount + 1"), ("audit_log", "staff_id = 'someone else'")],
)
async def test_postings_and_the_audit_log_are_append_only(
    table: str, column: str, server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Money moved and who moved it can be neither changed nor removed (the audit
    log since migration 0020: a desk action's row could be rewritten before)."""
    await issue(channel, keys)
    conn = await asyncpg.connect(server.dsn)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") > 0
        for statement in (
            f"UPDATE {table} SET {column}",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
    finally:
        await conn.close()


def test_cli_serve_simulate_and_stop(tmp_path: Path) -> None:
    """The README's first command, as a newcomer runs it: serve, simulate, Ctrl-C, serve again."""
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    for round_ in range(2):
        proc, banner = start_cli_server([], env)
        try:
            assert "onecard serving gRPC on 127.0.0.1:" in banner, banner
            assert_simulation_passes(env)
            if round_ == 0:
                # A second server on the same data directory is refused with advice, no traceback.
                second = subprocess.run(
                    [sys.executable, "-m", "onecard.server.cli", "serve"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert second.returncode == 2, second.stdout + second.stderr
                assert "already running" in second.stderr
                assert "Traceback" not in second.stderr
            out = stop_cli_server(proc)
            assert proc.returncode == 0, out
            assert "stopped cleanly" in out
            for entry in DEV_KEYS["issuers"]["3104"].values():
                assert entry["mtk"] not in banner + out
        finally:
            if proc.poll() is None:
                proc.kill()
        assert round_ in (0, 1)


def test_simulate_with_no_server_says_to_start_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run before the server is up, or after it stopped (server.addr stays): it ended in a
    traceback of gRPC's UNAVAILABLE instead of saying what to do."""
    from onecard.ledger.devdata import write_dev_key_file
    from onecard.server.cli import main

    write_dev_key_file(tmp_path / "dev-keys.json")
    (tmp_path / "server.addr").write_text("127.0.0.1:1")  # a server that has stopped
    code = main(["simulate", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "127.0.0.1:1" in err and "onecard serve" in err and "--target" in err, err
    assert "Traceback" not in err


async def test_key_version_added_while_serving(db_dsn: str, tmp_path: Path) -> None:
    """Rotation: a new key version becomes usable on reload; cards of the old ones keep working."""
    key_file = await seed_with_dev_keys(db_dsn, tmp_path)
    doc = json.loads(json.dumps(DEV_KEYS))  # a copy, given a new key version below
    running = await start_server(
        ServerConfig(
            listen="127.0.0.1:0",
            dsn=db_dsn,
            keys=key_file,
            data_dir=tmp_path / "d",
            pii_key_file=pii_key_file(tmp_path / "secrets"),
        )
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            store = FileKeyStore(key_file)
            old_card = await issue(chan, store, kv=1)
            bus = Terminal(chan, "310400000001", first_seq=1)
            topup = Terminal(chan, "310400000009", first_seq=1)
            await topup.load(old_card, 1000)

            doc["issuers"]["3104"]["4"] = {
                "suite": "sm4",
                "mtk": "00" * 15 + "04",
                "mlk": "00" * 15 + "40",
            }
            key_file.write_text(json.dumps(doc))
            running.reload_keys()
            store.reload()

            new_card = await issue(chan, store, kv=4)
            assert (await topup.load(new_card, 500)).status == common_pb2.TXN_STATUS_APPROVED
            assert (await bus.debit(new_card, 200)).status == common_pb2.TXN_STATUS_APPROVED
            assert (await bus.debit(old_card, 200)).status == common_pb2.TXN_STATUS_APPROVED
            assert new_card.balance == 300 and old_card.balance == 800
    finally:
        await running.stop()
    await assert_books_balance(db_dsn)


def _start_cli_server(env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    """`onecard serve` as a child process: (process, gRPC address, embedded database DSN)."""
    proc, banner = start_cli_server([], env)
    address = banner.split("serving gRPC on ")[1].split()[0]
    dsn = embedded_dsn(Path(env["ONECARD_DATA_DIR"]))
    assert dsn is not None and "psql -h " in banner
    return proc, address, dsn


async def test_kill_9_mid_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A crash of the server process: every approved reply is a posting after restart."""
    env = {
        **os.environ,
        "ONECARD_DATA_DIR": str(tmp_path / "data"),
        "ONECARD_LISTEN": "127.0.0.1:0",
    }
    proc, address, _ = await asyncio.to_thread(_start_cli_server, env)
    acknowledged: list[tuple[int, int, int]] = []
    try:
        async with grpc.aio.insecure_channel(address) as chan:
            keys = dev_keys()
            cards = [await issue(chan, keys, kv=kv) for kv in (1, 2, 3)]
            topup = Terminal(chan, "310400000009", first_seq=1)
            for card in cards:
                await topup.load(card, 100_000)
            buses = [Terminal(chan, f"31040000000{i}", first_seq=1) for i in (1, 2, 3)]

            async def ride(bus: Terminal, card: SimulatedCard) -> None:
                while True:
                    req = bus.debit_request(card, 1)
                    try:
                        reply = await bus.stub.Debit(req)
                    except grpc.aio.AioRpcError:
                        return
                    if reply.status == common_pb2.TXN_STATUS_APPROVED:
                        acknowledged.append((int(req.terminal_id), req.terminal_seq, 1))

            riders = [
                asyncio.create_task(ride(bus, card)) for bus, card in zip(buses, cards, strict=True)
            ]
            while len(acknowledged) < 300:
                await asyncio.sleep(0.01)
            proc.kill()  # SIGKILL: no drain, no clean PostgreSQL stop
            await asyncio.gather(*riders)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    # The orphaned PostgreSQL is stopped and restarted by the next serve.
    proc, _, dsn = await asyncio.to_thread(_start_cli_server, env)
    try:
        rows = await fetch(
            dsn,
            "SELECT t.terminal_id, t.terminal_seq, p.amount FROM terminal_txns t"
            " JOIN postings p ON p.terminal_id = t.terminal_id AND p.terminal_seq = t.terminal_seq"
            " WHERE t.kind = 1 AND t.status = 1",
        )
        posted = {(r[0], r[1], r[2]) for r in rows}
        assert len(rows) == len(posted), "a debit was posted twice"
        assert set(acknowledged) <= posted
        await assert_books_balance(dsn)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, out


async def test_full_queue_answers_resource_exhausted_and_writes_nothing(
    db_dsn: str, tmp_path: Path
) -> None:
    from onecard.ledger.engine import BatchSettings

    running = await start_test_server(
        db_dsn, tmp_path, dev_keys(), batching=BatchSettings(max_batch=2, max_queue=2, linger=0.05)
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            card = await issue(chan, dev_keys())
            await Terminal(chan, "310400000009").load(card, 10_000)
            bus = Terminal(chan, "310400000001")
            reqs = [bus.debit_request(card, 10) for _ in range(30)]
            replies = await asyncio.gather(
                *(bus.stub.Debit(r) for r in reqs), return_exceptions=True
            )
        refused = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
        approved = [r for r in replies if not isinstance(r, BaseException)]
        assert refused, "a queue of 2 must refuse some of 30 simultaneous debits"
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "queue is full" in (refused[0].details() or "")
        assert all(r.status == common_pb2.TXN_STATUS_APPROVED for r in approved)
        rows = await fetch(db_dsn, "SELECT count(*) AS n FROM postings WHERE kind = 1")
        assert rows[0]["n"] == len(approved)
    finally:
        await running.stop()
    await assert_books_balance(db_dsn)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(stub: health_pb2_grpc.HealthStub) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    return int(reply.status)


async def _until_health(stub: health_pb2_grpc.HealthStub, status: int) -> None:
    for _ in range(100):
        if await _health(stub) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    )


@contextlib.asynccontextmanager
async def _own_postgres(
    tmp_path: Path, database: str
) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of the test's own (to stop or freeze) and a migrated ``database`` on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = EmbeddedPostgres(tmp_path / "pg", port=port)
    await asyncio.to_thread(pg.start)
    try:
        admin = await asyncpg.connect(pg.dsn())
        await admin.execute(f"CREATE DATABASE {database}")
        await admin.close()
        dsn = pg.dsn(database)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield pg, dsn
    finally:
        await asyncio.to_thread(pg.stop)


async def test_database_outage_is_unavailable_and_recovers(tmp_path: Path) -> None:
    async with _own_postgres(tmp_path, "outage") as (pg, dsn):
        running = await start_test_server(dsn, tmp_path, dev_keys())
        try:
            async with grpc.aio.insecure_channel(running.address) as chan:
                card = await issue(chan, dev_keys())
                await Terminal(chan, "310400000009").load(card, 1_000)
                bus = Terminal(chan, "310400000001")
                health = health_pb2_grpc.HealthStub(chan)
                assert await _health(health) == SERVING
                await asyncio.to_thread(pg.stop)
                req = bus.debit_request(card, 100)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await bus.stub.Debit(req)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                # Health follows the database (it said SERVING throughout before),
                # so a balancer stops sending calls that can only fail.
                await _until_health(health, NOT_SERVING)
                await asyncio.to_thread(pg.start)
                await _until_health(health, SERVING)
                # the same request, retried: the server reconnects by itself
                for _ in range(50):
                    try:
                        reply = await bus.stub.Debit(req)
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.1)
                assert reply.status == common_pb2.TXN_STATUS_APPROVED
                assert reply.balance_after == 900
        finally:
            await running.stop()
        await assert_books_balance(dsn)


async def test_health_is_not_serving_while_the_database_takes_no_writes(
    db_dsn: str, tmp_path: Path
) -> None:
    """A standby, or a primary left read-only, answered the health look's ``SELECT 1``:
    health said SERVING while every debit was refused UNAVAILABLE (found by review).

    Read-only here is ``default_transaction_read_only`` on the test's database
    with its sessions ended, which a write meets with a standby's error (25006).
    """
    from urllib.parse import urlsplit

    name = urlsplit(db_dsn).path.lstrip("/")
    running = await start_test_server(db_dsn, tmp_path, dev_keys())
    admin = await asyncpg.connect(db_dsn)

    async def read_only(change: str) -> None:
        """Change the database's setting, and end its sessions: the new ones have it."""
        await admin.execute(f'ALTER DATABASE "{name}" {change}')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )

    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            card = await issue(chan, dev_keys())
            await Terminal(chan, "310400000009").load(card, 1_000)
            health = health_pb2_grpc.HealthStub(chan)
            assert await _health(health) == SERVING
            await read_only("SET default_transaction_read_only = on")
            await _until_health(health, NOT_SERVING)
            bus = Terminal(chan, "310400000001")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bus.stub.Debit(bus.debit_request(card, 100), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await read_only("RESET default_transaction_read_only")
            await _until_health(health, SERVING)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()
        await running.stop()
    await assert_books_balance(db_dsn)


def _postgres_pids(pg: EmbeddedPostgres) -> list[int]:
    """The postmaster of ``pg`` and its children (backends, checkpointer, ...)."""
    postmaster = int((pg.data_dir / "postmaster.pid").read_text().splitlines()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == postmaster:
            pids.append(int(entry))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def test_a_stop_ends_while_the_database_does_not_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop gives the ledger a bounded time to commit what it holds, then gives up on
    a database that does not answer (a partition, a paused VM, a storage stall: frozen
    here with SIGSTOP, its connections open and silent), tells every caller still
    waiting to retry and none that its request committed, and ends.

    The pool set no command timeout and the stop waited on the ledger's flushes and
    the pool's close without bound: a stop never ended, a supervisor's stop ended in
    SIGKILL, and an operator restarting the server to get it off a database that went
    away could not (found by review).
    """
    frozen: list[int] = []
    stopping: asyncio.Future[None] | None = None
    async with _own_postgres(tmp_path, "frozen") as (pg, dsn):
        try:
            running = await start_test_server(dsn, tmp_path, dev_keys())
            async with grpc.aio.insecure_channel(running.address) as chan:
                card = await issue(chan, dev_keys())
                await Terminal(chan, "310400000009").load(card, 1_000)
                bus = Terminal(chan, "310400000001")
                frozen = _postgres_pids(pg)
                _signal_all(frozen, signal.SIGSTOP)
                # A debit in flight: its flush waits on the silent database.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await bus.stub.Debit(bus.debit_request(card, 100), timeout=2)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                stopping = asyncio.ensure_future(running.stop())
                # The grace (10 s), then the drain (10 s): a bound only a hang exceeds.
                await asyncio.wait([stopping], timeout=60)
                assert stopping.done(), "the stop still waits for a database that does not answer"
                stopping.result()
            abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
            assert len(abandoned) == 1, caplog.text
            assert "group-commit: 0 requests queued, 1 in a transaction" in abandoned[0]
            _signal_all(frozen, signal.SIGCONT)
            frozen = []
            # The debit was never answered: posted once or not at all, the books whole.
            rows = await fetch(
                dsn,
                "SELECT count(*) AS n FROM postings WHERE card_no = $1 AND kind = 1",
                int(card.card_no),
            )
            assert rows[0]["n"] in (0, 1)
            await assert_books_balance(dsn)
        finally:
            _signal_all(frozen, signal.SIGCONT)
            if stopping is not None and not stopping.done():
                # Thawed, the flush ends and the stop completes.
                await asyncio.wait([stopping], timeout=60)


async def test_a_stop_that_gave_up_on_the_database_stops_the_embedded_one_at_once() -> None:
    """Once the ledger gave up on a database that did not answer, the embedded one is
    stopped without its shutdown checkpoint (immediate: the next start recovers every
    COMMIT from the WAL), which a stalled disk would hold for pg_ctl's whole wait."""

    class GaveUp:
        async def close(self, timeout: float | None = None) -> bool:
            assert timeout == ServerConfig().shutdown_drain_s
            return False

    class Closed:
        async def close(self) -> None:
            pass

        async def enter_graceful_shutdown(self) -> None:
            pass

    modes: list[str] = []

    class Embedded:
        def stop(self, mode: str = "fast") -> None:
            modes.append(mode)

    closed: Any = Closed()
    running = RunningServer(
        ServerConfig(),
        [],
        0,
        cast(Any, GaveUp()),
        closed,
        dev_keys(),
        closed,
        cast(Any, Embedded()),
        "",
    )
    await running.stop()
    assert modes == ["immediate"]


_COUNT_FLAGS = [
    "--upload-flushers",
    "--upload-flush-records",
    "--pool-size",
    "--max-batch",
    "--max-pending-calls",
    "--acceptors",
]


@pytest.mark.parametrize("flag", [*_COUNT_FLAGS, "--workers"])
def test_a_count_below_one_is_refused_naming_the_option(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onecard.server.cli import main

    assert main(["serve", "--data-dir", str(tmp_path), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "must be at least 1, got 0" in err
    assert not (tmp_path / "pg").exists()  # refused before anything started


def test_more_acceptors_than_the_limit_are_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onecard.server.cli import main

    assert main(["serve", "--data-dir", str(tmp_path), "--acceptors", "17"]) == 2
    assert "--acceptors: must be at most 16, got 17" in capsys.readouterr().err
    assert not (tmp_path / "pg").exists()


def test_a_negative_linger_is_refused_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onecard.server.cli import main

    assert main(["serve", "--data-dir", str(tmp_path), "--linger-ms", "-1"]) == 2
    assert "--linger-ms: must be at least 0, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_an_external_database_needs_the_shared_personal_data_key(
    empty_db_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    """A key made on the spot per host would digest one ID number two ways on one database."""
    from onecard.server.cli import main

    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps(DEV_KEYS))
    key_file.chmod(0o600)
    argv = ["serve", "--workers", workers, "--dsn", empty_db_dsn, "--keys", str(key_file)]
    argv += ["--data-dir", str(tmp_path)]
    assert await asyncio.to_thread(main, argv) == 2
    assert "with --dsn give --pii-key-file FILE" in capsys.readouterr().err
    assert not (tmp_path / "pii-key").exists()
    tables = await fetch(
        empty_db_dsn, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'"
    )
    assert tables[0]["n"] == 0  # refused before anything touched the database

    # dev-init writes one (owner-only) for the development setup.
    assert (
        await asyncio.to_thread(
            main, ["dev-init", "--dsn", empty_db_dsn, "--data-dir", str(tmp_path)]
        )
        == 0
    )
    assert "personal-data key file" in capsys.readouterr().out
    assert len(read_key_file(tmp_path / "pii-key")) == 32


def test_a_stop_while_starting_stops_cleanly_once_up(tmp_path: Path) -> None:
    """A supervisor's SIGTERM right after its start (or a worker's parent stopping).

    Signal handlers were installed only after the banner: a SIGTERM during
    start-up killed the process, its embedded PostgreSQL left running, and a
    worker stopped that way made its parent report "a worker failed".
    """
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onecard.server.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first thing start-up logs, well before serving
    assert first and "serving gRPC" not in first, first
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, first + out
    assert "stopped cleanly" in out
    assert not (data / "pg" / "postmaster.pid").exists()  # its PostgreSQL stopped too


def test_upload_transactions_are_bounded_apart_from_the_gateway_batch_limit() -> None:
    """Shorter upload transactions without refusing the gateways' larger batches."""
    from onecard.server.cli import build_parser
    from onecard.server.config import config_from_args

    argv = ["serve", "--upload-flush-records", "1000", "--max-upload-batch", "5000"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.batching.upload_max_batch == 1000  # a transaction's bound
    assert cfg.limits.max_upload_batch == 5000  # what a gateway may send in one batch
    defaults = config_from_args(build_parser().parse_args(["serve"]))
    assert defaults.batching.upload_max_batch == defaults.limits.max_upload_batch == 5000


async def test_a_card_locked_by_another_session_stalls_no_other_card(
    db_dsn: str, tmp_path: Path
) -> None:
    """A row lock nobody releases: its batch is told to retry, the next batch goes on.

    With no bound on lock waits, one session holding a card's row (a psql
    left in a transaction) stalled the only online flusher and every debit
    of every card behind it until each caller's deadline.
    """
    running = await start_test_server(db_dsn, tmp_path, dev_keys(), lock_timeout_ms=300)
    holder = await asyncpg.connect(db_dsn)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            held, free = await issue(chan, dev_keys()), await issue(chan, dev_keys())
            topup = Terminal(chan, "310400000009", 7_000)
            for card in (held, free):
                assert (await topup.load(card, 1_000)).status == common_pb2.TXN_STATUS_APPROVED
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(held.card_no)
            )
            bus = Terminal(chan, "310400000001", 50)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bus.stub.Debit(bus.debit_request(held, 100), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            reply = await bus.stub.Debit(bus.debit_request(free, 100), timeout=10)
            assert reply.status == common_pb2.TXN_STATUS_APPROVED
            await tx.rollback()
            held.balance += 100  # the chip's debit of the refused call did not happen
            retry = await bus.stub.Debit(bus.debit_request(held, 100), timeout=10)
            assert retry.status == common_pb2.TXN_STATUS_APPROVED
    finally:
        await holder.close()
        await running.stop()
    await assert_books_balance(db_dsn)


def test_the_banner_shows_each_host_of_a_multi_host_dsn_and_never_its_password() -> None:
    """The banner's ``describe_dsn`` asked urllib for the port, which raises
    ValueError on asyncpg's host list (``db1:5432,db2:5433``): a server that
    had started on a primary and its standby crashed there (found by review)."""
    assert describe_dsn("postgresql://ledger:s3cret@db1:5432,db2:5433/onecard") == (
        "db1:5432,db2:5433/onecard"
    )
    assert describe_dsn("postgresql://ledger:s3cret@db1,[::1]:6000/onecard") == (
        "db1:5432,[::1]:6000/onecard"
    )
    assert describe_dsn("postgresql://ledger@/onecard?host=/run/pg,/tmp&port=5433,5434") == (
        "/run/pg:5433,/tmp:5434/onecard"
    )
    # An unescaped @ in a password: nothing before the last one is shown.
    shown = describe_dsn("postgresql://ledger:s3@cret@db1/onecard?password=s3cret2")
    assert shown == "db1:5432/onecard"


async def _forward_to(unix_path: str) -> tuple[asyncio.Server, int]:
    """A local TCP port whose connections go to PostgreSQL's socket: a "host" of a host list."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(unix_path)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_server_on_a_primary_and_standby_dsn_serves_and_stops_cleanly(
    db_dsn: str, tmp_path: Path, workers: str
) -> None:
    """``postgresql://u@db1:5432,db2:5432/onecard``, asyncpg's failover form:
    the server connected, migrated and served, then its banner raised
    ValueError and it exited 1 with a traceback, gRPC and the pool never
    stopped; with --workers the parent failed before any worker started
    (found by review)."""
    parts = urlsplit(db_dsn)
    query = parse_qs(parts.query)
    unix_path = f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}"
    first, port1 = await _forward_to(unix_path)
    second, port2 = await _forward_to(unix_path)
    try:
        hosts = f"127.0.0.1:{port1},127.0.0.1:{port2}"
        dsn = f"postgresql://postgres:not-shown-7c1e@{hosts}{parts.path}"
        env = await cli_server_env(db_dsn, tmp_path, ONECARD_DSN=dsn)
        proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", workers], env)
        try:
            assert f"database: PostgreSQL at {hosts}{parts.path}" in banner, banner
        finally:
            out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
        assert proc.returncode == 0, banner + out
        assert "stopped cleanly" in out, banner + out
        assert "not-shown-7c1e" not in banner + out
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("name", ["0021_Fix.sql", "21_fix.sql", "0021-fix.sql", "0021_fix.SQL"])
def test_a_migration_file_misnamed_is_refused_not_skipped(name: str, tmp_path: Path) -> None:
    """Skipped, a schema change would ship and never be applied, and nothing would say so."""
    from onecard.ledger.storage.migrate import BadMigrationFile

    (tmp_path / "0001_core.sql").write_text("SELECT 1;")
    (tmp_path / "README.txt").write_text("not a migration")
    assert [m.name for m in available_migrations(tmp_path)] == ["core"]
    (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(BadMigrationFile, match=re.escape(name)):
        available_migrations(tmp_path)
