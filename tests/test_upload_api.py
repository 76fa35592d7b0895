"""Offline upload over real gRPC and PostgreSQL: every outcome, in replies and in the books."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch, offline_record
from onecard.clients.terminal import CHINA_TIME, Terminal, now_bcd_text
from onecard.ledger.accounts import purse_account
from onecard.ledger.engine import UPLOAD_COMMITTER, BatchSettings
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2, upload_pb2, upload_pb2_grpc
from tests.support import (
    assert_books_balance,
    fetch,
    issue,
    issuer_key,
    start_test_server,
    wait_until,
)

BUS = "310400000001"
POSTED = upload_pb2.RECORD_OUTCOME_POSTED
WITH_EXCEPTION = upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION
DUPLICATE = upload_pb2.RECORD_OUTCOME_DUPLICATE
QUARANTINED = upload_pb2.RECORD_OUTCOME_QUARANTINED
CONFLICT = upload_pb2.RECORD_OUTCOME_CONFLICT
_seqs = itertools.count(1)


async def funded(
    channel: grpc.aio.Channel, keys: MemoryKeyStore, amount: int = 5000, kv: int = 1
) -> SimulatedCard:
    card = await issue(channel, keys, kv=kv)
    reply = await Terminal(channel, "310400000009", next(_seqs) * 10).load(card, amount)
    assert reply.status == common_pb2.TXN_STATUS_APPROVED
    return card


def ride(
    card: SimulatedCard, amount: int = 200, when: str | None = None
) -> upload_pb2.OfflineRecord:
    return offline_record(card, amount, BUS, next(_seqs), when or now_bcd_text())


async def postings_of(dsn: str, card: SimulatedCard) -> list[tuple[int, int]]:
    rows = await fetch(
        dsn,
        "SELECT kind, amount FROM postings WHERE card_no = $1 ORDER BY posting_id",
        int(card.card_no),
    )
    return [(r["kind"], r["amount"]) for r in rows]


async def assert_acknowledged(
    dsn: str,
    records: Sequence[upload_pb2.OfflineRecord],
    replies: Sequence[upload_pb2.UploadBatchReply],
) -> None:
    """The database holds what the replies said: one purchase per posted record, none else.

    ``records`` are every record sent (in the order of the replies' results),
    possibly across several uploads of the same records.
    """
    results = [r for reply in replies for r in reply.results]
    assert len(results) == len(records)
    posted: dict[tuple[int, int], tuple[int, int]] = {}
    # A record quarantined again keeps one row, with the latest reason.
    quarantined: dict[tuple[int, int, int, bytes], int] = {}
    for rec, res in zip(records, results, strict=True):
        key = (int(rec.terminal_id), rec.terminal_seq)
        first = res.original_outcome if res.outcome == DUPLICATE else res.outcome
        if first in (POSTED, WITH_EXCEPTION):
            posted[key] = (int(rec.card_number), rec.amount)
        elif res.quarantine_reason:  # quarantined, or a CONFLICT kept for finance
            quarantined[(*key, int(rec.card_number), rec.tac)] = res.quarantine_reason
    rows = await fetch(
        dsn,
        "SELECT p.terminal_id, p.terminal_seq, p.card_no, p.amount FROM postings p"
        " JOIN terminal_txns t USING (terminal_id, terminal_seq)"
        " WHERE p.kind = 1 AND t.kind = 3",
    )
    keys = [(r["terminal_id"], r["terminal_seq"]) for r in rows]
    assert len(keys) == len(set(keys)), "a record was posted twice"
    assert {k: (r["card_no"], r["amount"]) for k, r in zip(keys, rows, strict=True)} == posted
    kept = await fetch(
        dsn, "SELECT terminal_id, terminal_seq, card_no, tac, reason FROM quarantine"
    )
    assert {
        (r["terminal_id"], r["terminal_seq"], r["card_no"], r["tac"]): r["reason"] for r in kept
    } == quarantined
    assert len(kept) == len(quarantined), "a record was kept in quarantine twice"


async def balance_of(dsn: str, card: SimulatedCard) -> int:
    rows = await fetch(dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no))
    return int(rows[0]["purse_balance"])


async def test_records_post_in_order_and_reupload_is_duplicate(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    cards = [await funded(channel, keys, kv=kv) for kv in (1, 2, 3)]
    records = [ride(c, 200) for c in cards] + [ride(cards[0], 300)]
    gw = Gateway(channel)
    (reply,) = await gw.upload([make_batch("morning-1", records)])
    assert reply.batch_id == "morning-1"
    assert [r.outcome for r in reply.results] == [POSTED] * 4
    # two records of one card in one batch, applied in arrival order
    assert [r.balance_after for r in reply.results] == [4800, 4800, 4800, 4500]
    assert reply.posted == 4 and reply.exceptions == 0
    assert await balance_of(server.dsn, cards[0]) == 4500 == cards[0].balance
    assert (await postings_of(server.dsn, cards[0]))[-2:] == [(1, 200), (1, 300)]

    (again,) = await gw.upload([make_batch("morning-1-retry", records)])
    assert [r.outcome for r in again.results] == [DUPLICATE] * 4
    assert [r.original_outcome for r in again.results] == [POSTED] * 4
    assert [r.balance_after for r in again.results] == [4800, 4800, 4800, 4500]
    assert await balance_of(server.dsn, cards[0]) == 4500
    assert len(await postings_of(server.dsn, cards[0])) == 4  # deposit, load, two rides
    await assert_acknowledged(server.dsn, records + records, [reply, again])
    await assert_books_balance(server.dsn)


async def test_one_batch_pays_each_terminals_operator(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A gateway's batch can hold a bus's and a metro gate's records: each operator is paid."""
    card = await funded(channel, keys)
    payables = await fetch(
        server.dsn, "SELECT account_id, code FROM accounts WHERE code LIKE 'payable:%'"
    )
    account = {r["code"]: r["account_id"] for r in payables}
    records = [
        ride(card, 200),
        offline_record(card, 300, "310400000004", next(_seqs), now_bcd_text()),
        ride(card, 100),
    ]
    (reply,) = await Gateway(channel).upload([make_batch("mixed", records)])
    assert [r.outcome for r in reply.results] == [POSTED] * 3
    rows = await fetch(
        server.dsn,
        "SELECT credit_account, sum(amount) AS paid FROM postings"
        " WHERE card_no = $1 AND kind = 1 GROUP BY credit_account",
        int(card.card_no),
    )
    assert {r["credit_account"]: r["paid"] for r in rows} == {
        account["payable:SZBUS"]: 300,
        account["payable:SZMETRO"]: 300,
    }
    await assert_acknowledged(server.dsn, records, [reply])
    await assert_books_balance(server.dsn)


async def test_offline_copy_of_an_online_debit_is_a_duplicate(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    bus = Terminal(channel, BUS, 900_000)
    before = card.balance
    req = bus.debit_request(card, 250)
    reply = await bus.stub.Debit(req)
    assert reply.status == common_pb2.TXN_STATUS_APPROVED
    copy = as_offline(req, card.offline_counter, before)
    (up,) = await Gateway(channel).upload([make_batch("b", [copy])])
    assert up.results[0].outcome == DUPLICATE
    assert up.results[0].original_outcome == POSTED
    assert await balance_of(server.dsn, card) == before - 250
    await assert_books_balance(server.dsn)


async def test_same_identity_other_content_is_a_conflict(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Two genuine records under one (terminal, seq): a terminal that reused its seq."""
    card = await funded(channel, keys)

    def resigned(rec: upload_pb2.OfflineRecord, amount: int) -> upload_pb2.OfflineRecord:
        other = upload_pb2.OfflineRecord()
        other.CopyFrom(rec)
        other.amount = amount
        other.tac = card.sign_purchase(amount, rec.terminal_id, rec.terminal_seq, rec.date_time)
        return other

    rec = ride(card, 200)
    gw = Gateway(channel)
    (first,) = await gw.upload([make_batch("a", [rec])])
    (second,) = await gw.upload([make_batch("b", [resigned(rec, 300)])])
    assert first.results[0].outcome == POSTED
    assert second.results[0].outcome == CONFLICT
    # within one batch the first record wins and the second changes nothing
    rec2 = ride(card, 100)
    (third,) = await gw.upload([make_batch("c", [rec2, resigned(rec2, 150)])])
    assert [r.outcome for r in third.results] == [POSTED, CONFLICT]
    assert await balance_of(server.dsn, card) == 4700
    stored = await fetch(
        server.dsn,
        "SELECT terminal_seq, amount FROM terminal_txns WHERE kind = 3 ORDER BY terminal_seq",
    )
    assert [(r["terminal_seq"], r["amount"]) for r in stored] == [
        (rec.terminal_seq, 200),
        (rec2.terminal_seq, 100),
    ]
    await assert_acknowledged(
        server.dsn,
        [rec, resigned(rec, 300), rec2, resigned(rec2, 150)],
        [first, second, third],
    )
    await assert_books_balance(server.dsn)


async def test_damaged_record_is_quarantined_and_the_genuine_one_still_posts(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Untrusted content claims no identity: it cannot block or shadow the real record."""
    card = await funded(channel, keys)
    genuine = ride(card, 200)
    damaged = upload_pb2.OfflineRecord()
    damaged.CopyFrom(genuine)
    damaged.tac = bytes([genuine.tac[0] ^ 0x40]) + genuine.tac[1:]  # one bit lost on the way
    tampered = upload_pb2.OfflineRecord()
    tampered.CopyFrom(genuine)
    tampered.amount = 20  # a cheaper ride, the TAC copied from the real one
    gw = Gateway(channel)
    (r1,) = await gw.upload([make_batch("1", [damaged])])
    assert r1.results[0].outcome == QUARANTINED
    assert r1.results[0].quarantine_reason == upload_pb2.QUARANTINE_REASON_TAC_INVALID
    (r2,) = await gw.upload([make_batch("2", [genuine])])
    assert r2.results[0].outcome == POSTED and r2.results[0].balance_after == 4800
    # after the real one, a forged copy is kept for investigation, not dropped as a conflict
    (r3,) = await gw.upload([make_batch("3", [tampered, damaged])])
    assert [r.outcome for r in r3.results] == [QUARANTINED, QUARANTINED]
    assert await balance_of(server.dsn, card) == 4800
    assert len(await fetch(server.dsn, "SELECT 1 FROM quarantine")) == 2
    await assert_acknowledged(server.dsn, [damaged, genuine, tampered, damaged], [r1, r2, r3])
    await assert_books_balance(server.dsn)


async def test_untrusted_records_are_quarantined_never_posted(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    forged = ride(card, 200)
    forged.tac = bytes([forged.tac[0] ^ 0x01]) + forged.tac[1:]
    unknown_kv = ride(card, 200)
    unknown_kv.key_version = 7
    stranger = SimulatedCard("3104999999999999", issuer_key(keys, 1))
    stranger.balance = 1000
    unknown_card = ride(stranger, 100)
    foreign = offline_record(card, 100, "999900000001", next(_seqs), now_bcd_text())
    records = [forged, unknown_kv, unknown_card, foreign]
    (reply,) = await Gateway(channel).upload([make_batch("q", records)])
    assert [r.outcome for r in reply.results] == [QUARANTINED] * 4
    assert [r.quarantine_reason for r in reply.results] == [
        upload_pb2.QUARANTINE_REASON_TAC_INVALID,
        upload_pb2.QUARANTINE_REASON_KEY_VERSION_UNKNOWN,
        upload_pb2.QUARANTINE_REASON_UNKNOWN_CARD,
        upload_pb2.QUARANTINE_REASON_UNKNOWN_TERMINAL,
    ]
    assert reply.quarantined == 4 and reply.posted == 0
    assert await balance_of(server.dsn, card) == 5000
    kept = await fetch(
        server.dsn, "SELECT terminal_seq, reason, tac FROM quarantine ORDER BY reason"
    )
    assert [(r["terminal_seq"], r["reason"], r["tac"]) for r in kept] == [
        (rec.terminal_seq, i + 1, rec.tac) for i, rec in enumerate(records)
    ]
    # A re-upload answers the same and keeps one copy of each. The unknown
    # card's record has a TAC that verifies, so it holds its identity and is a
    # duplicate; the untrusted ones hold none and are simply quarantined again.
    (again,) = await Gateway(channel).upload([make_batch("q2", records)])
    assert [r.outcome for r in again.results] == [
        QUARANTINED,
        QUARANTINED,
        DUPLICATE,
        QUARANTINED,
    ]
    assert again.results[2].original_outcome == QUARANTINED
    assert [r.quarantine_reason for r in again.results] == [
        r.quarantine_reason for r in reply.results
    ]
    assert len(await fetch(server.dsn, "SELECT 1 FROM quarantine")) == 4
    await assert_acknowledged(server.dsn, records + records, [reply, again])
    await assert_books_balance(server.dsn)


def as_offline(
    req: terminal_pb2.DebitRequest, counter: int, before: int
) -> upload_pb2.OfflineRecord:
    """The offline record a validator keeps of a debit it asked online about."""
    return upload_pb2.OfflineRecord(
        card_number=req.card_number,
        amount=req.amount,
        transaction_type=req.transaction_type,
        terminal_id=req.terminal_id,
        terminal_seq=req.terminal_seq,
        date_time=req.date_time,
        key_version=req.key_version,
        tac=req.tac,
        offline_counter=counter,
        card_balance_before=before,
    )


async def open_quarantine(dsn: str) -> dict[tuple[int, int], int]:
    rows = await fetch(dsn, "SELECT terminal_id, terminal_seq, reason FROM quarantine_open")
    return {(r["terminal_id"], r["terminal_seq"]): r["reason"] for r in rows}


async def test_offline_copy_of_a_refused_online_debit_is_quarantined_for_finance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The validator asked online, the refusal never reached it, the passenger rode.

    The chip paid (its TAC is in the record), the ledger posted nothing: the
    record is neither a duplicate of a posting nor to be dropped. It is kept
    for finance (REFUSED_ONLINE), once however often it is uploaded. The copy
    of an approved debit stays a duplicate, posted once.
    """
    card = await funded(channel, keys, amount=100)
    stranger = SimulatedCard("3104999999999998", issuer_key(keys, 1))
    stranger.balance = 1000
    bus = Terminal(channel, BUS, 910_000)

    card.balance = short_before = 1000  # the chip holds more than the ledger (records in transit)
    short = bus.debit_request(card, 300)  # more than the ledger's 100
    assert (await bus.stub.Debit(short)).status == common_pb2.TXN_STATUS_INSUFFICIENT_FUNDS
    short_copy = as_offline(short, card.offline_counter, short_before)
    unknown = bus.debit_request(stranger, 200)
    assert (await bus.stub.Debit(unknown)).status == common_pb2.TXN_STATUS_UNKNOWN_CARD
    unknown_copy = as_offline(unknown, stranger.offline_counter, 1000)
    card.balance = approved_before = 100
    approved = bus.debit_request(card, 60)
    assert (await bus.stub.Debit(approved)).status == common_pb2.TXN_STATUS_APPROVED
    approved_copy = as_offline(approved, card.offline_counter, approved_before)

    records = [short_copy, unknown_copy, approved_copy]
    gw = Gateway(channel)
    replies = [(await gw.upload([make_batch(f"r{i}", records)]))[0] for i in range(2)]
    for reply in replies:  # the re-upload is answered the same
        assert [r.outcome for r in reply.results] == [QUARANTINED, QUARANTINED, DUPLICATE]
        assert [r.quarantine_reason for r in reply.results[:2]] == [
            upload_pb2.QUARANTINE_REASON_REFUSED_ONLINE
        ] * 2
        # what the online refusals answered: the ledger's 100 and no card
        assert [r.balance_after for r in reply.results] == [100, 0, 40]
        assert reply.results[2].original_outcome == POSTED
        assert reply.quarantined == 2 and reply.duplicates == 1 and reply.posted == 0

    kept = await fetch(server.dsn, "SELECT terminal_seq, card_no, tac, reason FROM quarantine")
    assert sorted((r["terminal_seq"], r["card_no"], r["tac"], r["reason"]) for r in kept) == [
        (short.terminal_seq, int(card.card_no), short.tac, 6),
        (unknown.terminal_seq, int(stranger.card_no), unknown.tac, 6),
    ]
    assert await open_quarantine(server.dsn) == {
        (int(BUS), short.terminal_seq): 6,
        (int(BUS), unknown.terminal_seq): 6,
    }
    assert await postings_of(server.dsn, card) == [(3, 2000), (2, 100), (1, 60)]
    assert await balance_of(server.dsn, card) == 40
    await assert_books_balance(server.dsn)


async def test_conflicting_genuine_record_is_kept_in_quarantine(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A terminal reset reused a seq: the second record is genuine (the chip paid).

    It cannot take the identity the first holds, so it is a CONFLICT, never
    posted; but it is kept for finance (IDENTITY_CONFLICT), once.
    """
    card = await funded(channel, keys)
    seq, when = next(_seqs), now_bcd_text()
    first = offline_record(card, 200, BUS, seq, when)
    second = offline_record(card, 300, BUS, seq, when)
    gw = Gateway(channel)
    (a,) = await gw.upload([make_batch("a", [first, second])])
    (b,) = await gw.upload([make_batch("b", [second, second])])
    for res in (a.results[1], *b.results):
        assert res.outcome == CONFLICT
        assert res.quarantine_reason == upload_pb2.QUARANTINE_REASON_IDENTITY_CONFLICT
    assert a.results[0].outcome == POSTED
    kept = await fetch(server.dsn, "SELECT terminal_seq, amount, tac, reason FROM quarantine")
    assert [(r["terminal_seq"], r["amount"], r["tac"], r["reason"]) for r in kept] == [
        (seq, 300, second.tac, 5)
    ]
    assert await open_quarantine(server.dsn) == {(int(BUS), seq): 5}
    assert await balance_of(server.dsn, card) == 4800
    await assert_acknowledged(server.dsn, [first, second, second, second], [a, b])
    await assert_books_balance(server.dsn)


async def test_quarantined_record_that_posts_later_leaves_the_open_quarantine(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """An unknown terminal's records wait in quarantine until it is registered.

    Uploaded again then, the genuine one posts and leaves quarantine_open
    (its row stays in quarantine, history); a damaged one is quarantined
    again, now for its TAC, and its one row says so.
    """
    card = await funded(channel, keys)
    terminal = "310400777777"
    genuine = offline_record(card, 100, terminal, next(_seqs), now_bcd_text())
    damaged = offline_record(card, 100, terminal, next(_seqs), now_bcd_text())
    damaged.tac = bytes([damaged.tac[0] ^ 0x01]) + damaged.tac[1:]
    records = [genuine, damaged]
    gw = Gateway(channel)
    (before,) = await gw.upload([make_batch("before", records)])
    assert [r.quarantine_reason for r in before.results] == [
        upload_pb2.QUARANTINE_REASON_UNKNOWN_TERMINAL
    ] * 2
    assert set((await open_quarantine(server.dsn)).values()) == {4}

    await fetch(
        server.dsn,
        "INSERT INTO terminals (terminal_id, operator_id, kind)"
        " SELECT $1, operator_id, kind FROM terminals WHERE terminal_id = $2",
        int(terminal),
        int(BUS),
    )
    (after,) = await gw.upload([make_batch("after", records)])
    assert [r.outcome for r in after.results] == [POSTED, QUARANTINED]
    assert after.results[1].quarantine_reason == upload_pb2.QUARANTINE_REASON_TAC_INVALID
    assert await open_quarantine(server.dsn) == {(int(terminal), damaged.terminal_seq): 1}
    kept = await fetch(server.dsn, "SELECT terminal_seq, reason FROM quarantine")
    assert sorted((r["terminal_seq"], r["reason"]) for r in kept) == [
        (genuine.terminal_seq, 4),
        (damaged.terminal_seq, 1),
    ]
    assert await balance_of(server.dsn, card) == 4900
    rows = await fetch(
        server.dsn,
        "SELECT count(*) AS n FROM postings WHERE kind = 1 AND terminal_id = $1",
        int(terminal),
    )
    assert rows[0]["n"] == 1
    await assert_books_balance(server.dsn)


async def test_record_under_another_key_version_than_the_cards_is_quarantined(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A TAC valid under key version 2 for a card issued under version 1: a downgrade.

    Whoever holds one version's master key could sign rides for every card;
    the record is quarantined (KEY_VERSION_MISMATCH), never posted, told no
    balance, and claims no identity: the card's own record under the same
    (terminal, seq) still posts.
    """
    card = await funded(channel, keys, kv=1)
    forged_chip = SimulatedCard(card.card_no, issuer_key(keys, 2))
    forged_chip.balance, forged_chip.offline_counter = card.balance, card.offline_counter
    seq, when = next(_seqs), now_bcd_text()
    forged = offline_record(forged_chip, 1000, BUS, seq, when)
    assert forged.key_version == 2
    gw = Gateway(channel)
    replies = [(await gw.upload([make_batch(f"f{i}", [forged])]))[0] for i in range(2)]
    for reply in replies:
        (res,) = reply.results
        assert res.outcome == QUARANTINED
        assert res.quarantine_reason == upload_pb2.QUARANTINE_REASON_KEY_VERSION_MISMATCH
        assert res.balance_after == 0
    kept = await fetch(server.dsn, "SELECT key_version, reason FROM quarantine")
    assert [(r["key_version"], r["reason"]) for r in kept] == [(2, 7)]
    assert await balance_of(server.dsn, card) == 5000

    genuine = offline_record(card, 200, BUS, seq, when)
    (ok,) = await gw.upload([make_batch("g", [genuine])])
    assert ok.results[0].outcome == POSTED and ok.results[0].balance_after == 4800
    assert await postings_of(server.dsn, card) == [(3, 2000), (2, 5000), (1, 200)]
    await assert_acknowledged(server.dsn, [forged, forged, genuine], [*replies, ok])
    await assert_books_balance(server.dsn)


async def test_untrusted_record_is_told_no_balance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A record nobody vouches for learns nothing of the card, as a bad MAC online does."""
    card = await funded(channel, keys)
    forged = ride(card, 200)
    forged.tac = bytes([forged.tac[0] ^ 0x01]) + forged.tac[1:]
    (reply,) = await Gateway(channel).upload([make_batch("u", [forged])])
    (res,) = reply.results
    assert res.outcome == QUARANTINED
    assert res.quarantine_reason == upload_pb2.QUARANTINE_REASON_TAC_INVALID
    assert res.balance_after == 0
    assert await balance_of(server.dsn, card) == 5000
    await assert_acknowledged(server.dsn, [forged], [reply])
    await assert_books_balance(server.dsn)


async def test_duplicate_lists_exceptions_as_the_first_reply_did(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, amount=100)
    card.balance = 300  # the chip claims more than the ledger holds, and pays more than it has
    overdraw = ride(card, 300)
    gw = Gateway(channel)
    replies = [(await gw.upload([make_batch(f"d{i}", [overdraw])]))[0] for i in range(2)]
    first, again = (r.results[0] for r in replies)
    assert first.outcome == WITH_EXCEPTION
    assert again.outcome == DUPLICATE and again.original_outcome == WITH_EXCEPTION
    in_enum_order = [
        upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE,
        upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH,
    ]
    assert list(first.exceptions) == list(again.exceptions) == in_enum_order
    assert first.balance_after == again.balance_after == -200
    assert await balance_of(server.dsn, card) == -200
    await assert_acknowledged(server.dsn, [overdraw, overdraw], replies)
    await assert_books_balance(server.dsn)


async def test_exceptions_for_finance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, amount=100)
    negative = ride(card, 100)  # chip at 0 after this
    card.balance = 300  # a chip that claims more than the ledger holds (and pays anyway)
    overdraw = ride(card, 300)
    card.offline_counter += 3  # three purchases the ledger never heard of
    card.balance = 100
    gap = ride(card, 10)
    repeat = ride(card, 10)
    repeat.offline_counter = gap.offline_counter  # same counter, another record (a clone?)
    records = [negative, overdraw, gap, repeat]
    (reply,) = await Gateway(channel).upload([make_batch("x", records)])
    kinds = [list(r.exceptions) for r in reply.results]
    assert reply.results[0].outcome == POSTED
    assert [r.outcome for r in reply.results[1:]] == [WITH_EXCEPTION] * 3
    assert kinds[1] == [
        upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE,
        upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH,
    ] or sorted(kinds[1]) == sorted(
        [upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE, upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH]
    )
    assert upload_pb2.RECORD_EXCEPTION_COUNTER_GAP in kinds[2]
    assert upload_pb2.RECORD_EXCEPTION_COUNTER_REPEAT in kinds[3]
    assert reply.results[-1].balance_after == -320  # posted although the purse went negative
    assert await balance_of(server.dsn, card) == -320
    stored = await fetch(
        server.dsn,
        "SELECT kind FROM finance_exceptions WHERE card_no = $1 ORDER BY terminal_seq, kind",
        int(card.card_no),
    )
    assert len(stored) == sum(len(k) for k in kinds)
    await assert_acknowledged(server.dsn, records, [reply])
    await assert_books_balance(server.dsn)


async def test_lost_card_used_after_loss(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    now = dt.datetime.now(CHINA_TIME)
    before_loss = ride(card, 200, (now - dt.timedelta(hours=2)).strftime("%Y%m%d%H%M%S"))
    after_loss = ride(card, 200, now.strftime("%Y%m%d%H%M%S"))
    await fetch(
        server.dsn,
        "UPDATE cards SET status = 2, lost_at = now() - interval '1 hour' WHERE card_no = $1",
        int(card.card_no),
    )
    (reply,) = await Gateway(channel).upload([make_batch("l", [before_loss, after_loss])])
    assert reply.results[0].outcome == POSTED
    assert reply.results[1].outcome == WITH_EXCEPTION
    assert list(reply.results[1].exceptions) == [upload_pb2.RECORD_EXCEPTION_CARD_LOST]
    assert await balance_of(server.dsn, card) == 4600
    lost = await fetch(
        server.dsn,
        "SELECT terminal_seq, kind FROM finance_exceptions WHERE card_no = $1",
        int(card.card_no),
    )
    assert [(r["terminal_seq"], r["kind"]) for r in lost] == [(after_loss.terminal_seq, 1)]
    await assert_acknowledged(server.dsn, [before_loss, after_loss], [reply])
    await assert_books_balance(server.dsn)


async def test_a_ride_inside_a_released_loss_period_is_still_card_lost(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Releasing a loss report cleared lost_at, and with it the sign finance needed.

    A record dated inside the loss period but uploaded after the release (a
    bus back in its depot days later) was posted as if nothing had happened.
    The last loss period now stays on the card.
    """
    from tests.desk_support import OK, release_loss, report_loss

    card = await funded(channel, keys)
    assert (await report_loss(channel, card.card_no)).status == OK
    await fetch(
        server.dsn,
        "UPDATE cards SET lost_at = now() - interval '2 hours' WHERE card_no = $1",
        int(card.card_no),
    )  # reported two hours ago
    assert (await release_loss(channel, card.card_no)).status == OK
    now = dt.datetime.now(CHINA_TIME)
    stamp = "%Y%m%d%H%M%S"
    before = ride(card, 200, (now - dt.timedelta(hours=3)).strftime(stamp))
    during = ride(card, 200, (now - dt.timedelta(hours=1)).strftime(stamp))
    after = ride(card, 200, (now + dt.timedelta(minutes=1)).strftime(stamp))
    (reply,) = await Gateway(channel).upload([make_batch("w", [before, during, after])])
    assert [r.outcome for r in reply.results] == [POSTED, WITH_EXCEPTION, POSTED]
    assert list(reply.results[1].exceptions) == [upload_pb2.RECORD_EXCEPTION_CARD_LOST]
    stored = await fetch(
        server.dsn,
        "SELECT terminal_seq, detail FROM finance_exceptions WHERE card_no = $1",
        int(card.card_no),
    )
    assert [r["terminal_seq"] for r in stored] == [during.terminal_seq]
    assert "while reported lost" in stored[0]["detail"]
    await assert_acknowledged(server.dsn, [before, during, after], [reply])
    await assert_books_balance(server.dsn)


async def replace_by_sql(dsn: str, old: SimulatedCard, new: SimulatedCard) -> None:
    """The desk's replacement, as direct SQL: the purse moves by a posting, the old
    card is blocked for good and names its successor, and its chip keeps the money."""
    await fetch(
        dsn,
        "WITH b AS (SELECT purse_balance AS amount FROM cards WHERE card_no = $1),"
        " m AS (INSERT INTO postings (card_no, debit_account, credit_account, amount, kind)"
        " SELECT $1, $3, $4, amount, 5 FROM b WHERE amount > 0 RETURNING 1)"
        " UPDATE cards SET purse_balance = CASE WHEN card_no = $1 THEN 0"
        "   ELSE purse_balance + (SELECT amount FROM b) END,"
        " status = CASE WHEN card_no = $1 THEN 3 ELSE status END,"
        " replaced_by = CASE WHEN card_no = $1 THEN $2 ELSE replaced_by END,"
        " chip_adjust = chip_adjust + CASE WHEN card_no = $1"
        "   THEN greatest((SELECT amount FROM b), 0) ELSE 0 END"
        " WHERE card_no IN ($1, $2)",
        int(old.card_no),
        int(new.card_no),
        purse_account(int(old.card_no)),
        purse_account(int(new.card_no)),
    )
    await assert_books_balance(dsn)


async def test_replaced_card_money_follows_to_the_new_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    old = await funded(channel, keys)
    new = await issue(channel, keys)
    await replace_by_sql(server.dsn, old, new)
    assert await balance_of(server.dsn, new) == 5000
    late = ride(old, 200)  # the old card rode the bus before it was handed in
    (reply,) = await Gateway(channel).upload([make_batch("r", [late])])
    res = reply.results[0]
    assert res.outcome == WITH_EXCEPTION
    assert upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED in res.exceptions
    assert await balance_of(server.dsn, old) == 0
    assert await balance_of(server.dsn, new) == 4800
    assert (await postings_of(server.dsn, old))[-1] == (1, 200)
    assert (await postings_of(server.dsn, new))[-1] == (4, 200)
    follow = await fetch(
        server.dsn,
        "SELECT debit_account, credit_account, terminal_seq FROM postings WHERE kind = 4",
    )
    assert [tuple(r) for r in follow] == [
        (purse_account(int(new.card_no)), purse_account(int(old.card_no)), late.terminal_seq)
    ]
    await assert_acknowledged(server.dsn, [late], [reply])
    await assert_books_balance(server.dsn)


async def test_money_follows_a_card_replaced_twice_to_the_last_one(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    first = await funded(channel, keys)
    second = await issue(channel, keys)
    third = await issue(channel, keys)
    await replace_by_sql(server.dsn, first, second)
    second.balance = 5000  # the desk wrote the balance onto the new chip
    await replace_by_sql(server.dsn, second, third)
    late_first = ride(first, 200)
    late_second = ride(second, 100)
    (reply,) = await Gateway(channel).upload([make_batch("r2", [late_first, late_second])])
    assert [r.outcome for r in reply.results] == [WITH_EXCEPTION, WITH_EXCEPTION]
    for res in reply.results:
        assert upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED in res.exceptions
        assert upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE not in res.exceptions
    assert [await balance_of(server.dsn, c) for c in (first, second, third)] == [0, 0, 4700]
    assert (await postings_of(server.dsn, third))[-2:] == [(4, 200), (4, 100)]
    detail = await fetch(
        server.dsn,
        "SELECT detail FROM finance_exceptions WHERE card_no = $1 AND kind = 2",
        int(first.card_no),
    )
    assert third.card_no in detail[0]["detail"]
    await assert_acknowledged(server.dsn, [late_first, late_second], [reply])
    await assert_books_balance(server.dsn)


async def test_first_record_of_a_card_is_not_a_counter_gap(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    newcomer = await funded(channel, keys)
    newcomer.offline_counter = 41  # the chip rode before the ledger saw any purchase of it
    first = ride(newcomer, 100)
    commuter = await funded(channel, keys)
    bus = Terminal(channel, BUS, 700_000)
    assert (await bus.debit(commuter, 100)).status == common_pb2.TXN_STATUS_APPROVED
    after_online = ride(commuter, 100)  # counter 2: online purchases count too
    commuter.offline_counter += 2  # two records still on another bus
    gap = ride(commuter, 100)
    newcomer.offline_counter += 1
    newcomer_gap = ride(newcomer, 100)
    records = [first, after_online, gap, newcomer_gap]
    (reply,) = await Gateway(channel).upload([make_batch("c", records)])
    assert [r.outcome for r in reply.results] == [POSTED, POSTED, WITH_EXCEPTION, WITH_EXCEPTION]
    assert list(reply.results[2].exceptions) == [upload_pb2.RECORD_EXCEPTION_COUNTER_GAP]
    assert list(reply.results[3].exceptions) == [upload_pb2.RECORD_EXCEPTION_COUNTER_GAP]
    counters = await fetch(
        server.dsn,
        "SELECT offline_counter FROM cards WHERE card_no = ANY($1::bigint[]) ORDER BY card_no",
        [int(newcomer.card_no), int(commuter.card_no)],
    )
    assert [r["offline_counter"] for r in counters] == [44, 5]
    await assert_acknowledged(server.dsn, records, [reply])
    await assert_books_balance(server.dsn)


async def test_counter_repeat_is_found_across_uploads_and_a_late_record_is_not_one(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    first, second, third = ride(card, 100), ride(card, 100), ride(card, 100)
    gateway = Gateway(channel)
    (a,) = await gateway.upload([make_batch("a", [first, third])])  # second still on a bus
    assert upload_pb2.RECORD_EXCEPTION_COUNTER_GAP in a.results[1].exceptions
    (b,) = await gateway.upload([make_batch("b", [second])])  # below the card's highest counter
    assert upload_pb2.RECORD_EXCEPTION_COUNTER_REPEAT not in b.results[0].exceptions
    clone = ride(card, 100)
    clone.offline_counter = first.offline_counter  # another record, a counter already used
    (c,) = await gateway.upload([make_batch("c", [clone])])
    assert c.results[0].outcome == WITH_EXCEPTION
    assert upload_pb2.RECORD_EXCEPTION_COUNTER_REPEAT in c.results[0].exceptions
    assert await balance_of(server.dsn, card) == card.balance
    await assert_acknowledged(server.dsn, [first, third, second, clone], [a, b, c])
    await assert_books_balance(server.dsn)


async def test_batch_whose_claims_do_not_add_up_is_refused_whole(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    good = make_batch("good", [ride(card, 100)])
    bad = make_batch("bad", [ride(card, 100), ride(card, 100)])
    bad.claimed_total += 1
    stub = Gateway(channel)
    call = stub.stub.UploadRecords(iter([good, bad]))
    first = await call.read()
    assert first.results[0].outcome == POSTED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claimed_total" in (info.value.details() or "")
    assert await balance_of(server.dsn, card) == 4900  # the first batch stays committed

    miscounted = make_batch("n", [ride(card, 100)])
    miscounted.claimed_count = 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.upload([miscounted])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claimed_count" in (info.value.details() or "")

    broken = make_batch("f", [ride(card, 100)])
    broken.records[0].terminal_id = "12345"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.upload([broken])
    assert "records[0].terminal_id" in (info.value.details() or "")
    assert await balance_of(server.dsn, card) == 4900
    await assert_acknowledged(server.dsn, list(good.records), [first])
    await assert_books_balance(server.dsn)


async def test_oversize_batch_is_refused(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, amount=50_000)
    limit = server.ledger.limits.max_upload_batch
    records = [ride(card, 1) for _ in range(limit + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await Gateway(channel).upload([make_batch("big", records)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(limit) in (info.value.details() or "")
    assert await balance_of(server.dsn, card) == 50_000
    rows = await fetch(server.dsn, "SELECT count(*) AS n FROM terminal_txns WHERE kind = 3")
    assert rows[0]["n"] == 0
    assert await fetch(server.dsn, "SELECT 1 FROM quarantine") == []
    await assert_books_balance(server.dsn)


async def test_concurrent_streams_lose_and_double_nothing(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    cards = [await funded(channel, keys, amount=20_000, kv=kv) for kv in (1, 2, 3, 1)]
    streams = []
    for s in range(4):
        records = [ride(cards[(s + i) % 4], 7) for i in range(400)]
        streams.append([make_batch(f"s{s}-{j}", records[j : j + 50]) for j in range(0, 400, 50)])
    # every stream sent twice at once: the retry storm of a flaky gateway link
    replies = await asyncio.gather(
        *(Gateway(channel).upload(batches) for batches in streams + streams)
    )
    outcomes = [r.outcome for rep in replies for batch in rep for r in batch.results]
    # Streams interleave a card's records out of chip order, so some are posted
    # with a balance-mismatch or counter exception; none is lost or doubled.
    assert outcomes.count(POSTED) + outcomes.count(WITH_EXCEPTION) == 1600
    assert outcomes.count(DUPLICATE) == 1600
    for card in cards:
        assert await balance_of(server.dsn, card) == card.balance == 20_000 - 400 * 7
    rows = await fetch(
        server.dsn, "SELECT count(*) AS n, sum(amount) AS s FROM postings WHERE kind = 1"
    )
    assert (rows[0]["n"], rows[0]["s"]) == (1600, 1600 * 7)
    sent = [rec for batches in streams + streams for batch in batches for rec in batch.records]
    await assert_acknowledged(server.dsn, sent, [b for rep in replies for b in rep])
    await assert_books_balance(server.dsn)


async def test_a_full_queue_still_names_what_is_wrong_with_a_malformed_batch(
    db_dsn: str, keys: MemoryKeyStore, tmp_path: Path
) -> None:
    """A gateway must learn that a batch can never be taken, not to retry it later.

    Malformed is INVALID_ARGUMENT whatever the load; only a well-formed batch
    meets the full queue (RESOURCE_EXHAUSTED, retry later). Nothing of either
    is written, and the batches the ledger had taken post once.

    The queue is really full: a server whose upload queue holds one record,
    every database connection held by the test, so its flusher takes one
    gateway's batch and waits while a second gateway's batch fills the queue.
    Its linger is long, so the test can see the first batch queued, then taken.
    """
    server = await start_test_server(
        db_dsn,
        tmp_path,
        keys,
        batching=BatchSettings(upload_max_queue=1, upload_flushers=1, linger=0.3),
        metrics_listen="127.0.0.1:0",
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            cards = [await funded(channel, keys) for _ in range(3)]
            ledger = server.ledger
            held = [await server.pool.acquire() for _ in range(server.pool.get_max_size())]
            taken = asyncio.create_task(
                Gateway(channel).upload([make_batch("a", [ride(cards[0])])])
            )
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 1)
            # then in the flusher's hands
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 0)
            queued = asyncio.create_task(
                Gateway(channel).upload([make_batch("b", [ride(cards[1])])])
            )
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 1)
            # and the operator's gauge shows the full queue (sampled every 10 ms)
            assert server.metrics is not None
            gauge = 'onecard_queued_items{committer="group-commit-uploads"} 1.0'
            for _ in range(200):
                if gauge in await asyncio.to_thread(_scrape, server.metrics.url):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"{gauge} never scraped")

            miscounted = make_batch("n", [ride(cards[2], 100)])
            miscounted.claimed_count = 2
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await Gateway(channel).upload([miscounted])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "claimed_count" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await Gateway(channel).upload([make_batch("ok", [ride(cards[2], 100)])])
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in (info.value.details() or "")

            for conn in held:
                await server.pool.release(conn)
            for done in (await taken, await queued):
                assert [r.outcome for r in done[0].results] == [POSTED]
    finally:
        await server.stop()
    assert [await balance_of(db_dsn, c) for c in cards] == [5000 - 200, 5000 - 200, 5000]
    rows = await fetch(db_dsn, "SELECT count(*) AS n FROM terminal_txns WHERE kind = 3")
    assert rows[0]["n"] == 2
    await assert_books_balance(db_dsn)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


async def test_a_batch_reply_counts_a_conflict_as_quarantined(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The reply's counts ("for the gateway's log") left CONFLICT out: a record
    kept in the quarantine table (IDENTITY_CONFLICT) was counted in no field, so a
    batch of two records logged one and the kept copy was invisible (found by
    review)."""
    card = await funded(channel, keys)
    seq, when = next(_seqs), now_bcd_text()
    first = offline_record(card, 200, BUS, seq, when)
    second = offline_record(card, 300, BUS, seq, when)  # a terminal that reused its seq
    (reply,) = await Gateway(channel).upload([make_batch("a", [first, second])])
    assert [r.outcome for r in reply.results] == [
        upload_pb2.RECORD_OUTCOME_POSTED,
        upload_pb2.RECORD_OUTCOME_CONFLICT,
    ]
    kept = await fetch(server.dsn, "SELECT reason FROM quarantine")
    assert [r["reason"] for r in kept] == [upload_pb2.QUARANTINE_REASON_IDENTITY_CONFLICT]
    assert (reply.posted, reply.duplicates, reply.quarantined) == (1, 0, 1)


async def test_a_stop_ends_upload_streams_at_once_and_answers_only_the_batch_taken(
    db_dsn: str, keys: MemoryKeyStore, tmp_path: Path
) -> None:
    """A stop ends every upload stream as soon as its batch in the ledger is answered,
    and takes no batch after it began: each gateway is told UNAVAILABLE and resends the
    rest to a server that stays.

    Nothing told the upload service the server was stopping, and an open stream is a
    call gRPC's stop waits for: a gateway's stream idle between batches held every
    stop for the whole shutdown grace, and a batch sent during it was read, posted and
    answered after Ctrl-C or SIGTERM had said the server took no more calls
    (found by review).
    """
    # A grace longer than any wait below: the stop must not end by waiting it out.
    running = await start_test_server(
        db_dsn, tmp_path, keys, shutdown_grace=300, lock_timeout_ms=120_000
    )
    stopping: asyncio.Future[None] | None = None
    holder = await asyncpg.connect(db_dsn)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            idle_card, busy_card = await funded(chan, keys), await funded(chan, keys)
            stub = upload_pb2_grpc.UploadServiceStub(chan)
            queues: list[asyncio.Queue[upload_pb2.UploadBatch]] = [asyncio.Queue(), asyncio.Queue()]

            async def gateway(
                queue: asyncio.Queue[upload_pb2.UploadBatch],
            ) -> AsyncIterator[upload_pb2.UploadBatch]:
                while True:
                    yield await queue.get()

            idle, busy = (stub.UploadRecords(gateway(q)) for q in queues)
            for call, queue, card in ((idle, queues[0], idle_card), (busy, queues[1], busy_card)):
                await queue.put(make_batch("first", [ride(card, 100)]))
                assert (await call.read()).posted == 1
            # The busy stream's next batch waits in the ledger for a card row held here.
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(busy_card.card_no)
            )
            await queues[1].put(make_batch("taken", [ride(busy_card, 100)]))

            async def waiting_for_the_row() -> bool:
                rows = await fetch(db_dsn, "SELECT count(*) AS n FROM pg_locks WHERE NOT granted")
                return bool(rows[0]["n"])

            for _ in range(600):
                if await waiting_for_the_row():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the batch never reached the database")

            stopping = asyncio.ensure_future(running.stop())
            # The idle stream ends at once, while the busy one's batch is still held.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(idle.read(), 30)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended.value.details() or "")
            assert not stopping.done()
            # Sent after the stop began: never read.
            await queues[0].put(make_batch("late-idle", [ride(idle_card, 100)]))
            await queues[1].put(make_batch("late-busy", [ride(busy_card, 100)]))
            await tx.rollback()
            # The batch taken before the stop is finished and answered after its COMMIT ...
            answered = await asyncio.wait_for(busy.read(), 60)
            assert isinstance(answered, upload_pb2.UploadBatchReply)
            assert (answered.batch_id, answered.posted) == ("taken", 1)
            # ... and its stream ends there, the late batch refused with it.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(busy.read(), 60)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended.value.details() or "")
            await asyncio.wait_for(stopping, 60)
    finally:
        await holder.close()
        if stopping is None:
            await running.stop()
        elif not stopping.done():
            await asyncio.wait([stopping], timeout=360)
    purchases = [(int(PostingKind.PURCHASE), 100)]
    assert [p for p in await postings_of(db_dsn, idle_card) if p in purchases] == purchases
    assert [p for p in await postings_of(db_dsn, busy_card) if p in purchases] == purchases * 2
    await assert_books_balance(db_dsn)


async def test_a_late_record_that_takes_the_successor_below_zero_is_negative_balance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The purse that goes negative is the successor's, which paid for the ride.

    The old card's own purse is back at 0 once the amount followed, so
    looking at it told finance nothing about the holder who now owes 200.
    """
    old = await funded(channel, keys, amount=300)
    new = await issue(channel, keys)
    await replace_by_sql(server.dsn, old, new)
    new.balance = 300  # the desk wrote the balance onto the new chip
    spent = await Terminal(channel, BUS, 800_000).debit(new, 300)
    assert spent.status == common_pb2.TXN_STATUS_APPROVED and spent.balance_after == 0
    late = ride(old, 200)  # the old card rode the bus before it was handed in
    (reply,) = await Gateway(channel).upload([make_batch("neg", [late])])
    res = reply.results[0]
    assert res.outcome == WITH_EXCEPTION
    assert list(res.exceptions) == [
        upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED,
        upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE,
    ]
    assert [await balance_of(server.dsn, c) for c in (old, new)] == [0, -200]
    kinds = await fetch(
        server.dsn,
        "SELECT kind FROM finance_exceptions WHERE terminal_seq = $1 ORDER BY kind",
        late.terminal_seq,
    )
    assert [r["kind"] for r in kinds] == list(res.exceptions)
    await assert_acknowledged(server.dsn, [late], [reply])
    await assert_books_balance(server.dsn)


async def test_a_record_repeating_the_cards_highest_counter_is_a_counter_repeat(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A second record at the counter the card's last record used (a cloned chip),
    uploaded later, with a balance that agrees: only the counter gives it away."""
    card = await funded(channel, keys)
    first = ride(card, 100)
    gateway = Gateway(channel)
    (a,) = await gateway.upload([make_batch("hi1", [first])])
    assert a.results[0].outcome == POSTED
    card.offline_counter -= 1  # the clone signs at the counter the card just used
    clone = ride(card, 100)
    assert clone.offline_counter == first.offline_counter
    assert clone.card_balance_before == await balance_of(server.dsn, card)
    (b,) = await gateway.upload([make_batch("hi2", [clone])])
    assert b.results[0].outcome == WITH_EXCEPTION
    assert list(b.results[0].exceptions) == [upload_pb2.RECORD_EXCEPTION_COUNTER_REPEAT]
    assert await balance_of(server.dsn, card) == 4800  # posted all the same: the ride happened
    await assert_acknowledged(server.dsn, [first, clone], [a, b])
    await assert_books_balance(server.dsn)


async def test_a_genuine_record_of_an_unknown_card_beside_a_ride_posts_only_the_ride(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Same terminal, same batch: the stranger's record claims its identity but
    moves no money; the passenger's ride is posted, once, to the operator."""
    card = await funded(channel, keys)
    stranger = SimulatedCard("3104999999999998", issuer_key(keys, 1))
    stranger.balance = 1000
    records = [ride(card, 200), ride(stranger, 300)]
    (reply,) = await Gateway(channel).upload([make_batch("mixed", records)])
    assert [r.outcome for r in reply.results] == [POSTED, QUARANTINED]
    assert reply.results[1].quarantine_reason == upload_pb2.QUARANTINE_REASON_UNKNOWN_CARD
    assert await balance_of(server.dsn, card) == 4800
    purchases = await fetch(server.dsn, "SELECT card_no, amount FROM postings WHERE kind = 1")
    assert [tuple(r) for r in purchases] == [(int(card.card_no), 200)]
    await assert_acknowledged(server.dsn, records, [reply])
    await assert_books_balance(server.dsn)
