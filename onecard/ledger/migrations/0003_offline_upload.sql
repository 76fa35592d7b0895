-- Offline purchase records uploaded in bulk (upload.proto).
--
-- They share terminal_txns with online debits: PROTOCOL.md identifies a
-- purchase by (terminal id, terminal seq) whichever way it arrives, so an
-- offline copy of an online debit is a duplicate, never a second posting.

-- Bit 1 << RecordException of every exception raised for finance (0: none).
ALTER TABLE terminal_txns ADD COLUMN exceptions integer NOT NULL DEFAULT 0;
-- The card's purchase counter the record carries (offline records only).
ALTER TABLE terminal_txns ADD COLUMN offline_counter integer;
-- Finding a repeated counter of one card must not scan its history.
CREATE INDEX terminal_txns_card_counter ON terminal_txns (card_no, offline_counter)
    WHERE offline_counter IS NOT NULL;

-- Records that must never be posted and never be dropped: a TAC that does
-- not verify, a key version the key store does not hold, a card or terminal
-- the ledger does not know. Kept whole, with the reason, for investigation.
CREATE TABLE quarantine (
    card_no              bigint NOT NULL,
    terminal_id          bigint NOT NULL,
    terminal_seq         bigint NOT NULL,
    fingerprint          bytea NOT NULL,
    amount               bigint NOT NULL,
    txn_type             smallint NOT NULL,
    date_time            text NOT NULL,
    key_version          smallint NOT NULL,
    tac                  bytea NOT NULL,
    offline_counter      integer NOT NULL,
    card_balance_before  bigint NOT NULL,
    -- onecard.ledger.model.QuarantineReason
    reason               smallint NOT NULL,
    received_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_no, terminal_id, terminal_seq, fingerprint)
);

-- Posted records finance must look at, one row per reason.
CREATE TABLE finance_exceptions (
    card_no        bigint NOT NULL,
    terminal_id    bigint NOT NULL,
    terminal_seq   bigint NOT NULL,
    -- onecard.ledger.model.RecordException
    kind           smallint NOT NULL,
    detail         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (card_no, terminal_id, terminal_seq, kind)
);
