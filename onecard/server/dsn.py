"""What a DSN says, for people: where it points (banners) and what asyncpg would refuse in it.

Kept apart from the settings: reading a DSN as asyncpg does, and keeping its
password out of everything said about it, is a subject of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from urllib.parse import parse_qs, unquote, urlsplit


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, as banners show it: ``host:port/database``, never a password.

    Any DSN asyncpg takes: its host list (``db1:5432,db2:5433``, a primary and
    its standby) is shown as given, each host with its port, and the hosts
    may come from ``?host=`` (a socket directory) with ``?port=``. Nothing of
    what comes before the last ``@`` (``user:password``) is shown, nor any
    parameter but host and port (``?password=`` stays out too). urllib's own
    ``.port`` refuses a host list, which made the banner of a server that had
    started on one raise.
    """
    try:
        parts = urlsplit(dsn)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    except ValueError:  # asyncpg refuses what urllib refuses; a banner never raises
        return "?"
    default_port = os.environ.get("PGPORT") or "5432"
    hosts = parts.netloc.rpartition("@")[2]
    if hosts:
        # As asyncpg reads it: a port in the host list, else PGPORT or 5432.
        ports = default_port
    else:
        hosts = query.get("host", "?")
        ports = query.get("port") or default_port
    listed = ",".join(_host_and_port(spec, ports, i) for i, spec in enumerate(hosts.split(",")))
    database = parts.path or (f"/{query['dbname']}" if "dbname" in query else "")
    return f"{listed}{database}"


def _host_and_port(spec: str, ports: str, index: int) -> str:
    """``spec`` (``host``, ``host:port``, ``[v6]:port``, ``/socket/dir``) as ``host:port``."""
    port_list = ports.split(",")
    default = port_list[index] if index < len(port_list) else port_list[0]
    if spec.startswith("["):
        host, _, rest = spec.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.startswith("/"):
        host, port = spec, ""
    else:
        host, _, port = spec.partition(":")
    return f"{unquote(host)}:{unquote(port) or default}"


def dsn_problem(dsn: str) -> str | None:
    """What asyncpg would refuse in ``dsn`` when connecting, said without its password; else None.

    asyncpg parses a DSN only when it connects: a mistyped one (a port of
    ``54x2``, an ``sslmode`` it does not know) reached create_pool as a
    ValueError nothing caught, a traceback. Its own parser, run here
    without connecting, refuses the same DSNs as the connection would
    (with the ``PG*`` variables it reads too, and any certificate file the
    DSN names). An asyncpg without that parser leaves the check to the
    connection.
    """
    with contextlib.suppress(ValueError):
        parts = urlsplit(dsn)
        if "@" in parts.path or "@" in parts.fragment:
            # user:pa/ss@host: the host part ended at the '/', so the rest of
            # the password would be read as the database (and shown).
            return (
                "an '@' after the host: a '/', '?' or '#' in the user name or password "
                "must be written %2F, %3F, %23 (an '@' in the database name %40)"
            )
    try:
        from asyncpg import connect_utils

        parse = connect_utils._parse_connect_dsn_and_args  # type: ignore[attr-defined]
        names = inspect.signature(parse).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    try:
        # Every argument as asyncpg.connect passes it when only a DSN is given.
        parse(**{**dict.fromkeys(names), "dsn": dsn})
    except ValueError as exc:  # asyncpg's ClientConfigurationError is one too
        why = str(exc)
        bad_number = _NOT_A_NUMBER.match(why)
        if bad_number:
            why = f"a port must be a number, got {bad_number[1]}"
        return f"asyncpg cannot use it: {_without_secrets(why, dsn)}"
    except IndexError:
        # Its parser indexes each host of the list: an empty one (db1,/onecard,
        # a trailing comma) raised this, a traceback while arguments were parsed.
        return "asyncpg cannot use it: a host of its host list is empty"
    except OSError as exc:  # a certificate or key file it names
        why = _without_secrets(str(exc), dsn)
        return f"asyncpg cannot use it: a file it names cannot be read: {why}"
    return None


#: int()'s complaint, which is how asyncpg refuses a port that is not a number.
_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base 10: ('.*')$")


def _without_secrets(text: str, dsn: str) -> str:
    """``text`` with whatever could be the DSN's password masked, quoted pieces of it too.

    The password is what follows ``user:`` up to the last ``@``, or a
    ``password=`` parameter. An unescaped ``/``, ``?`` or ``@`` in it makes
    asyncpg read a piece of it as a port or a parameter, which its message
    quotes: a quoted piece holding any piece of the password is masked (a
    piece of one character only when it is all the quote holds).

    A ``[`` or ``]`` in it makes urllib take what lies between for an IPv6
    host, and a quote in it makes the message's quoting escape it, so
    pieces end at brackets and commas (a host list) too, and every run of
    four or more of the password's characters is masked wherever it shows,
    however the message quoted it: ``'S3cret'`` in "'S3cret' does not appear
    to be an IPv4 or IPv6 address" was a piece of the password (found by review).
    """
    rest = dsn.partition("://")[2]
    secrets = [rest.rpartition("@")[0].partition(":")[2]] if "@" in rest else []
    with contextlib.suppress(ValueError):
        secrets += parse_qs(urlsplit(dsn).query).get("password", [])
    wholes = {whole for secret in secrets for whole in (secret, unquote(secret)) if whole}
    pieces = {
        piece for whole in wholes for piece in (whole, *re.split(r"[/?#@:&=\[\],]", whole)) if piece
    }

    def mask(quoted: re.Match[str]) -> str:
        inner = quoted[0][1:-1]
        shows = any(piece == inner or (len(piece) > 1 and piece in inner) for piece in pieces)
        return "'***'" if shows else quoted[0]

    text = re.sub(r"'[^']*'|\"[^\"]*\"", mask, text)
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 3:
            text = text.replace(piece, "***")
    for whole in wholes:
        for size in range(len(whole), 3, -1):
            for start in range(len(whole) - size + 1):
                run = whole[start : start + size]
                if run in text:
                    text = text.replace(run, "***")
    return text
