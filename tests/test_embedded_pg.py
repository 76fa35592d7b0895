"""Tests of the embedded PostgreSQL manager; each starts its own server in tmp_path."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from onecard.server.embedded_pg import (
    PG_SYSTEM_USER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_binaries,
)


async def _refuses_connections(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except OSError:
        return True
    await conn.close()
    return False


def test_find_binaries_has_the_server_tools() -> None:
    bindir = find_binaries()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bindir / name, os.X_OK), name


@pytest.mark.parametrize(
    "settings",
    [
        {"fsync": "off"},
        {"synchronous_commit": "OFF"},
        {"full_page_writes": "false"},
        {"port": "5432"},
        {"listen_addresses": "*"},
        {"bad name": "1"},
        {"work_mem": "1MB\nfsync = off"},
    ],
)
def test_unsafe_or_managed_settings_are_refused(tmp_path: Path, settings: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        EmbeddedPostgres(tmp_path / "data", settings=settings)


def test_port_is_unknown_before_start(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="start"):
        _ = EmbeddedPostgres(tmp_path / "data").port


async def test_rows_survive_stop_and_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data", settings={"work_mem": "8MB"})
    pg.start()
    try:
        assert pg.port != 5432
        assert pg.dsn().startswith("postgresql://postgres@/postgres?host=/")
        conn = await asyncpg.connect(pg.dsn())
        try:
            shown = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "fsync",
                    "synchronous_commit",
                    "full_page_writes",
                    "shared_buffers",
                    "max_connections",
                    "listen_addresses",
                    "work_mem",
                )
            }
            await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text NOT NULL)")
            await conn.execute("INSERT INTO kept VALUES (1, 'acknowledged')")
        finally:
            await conn.close()
        assert shown == {
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": "256MB",
            "max_connections": "200",
            "listen_addresses": "",
            "work_mem": "8MB",
        }
        old_dsn = pg.dsn()
    finally:
        pg.stop()
    pg.stop()  # idempotent
    assert not pg.running
    assert await _refuses_connections(old_dsn)

    again = EmbeddedPostgres(tmp_path / "data")
    again.start()
    try:
        conn = await asyncpg.connect(again.dsn())
        try:
            assert await conn.fetchval("SELECT note FROM kept WHERE id = 1") == "acknowledged"
        finally:
            await conn.close()
    finally:
        again.stop()
    again.stop()


async def test_second_manager_on_a_running_data_dir_is_refused(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "data") as first:
        second = EmbeddedPostgres(tmp_path / "data")
        with pytest.raises(EmbeddedPostgresError, match="already running") as info:
            second.start()
        assert str(first.port) in str(info.value)
        assert "pg_ctl" in str(info.value)
        second.stop()  # never started: a no-op that must not touch the first server
        conn = await asyncpg.connect(first.dsn())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    assert await _refuses_connections(first.dsn())


def test_start_failure_includes_the_server_log(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data", settings={"shared_buffers": "plenty"})
    with pytest.raises(EmbeddedPostgresError, match="shared_buffers") as info:
        pg.start()
    assert "last lines of" in str(info.value)
    assert not pg.running
    assert not (tmp_path / "data" / "postmaster.pid").exists()


def _startup(user: str, database: str) -> bytes:
    """PostgreSQL's StartupMessage (protocol 3.0), what any client sends first."""
    body = struct.pack("!i", 196608) + b"".join(
        part.encode() + b"\0" for part in ("user", user, "database", database)
    )
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _knock(connect: Callable[[], socket.socket]) -> str:
    """What a client gets: 'trusted' (in as superuser, no password), 'refused' or 'denied'."""
    try:
        sock = connect()
    except ConnectionRefusedError:
        return "refused"
    except (PermissionError, FileNotFoundError):
        return "denied"
    with sock:
        sock.settimeout(5)
        sock.sendall(_startup("postgres", "postgres"))
        head = sock.recv(9)
    # AuthenticationOk: 'R', length 8, code 0.
    return "trusted" if head == b"R\0\0\0\x08\0\0\0\0" else f"other {head!r}"


def _tcp(port: int) -> socket.socket:
    """A loopback TCP connection, without a name lookup (the child may not read the codecs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _knock_as(user: pwd.struct_passwd, connect: Callable[[], socket.socket]) -> str:
    """:func:`_knock` from a child process running as ``user``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.write(write_end, _knock(connect).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_the_server_listens_on_no_tcp_port(tmp_path: Path) -> None:
    """Authentication is trust: a TCP listener let any local user in as superuser."""
    with EmbeddedPostgres(tmp_path / "data") as pg:
        assert _knock(lambda: _tcp(pg.port)) == "refused"
        path = str(pg.socket_dir / f".s.PGSQL.{pg.port}")
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(path)
        assert _knock(lambda: unix) == "trusted"  # the owner (or root) still gets in


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can knock as another user")
@pytest.mark.parametrize("long_path", [False, True], ids=["socket in data dir", "socket in /tmp"])
def test_another_local_user_cannot_reach_the_books(tmp_path: Path, long_path: bool) -> None:
    nobody = pwd.getpwnam("nobody")
    data = tmp_path / ("d" * 60) / ("e" * 60) / "data" if long_path else tmp_path / "data"
    with EmbeddedPostgres(data) as pg:
        path = str(pg.socket_dir / f".s.PGSQL.{pg.port}")

        def by_socket() -> socket.socket:
            unix = socket.socket(socket.AF_UNIX)
            unix.connect(path)
            return unix

        assert _knock_as(nobody, by_socket) == "denied"
        assert _knock_as(nobody, lambda: _tcp(pg.port)) == "refused"


async def test_long_data_dir_path_moves_the_socket_to_tmp(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    with EmbeddedPostgres(data) as pg:
        conn = await asyncpg.connect(pg.dsn())
        try:
            socket_dir = Path(await conn.fetchval("SHOW unix_socket_directories"))
        finally:
            await conn.close()
        assert socket_dir != data
        assert len(str(socket_dir / f".s.PGSQL.{pg.port}")) <= 107
        assert (socket_dir / f".s.PGSQL.{pg.port}").is_socket()
    assert not socket_dir.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to the service user")
def test_as_root_the_server_runs_as_the_service_user(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "data") as pg:
        pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        service = pwd.getpwnam(PG_SYSTEM_USER)
        assert os.stat(f"/proc/{pid}").st_uid == service.pw_uid
        assert pg.data_dir.stat().st_uid == service.pw_uid


async def test_harness_databases_are_fresh_per_test(db_dsn: str, empty_db_dsn: str) -> None:
    assert db_dsn != empty_db_dsn
    migrated = await asyncpg.connect(db_dsn)
    empty = await asyncpg.connect(empty_db_dsn)
    try:
        assert await migrated.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        assert await empty.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await migrated.close()
        await empty.close()


async def test_the_server_processes_get_no_secret_of_our_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Master keys given inline (ONECARD_KEYS_JSON) reached the postmaster and every
    backend, where a superuser session read them from the environment."""
    monkeypatch.setenv("ONECARD_KEYS_JSON", '{"issuers": "00112233445566778899AABBCCDDEEFF"}')
    monkeypatch.setenv("PGPORT", "1")  # and a developer's PG* still redirects nothing
    with EmbeddedPostgres(tmp_path / "data") as pg:
        conn = await asyncpg.connect(pg.dsn())
        try:
            await conn.execute("CREATE TEMP TABLE env (line text)")
            await conn.execute("COPY env FROM PROGRAM 'env'")
            names = {r["line"].split("=", 1)[0] for r in await conn.fetch("SELECT line FROM env")}
        finally:
            await conn.close()
    assert "PATH" in names
    assert not {n for n in names if n.startswith("ONECARD_")}, names
    assert "PGPORT" not in names  # (the server sets PGDATA and others itself)
