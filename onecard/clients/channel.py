"""Channels for terminals and their gateways: gRPC resends what is safe to send again.

Every TerminalService call is idempotent by (terminal, sequence number): sent
again, it is posted once and answered with the first outcome (DUPLICATE, the
first status in ``original_status``). So a terminal may resend a call the
ledger could not take (RESOURCE_EXHAUSTED: its queue was full; CANCELLED:
shed from gRPC's backlog before the ledger saw it, or cut off by a stopping
server) or could not answer (UNAVAILABLE: the database or the connection was
down). Without it, a gate refuses a rider the ledger would have let through a
moment later.

gRPC's own retries do it (the channel's service config, gRFC A6): backoff
with jitter, a bounded number of attempts, and retry throttling, which stops
resending while most calls of the channel fail, so that an overloaded ledger
is not fed a retry storm on top of its load. A CANCELLED the caller caused
itself (a cancelled task, an expired deadline) is never resent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from onecard.v1 import terminal_pb2

#: What a terminal call may be resent after; anything else is the answer.
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")
#: The first attempt and up to four resends (gRPC caps attempts at 5).
MAX_ATTEMPTS = 5


def retry_service_config(attempts: int = MAX_ATTEMPTS) -> str:
    """The service config that resends TerminalService calls; ``attempts`` 1 resends none."""
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ValueError(f"attempts must be between 1 and {MAX_ATTEMPTS}, got {attempts}")
    service = terminal_pb2.DESCRIPTOR.services_by_name["TerminalService"].full_name
    method: dict[str, Any] = {"name": [{"service": service}]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }
    return json.dumps(
        {
            "methodConfig": [method],
            # A failure costs a token, a success gives back a tenth of one;
            # below half of them, nothing is resent.
            "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
        }
    )


def terminal_channel(
    target: str,
    *,
    attempts: int = MAX_ATTEMPTS,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure channel to ``target`` that resends terminal calls as above."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(attempts)),
            *options,
        ],
    )
