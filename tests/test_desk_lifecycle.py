"""The desk's card lifecycle over real gRPC and PostgreSQL: every flow, every refusal, the books."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import replace as dc_replace
from pathlib import Path

import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.accounts import deposit_account, purse_account
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2, terminal_pb2, upload_pb2
from tests.desk_support import (
    BUS,
    HOLDER,
    OK,
    TOPUP,
    WRONG_STATE,
    assert_no_clear_pii,
    audit_trail,
    cancel,
    deny_list,
    desk,
    funded,
    get_card,
    issue_at_desk,
    release_loss,
    replace,
    report_loss,
    reverse_request,
    rid,
    terminal_stub,
)
from tests.support import (
    STAFF,
    assert_books_balance,
    fetch,
    issue,
    new_card_number,
    start_test_server,
)

APPROVED = common_pb2.TXN_STATUS_APPROVED
NOT_ACTIVE = common_pb2.TXN_STATUS_CARD_NOT_ACTIVE


# -- issue and enquiry -------------------------------------------------------------


@pytest.mark.parametrize(
    ("product", "deposit"), [("standard", 2000), ("student", 2000), ("senior", 0)]
)
async def test_issue_registered_card_shows_only_masked_holder(
    server: RunningServer, channel: grpc.aio.Channel, product: str, deposit: int
) -> None:
    stub = desk(channel)
    req = desk_pb2.IssueCardRequest(
        request_id=rid(),
        card_number=new_card_number(),
        product=product,
        deposit=deposit,
        key_version=1,
        payment_channel=common_pb2.PAYMENT_CHANNEL_ALIPAY,
        holder=HOLDER,
    )
    reply = await stub.IssueCard(req, metadata=STAFF)
    assert reply.status == OK, reply
    masked = desk_pb2.Holder(name="张**", id_number="3201**********1234", phone="138****5678")
    assert reply.card.holder == masked
    card = await get_card(channel, req.card_number)
    assert card.holder == masked
    assert (card.product, card.deposit) == (product, deposit)
    assert await stub.IssueCard(req, metadata=STAFF) == reply  # retry: first outcome
    changed = desk_pb2.IssueCardRequest()
    changed.CopyFrom(req)
    changed.holder.phone = "13900000000"
    assert (await stub.IssueCard(changed, metadata=STAFF)).status == desk_pb2.DESK_STATUS_CONFLICT
    trail = await audit_trail(server.dsn, req.card_number)
    assert [(s, op) for s, op, _, _ in trail] == [("tester", "issue_card")]
    assert trail[0][3]["holder_id_number"] == "3201**********1234"  # type: ignore[index]
    await assert_no_clear_pii(server.dsn)
    await assert_books_balance(server.dsn)


@pytest.mark.parametrize(
    ("holder", "field"),
    [
        (desk_pb2.Holder(id_number="32010219900101123"), "holder.id_number"),
        (desk_pb2.Holder(phone="12ab"), "holder.phone"),
    ],
)
async def test_malformed_holder_is_refused_without_echoing_it(
    server: RunningServer, channel: grpc.aio.Channel, holder: desk_pb2.Holder, field: str
) -> None:
    req = desk_pb2.IssueCardRequest(
        request_id=rid(),
        card_number=new_card_number(),
        product="standard",
        deposit=2000,
        key_version=1,
        payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
        holder=holder,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await desk(channel).IssueCard(req, metadata=STAFF)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details is not None
    assert details.startswith(field)
    assert (holder.id_number or holder.phone) not in details


async def test_enquiry_and_history_newest_first_paged(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 5000)
    bus = Terminal(channel, BUS)
    for amount in (100, 200, 300, 400):
        assert (await bus.debit(card, amount)).status == APPROVED
    view = await get_card(channel, card.card_no)
    assert (view.balance, view.deposit, view.status) == (4000, 2000, common_pb2.CARD_STATUS_ACTIVE)
    assert (view.online_counter, view.offline_counter) == (1, 4)
    assert view.last_used_at and not view.lost_at

    stub = desk(channel)
    seen: list[desk_pb2.HistoryEntry] = []
    token = ""
    pages = 0
    while True:
        page = await stub.GetHistory(
            desk_pb2.GetHistoryRequest(card_number=card.card_no, page_size=2, page_token=token),
            metadata=STAFF,
        )
        seen.extend(page.entries)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [e.amount for e in seen] == [-400, -300, -200, -100, 5000, 2000]
    assert [e.posting_id for e in seen] == sorted((e.posting_id for e in seen), reverse=True)
    assert seen[0].counterparty == "payable:SZBUS" and seen[0].terminal_id == BUS
    assert seen[-1].account == "deposit" and seen[-1].kind == desk_pb2.POSTING_KIND_DEPOSIT

    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    empty = await stub.GetHistory(
        desk_pb2.GetHistoryRequest(card_number=card.card_no, to_time=past), metadata=STAFF
    )
    assert list(empty.entries) == []
    first = await stub.GetHistory(
        desk_pb2.GetHistoryRequest(card_number=card.card_no, page_size=2), metadata=STAFF
    )
    other = await funded(channel, keys, 1000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetHistory(
            desk_pb2.GetHistoryRequest(card_number=other.card_no, page_token=first.next_page_token),
            metadata=STAFF,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details is not None
    assert details.startswith("page_token")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetHistory(
            desk_pb2.GetHistoryRequest(card_number=card.card_no, from_time="yesterday"),
            metadata=STAFF,
        )
    details = err.value.details()
    assert details is not None
    assert details.startswith("from_time")


# -- loss, release and the deny list ------------------------------------------------


async def test_loss_refuses_online_use_and_moves_the_deny_list(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 3000)
    other = await funded(channel, keys, 3000)
    start = await deny_list(channel)
    assert (start.version, start.full, list(start.entries)) == (0, True, [])

    lost = await report_loss(channel, card.card_no)
    assert lost.status == OK, lost
    assert lost.card.status == common_pb2.CARD_STATUS_LOST and lost.card.lost_at
    assert lost.card.deny_listed
    bus = Terminal(channel, BUS)
    refused = await bus.debit(card, 100)
    assert refused.status == NOT_ACTIVE
    assert (await Terminal(channel, TOPUP, 50).load(card, 100)).status == NOT_ACTIVE

    v1 = await deny_list(channel)
    assert v1.version == 1 and v1.full
    assert [(e.card_number, e.listed, e.reason) for e in v1.entries] == [
        (card.card_no, True, terminal_pb2.DENY_REASON_LOST)
    ]
    assert (await report_loss(channel, other.card_no)).status == OK
    delta = await deny_list(channel, 1)
    assert (delta.version, delta.full) == (2, False)
    assert [e.card_number for e in delta.entries] == [other.card_no]

    # Illegal transitions answer a status and change nothing.
    twice = await report_loss(channel, card.card_no)
    assert twice.status == WRONG_STATE and "is lost" in twice.detail
    active = await funded(channel, keys, 100)
    not_lost = await release_loss(channel, active.card_no)
    assert not_lost.status == WRONG_STATE and "needs a lost card" in not_lost.detail
    unknown = await report_loss(channel, "3104999999999999")
    assert unknown.status == desk_pb2.DESK_STATUS_UNKNOWN_CARD

    released = await release_loss(channel, card.card_no)
    assert released.status == OK
    assert released.card.status == common_pb2.CARD_STATUS_ACTIVE and not released.card.lost_at
    assert not released.card.deny_listed
    after = await deny_list(channel, 2)
    assert after.version == 3
    assert [(e.card_number, e.listed) for e in after.entries] == [(card.card_no, False)]
    since_start = await deny_list(channel, 0)
    assert [e.card_number for e in since_start.entries] == [other.card_no]
    assert (await bus.debit(card, 100)).status == APPROVED

    trail = await audit_trail(server.dsn, card.card_no)
    assert [op for _, op, _, _ in trail] == ["issue_card", "report_loss", "release_loss"]
    _, _, before, after_doc = trail[1]
    assert before["status"] == 1 and after_doc["status"] == 2  # type: ignore[index]
    await assert_books_balance(server.dsn)


async def test_registered_card_needs_the_holders_id(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    no = new_card_number()
    await issue_at_desk(channel, no, HOLDER)
    missing = await report_loss(channel, no)
    assert missing.status == desk_pb2.DESK_STATUS_HOLDER_MISMATCH
    wrong = await report_loss(channel, no, id_number="320102199001019999")
    assert wrong.status == desk_pb2.DESK_STATUS_HOLDER_MISMATCH
    right = await report_loss(channel, no, id_number="320102199001011234")
    assert right.status == OK
    assert right.card.holder.id_number == "3201**********1234"
    await assert_no_clear_pii(server.dsn)


def _full_width(text: str) -> str:
    """As a Chinese input method in full-width mode types it: ３２０１…Ｘ."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


async def test_an_id_number_typed_in_full_width_is_the_same_number(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    """Full-width digits were kept as typed; the holder's ASCII ID then did not match."""

    async def registered(id_number: str) -> str:
        no = new_card_number()
        await issue_at_desk(channel, no, desk_pb2.Holder(name="张三丰", id_number=id_number))
        return no

    typed_wide = await registered(_full_width("32010219900101123X"))
    assert (await get_card(channel, typed_wide)).holder.id_number == "3201**********123X"
    shown = await report_loss(channel, typed_wide, id_number="32010219900101123x")
    assert shown.status == OK, shown.detail

    typed_ascii = await registered("320102199001011234")
    shown = await report_loss(channel, typed_ascii, id_number=_full_width("320102199001011234"))
    assert shown.status == OK, shown.detail

    # Digits of another script are not an ID number: refused, naming the field.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registered("".join(chr(0x0660 + int(c)) for c in "320102199001011234"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holder.id_number" in (err.value.details() or "")
    await assert_no_clear_pii(server.dsn)


async def test_retry_returns_first_outcome_and_changed_retry_conflicts(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    request_id = rid()
    first = await report_loss(channel, card.card_no, request_id)
    again = await report_loss(channel, card.card_no, request_id)
    assert first == again and first.status == OK
    other = await funded(channel, keys, 1000)
    clash = await report_loss(channel, other.card_no, request_id)
    assert clash.status == desk_pb2.DESK_STATUS_CONFLICT
    assert (await get_card(channel, other.card_no)).status == common_pb2.CARD_STATUS_ACTIVE
    ops = [op for _, op, _, _ in await audit_trail(server.dsn, card.card_no)]
    assert ops == ["issue_card", "report_loss"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await desk(channel).ReportLoss(
            desk_pb2.CardActionRequest(request_id=rid(), card_number=card.card_no)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- replacement -----------------------------------------------------------------------


async def test_replace_moves_balance_and_deposit_and_blocks_the_old_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 4000)
    new_no = new_card_number()
    active = await replace(channel, card.card_no, new_no)
    assert active.status == WRONG_STATE and "report the loss first" in active.detail
    assert (await report_loss(channel, card.card_no)).status == OK

    taken = await funded(channel, keys, 100)
    exists = await replace(channel, card.card_no, taken.card_no)
    assert exists.status == desk_pb2.DESK_STATUS_CARD_EXISTS

    reply = await replace(channel, card.card_no, new_no, kv=2)
    assert reply.status == OK, reply
    assert reply.card.status == common_pb2.CARD_STATUS_BLOCKED
    assert reply.card.replaced_by == new_no and reply.card.balance == 0
    assert reply.card.lost_at  # the offline upload needs it still
    assert (reply.new_card.balance, reply.new_card.deposit) == (4000, 2000)
    assert reply.new_card.replaces == card.card_no and reply.new_card.key_version == 2

    again = await replace(channel, card.card_no, new_card_number())
    assert again.status == WRONG_STATE and "blocked" in again.detail
    assert (await release_loss(channel, card.card_no)).status == WRONG_STATE
    assert (await Terminal(channel, BUS).debit(card, 100)).status == NOT_ACTIVE
    new_card = await issue_sim(keys, new_no, kv=2)
    new_card.balance = 4000
    assert (await Terminal(channel, BUS, 100).debit(new_card, 150)).status == APPROVED

    listed = await deny_list(channel)
    assert [(e.card_number, e.reason) for e in listed.entries] == [
        (card.card_no, terminal_pb2.DENY_REASON_BLOCKED)
    ]
    transfers = await fetch(
        server.dsn,
        "SELECT kind, debit_account, credit_account, amount FROM postings "
        "WHERE kind = ANY($1) ORDER BY posting_id",
        [int(PostingKind.REPLACEMENT_TRANSFER), int(PostingKind.DEPOSIT_TRANSFER)],
    )
    assert [tuple(t) for t in transfers] == [
        (5, purse_account(int(card.card_no)), purse_account(int(new_no)), 4000),
        (6, deposit_account(int(card.card_no)), deposit_account(int(new_no)), 2000),
    ]
    history = await desk(channel).GetHistory(
        desk_pb2.GetHistoryRequest(card_number=new_no), metadata=STAFF
    )
    assert [(e.kind, e.amount) for e in history.entries] == [
        (desk_pb2.POSTING_KIND_PURCHASE, -150),
        (desk_pb2.POSTING_KIND_DEPOSIT_TRANSFER, 2000),
        (desk_pb2.POSTING_KIND_REPLACEMENT_TRANSFER, 4000),
    ]
    old_ops = [op for _, op, _, _ in await audit_trail(server.dsn, card.card_no)]
    assert old_ops == ["issue_card", "report_loss", "replace_card"]
    new_trail = await audit_trail(server.dsn, new_no)
    assert [(op, before) for _, op, before, _ in new_trail] == [("replace_card", None)]
    await assert_books_balance(server.dsn)


async def test_damaged_active_card_can_be_replaced(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 700)
    reply = await replace(channel, card.card_no, new_card_number(), desk_pb2.REPLACE_REASON_DAMAGED)
    assert reply.status == OK and reply.new_card.balance == 700
    await assert_books_balance(server.dsn)


async def issue_sim(keys: MemoryKeyStore, card_no: str, kv: int) -> SimulatedCard:
    version = keys.get("3104", kv)
    assert version is not None
    return SimulatedCard(card_no, version)


# -- cancellation -----------------------------------------------------------------------


async def test_cancel_readable_card_refunds_balance_and_deposit(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 2500)
    reply = await cancel(
        channel,
        card.card_no,
        readable=True,
        card_balance=2500,
        refund_channel=common_pb2.PAYMENT_CHANNEL_WECHAT_PAY,
    )
    assert reply.status == OK, reply
    assert reply.amount == 4500
    assert (reply.card.status, reply.card.balance, reply.card.deposit) == (
        common_pb2.CARD_STATUS_CLOSED,
        0,
        0,
    )
    cash = await fetch(
        server.dsn, "SELECT balance FROM account_balances WHERE code = 'cash:3104:wechat_pay'"
    )
    assert cash[0]["balance"] == 4500  # paid out: the issuer holds 4500 fen less
    again = await cancel(channel, card.card_no, readable=True, card_balance=0)
    assert again.status == WRONG_STATE and "closed" in again.detail
    assert (await report_loss(channel, card.card_no)).status == WRONG_STATE
    assert (await Terminal(channel, BUS).debit(card, 100)).status == NOT_ACTIVE
    ops = [op for _, op, _, _ in await audit_trail(server.dsn, card.card_no)]
    assert ops == ["issue_card", "cancel_card"]
    await assert_books_balance(server.dsn)


async def test_cancel_of_a_lost_card_at_the_desk_audits_its_deny_list_change(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    assert (await report_loss(channel, card.card_no)).status == OK
    reply = await cancel(channel, card.card_no, readable=True, card_balance=1000)
    assert reply.status == OK and not reply.card.deny_listed
    changes = await deny_list(channel, 1)
    assert [(e.card_number, e.listed) for e in changes.entries] == [(card.card_no, False)]
    trail = await audit_trail(server.dsn, card.card_no)
    assert trail[-1][1] == "cancel_card"
    assert trail[-1][3]["details"]["deny_list_version"] == changes.version == 2  # type: ignore[index]
    await assert_books_balance(server.dsn)


async def test_cancel_chip_showing_less_pays_the_chip_balance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 2500)
    reply = await cancel(channel, card.card_no, readable=True, card_balance=2000)
    assert reply.status == OK and reply.amount == 4000
    assert reply.card.balance == 500 and "500 fen stays" in reply.detail
    await assert_books_balance(server.dsn)


async def test_cancel_of_a_card_offline_rides_took_below_zero_keeps_only_what_it_owes(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Purse at -300: the deposit makes it whole and the other 1700 fen go to the holder."""
    from onecard.clients.gateway import Gateway, offline_record

    card = await funded(channel, keys, 100)  # deposit 2000
    card.balance = 500  # the chip shows more than the ledger, and pays a 400 ride with it
    ride = offline_record(card, 400, BUS, 78, now_bcd_text())
    (up,) = await Gateway(channel).upload_records([ride])
    assert up.results[0].balance_after == -300
    reply = await cancel(channel, card.card_no, readable=True, card_balance=card.balance)
    assert reply.status == OK, reply
    assert reply.amount == 1700 and "deposit 1700 fen" in reply.detail
    assert (reply.card.balance, reply.card.deposit) == (0, 0)
    moves = await fetch(
        server.dsn,
        "SELECT kind, debit_account, credit_account, amount FROM postings "
        "WHERE card_no = $1 AND kind IN ($2, $3, $4) ORDER BY posting_id",
        int(card.card_no),
        int(PostingKind.BALANCE_REFUND),
        int(PostingKind.DEPOSIT_OFFSET),
        int(PostingKind.DEPOSIT_REFUND),
    )
    deposit, purse = deposit_account(int(card.card_no)), purse_account(int(card.card_no))
    assert [tuple(m)[:3] for m in moves] == [
        (PostingKind.DEPOSIT_OFFSET, deposit, purse),
        (PostingKind.DEPOSIT_REFUND, deposit, moves[1]["credit_account"]),
    ]
    assert [m["amount"] for m in moves] == [300, 1700]
    cash = await fetch(
        server.dsn, "SELECT balance FROM account_balances WHERE code = 'cash:3104:cash'"
    )
    assert cash[0]["balance"] == -400  # took 2000 + 100, paid back 1700: the rides' 400
    await assert_books_balance(server.dsn)


async def test_cancel_unreadable_card_holds_the_refund_until_the_job_pays(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    from onecard.clients.gateway import Gateway, offline_record

    lifecycle = server.ledger.lifecycle
    lifecycle.settings = dc_replace(lifecycle.settings, refund_hold=3600)
    card = await funded(channel, keys, 3000)
    ride_time = now_bcd_text()
    record = offline_record(card, 400, BUS, 77, ride_time)  # tapped before the desk visit
    assert (await report_loss(channel, card.card_no)).status == OK
    reply = await cancel(channel, card.card_no, readable=False)
    assert reply.status == desk_pb2.DESK_STATUS_REFUND_PENDING, reply
    assert reply.card.status == common_pb2.CARD_STATUS_CLOSED
    assert reply.card.refund.state == desk_pb2.REFUND_STATE_PENDING
    assert reply.card.refund.due_at
    assert reply.card.balance == 3000 and reply.card.deposit == 2000  # still on the card

    assert await lifecycle.pay_due_refunds() == []  # the hold is not over
    uploaded = await Gateway(channel).upload_records([record])
    # Posted (the ride happened) with an exception: the card is closed.
    assert uploaded[0].results[0].outcome == upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert await lifecycle.pay_due_refunds(later) == [card.card_no]
    assert await lifecycle.pay_due_refunds(later) == []  # paid once
    view = await get_card(channel, card.card_no)
    assert view.refund.state == desk_pb2.REFUND_STATE_PAID
    assert (view.refund.balance_paid, view.refund.deposit_paid) == (2600, 2000)
    assert (view.balance, view.deposit) == (0, 0)
    listed = await deny_list(channel)
    assert [(e.card_number, e.reason) for e in listed.entries] == [
        (card.card_no, terminal_pb2.DENY_REASON_CLOSED)
    ]
    trail = await audit_trail(server.dsn, card.card_no)
    assert [(s, op) for s, op, _, _ in trail] == [
        ("tester", "issue_card"),
        ("tester", "report_loss"),
        ("tester", "cancel_card"),
        ("system:refund-job", "pay_refund"),
    ]
    await assert_books_balance(server.dsn)


async def test_replaced_card_cannot_be_cancelled(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 100)
    new_no = new_card_number()
    assert (
        await replace(channel, card.card_no, new_no, desk_pb2.REPLACE_REASON_DAMAGED)
    ).status == OK
    refused = await cancel(channel, card.card_no, readable=False)
    assert refused.status == WRONG_STATE and f"cancel {new_no} instead" in refused.detail


# -- disputes --------------------------------------------------------------------------


async def _purchase_posting(dsn: str, card_no: str) -> tuple[int, int]:
    rows = await fetch(
        dsn,
        "SELECT posting_id, amount FROM postings WHERE card_no = $1 AND kind = 1 "
        "ORDER BY posting_id DESC LIMIT 1",
        int(card_no),
    )
    return rows[0]["posting_id"], rows[0]["amount"]


async def _refund(
    channel: grpc.aio.Channel, card_no: str, posting_id: int, amount: int
) -> desk_pb2.DeskReply:
    reply: desk_pb2.DeskReply = await desk(channel).RefundPosting(
        desk_pb2.RefundPostingRequest(
            request_id=rid(),
            card_number=card_no,
            posting_id=posting_id,
            amount=amount,
            case_reference="CASE-2026-0042",
            reason="double charge at the gate",
        ),
        metadata=STAFF,
    )
    return reply


async def test_refund_disputed_posting_never_more_than_the_original(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS).debit(card, 300)).status == APPROVED
    posting_id, amount = await _purchase_posting(server.dsn, card.card_no)
    assert amount == 300
    part = await _refund(channel, card.card_no, posting_id, 100)
    assert part.status == OK and part.card.balance == 800 and part.posting_id
    over = await _refund(channel, card.card_no, posting_id, 250)
    assert over.status == desk_pb2.DESK_STATUS_REFUND_EXCEEDS
    assert "at most 200 fen" in over.detail
    rest = await _refund(channel, card.card_no, posting_id, 200)
    assert rest.status == OK and rest.card.balance == 1000
    assert (await _refund(channel, card.card_no, posting_id, 1)).status == (
        desk_pb2.DESK_STATUS_REFUND_EXCEEDS
    )
    load = await fetch(
        server.dsn, "SELECT posting_id FROM postings WHERE card_no = $1 AND kind = 2",
        int(card.card_no),
    )  # fmt: skip
    not_purchase = await _refund(channel, card.card_no, load[0]["posting_id"], 1)
    assert not_purchase.status == desk_pb2.DESK_STATUS_NOT_REFUNDABLE
    other = await funded(channel, keys, 100)
    not_theirs = await _refund(channel, other.card_no, posting_id, 1)
    assert not_theirs.status == desk_pb2.DESK_STATUS_NOT_REFUNDABLE

    refunds = await fetch(
        server.dsn,
        "SELECT original_posting, amount, case_reference, reason FROM dispute_refunds "
        "ORDER BY refund_posting",
    )
    assert [(r["original_posting"], r["amount"]) for r in refunds] == [
        (posting_id, 100),
        (posting_id, 200),
    ]
    assert refunds[0]["case_reference"] == "CASE-2026-0042"
    corrects = await fetch(
        server.dsn, "SELECT corrects, kind FROM postings WHERE corrects IS NOT NULL"
    )
    assert {(r["corrects"], r["kind"]) for r in corrects} == {(posting_id, 9)}
    trail = await audit_trail(server.dsn, card.card_no)
    assert [op for _, op, _, _ in trail][-2:] == ["refund_posting", "refund_posting"]
    assert trail[-1][3]["details"]["case_reference"] == "CASE-2026-0042"  # type: ignore[index]
    await assert_books_balance(server.dsn)


async def test_refund_of_a_replaced_cards_purchase_goes_to_its_successor(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS).debit(card, 300)).status == APPROVED
    posting_id, _ = await _purchase_posting(server.dsn, card.card_no)
    new_no = new_card_number()
    assert (
        await replace(channel, card.card_no, new_no, desk_pb2.REPLACE_REASON_DAMAGED)
    ).status == OK
    reply = await _refund(channel, card.card_no, posting_id, 300)
    assert reply.status == OK and reply.card.card_number == new_no
    assert reply.card.balance == 1000
    await assert_books_balance(server.dsn)


# -- reversal --------------------------------------------------------------------------


async def test_terminal_reverses_its_last_transaction_once(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    bus = Terminal(channel, BUS, 10)
    assert (await bus.debit(card, 300)).status == APPROVED  # seq 10
    stub = terminal_stub(channel)
    req = reverse_request(card.card_no, 300, 11, 10)
    first = await stub.Reverse(req)
    assert first.status == APPROVED and first.balance_after == 1000, first
    retry = await stub.Reverse(req)
    assert retry.status == common_pb2.TXN_STATUS_DUPLICATE
    assert (retry.original_status, retry.balance_after) == (APPROVED, 1000)
    twice = await stub.Reverse(reverse_request(card.card_no, 300, 12, 10))
    assert twice.status == common_pb2.TXN_STATUS_ALREADY_REVERSED
    changed = reverse_request(card.card_no, 299, 11, 10)
    assert (await stub.Reverse(changed)).status == common_pb2.TXN_STATUS_CONFLICT

    bus2 = Terminal(channel, "310400000002", 20)
    assert (await bus2.debit(card, 100)).status == APPROVED  # seq 20
    assert (await bus2.debit(card, 100)).status == APPROVED  # seq 21
    not_last = await stub.Reverse(reverse_request(card.card_no, 100, 22, 20, bus2.terminal_id))
    assert not_last.status == common_pb2.TXN_STATUS_NOT_REVERSIBLE
    assert "not the terminal's last" in not_last.detail
    wrong_amount = await stub.Reverse(reverse_request(card.card_no, 50, 23, 21, bus2.terminal_id))
    assert wrong_amount.status == common_pb2.TXN_STATUS_NOT_REVERSIBLE

    lifecycle = server.ledger.lifecycle
    lifecycle.settings = dc_replace(lifecycle.settings, reversal_window=0)
    too_late = await stub.Reverse(reverse_request(card.card_no, 100, 24, 21, bus2.terminal_id))
    assert too_late.status == common_pb2.TXN_STATUS_NOT_REVERSIBLE
    assert "window" in too_late.detail
    lifecycle.settings = dc_replace(lifecycle.settings, reversal_window=600)
    ok = await stub.Reverse(reverse_request(card.card_no, 100, 25, 21, bus2.terminal_id))
    assert ok.status == APPROVED and ok.balance_after == 900

    reversals = await fetch(
        server.dsn, "SELECT corrects, amount FROM postings WHERE kind = $1 ORDER BY posting_id",
        int(PostingKind.REVERSAL),
    )  # fmt: skip
    assert [r["amount"] for r in reversals] == [300, 100]
    ops = [(s, op) for s, op, _, _ in await audit_trail(server.dsn, card.card_no)]
    assert ops[-2:] == [(f"terminal:{BUS}", "reverse"), ("terminal:310400000002", "reverse")]
    await assert_books_balance(server.dsn)


async def test_a_refused_transaction_after_it_leaves_the_last_approved_one_reversible(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The last approved debit stays the terminal's last for a reversal (README: "its own
    last approved online debit or load"): the next passenger's card, refused as reported
    lost, moved nothing, and a cashier undoing the fare before it was told NOT_REVERSIBLE."""
    card = await funded(channel, keys, 1000)
    lost = await funded(channel, keys, 1000)
    assert (await report_loss(channel, lost.card_no)).status == OK
    bus = Terminal(channel, BUS, 7030)
    first = await bus.debit(card, 300)  # seq 7030
    assert first.status == APPROVED, first
    refused = await bus.debit(lost, 200)  # seq 7031
    assert refused.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE, refused
    stub = terminal_stub(channel)
    undo = await stub.Reverse(reverse_request(card.card_no, 300, bus.next_seq(), 7030))
    assert undo.status == APPROVED and undo.balance_after == 1000, undo
    # An approved one after it still makes it not the last.
    assert (await bus.debit(card, 100)).status == APPROVED  # seq 7033
    assert (await bus.debit(card, 100)).status == APPROVED  # seq 7034
    not_last = await stub.Reverse(reverse_request(card.card_no, 100, bus.next_seq(), 7033))
    assert not_last.status == common_pb2.TXN_STATUS_NOT_REVERSIBLE
    assert "seq 7034 came after it" in not_last.detail
    await assert_books_balance(server.dsn)


async def test_a_reversal_stored_before_its_time_left_the_fingerprint_still_matches_its_retry(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A retry's time no longer counts; one stored with the earlier fingerprint is still its own."""
    from onecard.ledger.lifecycle import Reversal
    from onecard.ledger.storage.reversal import _fingerprint_before_r2

    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS, 70).debit(card, 300)).status == APPROVED
    req = reverse_request(card.card_no, 300, 71, 70)
    assert (await terminal_stub(channel).Reverse(req)).status == APPROVED
    stored = Reversal(req.card_number, 300, BUS, 71, 70, req.date_time)
    await fetch(
        server.dsn,
        "UPDATE terminal_txns SET fingerprint = $3 WHERE terminal_id = $1 AND terminal_seq = $2",
        int(BUS), 71, _fingerprint_before_r2(stored),
    )  # fmt: skip
    retry = await terminal_stub(channel).Reverse(req)
    assert (retry.status, retry.original_status) == (common_pb2.TXN_STATUS_DUPLICATE, APPROVED)
    other_time = terminal_pb2.ReverseRequest()
    other_time.CopyFrom(req)
    other_time.date_time = "20261203120000"
    retry = await terminal_stub(channel).Reverse(other_time)
    assert retry.status == common_pb2.TXN_STATUS_CONFLICT  # the old form holds the time
    await assert_books_balance(server.dsn)


async def test_reverse_a_load(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    topup = Terminal(channel, TOPUP, 5)
    assert (await topup.load(card, 2000)).status == APPROVED  # seq 5
    stub = terminal_stub(channel)
    reply = await stub.Reverse(reverse_request(card.card_no, 2000, 6, 5, TOPUP))
    assert reply.status == APPROVED and reply.balance_after == 0
    cash = await fetch(
        server.dsn, "SELECT balance FROM account_balances WHERE code = 'cash:3104:cash'"
    )
    assert cash[0]["balance"] == -2000  # the deposit only
    await assert_books_balance(server.dsn)


async def test_reversal_after_replacement_follows_to_the_last_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The replacement emptied the old purse: what a reversal gives back goes where the money is."""
    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS, 10).debit(card, 300)).status == APPROVED  # seq 10
    b_no, c_no = new_card_number(), new_card_number()
    damaged = desk_pb2.REPLACE_REASON_DAMAGED
    assert (await replace(channel, card.card_no, b_no, damaged)).status == OK
    assert (await replace(channel, b_no, c_no, damaged)).status == OK

    reply = await terminal_stub(channel).Reverse(reverse_request(card.card_no, 300, 11, 10))
    assert reply.status == APPROVED, reply
    assert c_no in reply.detail
    balances = [(await get_card(channel, no)).balance for no in (card.card_no, b_no, c_no)]
    assert balances == [0, 0, 1000]
    # Reversed once: a second try is ALREADY_REVERSED, the holder's card keeps 1000.
    again = await terminal_stub(channel).Reverse(reverse_request(card.card_no, 300, 12, 10))
    assert again.status == common_pb2.TXN_STATUS_ALREADY_REVERSED
    assert (await get_card(channel, c_no)).balance == 1000

    history = await desk(channel).GetHistory(
        desk_pb2.GetHistoryRequest(card_number=c_no), metadata=STAFF
    )
    assert (history.entries[0].kind, history.entries[0].amount) == (
        desk_pb2.POSTING_KIND_REPLACED_CARD_FOLLOW,
        300,
    )
    trail = await audit_trail(server.dsn, c_no)
    assert trail[-1][1] == "reverse" and trail[-1][3]["details"]["credited_card"] == c_no  # type: ignore[index]
    await assert_books_balance(server.dsn)


async def test_reversal_of_a_load_after_replacement_takes_it_from_the_new_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    assert (await Terminal(channel, TOPUP, 5).load(card, 2000)).status == APPROVED  # seq 5
    new_no = new_card_number()
    assert (
        await replace(channel, card.card_no, new_no, desk_pb2.REPLACE_REASON_DAMAGED)
    ).status == OK
    reply = await terminal_stub(channel).Reverse(reverse_request(card.card_no, 2000, 6, 5, TOPUP))
    assert reply.status == APPROVED, reply
    assert [(await get_card(channel, no)).balance for no in (card.card_no, new_no)] == [0, 0]
    await assert_books_balance(server.dsn)


async def test_reversal_on_a_closed_card_is_left_to_the_desk(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A cancelled card's purse was paid out: money put back there would be stranded."""
    bus, bus2 = BUS, "310400000002"
    closed = await funded(channel, keys, 1000)
    assert (await Terminal(channel, bus, 10).debit(closed, 300)).status == APPROVED  # seq 10
    assert (await cancel(channel, closed.card_no, readable=True, card_balance=700)).status == OK
    # A chain that ends in a closed card: replaced, then the new card cancelled.
    replaced = await funded(channel, keys, 1000)
    assert (await Terminal(channel, bus2, 20).debit(replaced, 300)).status == APPROVED  # seq 20
    new_no = new_card_number()
    assert (
        await replace(channel, replaced.card_no, new_no, desk_pb2.REPLACE_REASON_DAMAGED)
    ).status == OK
    assert (await cancel(channel, new_no, readable=True, card_balance=700)).status == OK

    stub = terminal_stub(channel)
    for card_no, terminal, seq, closed_no in (
        (closed.card_no, bus, 10, closed.card_no),
        (replaced.card_no, bus2, 20, new_no),
    ):
        reply = await stub.Reverse(reverse_request(card_no, 300, seq + 1, seq, terminal))
        assert reply.status == common_pb2.TXN_STATUS_NOT_REVERSIBLE, reply
        assert f"card {closed_no}" in reply.detail and "is closed" in reply.detail
        assert "dispute refund" in reply.detail
    views = [await get_card(channel, no) for no in (closed.card_no, replaced.card_no, new_no)]
    assert [v.balance for v in views] == [0, 0, 0]
    reversals = await fetch(
        server.dsn, "SELECT 1 FROM postings WHERE kind = $1", int(PostingKind.REVERSAL)
    )
    assert reversals == []
    await assert_books_balance(server.dsn)


async def test_reverse_field_rules(server: RunningServer, channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await terminal_stub(channel).Reverse(reverse_request("3104000000000001", 100, 5, 9))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details is not None
    assert details.startswith("original_seq")


# -- replacement while the old card's offline records still arrive ------------------------


async def test_replacement_while_offline_records_of_the_old_card_arrive(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    from onecard.clients.gateway import Gateway, offline_record

    card = await funded(channel, keys, 3000)
    before_loss = [offline_record(card, 250, BUS, seq, now_bcd_text()) for seq in (501, 502)]
    assert (await report_loss(channel, card.card_no)).status == OK
    new_no = new_card_number()
    reply = await replace(channel, card.card_no, new_no)
    assert reply.status == OK and reply.new_card.balance == 3000  # the ledger's balance
    gateway = Gateway(channel)
    first = await gateway.upload_records(before_loss[:1])
    assert first[0].results[0].outcome == upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION
    second = await gateway.upload_records(before_loss[1:])
    assert second[0].results[0].outcome == upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION
    # Blocked (replaced), and nothing else: each chip reported the balance the
    # card had when replaced, less its records since, where the ledger holds 0
    # for it (every late record was a BALANCE_MISMATCH before, migration 0018).
    for uploaded in (first, second):
        assert list(uploaded[0].results[0].exceptions) == [upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED]

    old = await get_card(channel, card.card_no)
    new = await get_card(channel, new_no)
    assert old.balance == 0  # posted to the old card, then followed to the new one
    assert new.balance == 2500
    follows = await fetch(
        server.dsn,
        "SELECT card_no, debit_account, credit_account, amount FROM postings WHERE kind = $1",
        int(PostingKind.REPLACED_CARD_FOLLOW),
    )
    assert [(r["debit_account"], r["credit_account"], r["amount"]) for r in follows] == [
        (purse_account(int(new_no)), purse_account(int(card.card_no)), 250)
    ] * 2
    exceptions = await fetch(
        server.dsn, "SELECT DISTINCT card_no FROM finance_exceptions WHERE card_no = $1",
        int(card.card_no),
    )  # fmt: skip
    assert len(exceptions) == 1
    history = await desk(channel).GetHistory(
        desk_pb2.GetHistoryRequest(card_number=new_no), metadata=STAFF
    )
    assert [(e.kind, e.amount) for e in history.entries][:2] == [
        (desk_pb2.POSTING_KIND_REPLACED_CARD_FOLLOW, -250),
        (desk_pb2.POSTING_KIND_REPLACED_CARD_FOLLOW, -250),
    ]
    old_history = await desk(channel).GetHistory(
        desk_pb2.GetHistoryRequest(card_number=card.card_no), metadata=STAFF
    )
    assert sum(e.amount for e in old_history.entries if e.account == "purse") == 0
    await assert_books_balance(server.dsn)


# -- the held-refund job running inside the server ------------------------------------------


@pytest.fixture
async def quick_refunds(
    db_dsn: str, keys: MemoryKeyStore, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    from onecard.ledger.lifecycle import DeskSettings

    running = await start_test_server(
        db_dsn, tmp_path, keys, desk=DeskSettings(refund_hold=0, refund_job_interval=0.05)
    )
    try:
        yield running
    finally:
        await running.stop()


async def _paid_by_the_job(channel: grpc.aio.Channel, card_no: str) -> desk_pb2.Card:
    """The card once the server's job has paid its held refund (5 s at most)."""
    import asyncio

    for _ in range(100):
        view = await get_card(channel, card_no)
        if view.refund.state == desk_pb2.REFUND_STATE_PAID:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"the held refund was not paid: {view.refund}")


async def test_refund_job_in_the_server_pays_after_the_hold(
    quick_refunds: RunningServer, keys: MemoryKeyStore
) -> None:

    running = quick_refunds
    async with grpc.aio.insecure_channel(running.address) as channel:
        card = await funded(channel, keys, 1200)
        reply = await cancel(channel, card.card_no, readable=False)
        assert reply.status == desk_pb2.DESK_STATUS_REFUND_PENDING
        view = await _paid_by_the_job(channel, card.card_no)
        assert (view.refund.balance_paid, view.refund.deposit_paid) == (1200, 2000)
    await assert_books_balance(running.dsn)


async def test_refund_job_goes_on_after_a_round_fails(
    quick_refunds: RunningServer, keys: MemoryKeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A round that failed with anything but a database error ended the job for good,
    without a log line, and every later held refund of the process waited unpaid."""

    running = quick_refunds
    lifecycle = running.ledger.lifecycle
    real = lifecycle.pay_due_refunds
    failures = 0

    async def fails_once(as_of: dt.datetime | None = None) -> list[str]:
        nonlocal failures
        if not failures:
            failures += 1
            raise RuntimeError("a round that fails")
        return await real(as_of)

    lifecycle.pay_due_refunds = fails_once  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(running.address) as channel:
        card = await funded(channel, keys, 700)
        reply = await cancel(channel, card.card_no, readable=False)
        assert reply.status == desk_pb2.DESK_STATUS_REFUND_PENDING
        await _paid_by_the_job(channel, card.card_no)
    assert failures == 1
    assert "held-refund job: a round failed" in caplog.text
    await assert_books_balance(running.dsn)


async def test_a_replaced_cards_late_record_after_a_lost_one_is_a_balance_mismatch(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The comparison still catches what it is for: a record lost on its way
    leaves the next one's chip balance below what the ledger expected."""
    from onecard.clients.gateway import Gateway, offline_record

    card = await funded(channel, keys, 3000)
    lost, arrives = [offline_record(card, 250, BUS, seq, now_bcd_text()) for seq in (601, 602)]
    assert (await report_loss(channel, card.card_no)).status == OK
    assert (await replace(channel, card.card_no, new_card_number())).status == OK
    (reply,) = await Gateway(channel).upload_records([arrives])
    assert list(reply.results[0].exceptions) == [
        upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED,
        upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH,
    ]  # no counter gap: the card's first offline record
    details = await fetch(
        server.dsn,
        "SELECT detail FROM finance_exceptions WHERE card_no = $1 AND kind = $2",
        int(card.card_no),
        int(upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH),
    )
    assert [r["detail"] for r in details] == [
        "card reported 2750 fen before, ledger held 0 and +3000 moved without the chip "
        "(its replacement, late records following to the card that replaced it): "
        "3000 expected"
    ]
    # The lost record turns up: the chip said 3000, the ledger now expects 2750.
    (late,) = await Gateway(channel).upload_records([lost])
    assert upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH in late.results[0].exceptions
    await assert_books_balance(server.dsn)
