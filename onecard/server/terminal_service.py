"""TerminalService: protobuf in, ledger types out, and back. No business rules."""

from __future__ import annotations

from typing import Any

import grpc

from onecard.ledger.engine import Ledger
from onecard.ledger.lifecycle import Reversal
from onecard.ledger.model import Debit, Load, TxnResult
from onecard.ledger.validation import check_debit, check_load, parse_channel
from onecard.server.errors import guarded
from onecard.server.staff import given_staff_id
from onecard.v1 import terminal_pb2, terminal_pb2_grpc


def _status_fields(res: TxnResult) -> dict[str, object]:
    return {
        "status": int(res.status),
        "balance_after": res.balance_after,
        "original_status": int(res.original_status) if res.original_status else 0,
        "detail": res.detail,
    }


class TerminalServicer(terminal_pb2_grpc.TerminalServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def Debit(
        self, request: terminal_pb2.DebitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> terminal_pb2.DebitReply:
        async def call() -> terminal_pb2.DebitReply:
            debit = Debit(
                card_no=request.card_number,
                amount=request.amount,
                txn_type=request.transaction_type,
                terminal_id=request.terminal_id,
                terminal_seq=request.terminal_seq,
                date_time=request.date_time,
                key_version=request.key_version,
                tac=request.tac,
            )
            check_debit(debit, self.ledger.keys, self.ledger.limits)
            res = await self.ledger.submit_debit(debit)
            return terminal_pb2.DebitReply(**_status_fields(res))  # type: ignore[arg-type]

        return await guarded(context, call)

    async def Load(
        self, request: terminal_pb2.LoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> terminal_pb2.LoadReply:
        async def call() -> terminal_pb2.LoadReply:
            load = Load(
                card_no=request.card_number,
                amount=request.amount,
                txn_type=request.transaction_type,
                terminal_id=request.terminal_id,
                terminal_seq=request.terminal_seq,
                date_time=request.date_time,
                key_version=request.key_version,
                card_random=request.card_random,
                online_counter=request.online_counter,
                old_balance=request.old_balance,
                mac1=request.mac1,
                channel=parse_channel(request.payment_channel),
            )
            check_load(load, self.ledger.keys, self.ledger.limits)
            res = await self.ledger.submit_load(load)
            return terminal_pb2.LoadReply(mac2=res.mac2, **_status_fields(res))  # type: ignore[arg-type]

        return await guarded(context, call)

    async def Reverse(
        self, request: terminal_pb2.ReverseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> terminal_pb2.ReverseReply:
        async def call() -> terminal_pb2.ReverseReply:
            reversal = Reversal(
                card_no=request.card_number,
                amount=request.amount,
                terminal_id=request.terminal_id,
                terminal_seq=request.terminal_seq,
                original_seq=request.original_seq,
                date_time=request.date_time,
                staff=await given_staff_id(context) or "",
            )
            res = await self.ledger.lifecycle.reverse(reversal)
            return terminal_pb2.ReverseReply(**_status_fields(res))  # type: ignore[arg-type]

        return await guarded(context, call)

    async def GetDenyList(
        self,
        request: terminal_pb2.GetDenyListRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> terminal_pb2.GetDenyListReply:
        async def call() -> terminal_pb2.GetDenyListReply:
            page = await self.ledger.lifecycle.deny_list(
                request.since_version, request.page_size, request.page_token
            )
            return terminal_pb2.GetDenyListReply(
                version=page.version,
                full=page.full,
                next_page_token=page.next_page.token() if page.next_page else "",
                entries=[
                    terminal_pb2.DenyListEntry(
                        card_number=e.card_no,
                        listed=e.listed,
                        reason=int(e.reason),  # type: ignore[arg-type]
                        version=e.version,
                    )
                    for e in page.entries
                ],
            )

        return await guarded(context, call)
