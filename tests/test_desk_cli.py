"""`onecard desk …` on a real server: tables, --json, exit codes, errors that say what to do."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.server.cli import main
from tests.desk_support import funded
from tests.support import assert_books_balance, new_card_number


async def desk(
    capsys: pytest.CaptureFixture[str], server: RunningServer | None, *argv: str
) -> tuple[int, str, str]:
    """Run the CLI in a thread (it runs its own event loop) and capture what it printed."""
    target = server.address if server is not None else "127.0.0.1:1"
    args = ["desk", *argv, "--target", target, "--operator", "clerk7", "--timeout", "5"]
    code = await asyncio.to_thread(main, args)
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_flows_tables_and_json(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no = new_card_number()
    code, out, _ = await desk(
        capsys, server, "issue", no, "--product", "student", "--deposit", "2000",
        "--name", "李四", "--id-number", "32010219900101123X", "--phone", "13900001111",
    )  # fmt: skip
    assert code == 0, out
    assert "3201**********123X" in out and "139****1111" in out
    assert "32010219900101123X" not in out and "13900001111" not in out

    code, out, _ = await desk(capsys, server, "show", no, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "CARD_STATUS_ACTIVE" and doc["holder"]["name"] == "李*"

    code, out, _ = await desk(capsys, server, "report-loss", no, "--json")
    assert code == 1 and json.loads(out)["status"] == "DESK_STATUS_HOLDER_MISMATCH"
    code, out, _ = await desk(
        capsys, server, "report-loss", no, "--id-number", "32010219900101123x", "--json"
    )
    assert code == 0, out
    lost = json.loads(out)
    assert lost["card"]["status"] == "CARD_STATUS_LOST" and lost["request_id"]
    # The same request id again: the first outcome, exit 0, nothing changes.
    code, out, _ = await desk(
        capsys, server, "report-loss", no, "--id-number", "32010219900101123X",
        "--request-id", lost["request_id"], "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["card"] == lost["card"]

    code, out, _ = await desk(capsys, server, "deny-list")
    assert code == 0 and no in out and "version 1" in out

    new_no = new_card_number()
    code, out, _ = await desk(
        capsys, server, "replace", no, new_no, "--id-number", "32010219900101123X"
    )
    assert code == 0, out
    assert "new card:" in out and "blocked" in out

    code, out, _ = await desk(capsys, server, "history", new_no)
    assert code == 0 and "deposit_transfer" in out and "+2000" in out

    code, out, _ = await desk(
        capsys, server, "cancel", new_no, "--id-number", "32010219900101123X", "--json"
    )
    assert code == 0 and json.loads(out)["status"] == "DESK_STATUS_REFUND_PENDING"
    code, out, _ = await desk(capsys, server, "cancel", new_no, "--card-balance", "0")
    assert code == 1 and "wrong_state" in out and "closed" in out
    await assert_books_balance(server.dsn)


async def test_cli_refund_and_reverse(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from onecard.clients.terminal import Terminal

    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, "310400000001", 40).debit(card, 300)).status == 1
    code, out, _ = await desk(capsys, server, "history", card.card_no, "--json")
    purchase = json.loads(out)["entries"][0]
    assert purchase["kind"] == "POSTING_KIND_PURCHASE"
    posting = purchase["posting_id"]
    code, out, _ = await desk(
        capsys, server, "refund", card.card_no, posting, "400", "--case", "C-1", "--reason", "x"
    )
    assert code == 1 and "at most 300 fen" in out
    code, out, _ = await desk(
        capsys, server, "refund", card.card_no, posting, "100", "--case", "C-1", "--reason", "x"
    )
    assert code == 0 and "refunded 100 fen" in out
    code, out, _ = await desk(
        capsys, server, "reverse", card.card_no, "300",
        "--terminal", "310400000001", "--seq", "41", "--original-seq", "40",
    )  # fmt: skip
    assert code == 1 and "not_reversible" in out and "refunded in part" in out
    await assert_books_balance(server.dsn)


async def test_cli_reverse_run_again_answers_the_first_outcome_and_names_the_clerk(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A clerk runs a reversal again after its reply was lost: it is the same reversal.

    The tool stamps each try with the time, which was part of what made a
    retry "the same": the second try was refused as CONFLICT, the clerk
    told it had failed though the money was back, and a refund at the desk
    would have paid the purchase back twice. The reversal was also audited
    as the terminal's, naming no clerk (found by review).
    """
    from onecard.clients.terminal import Terminal
    from tests.support import fetch

    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, "310400000001", 50).debit(card, 300)).status == 1
    argv = (
        "reverse", card.card_no, "300",
        "--terminal", "310400000001", "--seq", "51", "--original-seq", "50",
    )  # fmt: skip
    code, out, _ = await desk(capsys, server, *argv)
    assert code == 0 and "approved" in out, out
    await asyncio.sleep(1.1)  # a second later: another time stamp
    code, out, _ = await desk(capsys, server, *argv)
    assert code == 0 and "duplicate" in out and "10.00" in out, out
    rows = await fetch(
        server.dsn,
        "SELECT staff_id, after->'details'->>'terminal' AS terminal FROM audit_log"
        " WHERE card_no = $1 AND operation = 'reverse'",
        int(card.card_no),
    )
    assert [(r["staff_id"], r["terminal"]) for r in rows] == [("clerk7", "310400000001")]
    await assert_books_balance(server.dsn)


async def test_cli_exit_codes_for_usage_and_outage(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await desk(capsys, server, "show", "12")
    assert code == 2 and err.startswith("onecard desk show: card_number")
    code, _, err = await desk(capsys, server, "show", "3104999999999999")
    assert code == 1 and "not issued" in err and "check the card number" in err
    code, _, err = await desk(capsys, None, "report-loss", "3104000000000001")
    assert code == 3 and "retry with --request-id" in err
    no_staff = await asyncio.to_thread(
        main, ["desk", "show", "3104000000000001", "--target", server.address, "--operator", ""]
    )
    assert no_staff == 2
    assert "ONECARD_OPERATOR" in capsys.readouterr().err


async def test_cli_server_error_prints_the_request_id_to_retry_with(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected server error may come after the action was done: retry under its id."""
    import re

    from onecard.ledger.storage import lifecycle as store
    from tests.desk_support import audit_trail

    card = await funded(channel, keys, 1000)
    real = store.report_loss

    async def broken(*args: object) -> object:
        raise RuntimeError("a bug in the server")

    monkeypatch.setattr(store, "report_loss", broken)
    code, _, err = await desk(capsys, server, "report-loss", card.card_no)
    assert code == 3 and "UNKNOWN" in err, err
    found = re.search(r"retry with --request-id (\S+)", err)
    assert found, err
    monkeypatch.setattr(store, "report_loss", real)
    code, out, _ = await desk(
        capsys, server, "report-loss", card.card_no, "--request-id", found.group(1), "--json"
    )
    assert code == 0 and json.loads(out)["request_id"] == found.group(1)
    ops = [op for _, op, _, _ in await audit_trail(server.dsn, card.card_no)]
    assert ops == ["issue_card", "report_loss"]


async def test_cli_deny_list_gathers_every_page(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI shows the whole list, not the first page of it."""
    from onecard.clients import desk_cli
    from tests.desk_support import OK, report_loss
    from tests.support import issue

    cards = [await issue(channel, keys) for _ in range(3)]
    for card in cards:
        assert (await report_loss(channel, card.card_no)).status == OK
    monkeypatch.setattr(desk_cli, "DENY_LIST_PAGE", 2)  # three entries: two pages
    code, out, _ = await desk(capsys, server, "deny-list", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert sorted(e["card_number"] for e in doc["entries"]) == sorted(c.card_no for c in cards)
    assert doc["full"] and doc["version"] == "3" and "next_page_token" not in doc


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("history", "3104000000000001", "--limit", "-1"), "--limit"),
        (("issue", "3104000000000001", "--deposit", "0", "--key-version", "-1"), "--key-version"),
        (("issue", "3104000000000001", "--deposit", "0", "--key-version", "4294967296"),
         "--key-version"),
        (("replace", "3104000000000001", "3104000000000002", "--key-version", "-1"),
         "--key-version"),
        (("deny-list", "--since", "-1"), "--since"),
        (("refund", "3104000000000001", "9223372036854775808", "1", "--case", "C", "--reason",
          "r"), "posting"),
        (("refund", "3104000000000001", "1", "9223372036854775808", "--case", "C", "--reason",
          "r"), "amount"),
        (("cancel", "3104000000000001", "--card-balance", "9223372036854775808"),
         "--card-balance"),
        (("reverse", "3104000000000001", "-1", "--terminal", "310400000001", "--seq", "2",
          "--original-seq", "1"), "amount"),
        (("reverse", "3104000000000001", "100", "--terminal", "310400000001", "--seq", "-1",
          "--original-seq", "1"), "--seq"),
        (("reverse", "3104000000000001", "100", "--terminal", "310400000001", "--seq", "2",
          "--original-seq", "4294967296"), "--original-seq"),
    ],
)  # fmt: skip
async def test_cli_number_outside_its_field_is_a_usage_error_naming_it(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], flag: str
) -> None:
    """A number the request's field cannot hold is refused naming the argument, no traceback."""
    code, _, err = await desk(capsys, None, *argv)
    assert code == 2, err
    assert f"argument {flag}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("timeout", ["0", "-1"])
async def test_cli_timeout_not_above_zero_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    """A deadline already past is the caller's mistake, not an outage to retry (exit 3)."""
    code = await asyncio.to_thread(
        main,
        ["desk", "show", "3104000000000001", "--target", "127.0.0.1:1", "--operator", "clerk7",
         "--timeout", timeout],
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--timeout" in err and "retry" not in err, err


@pytest.mark.parametrize("staff", ["张三", "clerk\n7"])
async def test_cli_staff_id_grpc_cannot_send_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], staff: str
) -> None:
    """gRPC metadata is printable ASCII: a clerk's id in Chinese ended the command in a
    traceback (ExecuteBatchError) before anything was sent."""
    code = await asyncio.to_thread(
        main,
        ["desk", "show", "3104000000000001", "--target", "127.0.0.1:1", "--operator", staff],
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--operator" in err and "ASCII" in err and "Traceback" not in err, err
    assert staff not in err
