"""The card lifecycle as the ledger offers it: field rules first, then one transaction each.

Every method raises FieldError (INVALID_ARGUMENT on the wire) for a request
that breaks a field rule, before anything touches the database; business
refusals come back as statuses in the outcome. Held refunds are paid by a
periodic task this object owns, and by :meth:`pay_due_refunds` for tests and
tools that cannot wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.denylist import (
    MAX_PAGE_SIZE,
    DenyListCursor,
    DenyListPage,
    deny_list_since,
)
from onecard.ledger.keys import KeyStore
from onecard.ledger.lifecycle import (
    Cancellation,
    CardAction,
    DeskOutcome,
    DeskSettings,
    DisputeRefund,
    HistoryPage,
    HistoryQuery,
    Replacement,
    Reversal,
    check_reversal,
    check_rfc3339,
    check_text,
)
from onecard.ledger.model import CardView, ProtectedHolder, TxnResult
from onecard.ledger.pii import HolderDetails, PiiProtector, normalise_id_number
from onecard.ledger.refdata import ReferenceData, StaleReference
from onecard.ledger.storage import Conn
from onecard.ledger.storage import lifecycle as store
from onecard.ledger.storage.reversal import reverse
from onecard.ledger.validation import Limits, check_amount, check_digits, check_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")


class CardLifecycle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        ref: ReferenceData,
        keys: KeyStore,
        limits: Limits,
        settings: DeskSettings,
    ) -> None:
        self.pool = pool
        self.ref = ref
        self.keys = keys
        self.limits = limits
        self.settings = settings
        self.pii = PiiProtector(settings.pii_key or os.urandom(32))
        self._job: asyncio.Task[None] | None = None

    def _ctx(self) -> store.Context:
        return store.Context(self.ref, self.pii, self.settings.refund_hold)

    # -- the refund job ----------------------------------------------------------

    def start(self) -> None:
        if self.settings.refund_job_interval > 0 and self._job is None:
            self._job = asyncio.create_task(self._refund_loop(), name="held-refunds")

    async def close(self) -> None:
        if self._job is not None:
            self._job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._job
            self._job = None

    async def _refund_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refund_job_interval)
            try:
                paid = await self.pay_due_refunds()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The next round retries; each refund is its own transaction.
                log.warning("held-refund job: database unavailable (%s)", type(exc).__name__)
                continue
            except Exception:
                # Anything else ended the job for good, without a word, and
                # every later held refund of this process waited unpaid.
                log.exception("held-refund job: a round failed; the next one retries")
                continue
            if paid:
                log.info("held-refund job: paid %d held refunds", len(paid))

    async def pay_due_refunds(self, as_of: dt.datetime | None = None) -> list[str]:
        """Pay every held refund whose hold ended by ``as_of`` (default: now)."""
        return await self._fresh(lambda: store.pay_due_refunds(self._ctx(), self.pool, as_of))

    # -- enquiry -----------------------------------------------------------------

    def protect_holder(self, holder: HolderDetails) -> ProtectedHolder | None:
        return self.pii.protect(holder)

    async def enquire(self, card_no: str) -> CardView | None:
        check_digits(card_no, 16, "card_number")
        async with self.pool.acquire() as conn:
            return await store.load_view(conn, int(card_no))

    async def history(self, q: HistoryQuery) -> HistoryPage | None:
        check_digits(q.card_no, 16, "card_number")
        check_rfc3339(q.since, "from_time")
        check_rfc3339(q.until, "to_time")
        most = self.settings.max_page_size
        if not 0 <= q.page_size <= most:
            # Refused, not clamped, like the deny list's: a limit is reported
            # in the error it causes (DESIGN.md, decision 9).
            raise FieldError(
                "page_size",
                f"must be 0 (default {store.DEFAULT_PAGE_SIZE}) to {most}, got {q.page_size}",
            )
        async with self.pool.acquire() as conn:
            return await store.history(self.ref, conn, q)

    async def deny_list(
        self, since_version: int, page_size: int = 0, page_token: str = ""
    ) -> DenyListPage:
        """One page of the deny list (all of it when ``page_size`` is 0)."""
        if since_version < 0:
            raise FieldError("since_version", f"must not be negative, got {since_version}")
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise FieldError(
                "page_size", f"must be 0 (everything) to {MAX_PAGE_SIZE}, got {page_size}"
            )
        cursor = None
        if page_token:
            try:
                cursor = DenyListCursor.parse(page_token)
            except ValueError:
                raise FieldError(
                    "page_token", "is not a next_page_token this ledger gave out"
                ) from None
            if not page_size:
                raise FieldError("page_size", "must be set to continue a paged walk, got 0")
        async with self.pool.acquire() as conn:
            return await deny_list_since(conn, since_version, page_size, cursor)

    # -- actions -----------------------------------------------------------------

    async def report_loss(self, a: CardAction) -> DeskOutcome:
        self._check_action(a.request_id, a.card_no)
        fp = store.fingerprint("report_loss", a.card_no, self._id_digest(a.holder_id_number))
        return await self._run("report_loss", a.request_id, fp, a.staff_id, a.card_no, a)

    async def release_loss(self, a: CardAction) -> DeskOutcome:
        self._check_action(a.request_id, a.card_no)
        fp = store.fingerprint("release_loss", a.card_no, self._id_digest(a.holder_id_number))
        return await self._run("release_loss", a.request_id, fp, a.staff_id, a.card_no, a)

    async def replace_card(self, r: Replacement) -> DeskOutcome:
        self._check_action(r.request_id, r.card_no)
        check_digits(r.new_card_no, 16, "new_card_number")
        if r.new_card_no == r.card_no:
            raise FieldError("new_card_number", "must differ from the card it replaces")
        if r.new_card_no[:4] != r.card_no[:4]:
            raise FieldError(
                "new_card_number",
                f"must belong to issuer {r.card_no[:4]} like the card it replaces",
            )
        if self.keys.get(r.new_card_no[:4], r.key_version) is None:
            raise FieldError(
                "key_version", f"unknown key version {r.key_version} for issuer {r.card_no[:4]}"
            )
        fp = store.fingerprint(
            "replace_card",
            r.card_no,
            r.new_card_no,
            r.key_version,
            int(r.reason),
            self._id_digest(r.holder_id_number),
        )
        return await self._run("replace_card", r.request_id, fp, r.staff_id, r.card_no, r)

    async def cancel_card(self, c: Cancellation) -> DeskOutcome:
        self._check_action(c.request_id, c.card_no)
        if c.card_readable and c.card_balance < 0:
            raise FieldError("card_balance", f"must not be negative, got {c.card_balance}")
        fp = store.fingerprint(
            "cancel_card",
            c.card_no,
            int(c.channel),
            c.card_readable,
            c.card_balance if c.card_readable else None,
            self._id_digest(c.holder_id_number),
        )
        return await self._run("cancel_card", c.request_id, fp, c.staff_id, c.card_no, c)

    async def refund_posting(self, d: DisputeRefund) -> DeskOutcome:
        self._check_action(d.request_id, d.card_no)
        if d.posting_id <= 0:
            raise FieldError("posting_id", f"must name a posting (positive), got {d.posting_id}")
        check_amount(d.amount, self.limits)
        check_text(d.case_reference, "case_reference", 64)
        check_text(d.reason, "reason", 500)
        fp = store.fingerprint(
            "refund_posting", d.card_no, d.posting_id, d.amount, d.case_reference, d.reason
        )
        return await self._run("refund_posting", d.request_id, fp, d.staff_id, d.card_no, d)

    async def reverse(self, r: Reversal) -> TxnResult:
        check_reversal(r)
        check_amount(r.amount, self.limits)
        return await reverse(self.pool, self.ref, r, self.settings.reversal_window)

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def _check_action(request_id: str, card_no: str) -> None:
        check_request_id(request_id)
        check_digits(card_no, 16, "card_number")

    def _id_digest(self, presented: str) -> bytes | None:
        """Part of a fingerprint: a retry must present the same ID, stored only as a digest."""
        return self.pii.id_digest(presented) if normalise_id_number(presented) else None

    async def _run(
        self,
        operation: str,
        request_id: str,
        fp: bytes,
        staff_id: str,
        card_no: str,
        req: CardAction | Replacement | Cancellation | DisputeRefund,
    ) -> DeskOutcome:
        ctx = self._ctx()

        async def action(conn: Conn) -> DeskOutcome:
            if isinstance(req, Replacement):
                return await store.replace_card(ctx, conn, req)
            if isinstance(req, Cancellation):
                return await store.cancel_card(ctx, conn, req)
            if isinstance(req, DisputeRefund):
                return await store.refund_posting(ctx, conn, req)
            if operation == "report_loss":
                return await store.report_loss(ctx, conn, req)
            return await store.release_loss(ctx, conn, req)

        return await self._fresh(
            lambda: store.run_action(
                self.pool,
                operation=operation,
                request_id=request_id,
                fp=fp,
                staff_id=staff_id,
                card_no=int(card_no),
                action=action,
            )
        )

    async def _fresh(self, run: Callable[[], Awaitable[T]]) -> T:
        """``run``, and once more after re-reading the reference data if it needed
        something this process has not seen.

        An issuer (with its cash accounts) or a product added after the process
        started, by another worker or by hand: the card was issued on a worker
        that knew it, and a cancellation on one that did not failed on every
        retry (gRPC UNKNOWN), as did that worker's held-refund job. The
        transaction that found it out was rolled back, so running again is
        safe; the write paths re-read the same way.
        """
        try:
            return await run()
        except StaleReference:
            async with self.pool.acquire() as conn:
                await self.ref.refresh(conn)
            return await run()
