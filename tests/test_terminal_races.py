"""Replays and retries that race another transaction for the card's lock.

A batch's first statement locks its cards and reads earlier outcomes and used
MAC1s together, and a statement sees the database as it was when it
started: what another transaction committed while the batch waited for a
card was invisible to those reads. A second copy of a load's MAC1 taken by
another worker at the same time was credited too; a retry of a load whose
reversal committed meanwhile was handed its MAC2 (review of 2026-12-02).
Each race is forced here by holding the card's row from a third session
until both contenders wait for it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc

from onecard.clients.card import PendingLoad, SimulatedCard
from onecard.clients.terminal import now_bcd_text
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.lifecycle import Reversal
from onecard.ledger.model import Load, PaymentChannel
from onecard.server.app import RunningServer
from tests.support import assert_books_balance, fetch, issue, start_test_server

TOPUP = "310400000009"


def load(card: SimulatedCard, pending: PendingLoad, seq: int, when: str) -> Load:
    return Load(card.card_no, pending.amount, 0x02, TOPUP, seq, when, card.key_version,
                pending.random, pending.online_counter, pending.old_balance, pending.mac1,
                PaymentChannel.CASH)  # fmt: skip


async def waiting_for_locks(conn: asyncpg.Connection, n: int) -> None:
    for _ in range(250):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {waiting} sessions wait for a lock, not {n}")


async def purse(dsn: str, card: SimulatedCard) -> int:
    rows = await fetch(dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no))
    return int(rows[0]["purse_balance"])


async def test_two_workers_given_one_load_mac1_credit_it_once(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    db_dsn: str,
    tmp_path: Path,
) -> None:
    other = await start_test_server(db_dsn, tmp_path / "second", keys)  # a second worker
    try:
        card = await issue(channel, keys)
        pending, when = card.begin_load(5000, TOPUP), now_bcd_text()
        holder = await asyncpg.connect(db_dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(card.card_no)
            )
            first = asyncio.create_task(server.ledger.create_loads([load(card, pending, 1, when)]))
            copy = asyncio.create_task(other.ledger.create_loads([load(card, pending, 2, when)]))
            await waiting_for_locks(holder, 2)
            await tx.commit()
        finally:
            await holder.close()
        statuses = sorted(r[0].status.name for r in (await first, await copy))
        assert statuses == ["APPROVED", "STALE_COUNTER"]
        assert await purse(db_dsn, card) == 5000
        await assert_books_balance(db_dsn)
    finally:
        await other.stop()


async def test_a_retry_waiting_behind_the_reversal_of_its_load_gets_no_mac2(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, db_dsn: str
) -> None:
    card = await issue(channel, keys)
    pending, when = card.begin_load(5000, TOPUP), now_bcd_text()
    original = load(card, pending, 41, when)
    assert (await server.ledger.create_loads([original]))[0].status.name == "APPROVED"

    holder = await asyncpg.connect(db_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(card.card_no))
        reversal = asyncio.create_task(
            server.ledger.lifecycle.reverse(Reversal(card.card_no, 5000, TOPUP, 42, 41, when))
        )
        await waiting_for_locks(holder, 1)
        retry = asyncio.create_task(server.ledger.create_loads([original]))  # seq 41 again
        await waiting_for_locks(holder, 2)
        await tx.commit()
    finally:
        await holder.close()
    assert (await reversal).status.name == "APPROVED"
    again = (await retry)[0]
    assert (again.status.name, again.mac2) == ("ALREADY_REVERSED", b"")
    assert await purse(db_dsn, card) == 0
    await assert_books_balance(db_dsn)


async def test_a_database_holding_such_a_double_credit_is_named_before_the_upgrade(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, db_dsn: str
) -> None:
    """Migration 0011's unique index cannot be built over the double credit it prevents.

    A database that ran the code before it may hold one (the race above). The
    migration failed on the index with a bare unique violation, and the
    server would not start without saying why; it now names the problem and
    how to list the loads, and applies nothing.
    """
    from onecard.ledger.storage.migrate import MigrationFailed, apply_migrations

    card = await issue(channel, keys)
    pending, when = card.begin_load(5000, TOPUP), now_bcd_text()
    assert (await server.ledger.create_loads([load(card, pending, 1, when)]))[0].status.name == (
        "APPROVED"
    )
    conn = await asyncpg.connect(db_dsn)
    try:
        # What the race left before 0011: one MAC1 approved under two seqs.
        await conn.execute("DROP INDEX terminal_txns_load_mac1")
        await conn.execute("DELETE FROM schema_migrations WHERE version = 11")
        await conn.execute(
            "CREATE TEMP TABLE copy AS SELECT * FROM terminal_txns WHERE terminal_id = $1",
            int(TOPUP),
        )
        await conn.execute("UPDATE copy SET terminal_seq = 2")
        await conn.execute("INSERT INTO terminal_txns SELECT * FROM copy")
        try:
            await apply_migrations(conn)
            raise AssertionError("migration 0011 applied over a double credit")
        except MigrationFailed as exc:
            said = str(exc)
        assert "0011_load_mac1_unique" in said and "approved more than once" in said
        assert "List them with" in said
        assert not await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 11")
    finally:
        await conn.close()


async def test_a_load_refused_while_its_copy_waited_for_the_card_is_spent_for_the_copy(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, db_dsn: str
) -> None:
    """A refused load's MAC1 is spent (README), also for a copy that was already waiting.

    The copy's first statement read the used MAC1s as they were before it
    waited for the card, so a refusal committed meanwhile was invisible to it,
    and the copy was credited once the card was active again: cash handed
    back for the first, the top-up credited for the second.
    """
    card = await issue(channel, keys)
    await fetch(db_dsn, "UPDATE cards SET status = 2 WHERE card_no = $1", int(card.card_no))
    pending, when = card.begin_load(5000, TOPUP), now_bcd_text()
    holder = await asyncpg.connect(db_dsn)
    releaser = await asyncpg.connect(db_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(card.card_no))
        first = asyncio.create_task(server.ledger.create_loads([load(card, pending, 1, when)]))
        await waiting_for_locks(holder, 1)
        # The loss released at the desk right after the first is answered.
        release = asyncio.create_task(
            releaser.execute("UPDATE cards SET status = 1 WHERE card_no = $1", int(card.card_no))
        )
        await waiting_for_locks(holder, 2)
        copy = asyncio.create_task(server.ledger.create_loads([load(card, pending, 2, when)]))
        await waiting_for_locks(holder, 3)
        await tx.commit()
        await release
    finally:
        await holder.close()
        await releaser.close()
    assert (await first)[0].status.name == "CARD_NOT_ACTIVE"
    again = (await copy)[0]
    assert (again.status.name, again.mac2) == ("STALE_COUNTER", b"")
    assert await purse(db_dsn, card) == 0
    await assert_books_balance(db_dsn)
