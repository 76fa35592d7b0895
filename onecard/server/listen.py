"""The gRPC port: one server's alone, shared only by the workers of one ``onecard serve``.

gRPC sets SO_REUSEPORT on every listening socket by default on Linux, so a
second server started on a port already served (a forgotten instance, one
pointed at another database) bound without complaint, and the kernel then
handed it half of the terminals' connections. Before anything starts, a
server now checks that the port is free with a socket that shares nothing:
the kernel refuses that bind while any server, of any kind, listens there.
Only then do its own servers (``--acceptors`` per process, ``--workers``
processes) bind it together.
"""

from __future__ import annotations

import os
import socket

from onecard.ledger.crypto.encoding import FieldError
from onecard.server.config import parse_host_port

#: Set by ``onecard serve --workers N`` in its workers' environment.
WORKER_ENV = "ONECARD_WORKER"


def is_worker() -> bool:
    """True in a process ``--workers N`` started: it shares its parent's port."""
    return os.environ.get(WORKER_ENV) == "1"


def grpc_port_options(acceptors: int) -> list[tuple[str, int]]:
    """The server options that decide whether the port may be shared.

    Shared by the workers of one ``onecard serve`` and by the ``acceptors``
    servers of one process. With one server in one process the kernel
    itself refuses any other; otherwise only the check before starting
    (``check_port_free``) keeps other servers off the port.
    """
    return [("grpc.so_reuseport", 1 if is_worker() or acceptors > 1 else 0)]


def refused(listen: str, reason: str) -> FieldError:
    """The operator's setting, said as such (not as a database or network outage)."""
    return FieldError("--listen", f"cannot listen on {listen}: {reason}")


def check_port_free(listen: str) -> None:
    """Refuse a ``--listen`` address some server already listens on, naming the flag.

    Port 0 is always free (the kernel picks one). SO_REUSEADDR lets the
    check pass over connections of an earlier server still in TIME_WAIT,
    which would not stop gRPC's bind either, but not over a listener.
    """
    host, port = parse_host_port("--listen", listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise refused(listen, exc.strerror or str(exc)) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise refused(
                    listen, f"{exc.strerror} (is another server running on this port?)"
                ) from None
