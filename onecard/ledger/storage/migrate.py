"""Versioned SQL migrations, applied in order and recorded.

Files are ``NNNN_name.sql`` in ``onecard/ledger/migrations``. Each runs in
its own transaction together with its row in ``schema_migrations``, under an
advisory lock, so two processes starting at once cannot both apply one and an
existing database upgrades in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

from onecard.ledger.storage import Conn

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x0EC4_2D00  # advisory lock id for migrations
# Sets transaction_timeout for the session ($1; NULL: back to the session's own
# value, as RESET), on a server that has it (PostgreSQL 17 and later).
_SET_TRANSACTION_TIMEOUT = """
    SELECT set_config(name, coalesce($1::text, reset_val), false)
    FROM pg_settings WHERE name = 'transaction_timeout'"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class BadMigrationFile(Exception):
    """A ``.sql`` file in the migrations directory that is not ``NNNN_name.sql``.

    Skipped, it would never be applied and nothing would say so: a schema
    change shipped and silently missing (``0021_Fix.sql``, ``21_fix.sql``).
    """


def available_migrations(directory: Traversable | None = None) -> list[Migration]:
    """The migrations in ``directory`` (the package's own by default), by version."""
    found: list[Migration] = []
    files = directory or resources.files("onecard.ledger.migrations")
    for entry in files.iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
        elif entry.name.lower().endswith(".sql"):
            raise BadMigrationFile(
                f"migration file {entry.name} is not named NNNN_name.sql "
                "(four digits, then lower-case letters, digits and _): it would never be applied"
            )
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def applied_versions(conn: Conn) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await conn.fetch("SELECT version FROM schema_migrations")
    return {r["version"] for r in rows}


class MigrationFailed(Exception):
    """A migration the database refused; nothing of it was applied.

    Its own words (and PostgreSQL's hint) are what the operator needs: one
    that checks the data first (0011) says what to settle before starting
    again. Not an outage, so it is not reported as one.
    """

    def __init__(self, mig: Migration, exc: asyncpg.PostgresError) -> None:
        hint = getattr(exc, "hint", None)
        super().__init__(
            f"migration {mig.version:04d}_{mig.name} refused, nothing of it applied: "
            f"{exc}" + (f" ({hint})" if hint else "")
        )


class SchemaNewerThanCode(Exception):
    """The database holds migrations this code does not have: a newer onecard
    upgraded it, and this one's queries may not fit it (0016 dropped a column
    0015's code reads). Refused before anything is applied or served.
    """

    def __init__(self, unknown: list[tuple[int, str]]) -> None:
        names = ", ".join(f"{version:04d}_{name}" for version, name in unknown)
        super().__init__(
            f"the database was migrated by a newer onecard ({names}, which this version "
            "does not have): run that version or a newer one against it"
        )


async def apply_migrations(conn: Conn) -> list[str]:
    """Apply every migration not yet recorded; return the names applied."""
    applied: list[str] = []
    try:
        # A ledger session bounds its lock waits (--lock-timeout-ms); a server
        # starting while another migrates waits for it however long it takes.
        # So does a statement_timeout the database or role may set: it cut
        # that wait short, and cancelled a migration over a large table; and
        # a transaction_timeout (PostgreSQL 17 and later) ended the session.
        await conn.execute("SET lock_timeout = 0")
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(_SET_TRANSACTION_TIMEOUT, "0")
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await applied_versions(conn)
        known = available_migrations()
        unknown = done - {mig.version for mig in known}
        if unknown:
            rows = await conn.fetch(
                "SELECT version, name FROM schema_migrations WHERE version = any($1::int[])"
                " ORDER BY version",
                sorted(unknown),
            )
            raise SchemaNewerThanCode([(r["version"], r["name"]) for r in rows])
        for mig in known:
            if mig.version in done:
                continue
            # Not ``async with``: on a connection lost meanwhile its exit raises
            # InterfaceError over the loss, which the caller reports as an outage.
            tx = conn.transaction()
            await tx.start()
            try:
                try:
                    await conn.execute(mig.sql)
                except asyncpg.PostgresConnectionError:
                    raise  # the database went away: not the migration refused
                except asyncpg.PostgresError as exc:
                    raise MigrationFailed(mig, exc) from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    mig.version,
                    mig.name,
                )
            except BaseException:
                if not conn.is_closed():
                    await tx.rollback()
                raise
            await tx.commit()
            applied.append(f"{mig.version:04d}_{mig.name}")
    finally:
        # A lost session has lost its lock and settings with it.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
            await conn.execute("RESET lock_timeout")  # back to the session's own settings
            await conn.execute("RESET statement_timeout")
            await conn.execute(_SET_TRANSACTION_TIMEOUT, None)
    return applied
