-- Finance works the quarantine from this view: the records still waiting for
-- someone, not those that have since been posted.
--
-- A record quarantined for a terminal or key version the ledger did not know
-- yet posts when it is uploaded again after the terminal is registered or the
-- key loaded. Its quarantine row stays (the record of what happened, and the
-- upload's posting path must not probe quarantine per record: it does 50,000
-- records a second); this view leaves out every row whose very record (same
-- terminal, seq and fingerprint) has an approved terminal_txns row. An
-- unknown card's record and a record refused online have a terminal_txns row
-- with their fingerprint too, but not an approved one: they stay open.
CREATE VIEW quarantine_open AS
SELECT q.*
FROM quarantine q
WHERE NOT EXISTS (
    SELECT 1 FROM terminal_txns t
    WHERE t.terminal_id = q.terminal_id
      AND t.terminal_seq = q.terminal_seq
      AND t.fingerprint = q.fingerprint
      AND t.status = 1  -- TxnStatus.APPROVED
);
