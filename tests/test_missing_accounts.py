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
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import grpc
import pytest
import pytest_asyncio

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch, offline_record
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger import engine
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.engine import BatchSettings, Ledger
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.ledger.model import Load, PaymentChannel, PostingKind
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import Conn, offline_batch
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc, terminal_pb2
from tests.support import STAFF, assert_books_balance, fetch, issue, start_test_server
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


async def _issuer_lacking_wechat_cash(dsn: str) -> None:
    """The issuer, with the cash account its desk takes deposits through only."""
    conn = await asyncpg.connect(dsn)
    try:
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


def _assert_refused_naming(reply: object, code: str) -> None:
    assert isinstance(reply, grpc.aio.AioRpcError), reply
    assert reply.code() == grpc.StatusCode.FAILED_PRECONDITION, reply
    details = reply.details() or ""
    assert f"system account {code} does not exist" in details, details


async def _one_refused_one_approved(
    refused_call: Awaitable[object],
    approved_call: Awaitable[terminal_pb2.DebitReply | terminal_pb2.LoadReply],
    code: str,
) -> None:
    """Two terminal calls sent together (one batch): the first refused naming ``code``,
    the second approved."""
    refused, approved = await asyncio.gather(refused_call, approved_call, return_exceptions=True)
    assert not isinstance(approved, BaseException), approved
    assert approved.status == APPROVED
    _assert_refused_naming(refused, code)


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
        await _one_refused_one_approved(
            bad.stub.Debit(refused_request),
            good.stub.Debit(good.debit_request(at_good, 150)),
            account,
        )
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
    await _issuer_lacking_wechat_cash(db_dsn)
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
        await _one_refused_one_approved(
            term.stub.Load(requests[0]), term.stub.Load(requests[1]), account
        )
        assert await postings_of(db_dsn, lacking) == before[0]

        await _create_account(db_dsn, account, "cash")
        assert (await term.stub.Load(requests[0])).status == APPROVED
    await _assert_each_posted_once(db_dsn, (lacking, usual), before, PostingKind.LOAD, 3000)


# Found by review of the first version, each failing on it.


async def test_a_load_at_a_terminal_whose_operator_has_no_payable_is_written(
    server: RunningServer, db_dsn: str
) -> None:
    """A load posts cash to purse and needs no payable: an issuer's own top-up
    machines may have none. The first version asked for the payable of every
    terminal in the batch, and failed the load and the debit beside it."""
    keys = _keys()
    await _operator_without_payable(db_dsn, "319900000201")
    async with grpc.aio.insecure_channel(server.address) as chan:
        to_load, to_ride = await issue(chan, keys), await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (to_load, to_ride)]
        topup, bus = Terminal(chan, "319900000201", 10), Terminal(chan, GOOD_TERMINAL, 95_200)
        load: terminal_pb2.LoadReply | BaseException
        debit: terminal_pb2.DebitReply | BaseException
        load, debit = await asyncio.gather(
            topup.stub.Load(topup.load_request(to_load, to_load.begin_load(1000, "319900000201"))),
            bus.stub.Debit(bus.debit_request(to_ride, 150)),
            return_exceptions=True,
        )
        assert not isinstance(debit, BaseException), debit
        assert not isinstance(load, BaseException), load
        assert (load.status, debit.status) == (APPROVED, APPROVED)
    assert await postings_of(db_dsn, to_load) == [*before[0], (int(PostingKind.LOAD), 1000)]
    assert await postings_of(db_dsn, to_ride) == [*before[1], (int(PostingKind.PURCHASE), 150)]
    await assert_books_balance(db_dsn)


async def test_a_load_of_an_issuer_this_process_has_not_read_is_refused_alone(
    server: RunningServer, db_dsn: str, tmp_path: Path
) -> None:
    """The issuer and its card were set up through another process: this one's
    check passes the load by, its transaction meets the missing account, and
    the batch runs again after a re-read. The first version did not check
    again then, and failed the whole batch with UNKNOWN."""
    keys = _keys()
    await _issuer_lacking_wechat_cash(db_dsn)
    other = await start_test_server(db_dsn, tmp_path / "other", keys)
    try:
        async with grpc.aio.insecure_channel(other.address) as on_other:
            lacking = await issue(on_other, keys, card_no=f"{LACKING_ISSUER}000000000077")
    finally:
        await other.stop()
    server.ledger.ref.issuers.pop(LACKING_ISSUER, None)  # as if never read here
    async with grpc.aio.insecure_channel(server.address) as chan:
        rider = await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (lacking, rider)]
        term, bus = Terminal(chan, "310400000009", 97_100), Terminal(chan, GOOD_TERMINAL, 95_300)
        wechat = common_pb2.PAYMENT_CHANNEL_WECHAT_PAY
        request = term.load_request(
            lacking, lacking.begin_load(3000, term.terminal_id), channel=wechat
        )
        await _one_refused_one_approved(
            term.stub.Load(request),
            bus.stub.Debit(bus.debit_request(rider, 150)),
            f"cash:{LACKING_ISSUER}:wechat_pay",
        )
    assert await postings_of(db_dsn, lacking) == before[0]
    assert await postings_of(db_dsn, rider) == [*before[1], (int(PostingKind.PURCHASE), 150)]
    await assert_books_balance(db_dsn)


async def test_an_upload_from_a_terminal_learned_meanwhile_is_refused_alone(
    server: RunningServer, db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of the reference data is shared by the process's tasks (the
    other upload flusher, reversals, the desk): a terminal registered without
    its operator's payable can become known between the check and the
    batch's decisions. The first version then failed the whole batch."""
    keys = _keys()
    real = offline_batch.apply_offline_batch
    registered = False

    async def another_task_rereads_first(conn: Conn, ref: ReferenceData, prepared: Any) -> Any:
        nonlocal registered
        if not registered:
            registered = True
            await _operator_without_payable(db_dsn, "319900000301")
            await ref.refresh(conn)  # what another task's learn_terminals does
        return await real(conn, ref, prepared)

    async with grpc.aio.insecure_channel(server.address) as chan:
        on_late, on_good = await funded(chan, keys), await funded(chan, keys)
        when = now_bcd_text()
        late = make_batch("late", [offline_record(on_late, 120, "319900000301", 7, when)])
        good = make_batch("good", [offline_record(on_good, 120, GOOD_TERMINAL, 96_301, when)])
        monkeypatch.setattr(engine, "apply_offline_batch", another_task_rereads_first)
        refused, replies = await asyncio.gather(
            Gateway(chan).upload([late]), Gateway(chan).upload([good]), return_exceptions=True
        )
        assert not isinstance(replies, BaseException), replies
        assert [r.posted for r in replies] == [1]
        assert isinstance(refused, grpc.aio.AioRpcError), refused
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "payable:NOPAY" in (refused.details() or "")
    await assert_books_balance(db_dsn)


def test_the_requests_refused_are_decided_when_refused() -> None:
    """A re-read between the refusal and the committer's question (the pool
    connection is given back in between, an await) learned the account, and
    the first version then named none of the batch's requests, so the
    committer failed all of them."""
    ref = ReferenceData(issuers={"3104": "demo"}, account_ids={"cash:3104:cash": 1})
    ledger = cast(Ledger, SimpleNamespace(ref=ref))
    load = Load(
        "3104000000000001",
        100,
        2,
        "310400000009",
        1,
        "20261203080000",
        1,
        b"\0" * 4,
        0,
        0,
        b"\0" * 4,
        PaymentChannel.WECHAT_PAY,
    )
    refusal = Ledger._accounts_missing_online(ledger, [load], {310400000009})
    assert refusal is not None and refusal.holds(load)
    ref.account_ids = {**ref.account_ids, "cash:3104:wechat_pay": 2}  # what a re-read does
    assert refusal.holds(load)


async def test_a_desk_call_through_a_channel_without_cash_account_names_it(
    server: RunningServer, db_dsn: str
) -> None:
    """The desk's calls are not batched; they answered UNKNOWN."""
    await _issuer_lacking_wechat_cash(db_dsn)
    async with grpc.aio.insecure_channel(server.address) as chan:
        try:
            await desk_pb2_grpc.DeskServiceStub(chan).IssueCard(
                desk_pb2.IssueCardRequest(
                    request_id=str(uuid.uuid4()),
                    card_number=f"{LACKING_ISSUER}000000000088",
                    product="standard",
                    deposit=2000,
                    key_version=1,
                    payment_channel=common_pb2.PAYMENT_CHANNEL_WECHAT_PAY,
                ),
                metadata=STAFF,
            )
        except grpc.aio.AioRpcError as exc:
            _assert_refused_naming(exc, f"cash:{LACKING_ISSUER}:wechat_pay")
        else:
            raise AssertionError("issued through a channel without its cash account")
    rows = await fetch(
        db_dsn, "SELECT 1 FROM cards WHERE card_no = $1", int(f"{LACKING_ISSUER}000000000088")
    )
    assert rows == []
    await assert_books_balance(db_dsn)
