"""`onecard desk …`: the service desk's flows from a shell, for staff and for scripts.

Readable tables by default, ``--json`` for scripts. Exit codes scripts can
trust:

- 0: done (a cancellation whose refund is held counts: it was accepted)
- 1: refused by a business rule (the reply's status and detail say why)
- 2: usage: a malformed argument, or no staff id
- 3: the server or its database is unavailable, or overloaded: retry with
  the same ``--request-id`` (printed on every action), which is safe
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from onecard.server.config import add_option
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc, terminal_pb2, terminal_pb2_grpc

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
STAFF_METADATA_KEY = "x-onecard-operator"

_CHANNELS = {
    c.removeprefix("PAYMENT_CHANNEL_").lower(): v for c, v in common_pb2.PaymentChannel.items()
}
_CHANNELS.pop("unspecified")
_RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_USAGE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED}


class _Out:
    """Prints a reply as a table or JSON, and picks the exit code."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def json(self, doc: dict[str, Any]) -> None:
        print(json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True))

    def table(self, rows: list[tuple[str, object]]) -> None:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")


def _msg(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _fen(value: int) -> str:
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 100}.{abs(value) % 100:02d} CNY ({value} fen)"


def _enum(enum_type: Any, value: int, prefix: str) -> str:
    try:
        return str(enum_type.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def card_rows(card: desk_pb2.Card) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("card", card.card_number),
        ("status", _enum(common_pb2.CardStatus, card.status, "CARD_STATUS_")),
        ("product", card.product),
        ("balance", _fen(card.balance)),
        ("deposit", _fen(card.deposit)),
        ("counters", f"online {card.online_counter}, offline {card.offline_counter}"),
        ("issued", card.issued_at),
        ("last used", card.last_used_at or "never"),
    ]
    if card.HasField("holder"):
        h = card.holder
        rows.append(("holder", ", ".join(v for v in (h.name, h.id_number, h.phone) if v)))
    for label, value in (
        ("lost at", card.lost_at),
        ("replaced by", card.replaced_by),
        ("replaces", card.replaces),
    ):
        if value:
            rows.append((label, value))
    if card.deny_listed:
        rows.append(("deny list", "listed"))
    if card.HasField("refund"):
        r = card.refund
        state = _enum(desk_pb2.RefundState, r.state, "REFUND_STATE_")
        when = f"paid {r.paid_at}" if r.paid_at else f"due after {r.due_at}"
        rows.append(("refund", f"{state}, {when}"))
        if r.paid_at:
            rows.append(("refund paid", f"balance {r.balance_paid}, deposit {r.deposit_paid} fen"))
    return rows


class DeskClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = _Out(args.json)
        self.metadata = ((STAFF_METADATA_KEY, args.operator),)

    def request_id(self) -> str:
        rid: str = self.args.request_id
        return rid

    def reply(self, reply: desk_pb2.DeskReply, request_id: str) -> int:
        ok = reply.status in (desk_pb2.DESK_STATUS_OK, desk_pb2.DESK_STATUS_REFUND_PENDING)
        status = _enum(desk_pb2.DeskStatus, reply.status, "DESK_STATUS_")
        if self.out.as_json:
            self.out.json({**_msg(reply), "request_id": request_id})
        else:
            rows: list[tuple[str, object]] = [("outcome", status), ("detail", reply.detail)]
            rows.append(("request id", request_id))
            if reply.amount:
                rows.append(("amount", _fen(reply.amount)))
            if reply.posting_id:
                rows.append(("posting", reply.posting_id))
            self.out.table(rows)
            if reply.HasField("card"):
                print()
                self.out.table(card_rows(reply.card))
            if reply.HasField("new_card"):
                print("\nnew card:")
                self.out.table(card_rows(reply.new_card))
        return EXIT_OK if ok else EXIT_REFUSED


#: What the request fields the CLI's numbers go into can hold (desk.proto, terminal.proto).
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _whole(field: tuple[int, int]) -> Callable[[str], int]:
    """An argparse type: a whole number its request field can hold (argparse names the option).

    protobuf refuses any other with a bare ValueError, which left the CLI as a traceback.
    """
    low, high = field

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _channel_value(name: str) -> int:
    return _CHANNELS[name]


async def _run(args: argparse.Namespace) -> int:
    client = DeskClient(args)
    async with grpc.aio.insecure_channel(args.target) as channel:
        desk = desk_pb2_grpc.DeskServiceStub(channel)
        terminal = terminal_pb2_grpc.TerminalServiceStub(channel)
        handler: Callable[[DeskClient, Any, Any, argparse.Namespace], Awaitable[int]] = args.handler
        result: int = await handler(client, desk, terminal, args)
        return result


async def _issue(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    holder = desk_pb2.Holder(name=a.name or "", id_number=a.id_number or "", phone=a.phone or "")
    reply = await desk.IssueCard(
        desk_pb2.IssueCardRequest(
            request_id=rid,
            card_number=a.card,
            product=a.product,
            deposit=a.deposit,
            key_version=a.key_version,
            payment_channel=_channel_value(a.channel),  # type: ignore[arg-type]
            holder=holder,
        ),
        metadata=c.metadata,
        timeout=a.timeout,
    )
    as_desk = desk_pb2.DeskReply(status=reply.status, detail=reply.detail)
    if reply.HasField("card"):
        as_desk.card.CopyFrom(reply.card)
    return c.reply(as_desk, rid)


async def _show(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    card = await desk.GetCard(
        desk_pb2.GetCardRequest(card_number=a.card), metadata=c.metadata, timeout=a.timeout
    )
    if c.out.as_json:
        c.out.json(_msg(card))
    else:
        c.out.table(card_rows(card))
    return EXIT_OK


async def _history(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    page = await desk.GetHistory(
        desk_pb2.GetHistoryRequest(
            card_number=a.card,
            from_time=a.from_time or "",
            to_time=a.to_time or "",
            page_size=a.limit,
            page_token=a.page_token or "",
        ),
        metadata=c.metadata,
        timeout=a.timeout,
    )
    if c.out.as_json:
        c.out.json(_msg(page))
        return EXIT_OK
    header = ("posting", "time", "kind", "account", "amount (fen)", "counterparty", "terminal")
    rows = [
        (
            str(e.posting_id),
            e.posted_at[:19],
            _enum(desk_pb2.PostingKind, e.kind, "POSTING_KIND_"),
            e.account,
            f"{e.amount:+d}",
            e.counterparty,
            f"{e.terminal_id}#{e.terminal_seq}" if e.terminal_id else "",
        )
        for e in page.entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("(no postings in this range)")
    if page.next_page_token:
        print(f"\nmore: --page-token {page.next_page_token}")
    return EXIT_OK


async def _report_loss(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    req = desk_pb2.CardActionRequest(
        request_id=rid, card_number=a.card, holder_id_number=a.id_number or ""
    )
    return c.reply(await desk.ReportLoss(req, metadata=c.metadata, timeout=a.timeout), rid)


async def _release_loss(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    req = desk_pb2.CardActionRequest(
        request_id=rid, card_number=a.card, holder_id_number=a.id_number or ""
    )
    return c.reply(await desk.ReleaseLoss(req, metadata=c.metadata, timeout=a.timeout), rid)


async def _replace(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    req = desk_pb2.ReplaceCardRequest(
        request_id=rid,
        card_number=a.card,
        new_card_number=a.new_card,
        key_version=a.key_version,
        reason=desk_pb2.ReplaceReason.Value(f"REPLACE_REASON_{a.reason.upper()}"),  # type: ignore[arg-type]
        holder_id_number=a.id_number or "",
    )
    return c.reply(await desk.ReplaceCard(req, metadata=c.metadata, timeout=a.timeout), rid)


async def _cancel(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    req = desk_pb2.CancelCardRequest(
        request_id=rid,
        card_number=a.card,
        refund_channel=_channel_value(a.channel),  # type: ignore[arg-type]
        card_readable=a.card_balance is not None,
        card_balance=a.card_balance or 0,
        holder_id_number=a.id_number or "",
    )
    return c.reply(await desk.CancelCard(req, metadata=c.metadata, timeout=a.timeout), rid)


async def _refund(c: DeskClient, desk: Any, _t: Any, a: argparse.Namespace) -> int:
    rid = c.request_id()
    req = desk_pb2.RefundPostingRequest(
        request_id=rid,
        card_number=a.card,
        posting_id=a.posting,
        amount=a.amount,
        case_reference=a.case,
        reason=a.reason,
    )
    return c.reply(await desk.RefundPosting(req, metadata=c.metadata, timeout=a.timeout), rid)


#: Entries per GetDenyList call (the ledger's largest page).
DENY_LIST_PAGE = 10_000


async def _deny_list(c: DeskClient, _d: Any, terminal: Any, a: argparse.Namespace) -> int:
    # Page by page (a city's list outgrows one reply), shown as one list.
    page = await terminal.GetDenyList(
        terminal_pb2.GetDenyListRequest(since_version=a.since, page_size=DENY_LIST_PAGE),
        timeout=a.timeout,
    )
    token = page.next_page_token
    while token:
        more = await terminal.GetDenyList(
            terminal_pb2.GetDenyListRequest(page_size=DENY_LIST_PAGE, page_token=token),
            timeout=a.timeout,
        )
        page.entries.extend(more.entries)
        token = more.next_page_token
    page.next_page_token = ""
    if c.out.as_json:
        c.out.json(_msg(page))
        return EXIT_OK
    kind = "full list" if page.full else f"changes since version {a.since}"
    print(f"deny list version {page.version} ({kind}, {len(page.entries)} entries)")
    for e in page.entries:
        action = "add" if e.listed else "remove"
        reason = _enum(terminal_pb2.DenyReason, e.reason, "DENY_REASON_")
        print(f"  {e.card_number}  {action:<6}  {reason:<8}  v{e.version}")
    return EXIT_OK


async def _reverse(c: DeskClient, _d: Any, terminal: Any, a: argparse.Namespace) -> int:
    from onecard.clients.terminal import now_bcd_text

    reply = await terminal.Reverse(
        terminal_pb2.ReverseRequest(
            card_number=a.card,
            amount=a.amount,
            terminal_id=a.terminal,
            terminal_seq=a.seq,
            original_seq=a.original_seq,
            date_time=now_bcd_text(),
        ),
        metadata=c.metadata,
        timeout=a.timeout,
    )
    status = _enum(common_pb2.TxnStatus, reply.status, "TXN_STATUS_")
    ok = reply.status == common_pb2.TXN_STATUS_APPROVED or (
        reply.status == common_pb2.TXN_STATUS_DUPLICATE
        and reply.original_status == common_pb2.TXN_STATUS_APPROVED
    )
    if c.out.as_json:
        c.out.json(_msg(reply))
    else:
        c.out.table(
            [("outcome", status), ("detail", reply.detail), ("balance", _fen(reply.balance_after))]
        )
    return EXIT_OK if ok else EXIT_REFUSED


def cmd_desk(args: argparse.Namespace) -> int:
    prog = f"onecard desk {args.flow}"
    if args.handler is not _deny_list and not args.operator:
        print(
            f"{prog}: no staff id: give --operator STAFF_ID or set ONECARD_OPERATOR",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.handler is not _deny_list and not (
        args.operator.isascii() and args.operator.isprintable()
    ):
        # gRPC sends metadata as printable ASCII only, and raised on anything else.
        print(
            f"{prog}: --operator (ONECARD_OPERATOR): a staff id is printable ASCII "
            f"(it travels in gRPC metadata), got {len(args.operator)} characters with others",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.timeout > 0:
        # gRPC takes a deadline already past and answers DEADLINE_EXCEEDED,
        # which this command would report as an outage to retry.
        print(
            f"{prog}: --timeout (ONECARD_TIMEOUT): must be more than 0 seconds, "
            f"got {args.timeout:g}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.request_id is None:
        # Chosen here, not in the call, so an outage message can name it for the retry.
        args.request_id = str(uuid.uuid4())
    if not args.target:
        addr = Path(args.data_dir) / "server.addr"
        args.target = addr.read_text().strip() if addr.exists() else "127.0.0.1:50051"
    try:
        return asyncio.run(_run(args))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in _RETRY:
            print(
                f"{prog}: server {args.target} unavailable ({code.name.lower()}): "
                f"{exc.details()}; retry"
                + (f" with --request-id {args.request_id}" if args.action else ""),
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        if code in _USAGE:
            print(f"{prog}: {exc.details()}", file=sys.stderr)
            return EXIT_USAGE
        if code == grpc.StatusCode.NOT_FOUND:
            print(f"{prog}: {exc.details()}; check the card number", file=sys.stderr)
            return EXIT_REFUSED
        # The action may have been done before the error: only a retry under
        # the same request id is sure not to do it twice.
        print(
            f"{prog}: server error {code.name}: {exc.details()}; retry"
            + (f" with --request-id {args.request_id}" if args.action else ""),
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE


def _common(p: argparse.ArgumentParser) -> None:
    add_option(p, "--target", help="server address (default: from DATA_DIR/server.addr)")
    add_option(
        p,
        "--data-dir",
        type=Path,
        default=Path(".onecard"),
        help="where a local server writes its address",
    )
    add_option(p, "--operator", help="staff id the action is attributed to")
    add_option(p, "--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--json", action="store_true", help="print the reply as JSON for scripts")


def _action(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--request-id",
        help="idempotency key; reuse the printed one to retry safely (default: a new one)",
    )


def add_desk_parser(sub: Any) -> None:
    """Register `onecard desk <flow>` on the top-level subcommands."""
    desk = sub.add_parser(
        "desk",
        help="service-desk flows: issue, show, history, loss, replace, cancel, refund, …",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flows = desk.add_subparsers(dest="flow", required=True)
    channels = sorted(_CHANNELS)

    def flow(name: str, handler: Any, help: str, action: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = flows.add_parser(name, help=help)
        _common(p)
        if action:
            _action(p)
        p.set_defaults(func=cmd_desk, handler=handler, action=action, request_id=None)
        return p

    p = flow("issue", _issue, "issue a card (开卡) and collect its deposit")
    p.add_argument("card", help="16-digit card number")
    p.add_argument("--product", default="standard", help="standard, student, senior, …")
    p.add_argument(
        "--deposit", type=_whole(INT64), required=True, help="fen; must equal the product's deposit"
    )
    p.add_argument(
        "--key-version", type=_whole(UINT32), default=1, help="issuer key version of the card"
    )
    p.add_argument("--channel", choices=channels, default="cash", help="how the deposit was paid")
    p.add_argument("--name", help="holder's name (registered card)")
    p.add_argument("--id-number", help="holder's ID number; stored only masked")
    p.add_argument("--phone", help="holder's phone; stored only masked")

    p = flow("show", _show, "card enquiry (余额查询)", action=False)
    p.add_argument("card")

    p = flow("history", _history, "postings of a card, newest first (消费账单)", action=False)
    p.add_argument("card")
    p.add_argument("--from", dest="from_time", help="RFC 3339 start, inclusive")
    p.add_argument("--to", dest="to_time", help="RFC 3339 end, exclusive")
    p.add_argument("--limit", type=_whole(UINT32), default=50, help="postings per page")
    p.add_argument("--page-token", help="continue from the previous page")

    for name, handler, text in (
        ("report-loss", _report_loss, "report a card lost (挂失)"),
        ("release-loss", _release_loss, "release a loss (解挂)"),
    ):
        p = flow(name, handler, text)
        p.add_argument("card")
        p.add_argument("--id-number", help="holder's ID number (required for a registered card)")

    p = flow("replace", _replace, "replace a lost or damaged card (补换卡)")
    p.add_argument("card")
    p.add_argument("new_card", help="the new card's number")
    p.add_argument("--reason", choices=["lost", "damaged"], default="lost")
    p.add_argument(
        "--key-version", type=_whole(UINT32), default=1, help="the new card's key version"
    )
    p.add_argument("--id-number", help="holder's ID number (required for a registered card)")

    p = flow("cancel", _cancel, "cancel a card and refund it (退卡)")
    p.add_argument("card")
    p.add_argument("--channel", choices=channels, default="cash", help="how to refund")
    p.add_argument(
        "--card-balance",
        type=_whole(INT64),
        help="the chip's balance in fen when the card was read; without it the refund is held",
    )
    p.add_argument("--id-number", help="holder's ID number (required for a registered card)")

    p = flow("refund", _refund, "refund a disputed purchase posting (退款)")
    p.add_argument("card")
    p.add_argument("posting", type=_whole(INT64), help="posting id (see `onecard desk history`)")
    p.add_argument("amount", type=_whole(INT64), help="fen")
    p.add_argument("--case", required=True, help="complaint case reference")
    p.add_argument("--reason", required=True, help="why, for the audit trail")

    p = flow("deny-list", _deny_list, "the deny list terminals pull (黑名单)", action=False)
    p.add_argument(
        "--since", type=_whole(UINT64), default=0, help="version held; 0 for the full list"
    )

    p = flow("reverse", _reverse, "reverse a terminal's last transaction (撤消)", action=False)
    p.add_argument("card")
    p.add_argument("amount", type=_whole(UINT32), help="fen, as in the original")
    p.add_argument("--terminal", required=True, help="12-digit terminal id")
    p.add_argument(
        "--seq", type=_whole(UINT32), required=True, help="the reversal's own terminal seq"
    )
    p.add_argument(
        "--original-seq", type=_whole(UINT32), required=True, help="seq of the transaction"
    )
