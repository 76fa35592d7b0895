"""The Cython/OpenSSL card-crypto path: PROTOCOL.md vectors, batches, caching, and the twin.

Every PROTOCOL.md vector goes through the extension's per-call functions and
through ``FastVerifier`` batches; property tests then hold ``FastVerifier``
to ``ReferenceVerifier`` (the pure-Python twin) on random keys and records,
valid and tampered.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onecard.ledger.crypto import _fast, reference
from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.crypto.fast import FastVerifier, available, unavailable_reason
from onecard.ledger.crypto.suites import Suite
from onecard.ledger.crypto.verifier import (
    KEY_UNKNOWN,
    MAC_BAD,
    MAC_OK,
    CardVerifier,
    LoadCheck,
    PurchaseCheck,
    ReferenceVerifier,
)
from onecard.ledger.keys import KeyVersion, MasterKey, MemoryKeyStore
from tests.vectors import (
    BY_SUITE,
    CARD,
    KV,
    LOAD,
    PURCHASE,
    RFC4493_KEY,
    VECTORS,
    Vector,
    h,
)

# --------------------------------------------------------------------------
# PROTOCOL.md "Test vectors"

ids = [v.suite.label for v in VECTORS]


def purchase_check(v: Vector, issuer: str = "3104", kv: int = KV, **over: Any) -> PurchaseCheck:
    fields: dict[str, Any] = {"card_no": CARD, **PURCHASE, "tac": h(v.tac), **over}
    return PurchaseCheck(issuer=issuer, kv=kv, **fields)


def load_check(v: Vector, issuer: str = "3104", kv: int = KV, **over: Any) -> LoadCheck:
    fields: dict[str, Any] = {"card_no": CARD, **LOAD, "mac1": h(v.mac1), **over}
    return LoadCheck(issuer=issuer, kv=kv, **fields)


def test_available() -> None:
    assert available(), unavailable_reason()
    assert _fast.missing_ciphers() == []
    assert _fast.openssl_version().startswith("OpenSSL 3")


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_card_keys(v: Vector) -> None:
    tac_key = _fast.derive_card_key(v.suite, h(v.mtk), CARD, KV, _fast.PURPOSE_TAC)
    load_key = _fast.derive_card_key(v.suite, h(v.mlk), CARD, KV, _fast.PURPOSE_LOAD)
    assert tac_key.hex().upper() == v.card_tac_key
    assert load_key.hex().upper() == v.card_load_key


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_purchase_tac(v: Vector) -> None:
    tac = _fast.purchase_tac(v.suite, h(v.card_tac_key), **PURCHASE)
    assert tac.hex().upper() == v.tac
    assert len(tac) == v.suite.mac_length


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_load_session_key_and_macs(v: Vector) -> None:
    seslk = _fast.load_session_key(v.suite, h(v.card_load_key), LOAD["random"], 7)
    assert seslk.hex().upper() == v.seslk
    mac1 = _fast.load_mac1(v.suite, seslk, 1500, 5000, 0x02, LOAD["terminal_id"])
    mac2 = _fast.load_mac2(v.suite, seslk, 5000, 0x02, LOAD["terminal_id"], LOAD["date_time"])
    assert mac1.hex().upper() == v.mac1
    assert mac2.hex().upper() == v.mac2


def test_tac_input_is_the_published_one() -> None:
    """The TAC is the suite MAC over the exact 22 bytes PROTOCOL.md spells out."""
    data = h("000000C8063104000000010000002A20261122083015")
    for v in VECTORS:
        assert _fast.mac(v.suite, h(v.card_tac_key), data).hex().upper() == v.tac


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_vectors_through_the_batch_path(v: Vector) -> None:
    fv = FastVerifier(MemoryKeyStore([v.version()]))
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]
    assert fv.verify_loads([load_check(v)]) == [(MAC_OK, h(v.mac2))]
    # and again from a warm cache
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]
    assert fv.verify_loads([load_check(v)]) == [(MAC_OK, h(v.mac2))]
    assert fv.cache_stats()[0] == 2


# --------------------------------------------------------------------------
# Published primitive vectors (PROTOCOL.md), as far as they map onto _fast.

PBOC_PURCHASE_KEY = h("11223344556677888877665544332211")
PBOC_SESSION = h("003238ABC57659DD")


def test_pboc_published_session_key() -> None:
    assert _fast.ecb_encrypt(1, PBOC_PURCHASE_KEY, h("1122334400000001")) == PBOC_SESSION
    # the same 3DES-ECB as the first half of a pboc card-key derivation
    derived = _fast.derive_card_key(1, PBOC_PURCHASE_KEY, "1122334400000001", 1, 1)
    assert derived[:8] == PBOC_SESSION


def test_pboc_published_macs() -> None:
    data = h("000010000600112233445520120229135100")
    assert _fast.mac(1, PBOC_SESSION, data) == h("F15CAB75")
    # amount ‖ type ‖ terminal ‖ date time is MAC2's layout
    assert _fast.load_mac2(1, PBOC_SESSION, 0x1000, 6, "001122334455", "20120229135100") == h(
        "F15CAB75"
    )
    assert _fast.mac(1, PBOC_SESSION, h("00001000")) == h("56988A13")


def test_pboc_published_tac() -> None:
    key = h("00112233445566778899AABBCCDDEEFF")
    assert _fast.purchase_tac(1, key, 0x1000, 6, "001122334455", 1, "20120229135100") == h(
        "B3A0D49C"
    )
    data = h("00001000060011223344550000000120120229135100")
    assert _fast.mac(1, key, data) == h("B3A0D49C")


RFC4493 = [
    ("", "BB1D6929E95937287FA37D129B756746"),
    ("6BC1BEE22E409F96E93D7E117393172A", "070A16B46B4D4144F79BDD9DD04A287C"),
    (
        "6BC1BEE22E409F96E93D7E117393172AAE2D8A571E03AC9C9EB76FAC45AF8E5130C81C46A35CE411",
        "DFA66747DE9AE63030CA32611497C827",
    ),
    (
        "6BC1BEE22E409F96E93D7E117393172AAE2D8A571E03AC9C9EB76FAC45AF8E51"
        "30C81C46A35CE411E5FBC1191A0A52EFF69F2445DF4F9B17AD2B417BE66C3710",
        "51F0BEBF7E3B9D92FC49741779363CFE",
    ),
]


@pytest.mark.parametrize(("msg", "tag"), RFC4493, ids=["0", "16", "40", "64"])
def test_rfc4493_cmac(msg: str, tag: str) -> None:
    assert _fast.full_mac(3, RFC4493_KEY, h(msg)) == h(tag)
    assert _fast.mac(3, RFC4493_KEY, h(msg)) == h(tag)[:8]


def test_an10922_diversification() -> None:
    key = h("00112233445566778899AABBCCDDEEFF")
    div_input = h("0104782E21801D803042F54E585020416275")
    assert _fast.full_mac(3, key, div_input) == h("A8DD63A3B89D54B37CA802473FDA9175")


def test_aes_derivation_is_an10922_cmac() -> None:
    v = BY_SUITE[Suite.AES]
    div_input = b"\x01" + h(CARD) + bytes([1, KV]) + b"ONECAR"
    assert _fast.full_mac(3, h(v.mtk), div_input) == h(v.card_tac_key)


def test_sm4_block() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    assert _fast.ecb_encrypt(2, key, key) == h("681EDF34D206965E86B3E94F536E4246")


def test_sm4_cbc_mac_pad80() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    tag = h("4B6553AF3C4E27448412315AC7849535")
    assert _fast.full_mac(2, key, b"This is the test message for mac") == tag
    assert _fast.mac(2, key, b"This is the test message for mac") == tag[:4]


# --------------------------------------------------------------------------
# Batches


def mixed_store() -> MemoryKeyStore:
    return MemoryKeyStore(
        [
            # AES diversification takes kv in, so the AES vector needs kv 1
            BY_SUITE[Suite.AES].version("3104", 1),
            BY_SUITE[Suite.SM4].version("3104", 2),
            BY_SUITE[Suite.PBOC_3DES].version("3104", 3),
            BY_SUITE[Suite.AES].version("1000", 1),
        ]
    )


def flip(b: bytes, bit: int = 0) -> bytes:
    out = bytearray(b)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def test_mixed_batch_keeps_input_order() -> None:
    store = mixed_store()
    pboc, sm4, aes = (BY_SUITE[s] for s in Suite)
    batch = [
        purchase_check(aes, kv=1),
        purchase_check(pboc, kv=9),  # unknown kv
        purchase_check(pboc, kv=3),
        purchase_check(sm4, kv=2, tac=flip(h(sm4.tac), 5)),
        purchase_check(aes, issuer="9999", kv=3),  # unknown issuer
        purchase_check(sm4, kv=2),
        purchase_check(aes, kv=1, amount=201),  # field changed
        purchase_check(pboc, kv=2),  # sm4 key version, pboc TAC
        purchase_check(aes, issuer="1000", kv=1),
        purchase_check(pboc, kv=3, tac=flip(h(pboc.tac), 31)),
    ]
    expected = [
        MAC_OK,
        KEY_UNKNOWN,
        MAC_OK,
        MAC_BAD,
        KEY_UNKNOWN,
        MAC_OK,
        MAC_BAD,
        MAC_BAD,
        MAC_OK,
        MAC_BAD,
    ]
    fv = FastVerifier(store)
    assert fv.verify_purchases(batch) == expected
    assert fv.verify_purchases(tuple(batch)) == expected  # any sequence
    assert fv.verify_purchases(batch[::-1]) == expected[::-1]
    assert ReferenceVerifier(store).verify_purchases(batch) == expected
    assert fv.verify_purchases([]) == []


def test_mixed_load_batch_keeps_input_order() -> None:
    store = mixed_store()
    pboc, sm4, aes = (BY_SUITE[s] for s in Suite)
    batch = [
        load_check(sm4, kv=2),
        load_check(aes, kv=7),
        load_check(pboc, kv=3, mac1=flip(h(pboc.mac1))),
        load_check(aes, kv=1),
        load_check(pboc, kv=3),
        load_check(sm4, kv=2, online_counter=8),
        load_check(aes, kv=1, mac1=h(aes.mac1)[:4]),  # wrong length
        load_check(sm4, kv=2, random=b"\xa1\xb2\xc3"),  # wrong-length random
    ]
    expected = [
        (MAC_OK, h(sm4.mac2)),
        (KEY_UNKNOWN, b""),
        (MAC_BAD, b""),
        (MAC_OK, h(aes.mac2)),
        (MAC_OK, h(pboc.mac2)),
        (MAC_BAD, b""),
        (MAC_BAD, b""),
        (MAC_BAD, b""),
    ]
    assert FastVerifier(store).verify_loads(batch) == expected
    assert ReferenceVerifier(store).verify_loads(batch) == expected


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_wrong_length_mac_is_bad(v: Vector) -> None:
    good_tac, good_mac1 = h(v.tac), h(v.mac1)
    fv = FastVerifier(MemoryKeyStore([v.version()]))
    for length in [0, 1, 3, 4, 5, 7, 8, 9, 16, 100]:
        if length == len(good_tac):
            continue
        wrong_tac = (good_tac * 20)[:length]  # a prefix or an extension of the right MAC
        wrong_mac1 = (good_mac1 * 20)[:length]
        assert fv.verify_purchases([purchase_check(v, tac=wrong_tac)]) == [MAC_BAD], length
        assert fv.verify_loads([load_check(v, mac1=wrong_mac1)]) == [(MAC_BAD, b"")], length
    # a bytearray or memoryview of the right bytes is still accepted
    assert fv.verify_purchases([purchase_check(v, tac=bytearray(good_tac))]) == [MAC_OK]
    assert fv.verify_purchases([purchase_check(v, tac=memoryview(good_tac))]) == [MAC_OK]
    assert fv.verify_loads([load_check(v, mac1=bytearray(good_mac1))]) == [(MAC_OK, h(v.mac2))]


def test_reload_invalidates_derived_keys() -> None:
    v = BY_SUITE[Suite.SM4]
    store = MemoryKeyStore([v.version()])
    fv = FastVerifier(store)
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]
    assert fv.verify_loads([load_check(v)]) == [(MAC_OK, h(v.mac2))]
    assert fv.cache_stats()[0] == 2

    # Same issuer and kv, different master keys: the old card keys must go.
    other = KeyVersion(
        "3104", KV, Suite.SM4, MasterKey(os.urandom(16), "MTK"), MasterKey(os.urandom(16), "MLK")
    )
    store.replace([other])
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_BAD]
    assert fv.verify_loads([load_check(v)]) == [(MAC_BAD, b"")]
    new_key = _fast.derive_card_key(2, other.mtk.reveal(), CARD, KV, 1)
    new_tac = _fast.purchase_tac(2, new_key, **PURCHASE)
    assert fv.verify_purchases([purchase_check(v, tac=new_tac)]) == [MAC_OK]

    # and back: a reload with the original keys works again at once
    store.replace([v.version()])
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]

    # a generation bump alone (same KeyVersion objects) drops every derived key
    fv.verify_loads([load_check(v)])
    entries, _, misses = fv.cache_stats()
    assert entries == 2
    store.replace(list(store.versions()))
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]
    entries, _, misses_after = fv.cache_stats()
    assert (entries, misses_after) == (1, misses + 1)

    # a reload that drops the key version
    store.replace([])
    assert fv.verify_purchases([purchase_check(v)]) == [KEY_UNKNOWN]
    assert fv.verify_loads([load_check(v)]) == [(KEY_UNKNOWN, b"")]


def test_reload_with_same_keys_and_suite_change() -> None:
    pboc, aes = BY_SUITE[Suite.PBOC_3DES], BY_SUITE[Suite.AES]
    store = MemoryKeyStore([pboc.version()])
    fv = FastVerifier(store)
    assert fv.verify_purchases([purchase_check(pboc), purchase_check(aes)]) == [MAC_OK, MAC_BAD]
    store.replace([aes.version()])  # same (issuer, kv), now an AES key version
    assert fv.verify_purchases([purchase_check(pboc), purchase_check(aes)]) == [MAC_BAD, MAC_OK]


class SilentStore:
    """A store that swaps keys without bumping ``generation`` (a contract breach)."""

    def __init__(self, version: KeyVersion) -> None:
        self.version: KeyVersion | None = version
        self.generation = 1
        self.gets = 0

    def get(self, issuer: str, kv: int) -> KeyVersion | None:
        self.gets += 1
        v = self.version
        return v if v is not None and (v.issuer, v.kv) == (issuer, kv) else None

    def versions(self) -> Iterable[KeyVersion]:
        return [self.version] if self.version else []


def test_key_changes_without_generation_bump_are_noticed() -> None:
    v = BY_SUITE[Suite.AES]
    store = SilentStore(v.version())
    fv = FastVerifier(store)
    assert fv.verify_purchases([purchase_check(v)] * 5) == [MAC_OK] * 5
    assert store.gets == 1  # once per distinct key version per batch
    store.version = BY_SUITE[Suite.SM4].version()
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_BAD]
    assert fv.verify_purchases([purchase_check(BY_SUITE[Suite.SM4])]) == [MAC_OK]
    store.version = None
    assert fv.verify_purchases([purchase_check(v)]) == [KEY_UNKNOWN]


def test_clear_cache_and_lru_bound() -> None:
    v = BY_SUITE[Suite.PBOC_3DES]
    version = v.version()
    cards = [f"31041234{i:08d}" for i in range(10)]
    batch = []
    for c in cards:
        key = _fast.derive_card_key(1, version.mtk.reveal(), c, KV, 1)
        batch.append(purchase_check(v, card_no=c, tac=_fast.purchase_tac(1, key, **PURCHASE)))
    for size in (0, 1, 3, 10, 1000):
        fv = FastVerifier(MemoryKeyStore([version]), cache_size=size)
        for _ in range(3):
            assert fv.verify_purchases(batch + batch[::-1]) == [MAC_OK] * 20
            entries, _hits, misses = fv.cache_stats()
            assert entries == min(size, 10)
        if size >= 10:
            assert misses == 10
        fv.clear_cache()
        assert fv.cache_stats() == (0, 0, 0)
        assert fv.verify_purchases(batch) == [MAC_OK] * 10
    with pytest.raises(ValueError):
        FastVerifier(MemoryKeyStore([version]), cache_size=-1)


def test_lru_keeps_the_recently_used() -> None:
    v = BY_SUITE[Suite.SM4]
    fv = FastVerifier(MemoryKeyStore([v.version()]), cache_size=2)
    a, b, c = (purchase_check(v, card_no=f"310400000000000{i}") for i in range(3))
    fv.verify_purchases([a, b, a, c])  # c evicts b, the least recently used
    misses = fv.cache_stats()[2]
    fv.verify_purchases([a, c])
    assert fv.cache_stats()[2] == misses
    fv.verify_purchases([b])
    assert fv.cache_stats()[2] == misses + 1


def test_malformed_fields_raise() -> None:
    v = BY_SUITE[Suite.AES]
    fv = FastVerifier(MemoryKeyStore([v.version()]))
    for field, value in (
        ("card_no", "31041234567890"),
        ("card_no", "310412345678901X"),
        ("terminal_id", "3104000000０1"),
        ("date_time", "2026112208301"),
    ):
        over: dict[str, Any] = {field: value}
        with pytest.raises(FieldError) as info:
            fv.verify_purchases([purchase_check(v, **over)])
        assert info.value.field == field
    with pytest.raises(OverflowError):
        fv.verify_purchases([purchase_check(v, amount=-1)])
    with pytest.raises(OverflowError):
        fv.verify_purchases([purchase_check(v, amount=1 << 32)])
    with pytest.raises(TypeError):
        fv.verify_purchases([purchase_check(v, tac="B38D6FA2")])
    # the verifier is still usable afterwards
    assert fv.verify_purchases([purchase_check(v)]) == [MAC_OK]


def test_batch_runs_without_the_gil() -> None:
    """Another thread keeps executing Python while a batch is being verified."""
    v = BY_SUITE[Suite.PBOC_3DES]
    version = v.version()
    key = _fast.derive_card_key(1, version.mtk.reveal(), CARD, KV, 1)
    batch = [
        purchase_check(
            v, terminal_seq=i, tac=_fast.purchase_tac(1, key, **{**PURCHASE, "terminal_seq": i})
        )
        for i in range(20_000)
    ]
    fv = FastVerifier(MemoryKeyStore([version]))
    fv.verify_purchases(batch[:10])
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.01)
        best = 0
        for _ in range(3):
            before = counter[0]
            result = fv.verify_purchases(batch)
            best = max(best, counter[0] - before)
            assert result == [MAC_OK] * len(batch)
    finally:
        stop.set()
        t.join()
    # With the GIL held for the whole C call the other thread would be frozen (~0).
    assert best > 1000


def test_one_verifier_shared_by_threads() -> None:
    store = mixed_store()
    pboc, sm4, aes = (BY_SUITE[s] for s in Suite)
    batch = [purchase_check(pboc, kv=3), purchase_check(sm4, kv=2), purchase_check(aes, kv=1)]
    loads = [load_check(pboc, kv=3), load_check(sm4, kv=2), load_check(aes, kv=1)]
    fv = FastVerifier(store, cache_size=2)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                assert fv.verify_purchases(batch * 10) == [MAC_OK] * 30
                assert [c for c, _ in fv.verify_loads(loads)] == [MAC_OK] * 3
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        fv.clear_cache()
        store.replace(list(store.versions()))
    for t in threads:
        t.join()
    assert errors == []


def test_verifier_contract() -> None:
    fv = FastVerifier(MemoryKeyStore())
    assert fv.name == "cython-openssl"
    assert fv.cache_size == 100_000
    checker: CardVerifier = fv
    assert checker.verify_loads([]) == []


# --------------------------------------------------------------------------
# Property tests: FastVerifier answers exactly what the twin answers.

digits = st.text(alphabet="0123456789", min_size=1, max_size=1)
card_numbers = st.text(alphabet="0123456789", min_size=16, max_size=16)
terminal_ids = st.text(alphabet="0123456789", min_size=12, max_size=12)
u32 = st.integers(0, 0xFFFFFFFF)
date_times = st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31, 23, 59, 58)).map(
    lambda d: d.strftime("%Y%m%d%H%M%S")
)
master_keys = st.binary(min_size=16, max_size=16)
suites = st.sampled_from(list(Suite))


@st.composite
def key_stores(draw: st.DrawFn) -> MemoryKeyStore:
    """Two issuers, a few key versions of random suites and random master keys."""
    versions = []
    for issuer in ("3104", "1000"):
        for kv in draw(st.sets(st.integers(0, 255), min_size=1, max_size=3)):
            versions.append(
                KeyVersion(
                    issuer,
                    kv,
                    draw(suites),
                    MasterKey(draw(master_keys), "MTK"),
                    MasterKey(draw(master_keys), "MLK"),
                )
            )
    return MemoryKeyStore(versions)


def _changed_digits(value: str, data: st.DataObject) -> str:
    i = data.draw(st.integers(0, len(value) - 1))
    new = data.draw(digits.filter(lambda d: d != value[i]))
    return value[:i] + new + value[i + 1 :]


def _later(value: str, data: st.DataObject) -> str:
    moment = dt.datetime.strptime(value, "%Y%m%d%H%M%S")
    delta = dt.timedelta(seconds=data.draw(st.sampled_from([-1, 1, 60, 86400, -3600])))
    return (moment + delta).strftime("%Y%m%d%H%M%S")


def _tamper_purchase(r: PurchaseCheck, data: st.DataObject) -> PurchaseCheck:
    field = data.draw(
        st.sampled_from(
            [
                "tac",
                "issuer",
                "kv",
                "card_no",
                "amount",
                "txn_type",
                "terminal_id",
                "terminal_seq",
                "date_time",
                "tac_length",
            ]
        )
    )
    if field == "tac":
        return r._replace(tac=flip(r.tac, data.draw(st.integers(0, 8 * len(r.tac) - 1))))
    if field == "tac_length":
        return r._replace(
            tac=data.draw(st.binary(max_size=12).filter(lambda b: len(b) != len(r.tac)))
        )
    if field == "issuer":
        return r._replace(issuer=data.draw(st.sampled_from(["3104", "1000", "9999"])))
    if field == "kv":
        return r._replace(kv=data.draw(st.integers(0, 255)))
    if field in ("card_no", "terminal_id"):
        changed: dict[str, Any] = {field: _changed_digits(getattr(r, field), data)}
        return r._replace(**changed)
    if field == "date_time":
        return r._replace(date_time=_later(r.date_time, data))
    if field == "txn_type":
        return r._replace(txn_type=r.txn_type ^ (1 << data.draw(st.integers(0, 7))))
    return r._replace(**{field: getattr(r, field) ^ (1 << data.draw(st.integers(0, 31)))})


def _tamper_load(r: LoadCheck, data: st.DataObject) -> LoadCheck:
    field = data.draw(
        st.sampled_from(
            [
                "mac1",
                "issuer",
                "kv",
                "card_no",
                "random",
                "online_counter",
                "old_balance",
                "amount",
                "txn_type",
                "terminal_id",
                "date_time",
                "mac1_length",
            ]
        )
    )
    if field == "mac1":
        return r._replace(mac1=flip(r.mac1, data.draw(st.integers(0, 8 * len(r.mac1) - 1))))
    if field == "mac1_length":
        return r._replace(
            mac1=data.draw(st.binary(max_size=12).filter(lambda b: len(b) != len(r.mac1)))
        )
    if field == "random":
        return r._replace(random=flip(r.random, data.draw(st.integers(0, 31))))
    if field == "issuer":
        return r._replace(issuer=data.draw(st.sampled_from(["3104", "1000", "9999"])))
    if field == "kv":
        return r._replace(kv=data.draw(st.integers(0, 255)))
    if field in ("card_no", "terminal_id"):
        changed: dict[str, Any] = {field: _changed_digits(getattr(r, field), data)}
        return r._replace(**changed)
    if field == "date_time":  # not in MAC1: MAC2 changes, MAC1 still verifies
        return r._replace(date_time=_later(r.date_time, data))
    if field == "txn_type":
        return r._replace(txn_type=r.txn_type ^ (1 << data.draw(st.integers(0, 7))))
    if field == "online_counter":
        return r._replace(online_counter=r.online_counter ^ (1 << data.draw(st.integers(0, 15))))
    return r._replace(**{field: getattr(r, field) ^ (1 << data.draw(st.integers(0, 31)))})


def _pick_version(store: MemoryKeyStore, data: st.DataObject) -> KeyVersion:
    return data.draw(st.sampled_from(sorted(store.versions(), key=lambda v: (v.issuer, v.kv))))


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(store=key_stores(), data=st.data(), cache_size=st.sampled_from([0, 1, 4, 100_000]))
def test_purchases_agree_with_the_twin(
    store: MemoryKeyStore, data: st.DataObject, cache_size: int
) -> None:
    batch = []
    for _ in range(data.draw(st.integers(1, 12))):
        version = _pick_version(store, data)
        card = data.draw(card_numbers)
        fields: dict[str, Any] = {
            "amount": data.draw(u32),
            "txn_type": data.draw(st.sampled_from([0x06, 0x09])),
            "terminal_id": data.draw(terminal_ids),
            "terminal_seq": data.draw(u32),
            "date_time": data.draw(date_times),
        }
        key = reference.derive_card_key(
            version.suite, version.mtk.reveal(), card, version.kv, reference.PURPOSE_TAC
        )
        tac = reference.purchase_tac(version.suite, key, **fields)
        rec = PurchaseCheck(version.issuer, version.kv, card, tac=tac, **fields)
        batch.append(rec)
        for _ in range(data.draw(st.integers(0, 2))):
            batch.append(_tamper_purchase(rec, data))
    batch = data.draw(st.permutations(batch))
    fast_v = FastVerifier(store, cache_size=cache_size)
    ref_v = ReferenceVerifier(store, cache_size=cache_size)
    expected = ref_v.verify_purchases(batch)
    assert fast_v.verify_purchases(batch) == expected
    assert fast_v.verify_purchases(batch) == expected  # warm
    assert expected.count(MAC_OK) >= 1


@PROPERTY
@given(store=key_stores(), data=st.data(), cache_size=st.sampled_from([0, 1, 4, 100_000]))
def test_loads_agree_with_the_twin(
    store: MemoryKeyStore, data: st.DataObject, cache_size: int
) -> None:
    batch = []
    for _ in range(data.draw(st.integers(1, 10))):
        version = _pick_version(store, data)
        card = data.draw(card_numbers)
        rnd = data.draw(st.binary(min_size=4, max_size=4))
        counter = data.draw(st.integers(0, 0xFFFF))
        old_balance, amount = data.draw(u32), data.draw(u32)
        terminal = data.draw(terminal_ids)
        key = reference.derive_card_key(
            version.suite, version.mlk.reveal(), card, version.kv, reference.PURPOSE_LOAD
        )
        seslk = reference.load_session_key(version.suite, key, rnd, counter)
        mac1 = reference.load_mac1(version.suite, seslk, old_balance, amount, 0x02, terminal)
        rec = LoadCheck(
            version.issuer,
            version.kv,
            card,
            rnd,
            counter,
            old_balance,
            amount,
            0x02,
            terminal,
            data.draw(date_times),
            mac1,
        )
        batch.append(rec)
        for _ in range(data.draw(st.integers(0, 2))):
            batch.append(_tamper_load(rec, data))
    batch = data.draw(st.permutations(batch))
    fast_v = FastVerifier(store, cache_size=cache_size)
    ref_v = ReferenceVerifier(store, cache_size=cache_size)
    expected = ref_v.verify_loads(batch)
    got = fast_v.verify_loads(batch)
    assert got == expected
    assert fast_v.verify_loads(batch) == expected
    assert any(code == MAC_OK and len(mac2) in (4, 8) for code, mac2 in got)


@PROPERTY
@given(
    suite=suites,
    master=master_keys,
    card=card_numbers,
    kv=st.integers(0, 255),
    purpose=st.sampled_from([1, 2]),
    key=master_keys,
    data=st.binary(max_size=80),
    rnd=st.binary(min_size=4, max_size=4),
    counter=st.integers(0, 0xFFFF),
)
def test_per_call_functions_agree_with_the_twin(
    suite: Suite,
    master: bytes,
    card: str,
    kv: int,
    purpose: int,
    key: bytes,
    data: bytes,
    rnd: bytes,
    counter: int,
) -> None:
    assert _fast.derive_card_key(suite, master, card, kv, purpose) == reference.derive_card_key(
        suite, master, card, kv, purpose
    )
    assert _fast.mac(suite, key, data) == reference.mac(suite, key, data)
    seslk = _fast.load_session_key(suite, key, rnd, counter)
    assert seslk == reference.load_session_key(suite, key, rnd, counter)
    assert _fast.mac(suite, seslk, data) == reference.mac(suite, seslk, data)


@pytest.mark.parametrize("cache_size", [0, 1, 100_000])
def test_large_batch_grouped_by_card_answers_in_input_order(cache_size: int) -> None:
    """Batches are verified card by card inside the extension; answers must stay in order.

    Many records per card, the same card number under several key versions,
    tampered and unknown-key records interleaved, more records than one radix
    digit holds: every answer must equal the twin's at its own index.
    """
    import random

    store = mixed_store()
    versions = [v for v in store.versions() if v.issuer == "3104"]
    rng = random.Random(7)
    cards = [f"3104{rng.randrange(10**12):012d}" for _ in range(40)]
    batch: list[PurchaseCheck] = []
    for i in range(5_000):
        version = rng.choice(versions)
        card = rng.choice(cards)
        key = reference.derive_card_key(
            version.suite, version.mtk.reveal(), card, version.kv, reference.PURPOSE_TAC
        )
        fields: dict[str, Any] = {
            "amount": rng.randrange(1, 5_000),
            "txn_type": 0x06,
            "terminal_id": "310400000001",
            "terminal_seq": i,
            "date_time": "20261123080000",
        }
        tac = reference.purchase_tac(version.suite, key, **fields)
        kv = version.kv
        roll = rng.random()
        if roll < 0.1:
            tac = flip(tac, rng.randrange(len(tac) * 8))
        elif roll < 0.12:
            kv = 9  # unknown key version
        batch.append(PurchaseCheck("3104", kv, card, tac=tac, **fields))
    expected = ReferenceVerifier(store).verify_purchases(batch)
    assert {MAC_OK, MAC_BAD, KEY_UNKNOWN} <= set(expected)
    fast_v = FastVerifier(store, cache_size=cache_size)
    assert fast_v.verify_purchases(batch) == expected
    assert fast_v.verify_purchases(batch[::-1]) == expected[::-1]


@pytest.mark.parametrize("when", ["20261131083000", "20260229120000", "20261203246000"])
def test_the_per_call_helpers_refuse_a_date_that_never_was_as_the_twin_does(when: str) -> None:
    """The extension signed 30 February and 24:60 where the reference refused them (found by
    review); a simulator would have sent what the server then refused."""
    from onecard.ledger.crypto import reference

    v = BY_SUITE[Suite.AES]
    key = _fast.derive_card_key(3, v.version().mtk.reveal(), CARD, KV, 1)
    signers: tuple[Callable[[], bytes], ...] = (
        lambda: _fast.purchase_tac(3, key, 100, 6, "310400000001", 1, when),
        lambda: reference.purchase_tac(Suite.AES, key, 100, 6, "310400000001", 1, when),
        lambda: _fast.load_mac2(3, key, 100, 2, "310400000009", when),
        lambda: reference.load_mac2(Suite.AES, key, 100, 2, "310400000009", when),
    )
    for sign in signers:
        with pytest.raises(FieldError) as info:
            sign()
        assert info.value.field == "date_time"


@pytest.mark.parametrize(
    "when",
    [
        "20261131083000",  # 31 November
        "20260229120000",  # 29 February of a common year
        "21000229120000",  # 1900/2100 rule: not a leap year
        "00000101000000",  # year 0
        "20261300000000",  # month 13
        "20261100000000",  # day 0
        "20261203246000",  # 24:60
        "20261122240000",  # hour 24
        "20261122083060",  # second 60
    ],
)
@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_the_batch_path_refuses_a_date_that_never_was_as_the_twin_does(
    v: Vector, when: str
) -> None:
    """The batch path checked only that the date was 14 digits: a record signed over
    30 February verified MAC_OK, and a load over it was answered a MAC2, where the twin
    raises FieldError("date_time") (found by a differential fuzz)."""
    version = v.version()
    store = MemoryKeyStore([version])
    tac_key = _fast.derive_card_key(v.suite, version.mtk.reveal(), CARD, KV, 1)
    tac_input = reference.purchase_tac_input(**{**PURCHASE, "date_time": "20261122083015"})
    tac = _fast.mac(v.suite, tac_key, tac_input[:15] + bytes.fromhex(when))  # the card signed it
    purchase = purchase_check(v, date_time=when, tac=tac)
    load = load_check(v, date_time=when)  # MAC1 does not cover the date: it verifies
    for verifier in (ReferenceVerifier(store), FastVerifier(store), FastVerifier(store, 0)):
        with pytest.raises(FieldError) as info:
            verifier.verify_purchases([purchase_check(v), purchase])
        assert info.value.field == "date_time"
        with pytest.raises(FieldError) as info:
            verifier.verify_loads([load_check(v), load])
        assert info.value.field == "date_time"


@pytest.mark.parametrize(
    "when", ["20240229120000", "20000229235959", "00010101000000", "99991231235959"]
)
def test_the_batch_path_takes_every_real_date(when: str) -> None:
    v = BY_SUITE[Suite.SM4]
    version = v.version()
    store = MemoryKeyStore([version])
    tac_key = _fast.derive_card_key(v.suite, version.mtk.reveal(), CARD, KV, 1)
    tac = _fast.purchase_tac(v.suite, tac_key, **{**PURCHASE, "date_time": when})
    seslk = h(v.seslk)
    mac2 = _fast.load_mac2(
        v.suite, seslk, LOAD["amount"], LOAD["txn_type"], LOAD["terminal_id"], when
    )
    for verifier in (ReferenceVerifier(store), FastVerifier(store)):
        assert verifier.verify_purchases([purchase_check(v, date_time=when, tac=tac)]) == [MAC_OK]
        assert verifier.verify_loads([load_check(v, date_time=when)]) == [(MAC_OK, mac2)]


@pytest.mark.parametrize("value", [200.9, 200.0, Decimal("200.5"), Fraction(401, 2)])
def test_an_integer_field_that_is_no_integer_is_refused_as_the_twin_does(value: Any) -> None:
    """Amounts, sequence numbers, counters and types went through C conversion, which
    truncates anything with ``__int__``: a purchase of 200.9 fen verified MAC_OK as one of
    200, a load was answered a MAC2, and the helpers signed 200 (found by a differential
    fuzz); the twin refuses each (its encoders take only int)."""
    v = BY_SUITE[Suite.AES]
    store = MemoryKeyStore([v.version()])
    purchases = [purchase_check(v, **{f: value}) for f in ("amount", "terminal_seq", "txn_type")]
    loads = [
        load_check(v, **{f: value}) for f in ("amount", "old_balance", "online_counter", "txn_type")
    ]
    for verifier in (ReferenceVerifier(store), FastVerifier(store)):
        for p in purchases:
            with pytest.raises((TypeError, AttributeError)):
                verifier.verify_purchases([purchase_check(v), p])
        for ld in loads:
            with pytest.raises((TypeError, AttributeError)):
                verifier.verify_loads([load_check(v), ld])
    key, seslk = h(v.card_tac_key), h(v.seslk)
    helpers: tuple[Callable[[], bytes], ...] = (
        lambda: _fast.purchase_tac(3, key, value, 6, "310400000001", 42, "20261122083015"),
        lambda: _fast.purchase_tac(3, key, 200, value, "310400000001", 42, "20261122083015"),
        lambda: _fast.purchase_tac(3, key, 200, 6, "310400000001", value, "20261122083015"),
        lambda: _fast.load_session_key(3, key, h("A1B2C3D4"), value),
        lambda: _fast.load_mac1(3, seslk, value, 5000, 2, "310400000009"),
        lambda: _fast.load_mac1(3, seslk, 1500, value, 2, "310400000009"),
        lambda: _fast.load_mac1(3, seslk, 1500, 5000, value, "310400000009"),
        lambda: _fast.load_mac2(3, seslk, value, 2, "310400000009", "20261122090000"),
        lambda: _fast.load_mac2(3, seslk, 5000, value, "310400000009", "20261122090000"),
    )
    for sign in helpers:
        with pytest.raises(TypeError):
            sign()

    # an int subclass is still an int, as for the twin
    class Fen(int):
        pass

    assert FastVerifier(store).verify_purchases([purchase_check(v, amount=Fen(200))]) == [MAC_OK]
