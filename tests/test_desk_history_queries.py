"""GetHistory: a card's whole replacement chain in view, and every malformed query refused by name.

A history's purse movements sum to the card's balance, whatever card of the
chain the postings are filed under. A query the ledger cannot answer is
INVALID_ARGUMENT naming the field, never quietly changed and never a raw
database error: page tokens come back from the client and may be crafted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import grpc
import pytest

from onecard.clients.terminal import now_bcd_text
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import desk_pb2, upload_pb2
from tests.desk_support import BUS, OK, desk, funded, get_card, replace, report_loss
from tests.support import STAFF, assert_books_balance, new_card_number


async def _history(channel: grpc.aio.Channel, card_no: str) -> list[desk_pb2.HistoryEntry]:
    entries: list[desk_pb2.HistoryEntry] = []
    token = ""
    while True:
        page = await desk(channel).GetHistory(
            desk_pb2.GetHistoryRequest(card_number=card_no, page_size=2, page_token=token),
            metadata=STAFF,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def test_history_of_a_twice_replaced_card_sums_to_its_balance(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    from onecard.clients.gateway import Gateway, offline_record

    a = await funded(channel, keys, 3000)
    late = offline_record(a, 250, BUS, 501, now_bcd_text())
    assert (await report_loss(channel, a.card_no)).status == OK
    b_no, c_no = new_card_number(), new_card_number()
    assert (await replace(channel, a.card_no, b_no)).status == OK
    assert (await replace(channel, b_no, c_no, desk_pb2.REPLACE_REASON_DAMAGED)).status == OK
    replies = await Gateway(channel).upload_records([late])
    assert replies[0].results[0].outcome == upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION

    for card_no in (a.card_no, b_no, c_no):
        view = await get_card(channel, card_no)
        entries = await _history(channel, card_no)
        for account, balance in (("purse", view.balance), ("deposit", view.deposit)):
            moved = sum(e.amount for e in entries if e.account == account)
            assert moved == balance, (card_no, account, [(e.kind, e.amount) for e in entries])
    # A's late purchase and the amount that followed from C show on A.
    a_entries = [(e.kind, e.amount) for e in await _history(channel, a.card_no)]
    assert a_entries[:2] == [
        (desk_pb2.POSTING_KIND_REPLACED_CARD_FOLLOW, 250),
        (desk_pb2.POSTING_KIND_PURCHASE, -250),
    ]
    assert (await get_card(channel, c_no)).balance == 2750
    await assert_books_balance(server.dsn)


def _token(*fields: object) -> str:
    """A page token as a client could craft one (the service's own encoding)."""
    return base64.urlsafe_b64encode(json.dumps(list(fields)).encode()).decode().rstrip("=")


Query = Callable[[str], dict[str, object]]


@pytest.mark.parametrize(
    ("query", "field", "rule"),
    [
        pytest.param(lambda card: {"page_size": 501}, "page_size", "to 500, got 501", id="501"),
        pytest.param(lambda card: {"page_size": 100_000}, "page_size", "to 500", id="100000"),
        pytest.param(
            lambda card: {"page_token": _token(card, "", "", 2**70)}, "page_token", "",
            id="token-beyond-bigint",
        ),
        pytest.param(
            lambda card: {"page_token": _token(card, "", "", -1)}, "page_token", "",
            id="token-negative",
        ),
        pytest.param(
            lambda card: {"page_token": _token(card, "", "", True)}, "page_token", "",
            id="token-bool",
        ),
        pytest.param(
            lambda card: {"page_token": _token(card, "", "", 1.5)}, "page_token", "",
            id="token-float",
        ),
        pytest.param(
            lambda card: {"page_token": _token(card, "", "")}, "page_token", "",
            id="token-short",
        ),
        pytest.param(
            lambda card: {"page_token": _token(int(card), "", "", 5)}, "page_token", "",
            id="token-card-as-number",
        ),
        pytest.param(
            lambda card: {"page_token": base64.urlsafe_b64encode(b"[" * 100_000).decode()},
            "page_token", "",
            id="token-nested-past-recursion",
        ),
        pytest.param(lambda card: {"page_token": "not a token"}, "page_token", "", id="token-junk"),
        pytest.param(
            lambda card: {"from_time": "9999-12-31T23:59:59-23:59"}, "from_time",
            "years 1 to 9999", id="from-past-9999-in-utc",
        ),
        pytest.param(
            lambda card: {"from_time": "0001-01-01T00:00:00+23:59"}, "from_time",
            "years 1 to 9999", id="from-before-year-1-in-utc",
        ),
        pytest.param(
            lambda card: {"to_time": "9999-12-31T23:00:00-05:00"}, "to_time",
            "years 1 to 9999", id="to-past-9999-in-utc",
        ),
    ],
)  # fmt: skip
async def test_bad_history_query_is_refused_naming_the_field(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    query: Query,
    field: str,
    rule: str,
) -> None:
    card = await funded(channel, keys, 1000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await desk(channel).GetHistory(
            desk_pb2.GetHistoryRequest(card_number=card.card_no, **query(card.card_no)),  # type: ignore[arg-type]
            metadata=STAFF,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    assert details is not None
    assert details.startswith(field), details
    assert rule in details


async def test_history_page_size_at_the_limit_is_served(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    page = await desk(channel).GetHistory(
        desk_pb2.GetHistoryRequest(card_number=card.card_no, page_size=500), metadata=STAFF
    )
    assert [e.amount for e in page.entries] == [1000, 2000] and not page.next_page_token
