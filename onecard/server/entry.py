"""The ``onecard`` command's first code: a server's stop or reload noted before its imports.

Importing the server (asyncpg, gRPC, protobuf, the ledger) takes most of a
second, and until the server installed its handlers a signal's default
action applied: a SIGHUP (a supervisor's reload right after its start)
killed the process, which the supervisor took for a crash, and a SIGTERM
ended it with 143 instead of a clean "stopped while starting". This module
imports nothing heavy: ``onecard serve`` notes those signals here at once,
and the server acts on them when it installs its own handlers.
"""

from __future__ import annotations

import signal
import sys
import threading

#: Signals that came before the server installed its handlers, in order.
noted: list[int] = []

#: Options of the ``onecard`` command itself, which take a value and may come
#: before the subcommand.
_VALUED_OPTIONS = ("--log-format", "--log-level")


def _note(signum: int, _frame: object) -> None:
    noted.append(signum)


def take_noted() -> list[int]:
    """The signals noted so far, once: the server calls it as it installs its handlers."""
    taken, noted[:] = list(noted), []
    return taken


def _subcommand(argv: list[str]) -> str | None:
    args = iter(argv)
    for arg in args:
        if arg in _VALUED_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> int:
    if (
        _subcommand(sys.argv[1:]) == "serve"
        and threading.current_thread() is threading.main_thread()
    ):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _note)
    from onecard.server.cli import main as cli_main

    return cli_main()
