"""DeskService: the service-desk calls, mapped onto the ledger. No business rules."""

from __future__ import annotations

from typing import Any

import grpc

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.engine import Ledger
from onecard.ledger.model import CardIssue, CardView, DeskResult
from onecard.ledger.validation import check_digits, parse_channel
from onecard.server.errors import guarded
from onecard.v1 import desk_pb2, desk_pb2_grpc

STAFF_METADATA_KEY = "x-onecard-operator"


async def staff_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Every desk action is attributed: refuse a call that does not say who makes it."""
    for key, value in context.invocation_metadata() or ():
        if key == STAFF_METADATA_KEY and isinstance(value, str) and 0 < len(value) <= 64:
            return value
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"desk calls must carry the staff id in metadata key {STAFF_METADATA_KEY!r}",
    )
    raise AssertionError("unreachable")


def card_message(view: CardView) -> desk_pb2.Card:
    return desk_pb2.Card(
        card_number=view.card_no,
        issuer=view.issuer,
        key_version=view.key_version,
        product=view.product,
        status=int(view.status),  # type: ignore[arg-type]
        balance=view.balance,
        deposit=view.deposit,
        online_counter=view.online_counter,
        offline_counter=view.offline_counter,
        issued_at=view.issued_at,
        last_used_at=view.last_used_at,
    )


def _reply(res: DeskResult) -> desk_pb2.IssueCardReply:
    reply = desk_pb2.IssueCardReply(status=int(res.status), detail=res.detail)  # type: ignore[arg-type]
    if res.card is not None:
        reply.card.CopyFrom(card_message(res.card))
    return reply


class DeskServicer(desk_pb2_grpc.DeskServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def IssueCard(
        self, request: desk_pb2.IssueCardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> desk_pb2.IssueCardReply:
        staff = await staff_id(context)

        async def call() -> desk_pb2.IssueCardReply:
            issue = CardIssue(
                request_id=request.request_id,
                staff_id=staff,
                card_no=request.card_number,
                product=request.product,
                deposit=request.deposit,
                key_version=request.key_version,
                channel=parse_channel(request.payment_channel),
            )
            return _reply(await self.ledger.issue_card(issue))

        return await guarded(context, call)

    async def GetCard(
        self, request: desk_pb2.GetCardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> desk_pb2.Card:
        await staff_id(context)

        async def call() -> desk_pb2.Card:
            check_digits(request.card_number, 16, "card_number")
            (view,) = await self.ledger.lookup_cards([request.card_number])
            if view is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"card {request.card_number} is not issued"
                )
            assert view is not None
            return card_message(view)

        return await guarded(context, call)


__all__ = ["STAFF_METADATA_KEY", "DeskServicer", "FieldError"]
