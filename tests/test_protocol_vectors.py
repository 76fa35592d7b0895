"""Every test vector in shared/PROTOCOL.md, reproduced by the pure-Python twin.

The vectors are normative: if one of these fails, the bug is in the code.
"""

from __future__ import annotations

import pytest

from onecard.ledger.crypto import primitives as p
from onecard.ledger.crypto import reference as ref
from onecard.ledger.crypto.encoding import FieldError
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
from onecard.ledger.keys import KeyVersion, MemoryKeyStore
from tests.vectors import (
    CARD,
    ISSUER,
    KV,
    L_AMOUNT,
    L_COUNTER,
    L_OLD_BALANCE,
    L_RANDOM,
    L_TERMINAL,
    L_TIME,
    L_TYPE,
    P_AMOUNT,
    P_SEQ,
    P_TAC_INPUT,
    P_TERMINAL,
    P_TIME,
    P_TYPE,
    RFC4493_KEY,
    VECTORS,
    Vector,
    h,
)

by_suite = pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.suite.label)


# --------------------------------------------------------------------------- suite vectors


def test_purchase_tac_input() -> None:
    data = ref.purchase_tac_input(P_AMOUNT, P_TYPE, P_TERMINAL, P_SEQ, P_TIME)
    assert data == h(P_TAC_INPUT)
    assert len(data) == 22


@by_suite
def test_card_tac_key(v: Vector) -> None:
    key = ref.derive_card_key(v.suite, h(v.mtk), CARD, KV, ref.PURPOSE_TAC)
    assert key == h(v.card_tac_key)


@by_suite
def test_card_load_key(v: Vector) -> None:
    key = ref.derive_card_key(v.suite, h(v.mlk), CARD, KV, ref.PURPOSE_LOAD)
    assert key == h(v.card_load_key)


@by_suite
def test_tac(v: Vector) -> None:
    tac = ref.purchase_tac(v.suite, h(v.card_tac_key), P_AMOUNT, P_TYPE, P_TERMINAL, P_SEQ, P_TIME)
    assert tac == h(v.tac)
    assert len(tac) == v.suite.mac_length


@by_suite
def test_seslk(v: Vector) -> None:
    seslk = ref.load_session_key(v.suite, h(v.card_load_key), L_RANDOM, L_COUNTER)
    assert seslk == h(v.seslk)
    assert len(seslk) == (8 if v.suite is Suite.PBOC_3DES else 16)


@by_suite
def test_mac1(v: Vector) -> None:
    mac1 = ref.load_mac1(v.suite, h(v.seslk), L_OLD_BALANCE, L_AMOUNT, L_TYPE, L_TERMINAL)
    assert mac1 == h(v.mac1)


@by_suite
def test_mac2(v: Vector) -> None:
    mac2 = ref.load_mac2(v.suite, h(v.seslk), L_AMOUNT, L_TYPE, L_TERMINAL, L_TIME)
    assert mac2 == h(v.mac2)


@by_suite
def test_chain_from_master_keys(v: Vector) -> None:
    """Master keys all the way to TAC, MAC1 and MAC2 without using intermediate vectors."""
    tac_key = ref.derive_card_key(v.suite, h(v.mtk), CARD, KV, ref.PURPOSE_TAC)
    load_key = ref.derive_card_key(v.suite, h(v.mlk), CARD, KV, ref.PURPOSE_LOAD)
    assert ref.purchase_tac(v.suite, tac_key, P_AMOUNT, P_TYPE, P_TERMINAL, P_SEQ, P_TIME) == h(
        v.tac
    )
    seslk = ref.load_session_key(v.suite, load_key, L_RANDOM, L_COUNTER)
    assert ref.load_mac1(v.suite, seslk, L_OLD_BALANCE, L_AMOUNT, L_TYPE, L_TERMINAL) == h(v.mac1)
    assert ref.load_mac2(v.suite, seslk, L_AMOUNT, L_TYPE, L_TERMINAL, L_TIME) == h(v.mac2)


# --------------------------------------------------------------------------- published vectors

PBOC_PURCHASE_KEY = h("11223344556677888877665544332211")
PBOC_SESSION_KEY = h("003238ABC57659DD")


def test_pboc_published_session_key() -> None:
    assert p.tdes_ecb_encrypt(PBOC_PURCHASE_KEY, h("1122334400000001")) == PBOC_SESSION_KEY


def test_pboc_published_mac_full_record() -> None:
    data = h("000010000600112233445520120229135100")
    assert ref.mac(Suite.PBOC_3DES, PBOC_SESSION_KEY, data) == h("F15CAB75")


def test_pboc_published_mac_amount_only() -> None:
    assert ref.mac(Suite.PBOC_3DES, PBOC_SESSION_KEY, h("00001000")) == h("56988A13")


def test_pboc_published_tac() -> None:
    tac_key = h("00112233445566778899AABBCCDDEEFF")
    data = h("00001000060011223344550000000120120229135100")
    assert ref.mac(Suite.PBOC_3DES, tac_key, data) == h("B3A0D49C")
    # The same TAC through the protocol function (terminal id is BCD, so it fits).
    assert ref.purchase_tac(
        Suite.PBOC_3DES, tac_key, 0x1000, 0x06, "001122334455", 1, "20120229135100"
    ) == h("B3A0D49C")


RFC4493_MSG = h(
    "6BC1BEE22E409F96E93D7E117393172A"
    "AE2D8A571E03AC9C9EB76FAC45AF8E51"
    "30C81C46A35CE411E5FBC1191A0A52EF"
    "F69F2445DF4F9B17AD2B417BE66C3710"
)


@pytest.mark.parametrize(
    ("length", "tag"),
    [
        (0, "BB1D6929E95937287FA37D129B756746"),
        (16, "070A16B46B4D4144F79BDD9DD04A287C"),
        (40, "DFA66747DE9AE63030CA32611497C827"),
        (64, "51F0BEBF7E3B9D92FC49741779363CFE"),
    ],
)
def test_rfc4493_aes_cmac(length: int, tag: str) -> None:
    assert p.aes_cmac(RFC4493_KEY, RFC4493_MSG[:length]) == h(tag)


def test_rfc4493_aes_cmac_truncated_by_mac() -> None:
    assert ref.mac(Suite.AES, RFC4493_KEY, RFC4493_MSG[:16]) == h("070A16B46B4D4144")


def test_nxp_an10922_diversification() -> None:
    key = h("00112233445566778899AABBCCDDEEFF")
    div_input = h("0104782E21801D803042F54E585020416275")
    assert p.aes_cmac(key, div_input) == h("A8DD63A3B89D54B37CA802473FDA9175")


def test_sm4_single_block() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    assert p.sm4_encrypt_block(key, key) == h("681EDF34D206965E86B3E94F536E4246")


def test_sm4_cbc_mac_pad80() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    message = b"This is the test message for mac"
    tag = p.cbc_mac(lambda b: p.sm4_encrypt_block(key, b), message, 16)
    assert tag == h("4B6553AF3C4E27448412315AC7849535")
    assert ref.mac(Suite.SM4, key, message) == h("4B6553AF")


# --------------------------------------------------------------------------- primitive sanity


def test_des_fips_classic() -> None:
    assert p.des_encrypt_block(h("133457799BBCDFF1"), h("0123456789ABCDEF")) == h(
        "85E813540F0AB405"
    )


def test_aes_fips197_appendix_c1() -> None:
    key = h("000102030405060708090A0B0C0D0E0F")
    assert p.aes128_encrypt_block(key, h("00112233445566778899AABBCCDDEEFF")) == h(
        "69C4E0D86A7B0430D8CDB78070B4C55A"
    )


def test_two_key_3des_with_equal_halves_is_single_des() -> None:
    k = h("133457799BBCDFF1")
    assert p.tdes_encrypt_block(k + k, h("0123456789ABCDEF")) == h("85E813540F0AB405")


@pytest.mark.parametrize(
    ("data", "block", "expected"),
    [
        (b"", 8, "8000000000000000"),
        (b"\x01" * 7, 8, "0101010101010180"),
        (b"\x01" * 8, 8, "01010101010101018000000000000000"),
        (b"\x01" * 3, 16, "01010180" + "00" * 12),
    ],
)
def test_pad80(data: bytes, block: int, expected: str) -> None:
    assert p.pad80(data, block) == h(expected)


def test_constant_time_equal() -> None:
    assert ref.constant_time_equal(b"abcd", b"abcd")
    assert not ref.constant_time_equal(b"abcd", b"abce")
    assert not ref.constant_time_equal(b"abcd", b"abc")


def test_bad_field_is_refused_by_name() -> None:
    with pytest.raises(FieldError) as info:
        ref.purchase_tac_input(P_AMOUNT, P_TYPE, "31040000000X", P_SEQ, P_TIME)
    assert info.value.field == "terminal_id"
    with pytest.raises(FieldError):
        ref.purchase_tac_input(P_AMOUNT, P_TYPE, P_TERMINAL, P_SEQ, "20261131083015")
    with pytest.raises(FieldError):
        ref.purchase_tac_input(-1, P_TYPE, P_TERMINAL, P_SEQ, P_TIME)


# --------------------------------------------------------------------------- ReferenceVerifier


def _version(v: Vector, kv: int = KV, issuer: str = ISSUER) -> KeyVersion:
    return v.version(issuer, kv)


def _purchase(v: Vector, tac: bytes | None = None, kv: int = KV) -> PurchaseCheck:
    return PurchaseCheck(
        ISSUER, kv, CARD, P_AMOUNT, P_TYPE, P_TERMINAL, P_SEQ, P_TIME,
        h(v.tac) if tac is None else tac,
    )  # fmt: skip


def _load(v: Vector, mac1: bytes | None = None, kv: int = KV) -> LoadCheck:
    return LoadCheck(
        ISSUER, kv, CARD, L_RANDOM, L_COUNTER, L_OLD_BALANCE, L_AMOUNT, L_TYPE, L_TERMINAL,
        L_TIME, h(v.mac1) if mac1 is None else mac1,
    )  # fmt: skip


def _flip(b: bytes, bit: int = 0) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def test_reference_verifier_satisfies_protocol() -> None:
    verifier: CardVerifier = ReferenceVerifier(MemoryKeyStore())
    assert verifier.name == "python-reference"


@by_suite
def test_verifier_purchases(v: Vector) -> None:
    verifier = ReferenceVerifier(MemoryKeyStore([_version(v)]))
    good = h(v.tac)
    checks = [
        _purchase(v),
        _purchase(v, _flip(good, 0)),
        _purchase(v, _flip(good, 8 * len(good) - 1)),
        _purchase(v, kv=KV + 1),
        _purchase(v, good[:-1]),
        _purchase(v, good + b"\x00"),
        _purchase(v, b""),
        _purchase(v)._replace(issuer="9999"),
        _purchase(v),
    ]
    assert verifier.verify_purchases(checks) == [
        MAC_OK, MAC_BAD, MAC_BAD, KEY_UNKNOWN, MAC_BAD, MAC_BAD, MAC_BAD, KEY_UNKNOWN, MAC_OK,
    ]  # fmt: skip
    assert verifier.verify_purchases([]) == []


@by_suite
def test_verifier_loads(v: Vector) -> None:
    verifier = ReferenceVerifier(MemoryKeyStore([_version(v)]))
    good = h(v.mac1)
    results = verifier.verify_loads(
        [
            _load(v),
            _load(v, _flip(good, 5)),
            _load(v, kv=KV + 1),
            _load(v, good[:-1]),
            _load(v)._replace(online_counter=L_COUNTER + 1),
        ]
    )
    assert results == [
        (MAC_OK, h(v.mac2)),
        (MAC_BAD, b""),
        (KEY_UNKNOWN, b""),
        (MAC_BAD, b""),
        (MAC_BAD, b""),
    ]
    assert verifier.verify_loads([]) == []


def test_verifier_mixed_suites_and_issuers_keep_order() -> None:
    issuers = [f"31{i:02d}" for i in range(len(VECTORS))]
    store = MemoryKeyStore([_version(v, issuer=i) for i, v in zip(issuers, VECTORS, strict=True)])
    verifier = ReferenceVerifier(store)
    checks = [_purchase(v)._replace(issuer=i) for i, v in zip(issuers, VECTORS, strict=True)]
    # A TAC presented under another issuer's key version is bad, not unknown.
    checks.append(_purchase(VECTORS[0])._replace(issuer=issuers[1]))
    checks.insert(1, _purchase(VECTORS[0])._replace(issuer="0000"))
    assert verifier.verify_purchases(checks) == [MAC_OK, KEY_UNKNOWN, MAC_OK, MAC_OK, MAC_BAD]
    # AES derivation binds kv: the same master keys under kv=2 give another card key.
    aes_kv2 = ReferenceVerifier(MemoryKeyStore([_version(VECTORS[2], kv=2)]))
    assert aes_kv2.verify_purchases([_purchase(VECTORS[2], kv=2)]) == [MAC_BAD]


def test_verifier_generation_change_drops_cache() -> None:
    v = VECTORS[0]
    store = MemoryKeyStore([_version(v)])
    verifier = ReferenceVerifier(store)
    assert verifier.verify_purchases([_purchase(v)]) == [MAC_OK]
    assert verifier.verify_loads([_load(v)]) == [(MAC_OK, h(v.mac2))]
    # Same issuer and kv, different master keys: a stale cached card key would still say OK.
    other = Vector(
        Suite.PBOC_3DES, mtk=v.mlk, mlk=v.mtk, card_tac_key="", card_load_key="",
        tac="", seslk="", mac1="", mac2="",
    )  # fmt: skip
    store.replace([_version(other)])
    assert verifier.verify_purchases([_purchase(v)]) == [MAC_BAD]
    assert verifier.verify_loads([_load(v)]) == [(MAC_BAD, b"")]
    store.replace([_version(v)])
    assert verifier.verify_purchases([_purchase(v)]) == [MAC_OK]
    store.replace([])
    assert verifier.verify_purchases([_purchase(v)]) == [KEY_UNKNOWN]


def test_verifier_cache_is_bounded_and_clearable() -> None:
    v = VECTORS[2]
    verifier = ReferenceVerifier(MemoryKeyStore([_version(v)]), cache_size=2)
    cards = ["3104000000000001", "3104000000000002", "3104000000000003", CARD]
    checks = [_purchase(v)._replace(card_no=c) for c in cards]
    assert verifier.verify_purchases(checks) == [MAC_BAD, MAC_BAD, MAC_BAD, MAC_OK]
    assert len(verifier._cache) == 2
    verifier.clear_cache()
    assert len(verifier._cache) == 0
    assert verifier.verify_purchases([_purchase(v)]) == [MAC_OK]
    uncached = ReferenceVerifier(MemoryKeyStore([_version(v)]), cache_size=0)
    assert uncached.verify_purchases([_purchase(v), _purchase(v)]) == [MAC_OK, MAC_OK]
