"""The deny list (黑名单) terminals pull: versioned, as a full list or the changes since a version.

Every change takes the next version from a single head row, updated inside
the desk action's transaction. The row lock serializes writers until COMMIT,
so versions become visible in order: a terminal that has seen version N has
seen every change up to N, and asking for changes since N misses nothing.
Desk actions are rare, so one hot row costs nothing that matters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from onecard.ledger.storage import Conn


class DenyReason(enum.IntEnum):
    LOST = 1
    #: Replaced by a new card; the old one must never pay again.
    BLOCKED = 2
    #: Cancelled without the card in hand (it may still be out there).
    CLOSED = 3


@dataclass(frozen=True, slots=True)
class DenyEntry:
    card_no: str
    listed: bool
    reason: DenyReason
    version: int


@dataclass(frozen=True, slots=True)
class DenyListPage:
    version: int
    #: True: the entries of every page of the walk are the whole list
    #: (replace what you hold); False: changes only.
    full: bool
    entries: tuple[DenyEntry, ...]
    #: Where the next page starts; None: this was the last one.
    next_page: DenyListCursor | None = None


#: Cursor numbers go to SQL as bigint.
_INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(_INT64_MAX))


@dataclass(frozen=True, slots=True)
class DenyListCursor:
    """Where a paged walk stands: what it walks and the last card it gave.

    ``version`` is the head when the walk began, the version every page
    reports; ``since`` the version a changes walk started from (0: a walk of
    the full list).
    """

    since: int
    version: int
    after_card: int

    def token(self) -> str:
        return f"{self.since}.{self.version}.{self.after_card}"

    @classmethod
    def parse(cls, token: str) -> DenyListCursor:
        """Raises ValueError for anything ``token()`` did not make.

        The token comes back from the terminal, and its numbers go to SQL as
        bigint: only plain ASCII digits within that range pass (``int`` alone
        would also take signs, underscores, other scripts' digits and any size).
        """
        parts = token.split(".")
        if len(parts) != 3 or not all(
            p.isascii() and p.isdigit() and len(p) <= _MAX_DIGITS for p in parts
        ):
            raise ValueError(token)
        since, version, after = (int(p) for p in parts)
        if max(since, version, after) > _INT64_MAX or since > version:
            raise ValueError(token)
        return cls(since, version, after)


#: The most entries one page may ask for.
MAX_PAGE_SIZE = 10_000


async def _next_version(conn: Conn) -> int:
    version: int = await conn.fetchval(
        "UPDATE deny_list_head SET version = version + 1 RETURNING version"
    )
    return version


async def list_card(conn: Conn, card_no: int, reason: DenyReason) -> int:
    """Add the card (or change its reason); the new list version."""
    version = await _next_version(conn)
    await conn.execute(
        """INSERT INTO deny_list (card_no, reason, version) VALUES ($1, $2, $3)
           ON CONFLICT (card_no) DO UPDATE SET reason = EXCLUDED.reason,
                                               version = EXCLUDED.version""",
        card_no,
        int(reason),
        version,
    )
    await conn.execute(
        "INSERT INTO deny_list_changes (card_no, version, listed, reason) "
        "VALUES ($1, $2, true, $3)",
        card_no,
        version,
        int(reason),
    )
    return version


async def unlist_card(conn: Conn, card_no: int) -> int | None:
    """Take the card off the list; the new version, or None if it was not listed."""
    reason = await conn.fetchval(
        "DELETE FROM deny_list WHERE card_no = $1 RETURNING reason", card_no
    )
    if reason is None:
        return None
    version = await _next_version(conn)
    await conn.execute(
        "INSERT INTO deny_list_changes (card_no, version, listed, reason) "
        "VALUES ($1, $2, false, $3)",
        card_no,
        version,
        reason,
    )
    return version


async def deny_list_since(
    conn: Conn, since: int, page_size: int = 0, cursor: DenyListCursor | None = None
) -> DenyListPage:
    """Changes after ``since`` (one per card, its latest), or the full list when since is 0.

    A version the ledger never issued (a terminal restored from elsewhere)
    gets the full list too, so the terminal can start over from it. With a
    ``page_size``, entries come in card-number order, ``page_size`` at a
    time; ``cursor`` continues a walk. Later pages read the list as it is
    then, so a change made during the walk may or may not show; either way
    its version is above the walk's, and the next changes-since brings it.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if cursor is None:
            head: int = await conn.fetchval("SELECT version FROM deny_list_head")
            full = since <= 0 or since > head
            cursor = DenyListCursor(0 if full else since, head, -1)
        full = cursor.since == 0
        limit = page_size + 1 if page_size else None  # one more: is there a next page?
        if full:
            rows = await conn.fetch(
                "SELECT card_no, true AS listed, reason, version FROM deny_list"
                " WHERE card_no > $1 ORDER BY card_no LIMIT $2",
                cursor.after_card,
                limit,
            )
        else:
            rows = await conn.fetch(
                """SELECT DISTINCT ON (card_no) card_no, listed, reason, version
                   FROM deny_list_changes WHERE version > $1 AND card_no > $2
                   ORDER BY card_no, version DESC LIMIT $3""",
                cursor.since,
                cursor.after_card,
                limit,
            )
    next_page = None
    if page_size and len(rows) > page_size:
        rows = rows[:page_size]
        next_page = DenyListCursor(cursor.since, cursor.version, rows[-1]["card_no"])
    entries = tuple(
        DenyEntry(f"{r['card_no']:016d}", r["listed"], DenyReason(r["reason"]), r["version"])
        for r in rows
    )
    return DenyListPage(cursor.version, full, entries, next_page)
