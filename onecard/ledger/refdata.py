"""Reference data held in memory: issuers, products, terminals, system account ids.

It is small, changes rarely and is read on every transaction, so each process
keeps a copy and re-reads it when a batch meets an id it does not know
(a terminal registered after start-up, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onecard.ledger.accounts import payable_code
from onecard.ledger.model import Product
from onecard.ledger.storage import Conn


@dataclass
class ReferenceData:
    issuers: dict[str, str] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    terminal_operator: dict[int, str] = field(default_factory=dict)
    account_ids: dict[str, int] = field(default_factory=dict)
    #: Each terminal's operator's payable account id: looked up per record of
    #: an upload, where building the account code each time showed in profiles.
    terminal_payable: dict[int, int] = field(default_factory=dict)

    @classmethod
    async def load(cls, conn: Conn) -> ReferenceData:
        ref = cls()
        await ref.refresh(conn)
        return ref

    async def refresh(self, conn: Conn) -> None:
        self.issuers = {
            r["issuer_code"]: r["name"] for r in await conn.fetch("SELECT * FROM issuers")
        }
        self.products = {
            r["product_code"]: Product(
                r["product_code"], r["name"], r["deposit"], r["purse_max"], r["txn_max"]
            )
            for r in await conn.fetch("SELECT * FROM products")
        }
        self.terminal_operator = {
            r["terminal_id"]: r["operator_id"]
            for r in await conn.fetch("SELECT terminal_id, operator_id FROM terminals")
        }
        self.account_ids = {
            r["code"]: r["account_id"]
            for r in await conn.fetch("SELECT account_id, code FROM accounts")
        }
        self.terminal_payable = {
            terminal: self.account_ids[code]
            for terminal, operator in self.terminal_operator.items()
            if (code := payable_code(operator)) in self.account_ids
        }

    def payable_of(self, terminal_id: int, operator: str) -> int:
        """The payable account of the terminal's operator (LookupError if it has none)."""
        account = self.terminal_payable.get(terminal_id)
        return account if account is not None else self.account_id(payable_code(operator))

    def account_id(self, code: str) -> int:
        try:
            return self.account_ids[code]
        except KeyError:
            raise LookupError(f"system account {code} does not exist") from None
