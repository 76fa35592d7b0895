"""The `onecard` command: serve, dev-init, migrate, simulate, desk."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import grpc

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.crypto.select import CryptoUnavailable
from onecard.ledger.keys import KeyStoreError
from onecard.ledger.storage.migrate import BadMigrationFile, MigrationFailed, SchemaNewerThanCode
from onecard.ledger.storage.pool import NotDurable
from onecard.server.config import (
    ServerConfig,
    add_option,
    add_server_options,
    config_from_args,
    dsn_setting,
)
from onecard.server.dsn import describe_dsn
from onecard.server.embedded_pg import EmbeddedPostgresError
from onecard.server.logs import setup_logging

if TYPE_CHECKING:
    from onecard.server.app import RunningServer


async def _serve(cfg: ServerConfig) -> None:
    from onecard.server.app import start_server
    from onecard.server.entry import take_noted

    # Handlers before starting: a SIGTERM that lands meanwhile (a supervisor's
    # stop right after its start, a worker's parent stopping just after the
    # banner) stops the server cleanly once it is up, instead of killing the
    # process with its embedded PostgreSQL left running. Signals reach only
    # the main thread; run from another (tests do, for refusals), there is
    # nothing to install.
    signals = threading.current_thread() is threading.main_thread()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: its default action ended a starting server outright (its
    # embedded PostgreSQL left running). One that comes while starting is
    # kept and the keys reloaded once up: the file may have changed after
    # the start read it.
    reload_asked: list[int] = []
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_asked.append, 1)
        # What came before these handlers, while the server was imported.
        for early in take_noted():
            if early == signal.SIGHUP:
                reload_asked.append(1)
            else:
                stop.set()
        # A worker of --workers N stops, as on SIGTERM, when its parent dies.
        from onecard.server.workers import watch_parent

        watch_parent(stop.set)
    # A stop while starting ends the start (a database that does not answer
    # would otherwise hold it for asyncpg's whole connect timeout, and a
    # stopping parent would wait for its worker as long); start_server
    # undoes what it had started when cancelled.
    starting = asyncio.ensure_future(start_server(cfg))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not starting.done():
        starting.cancel()
        await asyncio.wait([starting])
        if starting.cancelled():
            print("onecard: stopped cleanly (stopped while starting)", flush=True)
            return
    running = starting.result()
    try:
        await _announce(cfg, running, signals, reload_asked)
        await stop.wait()
        print("onecard: stopping (draining in-flight work)", flush=True)
    finally:
        # Whatever fails once serving (a banner that cannot be made or
        # written) still stops taking calls and drains what is in flight,
        # before the error leaves, instead of leaving gRPC and the pool as
        # they were.
        await running.stop()
    print("onecard: stopped cleanly", flush=True)


async def _announce(
    cfg: ServerConfig, running: RunningServer, signals: bool, reload_asked: list[int]
) -> None:
    """Once up: SIGHUP reloads the keys; the banner, and the address in DATA_DIR/server.addr."""
    from onecard.server.app import EMBEDDED_DATABASE

    if signals:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, running.reload_keys)
        if reload_asked:
            running.reload_keys()
    # The embedded database has no TCP listener: people reach it with psql
    # through its socket, as the server's user or root.
    db = (
        f"embedded PostgreSQL in {cfg.data_dir / 'pg'} (psql -h "
        f"{running.embedded.socket_dir} -p {running.embedded.port} -U postgres "
        f"{EMBEDDED_DATABASE})"
        if running.embedded
        else f"PostgreSQL at {describe_dsn(running.dsn)}"
    )
    if running.metrics is not None:
        print(f"onecard metrics on {running.metrics.url}", flush=True)
    print(
        f"onecard serving gRPC on {running.address}\n"
        f"  card crypto: {running.ledger.verifier.name}\n  database: {db}",
        flush=True,
    )
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (cfg.data_dir / "server.addr").write_text(running.address)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    cfg = config_from_args(args)  # refuses --workers below one, too
    if args.workers > 1:
        from onecard.server.workers import run_workers

        return run_workers(cfg, args.workers, args.argv)
    uvloop.run(_serve(cfg))
    return 0


async def _dev_init(cfg: ServerConfig) -> None:
    from onecard.ledger.devdata import seed_demo_data, write_dev_key_file
    from onecard.ledger.pii import load_or_create_key
    from onecard.ledger.storage.migrate import apply_migrations
    from onecard.server.app import start_embedded_postgres

    key_path = cfg.data_dir / "dev-keys.json"
    created = write_dev_key_file(key_path)
    print(f"development key file: {key_path} ({'created' if created else 'already there'})")
    pii_path = cfg.data_dir / "pii-key"
    had_pii = pii_path.exists()
    load_or_create_key(pii_path)
    print(f"personal-data key file: {pii_path} ({'already there' if had_pii else 'created'})")
    embedded = None
    dsn = cfg.dsn
    if not dsn:
        embedded, dsn = await start_embedded_postgres(cfg)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            applied = await apply_migrations(conn)
            await seed_demo_data(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    print(f"migrations applied: {', '.join(applied) or 'none needed'}")
    print(f"demo issuer, products, operators and terminals are in {describe_dsn(dsn)}")


def cmd_dev_init(args: argparse.Namespace) -> int:
    asyncio.run(_dev_init(config_from_args(args)))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from onecard.ledger.storage.migrate import apply_migrations

    async def go() -> list[str]:
        conn = await asyncpg.connect(args.dsn)
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()

    if not args.dsn:
        # A usage error, exit 2 as every other missing setting (SystemExit's was 1).
        print("onecard migrate: needs --dsn or ONECARD_DSN", file=sys.stderr)
        return 2
    applied = asyncio.run(go())
    print(f"migrations applied: {', '.join(applied) or 'none needed'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from onecard.clients import simulator
    from onecard.ledger.keys import FileKeyStore

    data_dir = Path(args.data_dir)
    target = args.target
    if not target:
        addr_file = data_dir / "server.addr"
        target = addr_file.read_text().strip() if addr_file.exists() else "127.0.0.1:50051"
    keys = FileKeyStore(args.keys or data_dir / "dev-keys.json")
    try:
        surprises = asyncio.run(simulator.run(target, keys, data_dir))
    except grpc.aio.AioRpcError as exc:
        # Most often no server yet, or one that has stopped (server.addr stays).
        print(
            f"onecard simulate: server {target}: {exc.code().name}: {exc.details()}; is it "
            f"running? start it (onecard serve --data-dir {data_dir}) or give --target HOST:PORT",
            file=sys.stderr,
        )
        return 3
    return 1 if surprises else 0


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onecard", description="Transport-card ledger: gRPC server and tools."
    )
    add_option(
        parser, "--log-format", default="text", choices=["text", "json"], help="log line format"
    )
    add_option(
        parser,
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ledger's gRPC server")
    add_server_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dev-init", help="write development keys and demo reference data")
    add_server_options(p)
    p.set_defaults(func=cmd_dev_init)

    p = sub.add_parser("migrate", help="apply schema migrations to --dsn")
    add_option(p, "--dsn", type=dsn_setting, help="PostgreSQL DSN")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("simulate", help="play terminals and a service desk against a server")
    add_option(p, "--target", help="server address (default: from DATA_DIR/server.addr)")
    add_option(
        p,
        "--data-dir",
        type=Path,
        default=Path(".onecard"),
        help="where the server keeps its development keys and address",
    )
    add_option(p, "--keys", type=Path, help="key file the simulated cards are made with")
    p.set_defaults(func=cmd_simulate)

    from onecard.clients.desk_cli import add_desk_parser

    add_desk_parser(sub)

    p = sub.add_parser(
        "loadtest",
        help="play thousands of terminals against a server, then check the books",
        description="Requests are signed ahead; --rate is open loop (latency from the "
        "intended send time), --rate 0 closed loop. With --dsn the population is seeded "
        "there and every acknowledged posting is checked afterwards.",
    )
    from onecard.clients.loadtest import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_loadtest)
    return parser


def cmd_loadtest(args: argparse.Namespace) -> int:
    import uvloop

    from onecard.clients.loadtest import run

    return uvloop.run(run(args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        # argparse has said what is wrong (or printed --help); callers of
        # main() get the code as they get every other refusal's.
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = argv
    setup_logging(args.log_format, args.log_level)
    try:
        code: int = args.func(args)
        return code
    except (
        KeyStoreError,
        FieldError,
        EmbeddedPostgresError,
        CryptoUnavailable,
        MigrationFailed,
        SchemaNewerThanCode,
        BadMigrationFile,
        NotDurable,
    ) as exc:
        # Start-up refusals are the operator's to fix; a traceback would hide the advice.
        print(f"onecard: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"onecard: cannot reach the database or the network: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
