"""A bad setting is refused before anything starts, naming the flag, its twin and the limit.

Values from ``ONECARD_*`` variables were converted while the parser was
built, so one bad variable crashed every subcommand with a traceback that
did not name it; choices were not checked for them at all
(ONECARD_LOG_FORMAT=xml ran); and several numbers had no bounds: a negative
message size is "unlimited" to gRPC, a negative cache size reached the
extension as a traceback, negative windows and amounts started a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onecard.server.cli import main

#: (flag or ONECARD_ variable, value, what the refusal must say)
BAD_SETTINGS = [
    ("ONECARD_POOL_SIZE", "eight", "--pool-size: must be an integer of at least 1, got 'eight'"),
    ("--pool-size", "eight", "--pool-size: must be an integer of at least 1, got 'eight'"),
    ("--log-level", "chatty", "--log-level: must be one of debug, info, warning, error, critical"),
    ("ONECARD_LOG_LEVEL", "chatty", "--log-level: must be one of debug, info, warning, error"),
    ("--log-format", "xml", "--log-format: must be one of text, json, got 'xml'"),
    ("ONECARD_LOG_FORMAT", "xml", "--log-format: must be one of text, json, got 'xml'"),
    ("--key-cache-size", "-5", "--key-cache-size: must be at least 0, got -5"),
    ("ONECARD_KEY_CACHE_SIZE", "2000000000", "--key-cache-size: must be at most 1073741823"),
    ("--max-message-bytes", "-1", "--max-message-bytes: must be at least 1, got -1"),
    ("ONECARD_MAX_MESSAGE_BYTES", "0", "--max-message-bytes: must be at least 1, got 0"),
    ("--max-amount", "-3", "--max-amount: must be at least 1, got -3"),
    ("ONECARD_MAX_AMOUNT", "4294967296", "--max-amount: must be at most 4294967295"),
    ("--reversal-window", "-1", "--reversal-window: must be at least 0, got -1.0"),
    ("ONECARD_REFUND_HOLD", "-0.5", "--refund-hold: must be at least 0, got -0.5"),
    ("--refund-hold", "nan", "--refund-hold: must be a finite number from 0 to 315360000"),
    ("--refund-job-interval", "-2", "--refund-job-interval: must be at least 0, got -2.0"),
    ("ONECARD_LINGER_MS", "inf", "--linger-ms: must be a finite number from 0 to 1000"),
    ("ONECARD_ALLOW_SLOW_CRYPTO", "maybe", "--allow-slow-crypto: must be one of 1, true, yes"),
    ("ONECARD_WORKERS", "0", "--workers: must be at least 1, got 0"),
    ("ONECARD_LISTEN", "nowhere", "--listen: must be HOST:PORT"),
    ("--lock-timeout-ms", "-1", "--lock-timeout-ms: must be at least 0, got -1"),
    # Taken, then failing later (found by review): gRPC's hard limit, three times
    # it, overflowed a C int after the database had started; every reversal
    # failed in make_interval; every due date of a held refund passed year 9999.
    ("--max-pending-calls", "1000000000", "--max-pending-calls: must be at most 10000000"),
    ("--reversal-window", "1e13", "--reversal-window: must be at most 31536000"),
    ("ONECARD_REFUND_HOLD", "1e12", "--refund-hold: must be at most 315360000"),
    ("--refund-job-interval", "1e9", "--refund-job-interval: must be at most 86400"),
    # gRPC refuses a message over the limit itself, as RESOURCE_EXHAUSTED, which a
    # gateway takes for "retry later": a batch the ledger allows must always fit.
    ("--max-message-bytes", "65536", "--max-message-bytes: must hold an upload batch of "
     "--max-upload-batch 5000 records"),
    ("--max-upload-batch", "100000", "--max-message-bytes: must hold an upload batch of "
     "--max-upload-batch 100000 records"),
]  # fmt: skip


def _args(where: str, value: str, data: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that set ``where`` to ``value``."""
    if where.startswith("ONECARD_"):
        return ["serve", "--data-dir", str(data)], {where: value}
    if where in ("--log-level", "--log-format"):  # options of `onecard` itself
        return [f"{where}={value}", "serve", "--data-dir", str(data)], {}
    return ["serve", "--data-dir", str(data), f"{where}={value}"], {}


@pytest.mark.parametrize(("where", "value", "said"), BAD_SETTINGS)
def test_a_bad_setting_is_refused_naming_its_flag_and_limit(
    where: str,
    value: str,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, env = _args(where, value, tmp_path / "data")
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err, err
    if where.startswith("ONECARD_"):
        assert f"(from {where})" in err, err
    else:
        assert "(from ONECARD_" not in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_a_bad_variable_of_serve_does_not_break_other_subcommands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ONECARD_POOL_SIZE=eight used to crash `onecard desk` too, while the parser was built."""
    monkeypatch.setenv("ONECARD_POOL_SIZE", "eight")
    assert main(["desk", "--help"]) == 0
    assert "report-loss" in capsys.readouterr().out


def _serve_command(data: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``onecard serve --data-dir DATA`` as an operator runs it, with ``env`` set."""
    return subprocess.run(
        [sys.executable, "-m", "onecard.server.cli", "serve", "--data-dir", str(data)],
        env={**os.environ, "ONECARD_LISTEN": "127.0.0.1:0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_variable_exits_2_from_the_command(tmp_path: Path) -> None:
    """The installed command as an operator runs it: exit 2, one line of advice, no traceback."""
    data = tmp_path / "data"
    run = _serve_command(data, ONECARD_POOL_SIZE="eight")
    assert run.returncode == 2, run.stdout + run.stderr
    assert (
        "--pool-size: must be an integer of at least 1, got 'eight' (from ONECARD_POOL_SIZE)"
        in (run.stderr)
    )
    assert "Traceback" not in run.stderr
    assert not data.exists()


def test_good_variables_still_set_their_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from onecard.server.cli import build_parser
    from onecard.server.config import config_from_args

    monkeypatch.setenv("ONECARD_POOL_SIZE", "3")
    monkeypatch.setenv("ONECARD_ALLOW_SLOW_CRYPTO", "yes")
    monkeypatch.setenv("ONECARD_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("ONECARD_REFUND_HOLD", "0")
    args = build_parser().parse_args(["serve", "--max-amount", "5000"])
    cfg = config_from_args(args)
    assert (cfg.pool_size, cfg.allow_slow_crypto, args.log_level) == (3, True, "warning")
    assert (cfg.desk.refund_hold, cfg.limits.max_amount) == (0.0, 5000)
    # the command line wins over the variable
    assert config_from_args(build_parser().parse_args(["serve", "--pool-size", "5"])).pool_size == 5


#: (DSN, what the refusal must say): the password is never said.
BAD_DSNS = [
    ("postgresql://ledger:S3cretPW@db.example:54x2/onecard", "a port must be a number, got '54x2'"),
    ("postgresql://ledger:S3cretPW@db.example/onecard?sslmode=requir", "`sslmode` parameter"),
    ("mysql://ledger:S3cretPW@db.example/onecard", "scheme is expected to be either"),
    # An unescaped '/' in the password: asyncpg would read "S3c" as the port.
    ("postgresql://ledger:S3c/retPW@db.example/onecard", "must be written %2F"),
    ("postgresql://ledger@db.example/onecard?password=S3cretPW&sslmode=x", "`sslmode` parameter"),
]  # fmt: skip


@pytest.mark.parametrize("source", ["--dsn", "ONECARD_DSN"])
@pytest.mark.parametrize(("dsn", "said"), BAD_DSNS)
def test_a_malformed_dsn_is_refused_naming_it_and_never_its_password(
    source: str,
    dsn: str,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A DSN asyncpg cannot parse was not checked before start: its ValueError
    (or ClientConfigurationError) left asyncpg.create_pool uncaught, 50 lines of
    traceback and exit 1, no word of which setting was wrong (found by review)."""
    data = tmp_path / "data"
    argv = ["serve", "--data-dir", str(data)]
    if source == "--dsn":
        argv.append(f"--dsn={dsn}")
    else:
        monkeypatch.setenv(source, dsn)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "argument --dsn: " in err and said in err, err
    assert ("(from ONECARD_DSN)" in err) == (source == "ONECARD_DSN"), err
    assert "S3c" not in out + err
    assert not data.exists()  # refused before anything started


def test_a_malformed_dsn_exits_2_from_the_command(tmp_path: Path) -> None:
    """The command as an operator runs it, with a DSN whose port has a typo:
    it printed a traceback and exited 1, a supervisor's "crashed" (found by review)."""
    data = tmp_path / "data"
    run = _serve_command(data, ONECARD_DSN="postgresql://ledger:S3cretPW@db.example:54x2/onecard")
    assert run.returncode == 2, run.stdout + run.stderr
    assert (
        "argument --dsn: asyncpg cannot use it: a port must be a number, got '54x2' "
        "(from ONECARD_DSN)" in run.stderr
    )
    assert "Traceback" not in run.stderr and "S3cretPW" not in run.stdout + run.stderr
    assert not data.exists()


def test_a_malformed_dsn_in_a_namespace_built_by_hand_is_refused_too() -> None:
    """config_from_args checks the DSN again, as it does the bounds, for callers that
    build the namespace themselves; it passed anything on (found by review)."""
    from onecard.ledger.crypto.encoding import FieldError
    from onecard.server.cli import build_parser
    from onecard.server.config import config_from_args

    args = build_parser().parse_args(["serve"])
    args.dsn = "postgresql://ledger:S3cretPW@db.example:54x2/onecard"
    with pytest.raises(FieldError) as refused:
        config_from_args(args)
    assert str(refused.value).startswith("--dsn (ONECARD_DSN): asyncpg cannot use it")
    assert "S3cretPW" not in str(refused.value)
    # What asyncpg takes is taken: a host list, a socket directory, parameters.
    for good in (
        "postgresql://ledger:pw@db1:5432,db2:5432/onecard?target_session_attrs=read-write",
        "postgresql://ledger@/onecard?host=/run/postgresql&port=5433",
        "postgresql://ledger:p%2Fw@[::1]:5432/onecard?sslmode=disable",
    ):
        args.dsn = good
        assert config_from_args(args).dsn == good


#: Passwords with characters urllib reads as an IPv6 host's brackets, and
#: quotes that Python's repr escapes: the refusal quoted a piece of them.
BRACKETED_PASSWORDS = [
    "postgresql://ledger:x[S3cretPW]y@db.example/onecard",
    "postgresql://ledger:[S3cret'PW]@db.example/onecard",
    """postgresql://ledger:[S3cr"et'PW]@db.example/onecard""",
    "postgresql://ledger:S3cret[PW@[::1]:5432/onecard",
]


@pytest.mark.parametrize("dsn", BRACKETED_PASSWORDS)
def test_a_password_with_brackets_or_quotes_is_not_quoted_in_the_refusal(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """urllib refuses a '[' or ']' outside a host, quoting what it took for the
    host: a piece of the password, which the refusal printed (found by review)."""
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), f"--dsn={dsn}"]) == 2
    out, err = capsys.readouterr()
    assert "argument --dsn: asyncpg cannot use it" in err, err
    assert "S3c" not in out + err and "retPW" not in out + err and "et'PW" not in err, err
    assert not data.exists()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://ledger:S3cretPW@db1,/onecard",
        "postgresql://ledger:S3cretPW@,db1/onecard",
        "postgresql://ledger:S3cretPW@db1,,db2/onecard",
    ],
)
def test_a_dsn_with_an_empty_host_in_its_list_is_refused_not_a_traceback(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trailing comma in the host list made asyncpg's parser raise IndexError,
    which the check let through: a traceback while the arguments were parsed
    (found by review)."""
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), f"--dsn={dsn}"]) == 2
    out, err = capsys.readouterr()
    assert "argument --dsn: asyncpg cannot use it: a host of its host list is empty" in err, err
    assert "S3c" not in out + err
    assert not data.exists()


def test_a_settings_printout_never_shows_the_database_password() -> None:
    """A ServerConfig in a log line or a traceback's locals printed its DSN whole (review)."""
    from onecard.server.config import ServerConfig

    shown = repr(ServerConfig(dsn="postgresql://ledger:Pr1vate-pw@db1:5432/onecard"))
    assert "Pr1vate-pw" not in shown and "listen=" in shown


def test_a_key_cache_this_machine_cannot_allocate_is_refused_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache is allocated whole at start (about 100 bytes a key): --key-cache-size
    1073741823, the extension's own ceiling and so taken by the bounds, asks for about
    100 GB, and the server ended in a MemoryError traceback. The allocation failing is
    simulated, so that the test does not depend on this machine's memory."""
    from onecard.ledger.crypto import _fast

    class NoMemory:
        def __init__(self, cache_size: int) -> None:
            raise MemoryError

    monkeypatch.setattr(_fast, "BatchVerifier", NoMemory)
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    assert main([*argv, "--key-cache-size", "1073741823"]) == 2
    err = capsys.readouterr().err
    assert "--key-cache-size" in err and "1,073,741,823" in err, err
    assert "Traceback" not in err


def test_migrate_without_a_dsn_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 naming --dsn and its twin, as every other missing or bad setting; it
    exited 1, the code the CLI keeps for a failed run (a refused business rule, books
    that do not add up)."""
    monkeypatch.delenv("ONECARD_DSN", raising=False)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "--dsn" in err and "ONECARD_DSN" in err, err
