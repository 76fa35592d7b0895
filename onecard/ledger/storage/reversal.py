"""A terminal's reversal (撤消) of its own last transaction: a cashier's mistake undone.

The reversal is itself a terminal transaction with its own (terminal id,
terminal seq), stored in terminal_txns like a debit: a retry is a DUPLICATE
with the first outcome, other content under that identity is a CONFLICT.
The original gets the reversal's seq in ``reversed_by_seq``, so a second
reversal of it, under another seq, is ALREADY_REVERSED, and so is a retry of
the original itself (which must not hand out a reversed load's MAC2). The
money goes back by a REVERSAL posting whose ``corrects`` names the original
posting; a reversed load gives the card's online counter back. A replaced
card's purse is empty, so the amount then follows to the last card of its
replacement chain (REPLACED_CARD_FOLLOW), as a late offline record's does;
a closed card's purse is paid out, so its reversal is refused and left to
the desk.

Rare next to debits, so it is one small transaction of its own, locking the
card rows first (its whole replacement chain, in card-number order) and
system accounts after, the order the batches use.
"""

from __future__ import annotations

import hashlib

import asyncpg

from onecard.ledger.accounts import purse_account
from onecard.ledger.crypto.encoding import parse_datetime
from onecard.ledger.lifecycle import Reversal
from onecard.ledger.model import CardStatus, PostingKind, TxnKind, TxnResult, TxnStatus
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import Conn, Contention
from onecard.ledger.storage.lifecycle import Mover, audit, load_view, load_views, lock_chain


def reversal_fingerprint(r: Reversal) -> bytes:
    """What makes a retry the same reversal: the card, the amount, the transaction undone.

    Not the time it was sent: no card signs a reversal, so its time is only
    the sender's clock, and a clerk's tool stamps each try anew; a retry of
    a reversal that went through was answered CONFLICT, and the clerk told
    it had failed. Nor who sent it.
    """
    parts = ("R2", r.card_no, r.amount, r.original_seq)
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def _fingerprint_before_r2(r: Reversal) -> bytes:
    """A reversal stored before the time left the fingerprint: its retry still matches."""
    parts = ("R", r.card_no, r.amount, r.original_seq, r.date_time)
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


async def reverse(pool: asyncpg.Pool, ref: ReferenceData, r: Reversal, window: float) -> TxnResult:
    async with pool.acquire() as conn:
        if int(r.terminal_id) not in ref.terminal_operator:
            await ref.learn_terminals(conn, {int(r.terminal_id)})
        for _ in range(3):
            try:
                async with conn.transaction():
                    return await _reverse(conn, ref, r, window)
            except asyncpg.UniqueViolationError:
                continue  # a concurrent retry stored it first: answer as a duplicate
    raise Contention("reversal kept racing a concurrent retry; retry")


async def _reverse(conn: Conn, ref: ReferenceData, r: Reversal, window: float) -> TxnResult:
    terminal_id, card_no = int(r.terminal_id), int(r.card_no)
    fp = reversal_fingerprint(r)
    earlier = await conn.fetchrow(
        "SELECT fingerprint, status, balance_after FROM terminal_txns "
        "WHERE terminal_id = $1 AND terminal_seq = $2",
        terminal_id,
        r.terminal_seq,
    )
    if earlier is not None:
        if earlier["fingerprint"] not in (fp, _fingerprint_before_r2(r)):
            return TxnResult(
                TxnStatus.CONFLICT,
                detail=f"terminal {r.terminal_id} seq {r.terminal_seq} was used before "
                "with different content",
            )
        return TxnResult(
            TxnStatus.DUPLICATE,
            earlier["balance_after"],
            original_status=TxnStatus(earlier["status"]),
        )
    if terminal_id not in ref.terminal_operator:
        return TxnResult(
            TxnStatus.UNKNOWN_TERMINAL, detail=f"terminal {r.terminal_id} is not registered"
        )
    # A replaced card's money lives on the last card of its chain: lock all of
    # it, in card-number order, before any system account.
    chain, locked = await lock_chain(conn, card_no)
    if not locked:
        return TxnResult(TxnStatus.UNKNOWN_CARD, detail=f"card {r.card_no} is not issued")
    holder = chain[-1]
    balance: int = locked[card_no]["purse_balance"]
    status, detail, posting = await _check(conn, r, terminal_id, card_no, locked[holder], window)
    if status is TxnStatus.APPROVED:
        assert posting is not None
        before = await load_view(conn, card_no)
        holder_before = before if holder == card_no else await load_view(conn, holder)
        mover = Mover(None)
        # Back the way it came: the original's credit side pays the debit side.
        mover.move(
            card_no,
            posting["credit_account"],
            posting["debit_account"],
            r.amount,
            PostingKind.REVERSAL,
            corrects=posting["posting_id"],
        )
        if holder != card_no:
            # The replacement emptied this purse into the successor's; what the
            # reversal gives back (or takes back, for a load) follows there, as
            # a late offline record's amount does, filed under the holder.
            gained = mover.deltas.get(purse_account(card_no), 0)
            mover.move(
                holder,
                purse_account(card_no),
                purse_account(holder),
                gained,
                PostingKind.REPLACED_CARD_FOLLOW,
            )
            detail = f"the amount follows to card {holder:016d}, which replaced this one"
        # The chips do not see the follow: Mover moves both cards' chip
        # adjustments (migration 0018), so their next offline records compare right.
        await mover.flush(conn, terminal_id, r.terminal_seq)
        balance += mover.deltas.get(purse_account(card_no), 0)
        await conn.execute(
            "UPDATE terminal_txns SET reversed_by_seq = $3 "
            "WHERE terminal_id = $1 AND terminal_seq = $2",
            terminal_id,
            r.original_seq,
            r.terminal_seq,
        )
        # A reversed load was never completed by the card, whose next load
        # uses the same online counter again: give it back, unless a later
        # load has used the next one since.
        await conn.execute(
            """UPDATE cards SET online_counter = t.online_counter
               FROM terminal_txns t
               WHERE t.terminal_id = $1 AND t.terminal_seq = $2 AND t.kind = $4
                 AND cards.card_no = $3 AND cards.online_counter = t.online_counter + 1""",
            terminal_id,
            r.original_seq,
            card_no,
            int(TxnKind.LOAD),
        )
        views = await load_views(conn, [card_no, holder])
        details = {
            "original_seq": r.original_seq, "reversal_seq": r.terminal_seq,
            "amount": r.amount, "original_posting": posting["posting_id"],
        }  # fmt: skip
        if holder != card_no:
            details["credited_card"] = f"{holder:016d}"
        # A clerk reversing from the desk tool is named; a terminal's own
        # reversal is its terminal's.
        details["terminal"] = r.terminal_id
        staff = r.staff or f"terminal:{r.terminal_id}"
        await audit(conn, staff, "reverse", None, card_no, before, views[card_no], details)
        if holder != card_no:
            await audit(conn, staff, "reverse", None, holder, holder_before, views[holder], details)
    await conn.execute(
        """INSERT INTO terminal_txns (terminal_id, terminal_seq, card_no, kind, amount,
                                      fingerprint, status, balance_after, txn_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        terminal_id,
        r.terminal_seq,
        card_no,
        int(TxnKind.REVERSAL),
        r.amount,
        fp,
        int(status),
        balance,
        parse_datetime(r.date_time, "date_time"),
    )
    return TxnResult(status, balance, detail=detail)


async def _check(
    conn: Conn,
    r: Reversal,
    terminal_id: int,
    card_no: int,
    holder: asyncpg.Record,
    window: float,
) -> tuple[TxnStatus, str, asyncpg.Record | None]:
    """Whether the original may be reversed now, and its posting when it may.

    ``holder`` is the locked row of the card whose purse holds the money now:
    the card itself, or the last of its replacement chain.
    """
    original = await conn.fetchrow(
        """SELECT card_no, kind, amount, status, reversed_by_seq,
                  now() - received_at > make_interval(secs => $3) AS too_late
           FROM terminal_txns WHERE terminal_id = $1 AND terminal_seq = $2 FOR UPDATE""",
        terminal_id,
        r.original_seq,
        window,
    )
    what = f"terminal {r.terminal_id} seq {r.original_seq}"
    if original is None:
        return TxnStatus.NOT_REVERSIBLE, f"{what} is not a transaction the ledger knows", None
    if original["reversed_by_seq"] is not None:
        return (
            TxnStatus.ALREADY_REVERSED,
            f"{what} was reversed by seq {original['reversed_by_seq']}",
            None,
        )
    if original["kind"] not in (TxnKind.DEBIT, TxnKind.LOAD) or original["status"] != (
        TxnStatus.APPROVED
    ):
        return TxnStatus.NOT_REVERSIBLE, f"{what} is not an approved online debit or load", None
    if original["card_no"] != card_no or original["amount"] != r.amount:
        return TxnStatus.NOT_REVERSIBLE, f"{what} was for another card or amount", None
    # "Last" among what moved money: a refused debit or load after it (the
    # next passenger's card lost, or short) changed nothing a cashier undoes,
    # and a refused or approved reversal is not a sale.
    later = await conn.fetchval(
        """SELECT terminal_seq FROM terminal_txns
           WHERE terminal_id = $1 AND terminal_seq > $2 AND kind <> $3 AND status = $4
           ORDER BY terminal_seq LIMIT 1""",
        terminal_id,
        r.original_seq,
        int(TxnKind.REVERSAL),
        int(TxnStatus.APPROVED),
    )
    if later is not None:
        return (
            TxnStatus.NOT_REVERSIBLE,
            f"{what} is not the terminal's last transaction (seq {later} came after it)",
            None,
        )
    if original["too_late"]:
        return (
            TxnStatus.NOT_REVERSIBLE,
            f"{what} is older than the reversal window of {window:g} s",
            None,
        )
    posting = await conn.fetchrow(
        """SELECT posting_id, debit_account, credit_account FROM postings
           WHERE card_no = $1 AND terminal_id = $2 AND terminal_seq = $3 AND kind = ANY($4)""",
        card_no,
        terminal_id,
        r.original_seq,
        [int(PostingKind.PURCHASE), int(PostingKind.LOAD)],
    )
    assert posting is not None, "an approved online transaction always has its posting"
    refunded = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM postings WHERE corrects = $1", posting["posting_id"]
    )
    if refunded:
        return (
            TxnStatus.NOT_REVERSIBLE,
            f"{what} was refunded in part ({refunded} fen) by the desk; it cannot be reversed",
            None,
        )
    if holder["status"] == CardStatus.CLOSED:
        # A closed card takes no more money: its purse was settled with the
        # holder at the desk (paid out, or held for the refund job), so a
        # reversal put there would be stranded. The holder's claim on this
        # purchase is a case for the desk.
        closed = f"card {holder['card_no']:016d}"
        if holder["card_no"] != card_no:
            closed += f", which replaced card {r.card_no},"
        return (
            TxnStatus.NOT_REVERSIBLE,
            f"{closed} is closed (cancelled): the service desk settles {what} "
            "with the holder (dispute refund), a terminal cannot reverse it",
            None,
        )
    balance: int = holder["purse_balance"]
    if original["kind"] == TxnKind.LOAD and balance < r.amount:
        where = "" if holder["card_no"] == card_no else f" on card {holder['card_no']:016d}"
        return (
            TxnStatus.INSUFFICIENT_FUNDS,
            f"balance {balance} fen{where} is less than the load of {r.amount} fen to reverse",
            None,
        )
    return TxnStatus.APPROVED, "", posting
