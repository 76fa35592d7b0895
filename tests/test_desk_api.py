"""IssueCard and GetCard over gRPC: deposits posted, idempotency, attribution, refusals."""

from __future__ import annotations

import uuid

import grpc
import pytest

from onecard.ledger.accounts import deposit_account
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc
from tests.support import STAFF, assert_books_balance, fetch, new_card_number


def issue_request(**over: object) -> desk_pb2.IssueCardRequest:
    fields: dict[str, object] = dict(
        request_id=str(uuid.uuid4()),
        card_number=new_card_number(),
        product="student",
        deposit=2000,
        key_version=2,
        payment_channel=common_pb2.PAYMENT_CHANNEL_WECHAT_PAY,
    )
    fields.update(over)
    return desk_pb2.IssueCardRequest(**fields)  # type: ignore[arg-type]


async def test_issue_card_posts_deposit_and_audits(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    req = issue_request()
    reply = await stub.IssueCard(req, metadata=STAFF)
    assert reply.status == desk_pb2.DESK_STATUS_OK
    assert reply.card.deposit == 2000
    assert reply.card.balance == 0
    assert reply.card.status == common_pb2.CARD_STATUS_ACTIVE
    card = await stub.GetCard(desk_pb2.GetCardRequest(card_number=req.card_number), metadata=STAFF)
    assert (card.product, card.key_version, card.issuer) == ("student", 2, "3104")
    postings = await fetch(
        server.dsn,
        "SELECT amount, credit_account FROM postings WHERE card_no = $1",
        int(req.card_number),
    )
    assert [(p["amount"], p["credit_account"]) for p in postings] == [
        (2000, deposit_account(int(req.card_number)))
    ]
    audit = await fetch(
        server.dsn,
        "SELECT staff_id, operation, after FROM audit_log WHERE card_no = $1",
        int(req.card_number),
    )
    assert [(a["staff_id"], a["operation"]) for a in audit] == [("tester", "issue_card")]
    await assert_books_balance(server.dsn)


async def test_issue_retry_returns_first_outcome(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    req = issue_request()
    first = await stub.IssueCard(req, metadata=STAFF)
    again = await stub.IssueCard(req, metadata=STAFF)
    assert first == again
    changed = issue_request(request_id=req.request_id, card_number=new_card_number())
    conflict = await stub.IssueCard(changed, metadata=STAFF)
    assert conflict.status == desk_pb2.DESK_STATUS_CONFLICT
    other = issue_request(card_number=req.card_number)
    exists = await stub.IssueCard(other, metadata=STAFF)
    assert exists.status == desk_pb2.DESK_STATUS_CARD_EXISTS
    deposits = await fetch(
        server.dsn, "SELECT count(*) AS n FROM postings WHERE card_no = $1", int(req.card_number)
    )
    assert deposits[0]["n"] == 1
    await assert_books_balance(server.dsn)


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"card_number": "12"}, "card_number", "16 decimal digits"),
        ({"card_number": "9999000000000001"}, "card_number", "issuer code 9999"),
        ({"product": "platinum"}, "product", "no such card product (got 8 characters)"),
        ({"deposit": 500}, "deposit", "takes a deposit of 2000 fen"),
        ({"key_version": 7}, "key_version", "unknown key version 7"),
        ({"payment_channel": 0}, "payment_channel", "must name a payment channel"),
        ({"request_id": ""}, "request_id", "1 to 64"),
    ],
)
async def test_issue_refusals_name_the_field(
    server: RunningServer,
    channel: grpc.aio.Channel,
    change: dict[str, object],
    field: str,
    rule: str,
) -> None:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    req = issue_request(**change)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IssueCard(req, metadata=STAFF)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details is not None
    assert details.startswith(field), details
    assert rule in details
    assert await fetch(server.dsn, "SELECT 1 FROM cards") == []
    assert await fetch(server.dsn, "SELECT 1 FROM desk_requests") == []


async def test_desk_calls_must_say_who(server: RunningServer, channel: grpc.aio.Channel) -> None:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IssueCard(issue_request())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await fetch(server.dsn, "SELECT 1 FROM cards") == []


async def test_get_unknown_card_is_not_found(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCard(desk_pb2.GetCardRequest(card_number="3104000000000000"), metadata=STAFF)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_staff_id_past_its_limit_is_refused_naming_the_limit(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    """It was refused as if none had been sent, its caller told to send one (found by review)."""
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetCard(
            desk_pb2.GetCardRequest(card_number="3104000000000001"),
            metadata=(("x-onecard-operator", "clerk." + "x" * 59),),  # 65 characters
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == (
        "staff id in metadata key 'x-onecard-operator' must be 1 to 64 printable characters, got 65"
    )
