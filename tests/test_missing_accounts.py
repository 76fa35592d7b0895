"""A system account missing from the setup refuses only the requests that post to it.

An operator registered without its payable account (or an issuer without the
cash account of a payment channel) is a setup mistake. It used to fail every
flush it landed in with gRPC UNKNOWN, so each terminal and gateway whose
requests shared a batch with one request of that operator's terminals was
refused too, for as long as the mistake stood. Now those requests alone are
refused with FAILED_PRECONDITION naming the account, nothing of them is
written, and once the account exists a resend posts them once.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest_asyncio

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch, offline_record
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.engine import BatchSettings
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.support import assert_books_balance, issue, start_test_server
from tests.test_upload_api import funded, postings_of

APPROVED = common_pb2.TXN_STATUS_APPROVED
GOOD_TERMINAL = "310400000001"
#: An issuer whose cards the keys below sign, set up without one channel's cash account.
LACKING_ISSUER = "3207"
_operators = itertools.count(1)


def _keys() -> MemoryKeyStore:
    doc = copy.deepcopy(DEV_KEYS)
    doc["issuers"][LACKING_ISSUER] = doc["issuers"]["3104"]
    return MemoryKeyStore(parse_key_document(doc, "test keys"))


@pytest_asyncio.fixture(loop_scope="session")
async def server(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    # A linger long enough that requests sent together share one batch.
    running = await start_test_server(
        db_dsn, tmp_path, _keys(), batching=BatchSettings(linger=0.2, upload_flushers=1)
    )
    try:
        yield running
    finally:
        await running.stop()


async def _operator_without_payable(dsn: str, terminal_id: str) -> str:
    """A new operator and one terminal of it, registered as an operator might forget to."""
    operator = f"NOPAY{next(_operators)}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO operators VALUES ($1, 'no payable yet')", operator)
        await conn.execute(
            "INSERT INTO terminals (terminal_id, operator_id, kind) VALUES ($1, $2, 'bus')",
            int(terminal_id),
            operator,
        )
    finally:
        await conn.close()
    return f"payable:{operator}"


async def _create_account(dsn: str, code: str, kind: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO accounts (code, kind) VALUES ($1, $2)", code, kind)
    finally:
        await conn.close()


def _assert_refused_naming(reply: object, code: str) -> None:
    assert isinstance(reply, grpc.aio.AioRpcError), reply
    assert reply.code() == grpc.StatusCode.FAILED_PRECONDITION, reply
    details = reply.details() or ""
    assert f"system account {code} does not exist" in details, details


async def _assert_each_posted_once(
    dsn: str,
    cards: Sequence[SimulatedCard],
    before: Sequence[list[tuple[int, int]]],
    kind: PostingKind,
    amount: int,
) -> None:
    """Each card has one posting more than ``before``: the refused request's, once, and the
    other's; and the books balance."""
    for card, earlier in zip(cards, before, strict=True):
        assert await postings_of(dsn, card) == [*earlier, (int(kind), amount)]
    await assert_books_balance(dsn)


async def test_a_debit_at_a_terminal_without_payable_is_refused_alone(
    server: RunningServer, db_dsn: str
) -> None:
    keys = _keys()
    account = await _operator_without_payable(db_dsn, "319900000101")
    async with grpc.aio.insecure_channel(server.address) as chan:
        at_bad, at_good = await funded(chan, keys), await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (at_bad, at_good)]
        bad, good = Terminal(chan, "319900000101", 10), Terminal(chan, GOOD_TERMINAL, 95_000)
        refused_request = bad.debit_request(at_bad, 150)
        refused: terminal_pb2.DebitReply | BaseException
        approved: terminal_pb2.DebitReply | BaseException
        refused, approved = await asyncio.gather(
            bad.stub.Debit(refused_request),
            good.stub.Debit(good.debit_request(at_good, 150)),
            return_exceptions=True,
        )
        assert not isinstance(approved, BaseException), approved
        assert approved.status == APPROVED
        _assert_refused_naming(refused, account)
        assert await postings_of(db_dsn, at_bad) == before[0]
        await assert_books_balance(db_dsn)

        # Set up: the terminal sends the same debit again, and it posts once.
        await _create_account(db_dsn, account, "payable")
        assert (await bad.stub.Debit(refused_request)).status == APPROVED
        assert (await bad.stub.Debit(refused_request)).status == common_pb2.TXN_STATUS_DUPLICATE
    await _assert_each_posted_once(db_dsn, (at_bad, at_good), before, PostingKind.PURCHASE, 150)


async def test_an_upload_batch_from_a_terminal_without_payable_is_refused_alone(
    server: RunningServer, db_dsn: str
) -> None:
    keys = _keys()
    account = await _operator_without_payable(db_dsn, "319900000102")
    async with grpc.aio.insecure_channel(server.address) as chan:
        on_bad, on_good = await funded(chan, keys), await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (on_bad, on_good)]
        when = now_bcd_text()
        bad_batch = make_batch("bad", [offline_record(on_bad, 120, "319900000102", 7, when)])
        good_batch = make_batch("good", [offline_record(on_good, 120, GOOD_TERMINAL, 96_001, when)])
        refused, replies = await asyncio.gather(
            Gateway(chan).upload([bad_batch]),
            Gateway(chan).upload([good_batch]),
            return_exceptions=True,
        )
        assert not isinstance(replies, BaseException), replies
        assert [r.posted for r in replies] == [1]
        _assert_refused_naming(refused, account)
        assert await postings_of(db_dsn, on_bad) == before[0]

        await _create_account(db_dsn, account, "payable")
        assert [r.posted for r in await Gateway(chan).upload([bad_batch])] == [1]
        assert [r.duplicates for r in await Gateway(chan).upload([bad_batch])] == [1]
    await _assert_each_posted_once(db_dsn, (on_bad, on_good), before, PostingKind.PURCHASE, 120)


async def test_a_load_through_a_channel_without_cash_account_is_refused_alone(
    server: RunningServer, db_dsn: str
) -> None:
    keys = _keys()
    account = f"cash:{LACKING_ISSUER}:wechat_pay"
    conn = await asyncpg.connect(db_dsn)
    try:
        # The issuer with the cash account its desk takes deposits through only.
        await conn.execute(
            "INSERT INTO issuers VALUES ($1, 'set up in part') ON CONFLICT DO NOTHING",
            LACKING_ISSUER,
        )
        await conn.execute(
            "INSERT INTO accounts (code, kind) VALUES ($1, 'cash') ON CONFLICT DO NOTHING",
            f"cash:{LACKING_ISSUER}:cash",
        )
    finally:
        await conn.close()
    wechat = common_pb2.PAYMENT_CHANNEL_WECHAT_PAY
    async with grpc.aio.insecure_channel(server.address) as chan:
        lacking = await issue(chan, keys, card_no=f"{LACKING_ISSUER}000000000001")
        usual = await issue(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (lacking, usual)]
        term = Terminal(chan, "310400000009", 97_000)
        requests = [
            term.load_request(c, c.begin_load(3000, term.terminal_id), channel=wechat)
            for c in (lacking, usual)
        ]
        refused: terminal_pb2.LoadReply | BaseException
        approved: terminal_pb2.LoadReply | BaseException
        refused, approved = await asyncio.gather(
            *(term.stub.Load(r) for r in requests), return_exceptions=True
        )
        assert not isinstance(approved, BaseException), approved
        assert approved.status == APPROVED
        _assert_refused_naming(refused, account)
        assert await postings_of(db_dsn, lacking) == before[0]

        await _create_account(db_dsn, account, "cash")
        assert (await term.stub.Load(requests[0])).status == APPROVED
    await _assert_each_posted_once(db_dsn, (lacking, usual), before, PostingKind.LOAD, 3000)
