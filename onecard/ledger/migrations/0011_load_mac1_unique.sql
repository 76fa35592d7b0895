-- A load's MAC1, (card, online counter, card random), is single-use: the
-- batch checks it against the approved loads it reads (0010). That read is
-- part of the statement that waits for the card lock, and a statement sees
-- the database as it was when it started: a copy of the same MAC1 approved
-- by another process while this batch waited was invisible to it, and both
-- were credited. The database now refuses the second: the batch rolls back,
-- runs again, and its new read finds the first (STALE_COUNTER).
DROP INDEX IF EXISTS terminal_txns_card_loads;
CREATE UNIQUE INDEX terminal_txns_load_mac1
    ON terminal_txns (card_no, online_counter, card_random)
    WHERE online_counter IS NOT NULL AND status = 1;  -- TxnStatus.APPROVED
