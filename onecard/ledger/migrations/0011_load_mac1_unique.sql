-- A load's MAC1, (card, online counter, card random), is single-use: the
-- batch checks it against the approved loads it reads (0010). That read is
-- part of the statement that waits for the card lock, and a statement sees
-- the database as it was when it started: a copy of the same MAC1 approved
-- by another process while this batch waited was invisible to it, and both
-- were credited. The database now refuses the second: the batch rolls back,
-- runs again, and its new read finds the first (STALE_COUNTER).
--
-- A database that ran 0010 may hold such a double credit already. Then the
-- index cannot be built, and finance must settle those loads first: the
-- migration stops and says which, rather than failing on the index.
DO $$
DECLARE
    doubled bigint;
BEGIN
    SELECT count(*) INTO doubled FROM (
        SELECT 1 FROM terminal_txns
        WHERE online_counter IS NOT NULL AND status = 1 AND card_random IS NOT NULL
        GROUP BY card_no, online_counter, card_random
        HAVING count(*) > 1
    ) d;
    IF doubled > 0 THEN
        RAISE EXCEPTION '% load MAC1s were approved more than once (the same card, online counter and card random under several terminal seqs): each was credited more than once', doubled
            USING HINT = 'List them with: SELECT card_no, online_counter, card_random, array_agg(terminal_id || '':'' || terminal_seq) FROM terminal_txns WHERE online_counter IS NOT NULL AND status = 1 GROUP BY 1, 2, 3 HAVING count(*) > 1; reverse the extra credits (a desk correction), then start the server again.';
    END IF;
END $$;

DROP INDEX IF EXISTS terminal_txns_card_loads;
CREATE UNIQUE INDEX terminal_txns_load_mac1
    ON terminal_txns (card_no, online_counter, card_random)
    WHERE online_counter IS NOT NULL AND status = 1;  -- TxnStatus.APPROVED
