-- What a card's chip holds beyond its ledger purse, through moves the ledger
-- made without the chip: a replacement empties the old card's purse into the
-- new card's (the old chip keeps its money), and a late offline record of a
-- replaced card takes its amount from the newest card of the chain (whose
-- chip was written at replacement and does not see it). Before, the old
-- card's every late record was a BALANCE_MISMATCH (the ledger held 0 for it),
-- and so was every later record of the card the amount followed from, though
-- each chip was right. An uploaded record's reported balance is now compared
-- with purse_balance + chip_adjust. The desk's payouts at cancellation and
-- dispute refunds move the ledger purse without the chip too, and count.
ALTER TABLE cards ADD COLUMN chip_adjust bigint NOT NULL DEFAULT 0;

-- The same, worked out from the postings for cards moved before now: every
-- purse posting the chip did not see (what the ledger's audit holds it to,
-- onecard/ledger/audit.py). One pass over postings, once.
UPDATE cards AS c SET chip_adjust = d.adjust
FROM (
    SELECT card_no, sum(amount) AS adjust
    FROM (
        SELECT debit_account - 10000000000000000 AS card_no, amount FROM postings
        WHERE kind IN (4, 7, 9, 11)  -- follow, balance refund, dispute refund, deposit offset
          AND debit_account BETWEEN 10000000000000000 AND 19999999999999999
        UNION ALL
        SELECT credit_account - 10000000000000000, -amount FROM postings
        WHERE kind IN (4, 7, 9, 11)
          AND credit_account BETWEEN 10000000000000000 AND 19999999999999999
        UNION ALL  -- a replacement: the old card's side only (the new chip is written)
        SELECT card_no,
               CASE WHEN debit_account = 10000000000000000 + card_no THEN amount ELSE -amount END
        FROM postings WHERE kind = 5
    ) AS moves
    GROUP BY card_no
) AS d
WHERE c.card_no = d.card_no AND d.adjust <> 0;
