"""``onecard serve --workers N``: N server processes sharing one port.

Python runs one thread of ledger code per process, so a second core needs a
second process. The parent owns what must exist once (the embedded
PostgreSQL, migrations, the development keys and demo data), then starts N
workers that each bind the same address (gRPC sets SO_REUSEPORT, the kernel
spreads connections) and keep their own pool and group committer. Cards are
locked in card-number order in every batch, so workers' concurrent
transactions cannot deadlock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import multiprocess

from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.storage.migrate import apply_migrations
from onecard.server.config import ServerConfig
from onecard.server.dsn import describe_dsn
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.server.entry import take_noted
from onecard.server.listen import WORKER_ENV, check_port_free, is_worker
from onecard.server.metrics import MULTIPROC_ENV, MetricsServer, workers_dir

log = logging.getLogger("onecard.server")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker_argv(argv: list[str], listen: str, keys: Path | None, pii_key: Path) -> list[str]:
    """The parent's own command line, pinned to one worker, its port and key files.

    The database comes in the worker's environment (``ONECARD_DSN``, set by
    the caller), never here: a DSN can hold a password, and a command line is
    anyone's to read (``ps``); one given to the parent by its environment
    showed on every worker's. With a DSN a worker refuses to make up a
    personal-data key of its own, so it gets the file explicitly.
    """
    # -P: not the current directory first on sys.path, as -m would put it.
    # Started from a source checkout after `pip install .`, a worker would
    # otherwise import the checkout (no built extension there) instead of the
    # package the parent runs, and die before serving.
    out = [sys.executable, "-P", "-m", "onecard.server.cli", *argv, "--workers", "1"]
    out += ["--listen", listen, "--pii-key-file", str(pii_key)]
    if keys is not None:
        out += ["--keys", str(keys)]
    return out


#: The read end of a pipe whose write end only the parent holds, in a worker's
#: environment: it reaches end-of-file when the parent dies, however it died.
PARENT_FD_ENV = "ONECARD_WORKER_PARENT_FD"


def watch_parent(stop: Callable[[], None]) -> None:
    """In a worker: call ``stop`` once the parent that started it is gone.

    Workers run in process groups of their own, so nothing else ties their
    life to the parent's: a parent killed with SIGKILL (the OOM killer, a
    supervisor's last resort) left them serving for ever, holding the port,
    with no one to restart them, forward a reload or stop them, and on the
    embedded database the next ``onecard serve`` stopped the PostgreSQL
    under them as an orphan. The parent keeps the write end of a pipe open
    and never writes; the kernel closes it when the parent dies, so the
    worker's end reads end-of-file, even when the parent died before the
    worker got here. The worker then stops as on SIGTERM, draining what is
    in flight. Its standard output was the parent's pipe, now closed, so it
    goes to standard error (the log) from then on.

    Called with the event loop running, from the worker's main thread; does
    nothing in a process the parent did not start.
    """
    text = os.environ.get(PARENT_FD_ENV)
    if not is_worker() or not text or not text.isdigit():
        return
    fd = int(text)
    parent = os.getppid()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            if os.read(fd, 64):  # the parent never writes; nothing to do
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        log.warning(
            "the parent process (pid %d) is gone: this worker stops (draining in-flight work)",
            parent,
        )
        stop()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


async def _prepare(
    cfg: ServerConfig, stopping: Callable[[], bool]
) -> tuple[str, Path | None, Path, EmbeddedPostgres | None]:
    """Keys, the database and its schema, once for all workers.

    Whatever fails (or is interrupted) after the embedded PostgreSQL started
    stops it again before the error leaves: nothing else would, and the next
    start would find an orphan. A stop asked for meanwhile (``stopping()``)
    skips what is left; the caller then stops the database.
    """
    from onecard.server.app import load_keys, load_pii_key, start_embedded_postgres

    keys, dev = load_keys(cfg)
    key_path = getattr(keys, "path", None)
    # Settled here, once, before the database is touched: with --dsn and no
    # --pii-key-file this refuses as a single server does; on the embedded
    # database the key is made once (workers making it at the same moment
    # could read each other's half-written file).
    load_pii_key(cfg)
    pii_path = cfg.pii_key_file or cfg.data_dir / "pii-key"
    embedded = None
    dsn = cfg.dsn or ""
    if stopping():
        return dsn, key_path, pii_path, embedded
    try:
        if not dsn:
            embedded, dsn = await start_embedded_postgres(cfg)
        if stopping():
            return dsn, key_path, pii_path, embedded
        conn = await asyncpg.connect(dsn)
        try:
            applied = await apply_migrations(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            if dev:
                await seed_demo_data(conn)
        finally:
            await conn.close()
    except BaseException:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    return dsn, key_path, pii_path, embedded


async def _prepare_unless_stopped(
    cfg: ServerConfig, stopping: Callable[[], bool]
) -> tuple[str, Path | None, Path, EmbeddedPostgres | None] | None:
    """``_prepare``, ended by a stop asked for meanwhile (then None).

    The signal handlers only note a stop, and a step may wait long: the
    migrations wait for another server's migration lock however long it
    holds it. Looked at every tick, a stop cancels the step, and ``_prepare``
    stops the embedded database it started.
    """
    task = asyncio.ensure_future(_prepare(cfg, stopping))
    while not task.done():
        await asyncio.wait([task], timeout=_TICK)
        if stopping() and not task.done():
            task.cancel()
            await asyncio.wait([task])
    return None if task.cancelled() else task.result()


#: A worker that exits while the server is not stopping is started again, up
#: to this many times within RESTART_WINDOW seconds; one more exit in that
#: window stops the server (a worker that dies at once would otherwise be
#: restarted in a loop, and the operator told nothing useful).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds a worker's death by SIGTERM while starting waits for a stop of
#: the whole service to reach this process too (_Supervisor._await_stop).
STOP_FOLLOWS_S = 1.0
#: How long the supervision loop waits for a banner or an exit before it
#: looks at the signals it was sent.
_TICK = 0.1


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


@dataclass(eq=False)
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    restart: bool
    #: What it printed until its banner was whole.
    output: bytes = b""
    serving: bool = False
    #: SIGTERM sent (once: a second one could land after its handler is gone).
    told_to_stop: bool = False
    #: The parent's SIGHUP count this worker has seen: one that came while it
    #: was starting may have come after it read the key file.
    hups: int = 0


class _Supervisor:
    """Starts the workers one by one, restarts those that exit, and stops them all.

    Signal handlers only note what was asked; this loop does the rest: a
    stop reaches every worker, started or starting, and no worker is
    started after it.
    """

    def __init__(
        self, count: int, argv: list[str], env: dict[str, str], metrics_dir: Path | None
    ) -> None:
        self.count = count
        self.argv = argv
        self.env = env
        self.metrics_dir = metrics_dir
        self.workers: list[_Worker] = []
        self.to_start: list[int] = list(range(1, count + 1))
        self.restarts: collections.deque[float] = collections.deque()
        self.stopping = False
        self.failed = False
        self.hups = 0
        self.up = False  # every worker served once: the banner is out
        #: Descriptors every worker inherits (the read end of the parent's pipe).
        self.pass_fds: tuple[int, ...] = ()

    def on_signal(self, sig: int, _frame: object) -> None:
        if sig == signal.SIGHUP:
            self.hups += 1
        else:
            self.stopping = True

    def run(self, on_up: Callable[[list[int]], None]) -> None:
        while True:
            self._forward()
            self._reap()
            if self.stopping:
                self.to_start.clear()
                if not self.workers:
                    return
            elif self.to_start and not any(not w.serving for w in self.workers):
                self._start(self.to_start.pop(0))
            self._wait_for_banner()
            up = not self.stopping and not self.to_start and all(w.serving for w in self.workers)
            if up and not self.up:
                self.up = True
                on_up([w.proc.pid for w in sorted(self.workers, key=lambda w: w.slot)])

    def _start(self, slot: int) -> None:
        log.info("worker %d of %d starting", slot, self.count)
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=self.env,
            # Its own process group: a Ctrl-C meant for the server reaches
            # the parent only, which sends each worker SIGTERM (a SIGINT
            # would kill a worker still importing with a traceback).
            process_group=0,
            pass_fds=self.pass_fds,
        )
        self.workers.append(_Worker(slot, proc, self.up, hups=self.hups))

    def _wait_for_banner(self) -> None:
        starting = [w for w in self.workers if not w.serving]
        if not starting:
            time.sleep(_TICK)
            return
        w = starting[0]
        assert w.proc.stdout is not None
        fd = w.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], _TICK)
        if not ready:
            return
        chunk = os.read(fd, 4096)
        if not chunk:  # it closed its output: it is exiting, for _reap to see
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=_TICK)
            return
        w.output += chunk
        if b"serving gRPC on" in w.output and w.output.endswith(b"\n"):
            # Serving (and its handlers installed) before the stop is looked
            # at: a stop noted after this reaches it through _forward.
            w.serving = True
            if w.restart:
                log.warning("worker %d restarted: pid %d", w.slot, w.proc.pid)

    def _forward(self) -> None:
        for w in self.workers:
            if w.proc.poll() is not None:
                continue
            if self.stopping and not w.told_to_stop:
                # Starting workers too: one whose database does not answer
                # would otherwise hold the stop for asyncpg's connect timeout.
                # Its handlers end the start; before they are installed,
                # SIGTERM's default ends a process that has nothing in flight.
                w.told_to_stop = True
                w.proc.send_signal(signal.SIGTERM)
            elif not self.stopping and w.serving and w.hups < self.hups:
                w.hups = self.hups
                w.proc.send_signal(signal.SIGHUP)

    def _reap(self) -> None:
        for w in list(self.workers):
            rc = w.proc.poll()
            if rc is None:
                continue
            self.workers.remove(w)
            if w.proc.stdout is not None:
                w.proc.stdout.close()
            if self.metrics_dir is not None:
                # Its live gauges (queue depths) leave the sum the parent serves.
                multiprocess.mark_process_dead(w.proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            self._exited(w, rc)

    def _exited(self, w: _Worker, rc: int) -> None:
        what = f"worker {w.slot} (pid {w.proc.pid}) {_how(rc)}"
        if not self.stopping and not w.serving and rc == -signal.SIGTERM:
            self._await_stop()
        if self.stopping:
            if w.serving and rc != 0:
                log.error("%s while stopping", what)
                self.failed = True
            elif not w.serving:
                # Signalled by someone else while starting: nothing was in flight.
                log.info("%s before serving, while stopping", what)
            return
        if not self.up:
            log.error("%s before the server was up; stopping the others", what)
            self._fail()
            return
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error(
                "%s; workers were restarted %d times within %.0f s already, "
                "so the server stops instead of restarting it again",
                what,
                len(self.restarts),
                RESTART_WINDOW,
            )
            self._fail()
            return
        self.restarts.append(now)
        log.error(
            "%s%s; restarting it (restart %d of at most %d within %.0f s)",
            what,
            "" if w.serving else " before serving",
            len(self.restarts),
            MAX_RESTARTS,
            RESTART_WINDOW,
        )
        self.to_start.append(w.slot)

    def _await_stop(self) -> None:
        """Give a stop that may be on its way the time to arrive.

        A supervisor stopping the service signals every process of it
        (systemd does): a starting worker, its handlers not yet installed,
        dies of its SIGTERM and may be reaped before this process's own
        SIGTERM is handled. Taken for a crash, the stop ended with "a worker
        failed" and exit 1 (a test run's race). A worker killed so alone,
        with no stop following, is still a failure.
        """
        deadline = time.monotonic() + STOP_FOLLOWS_S
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(_TICK)

    def _fail(self) -> None:
        self.failed = True
        self.stopping = True

    def terminate(self) -> None:
        """After an error in this process: no worker may outlive it."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in self.workers:
            w.proc.wait()
            if w.proc.stdout is not None:
                w.proc.stdout.close()


def run_workers(cfg: ServerConfig, workers: int, argv: list[str]) -> int:
    """Start, supervise and stop ``workers`` processes; returns the exit code."""
    check_port_free(cfg.listen)  # before the database starts, as one process does
    sup = _Supervisor(workers, [], {**os.environ, WORKER_ENV: "1"}, None)
    # Handlers before the database starts: a stop during preparation must
    # stop the database this process started, not leave it running. Signals
    # reach only the main thread; run from another (tests do, for
    # refusals), there is nothing to install.
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, sup.on_signal)
        for early in take_noted():  # noted while this process imported the server
            sup.on_signal(early, None)
    embedded: EmbeddedPostgres | None = None
    metrics: MetricsServer | None = None
    parent_r = parent_w = -1
    try:
        prepared = asyncio.run(_prepare_unless_stopped(cfg, lambda: sup.stopping))
        if prepared is not None:
            dsn, key_path, pii_path, embedded = prepared
        if prepared is None or sup.stopping:
            print("onecard: stopped cleanly (stopped while starting)", flush=True)
            return 0
        host, _, port = cfg.listen.rpartition(":")
        if int(port) == 0:
            port = str(_free_port(host.strip("[]")))
        listen = f"{host}:{port}"
        sup.argv = _worker_argv(argv, listen, key_path, pii_path)
        sup.env["ONECARD_DSN"] = dsn
        # Held open, never written, until every worker has exited: a worker
        # reads end-of-file on its end once this process is gone (watch_parent).
        parent_r, parent_w = os.pipe()
        sup.pass_fds = (parent_r,)
        sup.env[PARENT_FD_ENV] = str(parent_r)
        if cfg.metrics_listen:
            # Workers record into files here; this process serves their sum.
            sup.metrics_dir = workers_dir(cfg.data_dir)
            sup.env[MULTIPROC_ENV] = str(sup.metrics_dir)
            metrics = MetricsServer(cfg.metrics_listen, sup.metrics_dir)
        # The embedded database has no TCP listener: the banner says how psql reaches
        # it, as one process's does.
        from onecard.server.app import EMBEDDED_DATABASE  # loaded by _prepare already

        where = (
            f"{cfg.data_dir / 'pg'} (psql -h {embedded.socket_dir} -p {embedded.port} "
            f"-U postgres {EMBEDDED_DATABASE})"
            if embedded is not None
            else describe_dsn(dsn)
        )

        def banner(pids: list[int]) -> None:
            if metrics is not None:
                print(f"onecard metrics on {metrics.url}", flush=True)
            print(
                f"onecard serving gRPC on {listen}\n"
                f"  workers: {workers} (pids {', '.join(map(str, pids))})\n"
                f"  database: {'embedded PostgreSQL in ' if embedded else 'PostgreSQL at '}"
                f"{where}",
                flush=True,
            )
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            (cfg.data_dir / "server.addr").write_text(listen)

        sup.run(banner)
        print("onecard: a worker failed" if sup.failed else "onecard: stopped cleanly", flush=True)
        return 1 if sup.failed else 0
    finally:
        sup.terminate()
        for fd in (parent_r, parent_w):
            if fd >= 0:
                os.close(fd)
        if metrics is not None:
            metrics.stop()
        if sup.metrics_dir is not None:
            shutil.rmtree(sup.metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
