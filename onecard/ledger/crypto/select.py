"""Choosing the card-crypto implementation the server runs.

The Cython extension is the only acceptable hot path; the pure-Python twin
is hundreds of times slower, so running on it must be asked for explicitly
rather than happen because a build step was missed.
"""

from __future__ import annotations

from onecard.ledger.crypto.verifier import CardVerifier, ReferenceVerifier
from onecard.ledger.keys import KeyStore


class CryptoUnavailable(RuntimeError):
    pass


def make_verifier(keys: KeyStore, cache_size: int, allow_slow: bool) -> CardVerifier:
    try:
        from onecard.ledger.crypto.fast import FastVerifier

        return FastVerifier(keys, cache_size)
    except ImportError as exc:
        if not allow_slow:
            raise CryptoUnavailable(
                "the Cython card-crypto extension is not built "
                f"({exc}); reinstall with `pip install .` (needs libssl-dev), "
                "or pass --allow-slow-crypto to run on the pure-Python reference"
            ) from None
    return ReferenceVerifier(keys, cache_size)
