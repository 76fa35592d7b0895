"""What the desk shows of a holder: enough to recognise them, never enough to reach them.

Masks are all the ledger keeps of a name and a phone, so they are what a
database dump, a screen or an audit row can leak.
"""

from __future__ import annotations

import grpc
import pytest

from onecard.server.app import RunningServer
from onecard.v1 import desk_pb2
from tests.desk_support import audit_trail, get_card, issue_at_desk
from tests.support import fetch, new_card_number


@pytest.mark.parametrize(
    ("name", "phone", "name_shown", "phone_shown"),
    [
        ("王五", "13812345678", "王*", "138****5678"),  # the mobile form everyone knows
        ("李", "83456789", "*", "******89"),  # a landline: two digits of eight
        ("X", "12345", "*", "****5"),
        ("Zhang Wei", "+8613812345678", "Z********", "+*********5678"),
        ("欧阳娜娜", "0086213456789012", "欧***", "************9012"),
    ],
)
async def test_holder_mask_never_shows_a_whole_name_or_most_of_a_phone(
    server: RunningServer,
    channel: grpc.aio.Channel,
    name: str,
    phone: str,
    name_shown: str,
    phone_shown: str,
) -> None:
    card_no = new_card_number()
    await issue_at_desk(channel, card_no, desk_pb2.Holder(name=name, phone=phone))
    shown = (await get_card(channel, card_no)).holder
    assert (shown.name, shown.phone) == (name_shown, phone_shown)
    digits = [c for c in phone_shown if c.isdigit()]
    if len(phone.lstrip("+")) != 11:
        assert len(digits) <= len(phone.lstrip("+")) // 3
    rows = await fetch(
        server.dsn, "SELECT name_masked, phone_masked FROM card_holders WHERE card_no = $1",
        int(card_no),
    )  # fmt: skip
    assert (rows[0]["name_masked"], rows[0]["phone_masked"]) == (name_shown, phone_shown)
    after = (await audit_trail(server.dsn, card_no))[0][3]
    assert after is not None and after["holder_phone"] == phone_shown
