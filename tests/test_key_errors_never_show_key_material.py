"""A master key in the wrong place of a key document is never echoed.

Refusals used to quote what they refused: a master key pasted as the suite
or as a key version came back in full on stderr ("unknown suite
'00112233…'"), and in the log when a SIGHUP reloaded such a file. Every
refusal now names the place and the rule, and describes a value only by its
kind and length.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from onecard.clients.terminal import Terminal
from onecard.ledger.devdata import DEV_KEYS
from onecard.ledger.keys import FileKeyStore, KeyStoreError, key_store_from_env, parse_key_document
from onecard.server.cli import main
from onecard.v1 import common_pb2
from tests.support import cli_server_env, dev_keys, issue, start_cli_server
from tests.test_workers import Output, kill_all

#: Stands in for a production master key.
KEY = "00112233445566778899AABBCCDDEEFF"
GOOD = {"suite": "pboc-3des", "mtk": "11" * 16, "mlk": "22" * 16}


def _shows_key(text: str) -> bool:
    """Whether ``text`` holds the key, or any 8 hex digits of it, in either case."""
    low = text.lower()
    key = KEY.lower()
    return any(key[i : i + 8] in low for i in range(len(key) - 7))


def _doc(entry: Any) -> dict[str, Any]:
    return {"issuers": {"3104": {"1": entry}}}


#: (what is wrong, the document, what the refusal must say)
BAD_DOCUMENTS: list[tuple[str, Any, str]] = [
    ("a list", [KEY], "must be a JSON object"),
    ("a string", KEY, "must be a JSON object"),
    ("issuers missing", {"keys": KEY}, "issuers must be an object of issuer codes, got missing"),
    ("issuers a string", {"issuers": KEY}, "issuers must be an object of issuer codes"),
    ("issuers a list", {"issuers": [KEY]}, "issuers must be an object of issuer codes"),
    ("key as issuer", {"issuers": {KEY: {"1": GOOD}}}, "issuers.(member 1): an issuer code"),
    ("versions a string", {"issuers": {"3104": KEY}}, "issuers.3104 must be an object of key"),
    ("key as key version", {"issuers": {"3104": {KEY: GOOD}}}, "issuers.3104.(member 1): a key"),
    ("key version 256", {"issuers": {"3104": {"256": GOOD}}}, "from 0 to 255"),
    ("entry a string", _doc(KEY), "issuers.3104.1 must be an object with suite, mtk, mlk"),
    ("entry a list", _doc([KEY]), "issuers.3104.1 must be an object with suite, mtk, mlk"),
    ("suite missing", _doc({"mtk": KEY, "mlk": KEY}), "issuers.3104.1.suite is missing"),
    ("mlk missing", _doc({"suite": "sm4", "mtk": KEY}), "issuers.3104.1.mlk is missing"),
    ("key as suite", _doc({**GOOD, "suite": KEY}), "issuers.3104.1.suite must be one of"),
    ("suite a number", _doc({**GOOD, "suite": 12345678}), "issuers.3104.1.suite must be one of"),
    ("suite as mtk", _doc({**GOOD, "mtk": "pboc-3des", "suite": KEY}), "suite must be one of"),
    ("mtk not hex", _doc({**GOOD, "mtk": KEY[:-2] + "ZZ"}), "issuers.3104.1.mtk must be 32 hex"),
    ("mtk too long", _doc({**GOOD, "mtk": KEY + "00"}), "got 17 bytes"),
    ("mtk too short", _doc({**GOOD, "mlk": KEY[:30]}), "issuers.3104.1.mlk must be 32 hex"),
    ("mtk a number", _doc({**GOOD, "mtk": int(KEY[:18])}), "got a number"),
    ("mtk a list", _doc({**GOOD, "mtk": [KEY]}), "got a list of 1 items"),
]


@pytest.mark.parametrize(("case", "doc", "said"), BAD_DOCUMENTS, ids=[c[0] for c in BAD_DOCUMENTS])
def test_every_refusal_of_a_key_document_names_the_place_not_the_value(
    case: str, doc: Any, said: str, tmp_path: Path
) -> None:
    with pytest.raises(KeyStoreError) as direct:
        parse_key_document(doc, "keys.json")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(KeyStoreError) as from_file:
        FileKeyStore(path)
    with pytest.raises(KeyStoreError) as from_env:
        key_store_from_env({"ONECARD_KEYS_JSON": json.dumps(doc)})
    for message in (str(direct.value), str(from_file.value), str(from_env.value)):
        assert said in message, message
        assert not _shows_key(message), message
    assert str(from_env.value).startswith("ONECARD_KEYS_JSON: ")


@pytest.mark.parametrize("where", ["--keys", "ONECARD_KEYS_JSON"])
@pytest.mark.parametrize(
    ("case", "doc", "said"), BAD_DOCUMENTS[::4], ids=[c[0] for c in BAD_DOCUMENTS[::4]]
)
def test_the_cli_refuses_a_bad_key_document_without_echoing_it(
    case: str,
    doc: Any,
    said: str,
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    if where == "--keys":
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        argv += ["--keys", str(path)]
    else:
        monkeypatch.setenv("ONECARD_KEYS_JSON", json.dumps(doc))
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert said in captured.err
    assert "Traceback" not in captured.err
    assert not _shows_key(captured.out + captured.err)
    assert not (tmp_path / "data" / "pg").exists()  # refused before the database started


def test_unreadable_and_non_utf8_key_files_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"issuers": {"3104": {"1": {"mtk": "\xff' + KEY.encode() + b'"}}}}')
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match="is not UTF-8 text") as err:
        FileKeyStore(path)
    assert not _shows_key(str(err.value))
    path.unlink()
    path.mkdir(mode=0o700)  # unreadable as a file, even for root
    with pytest.raises(KeyStoreError, match="cannot be read"):
        FileKeyStore(path)


async def test_sighup_with_a_bad_key_file_logs_the_place_and_keeps_the_old_keys(
    db_dsn: str, tmp_path: Path
) -> None:
    """Each bad file on reload: one clear log line, no key in it, old keys still in force."""
    env = await cli_server_env(db_dsn, tmp_path, ONECARD_ACCEPTORS="1")
    key_file = Path(env["ONECARD_KEYS"])
    proc, banner = await asyncio.to_thread(start_cli_server, [], env)
    out = Output(proc, banner)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        async with grpc.aio.insecure_channel(address) as chan:
            card = await issue(chan, dev_keys())
            await Terminal(chan, "310400000009").load(card, 1_000)
            bus = Terminal(chan, "310400000001")
            for case, doc, said in BAD_DOCUMENTS:
                key_file.write_text(json.dumps(doc))
                proc.send_signal(signal.SIGHUP)
                line = await asyncio.to_thread(out.wait_for, "key reload refused")
                assert said in line.string, (case, line.string)
            key_file.write_bytes(b'{"issuers": "\xff' + KEY.encode() + b'"}')
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(out.wait_for, "key reload refused.*is not UTF-8 text")
            key_file.unlink()
            key_file.mkdir(mode=0o700)
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(out.wait_for, "key reload refused.*cannot be read")
            reply = await bus.debit(card, 100)  # the old keys still verify
            assert reply.status == common_pb2.TXN_STATUS_APPROVED
            key_file.rmdir()
            key_file.write_text(json.dumps(DEV_KEYS))
            key_file.chmod(0o600)
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(out.wait_for, "key file reloaded: 3 key versions")
    finally:
        proc.send_signal(signal.SIGTERM)
        text = await asyncio.to_thread(out.rest)
        kill_all(proc)
    assert proc.returncode == 0, text
    assert not _shows_key(text)
    assert "Traceback" not in text
    assert os.path.exists(key_file)


@pytest.mark.parametrize(
    "given",
    [
        json.dumps(_doc({"suite": "sm4", "mtk": KEY, "mlk": KEY})),  # short: "does not exist"
        json.dumps(_doc({"suite": "sm4", "mtk": KEY, "mlk": KEY, "pad": "0" * 400})),  # too long
        KEY,
    ],
    ids=["key JSON", "long key JSON", "hex key"],
)
@pytest.mark.parametrize("flag", ["ONECARD_KEYS", "--pii-key-file"])
def test_a_key_given_where_a_file_name_goes_is_not_echoed(
    given: str,
    flag: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Keys pasted into ONECARD_KEYS (the file's name; inline keys go in
    ONECARD_KEYS_JSON) or --pii-key-file came back whole in the refusal."""
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    if flag == "ONECARD_KEYS":
        monkeypatch.setenv("ONECARD_KEYS", given)
    else:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps(DEV_KEYS))
        keys.chmod(0o600)
        argv += ["--keys", str(keys), "--dsn", "postgresql://u@127.0.0.1:1/x", "--pii-key-file"]
        argv.append(given)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not shown: it looks like key material" in err, err
    assert not _shows_key(err), err
    assert "Traceback" not in err


def test_a_key_file_reached_through_a_link_is_checked_as_the_file_read(tmp_path: Path) -> None:
    """The file is checked as opened: a link to a file others can read, or a file of
    another user, is refused, whichever name it is reached by."""
    private = tmp_path / "keys.json"
    private.write_text(json.dumps(DEV_KEYS))
    private.chmod(0o600)
    public = tmp_path / "public.json"
    public.write_text(json.dumps(DEV_KEYS))
    public.chmod(0o644)
    link = tmp_path / "current.json"
    link.symlink_to(private)
    FileKeyStore(link)  # a private file through a link: fine
    link.unlink()
    link.symlink_to(public)
    with pytest.raises(KeyStoreError, match="accessible by group or others"):
        FileKeyStore(link)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(private, 65534, 65534)
        with pytest.raises(KeyStoreError, match="belongs to another user"):
            FileKeyStore(private)


@pytest.mark.parametrize("which", ["development key file", "personal-data key file"])
def test_a_key_file_that_cannot_be_made_is_refused_naming_it(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data directory where the key file cannot be made (here under a regular
    file) was reported as "cannot reach the database or the network" with exit
    3, a supervisor's "retry", naming neither the key file nor the directory's
    problem (found by review)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    argv = ["serve", "--data-dir", str(blocker / "data"), "--listen", "127.0.0.1:0"]
    if which == "personal-data key file":
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps(DEV_KEYS))
        keys.chmod(0o600)
        argv += ["--keys", str(keys)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"onecard: {which} {blocker / 'data'}" in err and "cannot be made" in err, err
    assert "network" not in err and "Traceback" not in err, err


def test_a_new_personal_data_key_is_on_disk_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key's digests reach the database at once: a key file left in the page cache
    could come back empty after a power loss while the digests stayed, and no holder's
    ID check would pass again (found by review). The file and its directory are synced."""
    from onecard.ledger.pii import load_or_create_key

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "data" / "pii-key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert synced == [str(path), str(path.parent)]
    assert load_or_create_key(path) == key and len(synced) == 2  # read, not made again


def test_a_key_document_with_a_huge_number_is_refused_not_a_traceback(tmp_path: Path) -> None:
    """json refuses an integer of over 4,300 digits with a bare ValueError (found by review)."""
    text = '{"versions": [{"issuer": "3104", "key_version": ' + "9" * 5000 + "}]}"
    path = tmp_path / "keys.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match="holds a number too long to read"):
        FileKeyStore(path)
    with pytest.raises(KeyStoreError, match="ONECARD_KEYS_JSON holds a number too long"):
        key_store_from_env({"ONECARD_KEYS_JSON": text})
