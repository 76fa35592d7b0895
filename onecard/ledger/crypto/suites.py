"""The three cipher suites a key version can name (PROTOCOL.md, "Keys")."""

from __future__ import annotations

import enum


class Suite(enum.IntEnum):
    """Suite ids are on the wire and in key files, so their numbers are fixed."""

    PBOC_3DES = 1
    SM4 = 2
    AES = 3

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def mac_length(self) -> int:
        """AES-CMAC keeps 8 bytes; the block-cipher CBC-MACs keep 4."""
        return 8 if self is Suite.AES else 4

    @classmethod
    def from_label(cls, label: str) -> Suite:
        for suite, name in _LABELS.items():
            if name == label:
                return suite
        # The label is not echoed: in a key file, the field may hold a master key.
        shown = f"a string of {len(label)} characters" if isinstance(label, str) else "not a string"
        raise ValueError(f"unknown suite ({shown}); expected one of {sorted(_LABELS.values())}")


_LABELS = {Suite.PBOC_3DES: "pboc-3des", Suite.SM4: "sm4", Suite.AES: "aes"}

#: Transaction type bytes (PROTOCOL.md, "Numbers and encodings").
TYPE_LOAD = 0x02
TYPE_PURCHASE = 0x06
TYPE_COMPOUND_PURCHASE = 0x09
PURCHASE_TYPES = frozenset({TYPE_PURCHASE, TYPE_COMPOUND_PURCHASE})
