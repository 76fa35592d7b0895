"""Holder details (记名卡): masked for display, keyed digests for checking, nothing else kept.

The desk needs two things from a holder's name, ID number and phone: to show
them so staff can recognise the holder (``3201**********1234``), and to check
an ID number presented at the counter against the registered one. Neither
needs the clear value, so the ledger never stores it: a database dump, a
backup or an audit row holds masks and HMAC-SHA256 digests under a key that
lives outside the database. Errors name the field and the rule, never the
value, so a refusal cannot put personal data into a log either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.keys import (
    KeyStoreError,
    read_private_file,
    shown_path,
    write_new_private_file,
)
from onecard.ledger.model import ProtectedHolder

KEY_BYTES = 32


@dataclass(frozen=True)
class HolderDetails:
    """Clear holder details as the desk typed them; lives only for one request."""

    name: str = field(default="", repr=False)
    id_number: str = field(default="", repr=False)
    phone: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.name or self.id_number or self.phone)


def mask_id_number(value: str) -> str:
    """First four (the region) and last four stay, as on Chinese receipts."""
    if len(value) <= 8:
        return "*" * len(value)
    return value[:4] + "*" * (len(value) - 8) + value[-4:]


def mask_phone(value: str) -> str:
    """At most a third of the digits, from the end: enough to recognise, not to dial.

    An 11-digit number keeps the form staff and holders know from every
    Chinese receipt (138****5678); any other length shows at most a third of
    its digits, never more than four, so an 8-digit landline is not left
    with one digit hidden. A leading + stays as it is.
    """
    plus, digits = ("+", value[1:]) if value.startswith("+") else ("", value)
    if len(digits) == 11 and not plus:
        return digits[:3] + "****" + digits[-4:]
    shown = min(4, len(digits) // 3)
    return plus + "*" * (len(digits) - shown) + digits[len(digits) - shown :]


def mask_name(value: str) -> str:
    """The family name only (张**); enough for staff to address the holder.

    A one-character name would be the whole name, so it is hidden entirely.
    """
    if len(value) <= 1:
        return "*" * len(value)
    return value[:1] + "*" * (len(value) - 1)


def normalise_id_number(value: str) -> str:
    """One form for one ID number, however it was typed: digits and X in ASCII.

    A Chinese input method in full-width mode types ３２０１…Ｘ. Those
    passed the check (str.isdigit takes them) and were kept in that form, so
    the holder, presenting the number in ASCII later, was refused as not the
    holder, and the other way round. NFKC folds full-width to ASCII; what
    is still not ASCII is refused by the check.
    """
    return unicodedata.normalize("NFKC", value).strip().upper()


def check_holder(h: HolderDetails, prefix: str = "holder") -> None:
    name, idn, phone = h.name.strip(), normalise_id_number(h.id_number), h.phone.strip()
    if name and (len(name) > 64 or not name.isprintable()):
        raise FieldError(f"{prefix}.name", "must be 1 to 64 printable characters")
    if idn and not (
        len(idn) in (15, 18)
        and idn.isascii()
        and idn[:-1].isdigit()
        and (idn[-1].isdigit() or idn[-1] == "X")
    ):
        raise FieldError(
            f"{prefix}.id_number", "must be 15 or 18 characters: digits, the last may be X"
        )
    digits = phone[1:] if phone.startswith("+") else phone
    if phone and not (5 <= len(digits) <= 20 and digits.isascii() and digits.isdigit()):
        raise FieldError(f"{prefix}.phone", "must be 5 to 20 digits, optionally after a +")


class PiiProtector:
    """Turns clear holder details into what the ledger keeps, under one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the personal-data key must be at least 16 bytes")
        self._key = key
        #: Names the key (not reveals it) so a rotation shows in the rows it wrote.
        self.key_id = hashlib.sha256(b"onecard-pii-key-id" + key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PiiProtector(key_id={self.key_id})"

    def digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def id_digest(self, id_number: str) -> bytes:
        return self.digest("id", normalise_id_number(id_number))

    def protect(self, h: HolderDetails) -> ProtectedHolder | None:
        """None for an anonymous card; raises FieldError for a malformed detail."""
        if not h:
            return None
        check_holder(h)
        name, idn, phone = h.name.strip(), normalise_id_number(h.id_number), h.phone.strip()
        return ProtectedHolder(
            name_masked=mask_name(name),
            id_masked=mask_id_number(idn),
            phone_masked=mask_phone(phone),
            name_digest=self.digest("name", name) if name else None,
            id_digest=self.digest("id", idn) if idn else None,
            phone_digest=self.digest("phone", phone) if phone else None,
            key_id=self.key_id,
        )

    def matches(self, stored_digest: bytes | None, presented_id: str) -> bool:
        if stored_digest is None:
            return True  # nothing registered to check against
        return hmac.compare_digest(stored_digest, self.id_digest(presented_id))


def load_or_create_key(path: Path) -> bytes:
    """The development key file beside the dev card keys: owner-only, made once."""
    write_new_private_file(path, "personal-data key file", os.urandom(KEY_BYTES).hex())
    return read_key_file(path)


def read_key_file(path: Path) -> bytes:
    """A hex key in a file only its owner can read (like the card key file)."""
    what = "personal-data key file"
    shown = shown_path(path)
    try:
        key = bytes.fromhex(read_private_file(path, what).decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError too
        raise KeyStoreError(f"{what} {shown} must hold hex digits") from None
    if len(key) < 16:
        raise KeyStoreError(f"{what} {shown} must hold at least 16 bytes")
    return key
