"""Reference data held in memory: issuers, products, terminals, system account ids.

It is small, changes rarely and is read on every transaction, so each process
keeps a copy and re-reads it when a batch meets an id it does not know
(a terminal registered after start-up, say).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from onecard.ledger.accounts import cash_code, payable_code
from onecard.ledger.batcher import ItemsHeld
from onecard.ledger.model import PaymentChannel, Product
from onecard.ledger.storage import Conn


class AccountsMissing(ItemsHeld):
    """System accounts some requests of a batch post to do not exist; nothing of theirs is written.

    A setup mistake: an operator registered without its payable account, an
    issuer without the cash account of a payment channel. It used to fail the
    whole flush (gRPC UNKNOWN), so every terminal and gateway whose requests
    shared a batch with one such request was refused as well, for as long as
    the mistake stood. Now only the requests that need a missing account are
    refused, with the accounts named (FAILED_PRECONDITION: the caller may
    send again once the account exists), and the rest are written.
    """

    def __init__(self, codes: Iterable[str], holds: Callable[[Any], bool]) -> None:
        self.codes = sorted(set(codes))
        named = (
            f"system account {self.codes[0]} does not exist"
            if len(self.codes) == 1
            else f"system accounts {', '.join(self.codes)} do not exist"
        )
        super().__init__(
            f"{named}: nothing of this request was written; send it again once it is set up"
        )
        self._holds = holds

    def holds(self, item: Any) -> bool:
        return self._holds(item)


#: Terminals added to the copy between two turns of the event loop.
_SLICE = 20_000
#: Past this many terminals named, reading them by id costs more than reading
#: all of them (a row per id, against a row per operator): a review's
#: registration of 300,000 terminals in statements of 400, read by id, took
#: longer than a whole re-read of them.
TERMINALS_BY_ID_MAX = 1_000


class StaleReference(LookupError):
    """A batch met reference data (a product, a system account) this copy lacks.

    Another process added it after this one last read: the batch is rolled
    back, the copy re-read, and the batch run again. Raised twice in a row it
    is a real inconsistency and reaches the caller.
    """


@dataclass
class ReferenceData:
    issuers: dict[str, str] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    terminal_operator: dict[int, str] = field(default_factory=dict)
    account_ids: dict[str, int] = field(default_factory=dict)
    #: Each terminal's operator's payable account id: looked up per record of
    #: an upload, where building the account code each time showed in profiles.
    terminal_payable: dict[int, int] = field(default_factory=dict)
    #: One re-read at a time: two overlapping re-reads (a flusher's and the
    #: change watcher's) could finish out of order, and the older copy would
    #: be swapped in last and kept until the next change.
    _rereading: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @classmethod
    async def load(cls, conn: Conn) -> ReferenceData:
        ref = cls()
        await ref.refresh(conn)
        return ref

    async def refresh(self, conn: Conn) -> None:
        """Re-read everything, then swap it in at once.

        No await between the assignments: a flusher of this process must never
        see a new terminal without its operator's payable account.
        """
        async with self._rereading:
            await self._reread(conn)

    async def _reread(self, conn: Conn) -> None:
        issuers = {r["issuer_code"]: r["name"] for r in await conn.fetch("SELECT * FROM issuers")}
        products = {
            r["product_code"]: Product(
                r["product_code"], r["name"], r["deposit"], r["purse_max"], r["txn_max"]
            )
            for r in await conn.fetch("SELECT * FROM products")
        }
        account_ids = {
            r["code"]: r["account_id"]
            for r in await conn.fetch("SELECT account_id, code FROM accounts")
        }
        terminal_operator: dict[int, str] = {}
        terminal_payable: dict[int, int] = {}
        # A province's hundreds of thousands of terminals, read a row each and
        # put into the copy in one piece, took the event loop for most of a
        # second and every call in flight waited. One row per operator, its
        # terminals in an array, comes back in far less; the copy is built a
        # slice at a time and swapped in whole below.
        for r in await conn.fetch(
            "SELECT operator_id, array_agg(terminal_id) AS terminals FROM terminals"
            " GROUP BY operator_id"
        ):
            operator, terminals = r["operator_id"], r["terminals"]
            account = account_ids.get(payable_code(operator))  # once an operator
            for start in range(0, len(terminals), _SLICE):
                await asyncio.sleep(0)
                some = terminals[start : start + _SLICE]
                terminal_operator.update(dict.fromkeys(some, operator))
                if account is not None:
                    terminal_payable.update(dict.fromkeys(some, account))
        self.issuers, self.products = issuers, products
        self.terminal_operator, self.account_ids = terminal_operator, account_ids
        self.terminal_payable = terminal_payable

    async def refresh_terminals(self, conn: Conn, terminal_ids: Iterable[int]) -> None:
        """Re-read only these terminals (registered, moved or removed), patching the copy.

        A terminal registered or moved is the everyday change, and the whole
        re-read it used to cause read every terminal, in every process, for
        each registration, holding each event loop while it built the copy
        (``benchmarks.refdata_reread``). The payable accounts of operators
        this copy does not know are read with them. Many terminals named at
        once (a registration in statements of 400) are read whole instead.
        """
        ids = list(terminal_ids)
        if not ids:
            return
        if len(ids) > TERMINALS_BY_ID_MAX:
            await self.refresh(conn)
            return
        async with self._rereading:
            rows = await conn.fetch(
                "SELECT terminal_id, operator_id FROM terminals"
                " WHERE terminal_id = ANY($1::bigint[])",
                ids,
            )
            found = {r["terminal_id"]: r["operator_id"] for r in rows}
            new_codes = {payable_code(o) for o in set(found.values())} - self.account_ids.keys()
            learned = (
                {
                    r["code"]: r["account_id"]
                    for r in await conn.fetch(
                        "SELECT account_id, code FROM accounts WHERE code = ANY($1::text[])",
                        sorted(new_codes),
                    )
                }
                if new_codes
                else {}
            )
            # No await from here on: a flusher never sees a terminal without
            # its operator's payable account, nor a half-patched copy.
            self.account_ids.update(learned)
            for terminal in ids:
                operator = found.get(terminal)
                if operator is None:
                    self.terminal_operator.pop(terminal, None)
                    self.terminal_payable.pop(terminal, None)
                    continue
                self.terminal_operator[terminal] = operator
                if (account := self.account_ids.get(payable_code(operator))) is not None:
                    self.terminal_payable[terminal] = account
                else:
                    self.terminal_payable.pop(terminal, None)

    async def learn_terminals(self, conn: Conn, terminal_ids: set[int]) -> None:
        """Read those of ``terminal_ids`` registered since the last look.

        A batch naming a terminal this copy does not know used to re-read all
        reference data, terminals table included, on the flusher's
        connection: a terminal that is not registered (misconfigured, or
        hostile) made every flush pay for it. One primary-key probe per batch
        says whether there is anything to learn, without waiting for a re-read
        in progress; only what it finds is read again, under the re-read lock.
        """
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM terminals WHERE terminal_id = ANY($1::bigint[]))",
            list(terminal_ids),
        ):
            await self.refresh_terminals(conn, terminal_ids)

    def payable_of(self, terminal_id: int, operator: str) -> int:
        """The payable account of the terminal's operator (LookupError if it has none)."""
        account = self.terminal_payable.get(terminal_id)
        return account if account is not None else self.account_id(payable_code(operator))

    def payable_missing(self, terminal_ids: Iterable[int]) -> dict[int, str]:
        """Known terminals whose operator has no payable account: {terminal: that account's code}.

        An unknown terminal is not among them (its requests are answered as
        such); one set look-up per distinct terminal of a batch.
        """
        return {
            t: payable_code(self.terminal_operator[t])
            for t in terminal_ids
            if t not in self.terminal_payable and t in self.terminal_operator
        }

    def cash_missing(self, card_no: str, channel: PaymentChannel) -> str | None:
        """The code of the cash account a load through ``channel`` needs, if this copy lacks it.

        Only for a known issuer: a card of an unknown one is no card of this
        ledger, and is answered as such.
        """
        if card_no[:4] not in self.issuers:
            return None
        code = cash_code(card_no[:4], channel.code)
        return None if code in self.account_ids else code

    async def learn_accounts(self, conn: Conn, codes: Iterable[str]) -> None:
        """Re-read everything if any of ``codes`` was created since the last look.

        Asked on every batch that needs an account this copy lacks, so it is
        one index probe, not a re-read, while the mistake stands.
        """
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE code = ANY($1::text[]))", list(codes)
        ):
            await self.refresh(conn)

    def account_id(self, code: str) -> int:
        try:
            return self.account_ids[code]
        except KeyError:
            raise StaleReference(f"system account {code} does not exist") from None

    def product(self, code: str) -> Product:
        try:
            return self.products[code]
        except KeyError:
            raise StaleReference(f"card product {code} does not exist") from None
