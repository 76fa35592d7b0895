"""A refused field is described by kind and length, never quoted.

An ID number or a phone number typed into a card-number field (an easy
slip at a service desk) came back whole in the INVALID_ARGUMENT details:
to the desk client, its terminal and whatever logs what the server said.
"""

from __future__ import annotations

import grpc
import pytest

from onecard.clients.terminal import Terminal
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import desk_pb2, terminal_pb2
from tests.desk_support import desk, get_card, report_loss
from tests.support import STAFF, issue
from tests.test_desk_api import issue_request

ID_NUMBER = "32010219900101123X"
PHONE = "13812345678"


@pytest.mark.parametrize("typed", [ID_NUMBER, PHONE], ids=["ID number", "phone"])
async def test_personal_data_in_a_card_number_field_is_not_echoed(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, typed: str
) -> None:
    card = await issue(channel, keys)
    await Terminal(channel, "310400000009").load(card, 1_000)
    bus = Terminal(channel, "310400000001")
    debit = bus.debit_request(card, 100)
    debit.card_number = typed  # the Cython parser's path
    calls = [
        get_card(channel, typed),
        report_loss(channel, typed),
        desk(channel).GetHistory(desk_pb2.GetHistoryRequest(card_number=typed), metadata=STAFF),
        bus.stub.Debit(debit),
        bus.stub.Debit(terminal_pb2.DebitRequest(card_number=typed, terminal_id=PHONE)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert "decimal digits, got " in details, details
        assert typed not in details and typed[:11] not in details, details


@pytest.mark.parametrize("typed", [ID_NUMBER, PHONE], ids=["ID number", "phone"])
async def test_personal_data_in_the_product_field_is_not_echoed(
    server: RunningServer, channel: grpc.aio.Channel, typed: str
) -> None:
    """The unknown product was quoted whole (found by review)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await desk(channel).IssueCard(issue_request(product=typed), metadata=STAFF)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith("product: no such card product"), details
    assert typed not in details and typed[:11] not in details, details


def test_desk_requests_and_settings_show_no_id_number_or_key_when_printed() -> None:
    """A repr lands in tracebacks and debug logs: it held the ID number and the digest key."""
    from onecard.ledger.lifecycle import (
        Cancellation,
        CardAction,
        DeskSettings,
        Replacement,
        ReplaceReason,
    )
    from onecard.ledger.model import PaymentChannel

    key = bytes.fromhex("5a" * 32)
    shown = [
        repr(CardAction("r1", "s1", "3104000000000001", ID_NUMBER)),
        repr(
            Replacement(
                "r2", "s1", "3104000000000001", "3104000000000002", 1, ReplaceReason.LOST, ID_NUMBER
            )
        ),
        repr(Cancellation("r3", "s1", "3104000000000001", PaymentChannel.CASH, True, 0, ID_NUMBER)),
        repr(DeskSettings(pii_key=key)),
    ]
    for text in shown:
        assert ID_NUMBER not in text and key.hex() not in text and repr(key) not in text, text
    assert "3104000000000001" in shown[0]  # still says which card
