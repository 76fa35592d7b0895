"""Card rows: issuing (with its deposit posting) and enquiry.

Desk actions are rare next to terminal traffic, so each is its own
transaction; they lock the card row before any system account, the same
order the terminal batches use, so the two cannot deadlock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from onecard.ledger.accounts import cash_code, deposit_account
from onecard.ledger.model import (
    CardIssue,
    CardStatus,
    CardView,
    DeskResult,
    DeskStatus,
    PostingKind,
)
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import Conn, Contention


def purchases_known(table: str) -> str:
    """The purchases the chip has made as far as the ledger knows, as SQL (``offline_counter``).

    The highest offline record's counter, plus the card's online debits made
    after that record: the chip counts those too, at counters their requests
    did not carry (migration 0016). A card whose counter predates 0016 shows
    its counter alone, as it did then.
    """
    return f"""({table}.offline_counter + CASE
        WHEN {table}.offline_counter_at IS NULL AND {table}.offline_counter > 0 THEN 0
        ELSE (SELECT count(*) FROM terminal_txns t
              WHERE t.card_no = {table}.card_no AND t.kind = 1 AND t.status = 1
                AND t.txn_time > coalesce({table}.offline_counter_at, '-infinity'))::integer
        END) AS offline_counter"""


_CARD_COLUMNS = f"""card_no, issuer_code, key_version, product_code, status, purse_balance,
    deposit_balance, online_counter, {purchases_known("cards")}, issued_at, last_used_at"""


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def card_view(row: asyncpg.Record) -> CardView:
    return CardView(
        card_no=f"{row['card_no']:016d}",
        issuer=row["issuer_code"],
        key_version=row["key_version"],
        product=row["product_code"],
        status=CardStatus(row["status"]),
        balance=row["purse_balance"],
        deposit=row["deposit_balance"],
        online_counter=row["online_counter"],
        offline_counter=row["offline_counter"],
        issued_at=_iso(row["issued_at"]),
        last_used_at=_iso(row["last_used_at"]),
    )


def view_json(view: CardView | None) -> dict[str, Any] | None:
    if view is None:
        return None
    d = {k: getattr(view, k) for k in view.__slots__}
    d["status"] = int(view.status)
    return d


def view_from_json(d: dict[str, Any] | None) -> CardView | None:
    if d is None:
        return None
    d = dict(d)
    d["status"] = CardStatus(d["status"])
    return CardView(**d)


def _fingerprint(issue: CardIssue) -> bytes:
    parts: tuple[object, ...] = (
        issue.card_no,
        issue.product,
        issue.deposit,
        issue.key_version,
        int(issue.channel),
    )
    if issue.holder is not None:
        # Keyed digests, never clear values: the fingerprint is stored.
        h = issue.holder
        parts += (h.name_digest, h.id_digest, h.phone_digest)
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


async def lookup_cards(conn: Conn, card_nos: Sequence[str]) -> list[CardView | None]:
    rows = await conn.fetch(
        f"SELECT {_CARD_COLUMNS} FROM cards WHERE card_no = ANY($1::bigint[])",
        [int(c) for c in card_nos],
    )
    by_no = {f"{r['card_no']:016d}": card_view(r) for r in rows}
    return [by_no.get(c) for c in card_nos]


def foreign_request(request_id: str) -> str:
    """Refusal of a request id another staff member used; who it was is the audit log's to say."""
    return (
        f"request_id {request_id} belongs to another staff member's request; "
        "nothing was done: use a new request id"
    )


async def _replay(
    conn: Conn, request_id: str, fingerprint: bytes, staff_id: str
) -> DeskResult | None:
    row = await conn.fetchrow(
        "SELECT operation, fingerprint, staff_id, outcome FROM desk_requests WHERE request_id = $1",
        request_id,
    )
    if row is None:
        return None
    if row["staff_id"] != staff_id:
        # The first outcome is another clerk's action; replaying it would
        # tell this one "issued" for a card the audit log gives to someone else.
        return DeskResult(DeskStatus.CONFLICT, detail=foreign_request(request_id))
    if row["operation"] != "issue_card" or row["fingerprint"] != fingerprint:
        return DeskResult(
            DeskStatus.CONFLICT, detail=f"request_id {request_id} was used with different content"
        )
    outcome = json.loads(row["outcome"])
    return DeskResult(
        DeskStatus(outcome["status"]), view_from_json(outcome["card"]), outcome["detail"]
    )


async def issue_card(pool: asyncpg.Pool, ref: ReferenceData, issue: CardIssue) -> DeskResult:
    fp = _fingerprint(issue)
    card_no = int(issue.card_no)
    async with pool.acquire() as conn:
        for _ in range(3):
            try:
                async with conn.transaction():
                    earlier = await _replay(conn, issue.request_id, fp, issue.staff_id)
                    if earlier is not None:
                        return earlier
                    result = await _issue_in_tx(conn, ref, issue, card_no)
                    outcome = {
                        "status": int(result.status),
                        "card": view_json(result.card),
                        "detail": result.detail,
                    }
                    await conn.execute(
                        """INSERT INTO desk_requests
                           (request_id, operation, fingerprint, staff_id, card_no, outcome)
                           VALUES ($1, 'issue_card', $2, $3, $4, $5::jsonb)""",
                        issue.request_id,
                        fp,
                        issue.staff_id,
                        card_no,
                        json.dumps(outcome),
                    )
                    return result
            except asyncpg.UniqueViolationError:
                continue  # a concurrent retry of the same request committed first
    raise Contention("issue_card kept racing a concurrent request; retry")


async def _issue_in_tx(
    conn: Conn, ref: ReferenceData, issue: CardIssue, card_no: int
) -> DeskResult:
    row = await conn.fetchrow(
        f"""INSERT INTO cards (card_no, issuer_code, key_version, product_code, deposit_balance)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (card_no) DO NOTHING
            RETURNING {_CARD_COLUMNS}""",
        card_no,
        issue.card_no[:4],
        issue.key_version,
        issue.product,
        issue.deposit,
    )
    if row is None:
        return DeskResult(DeskStatus.CARD_EXISTS, detail=f"card {issue.card_no} is already issued")
    if issue.deposit:
        cash = ref.account_id(cash_code(issue.card_no[:4], issue.channel.code))
        await conn.execute(
            """INSERT INTO postings (card_no, debit_account, credit_account, amount, kind,
                                     request_id)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            card_no,
            cash,
            deposit_account(card_no),
            issue.deposit,
            int(PostingKind.DEPOSIT),
            issue.request_id,
        )
        await conn.execute(
            "UPDATE accounts SET balance = balance - $2 WHERE account_id = $1", cash, issue.deposit
        )
    view = card_view(row)
    if issue.holder is not None:
        h = issue.holder
        await conn.execute(
            """INSERT INTO card_holders (card_no, name_masked, id_masked, phone_masked,
                                         name_digest, id_digest, phone_digest, key_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            card_no,
            h.name_masked,
            h.id_masked,
            h.phone_masked,
            h.name_digest,
            h.id_digest,
            h.phone_digest,
            h.key_id,
        )
        view = replace(
            view,
            holder_name=h.name_masked,
            holder_id_number=h.id_masked,
            holder_phone=h.phone_masked,
        )
    await conn.execute(
        """INSERT INTO audit_log (staff_id, operation, request_id, card_no, before, after)
           VALUES ($1, 'issue_card', $2, $3, NULL, $4::jsonb)""",
        issue.staff_id,
        issue.request_id,
        card_no,
        json.dumps(view_json(view)),
    )
    return DeskResult(DeskStatus.OK, view)


# The cards of a batch whose rows another session holds now: those it cannot
# lock without waiting. Each free one is locked only until this statement's
# own transaction ends, and in card order, as every batch locks them.
# With ``$2``, a replaced card's successors count too: its late offline
# records lock the cards that replaced it (the amount follows to the last),
# so a hold on any of them holds the first. The chain starts only at
# replaced cards, and every set is probed by key (an array, an anti-join):
# a recursive part over every card, and NOT IN against it, took seconds
# for a batch of thousands of cards while it held their locks.
_HELD = """
WITH RECURSIVE chain (origin, card_no, depth) AS (
    SELECT card_no, replaced_by, 0 FROM cards
    WHERE $2::boolean AND card_no = ANY($1::bigint[]) AND replaced_by IS NOT NULL
    UNION
    SELECT chain.origin, c.replaced_by, chain.depth + 1
    FROM cards c JOIN chain ON c.card_no = chain.card_no
    WHERE c.replaced_by IS NOT NULL AND chain.depth < 32
),
reach AS (
    SELECT card_no AS origin, card_no FROM cards WHERE card_no = ANY($1::bigint[])
    UNION ALL
    SELECT origin, card_no FROM chain
),
free AS (
    SELECT card_no FROM cards
    WHERE card_no = ANY(ARRAY(SELECT card_no FROM reach))
    ORDER BY card_no
    FOR UPDATE SKIP LOCKED
)
SELECT DISTINCT origin AS card_no FROM reach r
WHERE NOT EXISTS (SELECT 1 FROM free f WHERE f.card_no = r.card_no)
"""


async def held_cards(conn: Conn, card_nos: Sequence[int], *, successors: bool = False) -> set[int]:
    """Of ``card_nos``, the cards another session holds a row lock on.

    With ``successors`` (an upload's records), also those whose successor
    card (one that replaced it, and so on) is held: only uploads lock those.
    Asked after a batch gave up waiting for a lock (the lock timeout), and
    before a batch with a card that was held then, so that its resends are
    refused at once instead of each waiting the timeout out. It waits for
    no row lock (a table lock, as ALTER TABLE takes, it does wait for, up to
    the lock timeout): a card a concurrent flush holds at that moment is
    named too, and its requests are refused for a retry, which is safe.
    """
    async with conn.transaction():
        found = await conn.fetch(_HELD, sorted(set(card_nos)), successors)
        return {r["card_no"] for r in found}
