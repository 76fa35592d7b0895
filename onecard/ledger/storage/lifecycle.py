"""SQL of the desk's lifecycle actions: loss, release, replacement, cancellation, disputes.

Each action is one transaction that starts by replaying its request id
(desk_requests), locks the cards it touches in card-number order — the order
the terminal and upload batches use — before any system account, so neither
can deadlock with the other, writes postings for every fen that moves, the
card and deny-list changes, and one audit row per card with the card's state
before and after. The outcome is stored with the request id, so a retry
answers exactly what the first call answered.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from onecard.ledger.accounts import (
    DEPOSIT_BASE,
    PURSE_BASE,
    cash_code,
    deposit_account,
    purse_account,
)
from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.denylist import DenyReason, list_card, unlist_card
from onecard.ledger.lifecycle import (
    REFUND_JOB_STAFF,
    Cancellation,
    CardAction,
    DeskOutcome,
    DisputeRefund,
    HistoryEntry,
    HistoryPage,
    HistoryQuery,
    Replacement,
    ReplaceReason,
    wrong_state,
)
from onecard.ledger.model import (
    CardStatus,
    CardView,
    DeskStatus,
    PaymentChannel,
    PostingKind,
    chip_unseen,
)
from onecard.ledger.pii import PiiProtector
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import Conn, Contention
from onecard.ledger.storage.cards import (
    foreign_request,
    purchases_known,
    view_from_json,
    view_json,
)

_VIEW = f"""
SELECT c.card_no, c.issuer_code, c.key_version, c.product_code, c.status, c.purse_balance,
       c.deposit_balance, c.online_counter, {purchases_known("c")},
       c.issued_at, c.last_used_at,
       c.lost_at, c.replaced_by,
       (SELECT p.card_no FROM cards p WHERE p.replaced_by = c.card_no LIMIT 1) AS replaces,
       h.name_masked, h.id_masked, h.phone_masked,
       r.hold_until, r.paid_at, r.channel AS refund_channel, r.balance_paid, r.deposit_paid,
       (d.card_no IS NOT NULL) AS deny_listed
FROM cards c
LEFT JOIN card_holders h ON h.card_no = c.card_no
LEFT JOIN pending_refunds r ON r.card_no = c.card_no
LEFT JOIN deny_list d ON d.card_no = c.card_no
WHERE c.card_no = ANY($1::bigint[])
"""

_LOCK = """
SELECT card_no, status, purse_balance, deposit_balance, replaced_by
FROM cards WHERE card_no = ANY($1::bigint[]) ORDER BY card_no FOR UPDATE
"""


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value is not None else ""


def _no(value: int | None) -> str:
    return f"{value:016d}" if value is not None else ""


def _view(r: asyncpg.Record) -> CardView:
    state = 0 if r["hold_until"] is None else (2 if r["paid_at"] is not None else 1)
    return CardView(
        card_no=f"{r['card_no']:016d}",
        issuer=r["issuer_code"],
        key_version=r["key_version"],
        product=r["product_code"],
        status=CardStatus(r["status"]),
        balance=r["purse_balance"],
        deposit=r["deposit_balance"],
        online_counter=r["online_counter"],
        offline_counter=r["offline_counter"],
        issued_at=_iso(r["issued_at"]),
        last_used_at=_iso(r["last_used_at"]),
        holder_name=r["name_masked"] or "",
        holder_id_number=r["id_masked"] or "",
        holder_phone=r["phone_masked"] or "",
        lost_at=_iso(r["lost_at"]),
        replaced_by=_no(r["replaced_by"]),
        replaces=_no(r["replaces"]),
        deny_listed=r["deny_listed"],
        refund_state=state,
        refund_due_at=_iso(r["hold_until"]),
        refund_paid_at=_iso(r["paid_at"]),
        refund_channel=r["refund_channel"] or 0,
        refund_balance_paid=r["balance_paid"] or 0,
        refund_deposit_paid=r["deposit_paid"] or 0,
    )


async def load_views(conn: Conn, card_nos: list[int]) -> dict[int, CardView]:
    return {r["card_no"]: _view(r) for r in await conn.fetch(_VIEW, card_nos)}


async def load_view(conn: Conn, card_no: int) -> CardView | None:
    return (await load_views(conn, [card_no])).get(card_no)


# -- idempotency and audit ------------------------------------------------------


def fingerprint(operation: str, *parts: object) -> bytes:
    return hashlib.blake2b(repr((operation, *parts)).encode(), digest_size=16).digest()


def _outcome_json(o: DeskOutcome) -> str:
    return json.dumps(
        {
            "status": int(o.status),
            "card": view_json(o.card),
            "detail": o.detail,
            "new_card": view_json(o.new_card),
            "amount": o.amount,
            "posting_id": o.posting_id,
        }
    )


def _outcome_from_json(raw: str) -> DeskOutcome:
    d = json.loads(raw)
    return DeskOutcome(
        DeskStatus(d["status"]),
        view_from_json(d.get("card")),
        d.get("detail", ""),
        view_from_json(d.get("new_card")),
        d.get("amount", 0),
        d.get("posting_id", 0),
    )


Action = Callable[[Conn], Awaitable[DeskOutcome]]


async def run_action(
    pool: asyncpg.Pool,
    *,
    operation: str,
    request_id: str,
    fp: bytes,
    staff_id: str,
    card_no: int,
    action: Action,
) -> DeskOutcome:
    """Run ``action`` once per request id; later calls with it get the stored outcome."""
    async with pool.acquire() as conn:
        for _ in range(3):
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(
                        "SELECT operation, fingerprint, staff_id, outcome FROM desk_requests "
                        "WHERE request_id = $1",
                        request_id,
                    )
                    if row is not None:
                        if row["staff_id"] != staff_id:
                            # Answering the first outcome would tell this clerk
                            # "done" for an action the audit log gives to someone else.
                            return DeskOutcome(
                                DeskStatus.CONFLICT, detail=foreign_request(request_id)
                            )
                        if row["operation"] != operation or row["fingerprint"] != fp:
                            return DeskOutcome(
                                DeskStatus.CONFLICT,
                                detail=f"request_id {request_id} was used before for "
                                f"{row['operation']} with different content; use a new one",
                            )
                        return _outcome_from_json(row["outcome"])
                    outcome = await action(conn)
                    await conn.execute(
                        """INSERT INTO desk_requests
                           (request_id, operation, fingerprint, staff_id, card_no, outcome)
                           VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
                        request_id,
                        operation,
                        fp,
                        staff_id,
                        card_no,
                        _outcome_json(outcome),
                    )
                    return outcome
            except asyncpg.UniqueViolationError:
                continue  # a concurrent retry of the same request committed first
    raise Contention(f"{operation} kept racing a concurrent request; retry")


async def audit(
    conn: Conn,
    staff_id: str,
    operation: str,
    request_id: str | None,
    card_no: int,
    before: CardView | None,
    after: CardView | None,
    details: dict[str, Any] | None = None,
) -> None:
    after_doc = view_json(after)
    if details:
        after_doc = {**(after_doc or {}), "details": details}
    await conn.execute(
        """INSERT INTO audit_log (staff_id, operation, request_id, card_no, before, after)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)""",
        staff_id,
        operation,
        request_id,
        card_no,
        json.dumps(view_json(before)) if before is not None else None,
        json.dumps(after_doc) if after_doc is not None else None,
    )


# -- money --------------------------------------------------------------------


@dataclass
class Mover:
    """Postings of one action, with every balance they change applied once at the end."""

    request_id: str | None
    rows: list[tuple[int, int, int, int, PostingKind, int | None]] = field(default_factory=list)
    deltas: dict[int, int] = field(default_factory=dict)
    #: Per card, how much its chip adjustment moves: the purse postings of
    #: this action its chip does not see (model.chip_unseen).
    chip: dict[int, int] = field(default_factory=dict)

    def move(
        self,
        card_no: int,
        debit: int,
        credit: int,
        amount: int,
        kind: PostingKind,
        corrects: int | None = None,
    ) -> None:
        if amount == 0:
            return
        if amount < 0:
            debit, credit, amount = credit, debit, -amount
        self.rows.append((card_no, debit, credit, amount, kind, corrects))
        self.deltas[debit] = self.deltas.get(debit, 0) - amount
        self.deltas[credit] = self.deltas.get(credit, 0) + amount
        for card, change in chip_unseen(kind, card_no, debit, credit, amount, PURSE_BASE):
            self.chip[card] = self.chip.get(card, 0) + change

    async def flush(
        self, conn: Conn, terminal_id: int | None = None, terminal_seq: int | None = None
    ) -> list[int]:
        """Write postings, then card balances, then system accounts in id order."""
        ids: list[int] = []
        for card_no, debit, credit, amount, kind, corrects in self.rows:
            ids.append(
                await conn.fetchval(
                    """INSERT INTO postings (card_no, debit_account, credit_account, amount, kind,
                                             terminal_id, terminal_seq, request_id, corrects)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING posting_id""",
                    card_no,
                    debit,
                    credit,
                    amount,
                    int(kind),
                    terminal_id,
                    terminal_seq,
                    self.request_id,
                    corrects,
                )
            )
        for account in sorted(self.deltas):
            delta = self.deltas[account]
            if delta == 0 and not self.chip.get(account - PURSE_BASE):
                continue
            if account >= DEPOSIT_BASE:
                await conn.execute(
                    "UPDATE cards SET deposit_balance = deposit_balance + $2 WHERE card_no = $1",
                    account - DEPOSIT_BASE,
                    delta,
                )
            elif account >= PURSE_BASE:
                await conn.execute(
                    "UPDATE cards SET purse_balance = purse_balance + $2, "
                    "chip_adjust = chip_adjust + $3 WHERE card_no = $1",
                    account - PURSE_BASE,
                    delta,
                    self.chip.get(account - PURSE_BASE, 0),
                )
            else:
                await conn.execute(
                    "UPDATE accounts SET balance = balance + $2 WHERE account_id = $1",
                    account,
                    delta,
                )
        return ids


@dataclass(frozen=True)
class Context:
    """What every action needs besides its connection."""

    ref: ReferenceData
    pii: PiiProtector
    refund_hold: float


async def _holder_refusal(ctx: Context, conn: Conn, card_no: int, presented: str) -> str | None:
    """Why the presented ID does not authorise acting on a registered card (None: it does)."""
    digest = await conn.fetchval("SELECT id_digest FROM card_holders WHERE card_no = $1", card_no)
    if digest is None:
        return None
    if not presented:
        return f"card {card_no:016d} is registered: give the holder's ID number (holder_id_number)"
    if not ctx.pii.matches(digest, presented):
        return "the ID number presented does not match the card's registered holder"
    return None


async def _locked(conn: Conn, card_nos: list[int]) -> dict[int, asyncpg.Record]:
    return {r["card_no"]: r for r in await conn.fetch(_LOCK, sorted(set(card_nos)))}


def _unknown(card_no: int) -> DeskOutcome:
    return DeskOutcome(DeskStatus.UNKNOWN_CARD, detail=f"card {card_no:016d} is not issued")


# -- loss -----------------------------------------------------------------------


async def report_loss(ctx: Context, conn: Conn, req: CardAction) -> DeskOutcome:
    card_no = int(req.card_no)
    if not await _locked(conn, [card_no]):
        return _unknown(card_no)
    before = await load_view(conn, card_no)
    assert before is not None
    if before.status is not CardStatus.ACTIVE:
        return DeskOutcome(
            DeskStatus.WRONG_STATE,
            before,
            wrong_state(before, "reporting loss", (CardStatus.ACTIVE,)),
        )
    refusal = await _holder_refusal(ctx, conn, card_no, req.holder_id_number)
    if refusal:
        return DeskOutcome(DeskStatus.HOLDER_MISMATCH, before, refusal)
    await conn.execute(
        "UPDATE cards SET status = $2, lost_at = now(), status_changed_at = now() "
        "WHERE card_no = $1",
        card_no,
        int(CardStatus.LOST),
    )
    version = await list_card(conn, card_no, DenyReason.LOST)
    after = await load_view(conn, card_no)
    await audit(
        conn, req.staff_id, "report_loss", req.request_id, card_no, before, after,
        {"deny_list_version": version},
    )  # fmt: skip
    return DeskOutcome(DeskStatus.OK, after, f"card is lost; deny list version {version}")


async def release_loss(ctx: Context, conn: Conn, req: CardAction) -> DeskOutcome:
    card_no = int(req.card_no)
    if not await _locked(conn, [card_no]):
        return _unknown(card_no)
    before = await load_view(conn, card_no)
    assert before is not None
    if before.status is not CardStatus.LOST:
        return DeskOutcome(
            DeskStatus.WRONG_STATE,
            before,
            wrong_state(before, "releasing loss", (CardStatus.LOST,)),
        )
    refusal = await _holder_refusal(ctx, conn, card_no, req.holder_id_number)
    if refusal:
        return DeskOutcome(DeskStatus.HOLDER_MISMATCH, before, refusal)
    # The period is kept (every one, migration 0013): an offline record dated
    # inside it may come days later, and is CARD_LOST though the card is not.
    # The card's last period goes in too: a server of the code before 0013,
    # still running beside this one, released it onto the card alone, and
    # the update below would overwrite it.
    await conn.execute(
        "INSERT INTO card_loss_periods (card_no, lost_from, lost_until) "
        "SELECT card_no, lost_at, now() FROM cards WHERE card_no = $1 AND lost_at IS NOT NULL "
        "UNION ALL "
        "SELECT card_no, last_loss_from, last_loss_until FROM cards WHERE card_no = $1 "
        "AND last_loss_from IS NOT NULL AND last_loss_until IS NOT NULL "
        "ON CONFLICT DO NOTHING",
        card_no,
    )
    await conn.execute(
        "UPDATE cards SET status = $2, last_loss_from = lost_at, last_loss_until = now(), "
        "lost_at = NULL, status_changed_at = now() WHERE card_no = $1",
        card_no,
        int(CardStatus.ACTIVE),
    )
    version = await unlist_card(conn, card_no)
    after = await load_view(conn, card_no)
    await audit(
        conn, req.staff_id, "release_loss", req.request_id, card_no, before, after,
        {"deny_list_version": version},
    )  # fmt: skip
    return DeskOutcome(DeskStatus.OK, after, f"card is active again; deny list version {version}")


# -- replacement ------------------------------------------------------------------


async def replace_card(ctx: Context, conn: Conn, req: Replacement) -> DeskOutcome:
    old_no, new_no = int(req.card_no), int(req.new_card_no)
    locked = await _locked(conn, [old_no])
    if not locked:
        return _unknown(old_no)
    before = await load_view(conn, old_no)
    assert before is not None
    allowed = (
        (CardStatus.LOST,)
        if req.reason is ReplaceReason.LOST
        else (CardStatus.ACTIVE, CardStatus.LOST)
    )
    if before.status not in allowed:
        detail = wrong_state(before, f"replacing as {req.reason.name.lower()}", allowed)
        if before.status is CardStatus.ACTIVE:
            detail += "; report the loss first, or replace it as damaged"
        return DeskOutcome(DeskStatus.WRONG_STATE, before, detail)
    refusal = await _holder_refusal(ctx, conn, old_no, req.holder_id_number)
    if refusal:
        return DeskOutcome(DeskStatus.HOLDER_MISMATCH, before, refusal)
    inserted = await conn.fetchval(
        """INSERT INTO cards (card_no, issuer_code, key_version, product_code)
           SELECT $2, issuer_code, $3, product_code FROM cards WHERE card_no = $1
           ON CONFLICT (card_no) DO NOTHING RETURNING card_no""",
        old_no,
        new_no,
        req.key_version,
    )
    if inserted is None:
        return DeskOutcome(
            DeskStatus.CARD_EXISTS, before, f"new card {req.new_card_no} is already issued"
        )
    await conn.execute(
        """INSERT INTO card_holders (card_no, name_masked, id_masked, phone_masked,
                                     name_digest, id_digest, phone_digest, key_id)
           SELECT $2, name_masked, id_masked, phone_masked, name_digest, id_digest,
                  phone_digest, key_id
           FROM card_holders WHERE card_no = $1""",
        old_no,
        new_no,
    )
    row = locked[old_no]
    mover = Mover(req.request_id)
    mover.move(
        old_no,
        purse_account(old_no),
        purse_account(new_no),
        row["purse_balance"],
        PostingKind.REPLACEMENT_TRANSFER,
    )
    mover.move(
        old_no,
        deposit_account(old_no),
        deposit_account(new_no),
        row["deposit_balance"],
        PostingKind.DEPOSIT_TRANSFER,
    )
    await mover.flush(conn)
    await conn.execute(
        "UPDATE cards SET status = $2, replaced_by = $3, status_changed_at = now() "
        "WHERE card_no = $1",
        old_no,
        int(CardStatus.BLOCKED),
        new_no,
    )
    version = await list_card(conn, old_no, DenyReason.BLOCKED)
    views = await load_views(conn, [old_no, new_no])
    details = {
        "reason": req.reason.name.lower(),
        "balance_moved": row["purse_balance"],
        "deposit_moved": row["deposit_balance"],
        "deny_list_version": version,
    }
    await audit(
        conn, req.staff_id, "replace_card", req.request_id, old_no, before, views[old_no],
        {**details, "new_card": req.new_card_no},
    )  # fmt: skip
    await audit(
        conn, req.staff_id, "replace_card", req.request_id, new_no, None, views[new_no],
        {**details, "old_card": req.card_no},
    )  # fmt: skip
    return DeskOutcome(
        DeskStatus.OK,
        views[old_no],
        f"balance {row['purse_balance']} fen and deposit {row['deposit_balance']} fen "
        f"moved to {req.new_card_no}; the old card is blocked for good",
        views[new_no],
        amount=row["purse_balance"],
    )


# -- cancellation -------------------------------------------------------------------


async def _pay_out(
    ctx: Context,
    conn: Conn,
    card_no: int,
    channel: PaymentChannel,
    purse: int,
    deposit: int,
    balance_to_pay: int,
    request_id: str | None,
) -> tuple[int, int]:
    """Pay ``balance_to_pay`` of the purse and the deposit out; (balance paid, deposit paid).

    A purse that offline records took below zero is made whole from the
    deposit first: the holder owes those rides.
    """
    cash = ctx.ref.account_id(cash_code(f"{card_no:016d}"[:4], channel.code))
    mover = Mover(request_id)
    paid_balance = max(0, min(balance_to_pay, purse))
    mover.move(card_no, purse_account(card_no), cash, paid_balance, PostingKind.BALANCE_REFUND)
    if purse < 0 and deposit > 0:
        offset = min(deposit, -purse)
        mover.move(
            card_no, deposit_account(card_no), purse_account(card_no), offset,
            PostingKind.DEPOSIT_OFFSET,
        )  # fmt: skip
        deposit -= offset
    paid_deposit = max(0, deposit)
    mover.move(card_no, deposit_account(card_no), cash, paid_deposit, PostingKind.DEPOSIT_REFUND)
    await mover.flush(conn)  # the chip keeps what was paid out: chip_adjust (Mover)
    return paid_balance, paid_deposit


async def cancel_card(ctx: Context, conn: Conn, req: Cancellation) -> DeskOutcome:
    card_no = int(req.card_no)
    locked = await _locked(conn, [card_no])
    if not locked:
        return _unknown(card_no)
    before = await load_view(conn, card_no)
    assert before is not None
    allowed = (CardStatus.ACTIVE, CardStatus.LOST)
    if before.status not in allowed:
        detail = wrong_state(before, "cancelling", allowed)
        if before.replaced_by:
            detail += f"; cancel {before.replaced_by} instead"
        return DeskOutcome(DeskStatus.WRONG_STATE, before, detail)
    refusal = await _holder_refusal(ctx, conn, card_no, req.holder_id_number)
    if refusal:
        return DeskOutcome(DeskStatus.HOLDER_MISMATCH, before, refusal)
    await conn.execute(
        "UPDATE cards SET status = $2, status_changed_at = now() WHERE card_no = $1",
        card_no,
        int(CardStatus.CLOSED),
    )
    row = locked[card_no]
    if req.card_readable:
        paid_balance, paid_deposit = await _pay_out(
            ctx, conn, card_no, req.channel, row["purse_balance"], row["deposit_balance"],
            req.card_balance, req.request_id,
        )  # fmt: skip
        # The card is in the desk's hands now: off the list (a lost card was on it).
        version = await unlist_card(conn, card_no)
        after = await load_view(conn, card_no)
        left = row["purse_balance"] - paid_balance
        detail = f"refunded balance {paid_balance} fen and deposit {paid_deposit} fen"
        if left > 0:
            detail += (
                f"; {left} fen stays on the card for offline records the chip shows "
                "but the ledger has not received yet"
            )
        details: dict[str, Any] = {
            "channel": req.channel.code, "card_balance": req.card_balance,
            "balance_paid": paid_balance, "deposit_paid": paid_deposit,
        }  # fmt: skip
        if version is not None:
            details["deny_list_version"] = version
        await audit(
            conn, req.staff_id, "cancel_card", req.request_id, card_no, before, after, details
        )
        return DeskOutcome(DeskStatus.OK, after, detail, amount=paid_balance + paid_deposit)
    await conn.execute(
        """INSERT INTO pending_refunds (card_no, request_id, staff_id, channel, hold_until)
           VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))""",
        card_no,
        req.request_id,
        req.staff_id,
        int(req.channel),
        ctx.refund_hold,
    )
    version = await list_card(conn, card_no, DenyReason.CLOSED)
    after = await load_view(conn, card_no)
    assert after is not None
    await audit(
        conn, req.staff_id, "cancel_card", req.request_id, card_no, before, after,
        {"channel": req.channel.code, "refund_due_at": after.refund_due_at,
         "deny_list_version": version},
    )  # fmt: skip
    return DeskOutcome(
        DeskStatus.REFUND_PENDING,
        after,
        f"card closed; balance and deposit are refunded through {req.channel.code} "
        f"after {after.refund_due_at}, once late offline records are in",
    )


_DUE = """
SELECT card_no, channel, request_id FROM pending_refunds
WHERE paid_at IS NULL AND hold_until <= coalesce($1::timestamptz, now())
ORDER BY hold_until LIMIT 1
FOR UPDATE SKIP LOCKED
"""


async def pay_due_refunds(
    ctx: Context, pool: asyncpg.Pool, as_of: dt.datetime | None = None
) -> list[str]:
    """Pay every held refund whose hold is over; the card numbers paid.

    One refund per transaction, claimed with SKIP LOCKED, so several server
    processes can run the job at once and each refund is paid exactly once.
    """
    paid: list[str] = []
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():
                due = await conn.fetchrow(_DUE, as_of)
                if due is None:
                    return paid
                card_no = due["card_no"]
                locked = await _locked(conn, [card_no])
                before = await load_view(conn, card_no)
                row = locked[card_no]
                channel = PaymentChannel(due["channel"])
                paid_balance, paid_deposit = await _pay_out(
                    ctx, conn, card_no, channel, row["purse_balance"], row["deposit_balance"],
                    row["purse_balance"], due["request_id"],
                )  # fmt: skip
                await conn.execute(
                    """UPDATE pending_refunds SET paid_at = now(), balance_paid = $2,
                                                  deposit_paid = $3
                       WHERE card_no = $1""",
                    card_no,
                    paid_balance,
                    paid_deposit,
                )
                after = await load_view(conn, card_no)
                await audit(
                    conn, REFUND_JOB_STAFF, "pay_refund", due["request_id"], card_no, before,
                    after, {"channel": channel.code, "balance_paid": paid_balance,
                            "deposit_paid": paid_deposit},
                )  # fmt: skip
                paid.append(f"{card_no:016d}")


# -- disputes -------------------------------------------------------------------------


_CHAIN = """
WITH RECURSIVE chain (card_no, replaced_by, depth) AS (
    SELECT card_no, replaced_by, 0 FROM cards WHERE card_no = $1
    UNION ALL
    SELECT c.card_no, c.replaced_by, chain.depth + 1
    FROM cards c JOIN chain ON c.card_no = chain.replaced_by
    WHERE chain.depth < 32
)
SELECT card_no FROM chain ORDER BY depth
"""


async def _chain(conn: Conn, card_no: int) -> list[int]:
    """The card and its successors, oldest first (just the card if never replaced)."""
    return [r["card_no"] for r in await conn.fetch(_CHAIN, card_no)] or [card_no]


async def lock_chain(conn: Conn, card_no: int) -> tuple[list[int], dict[int, asyncpg.Record]]:
    """Lock the card and every successor; (chain oldest first, locked rows by card number).

    The chain is read first, then all of it locked in card-number order like
    every other writer; a replacement in between shows as a changed chain and
    the read is repeated. An unknown card gives an empty dict.
    """
    chain = await _chain(conn, card_no)
    for _ in range(3):
        locked = await _locked(conn, chain)
        if card_no not in locked:
            return chain, {}
        again = await _chain(conn, card_no)
        if again == chain:
            return chain, locked
        chain = again
    raise Contention("replacement chain kept changing; retry")


async def refund_posting(ctx: Context, conn: Conn, req: DisputeRefund) -> DeskOutcome:
    """Refund (part of) a disputed purchase to the card the money lives on now.

    A replaced card's refund goes to its successor (followed to the end of
    the chain): the old card is blocked for good and its purse is empty.
    """
    card_no = int(req.card_no)
    chain, locked = await lock_chain(conn, card_no)
    if not locked:
        return _unknown(card_no)
    target = chain[-1]
    before = await load_view(conn, card_no)
    assert before is not None
    if CardStatus(locked[target]["status"]) not in (CardStatus.ACTIVE, CardStatus.LOST):
        return DeskOutcome(
            DeskStatus.WRONG_STATE,
            before,
            f"card {target:016d} is closed; refund the holder through finance, not the purse",
        )
    original = await conn.fetchrow(
        """SELECT posting_id, debit_account, credit_account, amount, kind FROM postings
           WHERE posting_id = $1 AND card_no = $2""",
        req.posting_id,
        card_no,
    )
    if (
        original is None
        or original["kind"] != PostingKind.PURCHASE
        or original["debit_account"] != purse_account(card_no)
    ):
        return DeskOutcome(
            DeskStatus.NOT_REFUNDABLE,
            before,
            f"posting {req.posting_id} is not a purchase of card {req.card_no}; "
            "see the card's history for its postings",
        )
    corrected: int = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM postings WHERE corrects = $1", req.posting_id
    )
    left = original["amount"] - corrected
    if req.amount > left:
        return DeskOutcome(
            DeskStatus.REFUND_EXCEEDS,
            before,
            f"posting {req.posting_id} was {original['amount']} fen and {corrected} fen of it "
            f"is refunded or reversed already: at most {left} fen can be refunded",
        )
    target_before = before if target == card_no else await load_view(conn, target)
    mover = Mover(req.request_id)
    mover.move(
        target,
        original["credit_account"],
        purse_account(target),
        req.amount,
        PostingKind.DISPUTE_REFUND,
        corrects=req.posting_id,
    )
    (posting_id,) = await mover.flush(conn)
    await conn.execute(
        """INSERT INTO dispute_refunds (card_no, refund_posting, original_posting, amount,
                                        case_reference, reason, staff_id, request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        card_no,
        posting_id,
        req.posting_id,
        req.amount,
        req.case_reference,
        req.reason,
        req.staff_id,
        req.request_id,
    )
    views = await load_views(conn, [card_no, target])
    details = {
        "original_posting": req.posting_id,
        "refund_posting": posting_id,
        "amount": req.amount,
        "case_reference": req.case_reference,
        "reason": req.reason,
        "credited_card": f"{target:016d}",
    }
    await audit(
        conn, req.staff_id, "refund_posting", req.request_id, card_no, before, views[card_no],
        details,
    )  # fmt: skip
    if target != card_no:
        await audit(
            conn, req.staff_id, "refund_posting", req.request_id, target, target_before,
            views[target], details,
        )  # fmt: skip
    where = "" if target == card_no else f" (to its successor {target:016d})"
    return DeskOutcome(
        DeskStatus.OK,
        views[target],
        f"refunded {req.amount} fen of posting {req.posting_id}{where}; "
        f"{left - req.amount} fen of it is still refundable",
        amount=req.amount,
        posting_id=posting_id,
    )


# -- history ----------------------------------------------------------------------------


_HISTORY = """
SELECT posting_id, posted_at, kind, debit_account, credit_account, amount,
       terminal_id, terminal_seq, corrects
FROM postings
WHERE card_no = ANY($1::bigint[])
  AND (debit_account = ANY($2::bigint[]) OR credit_account = ANY($2::bigint[]))
  AND ($3::timestamptz IS NULL OR posted_at >= $3)
  AND ($4::timestamptz IS NULL OR posted_at < $4)
  AND ($5::bigint IS NULL OR posting_id < $5)
ORDER BY posting_id DESC
LIMIT $6
"""


#: Every card of the replacement chain the card belongs to: predecessors and successors.
_WHOLE_CHAIN = """
WITH RECURSIVE older (card_no, depth) AS (
    SELECT card_no, 0 FROM cards WHERE card_no = $1
    UNION ALL
    SELECT p.card_no, older.depth + 1
    FROM cards p JOIN older ON p.replaced_by = older.card_no
    WHERE older.depth < 32
), newer (card_no, replaced_by, depth) AS (
    SELECT card_no, replaced_by, 0 FROM cards WHERE card_no = $1
    UNION ALL
    SELECT c.card_no, c.replaced_by, newer.depth + 1
    FROM cards c JOIN newer ON c.card_no = newer.replaced_by
    WHERE newer.depth < 32
)
SELECT card_no FROM older UNION SELECT card_no FROM newer
"""

#: Entries in a history page that does not ask for a size.
DEFAULT_PAGE_SIZE = 50


def _token(q: HistoryQuery, before: int) -> str:
    raw = json.dumps([q.card_no, q.since, q.until, before]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: Longer than any token ``_token`` makes; bounds what a crafted one costs to decode.
MAX_TOKEN_CHARS = 256
_INT64_MAX = 2**63 - 1


def _from_token(q: HistoryQuery) -> int | None:
    """The posting id a page continues below; FieldError for anything ``_token`` did not make.

    The token comes back from the client, so every field is checked before
    it reaches SQL: a value out of bigint range would otherwise surface as a
    raw database error instead of INVALID_ARGUMENT.
    """
    if not q.page_token:
        return None
    foreign = FieldError("page_token", "is not a next_page_token this service handed out")
    if len(q.page_token) > MAX_TOKEN_CHARS:
        raise foreign
    try:
        padded = q.page_token + "=" * (-len(q.page_token) % 4)
        fields = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError, RecursionError):
        raise foreign from None
    if not (isinstance(fields, list) and len(fields) == 4):
        raise foreign
    card_no, since, until, before = fields
    if not (
        all(isinstance(v, str) for v in (card_no, since, until))
        and type(before) is int  # not bool, which json also gives
        and 0 < before <= _INT64_MAX
    ):
        raise foreign
    if (card_no, since, until) != (q.card_no, q.since, q.until):
        raise FieldError("page_token", "belongs to another query: repeat the same card and times")
    return before


def _counterparty(names: dict[int, str], account: int) -> str:
    if account >= DEPOSIT_BASE:
        return f"deposit {account - DEPOSIT_BASE:016d}"
    if account >= PURSE_BASE:
        return f"purse {account - PURSE_BASE:016d}"
    return names.get(account, f"account {account}")


async def history(ref: ReferenceData, conn: Conn, q: HistoryQuery) -> HistoryPage | None:
    """Postings that moved this card's purse or deposit, newest first; None: no such card.

    ``q`` is checked already (desk.CardLifecycle.history), page size included.
    """
    card_no = int(q.card_no)
    before = _from_token(q)
    # Transfers and follow-ups are filed under another card of the
    # replacement chain, not always a neighbour: a late record of A after
    # A -> B -> C is followed from C. The account filter keeps only what
    # touched this card.
    related = [r["card_no"] for r in await conn.fetch(_WHOLE_CHAIN, card_no)]
    if not related:
        return None
    mine = {purse_account(card_no): "purse", deposit_account(card_no): "deposit"}
    size = q.page_size or DEFAULT_PAGE_SIZE
    since = dt.datetime.fromisoformat(q.since) if q.since else None
    until = dt.datetime.fromisoformat(q.until) if q.until else None
    rows = await conn.fetch(_HISTORY, related, list(mine), since, until, before, size + 1)
    names = {account_id: code for code, account_id in ref.account_ids.items()}
    entries: list[HistoryEntry] = []
    for r in rows[:size]:
        for account, sign, other in (
            (r["credit_account"], 1, r["debit_account"]),
            (r["debit_account"], -1, r["credit_account"]),
        ):
            if account in mine:
                entries.append(
                    HistoryEntry(
                        posting_id=r["posting_id"],
                        posted_at=_iso(r["posted_at"]),
                        kind=r["kind"],
                        account=mine[account],
                        amount=sign * r["amount"],
                        counterparty=_counterparty(names, other),
                        terminal_id=f"{r['terminal_id']:012d}" if r["terminal_id"] else "",
                        terminal_seq=r["terminal_seq"] or 0,
                        corrects=r["corrects"] or 0,
                    )
                )
    token = _token(q, rows[size - 1]["posting_id"]) if len(rows) > size else ""
    return HistoryPage(tuple(entries), token)
