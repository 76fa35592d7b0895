"""The fast card verifier: the Cython/OpenSSL extension behind the ``CardVerifier`` contract.

``FastVerifier`` answers exactly what ``verifier.ReferenceVerifier`` answers
(the tests hold it to that), one batch at a time: records are packed into C
structs with the GIL held, card keys are derived or taken from a bounded LRU
and every MAC is computed and compared without the GIL, so other threads
(the gRPC server's event loop among them) keep running meanwhile.

Importing this module never fails; constructing a ``FastVerifier`` without
the built extension raises ``ImportError`` (which ``select.make_verifier``
turns into its fall-back decision). ``available()`` says in advance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from onecard.ledger.keys import KeyStore

if TYPE_CHECKING:
    from onecard.ledger.crypto.verifier import LoadCheck, PurchaseCheck

try:
    from onecard.ledger.crypto import _fast
except ImportError as exc:  # not built, or libcrypto missing at run time
    _fast = None  # type: ignore[assignment]
    _IMPORT_ERROR: str = str(exc)
else:
    _IMPORT_ERROR = ""

__all__ = ["FastVerifier", "available", "unavailable_reason"]

# PROTOCOL.md test vectors (card 3104123456789012, kv 1): one derivation and one
# TAC per suite, checked once before the extension is declared usable.
_SELF_TEST = (
    (1, "00112233445566778899AABBCCDDEEFF", "FD6ACB8F384CA7262D12E2FCD70DB7C9", "0C838596"),
    (2, "0123456789ABCDEFFEDCBA9876543210", "3D76CF48A69DE7F78F30C6F35F0E7444", "F727B89F"),
    (3, "2B7E151628AED2A6ABF7158809CF4F3C", "FD56B8ECE126300B46FCB49FC4CDF28B", "B38D6FA2FC98874C"),
)


@functools.cache
def unavailable_reason() -> str | None:
    """Why the fast path cannot be used, or None when it can."""
    if _fast is None:
        return (
            f"the card-crypto extension is not built ({_IMPORT_ERROR}); "
            "reinstall with `pip install .` (needs libssl-dev / openssl-devel)"
        )
    missing = _fast.missing_ciphers()
    if missing:
        return f"{_fast.openssl_version()} lacks {', '.join(missing)}"
    for suite, mtk, card_key, tac in _SELF_TEST:
        derived = _fast.derive_card_key(
            suite, bytes.fromhex(mtk), "3104123456789012", 1, _fast.PURPOSE_TAC
        )
        got = _fast.purchase_tac(suite, derived, 200, 0x06, "310400000001", 42, "20261122083015")
        if derived != bytes.fromhex(card_key) or got != bytes.fromhex(tac):
            return f"{_fast.openssl_version()} fails the suite {suite} known-answer test"
    return None


def available() -> bool:
    """True when the extension is built, has every suite and passes its known-answer test."""
    return unavailable_reason() is None


class FastVerifier:
    """``CardVerifier`` over OpenSSL 3 libcrypto, batch at a time, without the GIL.

    Derived card keys are held in a C-level LRU of ``cache_size`` entries
    (about 100 bytes each), wiped whenever the key store's ``generation``
    changes (checked at the start of every batch) and on ``clear_cache()``.
    Calls on one verifier are serialised; use one per thread for parallelism.
    """

    name = "cython-openssl"

    def __init__(self, keys: KeyStore, cache_size: int = 100_000) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise ImportError(reason)
        self._keys = keys
        self._engine = _fast.BatchVerifier(cache_size)

    def verify_purchases(self, checks: Sequence[PurchaseCheck]) -> list[int]:
        """MAC_OK / MAC_BAD / KEY_UNKNOWN per check, in input order."""
        return self._engine.verify_purchases(self._keys, checks)

    def verify_loads(self, checks: Sequence[LoadCheck]) -> list[tuple[int, bytes]]:
        """(status, MAC2) per check, in input order; MAC2 is b"" unless MAC1 verified."""
        return self._engine.verify_loads(self._keys, checks)

    def clear_cache(self) -> None:
        """Forget (and wipe) every derived card key and keyed master-key context."""
        self._engine.clear_cache()

    @property
    def cache_size(self) -> int:
        return self._engine.cache_size

    def cache_stats(self) -> tuple[int, int, int]:
        """(cached keys, hits, misses) since construction or the last ``clear_cache()``."""
        return self._engine.cache_stats

    def __repr__(self) -> str:
        return f"FastVerifier(cache_size={self.cache_size}, keys={self._keys!r})"
