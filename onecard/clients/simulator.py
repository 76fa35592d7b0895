"""`onecard simulate`: a few terminals and a service desk against a running server.

The newcomer's proof that it works: issue cards on each key suite, top them
up, ride, try what must be refused, and compare the chip's balance with the
ledger's.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.channel import terminal_channel
from onecard.clients.terminal import Terminal
from onecard.ledger.devdata import DEMO_ISSUER
from onecard.ledger.keys import KeyStore
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc

STAFF = (("x-onecard-operator", "simulator"),)


class SeqStore:
    """Terminal sequence numbers survive between runs, as they do in a real terminal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}

    def terminal(self, channel: grpc.aio.Channel, terminal_id: str) -> Terminal:
        return Terminal(channel, terminal_id, self.next.get(terminal_id, 1))

    def save(self, terminals: list[Terminal]) -> None:
        for t in terminals:
            self.next[t.terminal_id] = t.next_seq()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.next))


def status_name(value: int) -> str:
    return common_pb2.TxnStatus.Name(value).removeprefix("TXN_STATUS_")


async def run(target: str, keys: KeyStore, state_dir: Path, out: list[str] | None = None) -> int:
    """Returns the number of surprises (0 when every outcome was the expected one)."""
    lines: list[str] = [] if out is None else out

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    surprises = 0

    def expect(what: str, got: int, want: int) -> None:
        nonlocal surprises
        mark = "ok " if got == want else "!! "
        if got != want:
            surprises += 1
        say(f"  {mark}{what}: {status_name(got)}")

    seqs = SeqStore(state_dir / "simulator-seq.json")
    async with terminal_channel(target) as channel:
        desk = desk_pb2_grpc.DeskServiceStub(channel)
        bus = seqs.terminal(channel, "310400000001")
        metro = seqs.terminal(channel, "310400000004")
        topup = seqs.terminal(channel, "310400000009")
        cards: list[SimulatedCard] = []
        say(f"service desk: issuing cards at {target}")
        for kv, product, deposit in ((1, "standard", 2000), (2, "student", 2000), (3, "senior", 0)):
            version = keys.get(DEMO_ISSUER, kv)
            if version is None:
                raise SystemExit(f"key store has no key version {kv} for issuer {DEMO_ISSUER}")
            card_no = DEMO_ISSUER + f"{random.randrange(10**12):012d}"
            reply = await desk.IssueCard(
                desk_pb2.IssueCardRequest(
                    request_id=str(uuid.uuid4()),
                    card_number=card_no,
                    product=product,
                    deposit=deposit,
                    key_version=kv,
                    payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
                ),
                metadata=STAFF,
            )
            say(
                f"  issued {card_no} ({product}, suite {version.suite.label}, deposit {deposit})"
                f": {desk_pb2.DeskStatus.Name(reply.status)}"
            )
            cards.append(SimulatedCard(card_no, version))

        say("top-up machine 310400000009: loading 50.00 CNY on each card")
        for card in cards:
            lr = await topup.load(card, 5000, common_pb2.PAYMENT_CHANNEL_ALIPAY)
            expect(
                f"load {card.card_no} -> ledger {lr.balance_after}, chip {card.balance}",
                lr.status,
                common_pb2.TXN_STATUS_APPROVED,
            )

        say("bus validator 310400000001 and metro gate 310400000004: rides")
        for card in cards:
            r = await bus.debit(card, 200)
            expect(
                f"bus fare 2.00 on {card.card_no} -> {r.balance_after}",
                r.status,
                common_pb2.TXN_STATUS_APPROVED,
            )
            r = await metro.debit(card, 400)
            expect(
                f"metro fare 4.00 on {card.card_no} -> {r.balance_after}",
                r.status,
                common_pb2.TXN_STATUS_APPROVED,
            )

        say("what the ledger must refuse")
        card = cards[0]
        card.balance += 100_000  # a chip that claims more than the ledger holds
        r = await bus.debit(card, 9_000)
        expect(
            "debit of 90.00 with 44.00 in the ledger",
            r.status,
            common_pb2.TXN_STATUS_INSUFFICIENT_FUNDS,
        )
        card.balance -= 100_000
        request = bus.debit_request(card, 100)
        forged = type(request)()
        forged.CopyFrom(request)
        forged.tac = bytes(b ^ 0xFF for b in request.tac)
        r = await bus.stub.Debit(forged)
        expect("debit with a forged TAC", r.status, common_pb2.TXN_STATUS_MAC_INVALID)
        card.balance += 100  # that tap never happened
        request = bus.debit_request(card, 100)
        first = await bus.stub.Debit(request)
        again = await bus.stub.Debit(request)
        expect("a debit", first.status, common_pb2.TXN_STATUS_APPROVED)
        expect(
            f"the same debit retried (first outcome {status_name(again.original_status)}, "
            f"balance {again.balance_after})",
            again.status,
            common_pb2.TXN_STATUS_DUPLICATE,
        )

        say("service desk: balances")
        for card in cards:
            c = await desk.GetCard(
                desk_pb2.GetCardRequest(card_number=card.card_no), metadata=STAFF
            )
            same = "matches chip" if c.balance == card.balance else f"chip says {card.balance}"
            state = common_pb2.CardStatus.Name(c.status).removeprefix("CARD_STATUS_")
            say(
                f"  {c.card_number} {state}"
                f" balance {c.balance / 100:.2f} deposit {c.deposit / 100:.2f}"
                f" online counter {c.online_counter} ({same})"
            )
            if c.balance != card.balance:
                surprises += 1
        seqs.save([bus, metro, topup])
    say(
        "simulation finished: "
        + ("every outcome as expected" if surprises == 0 else f"{surprises} unexpected outcomes")
    )
    return surprises
