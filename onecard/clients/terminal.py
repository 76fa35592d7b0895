"""Terminal SDK: what a gateway or validator calls, with the card playing its part.

Keeps the terminal's sequence number, builds requests from a SimulatedCard,
and completes a load on the card only after the ledger's MAC2 verifies. Give
it a channel from ``onecard.clients.channel.terminal_channel`` and gRPC
resends what the ledger could not take; a resend of a call the ledger had
already approved (the reply was lost) comes back DUPLICATE with the first
outcome, and counts as that approval, not as a refusal.
"""

from __future__ import annotations

import datetime as dt
import itertools

import grpc

from onecard.clients.card import PendingLoad, SimulatedCard
from onecard.ledger.crypto.suites import TYPE_LOAD, TYPE_PURCHASE
from onecard.v1 import common_pb2, terminal_pb2, terminal_pb2_grpc

CHINA_TIME = dt.timezone(dt.timedelta(hours=8))


def now_bcd_text() -> str:
    return dt.datetime.now(CHINA_TIME).strftime("%Y%m%d%H%M%S")


def approved(reply: terminal_pb2.DebitReply | terminal_pb2.LoadReply) -> bool:
    """The ledger approved this transaction, now or when it was first sent."""
    return reply.status == common_pb2.TXN_STATUS_APPROVED or (
        reply.status == common_pb2.TXN_STATUS_DUPLICATE
        and reply.original_status == common_pb2.TXN_STATUS_APPROVED
    )


class Terminal:
    def __init__(self, channel: grpc.aio.Channel, terminal_id: str, first_seq: int = 1) -> None:
        self.stub = terminal_pb2_grpc.TerminalServiceStub(channel)
        self.terminal_id = terminal_id
        self._seq = itertools.count(first_seq)

    def next_seq(self) -> int:
        return next(self._seq)

    def debit_request(
        self,
        card: SimulatedCard,
        amount: int,
        *,
        seq: int | None = None,
        date_time: str | None = None,
    ) -> terminal_pb2.DebitRequest:
        """Signs on the card (which debits its own purse) and builds the request."""
        seq = self.next_seq() if seq is None else seq
        when = date_time or now_bcd_text()
        tac = card.purchase(amount, self.terminal_id, seq, when)
        return terminal_pb2.DebitRequest(
            card_number=card.card_no,
            amount=amount,
            transaction_type=TYPE_PURCHASE,
            terminal_id=self.terminal_id,
            terminal_seq=seq,
            date_time=when,
            key_version=card.key_version,
            tac=tac,
        )

    async def debit(self, card: SimulatedCard, amount: int) -> terminal_pb2.DebitReply:
        before = card.balance
        reply: terminal_pb2.DebitReply = await self.stub.Debit(self.debit_request(card, amount))
        if not approved(reply):
            card.balance = before  # the gate stays shut; the chip's purse was not debited
            card.offline_counter -= 1
        return reply

    def load_request(
        self,
        card: SimulatedCard,
        pending: PendingLoad,
        *,
        seq: int | None = None,
        date_time: str | None = None,
        channel: common_pb2.PaymentChannel = common_pb2.PAYMENT_CHANNEL_CASH,
    ) -> terminal_pb2.LoadRequest:
        """The request for a load the card has begun (its MAC1 in ``pending``)."""
        return terminal_pb2.LoadRequest(
            card_number=card.card_no,
            amount=pending.amount,
            transaction_type=TYPE_LOAD,
            terminal_id=self.terminal_id,
            terminal_seq=self.next_seq() if seq is None else seq,
            date_time=date_time or now_bcd_text(),
            key_version=card.key_version,
            card_random=pending.random,
            online_counter=pending.online_counter,
            old_balance=pending.old_balance,
            mac1=pending.mac1,
            payment_channel=channel,
        )

    async def load(
        self,
        card: SimulatedCard,
        amount: int,
        channel: common_pb2.PaymentChannel = common_pb2.PAYMENT_CHANNEL_CASH,
    ) -> terminal_pb2.LoadReply:
        pending = card.begin_load(amount, self.terminal_id)
        when = now_bcd_text()
        reply: terminal_pb2.LoadReply = await self.stub.Load(
            self.load_request(card, pending, date_time=when, channel=channel)
        )
        if approved(reply):
            card.finish_load(pending, when, reply.mac2)
        return reply
