"""The ledger's entry points: batch calls over a pool, and group commit in front of them.

Calls follow TigerBeetle's naming: plural batch calls (``create_debits``,
``create_loads``, ``lookup_cards``) that answer one result per item, in
order. ``submit_debit``/``submit_load`` put a single request through the
group committer, which is how the server reaches ``create_*`` under load.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from onecard.ledger.batcher import GroupCommitter
from onecard.ledger.crypto.encoding import parse_datetime
from onecard.ledger.crypto.verifier import CardVerifier, LoadCheck, PurchaseCheck
from onecard.ledger.desk import CardLifecycle
from onecard.ledger.keys import KeyStore
from onecard.ledger.lifecycle import DeskSettings
from onecard.ledger.model import (
    CardIssue,
    CardView,
    Debit,
    DeskResult,
    Load,
    OfflineRecord,
    OfflineResult,
    TxnKind,
    TxnResult,
    TxnStatus,
)
from onecard.ledger.refdata import AccountsMissing, ReferenceData, StaleReference
from onecard.ledger.refdata_watch import RefdataWatch
from onecard.ledger.storage import CardsHeld, Conn, Contention
from onecard.ledger.storage import cards as card_store
from onecard.ledger.storage.offline_batch import (
    PreparedRecord,
    apply_offline_batch,
)
from onecard.ledger.storage.terminal_batch import BatchRaced, Prepared, apply_terminal_batch
from onecard.ledger.validation import Limits, check_card_issue, issuer_of

log = logging.getLogger(__name__)
_blake2b = hashlib.blake2b
P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 1000
    max_queue: int = 10_000
    #: How long a flusher waits for company after the previous batch
    #: committed. Measured with 128 debits in flight on two workers: 0 ms gave
    #: 4,500 debits/s (PostgreSQL 75 us and a worker 250 us of CPU per
    #: debit, most of it per-flush overhead of batches of a few debits);
    #: 2 ms gave 5,450/s (50 and 204 us). Open loop it costs 2-3 ms of p50 at
    #: 1,000 debits/s and lowered p99 at 3,000/s (166 -> 117 ms).
    linger: float = 0.002
    #: Offline uploads have their own committer: a 5,000-record upload must
    #: not sit in front of online debits a passenger is waiting for. This
    #: bounds one upload transaction (a gateway batch is never split, so a
    #: larger one goes alone). An upload holds its cards' locks until its
    #: COMMIT, so during an upload surge a smaller bound cuts the debits'
    #: waits, at some upload throughput (python -m benchmarks.upload_surge).
    upload_max_batch: int = 5000
    upload_max_queue: int = 50_000
    #: Upload transactions in flight at once: while one is in PostgreSQL the
    #: other runs its Python half (measured: 11k -> 14.6k records/s). A stream
    #: has one batch in the ledger at a time, so its batches stay in order.
    upload_flushers: int = 2


#: Committer names, as metrics and logs label them.
ONLINE_COMMITTER = "group-commit"
UPLOAD_COMMITTER = "group-commit-uploads"
#: Seconds a close waits for its flushes to fail once their connections were
#: terminated (they fail at once: this only bounds the unforeseen).
ABANDONED_WAIT_S = 5.0
#: Held cards remembered at most (a few stuck rows at a time is already an
#: incident); the oldest is forgotten first and, if still held, costs one
#: more lock timeout to find again.
MAX_HELD_REMEMBERED = 1024


def _txn_time(s: str) -> dt.datetime:
    return parse_datetime(s)  # validated already; cached


# One BLAKE2b-128 state copied per fingerprint: constructing a hasher with
# digest_size (keyword parsing) cost 0.46 us a record, a copy 0.34.
_FINGERPRINT = _blake2b(digest_size=16)


def _digest(text: str) -> bytes:
    h = _FINGERPRINT.copy()
    h.update(text.encode())
    return h.digest()


def fingerprint(req: Debit | Load | OfflineRecord) -> bytes:
    """What makes a retry "the same request": every field the terminal sent.

    A purchase has the same fingerprint online and offline (the fields its TAC
    covers), so an offline copy of an approved online debit is a duplicate.
    """
    if isinstance(req, Debit | OfflineRecord):
        return purchase_fingerprint(
            req.card_no, req.amount, req.txn_type, req.date_time, req.key_version, req.tac
        )
    parts = (
        "L",
        req.card_no,
        req.amount,
        req.txn_type,
        req.date_time,
        req.key_version,
        req.card_random.hex(),
        req.online_counter,
        req.old_balance,
        req.mac1.hex(),
        int(req.channel),
    )
    return _digest(repr(parts))


def purchase_fingerprint(
    card_no: str, amount: int, txn_type: int, date_time: str, key_version: int, tac: bytes
) -> bytes:
    """A purchase's fingerprint from its fields (uploads call it per record).

    Exactly repr() of the tuple ("D", card_no, amount, txn_type, date_time,
    key_version, tac hex), the form stored fingerprints were made with (tests
    pin it), written out: an int's repr is its str.
    """
    return _digest(
        f"('D', {card_no!r}, {amount}, {txn_type}, {date_time!r}, {key_version}, '{tac.hex()}')"
    )


def _refuse_if_lacking(lacking: AccountsMissing | None) -> None:
    """Raise ``lacking``, logged for the operator who must set the accounts up."""
    if lacking is not None:
        log.error("%s (refusing the requests that post to it)", lacking)
        raise lacking


class Ledger:
    def __init__(
        self,
        pool: asyncpg.Pool,
        keys: KeyStore,
        verifier: CardVerifier,
        ref: ReferenceData,
        limits: Limits | None = None,
        batching: BatchSettings | None = None,
        desk: DeskSettings | None = None,
        on_flush: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.verifier = verifier
        self.ref = ref
        self.limits = limits or Limits()
        b = batching or BatchSettings()
        self._committer: GroupCommitter[Debit | Load, TxnResult] = GroupCommitter(
            self._create_terminal_txns,
            max_batch=b.max_batch,
            max_queue=b.max_queue,
            linger=b.linger,
            name=ONLINE_COMMITTER,
            on_flush=on_flush,
        )
        self._uploads: GroupCommitter[PreparedRecord, OfflineResult] = GroupCommitter(
            self._apply_offline_records,
            max_batch=b.upload_max_batch,
            max_queue=b.upload_max_queue,
            linger=b.linger,
            name=UPLOAD_COMMITTER,
            flushers=b.upload_flushers,
            on_flush=on_flush,
        )
        #: Cards found held past the lock timeout, oldest first: a batch with
        #: one of them asks first whether it is still held (without waiting),
        #: so that its terminal's resends are refused at once and do not make
        #: every batch they land in wait the lock timeout out again. One
        #: memory per kind of batch (keyed by ``successors``): an upload of a
        #: replaced card is held by its successor's row, an online debit of it
        #: is not, and with one memory the debit struck the card off.
        self._held: dict[bool, dict[int, None]] = {False: {}, True: {}}
        #: The service desk's card lifecycle (loss, replacement, cancellation, ...).
        self.lifecycle = CardLifecycle(pool, ref, keys, self.limits, desk or DeskSettings())
        #: Re-reads ``ref`` when the database says it changed (see ``open``).
        self.refdata_watch: RefdataWatch | None = None

    @classmethod
    async def open(
        cls,
        pool: asyncpg.Pool,
        keys: KeyStore,
        verifier: CardVerifier,
        limits: Limits | None = None,
        batching: BatchSettings | None = None,
        desk: DeskSettings | None = None,
        on_flush: Callable[[str, int, float], None] | None = None,
        listen: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> Ledger:
        """``listen`` opens a connection of its own for hearing of reference data changes.

        Without it (tools, tests that need no other writer) the copy read here
        is re-read only for ids it does not know.
        """
        async with pool.acquire() as conn:
            ref = await ReferenceData.load(conn)
        ledger = cls(pool, keys, verifier, ref, limits, batching, desk, on_flush)
        if listen is not None:
            ledger.refdata_watch = RefdataWatch(ref, pool, listen)
            await ledger.refdata_watch.start()
        ledger._committer.start()
        ledger._uploads.start()
        ledger.lifecycle.start()
        return ledger

    async def close(self, timeout: float | None = None) -> bool:
        """Finish every queued request (each gets its reply), then stop; False if abandoned.

        ``timeout``: seconds to wait for that (None: as long as it takes).
        Without a bound, a database that stopped answering without closing
        its connections (a partition, a paused VM, a storage stall) held the
        close, and a server's stop with it, for ever. Past it what is left is
        abandoned: every queued request and every request in a flush is told
        ShuttingDown (UNAVAILABLE: retry; none is answered as committed), the
        pool's connections are terminated so that the flushes fail at once,
        and what was abandoned is logged.
        """
        closing = asyncio.ensure_future(self._close())
        done, _ = await asyncio.wait((closing,), timeout=timeout)
        if done:
            closing.result()
            return True
        assert timeout is not None
        abandoned = {c.name: c.abandon() for c in (self._committer, self._uploads)}
        log.error(
            "the database did not answer within %gs of the stop: abandoned %s (each caller "
            "is told to retry, UNAVAILABLE; none was told its request committed); "
            "terminating the pool's connections",
            timeout,
            "; ".join(
                f"{name}: {queued} requests queued, {flushing} in a transaction"
                for name, (queued, flushing) in abandoned.items()
            ),
        )
        self.pool.terminate()
        done, _ = await asyncio.wait((closing,), timeout=ABANDONED_WAIT_S)
        if not done:
            # Something waits on no connection of the pool: its callers are
            # told ShuttingDown as the flushers are cancelled.
            log.error("still closing %gs after the connections went: cancelled", ABANDONED_WAIT_S)
            closing.cancel()
            await asyncio.wait((closing,), timeout=ABANDONED_WAIT_S)
        if closing.done() and not closing.cancelled() and closing.exception() is not None:
            log.error("closing after the database was abandoned: %r", closing.exception())
        return False

    async def _close(self) -> None:
        if self.refdata_watch is not None:
            await self.refdata_watch.close()
        await self.lifecycle.close()
        await self._committer.close()
        await self._uploads.close()

    @property
    def committer(self) -> GroupCommitter[Debit | Load, TxnResult]:
        return self._committer

    def queued(self) -> dict[str, int]:
        """Items waiting for a transaction (not those in one), by committer name."""
        return {c.name: len(c) for c in (self._committer, self._uploads)}

    # -- terminal transactions ---------------------------------------------

    async def submit_debit(self, debit: Debit) -> TxnResult:
        return await self._committer.submit(debit)

    async def submit_load(self, load: Load) -> TxnResult:
        return await self._committer.submit(load)

    async def create_debits(self, debits: Sequence[Debit]) -> list[TxnResult]:
        return await self._create_terminal_txns(list(debits))

    async def create_loads(self, loads: Sequence[Load]) -> list[TxnResult]:
        return await self._create_terminal_txns(list(loads))

    async def create_terminal_txns(self, items: Sequence[Debit | Load]) -> list[TxnResult]:
        """Debits and loads in one transaction, in order, as the online committer mixes them."""
        return await self._create_terminal_txns(list(items))

    def _prepare(self, items: list[Debit | Load]) -> list[Prepared]:
        """MAC checks for the whole batch in one call, outside the transaction."""
        debit_idx = [i for i, r in enumerate(items) if isinstance(r, Debit)]
        load_idx = [i for i, r in enumerate(items) if isinstance(r, Load)]
        codes = [0] * len(items)
        mac2s = [b""] * len(items)
        if debit_idx:
            checks = []
            for i in debit_idx:
                d = items[i]
                assert isinstance(d, Debit)
                checks.append(
                    PurchaseCheck(
                        issuer_of(d.card_no),
                        d.key_version,
                        d.card_no,
                        d.amount,
                        d.txn_type,
                        d.terminal_id,
                        d.terminal_seq,
                        d.date_time,
                        d.tac,
                    )
                )
            for i, code in zip(debit_idx, self.verifier.verify_purchases(checks), strict=True):
                codes[i] = code
        if load_idx:
            lchecks = []
            for i in load_idx:
                ld = items[i]
                assert isinstance(ld, Load)
                lchecks.append(
                    LoadCheck(
                        issuer_of(ld.card_no),
                        ld.key_version,
                        ld.card_no,
                        ld.card_random,
                        ld.online_counter,
                        ld.old_balance,
                        ld.amount,
                        ld.txn_type,
                        ld.terminal_id,
                        ld.date_time,
                        ld.mac1,
                    )
                )
            for i, (code, mac2) in zip(load_idx, self.verifier.verify_loads(lchecks), strict=True):
                codes[i] = code
                mac2s[i] = mac2
        return [
            Prepared(
                request=r,
                kind=TxnKind.DEBIT if isinstance(r, Debit) else TxnKind.LOAD,
                card_no=int(r.card_no),
                terminal_id=int(r.terminal_id),
                fingerprint=fingerprint(r),
                mac_code=codes[i],
                mac2=mac2s[i],
                txn_time=_txn_time(r.date_time),
            )
            for i, r in enumerate(items)
        ]

    async def _create_terminal_txns(self, items: list[Debit | Load]) -> list[TxnResult]:
        prepared = self._prepare(items)
        results = await self._apply(
            apply_terminal_batch,
            prepared,
            {p.terminal_id for p in prepared},
            lambda: [p.card_no for p in prepared],
            lambda terminals: self._accounts_missing_online(items, terminals),
        )
        for p, r in zip(prepared, results, strict=True):
            if r.status is TxnStatus.MAC_INVALID:
                # Recorded nowhere else (it claims no identity): operations
                # watch this line for a faulty or hostile terminal.
                log.warning(
                    "terminal %012d seq %d card %s: %s, refused",
                    p.terminal_id,
                    p.request.terminal_seq,
                    p.request.card_no,
                    r.detail,
                )
        return results

    def _accounts_missing_online(
        self, items: list[Debit | Load], terminals: set[int]
    ) -> AccountsMissing | None:
        """The batch's debits at terminals without a payable, and loads without a cash account.

        A load posts cash to purse and needs no payable (an issuer's own top-up
        machines may have none). Which requests are refused is decided here,
        once: a re-read of the reference data before the committer asks
        ``holds`` must not change the answer for the request it was raised for.
        """
        ref = self.ref
        # The usual case in two set look-ups per distinct terminal and one per load.
        lacking_payable = ref.payable_missing(terminals)
        loads_lack = any(
            isinstance(r, Load) and ref.cash_missing(r.card_no, r.channel) for r in items
        )
        if not lacking_payable and not loads_lack:
            return None
        needs: dict[int, str] = {}
        for r in items:
            code = (
                ref.cash_missing(r.card_no, r.channel)
                if isinstance(r, Load)
                else lacking_payable.get(int(r.terminal_id))
            )
            if code:
                needs[id(r)] = code
        if not needs:
            return None  # only loads at those terminals: they need no payable
        # Keyed by identity: the committer asks about the very objects given to the flush.
        return AccountsMissing(needs.values(), lambda item: id(item) in needs)

    def _accounts_missing_upload(self, terminals: set[int]) -> AccountsMissing | None:
        """The batch's records of terminals whose operator has no payable account."""
        payables = self.ref.payable_missing(terminals)
        if not payables:
            return None
        return AccountsMissing(payables.values(), lambda item: item.terminal_id in payables)

    async def _apply(
        self,
        apply: Callable[[Conn, ReferenceData, list[P]], Awaitable[list[R]]],
        prepared: list[P],
        terminals: set[int],
        cards: Callable[[], list[int]],
        missing: Callable[[set[int]], AccountsMissing | None],
        successors: bool = False,
    ) -> list[R]:
        """Run one batch transaction; again if another writer raced it.

        Each failure below rolled the transaction back whole, so running the
        batch again is safe: a (terminal, seq) another writer committed
        meanwhile is answered as a duplicate, a deadlock victim (two flushes
        of other processes meeting in the other order) just runs again, and
        reference data another process added is read before the rerun. A
        lock wait past the lock timeout names the cards held (CardsHeld), so
        the committer can write the rest without them.
        """
        async with self.pool.acquire() as conn:
            unknown = terminals - self.ref.terminal_operator.keys()
            if unknown:
                await self.ref.learn_terminals(conn, unknown)
            lacking = missing(terminals)
            if lacking is not None:
                await self.ref.learn_accounts(conn, lacking.codes)
                _refuse_if_lacking(missing(terminals))
            remembered = self._held[successors]
            if remembered:
                await self._refuse_still_held(conn, remembered, cards(), successors)
            refreshed = False
            for attempt in range(5):
                try:
                    return await apply(conn, self.ref, prepared)
                except (BatchRaced, asyncpg.DeadlockDetectedError) as exc:
                    log.info(
                        "batch raced another writer (%s); retry %d", type(exc).__name__, attempt
                    )
                    await asyncio.sleep(0.001 * (attempt + 1))
                except StaleReference:
                    if refreshed:
                        raise
                    await self.ref.refresh(conn)
                    refreshed = True
                    # The copy learned something since the check above (an
                    # issuer, a terminal another task re-read): ask again, so
                    # that a request needing a missing account fails alone.
                    _refuse_if_lacking(missing(terminals))
                except asyncpg.LockNotAvailableError:
                    # A card's row held past the lock timeout (a session left
                    # open on it): refuse only its requests, so that the
                    # committer writes the rest of the batch without them.
                    held = await card_store.held_cards(conn, cards(), successors=successors)
                    if not held:
                        raise
                    log.warning(
                        "cards %s held by another database session past the lock timeout: "
                        "their requests are refused for a retry, the rest of the batch goes on",
                        ", ".join(f"{c:016d}" for c in sorted(held)),
                    )
                    for card_no in held:
                        remembered[card_no] = None
                    while len(remembered) > MAX_HELD_REMEMBERED:
                        del remembered[next(iter(remembered))]
                    raise CardsHeld(held) from None
            raise Contention("batch kept racing concurrent writers; retry")

    @staticmethod
    async def _refuse_still_held(
        conn: Conn, remembered: dict[int, None], card_nos: list[int], successors: bool
    ) -> None:
        """Refuse at once the requests for cards still held since a batch waited on them.

        Without this, each resend of a held card's request put the batch it
        landed in through the whole lock timeout again, and the requests
        waiting behind that batch ran out of time (DEADLINE_EXCEEDED) instead
        of being written. A card found free is forgotten.
        """
        suspects = remembered.keys() & set(card_nos)
        if not suspects:
            return
        still = await card_store.held_cards(conn, sorted(suspects), successors=successors)
        for card_no in suspects - still:
            remembered.pop(card_no, None)
        if still:
            raise CardsHeld(still)

    # -- offline uploads -------------------------------------------------------

    async def submit_offline_records(self, records: list[OfflineRecord]) -> list[OfflineResult]:
        """One gateway batch through the upload committer; it commits as a whole."""
        # Refused before any MAC check when the queue is full: a refusal used
        # to cost the whole batch's MAC checks and fingerprints first, work
        # done only to be thrown away, and refusals are most of an overload.
        self._uploads.check_room(len(records))
        # MAC checks and parsing happen here, per gateway batch, while other
        # batches are in the database: only the transaction is serialized.
        return await self._uploads.submit_many(self._prepare_records(records))

    async def create_offline_records(self, records: Sequence[OfflineRecord]) -> list[OfflineResult]:
        return await self._create_offline_records(list(records))

    def _prepare_records(self, items: list[OfflineRecord]) -> list[PreparedRecord]:
        # Positional construction and tuple unpacking throughout: this runs
        # once per uploaded record (keywords cost 0.3 us a record here).
        codes = self.verifier.verify_purchases(
            [
                PurchaseCheck(issuer_of(card_no), kv, card_no, amount, ttype, term, seq, when, tac)
                for card_no, amount, ttype, term, seq, when, kv, tac, _, _ in items
            ]
        )
        return [
            PreparedRecord(
                r,
                int(r.card_no),
                int(r.terminal_id),
                purchase_fingerprint(
                    r.card_no, r.amount, r.txn_type, r.date_time, r.key_version, r.tac
                ),
                code,
                _txn_time(r.date_time),
            )
            for r, code in zip(items, codes, strict=True)
        ]

    async def _create_offline_records(self, items: list[OfflineRecord]) -> list[OfflineResult]:
        return await self._apply_offline_records(self._prepare_records(items))

    async def _apply_offline_records(self, prepared: list[PreparedRecord]) -> list[OfflineResult]:
        return await self._apply(
            apply_offline_batch,
            prepared,
            {p.terminal_id for p in prepared},
            lambda: [p.card_no for p in prepared],
            self._accounts_missing_upload,
            successors=True,  # a replaced card's record locks its successors too
        )

    # -- cards ---------------------------------------------------------------

    async def issue_card(self, issue: CardIssue) -> DeskResult:
        """Raises FieldError for a request that breaks a rule; nothing is written then."""
        if issue.card_no[:4] not in self.ref.issuers or issue.product not in self.ref.products:
            async with self.pool.acquire() as conn:
                await self.ref.refresh(conn)
        check_card_issue(issue, self.ref, self.keys)
        return await card_store.issue_card(self.pool, self.ref, issue)

    async def lookup_cards(self, card_nos: Sequence[str]) -> list[CardView | None]:
        async with self.pool.acquire() as conn:
            return await card_store.lookup_cards(conn, card_nos)
