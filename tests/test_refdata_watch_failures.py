"""The reference data watch through what a network and a database do to a connection.

Found by review of its first version: a listening connection cut without a
reset (a partition, a NAT that dropped an idle flow) was never noticed, so no
change was heard again; a stop waited for ever on such a connection's
goodbye; and an error nobody foresaw ended the watch in silence and then
made the ledger's own close raise before it drained its queues.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import pytest_asyncio

from onecard.ledger.crypto.verifier import ReferenceVerifier
from onecard.ledger.engine import Ledger
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage.migrate import apply_migrations
from onecard.ledger.storage.pool import create_ledger_pool
from onecard.server.embedded_pg import EmbeddedPostgres
from tests.support import dev_keys, fetch, seed_demo, start_test_server, wait_until


class Proxy:
    """TCP -> the test server's Unix socket; ``pause()`` stalls the connections open now.

    A paused connection stays open and forwards nothing, as one does across a
    network partition, a frozen VM or a NAT that dropped its mapping.
    """

    def __init__(self, db_dsn: str) -> None:
        parts = urlsplit(db_dsn)
        q = parse_qs(parts.query)
        self.socket = f"{q['host'][0]}/.s.PGSQL.{q['port'][0]}"
        self.database = parts.path.lstrip("/")
        self._gates: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database=self.database
        )

    def pause(self) -> None:
        for gate in self._gates:
            gate.clear()

    def resume(self) -> None:
        for gate in self._gates:
            gate.set()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_unix_connection(self.socket)
        gate = asyncio.Event()
        gate.set()
        self._gates.append(gate)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    await gate.wait()
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(db_dsn: str) -> AsyncIterator[Proxy]:
    p = Proxy(db_dsn)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def _restore_txn_max(db_dsn: str) -> AsyncIterator[None]:
    """The tests change the demo product's limit: the next module must find it as seeded."""
    yield
    await _set_txn_max(db_dsn, 50_000)


async def _set_txn_max(dsn: str, fen: int) -> None:
    await fetch(dsn, "UPDATE products SET txn_max = $1 WHERE product_code = 'standard'", fen)


async def _ledger(db_dsn: str, proxy: Proxy) -> Ledger:
    """A ledger whose pool goes straight to the database and whose watch goes through ``proxy``."""
    await seed_demo(db_dsn)
    pool = await create_ledger_pool(db_dsn, 2)
    keys = dev_keys()
    ledger = await Ledger.open(pool, keys, ReferenceVerifier(keys), listen=proxy.connect)
    assert ledger.refdata_watch is not None
    await wait_until(lambda: ledger.refdata_watch.refreshes >= 1)  # type: ignore[union-attr]
    return ledger


async def _close(ledger: Ledger, proxy: Proxy) -> None:
    proxy.resume()
    await asyncio.wait_for(ledger.close(), 10)
    await ledger.pool.close()


async def test_a_silently_lost_listening_connection_is_noticed(db_dsn: str, proxy: Proxy) -> None:
    """Once the connection carries nothing more, the probe finds it dead, and
    the watch connects again (straight to the database: the proxy's new
    connections carry) and re-reads."""
    ledger = await _ledger(db_dsn, proxy)
    watch = ledger.refdata_watch
    assert watch is not None
    watch.probe_s, watch.retry_s = 0.5, 0.1  # the defaults wait 30 s and 1 s
    try:
        await _set_txn_max(db_dsn, 78)  # heard through the proxy while it carries
        await wait_until(lambda: ledger.ref.products["standard"].txn_max == 78, timeout=5)
        proxy.pause()
        await _set_txn_max(db_dsn, 77)
        await wait_until(lambda: ledger.ref.products["standard"].txn_max == 77, timeout=20)
    finally:
        await _close(ledger, proxy)


async def test_stop_does_not_hang_on_an_unresponsive_listening_connection(
    db_dsn: str, proxy: Proxy
) -> None:
    """A graceful close sends Terminate and waits for the server to hang up."""
    ledger = await _ledger(db_dsn, proxy)
    proxy.pause()
    try:
        await asyncio.wait_for(asyncio.shield(ledger.refdata_watch.close()), 5)  # type: ignore[union-attr]
    finally:
        await _close(ledger, proxy)


async def test_an_unexpected_error_neither_kills_the_watch_nor_breaks_close(
    db_dsn: str, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asyncpg ProtocolError, or a bug in a re-read: logged, and the next
    change is heard; the ledger's close does not raise."""
    ledger = await _ledger(db_dsn, proxy)
    reread = ReferenceData._reread
    failures = [asyncpg.exceptions.ProtocolError("unexpected message")]

    async def once_failing(self: ReferenceData, conn: object) -> None:
        if failures:
            raise failures.pop()
        await reread(self, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(ReferenceData, "_reread", once_failing)
    closed = False
    try:
        await _set_txn_max(db_dsn, 66)
        await wait_until(lambda: not failures)
        await asyncio.sleep(0.5)
        await _set_txn_max(db_dsn, 55)
        await wait_until(lambda: ledger.ref.products["standard"].txn_max == 55, timeout=5)
        await ledger.close()  # must not raise
        closed = True
    finally:
        if not closed:
            with pytest.raises(Exception):  # noqa: B017 - what the watch died of
                await ledger.close()
            # The committers were never closed: finish the job.
            await ledger.lifecycle.close()
            await ledger.committer.close()
            await ledger._uploads.close()
        await ledger.pool.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_outage_is_ridden_out_quietly_and_the_watch_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database stopped and started again under a running server."""
    pg = EmbeddedPostgres(tmp_path / "pg", port=_free_port())
    await asyncio.to_thread(pg.start)
    try:
        dsn = pg.dsn()
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        server = await start_test_server(dsn, tmp_path, dev_keys())
        watch = server.ledger.refdata_watch
        assert watch is not None
        before = watch.listening_pid
        try:
            with caplog.at_level(logging.WARNING, logger="onecard.ledger.refdata_watch"):
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(6)
                down = [r for r in caplog.records if r.name == "onecard.ledger.refdata_watch"]
                await asyncio.to_thread(pg.start)
                started = asyncio.get_running_loop().time()
                await _set_txn_max(dsn, 44)
                await wait_until(
                    lambda: server.ledger.ref.products["standard"].txn_max == 44, timeout=30
                )
                took = asyncio.get_running_loop().time() - started
            print(f"warnings while down 6 s: {len(down)}; change seen {took:.1f} s after start")
            assert watch.listening_pid not in (None, before)
            assert len(down) <= 6, [r.getMessage() for r in down]
        finally:
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                await server.stop()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await asyncio.to_thread(pg.stop)
