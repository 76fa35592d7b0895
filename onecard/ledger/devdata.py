"""Development keys and demo reference data, so a new checkout works without editing anything.

The keys are PROTOCOL.md's published test keys — one key version per suite
for the demo issuer 3104 — and nothing else: they are public, and a
production key file is given by path or environment instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from onecard.ledger.accounts import cash_code, payable_code
from onecard.ledger.keys import write_new_private_file
from onecard.ledger.model import PaymentChannel
from onecard.ledger.storage import Conn

DEMO_ISSUER = "3104"

DEV_KEYS = {
    "issuers": {
        DEMO_ISSUER: {
            "1": {
                "suite": "pboc-3des",
                "mtk": "00112233445566778899AABBCCDDEEFF",
                "mlk": "11223344556677888877665544332211",
            },
            "2": {
                "suite": "sm4",
                "mtk": "0123456789ABCDEFFEDCBA9876543210",
                "mlk": "FEDCBA98765432100123456789ABCDEF",
            },
            "3": {
                "suite": "aes",
                "mtk": "2B7E151628AED2A6ABF7158809CF4F3C",
                "mlk": "000102030405060708090A0B0C0D0E0F",
            },
        }
    }
}

#: code, name, deposit, purse maximum, per-transaction limit (fen)
DEMO_PRODUCTS = [
    ("standard", "Standard card", 2000, 100_000, 50_000),
    ("student", "Student card", 2000, 50_000, 20_000),
    ("senior", "Senior card", 0, 50_000, 20_000),
]

DEMO_OPERATORS = [("SZBUS", "Suzhou Bus (demo)"), ("SZMETRO", "Suzhou Metro (demo)")]

#: terminal id, operator, kind
DEMO_TERMINALS = [
    ("310400000001", "SZBUS", "bus validator"),
    ("310400000002", "SZBUS", "bus validator"),
    ("310400000003", "SZBUS", "bus validator"),
    ("310400000004", "SZMETRO", "metro gate"),
    ("310400000005", "SZMETRO", "metro gate"),
    ("310400000009", "SZMETRO", "top-up machine"),
]


def write_dev_key_file(path: Path) -> bool:
    """Create the key file with owner-only permissions; False if it already exists."""
    return write_new_private_file(path, "development key file", json.dumps(DEV_KEYS, indent=2))


async def ensure_issuer_accounts(conn: Conn, issuer: str) -> None:
    for channel in PaymentChannel:
        await conn.execute(
            "INSERT INTO accounts (code, kind) VALUES ($1, 'cash') ON CONFLICT (code) DO NOTHING",
            cash_code(issuer, channel.code),
        )


async def seed_demo_data(conn: Conn) -> None:
    """Idempotent: running it twice changes nothing."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO issuers VALUES ($1, $2) ON CONFLICT DO NOTHING",
            DEMO_ISSUER,
            "Suzhou T-Union (demo)",
        )
        await ensure_issuer_accounts(conn, DEMO_ISSUER)
        await conn.executemany(
            "INSERT INTO products VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            DEMO_PRODUCTS,
        )
        for op_id, name in DEMO_OPERATORS:
            await conn.execute(
                "INSERT INTO operators VALUES ($1, $2) ON CONFLICT DO NOTHING", op_id, name
            )
            await conn.execute(
                "INSERT INTO accounts (code, kind) VALUES ($1, 'payable') "
                "ON CONFLICT (code) DO NOTHING",
                payable_code(op_id),
            )
        await conn.executemany(
            "INSERT INTO terminals (terminal_id, operator_id, kind) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            [(int(t), op, kind) for t, op, kind in DEMO_TERMINALS],
        )
