"""Reference data changed in the database reaches every running server process.

Each process keeps issuers, products, operators, terminals and system
account ids in memory, and re-read them only for an id it did not know. A
terminal moved to another operator kept crediting the old operator's payable
in every running process until it restarted, and a product's new limits were
not applied. Now each change notifies the processes at its COMMIT, and each
re-reads its copy; a process whose listening connection was lost reconnects
and re-reads.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest_asyncio

from onecard.clients.terminal import Terminal
from onecard.ledger.refdata_watch import RefdataWatch
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2
from tests.support import assert_books_balance, dev_keys, fetch, start_test_server, wait_until
from tests.test_upload_api import funded

APPROVED = common_pb2.TXN_STATUS_APPROVED
_numbers = itertools.count(1)


@pytest_asyncio.fixture(loop_scope="session")
async def servers(db_dsn: str, tmp_path: Path) -> AsyncIterator[list[RunningServer]]:
    """Two server processes' worth of ledgers over one database, as --workers 2 runs."""
    running = [
        await start_test_server(db_dsn, tmp_path / "first", dev_keys()),
        await start_test_server(db_dsn, tmp_path / "second", dev_keys()),
    ]
    try:
        yield running
    finally:
        for server in running:
            await server.stop()


async def _execute(dsn: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for sql, args in statements:
                await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _operator_with_terminal(dsn: str) -> tuple[str, str]:
    """A new operator with its payable, and a terminal of it: (operator, terminal id)."""
    n = next(_numbers)
    operator, terminal = f"MOVE{n}", f"3198000000{n:02d}"
    await _execute(
        dsn,
        ("INSERT INTO operators VALUES ($1, 'moves terminals')", (operator,)),
        ("INSERT INTO accounts (code, kind) VALUES ($1, 'payable')", (f"payable:{operator}",)),
        (
            "INSERT INTO terminals (terminal_id, operator_id, kind) VALUES ($1, $2, 'bus')",
            (int(terminal), operator),
        ),
    )
    return operator, terminal


async def _credited_payable(dsn: str, terminal: str, seq: int) -> str:
    rows = await fetch(
        dsn,
        "SELECT a.code FROM postings p JOIN accounts a ON a.account_id = p.credit_account "
        "WHERE p.terminal_id = $1 AND p.terminal_seq = $2",
        int(terminal),
        seq,
    )
    assert len(rows) == 1, rows
    return str(rows[0]["code"])


async def test_a_terminal_moved_to_another_operator_credits_it_in_every_process(
    servers: list[RunningServer], db_dsn: str
) -> None:
    keys = dev_keys()
    old, terminal = await _operator_with_terminal(db_dsn)
    new, _ = await _operator_with_terminal(db_dsn)
    seqs = itertools.count(1)
    async with grpc.aio.insecure_channel(servers[0].address) as chan:
        card = await funded(chan, keys, amount=10_000)
    # Each process learns the terminal under its first operator.
    for server in servers:
        async with grpc.aio.insecure_channel(server.address) as chan:
            seq = next(seqs)
            reply = await Terminal(chan, terminal, seq).debit(card, 100)
            assert reply.status == APPROVED
            assert await _credited_payable(db_dsn, terminal, seq) == f"payable:{old}"

    await _execute(
        db_dsn,
        ("UPDATE terminals SET operator_id = $2 WHERE terminal_id = $1", (int(terminal), new)),
    )
    for server in servers:
        await wait_until(lambda s=server: s.ledger.ref.terminal_operator[int(terminal)] == new)  # type: ignore[misc]
        async with grpc.aio.insecure_channel(server.address) as chan:
            seq = next(seqs)
            reply = await Terminal(chan, terminal, seq).debit(card, 100)
            assert reply.status == APPROVED
            assert await _credited_payable(db_dsn, terminal, seq) == f"payable:{new}"
    await assert_books_balance(db_dsn)


async def test_a_products_new_limit_applies_without_a_restart(
    servers: list[RunningServer], db_dsn: str
) -> None:
    keys = dev_keys()
    server = servers[0]
    limit = server.ledger.ref.products["standard"].txn_max
    async with grpc.aio.insecure_channel(server.address) as chan:
        card = await funded(chan, keys)
        bus = Terminal(chan, "310400000001", 98_000)
        assert (await bus.debit(card, 100)).status == APPROVED
        try:
            await _set_txn_max(db_dsn, 50)
            await wait_until(lambda: server.ledger.ref.products["standard"].txn_max == 50)
            refused = await bus.debit(card, 100)
            assert refused.status == common_pb2.TXN_STATUS_OVER_LIMIT, refused
        finally:
            await _set_txn_max(db_dsn, limit)
            await wait_until(lambda: server.ledger.ref.products["standard"].txn_max == limit)
        assert (await bus.debit(card, 100)).status == APPROVED
    await assert_books_balance(db_dsn)


async def _set_txn_max(dsn: str, fen: int) -> None:
    await _execute(
        dsn, ("UPDATE products SET txn_max = $1 WHERE product_code = 'standard'", (fen,))
    )


async def test_a_lost_listening_connection_reconnects_and_rereads(
    servers: list[RunningServer], db_dsn: str
) -> None:
    server = servers[0]
    watch = server.ledger.refdata_watch
    assert isinstance(watch, RefdataWatch)
    await wait_until(lambda: watch.refreshes >= 1)  # its first re-read, after it started
    lost = watch.listening_pid
    assert lost is not None
    # The watch reconnects only once the change below is committed.
    reconnect, connect = asyncio.Event(), watch._connect

    async def after_the_change() -> asyncpg.Connection:
        await reconnect.wait()
        return await connect()

    watch._connect = after_the_change
    await fetch(db_dsn, "SELECT pg_terminate_backend($1)", lost)
    await wait_until(lambda: watch.listening_pid is None)  # it knows
    # Changed while nobody listens: the notification is lost, the re-read on
    # reconnection is not.
    operator, terminal = await _operator_with_terminal(db_dsn)
    reconnect.set()
    await wait_until(lambda: int(terminal) in server.ledger.ref.terminal_operator)
    assert watch.listening_pid not in (None, lost)
    # Listening again: a later change is heard as before.
    code = f"payable:{operator}:second"
    await _execute(db_dsn, ("INSERT INTO accounts (code, kind) VALUES ($1, 'payable')", (code,)))
    await wait_until(lambda: code in server.ledger.ref.account_ids)


async def test_a_terminal_registered_is_read_alone_not_with_everything_else(
    servers: list[RunningServer], db_dsn: str
) -> None:
    """One registration used to re-read all reference data in every process.

    With a province's hundreds of thousands of terminals that held each
    process's event loop for most of a second per registration. Now the
    notification names the terminal, and only it is read: a product changed
    behind the notifications' back (triggers off for that session) stays
    unseen until something names products.
    """
    server = servers[0]
    limit = server.ledger.ref.products["standard"].txn_max
    operator, known = await _operator_with_terminal(db_dsn)
    for each in servers:  # the new operator's re-read is over
        await wait_until(lambda s=each: int(known) in s.ledger.ref.terminal_operator)  # type: ignore[misc]
    await _execute(
        db_dsn,
        ("SET LOCAL session_replication_role = replica", ()),
        ("UPDATE products SET txn_max = $1 WHERE product_code = 'standard'", (limit - 1,)),
    )
    try:
        terminal = 319800009901
        await _execute(
            db_dsn,
            (
                "INSERT INTO terminals (terminal_id, operator_id, kind) VALUES ($1, $2, 'bus')",
                (terminal, operator),
            ),
        )
        for each in servers:
            await wait_until(lambda s=each: terminal in s.ledger.ref.terminal_operator)  # type: ignore[misc]
            payable = each.ledger.ref.account_ids[f"payable:{operator}"]
            assert each.ledger.ref.terminal_payable[terminal] == payable
            assert each.ledger.ref.products["standard"].txn_max == limit
    finally:
        await _set_txn_max(db_dsn, limit)


async def test_a_terminal_removed_or_renumbered_is_forgotten(
    servers: list[RunningServer], db_dsn: str
) -> None:
    keys = dev_keys()
    operator, first = await _operator_with_terminal(db_dsn)
    _, second = await _operator_with_terminal(db_dsn)
    renumbered = int(first) + 50
    for each in servers:
        await wait_until(lambda s=each: int(second) in s.ledger.ref.terminal_operator)  # type: ignore[misc]
    await _execute(
        db_dsn,
        ("DELETE FROM terminals WHERE terminal_id = $1", (int(second),)),
        ("UPDATE terminals SET terminal_id = $2 WHERE terminal_id = $1", (int(first), renumbered)),
    )
    for each in servers:
        ref = each.ledger.ref
        await wait_until(lambda r=ref: renumbered in r.terminal_operator)  # type: ignore[misc]
        assert int(first) not in ref.terminal_operator
        assert int(first) not in ref.terminal_payable
        assert int(second) not in ref.terminal_operator
        assert ref.terminal_operator[renumbered] == operator
        async with grpc.aio.insecure_channel(each.address) as chan:
            card = await funded(chan, keys, amount=1_000)
            for gone in (first, second):
                reply = await Terminal(chan, gone, 1).debit(card, 100)
                assert reply.status == common_pb2.TXN_STATUS_UNKNOWN_TERMINAL, reply
            reply = await Terminal(chan, str(renumbered), next(_numbers)).debit(card, 100)
            assert reply.status == APPROVED, reply
    await assert_books_balance(db_dsn)


async def test_a_bulk_registration_past_what_a_notification_names_is_read_whole(
    servers: list[RunningServer], db_dsn: str
) -> None:
    operator, _ = await _operator_with_terminal(db_dsn)
    first = 319700000000
    await _execute(
        db_dsn,
        (
            "INSERT INTO terminals (terminal_id, operator_id, kind)"
            " SELECT $1::bigint + g, $2, 'bus' FROM generate_series(0, 999) g",
            (first, operator),
        ),
    )
    for each in servers:
        ref = each.ledger.ref
        await wait_until(lambda r=ref: first + 999 in r.terminal_operator)  # type: ignore[misc]
        payable = ref.account_ids[f"payable:{operator}"]
        assert all(ref.terminal_payable[first + g] == payable for g in range(1000))


async def test_many_terminals_registered_in_small_statements_are_read_whole(
    servers: list[RunningServer], db_dsn: str
) -> None:
    """Each statement names its terminals, but together they named thousands.

    Every process then read them a row each, which took longer than reading
    them all a row per operator (found by review). Past
    ``TERMINALS_BY_ID_MAX`` named, the whole copy is read: a product changed
    behind the notifications' back is seen with them.
    """
    from onecard.ledger.refdata import TERMINALS_BY_ID_MAX

    server = servers[0]
    limit = server.ledger.ref.products["standard"].txn_max
    operator, known = await _operator_with_terminal(db_dsn)
    for each in servers:
        await wait_until(lambda s=each: int(known) in s.ledger.ref.terminal_operator)  # type: ignore[misc]
    await _execute(
        db_dsn,
        ("SET LOCAL session_replication_role = replica", ()),
        ("UPDATE products SET txn_max = $1 WHERE product_code = 'standard'", (limit - 1,)),
    )
    first, statements = 319600000000, TERMINALS_BY_ID_MAX // 400 + 1
    try:
        await _execute(
            db_dsn,
            *(
                (
                    "INSERT INTO terminals (terminal_id, operator_id, kind)"
                    " SELECT $1::bigint + g, $2, 'bus' FROM generate_series(0, 399) g",
                    (first + 400 * n, operator),
                )
                for n in range(statements)
            ),
        )
        last = first + 400 * statements - 1
        for each in servers:
            ref = each.ledger.ref
            await wait_until(lambda r=ref: last in r.terminal_operator)  # type: ignore[misc]
            assert ref.products["standard"].txn_max == limit - 1
    finally:
        await _set_txn_max(db_dsn, limit)
