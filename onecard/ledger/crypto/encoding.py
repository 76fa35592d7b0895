"""Wire forms of the fields that go into a MAC input (PROTOCOL.md table).

Validation lives here as well as encoding so that a malformed field is
refused with the field's name before any key is touched.
"""

from __future__ import annotations

import datetime as _dt
import functools


class FieldError(ValueError):
    """A field that does not fit its wire form; names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def described(value: object) -> str:
    """A refused field's value by kind and length, never itself.

    An ID or phone number typed into a card-number field came back whole in
    the refusal (to the desk client, its terminal, its logs).
    """
    if not isinstance(value, str):
        return type(value).__name__
    if value.isascii() and value.isdigit():
        return f"{len(value)} digits"
    return f"{len(value)} characters, not all decimal digits"


def _digits(value: str, n: int, field: str) -> str:
    if len(value) != n or not value.isascii() or not value.isdigit():
        raise FieldError(field, f"must be exactly {n} decimal digits, got {described(value)}")
    return value


def card_number_bcd(card_no: str, field: str = "card_number") -> bytes:
    """16 digits -> 8 bytes BCD."""
    return bytes.fromhex(_digits(card_no, 16, field))


def terminal_id_bcd(terminal_id: str, field: str = "terminal_id") -> bytes:
    """12 digits -> 6 bytes BCD."""
    return bytes.fromhex(_digits(terminal_id, 12, field))


def parse_datetime(value: str, field: str = "date_time") -> _dt.datetime:
    """``YYYYMMDDhhmmss`` terminal local time; must be a real moment."""
    moment = _moment(value)
    if moment is None:
        _digits(value, 14, field)
        raise FieldError(field, f"is not a real date and time: {value!r}")
    return moment


def is_datetime(value: str) -> bool:
    """Whether parse_datetime would take ``value`` (no exception to build when it would not)."""
    return _moment(value) is not None


@functools.lru_cache(maxsize=65_536)
def _moment(value: str) -> _dt.datetime | None:
    """Cached: the records of one upload share a handful of minutes, and
    strptime was a fifth of the server's time per offline record (py-spy)."""
    if len(value) != 14 or not value.isascii() or not value.isdigit():
        return None
    try:
        return _dt.datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[8:10]),
            int(value[10:12]),
            int(value[12:14]),
        )
    except ValueError:
        return None


def datetime_bcd(value: str, field: str = "date_time") -> bytes:
    """14 digits -> 7 bytes BCD, after checking it names a real moment."""
    parse_datetime(value, field)
    return bytes.fromhex(value)


def u32(value: int, field: str) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise FieldError(field, f"must fit an unsigned 32-bit integer, got {value}")
    return value.to_bytes(4, "big")


def u16(value: int, field: str) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise FieldError(field, f"must fit an unsigned 16-bit integer, got {value}")
    return value.to_bytes(2, "big")
