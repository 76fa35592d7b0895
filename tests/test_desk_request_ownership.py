"""A request id belongs to the staff member who first used it.

A retry answers the first outcome; that is only true for the clerk who made
the first call. Another clerk sending the same id (a copied CLI line, a shared
script) must not be told "done" for an action the audit log gives to someone
else, nor do anything: the answer is CONFLICT.
"""

from __future__ import annotations

import grpc

from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2
from tests.desk_support import OK, audit_trail, desk, funded, get_card, rid
from tests.support import assert_books_balance, fetch, new_card_number

CLERK_A = (("x-onecard-operator", "clerk-a"),)
CLERK_B = (("x-onecard-operator", "clerk-b"),)


async def test_another_clerks_request_id_is_a_conflict_and_does_nothing(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    stub = desk(channel)
    req = desk_pb2.CardActionRequest(request_id=rid(), card_number=card.card_no)
    first = await stub.ReportLoss(req, metadata=CLERK_A)
    assert first.status == OK

    foreign = await stub.ReportLoss(req, metadata=CLERK_B)
    assert foreign.status == desk_pb2.DESK_STATUS_CONFLICT
    assert "another staff member" in foreign.detail and "new request id" in foreign.detail
    assert "clerk-a" not in foreign.detail
    # The same id for another flow by clerk B: refused the same way, card untouched.
    release = await stub.ReleaseLoss(req, metadata=CLERK_B)
    assert release.status == desk_pb2.DESK_STATUS_CONFLICT
    assert (await get_card(channel, card.card_no)).status == common_pb2.CARD_STATUS_LOST

    # Clerk A's own retry still gets the first outcome.
    assert await stub.ReportLoss(req, metadata=CLERK_A) == first
    trail = await audit_trail(server.dsn, card.card_no)
    assert [(s, op) for s, op, _, _ in trail if op != "issue_card"] == [("clerk-a", "report_loss")]
    await assert_books_balance(server.dsn)


async def test_another_clerks_issue_request_id_is_a_conflict(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    stub = desk(channel)
    req = desk_pb2.IssueCardRequest(
        request_id=rid(),
        card_number=new_card_number(),
        product="standard",
        deposit=2000,
        key_version=1,
        payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
    )
    first = await stub.IssueCard(req, metadata=CLERK_A)
    assert first.status == OK
    foreign = await stub.IssueCard(req, metadata=CLERK_B)
    assert foreign.status == desk_pb2.DESK_STATUS_CONFLICT
    assert "another staff member" in foreign.detail
    assert not foreign.HasField("card")
    assert await stub.IssueCard(req, metadata=CLERK_A) == first

    deposits = await fetch(
        server.dsn, "SELECT count(*) AS n FROM postings WHERE card_no = $1", int(req.card_number)
    )
    assert deposits[0]["n"] == 1
    trail = await audit_trail(server.dsn, req.card_number)
    assert [(s, op) for s, op, _, _ in trail] == [("clerk-a", "issue_card")]
    await assert_books_balance(server.dsn)
