"""A terminal pages through the deny list and misses nothing changed while it did.

A city's full list outgrows one gRPC message (4 MB holds about 150,000
entries), so terminals ask for it ``page_size`` entries at a time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest

from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import terminal_pb2
from tests.desk_support import OK, release_loss, report_loss, terminal_stub
from tests.support import issue


async def _walk(
    channel: grpc.aio.Channel,
    since: int,
    page_size: int,
    between_pages: Callable[[int], Awaitable[None]] | None = None,
) -> list[terminal_pb2.GetDenyListReply]:
    stub = terminal_stub(channel)
    pages = [
        await stub.GetDenyList(
            terminal_pb2.GetDenyListRequest(since_version=since, page_size=page_size)
        )
    ]
    while pages[-1].next_page_token:
        if between_pages is not None:
            await between_pages(len(pages))
        pages.append(
            await stub.GetDenyList(
                terminal_pb2.GetDenyListRequest(
                    page_size=page_size, page_token=pages[-1].next_page_token
                )
            )
        )
    return pages


def _apply(held: dict[str, int], pages: list[terminal_pb2.GetDenyListReply]) -> dict[str, int]:
    """What a terminal does with a walk: replace its list, or apply the changes."""
    held = {} if pages[0].full else dict(held)
    for page in pages:
        for e in page.entries:
            if e.listed:
                held[e.card_number] = e.reason
            else:
                held.pop(e.card_number, None)
    return held


async def _whole_list(channel: grpc.aio.Channel) -> dict[str, int]:
    reply = await terminal_stub(channel).GetDenyList(terminal_pb2.GetDenyListRequest())
    return {e.card_number: e.reason for e in reply.entries}


async def test_a_paged_walk_gives_the_list_and_the_next_changes_catch_up(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    cards = [await issue(channel, keys) for _ in range(7)]
    for card in cards[:5]:
        assert (await report_loss(channel, card.card_no)).status == OK

    pages = await _walk(channel, 0, 2)
    assert [len(p.entries) for p in pages] == [2, 2, 1]
    assert all(p.full and p.version == 5 for p in pages)
    assert _apply({}, pages) == await _whole_list(channel)

    # Changes while a terminal walks: a card it has passed leaves the list and
    # two more join; whether a later page shows them or not, the next
    # changes-since brings the terminal to the list as it is.
    passed = sorted(c.card_no for c in cards[:5])[0]

    async def meanwhile(page_number: int) -> None:
        if page_number == 1:
            assert (await release_loss(channel, passed)).status == OK
            for card in cards[5:]:
                assert (await report_loss(channel, card.card_no)).status == OK

    pages = await _walk(channel, 0, 2, meanwhile)
    held = _apply({}, pages)
    assert {p.version for p in pages} == {5}  # the walk's version: changes after it come again
    changes = await _walk(channel, pages[0].version, 1)
    assert all(not p.full and p.version == 8 for p in changes)
    assert [len(p.entries) for p in changes] == [1, 1, 1]
    assert _apply(held, changes) == await _whole_list(channel)
    assert passed not in _apply(held, changes)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 10_001}, "page_size"),
        ({"page_size": 2, "page_token": "not-a-token"}, "page_token"),
        ({"page_size": 2, "page_token": "5.3.1"}, "page_token"),  # since above its version
        ({"page_token": "0.5.3104000000000001"}, "page_size"),
        # Crafted tokens: each number goes to SQL as a bigint.
        ({"page_size": 2, "page_token": f"0.5.{2**64}"}, "page_token"),
        ({"page_size": 2, "page_token": f"0.{2**63}.1"}, "page_token"),
        ({"page_size": 2, "page_token": "0.5.+3"}, "page_token"),
        ({"page_size": 2, "page_token": "0.5.3_104"}, "page_token"),
        ({"page_size": 2, "page_token": "0.5.1.2"}, "page_token"),
    ],
)
async def test_bad_paging_is_refused_naming_the_field(
    server: RunningServer, channel: grpc.aio.Channel, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await terminal_stub(channel).GetDenyList(
            terminal_pb2.GetDenyListRequest(**request_fields)  # type: ignore[arg-type]
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
