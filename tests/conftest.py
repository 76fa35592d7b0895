"""Test harness: one real PostgreSQL per session, one fresh database per test.

The server is ``ONECARD_TEST_DSN`` when set (a URI whose user may create
databases), else an :class:`~onecard.server.embedded_pg.EmbeddedPostgres`
in the session's tmp dir on a kernel-chosen port. Migrations run once into a
template database; each test gets ``CREATE DATABASE ... TEMPLATE`` of it,
which is much cheaper than migrating per test and keeps tests independent.
Every name carries a random suffix so concurrent sessions can share a server.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import pytest_asyncio

from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.server.embedded_pg import EmbeddedPostgres
from tests.support import dev_keys, start_test_server

_log = logging.getLogger("onecard.tests.pg")


def dsn_for(admin_dsn: str, database: str) -> str:
    """``admin_dsn`` with its database replaced (URIs only, as asyncpg requires)."""
    parts = urlsplit(admin_dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URI, got {admin_dsn!r}")
    return urlunsplit(parts._replace(path="/" + database))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _admin(sql: str, admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser-ish DSN to the session's server, stopped at session end if ours."""
    env = os.environ.get("ONECARD_TEST_DSN")
    if env:
        yield env
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pgdata"), log=_log)
    server.start()
    try:
        yield server.dsn()
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_db(pg_admin_dsn: str) -> AsyncIterator[str]:
    """Name of a migrated database that per-test databases are cloned from."""
    from onecard.ledger.storage.migrate import apply_migrations

    name = f"onecard_template_{uuid.uuid4().hex[:12]}"
    await _admin(f"CREATE DATABASE {_ident(name)}", pg_admin_dsn)
    try:
        conn = await asyncpg.connect(dsn_for(pg_admin_dsn, name))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        # Cloning fails if anyone is connected to the template; forbid it.
        await _admin(f"ALTER DATABASE {_ident(name)} WITH ALLOW_CONNECTIONS false", pg_admin_dsn)
        yield name
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)", pg_admin_dsn)


async def _fresh_db(pg_admin_dsn: str, template: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex}"
    await _admin(f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(template)}", pg_admin_dsn)
    try:
        yield dsn_for(pg_admin_dsn, name)
    finally:
        # FORCE: a test that leaked a pool must not leak the database too.
        await _admin(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)", pg_admin_dsn)


@pytest_asyncio.fixture(loop_scope="session")
async def db_dsn(pg_admin_dsn: str, template_db: str) -> AsyncIterator[str]:
    """DSN of a new, migrated database for this test only."""
    async for dsn in _fresh_db(pg_admin_dsn, template_db):
        yield dsn


@pytest_asyncio.fixture(loop_scope="session")
async def empty_db_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a new database with no migrations (cloned from pristine ``template0``)."""
    async for dsn in _fresh_db(pg_admin_dsn, "template0"):
        yield dsn


@pytest.fixture
def keys() -> MemoryKeyStore:
    """The PROTOCOL.md test keys, as the demo issuer 3104 holds them."""
    return dev_keys()


@pytest_asyncio.fixture(loop_scope="session")
async def server(db_dsn: str, keys: MemoryKeyStore, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A real gRPC server on a kernel-chosen loopback port, over this test's database."""
    running = await start_test_server(db_dsn, tmp_path, keys)
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as chan:
        yield chan
