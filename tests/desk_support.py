"""Helpers for the desk lifecycle tests: stubs, funded cards, audit and PII checks."""

from __future__ import annotations

import uuid
from typing import Any

import grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.keys import MemoryKeyStore
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc, terminal_pb2, terminal_pb2_grpc
from tests.support import STAFF, fetch, issue

BUS = "310400000001"
TOPUP = "310400000009"
OK = desk_pb2.DESK_STATUS_OK
WRONG_STATE = desk_pb2.DESK_STATUS_WRONG_STATE

HOLDER = desk_pb2.Holder(name="张三丰", id_number="320102199001011234", phone="13812345678")
CLEAR_PII = ("张三丰", "320102199001011234", "13812345678", "三丰")


def rid() -> str:
    return str(uuid.uuid4())


def desk(channel: grpc.aio.Channel) -> desk_pb2_grpc.DeskServiceStub:
    return desk_pb2_grpc.DeskServiceStub(channel)


def terminal_stub(channel: grpc.aio.Channel) -> terminal_pb2_grpc.TerminalServiceStub:
    return terminal_pb2_grpc.TerminalServiceStub(channel)


async def funded(
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    amount: int = 5000,
    *,
    product: str = "standard",
    deposit: int = 2000,
) -> SimulatedCard:
    card = await issue(channel, keys, product=product, deposit=deposit)
    reply = await Terminal(channel, TOPUP, 1000 + int(card.card_no[-6:]) * 10).load(card, amount)
    assert reply.status == common_pb2.TXN_STATUS_APPROVED, reply
    return card


async def issue_at_desk(
    channel: grpc.aio.Channel, card_no: str, holder: desk_pb2.Holder | None = None
) -> None:
    """A standard card (deposit 20.00, key version 1) issued at the desk, for ``holder`` if any."""
    reply = await desk(channel).IssueCard(
        desk_pb2.IssueCardRequest(
            request_id=rid(),
            card_number=card_no,
            product="standard",
            deposit=2000,
            key_version=1,
            payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
            holder=holder,
        ),
        metadata=STAFF,
    )
    assert reply.status == OK, reply.detail


async def get_card(channel: grpc.aio.Channel, card_no: str) -> desk_pb2.Card:
    card: desk_pb2.Card = await desk(channel).GetCard(
        desk_pb2.GetCardRequest(card_number=card_no), metadata=STAFF
    )
    return card


async def report_loss(
    channel: grpc.aio.Channel, card_no: str, request_id: str | None = None, id_number: str = ""
) -> desk_pb2.DeskReply:
    reply: desk_pb2.DeskReply = await desk(channel).ReportLoss(
        desk_pb2.CardActionRequest(
            request_id=request_id or rid(), card_number=card_no, holder_id_number=id_number
        ),
        metadata=STAFF,
    )
    return reply


async def release_loss(
    channel: grpc.aio.Channel, card_no: str, id_number: str = ""
) -> desk_pb2.DeskReply:
    reply: desk_pb2.DeskReply = await desk(channel).ReleaseLoss(
        desk_pb2.CardActionRequest(
            request_id=rid(), card_number=card_no, holder_id_number=id_number
        ),
        metadata=STAFF,
    )
    return reply


async def replace(
    channel: grpc.aio.Channel,
    card_no: str,
    new_card_no: str,
    reason: desk_pb2.ReplaceReason = desk_pb2.REPLACE_REASON_LOST,
    kv: int = 1,
) -> desk_pb2.DeskReply:
    reply: desk_pb2.DeskReply = await desk(channel).ReplaceCard(
        desk_pb2.ReplaceCardRequest(
            request_id=rid(),
            card_number=card_no,
            new_card_number=new_card_no,
            key_version=kv,
            reason=reason,
        ),
        metadata=STAFF,
    )
    return reply


async def cancel(
    channel: grpc.aio.Channel,
    card_no: str,
    *,
    readable: bool,
    card_balance: int = 0,
    refund_channel: common_pb2.PaymentChannel = common_pb2.PAYMENT_CHANNEL_CASH,
) -> desk_pb2.DeskReply:
    reply: desk_pb2.DeskReply = await desk(channel).CancelCard(
        desk_pb2.CancelCardRequest(
            request_id=rid(),
            card_number=card_no,
            refund_channel=refund_channel,
            card_readable=readable,
            card_balance=card_balance,
        ),
        metadata=STAFF,
    )
    return reply


async def deny_list(channel: grpc.aio.Channel, since: int = 0) -> terminal_pb2.GetDenyListReply:
    reply: terminal_pb2.GetDenyListReply = await terminal_stub(channel).GetDenyList(
        terminal_pb2.GetDenyListRequest(since_version=since)
    )
    return reply


#: (staff, operation, state before, state after) of one audited desk or terminal action.
AuditEntry = tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]


async def audit_trail(dsn: str, card_no: str) -> list[AuditEntry]:
    import json

    rows = await fetch(
        dsn,
        "SELECT staff_id, operation, before, after FROM audit_log WHERE card_no = $1 "
        "ORDER BY audit_id",
        int(card_no),
    )
    return [
        (
            r["staff_id"],
            r["operation"],
            json.loads(r["before"]) if r["before"] else None,
            json.loads(r["after"]) if r["after"] else None,
        )
        for r in rows
    ]


async def assert_no_clear_pii(dsn: str) -> None:
    """No table holds a holder's clear name, ID number or phone, whatever its column."""
    tables = [
        r["table_name"]
        for r in await fetch(
            dsn,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
    ]
    for table in tables:
        rows = await fetch(dsn, f'SELECT t::text AS row FROM "{table}" t')
        for r in rows:
            for clear in CLEAR_PII:
                assert clear not in r["row"], f"clear personal data in table {table}"


def reverse_request(
    card_no: str, amount: int, seq: int, original: int, terminal: str = BUS
) -> terminal_pb2.ReverseRequest:
    return terminal_pb2.ReverseRequest(
        card_number=card_no,
        amount=amount,
        terminal_id=terminal,
        terminal_seq=seq,
        original_seq=original,
        date_time=now_bcd_text(),
    )
