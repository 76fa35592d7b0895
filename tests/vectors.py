"""The test vectors of shared/PROTOCOL.md ("Test vectors"), in one place.

They are normative: terminals built by others follow that page, so a test
that fails on one of these has found a bug in the code, never in the vector.
The pure-Python twin (test_protocol_vectors.py) and the Cython/OpenSSL
extension (test_fast_crypto.py) are both held to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onecard.ledger.crypto.suites import TYPE_LOAD, TYPE_PURCHASE, Suite
from onecard.ledger.keys import KeyVersion, MasterKey

h = bytes.fromhex

CARD = "3104123456789012"
ISSUER = "3104"
KV = 1

# The purchase every suite's TAC vector signs.
P_AMOUNT = 200
P_TYPE = TYPE_PURCHASE
P_TERMINAL = "310400000001"
P_SEQ = 42
P_TIME = "20261122083015"
P_TAC_INPUT = "000000C8063104000000010000002A20261122083015"

# The load every suite's SESLK, MAC1 and MAC2 vectors come from.
L_RANDOM = h("A1B2C3D4")
L_COUNTER = 7
L_OLD_BALANCE = 1500
L_AMOUNT = 5000
L_TYPE = TYPE_LOAD
L_TERMINAL = "310400000009"
L_TIME = "20261122090000"

#: The same purchase and load as keyword fields (PurchaseCheck / LoadCheck names).
PURCHASE: dict[str, Any] = {
    "amount": P_AMOUNT,
    "txn_type": P_TYPE,
    "terminal_id": P_TERMINAL,
    "terminal_seq": P_SEQ,
    "date_time": P_TIME,
}
LOAD: dict[str, Any] = {
    "random": L_RANDOM,
    "online_counter": L_COUNTER,
    "old_balance": L_OLD_BALANCE,
    "amount": L_AMOUNT,
    "txn_type": L_TYPE,
    "terminal_id": L_TERMINAL,
    "date_time": L_TIME,
}

#: RFC 4493's AES-CMAC key (its examples check the CMAC under the AES suite).
RFC4493_KEY = h("2B7E151628AED2A6ABF7158809CF4F3C")


@dataclass(frozen=True)
class Vector:
    """One suite's master keys and every value PROTOCOL.md derives from them."""

    suite: Suite
    mtk: str
    mlk: str
    card_tac_key: str
    card_load_key: str
    tac: str
    seslk: str
    mac1: str
    mac2: str

    def version(self, issuer: str = ISSUER, kv: int = KV) -> KeyVersion:
        return KeyVersion(
            issuer, kv, self.suite, MasterKey(h(self.mtk), "MTK"), MasterKey(h(self.mlk), "MLK")
        )


VECTORS = [
    Vector(
        Suite.PBOC_3DES,
        mtk="00112233445566778899AABBCCDDEEFF",
        mlk="11223344556677888877665544332211",
        card_tac_key="FD6ACB8F384CA7262D12E2FCD70DB7C9",
        card_load_key="BF9E408EF9508C00F4FEF9C18C475B97",
        tac="0C838596",
        seslk="0C51D33B11B96520",
        mac1="53751874",
        mac2="D4F9670A",
    ),
    Vector(
        Suite.SM4,
        mtk="0123456789ABCDEFFEDCBA9876543210",
        mlk="FEDCBA98765432100123456789ABCDEF",
        card_tac_key="3D76CF48A69DE7F78F30C6F35F0E7444",
        card_load_key="E1CDC1C1DCA98982B6099655F0977936",
        tac="F727B89F",
        seslk="6C1D127E53D6842A5E72C2D9CDCE7444",
        mac1="0912BCDE",
        mac2="9E8C5C57",
    ),
    Vector(
        Suite.AES,
        mtk="2B7E151628AED2A6ABF7158809CF4F3C",
        mlk="000102030405060708090A0B0C0D0E0F",
        card_tac_key="FD56B8ECE126300B46FCB49FC4CDF28B",
        card_load_key="170D5F4F4AF9F61CA8F5CC7A0019F6C6",
        tac="B38D6FA2FC98874C",
        seslk="6A746DF829F18213AE962D8AF4699ED4",
        mac1="663E24B38E3C32CA",
        mac2="250A892C6DFDDB3D",
    ),
]
BY_SUITE = {v.suite: v for v in VECTORS}
