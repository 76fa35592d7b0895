"""Shared test helpers: dev keys, cards issued through the API, ledger checks."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import asyncpg
import grpc

from onecard.clients.card import SimulatedCard
from onecard.ledger.audit import balance_discrepancies, trial_balance
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc

STAFF = (("x-onecard-operator", "tester"),)
_card_numbers = itertools.count(1)


def dev_keys() -> MemoryKeyStore:
    return MemoryKeyStore(parse_key_document(DEV_KEYS, "dev keys"))


def new_card_number() -> str:
    return f"3104{next(_card_numbers):012d}"


async def issue(
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    *,
    kv: int = 1,
    product: str = "standard",
    deposit: int = 2000,
    card_no: str | None = None,
) -> SimulatedCard:
    stub = desk_pb2_grpc.DeskServiceStub(channel)
    card_no = card_no or new_card_number()
    reply = await stub.IssueCard(
        desk_pb2.IssueCardRequest(
            request_id=str(uuid.uuid4()),
            card_number=card_no,
            product=product,
            deposit=deposit,
            key_version=kv,
            payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
        ),
        metadata=STAFF,
    )
    assert reply.status == desk_pb2.DESK_STATUS_OK, reply
    version = keys.get("3104", kv)
    assert version is not None
    return SimulatedCard(card_no, version)


async def assert_books_balance(dsn: str) -> None:
    """Money neither created nor lost: trial balance zero, every balance equals its postings."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await trial_balance(conn) == 0
        assert await balance_discrepancies(conn) == []
    finally:
        await conn.close()


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def pii_key_file(directory: Path) -> Path:
    """A personal-data key file as an operator provides it with --dsn (owner-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pii-key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path
