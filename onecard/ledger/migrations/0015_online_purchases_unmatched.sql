-- An online debit carries no chip counter, yet the chip counts it among its
-- purchases. The ledger used to guess (cards.offline_counter + 1 per online
-- debit), and the guess was wrong whenever offline records of the card were
-- still on a bus when the debit landed: the next record after them showed a
-- false COUNTER_GAP for the slot the debit had taken. cards.offline_counter
-- is now the highest counter an offline record has shown, and this column
-- counts the online purchases no gap has accounted for yet: a gap is first
-- explained by them, and what is left over is reported (offline_batch.py).
-- A constant default adds the column without rewriting the table.
ALTER TABLE cards ADD COLUMN online_purchases_unmatched integer NOT NULL DEFAULT 0;
