"""Shared test helpers: dev keys, cards issued through the API, ledger checks."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from onecard.clients.card import SimulatedCard
from onecard.ledger.audit import balance_discrepancies, chip_adjust_discrepancies, trial_balance
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.keys import KeyVersion, MemoryKeyStore, parse_key_document
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc

if TYPE_CHECKING:
    from onecard.server.app import RunningServer

STAFF = (("x-onecard-operator", "tester"),)
_card_numbers = itertools.count(1)


def dev_keys() -> MemoryKeyStore:
    return MemoryKeyStore(parse_key_document(DEV_KEYS, "dev keys"))


def issuer_key(keys: MemoryKeyStore, kv: int) -> KeyVersion:
    """Key version ``kv`` of the demo issuer 3104, which the test keys hold."""
    version = keys.get("3104", kv)
    assert version is not None
    return version


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
    """Money neither created nor lost: trial balance zero, every balance equals its postings;
    and every card's chip adjustment equals the purse postings its chip did not see."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await trial_balance(conn) == 0
        assert await balance_discrepancies(conn) == []
        assert await chip_adjust_discrepancies(conn) == []
    finally:
        await conn.close()


async def assert_card_paid(dsn: str, card: SimulatedCard, purchases: int, balance: int) -> None:
    """The card's purse holds ``balance``, its purchases were each posted once, books balance."""
    posted = await fetch(
        dsn, "SELECT count(*) AS n FROM postings WHERE card_no = $1 AND kind = 1", int(card.card_no)
    )
    assert posted[0]["n"] == purchases
    rows = await fetch(dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no))
    assert rows[0]["purse_balance"] == balance
    await assert_books_balance(dsn)


async def wait_until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a state of the ledger that another task of the test brings about."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


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


async def seed_demo(db_dsn: str) -> None:
    """Demo issuer, products, operators and terminals in ``db_dsn`` (idempotent)."""
    from onecard.ledger.devdata import seed_demo_data

    conn = await asyncpg.connect(db_dsn)
    try:
        await seed_demo_data(conn)
    finally:
        await conn.close()


async def seed_with_dev_keys(db_dsn: str, tmp_path: Path) -> Path:
    """Demo issuer, products and terminals in ``db_dsn``; a key file of the dev keys (mode 600)."""
    await seed_demo(db_dsn)
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps(DEV_KEYS))
    key_file.chmod(0o600)
    return key_file


async def cli_server_env(db_dsn: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for ``onecard serve`` on ``db_dsn`` (demo data seeded, dev keys, port 0)."""
    key_file = await seed_with_dev_keys(db_dsn, tmp_path)
    return {
        **os.environ,
        "ONECARD_DSN": db_dsn,
        "ONECARD_KEYS": str(key_file),
        "ONECARD_LISTEN": "127.0.0.1:0",
        "ONECARD_DATA_DIR": str(tmp_path / "data"),
        "ONECARD_PII_KEY_FILE": str(pii_key_file(tmp_path / "secrets")),
        **extra,
    }


def start_cli_server(
    args: list[str],
    env: dict[str, str],
    cwd: Path | None = None,
    python_flags: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[str], str]:
    """``onecard serve ARGS`` as a child process, once its banner is whole: (process, banner)."""
    proc = subprocess.Popen(
        [sys.executable, *python_flags, "-m", "onecard.server.cli", "serve", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    banner = ""
    while "database:" not in banner:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"server exited before serving: {banner}")
        banner += line
    return proc, banner


def stop_cli_server(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> str:
    """Signal the server and return the rest of what it printed."""
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    return out


def assert_simulation_passes(env: dict[str, str]) -> None:
    """``onecard simulate`` against the server in ONECARD_DATA_DIR: every outcome as expected."""
    sim = subprocess.run(
        [sys.executable, "-m", "onecard.server.cli", "simulate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert "every outcome as expected" in sim.stdout


async def start_test_server(
    dsn: str, tmp_path: Path, keys: MemoryKeyStore, **settings: Any
) -> RunningServer:
    """A real server on loopback port 0 over ``dsn``, its demo data seeded.

    ``settings`` are ServerConfig fields (a small queue, a short lock
    timeout): the one way tests start a server in-process.
    """
    from onecard.ledger.devdata import seed_demo_data
    from onecard.server.app import start_server
    from onecard.server.config import ServerConfig

    conn = await asyncpg.connect(dsn)
    try:
        await seed_demo_data(conn)
    finally:
        await conn.close()
    config = ServerConfig(
        listen="127.0.0.1:0",
        dsn=dsn,
        data_dir=tmp_path / "data",
        pii_key_file=pii_key_file(tmp_path / "secrets"),
        **settings,
    )
    return await start_server(config, keys=keys)
