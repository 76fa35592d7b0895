"""DeskService: the service-desk calls, mapped onto the ledger. No business rules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.engine import Ledger
from onecard.ledger.lifecycle import (
    Cancellation,
    CardAction,
    DeskOutcome,
    DisputeRefund,
    HistoryQuery,
    Replacement,
    ReplaceReason,
)
from onecard.ledger.model import CardIssue, CardView, DeskResult
from onecard.ledger.pii import HolderDetails
from onecard.ledger.validation import check_digits, parse_channel
from onecard.server.errors import guarded
from onecard.server.staff import STAFF_METADATA_KEY, staff_id
from onecard.v1 import desk_pb2, desk_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def card_message(view: CardView) -> desk_pb2.Card:
    msg = desk_pb2.Card(
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
        lost_at=view.lost_at,
        replaced_by=view.replaced_by,
        replaces=view.replaces,
        deny_listed=view.deny_listed,
    )
    if view.holder_name or view.holder_id_number or view.holder_phone:
        msg.holder.CopyFrom(
            desk_pb2.Holder(
                name=view.holder_name, id_number=view.holder_id_number, phone=view.holder_phone
            )
        )
    if view.refund_state:
        msg.refund.CopyFrom(
            desk_pb2.HeldRefund(
                state=view.refund_state,  # type: ignore[arg-type]
                due_at=view.refund_due_at,
                paid_at=view.refund_paid_at,
                channel=view.refund_channel,  # type: ignore[arg-type]
                balance_paid=view.refund_balance_paid,
                deposit_paid=view.refund_deposit_paid,
            )
        )
    return msg


def _reply(res: DeskResult) -> desk_pb2.IssueCardReply:
    reply = desk_pb2.IssueCardReply(status=int(res.status), detail=res.detail)  # type: ignore[arg-type]
    if res.card is not None:
        reply.card.CopyFrom(card_message(res.card))
    return reply


def desk_reply(res: DeskOutcome) -> desk_pb2.DeskReply:
    reply = desk_pb2.DeskReply(
        status=int(res.status),  # type: ignore[arg-type]
        detail=res.detail,
        amount=res.amount,
        posting_id=res.posting_id,
    )
    if res.card is not None:
        reply.card.CopyFrom(card_message(res.card))
    if res.new_card is not None:
        reply.new_card.CopyFrom(card_message(res.new_card))
    return reply


def _replace_reason(value: int) -> ReplaceReason:
    try:
        return ReplaceReason(value)
    except ValueError:
        raise FieldError("reason", "must be LOST or DAMAGED") from None


class DeskServicer(desk_pb2_grpc.DeskServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def _action(
        self, context: Context, call: Callable[[str], Awaitable[DeskOutcome]]
    ) -> desk_pb2.DeskReply:
        staff = await staff_id(context)

        async def run() -> desk_pb2.DeskReply:
            return desk_reply(await call(staff))

        return await guarded(context, run)

    async def IssueCard(
        self, request: desk_pb2.IssueCardRequest, context: Context
    ) -> desk_pb2.IssueCardReply:
        staff = await staff_id(context)

        async def call() -> desk_pb2.IssueCardReply:
            holder = self.ledger.lifecycle.protect_holder(
                HolderDetails(request.holder.name, request.holder.id_number, request.holder.phone)
            )
            issue = CardIssue(
                request_id=request.request_id,
                staff_id=staff,
                card_no=request.card_number,
                product=request.product,
                deposit=request.deposit,
                key_version=request.key_version,
                channel=parse_channel(request.payment_channel),
                holder=holder,
            )
            return _reply(await self.ledger.issue_card(issue))

        return await guarded(context, call)

    async def GetCard(self, request: desk_pb2.GetCardRequest, context: Context) -> desk_pb2.Card:
        await staff_id(context)

        async def call() -> desk_pb2.Card:
            check_digits(request.card_number, 16, "card_number")
            view = await self.ledger.lifecycle.enquire(request.card_number)
            if view is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"card {request.card_number} is not issued"
                )
            assert view is not None
            return card_message(view)

        return await guarded(context, call)

    async def GetHistory(
        self, request: desk_pb2.GetHistoryRequest, context: Context
    ) -> desk_pb2.GetHistoryReply:
        await staff_id(context)

        async def call() -> desk_pb2.GetHistoryReply:
            page = await self.ledger.lifecycle.history(
                HistoryQuery(
                    request.card_number,
                    request.from_time,
                    request.to_time,
                    request.page_size,
                    request.page_token,
                )
            )
            if page is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"card {request.card_number} is not issued"
                )
            assert page is not None
            return desk_pb2.GetHistoryReply(
                entries=[
                    desk_pb2.HistoryEntry(
                        posting_id=e.posting_id,
                        posted_at=e.posted_at,
                        kind=e.kind,  # type: ignore[arg-type]
                        account=e.account,
                        amount=e.amount,
                        counterparty=e.counterparty,
                        terminal_id=e.terminal_id,
                        terminal_seq=e.terminal_seq,
                        corrects=e.corrects,
                    )
                    for e in page.entries
                ],
                next_page_token=page.next_page_token,
            )

        return await guarded(context, call)

    async def ReportLoss(
        self, request: desk_pb2.CardActionRequest, context: Context
    ) -> desk_pb2.DeskReply:
        return await self._action(
            context,
            lambda staff: self.ledger.lifecycle.report_loss(
                CardAction(request.request_id, staff, request.card_number, request.holder_id_number)
            ),
        )

    async def ReleaseLoss(
        self, request: desk_pb2.CardActionRequest, context: Context
    ) -> desk_pb2.DeskReply:
        return await self._action(
            context,
            lambda staff: self.ledger.lifecycle.release_loss(
                CardAction(request.request_id, staff, request.card_number, request.holder_id_number)
            ),
        )

    async def ReplaceCard(
        self, request: desk_pb2.ReplaceCardRequest, context: Context
    ) -> desk_pb2.DeskReply:
        async def call(staff: str) -> DeskOutcome:
            return await self.ledger.lifecycle.replace_card(
                Replacement(
                    request.request_id,
                    staff,
                    request.card_number,
                    request.new_card_number,
                    request.key_version,
                    _replace_reason(request.reason),
                    request.holder_id_number,
                )
            )

        return await self._action(context, call)

    async def CancelCard(
        self, request: desk_pb2.CancelCardRequest, context: Context
    ) -> desk_pb2.DeskReply:
        async def call(staff: str) -> DeskOutcome:
            return await self.ledger.lifecycle.cancel_card(
                Cancellation(
                    request.request_id,
                    staff,
                    request.card_number,
                    parse_channel(request.refund_channel, "refund_channel"),
                    request.card_readable,
                    request.card_balance,
                    request.holder_id_number,
                )
            )

        return await self._action(context, call)

    async def RefundPosting(
        self, request: desk_pb2.RefundPostingRequest, context: Context
    ) -> desk_pb2.DeskReply:
        async def call(staff: str) -> DeskOutcome:
            return await self.ledger.lifecycle.refund_posting(
                DisputeRefund(
                    request.request_id,
                    staff,
                    request.card_number,
                    request.posting_id,
                    request.amount,
                    request.case_reference,
                    request.reason,
                )
            )

        return await self._action(context, call)


__all__ = ["STAFF_METADATA_KEY", "DeskServicer", "FieldError"]
