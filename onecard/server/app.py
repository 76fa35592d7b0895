"""Process lifecycle: database, keys, ledger and gRPC server, started and stopped in order.

Stopping reverses starting: the server stops taking calls and lets in-flight
ones finish, the group committer drains its queue (every request gets its
reply after COMMIT), then the pool closes and an embedded PostgreSQL shuts
down cleanly, so the next start finds every posting where it was.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field, replace

import asyncpg
import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.crypto.select import make_verifier
from onecard.ledger.devdata import seed_demo_data, write_dev_key_file
from onecard.ledger.engine import Ledger
from onecard.ledger.keys import FileKeyStore, KeyStoreError, MemoryKeyStore, key_store_from_env
from onecard.ledger.pii import load_or_create_key, read_key_file
from onecard.ledger.storage.migrate import apply_migrations
from onecard.ledger.storage.pool import create_ledger_pool
from onecard.server.config import KEEPALIVE_TIMEOUT_S, ServerConfig
from onecard.server.desk_service import DeskServicer
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.server.listen import check_port_free, grpc_port_options, is_worker, refused
from onecard.server.metrics import (
    MetricsServer,
    observe_flush,
    recording_for_parent,
    sample_process,
)
from onecard.server.terminal_service import TerminalServicer
from onecard.server.upload_service import StreamSlots, UploadServicer
from onecard.v1 import (
    desk_pb2,
    desk_pb2_grpc,
    terminal_pb2,
    terminal_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
)

log = logging.getLogger("onecard.server")

EMBEDDED_DATABASE = "onecard"
#: About what one derived key takes in the extension's cache (FastVerifier).
KEY_CACHE_ENTRY_BYTES = 100
#: Allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD = 50_000
SERVICE_NAMES = (
    terminal_pb2.DESCRIPTOR.services_by_name["TerminalService"].full_name,
    desk_pb2.DESCRIPTOR.services_by_name["DeskService"].full_name,
    upload_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
)


def dev_key_path(cfg: ServerConfig) -> str:
    return str(cfg.data_dir / "dev-keys.json")


def load_keys(cfg: ServerConfig) -> tuple[MemoryKeyStore, bool]:
    """The key store and whether it holds the public development keys."""
    if cfg.keys is not None:
        return FileKeyStore(cfg.keys), False
    from_env = key_store_from_env()
    if from_env is not None:
        return from_env, False
    if cfg.embedded:
        path = cfg.data_dir / "dev-keys.json"
        if write_dev_key_file(path):
            log.warning("wrote development key file %s (PROTOCOL.md test keys)", path)
        return FileKeyStore(path), True
    raise KeyStoreError(
        "no keys: give --keys FILE or ONECARD_KEYS_JSON "
        "(`onecard dev-init` writes a development key file)"
    )


def load_pii_key(cfg: ServerConfig) -> bytes:
    """The key that digests holder data (ID numbers, phones) before they are stored.

    Every server on one database must hold the same one, or a look-up by ID
    number on one host misses what another stored. A key made on the spot is
    only safe where the database is this server's own (embedded); with --dsn
    it must come from --pii-key-file (`onecard dev-init` writes one).
    """
    if cfg.pii_key_file is not None:
        return read_key_file(cfg.pii_key_file)
    if cfg.embedded:
        return load_or_create_key(cfg.data_dir / "pii-key")
    raise KeyStoreError(
        "no personal-data key: with --dsn give --pii-key-file FILE, the same file on every "
        "server of the database (`onecard dev-init` writes one to DATA_DIR/pii-key)"
    )


async def start_embedded_postgres(cfg: ServerConfig) -> tuple[EmbeddedPostgres, str]:
    """The embedded PostgreSQL, started, with the server's database; stopped again on failure.

    The caller only gets ``pg`` to stop once this returns, so a failure (or a
    cancellation) between starting it and returning is undone here.
    """
    pg = EmbeddedPostgres(cfg.data_dir / "pg")
    # pg_ctl runs in a thread, which a stop cannot interrupt: cancelled
    # meanwhile, the thread is waited out before the database is stopped, or
    # the stop would find nothing started and the start leave an orphan.
    starting = asyncio.ensure_future(asyncio.to_thread(pg.start))
    try:
        await asyncio.shield(starting)
        conn = await asyncpg.connect(pg.dsn("postgres"))
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE
            )
            if not exists:
                await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
        finally:
            await conn.close()
    except BaseException:
        if not starting.done():
            await asyncio.wait([starting])
        await asyncio.to_thread(pg.stop)  # a no-op if it never started
        raise
    return pg, pg.dsn(EMBEDDED_DATABASE)


def keepalive_options(seconds: int) -> list[tuple[str, int]]:
    """Pings on a silent connection, so that a peer gone without a word is dropped.

    Without them a gateway that vanished (a network cut, a host powered off)
    kept its upload streams open for gRPC's two-hour default, each holding
    one of ``--max-upload-streams``' places: enough of them refused every
    upload of the process.
    """
    if not seconds:
        return []
    return [
        ("grpc.keepalive_time_ms", seconds * 1000),
        ("grpc.keepalive_timeout_ms", min(seconds, KEEPALIVE_TIMEOUT_S) * 1000),
        # gRPC core's own wait for a ping's answer (a minute by default):
        # the keepalive timeout alone left a vanished peer another minute.
        ("grpc.http2.ping_timeout_ms", min(seconds, KEEPALIVE_TIMEOUT_S) * 1000),
        # Ping connections with no call too, and without data sent between
        # pings (gRPC stops after two such pings by default).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _grpc_server(
    cfg: ServerConfig,
    ledger: Ledger,
    health: health_aio.HealthServicer,
    upload_streams: StreamSlots,
) -> grpc.aio.Server:
    """One gRPC server with every service on the one ledger (one of ``--acceptors``)."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Calls gRPC has received but no servicer has taken yet (each
        # server takes a method's calls one at a time, through the event
        # loop; --acceptors servers take them that many at a time, each
        # with its own backlog of this bound). Past the soft limit gRPC
        # drops arrivals at random, past the hard one all of them, each
        # answered CANCELLED without reaching the ledger (python -m
        # benchmarks.pending_backlog measures it by limit).
        ("grpc.server.max_pending_requests", cfg.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 3 * cfg.max_pending_calls),
        *grpc_port_options(cfg.acceptors),
        *keepalive_options(cfg.keepalive_s),
    ]
    server = grpc.aio.server(options=options)
    terminal_pb2_grpc.add_TerminalServiceServicer_to_server(TerminalServicer(ledger), server)
    desk_pb2_grpc.add_DeskServiceServicer_to_server(DeskServicer(ledger), server)
    upload_pb2_grpc.add_UploadServiceServicer_to_server(
        UploadServicer(ledger, upload_streams), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


@dataclass
class RunningServer:
    config: ServerConfig
    #: The ``--acceptors`` servers of this process, all on ``port``.
    servers: list[grpc.aio.Server]
    port: int
    ledger: Ledger
    pool: asyncpg.Pool
    keys: MemoryKeyStore
    health: health_aio.HealthServicer
    embedded: EmbeddedPostgres | None
    #: May hold the database password: kept out of repr, as the key bytes are.
    dsn: str = field(repr=False)
    #: The Prometheus endpoint, when --metrics-listen asked for one here.
    metrics: MetricsServer | None = None
    #: Samples the event loop's lag and the queues while metrics are recorded
    #: (here or for a parent).
    sampler: asyncio.Task[None] | None = None
    #: Keeps the health service in step with the database (watch_database).
    watcher: asyncio.Task[None] | None = None
    #: The upload streams of every server of the process, ended by a stop.
    upload_streams: StreamSlots | None = None

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        log.info("stopping: draining in-flight calls")
        for task in (self.sampler, self.watcher):
            if task is not None:
                task.cancel()
        if self.upload_streams is not None:
            # An upload stream is a call that ends only when its gateway
            # closes it: left open, it held the stop for the whole grace.
            self.upload_streams.stop()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(s.stop(self.config.shutdown_grace) for s in self.servers))
        # Bounded: a database that does not answer (a partition, a paused VM,
        # a storage stall) held the stop for ever, until a supervisor's SIGKILL.
        drained = await self.ledger.close(self.config.shutdown_drain_s)
        try:
            await asyncio.wait_for(self.pool.close(), self.config.shutdown_drain_s)
        except TimeoutError:  # asyncpg terminated the connections
            log.error(
                "the database did not answer the pool's close within %gs: connections terminated",
                self.config.shutdown_drain_s,
            )
            drained = False
        if self.metrics is not None:
            self.metrics.stop()
        if self.embedded is not None:
            # A database that did not answer may be stalled on its disk: no
            # shutdown checkpoint then (its WAL still holds every COMMIT).
            mode = "fast" if drained else "immediate"
            await asyncio.to_thread(self.embedded.stop, mode)
        log.info("stopped")

    def reload_keys(self) -> None:
        """SIGHUP: pick up added key versions; derived-key caches drop on the generation bump."""
        if isinstance(self.keys, FileKeyStore):
            try:
                self.keys.reload()
                log.info("key file reloaded: %d key versions", len(list(self.keys.versions())))
            except KeyStoreError as exc:
                log.error("key reload refused, old keys stay in force: %s", exc)
            except Exception as exc:
                # Anything the loader did not foresee: its text might quote the
                # file, so only its kind is logged; a signal callback that
                # raised would leave a traceback and the keys in doubt.
                log.error(
                    "key reload of %s failed (%s), old keys stay in force",
                    self.keys.path,
                    type(exc).__name__,
                )


#: Seconds between two looks at the database for the health service.
HEALTH_INTERVAL = 1.0
#: The look: whether a write would be refused (a standby, or a session
#: that starts read-only).
_READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean"


async def watch_database(
    dsn: str, health: health_aio.HealthServicer, interval: float = HEALTH_INTERVAL
) -> None:
    """NOT_SERVING while the database cannot answer, SERVING again once it does.

    Health was set SERVING at start and never again: through an outage, load
    balancers and orchestrators polling it kept sending every call to a
    server that could only answer UNAVAILABLE. The look is one query on a
    connection of its own, so a pool busy with flushes cannot make it fail.
    It asks whether the database takes writes: a standby, or a primary left
    read-only, answered ``SELECT 1`` while every debit was refused, and
    health stayed SERVING (found by review).
    """
    conn: asyncpg.Connection | None = None
    serving = True
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn, timeout=2 * interval)
                read_only = await conn.fetchval(_READ_ONLY, timeout=2 * interval)
                up, why = not read_only, "read-only"
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                up, why = False, "unreachable"
                if conn is not None:
                    conn.terminate()
                    conn = None
            if up != serving:
                serving = up
                status = health_pb2.HealthCheckResponse.SERVING
                if not up:
                    status = health_pb2.HealthCheckResponse.NOT_SERVING
                log.warning("database %s: health %s", "back" if up else why,
                            health_pb2.HealthCheckResponse.ServingStatus.Name(status))  # fmt: skip
                for name in ("", *SERVICE_NAMES):
                    await health.set(name, status)
    finally:
        if conn is not None:
            conn.terminate()


def tune_gc() -> None:
    """Collect garbage less often: a flush allocates thousands of short-lived objects.

    With the default threshold (700 allocations) the cyclic collector ran
    about ten times per upload flush and took 8.6% of a worker's time
    (py-spy, benchmarks.throughput). The ledger's per-request objects hold no
    cycles, so reference counting frees them; the collector only needs to run
    for the rare cycle. What start-up built (modules, protobuf descriptors,
    the pool) is frozen out of every later collection.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)


async def start_server(cfg: ServerConfig, keys: MemoryKeyStore | None = None) -> RunningServer:
    """Start everything; ``keys`` overrides the configured key source (tests)."""
    # The gRPC port first: a server refused for a port taken by another
    # writes nothing (no development key file, no personal-data key). A
    # worker's parent checked the port the workers share.
    if not is_worker():
        check_port_free(cfg.listen)
    dev_keys = False
    if keys is None:
        keys, dev_keys = load_keys(cfg)
    try:
        verifier = make_verifier(keys, cfg.key_cache_size, cfg.allow_slow_crypto)
    except MemoryError:
        # The extension allocates its cache whole, at start: a size within its
        # ceiling (1,073,741,823) can still be more than this machine has.
        raise FieldError(
            "--key-cache-size",
            f"a cache of {cfg.key_cache_size:,} derived keys (about "
            f"{cfg.key_cache_size * KEY_CACHE_ENTRY_BYTES // 2**20:,} MB) cannot be "
            "allocated here; give a smaller one",
        ) from None
    pii_key = load_pii_key(cfg)  # refused before anything touches the database
    # Before the database starts, so that a taken port is refused first. A
    # worker records metrics for its parent, which serves the sum of all.
    metrics = (
        MetricsServer(cfg.metrics_listen)
        if cfg.metrics_listen and not recording_for_parent()
        else None
    )
    embedded: EmbeddedPostgres | None = None
    pool: asyncpg.Pool | None = None
    ledger: Ledger | None = None
    servers: list[grpc.aio.Server] = []
    dsn = cfg.dsn
    try:
        if not dsn:
            embedded, dsn = await start_embedded_postgres(cfg)
        pool = await create_ledger_pool(dsn, cfg.pool_size, cfg.lock_timeout_ms)
        async with pool.acquire() as conn:
            applied = await apply_migrations(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            if dev_keys:
                await seed_demo_data(conn)
        desk = replace(cfg.desk, pii_key=pii_key)
        listen_dsn = dsn
        ledger = await Ledger.open(
            pool,
            keys,
            verifier,
            cfg.limits,
            cfg.batching,
            desk,
            on_flush=observe_flush,
            listen=lambda: asyncpg.connect(listen_dsn),
        )
        health_servicer = health_aio.HealthServicer()
        port = 0
        # One bound for the process, and one idle limit.
        upload_streams = StreamSlots(
            cfg.max_upload_streams, cfg.upload_idle_s, cfg.max_upload_streams_per_connection
        )
        for _ in range(cfg.acceptors):
            server = _grpc_server(cfg, ledger, health_servicer, upload_streams)
            servers.append(server)
            # The first binds the address asked for (port 0: a free one), the
            # others the port it got.
            address = cfg.listen if not port else f"{cfg.listen.rsplit(':', 1)[0]}:{port}"
            try:
                port = server.add_insecure_port(address)
            except RuntimeError:
                # Taken between the check above and now; gRPC says no more than that.
                raise refused(cfg.listen, "address already in use or not available") from None
            await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        # Undone in reverse, as RunningServer.stop does: a refusal at the
        # last step (the gRPC port) must not leave the ledger's flushers
        # and connections behind, nor the embedded database running.
        for server in servers:
            await server.stop(None)
        if ledger is not None:
            await ledger.close()
        if pool is not None:
            await pool.close()
        if metrics is not None:
            metrics.stop()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    log.info("card crypto: %s", verifier.name)
    tune_gc()
    sampler = (
        asyncio.get_running_loop().create_task(sample_process(ledger.queued))
        if cfg.metrics_listen
        else None
    )
    watcher = asyncio.get_running_loop().create_task(watch_database(dsn, health_servicer))
    return RunningServer(
        cfg,
        servers,
        port,
        ledger,
        pool,
        keys,
        health_servicer,
        embedded,
        dsn,
        metrics,
        sampler,
        watcher,
        upload_streams,
    )
