"""Who makes a call: the staff id a desk tool sends in metadata.

Every desk action is attributed in the audit log. A terminal's own calls
carry none; a clerk's reversal from the desk tool carries one, and the
reversal is then theirs in the audit log.
"""

from __future__ import annotations

from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
STAFF_METADATA_KEY = "x-onecard-operator"


#: Characters of a staff id, as the audit log stores it.
STAFF_ID_MAX = 64


async def staff_id(context: Context) -> str:
    """Every desk action is attributed: refuse a call that does not say who makes it."""
    staff = await given_staff_id(context)
    if staff is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"desk calls must carry the staff id in metadata key {STAFF_METADATA_KEY!r}",
        )
        raise AssertionError("unreachable")
    return staff


async def given_staff_id(context: Context) -> str | None:
    """The staff id the call carries, None if it carries none; refuse one out of bounds.

    An id past the limit was taken for none at all, and its caller was told
    to send what it had sent.
    """
    for key, value in context.invocation_metadata() or ():
        if key != STAFF_METADATA_KEY or not isinstance(value, str):
            continue
        if 0 < len(value) <= STAFF_ID_MAX and value.isprintable():
            return value
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"staff id in metadata key {STAFF_METADATA_KEY!r} must be 1 to {STAFF_ID_MAX} "
            f"printable characters, got {len(value)}",
        )
    return None
