"""Plain-Python twin of the card security protocol (shared/PROTOCOL.md).

Written to be read next to PROTOCOL.md: each function is one line of the
spec. The OpenSSL-based fast path is tested against this module, so it
deliberately depends on nothing but ``primitives`` (pure Python) and the
shared field encoders. Field values are validated by ``encoding`` before
any key is used, so a malformed field raises ``FieldError`` naming it.
"""

from __future__ import annotations

import hmac

from onecard.ledger.crypto import primitives as _p
from onecard.ledger.crypto.encoding import (
    FieldError,
    card_number_bcd,
    datetime_bcd,
    terminal_id_bcd,
    u16,
    u32,
)
from onecard.ledger.crypto.suites import Suite

__all__ = [
    "PURPOSE_LOAD",
    "PURPOSE_TAC",
    "constant_time_equal",
    "derive_card_key",
    "load_mac1",
    "load_mac2",
    "load_session_key",
    "mac",
    "purchase_tac",
    "purchase_tac_input",
]

#: The ``purpose`` byte of AES diversification; also tells which master key is meant.
PURPOSE_TAC = 1
PURPOSE_LOAD = 2

_AES_DIV_CONSTANT = 0x01  # NXP AN10922: 0x01 marks an AES-128 key
_AES_DIV_SUFFIX = b"ONECAR"


def _suite(suite: Suite | int) -> Suite:
    return Suite(suite)


def _key16(key: bytes, what: str) -> bytes:
    if len(key) != 16:
        raise ValueError(f"{what} must be 16 bytes, got {len(key)}")
    return bytes(key)


def _invert(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def derive_card_key(suite: Suite, master: bytes, card_no: str, kv: int, purpose: int) -> bytes:
    """A card's own 16-byte key from a master key (PROTOCOL.md "Keys").

    ``kv`` and ``purpose`` enter only the AES derivation; the PBOC and SM4
    derivations depend on the master key and card number alone.
    """
    suite = _suite(suite)
    master = _key16(master, "master key")
    d = card_number_bcd(card_no)
    if suite is Suite.PBOC_3DES:
        return _p.tdes_encrypt_block(master, d) + _p.tdes_encrypt_block(master, _invert(d))
    if suite is Suite.SM4:
        return _p.sm4_encrypt_block(master, d + _invert(d))
    if purpose not in (PURPOSE_TAC, PURPOSE_LOAD):
        raise ValueError(f"purpose must be {PURPOSE_TAC} (TAC) or {PURPOSE_LOAD} (load)")
    if not 0 <= kv <= 0xFF:
        raise ValueError(f"key version must be one byte, got {kv}")
    div_input = bytes([_AES_DIV_CONSTANT]) + d + bytes([purpose, kv]) + _AES_DIV_SUFFIX
    return _p.aes_cmac(master, div_input)


def mac(suite: Suite, key: bytes, data: bytes) -> bytes:
    """The suite's MAC truncated to ``suite.mac_length`` (PROTOCOL.md "MAC functions").

    pboc-3des is *single* DES: a 16-byte card key is folded to ``K[0:8] ^ K[8:16]``
    (not a retail 3DES MAC); an 8-byte session key is used as it is.
    """
    suite = _suite(suite)
    key = bytes(key)
    if suite is Suite.PBOC_3DES:
        if len(key) == 16:
            des_key = _p.xor_bytes(key[:8], key[8:])
        elif len(key) == 8:
            des_key = key
        else:
            raise ValueError(f"pboc-3des MAC key must be 8 or 16 bytes, got {len(key)}")
        full = _p.cbc_mac(lambda b: _p.des_encrypt_block(des_key, b), data, 8)
    elif suite is Suite.SM4:
        sm4_key = _key16(key, "sm4 MAC key")
        full = _p.cbc_mac(lambda b: _p.sm4_encrypt_block(sm4_key, b), data, 16)
    else:
        full = _p.aes_cmac(_key16(key, "aes MAC key"), data)
    return full[: suite.mac_length]


def purchase_tac_input(
    amount: int, txn_type: int, terminal_id: str, terminal_seq: int, date_time: str
) -> bytes:
    """amount(4) ‖ type(1) ‖ terminal id(6) ‖ terminal seq(4) ‖ date time(7): 22 bytes."""
    return (
        u32(amount, "amount")
        + _type_byte(txn_type)
        + terminal_id_bcd(terminal_id)
        + u32(terminal_seq, "terminal_seq")
        + datetime_bcd(date_time)
    )


def purchase_tac(
    suite: Suite,
    card_tac_key: bytes,
    amount: int,
    txn_type: int,
    terminal_id: str,
    terminal_seq: int,
    date_time: str,
) -> bytes:
    """The TAC a card computes over a purchase with its card TAC key."""
    return mac(
        suite,
        card_tac_key,
        purchase_tac_input(amount, txn_type, terminal_id, terminal_seq, date_time),
    )


def load_session_key(
    suite: Suite, card_load_key: bytes, random: bytes, online_counter: int
) -> bytes:
    """SESLK: ECB of random(4) ‖ online counter(2) ‖ 0x8000 under the card load key.

    8 bytes (one 3DES block) for pboc-3des; 16 bytes for sm4/aes, whose block is
    completed with eight zero bytes.
    """
    suite = _suite(suite)
    key = _key16(card_load_key, "card load key")
    if len(random) != 4:
        raise ValueError(f"random must be 4 bytes, got {len(random)}")
    block = bytes(random) + u16(online_counter, "online_counter") + b"\x80\x00"
    if suite is Suite.PBOC_3DES:
        return _p.tdes_encrypt_block(key, block)
    block += bytes(8)
    if suite is Suite.SM4:
        return _p.sm4_encrypt_block(key, block)
    return _p.aes128_encrypt_block(key, block)


def load_mac1(
    suite: Suite, seslk: bytes, old_balance: int, amount: int, txn_type: int, terminal_id: str
) -> bytes:
    """MAC1 (card → ledger): old balance(4) ‖ amount(4) ‖ type(1) ‖ terminal id(6)."""
    data = (
        u32(old_balance, "old_balance")
        + u32(amount, "amount")
        + _type_byte(txn_type)
        + terminal_id_bcd(terminal_id)
    )
    return mac(suite, seslk, data)


def load_mac2(
    suite: Suite, seslk: bytes, amount: int, txn_type: int, terminal_id: str, date_time: str
) -> bytes:
    """MAC2 (ledger → card): amount(4) ‖ type(1) ‖ terminal id(6) ‖ date time(7)."""
    data = (
        u32(amount, "amount")
        + _type_byte(txn_type)
        + terminal_id_bcd(terminal_id)
        + datetime_bcd(date_time)
    )
    return mac(suite, seslk, data)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """MAC comparison whose time does not reveal how many leading bytes matched."""
    return hmac.compare_digest(a, b)


def _type_byte(txn_type: int) -> bytes:
    if not 0 <= txn_type <= 0xFF:
        raise FieldError("txn_type", f"must fit one byte, got {txn_type}")
    return bytes([txn_type])
