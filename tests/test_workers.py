"""``onecard serve --workers N``: several processes, one port, one set of books."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.terminal import Terminal
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.embedded_pg import EmbeddedPostgres
from onecard.v1 import common_pb2
from tests.support import (
    assert_books_balance,
    assert_simulation_passes,
    cli_server_env,
    dev_keys,
    fetch,
    issue,
    start_cli_server,
    stop_cli_server,
)


async def test_two_workers_share_the_port_and_the_books(db_dsn: str, tmp_path: Path) -> None:
    env = await cli_server_env(db_dsn, tmp_path)
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        pids = banner.split("(pids ")[1].split(")")[0].split(", ")
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)

        keys = dev_keys()
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, keys)
            await Terminal(chan, "310400000009").load(card, 10_000)
        # many connections, so the kernel hands some to each worker (channels with
        # equal options would share one connection through gRPC's subchannel pool)
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        buses = [Terminal(ch, "310400000001", 1 + 100 * i) for i, ch in enumerate(channels)]
        replies = await asyncio.gather(*(bus.debit(card, 10) for bus in buses for _ in range(5)))
        for ch in channels:
            await ch.close(grace=None)
        assert all(r.status == common_pb2.TXN_STATUS_APPROVED for r in replies)
        rows = await fetch(
            db_dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
        )
        assert rows[0]["purse_balance"] == 10_000 - 40 * 10
        backends = await fetch(
            db_dsn,
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_type = 'client backend'",
        )
        assert backends[0]["n"] >= 3  # two pools of at least two, and ours
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopped cleanly" in out
    await assert_books_balance(db_dsn)


def test_two_workers_on_the_embedded_database(tmp_path: Path) -> None:
    """``onecard serve --workers 2`` with no database named: the README's setup, two cores.

    Workers reach the parent's embedded PostgreSQL through a DSN, so they must be
    handed the personal-data key the parent made; they refused to start without it.
    """
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    proc, banner = start_cli_server(["--workers", "2"], env)
    try:
        assert "workers: 2" in banner and "embedded PostgreSQL" in banner, banner
        # The README: the banner prints the psql that reaches it (socket only, no TCP port).
        assert "(psql -h " in banner and " -U postgres onecard)" in banner, banner
        assert_simulation_passes(env)
    finally:
        out = stop_cli_server(proc)
    assert proc.returncode == 0, banner + out
    assert "stopped cleanly" in out
    assert (data / "pii-key").stat().st_mode & 0o077 == 0  # made once, owner-only


def test_workers_run_the_parents_package_not_the_current_directory(tmp_path: Path) -> None:
    """`pip install .` then `onecard serve --workers 2` from the checkout.

    Workers were started with ``python -m``, which puts the current directory
    first on sys.path: from a source checkout they imported the checkout
    (without the built extension) instead of the installed package, and died.
    """
    shadow = tmp_path / "onecard"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        'raise ImportError("imported the current directory, not the installed package")\n'
    )
    env = {
        **os.environ,
        "ONECARD_DATA_DIR": str(tmp_path / "data"),
        "ONECARD_LISTEN": "127.0.0.1:0",
    }
    # The parent is found as installed (-P); the workers must find the same.
    proc, banner = start_cli_server(["--workers", "2"], env, cwd=tmp_path, python_flags=("-P",))
    try:
        assert "workers: 2" in banner
    finally:
        out = stop_cli_server(proc)
    assert proc.returncode == 0, banner + out
    assert "stopped cleanly" in out


class Output:
    """A server's merged output, read on a thread, so a test can wait for a line without hanging.

    A line that never comes fails the test after ``timeout`` instead of
    blocking on the pipe forever.
    """

    def __init__(self, proc: subprocess.Popen[str], already: str = "") -> None:
        self.proc = proc
        self.text = already
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first line from now on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line matching {pattern!r} in:\n{self.text}"
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"exited before {pattern!r}:\n{self.text}"
            self.text += line
            found = re.search(pattern, line)
            if found:
                return found

    def rest(self, timeout: float = 60.0) -> str:
        """Everything until the process exits (it was told to)."""
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return self.text
            if line is not None:
                self.text += line


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (the workers of a --workers parent)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.add(int(entry.name))
    return out


def kill_all(proc: subprocess.Popen[str]) -> None:
    """After a failed test: the parent and any worker it left."""
    for pid in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def start_parent(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], Output]:
    """``onecard serve ARGS`` with its output followed line by line, from its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "onecard.server.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, Output(proc)


_seqs = itertools.count(1_000)


async def answers(address: str, keys: MemoryKeyStore, card: SimulatedCard, n: int) -> None:
    """``n`` debits over as many fresh connections (the kernel spreads them over the workers)."""
    for _ in range(n):
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as chan:
            bus = Terminal(chan, "310400000001", next(_seqs))
            reply = await bus.debit(card, 1)
            assert reply.status == common_pb2.TXN_STATUS_APPROVED


@pytest.mark.parametrize(
    "also_signalled",
    ["parent only", "parent and the starting worker", "the starting worker, the parent later"],
)
async def test_a_stop_while_workers_start_stops_every_worker_once_up(
    db_dsn: str, tmp_path: Path, also_signalled: str
) -> None:
    """SIGTERM to ``--workers 3`` while its second worker starts.

    The stop used to reach only the workers already started: a worker
    started after it served on and the parent waited for it forever; or,
    signalled before its handlers were installed, the starting worker died
    and the parent died with "RuntimeError: a worker exited before serving".
    A supervisor that signals every process of the service (systemd does)
    reaches the starting worker itself, which then dies before serving. If
    the parent reaped that worker before its own signal was handled, it took
    the death for a crash and ended with "a worker failed" (a CI run's race;
    the last case makes it certain).
    """
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    proc, out = start_parent(["--workers", "3"], env)
    try:
        # The second worker exists (the first serves): it is starting.
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, out.text
            await asyncio.sleep(0.002)
        if also_signalled != "parent only":
            for pid in children(proc.pid):  # worker 1 serves; worker 2 is starting
                os.kill(pid, signal.SIGTERM)
        if also_signalled == "the starting worker, the parent later":
            await asyncio.sleep(0.3)  # the parent reaps the worker first
        proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest)
    finally:
        kill_all(proc)
    assert proc.returncode == 0, text
    assert "stopped cleanly" in text
    assert "worker 3 of 3 starting" not in text  # none started after the stop
    assert "Traceback" not in text
    assert not children(proc.pid)


async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(
    db_dsn: str, tmp_path: Path
) -> None:
    """kill -9 of one worker of two used to stop the other and the server."""
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    out = Output(proc, banner)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        first, second = map(int, banner.split("(pids ")[1].split(")")[0].split(", "))
        keys = dev_keys()
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, keys)
            await Terminal(chan, "310400000009").load(card, 10_000)

        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(
            out.wait_for, rf"worker 1 \(pid {first}\) was killed by SIGKILL; restarting it"
        )
        await answers(address, keys, card, 4)  # the other worker serves meanwhile
        found = await asyncio.to_thread(out.wait_for, r"worker 1 restarted: pid (\d+)")
        replacement = int(found[1])
        assert children(proc.pid) == {second, replacement}
        await answers(address, keys, card, 8)
    finally:
        proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest)
        kill_all(proc)
    assert proc.returncode == 0, text
    assert "stopped cleanly" in text
    await assert_books_balance(db_dsn)


async def test_a_worker_that_exits_by_itself_is_restarted(db_dsn: str, tmp_path: Path) -> None:
    """A worker stopped on its own (exit 0) used to be dropped: the server ran on at N-1."""
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    out = Output(proc, banner)
    try:
        first, second = map(int, banner.split("(pids ")[1].split(")")[0].split(", "))
        os.kill(second, signal.SIGTERM)
        await asyncio.to_thread(
            out.wait_for, rf"worker 2 \(pid {second}\) exited with code 0; restarting it"
        )
        found = await asyncio.to_thread(out.wait_for, r"worker 2 restarted: pid (\d+)")
        assert children(proc.pid) == {first, int(found[1])}
    finally:
        proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest)
        kill_all(proc)
    assert proc.returncode == 0, text
    assert "stopped cleanly" in text


async def test_a_crash_loop_stops_the_server_instead_of_spinning(
    db_dsn: str, tmp_path: Path
) -> None:
    """Restarts are bounded: one exit past the bound within its window stops the server."""
    from onecard.server.workers import MAX_RESTARTS

    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    out = Output(proc, banner)
    try:
        victim = int(banner.split("(pids ")[1].split(",")[0])
        for _ in range(MAX_RESTARTS):
            os.kill(victim, signal.SIGKILL)
            found = await asyncio.to_thread(out.wait_for, r"worker 1 restarted: pid (\d+)")
            victim = int(found[1])
        os.kill(victim, signal.SIGKILL)
        text = await asyncio.to_thread(out.rest)
    finally:
        kill_all(proc)
    assert proc.returncode == 1, text
    assert f"restarted {MAX_RESTARTS} times within 60 s already" in text
    assert "a worker failed" in text and "Traceback" not in text
    assert not children(proc.pid)


def _postgres_running_on(data: Path) -> bool:
    """Whether any process is a PostgreSQL server on the data directory ``data``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(data).encode() in cmdline and any(b"postgres" in a for a in cmdline[:1]):
                return True
    return False


def test_a_stop_while_the_parent_prepares_the_database_stops_it(tmp_path: Path) -> None:
    """SIGTERM once the embedded PostgreSQL is starting, before any worker.

    The parent had no handler yet: it died at once and left its PostgreSQL running.
    """
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    proc, out = start_parent(["--workers", "2"], env)
    try:
        pidfile = data / "pg" / "postmaster.pid"
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert time.monotonic() < deadline and proc.poll() is None, out.text
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        text = out.rest()
    finally:
        kill_all(proc)
    assert proc.returncode == 0, text
    assert "stopped cleanly" in text
    assert "worker 1 of 2 starting" not in text
    assert not pidfile.exists()
    assert not _postgres_running_on(data / "pg")


async def test_a_failed_migration_stops_the_embedded_database(tmp_path: Path) -> None:
    """Migrations that fail in the parent of --workers: its PostgreSQL must not outlive it."""
    data = tmp_path / "data"
    env = {**os.environ, "ONECARD_DATA_DIR": str(data), "ONECARD_LISTEN": "127.0.0.1:0"}
    init = subprocess.run(
        [sys.executable, "-m", "onecard.server.cli", "dev-init"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    # Forget the record of the first migration: applying it again meets its own tables.
    pg = EmbeddedPostgres(data / "pg")
    await asyncio.to_thread(pg.start)
    try:
        conn = await asyncpg.connect(pg.dsn("onecard"))
        try:
            await conn.execute("DELETE FROM schema_migrations WHERE version = 1")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)

    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "onecard.server.cli", "serve", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr  # the operator's to fix, not an outage
    assert "migration 0001_core refused" in run.stderr and "already exists" in run.stderr
    assert "worker 1 of 2 starting" not in run.stderr
    assert not (data / "pg" / "postmaster.pid").exists()
    assert not _postgres_running_on(data / "pg")


async def test_the_database_address_is_not_on_a_workers_command_line(
    db_dsn: str, tmp_path: Path
) -> None:
    """A DSN (it can hold a password) given by the environment showed on every
    worker's command line, which any user of the host reads with ps."""
    secret = "not-shown-4f2a"
    dsn = f"{db_dsn}{'&' if '?' in db_dsn else '?'}password={secret}"
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1", ONECARD_DSN=dsn)
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    out = Output(proc, banner)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert secret not in line and "--dsn" not in line, line
        keys = dev_keys()
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, keys)
            await Terminal(chan, "310400000009").load(card, 1_000)
        await answers(address, keys, card, 4)  # both workers reach the database
    finally:
        proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest)
        kill_all(proc)
    assert proc.returncode == 0, text
    assert secret not in text


def _alive(pid: int) -> bool:
    """``pid`` runs (not a zombie its new parent has yet to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def test_workers_stop_cleanly_when_their_parent_is_killed(
    db_dsn: str, tmp_path: Path
) -> None:
    """kill -9 of the --workers parent (the OOM killer, a supervisor's last resort)
    left its workers serving for ever: in process groups of their own and tied to
    nothing of the parent's, they held the port with no one to restart or stop
    them, and on the embedded database the next serve stopped PostgreSQL under
    them as an orphan (found by review)."""
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    proc, banner = await asyncio.to_thread(start_cli_server, ["--workers", "2"], env)
    out = Output(proc, banner)
    workers = set(map(int, banner.split("(pids ")[1].split(")")[0].split(", ")))
    try:
        assert workers == children(proc.pid)
        proc.kill()  # the parent alone, as the OOM killer does
        deadline = time.monotonic() + 60  # only a worker that never stops takes this long
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = [pid for pid in workers if _alive(pid)]
        # Their output was the parent's (merged) output: whole once both exited.
        text = await asyncio.to_thread(out.rest, 0 if left else 60)
        assert not left, f"workers {left} still run after their parent was killed:\n{text}"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_all(proc)
    assert text.count(f"the parent process (pid {proc.pid}) is gone") == 2, text
    assert text.count("onecard: stopped cleanly") == 2, text  # drained, as on SIGTERM
    assert "Traceback" not in text


def test_a_worker_whose_parent_died_before_it_watched_stops_at_once(tmp_path: Path) -> None:
    """The parent may die while a worker still imports the server: the watch must
    see that the parent is already gone, not wait for a death that came before it
    (found by review)."""
    read_end, write_end = os.pipe()
    os.close(write_end)  # the parent died: nothing holds the write end
    script = (
        "import asyncio\n"
        "from onecard.server.workers import watch_parent\n"
        "async def main():\n"
        "    stop = asyncio.Event()\n"
        "    watch_parent(stop.set)\n"
        "    await asyncio.wait_for(stop.wait(), 60)\n"
        "    print('stopped', flush=True)\n"
        "asyncio.run(main())\n"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "ONECARD_WORKER": "1", "ONECARD_WORKER_PARENT_FD": str(read_end)},
            pass_fds=(read_end,),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(read_end)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is gone: this worker stops" in run.stderr
    assert "stopped" in run.stderr  # its output goes to the log once the parent's pipe is gone
