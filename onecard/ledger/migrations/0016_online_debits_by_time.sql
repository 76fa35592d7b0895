-- 0015 counted online purchases not yet placed among a card's offline
-- counters, and spent that count on the next gap: it could not tell where on
-- the chip they fell, so a lost record went unreported once a late first
-- record left one purchase unspent, a gap below a late record spent a
-- purchase made after it, and a reversal that netted the balance out cleared
-- one the chip had counted (found by review). A gap is now explained by the
-- card's online debits dated between the record at its highest counter and
-- the new record: the time of that record is kept on the card, and the
-- debits are found by card and time through the index below (online debits
-- only, so an upload's insert never touches it).
ALTER TABLE cards DROP COLUMN online_purchases_unmatched;
-- Terminal local time (UTC+8, as stamped) of the offline record at
-- offline_counter; NULL before the first such record, and on cards whose
-- counter came from before this migration (their gaps are not explained).
ALTER TABLE cards ADD COLUMN offline_counter_at timestamp;
CREATE INDEX IF NOT EXISTS terminal_txns_card_debits
    ON terminal_txns (card_no, txn_time)
    WHERE kind = 1;  -- TxnKind.DEBIT
