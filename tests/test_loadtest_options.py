"""Options that would run nothing, and a server that cannot be found, are refused up front.

``--concurrency 0`` used to start no worker and report an empty, consistent
run; a missing ``server.addr`` surfaced as "cannot reach the database or the
network". Both are the operator's to fix, so they get exit 2 and a message
naming the option or the file, before anything is seeded or sent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from onecard.clients.loadtest import add_arguments, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onecard loadtest")
    add_arguments(p)
    return p


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
        (["--concurrency", "-3"], "argument --concurrency: must be at least 1, got -3"),
        (["--count", "0"], "argument --count: must be at least 1, got 0"),
        (["--count", "-1"], "argument --count: must be at least 1, got -1"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--batch", "-1"], "argument --batch: must be at least 1, got -1"),
        (["--channels", "0"], "argument --channels: must be at least 1, got 0"),
        (["--cards", "0"], "argument --cards: must be at least 1, got 0"),
        (["--terminals", "0"], "argument --terminals: must be at least 1, got 0"),
        (["--mix", "debit=0,upload=0"], "argument --mix: needs at least one weight > 0"),
        (["--mix", "debit=-1"], "argument --mix: takes kind=weight pairs"),
        (["--rate", "-5"], "argument --rate: must be finite and >= 0, got -5"),
        (["--rate", "nan"], "argument --rate: must be finite and >= 0, got nan"),
        (["--duration", "0"], "argument --duration: must be finite and > 0, got 0"),
        (["--duration", "-2"], "argument --duration: must be finite and > 0, got -2"),
        (["--timeout", "0"], "argument --timeout: must be finite and > 0, got 0"),
        (["--timeout", "inf"], "argument --timeout: must be finite and > 0, got inf"),
    ],
)
def test_an_option_that_runs_nothing_is_refused_naming_its_limit(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("nan", "argument --zipf: must be finite and >= 0, got nan"),
        ("inf", "argument --zipf: must be finite and >= 0, got inf"),
        ("-1", "argument --zipf: must be finite and >= 0, got -1"),
    ],
)
def test_a_zipf_skew_that_is_no_finite_number_at_least_0_is_refused_naming_the_option(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rate nan was refused, --zipf nan taken: every draw then landed on one card
    (the CDF all NaN, bisect answering rank 0) and the run reported a "Zipf-like"
    load that was one card's lock queue; a negative skew made the rarest cards the
    most popular (found by review)."""
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--zipf", value])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("skew", ["0", "1000"])
def test_a_zipf_skew_of_0_or_a_large_one_is_taken_and_drawn(skew: str) -> None:
    """0 is every card alike; 1000 put 100,000 ** 1000 in a float, an OverflowError
    before the run started (found by review)."""
    import random

    from onecard.clients.population import Zipf

    s = _parser().parse_args(["--zipf", skew]).zipf
    zipf = Zipf(100_000, s, random.Random(1))
    drawn = {zipf.draw() for _ in range(1_000)}
    assert len(drawn) > 900 if s == 0 else len(drawn) == 1


async def test_a_rate_and_duration_that_make_no_request_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(
        ["--rate", "0.5", "--duration", "1", "--target", "127.0.0.1:9", "--data-dir", str(tmp_path)]
    )
    assert await run(args) == 2
    err = capsys.readouterr().err
    assert "--rate 0.5 for --duration 1 s makes 0 requests" in err


async def test_a_missing_server_address_says_to_start_the_server_or_give_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(["--data-dir", str(tmp_path), "--count", "5"])
    assert await run(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(tmp_path / "server.addr") in err
    assert "start the server" in err and "--target" in err
    assert "cannot reach" not in err


async def test_a_malformed_dsn_is_refused_naming_it_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to reach asyncpg.connect and end in a ValueError traceback.
    dsn = "postgresql://loader:s3cretpw@db.example:54x2/onecard"
    args = _parser().parse_args(
        ["--target", "127.0.0.1:9", "--dsn", dsn, "--data-dir", str(tmp_path), "--count", "5"]
    )
    assert await run(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--dsn" in err and "a port must be a number, got '54x2'" in err
    assert "s3cretpw" not in err


def test_an_opening_balance_no_chip_can_hold_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A purse is 4 bytes on the card (PROTOCOL.md): past it every upload batch was
    refused INVALID_ARGUMENT (card_balance_before) and, past int64, the seeding failed
    as "cannot reach the database or the network", exit 3."""
    assert _parser().parse_args(["--card-balance", "4294967295"]).card_balance == 4294967295
    for value in ("4294967296", "99999999999999999999"):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(["--card-balance", value])
        assert exc.value.code == 2
        assert "argument --card-balance: must be at most 4294967295" in capsys.readouterr().err


async def test_a_plot_without_matplotlib_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is the [plot] extra, not installed by `pip install .`: the README's
    example (--plot run.png) ran the whole load and then ended in a traceback
    (ModuleNotFoundError) instead of its exit code."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    args = _parser().parse_args(
        ["--target", "127.0.0.1:9", "--data-dir", str(tmp_path), "--count", "1",
         "--json", str(tmp_path / "run.json"), "--plot", str(tmp_path / "run.png")]
    )  # fmt: skip
    assert await run(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--plot" in err and "matplotlib" in err and "[plot]" in err, err
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("option", ["--json", "--plot"])
async def test_a_report_file_in_a_missing_directory_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """The report is written last: the run went to its end, then lost its report and
    said "cannot reach the database or the network", exit 3."""
    missing = tmp_path / "no-such-dir" / "run.out"
    args = _parser().parse_args(
        ["--target", "127.0.0.1:9", "--data-dir", str(tmp_path), "--count", "1",
         option, str(missing)]
    )  # fmt: skip
    assert await run(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert option in err and str(missing.parent) in err and "cannot reach" not in err, err
