-- The service desk's card lifecycle: holder details, the deny list, loss,
-- replacement, cancellation with a held refund, disputes, reversals.
-- Every card-scoped table carries card_no (DESIGN.md decision 10).

-- Holder details of a registered card (记名卡). Only masks for display and
-- HMAC digests (key outside the database, onecard/ledger/pii.py) to check an
-- ID number at the counter: a dump of this table reveals no personal data.
CREATE TABLE card_holders (
    card_no       bigint PRIMARY KEY REFERENCES cards,
    name_masked   text NOT NULL,
    id_masked     text NOT NULL,
    phone_masked  text NOT NULL,
    name_digest   bytea,
    id_digest     bytea,
    phone_digest  bytea,
    -- which personal-data key made the digests (a rotation shows here)
    key_id        text NOT NULL
);

-- The deny list (黑名单): what is on it now, and every change with its
-- version for terminals that ask for the changes since the one they hold.
-- One head row hands out versions; its row lock orders writers by commit.
CREATE TABLE deny_list_head (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version   bigint NOT NULL
);
INSERT INTO deny_list_head VALUES (true, 0);

CREATE TABLE deny_list (
    card_no   bigint PRIMARY KEY,
    -- onecard.ledger.denylist.DenyReason
    reason    smallint NOT NULL,
    version   bigint NOT NULL
);

CREATE TABLE deny_list_changes (
    card_no     bigint NOT NULL,
    version     bigint NOT NULL,
    listed      boolean NOT NULL,
    reason      smallint NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_no, version)
);
CREATE INDEX deny_list_changes_version ON deny_list_changes (version);

-- A cancellation without the card in hand: the refund waits until
-- hold_until for offline records still on their way, then a scheduled job
-- pays what the card holds by then.
CREATE TABLE pending_refunds (
    card_no       bigint PRIMARY KEY REFERENCES cards,
    request_id    text NOT NULL,
    staff_id      text NOT NULL,
    -- onecard.ledger.model.PaymentChannel
    channel       smallint NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    hold_until    timestamptz NOT NULL,
    paid_at       timestamptz,
    balance_paid  bigint,
    deposit_paid  bigint
);
CREATE INDEX pending_refunds_due ON pending_refunds (hold_until) WHERE paid_at IS NULL;

-- Refunds of disputed postings (投诉), with the case they belong to. The
-- money is a DISPUTE_REFUND posting whose `corrects` names the original.
CREATE TABLE dispute_refunds (
    card_no           bigint NOT NULL,
    refund_posting    bigint NOT NULL,
    original_posting  bigint NOT NULL,
    amount            bigint NOT NULL CHECK (amount > 0),
    case_reference    text NOT NULL,
    reason            text NOT NULL,
    staff_id          text NOT NULL,
    request_id        text NOT NULL,
    at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_no, refund_posting)
);

-- "How much of this posting was corrected already" must not scan postings.
CREATE INDEX postings_corrects ON postings (corrects) WHERE corrects IS NOT NULL;

-- The successor's enquiry names the card it replaced.
CREATE INDEX cards_replaced_by ON cards (replaced_by) WHERE replaced_by IS NOT NULL;

-- A reversed terminal transaction names the reversal (the terminal's own
-- seq of it); a second reversal finds it set.
ALTER TABLE terminal_txns ADD COLUMN reversed_by_seq bigint;
