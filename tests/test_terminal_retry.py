"""Terminals resend what the ledger could not take, and a resent approval counts as one."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from onecard.clients.channel import terminal_channel
from onecard.clients.terminal import Terminal
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.support import (
    assert_books_balance,
    assert_card_paid,
    cli_server_env,
    dev_keys,
    fetch,
    issue,
    start_cli_server,
    stop_cli_server,
)

APPROVED = common_pb2.TXN_STATUS_APPROVED


async def _burst_while_stopped(
    proc: subprocess.Popen[str], bus: Terminal, requests: list[terminal_pb2.DebitRequest]
) -> list[terminal_pb2.DebitReply | BaseException]:
    """The requests all arrive while the server is stopped, so they meet its backlog at once."""
    proc.send_signal(signal.SIGSTOP)
    try:
        calls: list[Awaitable[terminal_pb2.DebitReply]] = [bus.stub.Debit(r) for r in requests]
        sending = asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGCONT)
    replies = await sending
    for r in replies:
        if isinstance(r, grpc.aio.AioRpcError):
            assert r.code() == grpc.StatusCode.CANCELLED, r
        else:
            assert isinstance(r, terminal_pb2.DebitReply), r
            assert r.status == APPROVED, r
    return replies


def _shed(replies: list[terminal_pb2.DebitReply | BaseException]) -> list[int]:
    return [i for i, r in enumerate(replies) if isinstance(r, grpc.aio.AioRpcError)]


async def test_calls_shed_from_the_backlog_are_resent_and_each_posts_once(
    db_dsn: str, tmp_path: Path
) -> None:
    """A burst past gRPC's backlog (server stopped while it arrives) is shed in part with
    CANCELLED; a terminal channel resends those, and every debit is approved and posted once.

    The same burst on a channel that does not resend (``attempts=1``), in the
    same run, is the baseline: the resending channel gets through at least
    half of what that one lost. Its resends are bounded (five attempts, and
    retry throttling once most of its calls have failed), so on a slow
    machine a few calls can still end CANCELLED (1 run in 3 on 2026-12-02):
    those are sent again by hand, as a terminal does with what is left
    unanswered, and every debit of both bursts must be posted exactly once."""
    env = await cli_server_env(db_dsn, tmp_path)
    proc, banner = await asyncio.to_thread(start_cli_server, ["--max-pending-calls", "1"], env)
    try:
        address = banner.split("serving gRPC on ")[1].split()[0]
        async with (
            terminal_channel(address, attempts=1) as once,
            terminal_channel(address) as chan,
        ):
            card = await issue(chan, dev_keys())
            await Terminal(chan, "310400000009").load(card, 10_000)
            plain_bus = Terminal(once, "310400000002")
            plain = [plain_bus.debit_request(card, 10) for _ in range(40)]
            bus = Terminal(chan, "310400000001")
            resent = [bus.debit_request(card, 10) for _ in range(40)]
            await once.channel_ready()
            await chan.channel_ready()

            lost_plain = _shed(await _burst_while_stopped(proc, plain_bus, plain))
            lost = _shed(await _burst_while_stopped(proc, bus, resent))
            # A burst that loses nothing without resends says nothing of them.
            assert len(lost_plain) >= 10, f"only {len(lost_plain)} of 40 shed without resends"
            assert len(lost) <= len(lost_plain) // 2, (
                f"{len(lost)} of 40 shed with resends, {len(lost_plain)} without"
            )

            for stub_bus, requests, left in ((plain_bus, plain, lost_plain), (bus, resent, lost)):
                for i in left:
                    again: terminal_pb2.DebitReply = await stub_bus.stub.Debit(requests[i])
                    assert APPROVED in (again.status, again.original_status), again
        await assert_card_paid(db_dsn, card, purchases=80, balance=10_000 - 80 * 10)
    finally:
        out = await asyncio.to_thread(stop_cli_server, proc, signal.SIGTERM)
    assert proc.returncode == 0, out


# grpc-stubs declares the interceptor generic in (request, response), but grpcio's
# class is not subscriptable at runtime, so the base names it bare.
class _LoseFirstReply(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """The ledger commits and answers, the reply is lost on the way, the call is sent again."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        await (await continuation(client_call_details, request))
        return await continuation(client_call_details, request)


async def test_a_resent_approval_counts_as_the_approval_on_the_card(
    server: RunningServer, keys: MemoryKeyStore
) -> None:
    """The chip keeps the fare and the loaded money when the ledger's answer is DUPLICATE
    of an approval: chip and ledger agree, and each transaction is posted once."""
    async with grpc.aio.insecure_channel(server.address) as plain:
        card = await issue(plain, keys)
    # grpc-stubs types aio interceptors as a placeholder that only a cast satisfies.
    lose_first = cast(grpc.aio.ClientInterceptor, _LoseFirstReply())
    async with grpc.aio.insecure_channel(server.address, interceptors=[lose_first]) as lossy:
        load = await Terminal(lossy, "310400000009").load(card, 5_000)
        debit = await Terminal(lossy, "310400000001").debit(card, 250)
    for reply in (load, debit):
        assert reply.status == common_pb2.TXN_STATUS_DUPLICATE
        assert reply.original_status == APPROVED
    assert card.balance == debit.balance_after == 4_750
    rows = await fetch(
        server.dsn,
        "SELECT terminal_id, amount FROM postings"
        " WHERE card_no = $1 AND terminal_id IS NOT NULL ORDER BY posting_id",
        int(card.card_no),
    )
    assert [tuple(r) for r in rows] == [(310400000009, 5_000), (310400000001, 250)]
    await assert_books_balance(server.dsn)


def test_attempts_outside_what_grpc_allows_are_refused_naming_the_limit() -> None:
    for attempts in (0, 6):
        with pytest.raises(ValueError, match=f"attempts must be between 1 and 5, got {attempts}"):
            terminal_channel("127.0.0.1:1", attempts=attempts)
