"""The database transaction behind a batch of online debits and loads.

One batch is one transaction of two set-based statements, whatever its
size: one reads the earlier outcomes of the batch's (terminal, seq) keys and
locks its cards in card-number order (so concurrent batches from several
processes cannot deadlock); every item is then decided in arrival order
against the locked balances; one writes outcomes, postings, card balances
and the summed deltas of the hot system accounts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import asyncpg

from onecard.ledger.accounts import cash_code, payable_code, purse_account
from onecard.ledger.crypto.verifier import MAC_OK
from onecard.ledger.model import (
    CardStatus,
    Debit,
    Load,
    PostingKind,
    Product,
    TxnKind,
    TxnResult,
    TxnStatus,
)
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import Conn


class BatchRaced(Exception):
    """Another process committed one of this batch's (terminal, seq) keys first,
    or answered the MAC1 of a load this batch approves.

    The transaction is rolled back; running the batch again answers those
    items as duplicates (or the load as STALE_COUNTER).
    """


@dataclass(slots=True)
class Prepared:
    """One request with everything that can be worked out before the transaction."""

    request: Debit | Load
    kind: TxnKind
    card_no: int
    terminal_id: int
    fingerprint: bytes
    mac_code: int
    mac2: bytes
    txn_time: dt.datetime


@dataclass(slots=True)
class _Card:
    status: int
    balance: int
    product: str
    online_counter: int
    key_version: int
    delta: int = 0
    touched: bool = False


@dataclass(slots=True)
class _Writes:
    txns: list[list[object]] = field(default_factory=lambda: [[] for _ in range(13)])
    postings: list[list[object]] = field(default_factory=lambda: [[] for _ in range(7)])
    accounts: dict[int, int] = field(default_factory=dict)

    def outcome(self, p: Prepared, status: TxnStatus, balance: int, mac2: bytes | None) -> None:
        req = p.request
        card_balance, counter, random = (
            (req.old_balance, req.online_counter, req.card_random)
            if isinstance(req, Load)
            else (None, None, None)
        )
        row = (
            p.terminal_id,
            p.request.terminal_seq,
            p.card_no,
            int(p.kind),
            p.request.amount,
            p.fingerprint,
            int(status),
            balance,
            mac2,
            card_balance,
            p.txn_time,
            counter,
            random,
        )
        for col, value in zip(self.txns, row, strict=True):
            col.append(value)

    def posting(self, p: Prepared, debit: int, credit: int, kind: PostingKind) -> None:
        row = (
            p.card_no,
            debit,
            credit,
            p.request.amount,
            int(kind),
            p.terminal_id,
            p.request.terminal_seq,
        )
        for col, value in zip(self.postings, row, strict=True):
            col.append(value)
        self.accounts[debit] = self.accounts.get(debit, 0) - p.request.amount
        self.accounts[credit] = self.accounts.get(credit, 0) + p.request.amount


#: Slot rows per hot account (migration 0007): enough that the few sessions
#: writing at once (workers x flushers) rarely pick the same one.
ACCOUNT_SLOTS = 64


def hot_accounts(first: int) -> str:
    """A CTE that adds summed deltas to the hot system accounts.

    Parameters ``$first`` (account ids) and ``$first+1`` (deltas). The deltas
    go to the session's own slot row of each account (migration 0007), in
    account order, so concurrent batches neither wait for each other's COMMIT
    nor deadlock when two sessions share a slot.
    """
    ids, deltas = f"${first}::bigint[]", f"${first + 1}::bigint[]"
    return f"""accounts_moved AS (
    INSERT INTO account_slots (account_id, slot, balance)
    SELECT account_id, pg_backend_pid() % {ACCOUNT_SLOTS}, delta
    FROM unnest({ids}, {deltas}) AS d(account_id, delta)
    ORDER BY account_id
    ON CONFLICT (account_id, slot)
    DO UPDATE SET balance = account_slots.balance + excluded.balance
)"""


# A flush is BEGIN, one read, the decisions in Python, one write, COMMIT: every
# round trip to PostgreSQL is a wake-up of its backend on a busy machine, and
# an online flush of a few debits is mostly round trips (it was nine).

# The batch's earlier outcomes by (terminal, seq), and its cards locked in
# card-number order (so concurrent batches cannot deadlock), in one statement.
# Rows of the first kind have k = 1, of the second k = 2.
_READ = """
WITH earlier AS (
    SELECT t.terminal_id, t.terminal_seq, t.fingerprint, t.status, t.balance_after, t.mac2,
           t.reversed_by_seq
    FROM unnest($1::bigint[], $2::bigint[]) AS k(terminal_id, terminal_seq)
    JOIN terminal_txns t USING (terminal_id, terminal_seq)
), locked AS (
    SELECT card_no, status, purse_balance, product_code, online_counter, key_version
    FROM cards WHERE card_no = ANY($3::bigint[])
    ORDER BY card_no
    FOR UPDATE
), mac1_used AS (
    SELECT DISTINCT t.card_no, t.online_counter, t.card_random
    FROM unnest($4::bigint[], $5::integer[]) AS l(card_no, online_counter)
    JOIN terminal_txns t USING (card_no, online_counter)
    WHERE t.online_counter IS NOT NULL  -- any answer: only verified MAC1s are kept
)
SELECT 1 AS k, terminal_id AS id, terminal_seq AS seq, fingerprint, status,
       balance_after AS balance, mac2, NULL::text AS product, reversed_by_seq AS counter,
       NULL::smallint AS key_version
FROM earlier
UNION ALL
SELECT 2, card_no, NULL, NULL, status, purse_balance, NULL, product_code, online_counter,
       key_version
FROM locked
UNION ALL
SELECT 3, card_no, NULL, NULL, NULL, NULL, card_random, NULL, online_counter, NULL
FROM mac1_used
"""

# The reversals of a batch's earlier outcomes, read after its card locks are held.
_EARLIER_AGAIN = """
SELECT t.terminal_id, t.terminal_seq, t.reversed_by_seq
FROM unnest($1::bigint[], $2::bigint[]) AS k(terminal_id, terminal_seq)
JOIN terminal_txns t USING (terminal_id, terminal_seq)
"""

# Every write of the batch in one statement: outcomes, postings, card balances
# and the summed deltas of the hot system accounts. No ON CONFLICT on
# terminal_txns: the batch looked its keys up already, so a clash means another
# writer committed one meanwhile, and the batch runs again (BatchRaced).
_WRITE = f"""
WITH txns AS (
    INSERT INTO terminal_txns (terminal_id, terminal_seq, card_no, kind, amount, fingerprint,
                               status, balance_after, mac2, card_balance, txn_time,
                               online_counter, card_random)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[],
                         $5::bigint[], $6::bytea[], $7::smallint[], $8::bigint[], $9::bytea[],
                         $10::bigint[], $11::timestamp[], $12::integer[], $13::bytea[])
    ORDER BY 1, 2  -- key order, as uploads insert: unique-index waits cannot cross
), posted AS (
    INSERT INTO postings (card_no, debit_account, credit_account, amount, kind,
                          terminal_id, terminal_seq)
    SELECT * FROM unnest($14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[],
                         $18::smallint[], $19::bigint[], $20::bigint[])
), purses AS (
    UPDATE cards AS c
    SET purse_balance = c.purse_balance + d.delta,
        online_counter = greatest(c.online_counter, d.online_counter),
        last_used_at = now()
    FROM unnest($21::bigint[], $22::bigint[], $23::integer[])
         AS d(card_no, delta, online_counter)
    WHERE c.card_no = d.card_no
), {hot_accounts(24)}
-- MAC1s of the loads this batch approves that another transaction answered
-- (refused: 0011's unique index catches only approved ones) while the batch
-- waited for its card locks: _READ could not see them, this statement can.
SELECT count(*)
FROM unnest($3::bigint[], $12::integer[], $13::bytea[], $7::smallint[])
     AS n(card_no, online_counter, card_random, status)
JOIN terminal_txns t USING (card_no, online_counter, card_random)
WHERE n.status = {int(TxnStatus.APPROVED)} AND n.online_counter IS NOT NULL  -- loads only
  AND t.online_counter IS NOT NULL
"""


async def apply_terminal_batch(
    conn: Conn, ref: ReferenceData, items: list[Prepared]
) -> list[TxnResult]:
    """Decide and record every item; the caller replies only after this returns."""
    loads = [(p.card_no, p.request.online_counter) for p in items if isinstance(p.request, Load)]
    async with conn.transaction():
        rows = await conn.fetch(
            _READ,
            [p.terminal_id for p in items],
            [p.request.terminal_seq for p in items],
            sorted({p.card_no for p in items}),
            [card for card, _ in loads],
            [counter for _, counter in loads],
        )
        seen: dict[tuple[int, int], _Earlier] = {}
        cards: dict[int, _Card] = {}
        mac1_used: set[tuple[int, int, bytes]] = set()
        for r in rows:
            if r["k"] == 3:
                mac1_used.add((r["id"], r["counter"], r["mac2"]))
            elif r["k"] == 1:
                seen[(r["id"], r["seq"])] = (
                    r["fingerprint"],
                    TxnStatus(r["status"]),
                    r["balance"],
                    r["mac2"] or b"",
                    r["counter"],
                )
            else:
                cards[r["id"]] = _Card(
                    r["status"], r["balance"], r["product"], r["counter"], r["key_version"]
                )
        if seen:
            # Retries in the batch: read their outcomes again. The read above
            # saw the database as it was before it waited for the card locks,
            # and a reversal holds its card's lock until it commits: a retry
            # of a load reversed meanwhile was handed the reversed load's MAC2.
            # Now that this batch holds the locks, nothing it reads can change.
            ids, seqs = zip(*seen, strict=True)
            for r in await conn.fetch(_EARLIER_AGAIN, list(ids), list(seqs)):
                fingerprint, status, balance, mac2, _ = seen[r["terminal_id"], r["terminal_seq"]]
                seen[r["terminal_id"], r["terminal_seq"]] = (
                    fingerprint, status, balance, mac2, r["reversed_by_seq"],
                )  # fmt: skip
        writes = _Writes()
        results = [_decide(p, seen, cards, mac1_used, ref, writes) for p in items]

        if writes.txns[0]:
            touched = [(no, c) for no, c in cards.items() if c.touched]
            system = sorted(a for a in writes.accounts if a < purse_account(0))
            try:
                spent = await conn.fetchval(
                    _WRITE,
                    *writes.txns,
                    *writes.postings,
                    [no for no, _ in touched],
                    [c.delta for _, c in touched],
                    [c.online_counter for _, c in touched],
                    system,
                    [writes.accounts[a] for a in system],
                )
            except asyncpg.UniqueViolationError:
                # Another writer committed one of our keys since _READ looked;
                # the batch runs again and answers it as a duplicate.
                raise BatchRaced() from None
            if spent:
                # A copy of an approved load's MAC1 was refused by another
                # transaction while this one waited for the card: it is spent
                # (README), so roll back and run again, which answers the load
                # STALE_COUNTER. Refused copies may repeat a MAC1, so no index
                # can hold them unique, and re-reading them after the locks
                # would cost every batch with a load a round trip.
                raise BatchRaced()
    return results


#: An earlier outcome of a (terminal, seq): fingerprint, status, balance
#: after, MAC2, and the seq of the reversal that undid it (None if none).
_Earlier = tuple[bytes, TxnStatus, int, bytes, int | None]


def _decide(
    p: Prepared,
    seen: dict[tuple[int, int], _Earlier],
    cards: dict[int, _Card],
    mac1_used: set[tuple[int, int, bytes]],
    ref: ReferenceData,
    writes: _Writes,
) -> TxnResult:
    req = p.request
    what = "TAC" if p.kind is TxnKind.DEBIT else "MAC1"
    if p.mac_code != MAC_OK:
        # Content nobody vouches for claims no (terminal, seq) identity and is
        # told nothing about the card: a request damaged on its way must not
        # turn the genuine one sent again into a CONFLICT (the chip has paid
        # already), nor can forged requests use up a terminal's sequence
        # numbers or read balances. Nothing is written; the engine logs it.
        return TxnResult(TxnStatus.MAC_INVALID, detail=f"{what} does not verify")
    card = cards.get(p.card_no)
    if card is not None and card.key_version != req.key_version:
        # The MAC verified under the key version the request names, but the
        # card was issued under another: whoever holds an old (or broken)
        # version's keys must not be able to sign for newer cards.
        return TxnResult(
            TxnStatus.MAC_INVALID,
            detail=f"{what} does not verify under the card's key version",
        )
    key = (p.terminal_id, req.terminal_seq)
    earlier = seen.get(key)
    if earlier is not None:
        fingerprint, status, balance, mac2, reversed_by = earlier
        if fingerprint != p.fingerprint:
            return TxnResult(
                TxnStatus.CONFLICT,
                detail=f"terminal {req.terminal_id} seq {req.terminal_seq} was used before "
                "with different content",
            )
        if reversed_by is not None:
            # The terminal reversed it (a load the card never completed): a
            # retry must not hand out the MAC2 that would credit the chip now.
            return TxnResult(
                TxnStatus.ALREADY_REVERSED,
                card.balance if card is not None else 0,
                original_status=status,
                detail=f"terminal {req.terminal_id} seq {req.terminal_seq} was reversed "
                f"by seq {reversed_by}",
            )
        return TxnResult(TxnStatus.DUPLICATE, balance, mac2, original_status=status)

    operator = ref.terminal_operator.get(p.terminal_id)
    if operator is None:
        return TxnResult(
            TxnStatus.UNKNOWN_TERMINAL, detail=f"terminal {req.terminal_id} is not registered"
        )

    result = _decide_new(p, card, mac1_used, ref, operator, writes)
    if isinstance(req, Load):
        # Answered, whatever the answer: its MAC1 is spent (see _decide_new).
        mac1_used.add((p.card_no, req.online_counter, req.card_random))
    writes.outcome(p, result.status, result.balance_after, result.mac2 or None)
    seen[key] = (p.fingerprint, result.status, result.balance_after, result.mac2, None)
    return result


def _decide_new(
    p: Prepared,
    card: _Card | None,
    mac1_used: set[tuple[int, int, bytes]],
    ref: ReferenceData,
    operator: str,
    writes: _Writes,
) -> TxnResult:
    req = p.request
    if card is None:
        return TxnResult(TxnStatus.UNKNOWN_CARD, detail=f"card {req.card_no} is not issued")
    balance = card.balance
    if card.status != CardStatus.ACTIVE:
        return TxnResult(
            TxnStatus.CARD_NOT_ACTIVE,
            balance,
            detail=f"card is {CardStatus(card.status).name.lower()}",
        )
    product: Product = ref.product(card.product)
    if isinstance(req, Debit):
        if req.amount > product.txn_max:
            return TxnResult(
                TxnStatus.OVER_LIMIT,
                balance,
                detail=f"amount {req.amount} fen is over the per-transaction limit "
                f"{product.txn_max} fen of product {product.code}",
            )
        if balance < req.amount:
            return TxnResult(
                TxnStatus.INSUFFICIENT_FUNDS,
                balance,
                detail=f"balance {balance} fen is less than amount {req.amount} fen",
            )
        card.balance -= req.amount
        card.delta -= req.amount
        # The chip counts it among its purchases, at a counter the request does
        # not carry: an upload puts a gap in the offline counters down to the
        # online debits dated inside it (offline_batch._counter_exception).
        card.touched = True
        writes.posting(
            p,
            purse_account(p.card_no),
            ref.account_id(payable_code(operator)),
            PostingKind.PURCHASE,
        )
        return TxnResult(TxnStatus.APPROVED, card.balance)

    # MAC1 is bound to the counter and the card's random, and nothing else
    # makes it single-use: the same MAC1 under a new terminal seq would credit
    # the purse again for one top-up on the chip. Spent is any MAC1 the ledger
    # answered, refused ones too: a load refused (card lost, over the limit)
    # left the chip as it was and its cash went back, yet the same bytes sent
    # later under a new seq, once the card was active again, were credited
    # for nothing (found by review). The card's own retry comes with a fresh
    # random, the terminal's own retry under its seq is a DUPLICATE, and a
    # MAC1 that does not verify is never kept. A chip moves past a counter
    # only by completing a load at it, so it never shows one below the last
    # approved load's; at that one it may come again with a fresh random, when
    # the last load's MAC2 never reached it (migration 0010).
    used = (p.card_no, req.online_counter, req.card_random)
    if req.online_counter < card.online_counter - 1 or used in mac1_used:
        return TxnResult(
            TxnStatus.STALE_COUNTER,
            balance,
            detail=f"online counter {req.online_counter} with this card random was used by "
            f"an earlier load; the card's next counter is {card.online_counter}",
        )
    # A load: the card will hold old_balance + amount; the ledger's purse may be
    # higher while offline purchases are still on their way, so both must fit.
    ceiling = max(balance, req.old_balance) + req.amount
    if ceiling > product.purse_max:
        return TxnResult(
            TxnStatus.OVER_LIMIT,
            balance,
            detail=f"balance after load {ceiling} fen would be over the purse maximum "
            f"{product.purse_max} fen of product {product.code}",
        )
    card.balance += req.amount
    card.delta += req.amount
    card.online_counter = max(card.online_counter, req.online_counter + 1)
    card.touched = True
    writes.posting(
        p,
        ref.account_id(cash_code(req.card_no[:4], req.channel.code)),
        purse_account(p.card_no),
        PostingKind.LOAD,
    )
    return TxnResult(TxnStatus.APPROVED, card.balance, p.mac2)
