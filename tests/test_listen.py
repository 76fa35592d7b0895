"""The gRPC port is one server's: a second ``onecard serve`` on it is refused, not let in.

gRPC shares a listening port by default on Linux (SO_REUSEPORT), so a second
server used to bind a served port silently and take half the terminals'
connections, possibly for another database.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.keys import MemoryKeyStore
from onecard.server import app
from onecard.server.app import RunningServer, start_server
from onecard.server.cli import main as cli_main
from onecard.server.config import ServerConfig
from tests.support import fetch, pii_key_file


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_server_on_a_served_port_is_refused_naming_the_flag(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    other = tmp_path / "other"  # the running server's files are in tmp_path
    code = cli_main(
        ["serve", "--workers", workers, "--data-dir", str(other), "--listen", server.address]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--listen: cannot listen on {server.address}: Address already in use" in err
    assert not other.exists()  # refused before any key file or database was made


def test_a_malformed_listen_address_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1"])
    assert code == 2
    assert "--listen: must be HOST:PORT" in capsys.readouterr().err


async def test_grpc_itself_does_not_share_the_port_of_a_running_server(
    server: RunningServer,
    db_dsn: str,
    keys: MemoryKeyStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-acceptor server started between the check and gRPC's bind: the bind refuses too.

    Without the check, only the socket option keeps the port one server's
    (a server of several acceptors shares the port among its own, so there
    the check alone keeps others off); the refused start leaves no
    connection of its pool behind.
    """
    monkeypatch.setattr(app, "check_port_free", lambda listen: None)
    cfg = ServerConfig(
        listen=server.address,
        dsn=db_dsn,
        data_dir=tmp_path / "data",
        pii_key_file=pii_key_file(tmp_path / "secrets"),
        acceptors=1,
    )
    before = await _backends(db_dsn)
    refusal = re.escape(f"--listen: cannot listen on {server.address}: ")
    with pytest.raises(FieldError, match=refusal):
        await start_server(cfg, keys=keys)
    assert await _backends(db_dsn) == before


async def _backends(dsn: str) -> int:
    rows = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return int(rows[0]["n"])


def test_a_port_left_in_time_wait_is_free(tmp_path: Path) -> None:
    """A restart right after a stop: connections in TIME_WAIT must not refuse the port."""
    from onecard.server.listen import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    check_port_free(f"127.0.0.1:{port}")
