"""Every loss period of a card counts for late offline records, not only the last.

Migration 0012 kept the last released loss period on the card. A card lost,
released, lost and released again had only its second period: a ride dated
inside the first, uploaded days later (a bus back in its depot), was posted
without the CARD_LOST exception, and so was one dated inside an earlier
period of a card that is lost again now.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch
from onecard.clients.terminal import CHINA_TIME
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.storage.migrate import apply_migrations
from onecard.server.app import RunningServer
from onecard.v1 import desk_pb2, upload_pb2
from tests.desk_support import OK, release_loss, replace, report_loss
from tests.support import assert_books_balance, fetch, new_card_number
from tests.test_upload_api import POSTED, WITH_EXCEPTION, assert_acknowledged, funded, ride

LOST = [upload_pb2.RECORD_EXCEPTION_CARD_LOST]
BLOCKED = upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED


async def _lost_between(
    channel: grpc.aio.Channel, dsn: str, card: SimulatedCard, hours: tuple[float, float | None]
) -> None:
    """A loss reported ``hours[0]`` hours ago and released ``hours[1]`` hours ago (None: now).

    Through the desk, then moved back in time by SQL, as if it had happened then.
    """
    assert (await report_loss(channel, card.card_no)).status == OK
    await fetch(
        dsn,
        "UPDATE cards SET lost_at = now() - make_interval(secs => $2) WHERE card_no = $1",
        int(card.card_no),
        hours[0] * 3600,
    )
    assert (await release_loss(channel, card.card_no)).status == OK
    if hours[1] is not None:
        back = hours[1] * 3600
        await fetch(
            dsn,
            "UPDATE card_loss_periods SET lost_until = now() - make_interval(secs => $2)"
            " WHERE card_no = $1 AND lost_until > now() - interval '1 minute'",
            int(card.card_no),
            back,
        )
        await fetch(
            dsn,
            "UPDATE cards SET last_loss_until = now() - make_interval(secs => $2)"
            " WHERE card_no = $1",
            int(card.card_no),
            back,
        )


def _at(hours_ago: float) -> str:
    return (dt.datetime.now(CHINA_TIME) - dt.timedelta(hours=hours_ago)).strftime("%Y%m%d%H%M%S")


async def test_a_ride_inside_an_earlier_loss_period_is_card_lost(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    await _lost_between(channel, server.dsn, card, (6, 5))  # the first loss
    await _lost_between(channel, server.dsn, card, (2, None))  # the second, released now
    rides = [ride(card, 100, _at(h)) for h in (7, 5.5, 3, 1, -0.02)]
    (reply,) = await Gateway(channel).upload([make_batch("p", rides)])
    assert [r.outcome for r in reply.results] == [
        POSTED,
        WITH_EXCEPTION,  # inside the first period: what 0012 missed
        POSTED,
        WITH_EXCEPTION,  # inside the second
        POSTED,
    ]
    assert [list(r.exceptions) for r in reply.results if r.exceptions] == [LOST, LOST]

    # Lost a third time: a ride from inside the first period is still CARD_LOST.
    assert (await report_loss(channel, card.card_no)).status == OK
    late = [ride(card, 100, _at(h)) for h in (5.25, 3.5)]
    (again,) = await Gateway(channel).upload([make_batch("q", late)])
    assert [r.outcome for r in again.results] == [WITH_EXCEPTION, POSTED]
    assert list(again.results[0].exceptions) == LOST

    stored = await fetch(
        server.dsn,
        "SELECT terminal_seq, detail FROM finance_exceptions WHERE card_no = $1"
        " ORDER BY terminal_seq",
        int(card.card_no),
    )
    assert [r["terminal_seq"] for r in stored] == sorted(
        [rides[1].terminal_seq, rides[3].terminal_seq, late[0].terminal_seq]
    )
    assert all("while reported lost" in r["detail"] for r in stored)
    await assert_acknowledged(server.dsn, [*rides, *late], [reply, again])
    await assert_books_balance(server.dsn)


async def test_migration_0013_keeps_the_periods_released_before_it(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, db_dsn: str
) -> None:
    """The periods come from the release audit entries; the card gets its latest back."""
    card = await funded(channel, keys)
    await _lost_between(channel, server.dsn, card, (0, None))
    await _lost_between(channel, server.dsn, card, (0, None))
    released = await fetch(
        server.dsn,
        "SELECT lost_from, lost_until FROM card_loss_periods WHERE card_no = $1 ORDER BY 1",
        int(card.card_no),
    )
    assert len(released) == 2
    conn = await asyncpg.connect(db_dsn)
    try:
        # The database as a server before 0013 (and before 0012) left it.
        await conn.execute("DROP TABLE card_loss_periods")
        await conn.execute("DELETE FROM schema_migrations WHERE version = 13")
        await conn.execute(
            "UPDATE cards SET last_loss_from = NULL, last_loss_until = NULL WHERE card_no = $1",
            int(card.card_no),
        )
        assert await apply_migrations(conn) == ["0013_loss_periods"]
        rows = await conn.fetch(
            "SELECT lost_from, lost_until FROM card_loss_periods WHERE card_no = $1 ORDER BY 1",
            int(card.card_no),
        )
        last = await conn.fetchrow(
            "SELECT last_loss_from, last_loss_until FROM cards WHERE card_no = $1",
            int(card.card_no),
        )
    finally:
        await conn.close()
    # The audit keeps the loss time as the desk showed it (microseconds kept).
    assert [(r["lost_from"], r["lost_until"]) for r in rows] == [
        (r["lost_from"], r["lost_until"]) for r in released
    ]
    assert last is not None
    assert (last["last_loss_from"], last["last_loss_until"]) == (
        released[-1]["lost_from"],
        released[-1]["lost_until"],
    )


async def test_a_replaced_cards_rides_while_lost_are_card_lost_too(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A replaced card is BLOCKED, and its loss was looked at only while it was LOST:
    its late rides from inside a released period, or after the loss it was
    replaced for, got CARD_BLOCKED alone."""
    damaged, lost = await funded(channel, keys), await funded(channel, keys)
    await _lost_between(channel, server.dsn, damaged, (6, 5))
    await _lost_between(channel, server.dsn, damaged, (3, 2))
    reason = desk_pb2.REPLACE_REASON_DAMAGED
    assert (await replace(channel, damaged.card_no, new_card_number(), reason)).status == OK
    assert (await report_loss(channel, lost.card_no)).status == OK
    await fetch(
        server.dsn,
        "UPDATE cards SET lost_at = now() - interval '2 hours' WHERE card_no = $1",
        int(lost.card_no),
    )
    assert (await replace(channel, lost.card_no, new_card_number())).status == OK

    rides = [ride(damaged, 100, _at(h)) for h in (5.5, 4, 2.5)]
    rides += [ride(lost, 100, _at(h)) for h in (3, 1)]
    (reply,) = await Gateway(channel).upload([make_batch("r", rides)])
    assert [r.outcome for r in reply.results] == [WITH_EXCEPTION] * 5
    assert [LOST[0] in r.exceptions for r in reply.results] == [True, False, True, False, True]
    assert all(BLOCKED in r.exceptions for r in reply.results)
    await assert_acknowledged(server.dsn, rides, [reply])
    await assert_books_balance(server.dsn)


async def test_a_period_released_by_a_server_before_0013_is_kept_at_the_next_release(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A server of the code before 0013, running beside the migrated database, releases
    a loss onto the card alone; the card's next release used to overwrite it."""
    card = await funded(channel, keys)
    assert (await report_loss(channel, card.card_no)).status == OK
    await fetch(  # the release as that code did it: no period row
        server.dsn,
        "UPDATE cards SET status = 1, last_loss_from = now() - interval '6 hours',"
        " last_loss_until = now() - interval '5 hours', lost_at = NULL WHERE card_no = $1",
        int(card.card_no),
    )
    await _lost_between(channel, server.dsn, card, (2, None))
    (reply,) = await Gateway(channel).upload([make_batch("p", [ride(card, 100, _at(5.5))])])
    assert list(reply.results[0].exceptions) == LOST
    await assert_books_balance(server.dsn)
