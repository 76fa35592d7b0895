-- A replaced card's purse moves to the card that replaces it, so the ledger
-- holds 0 for it, while its chip still holds what it held: every late record
-- of a replaced card was reported as BALANCE_MISMATCH, and finance could not
-- tell a chip that disagrees from the rule. The purse the card held when it
-- was replaced is kept here, less the late records posted to it since: what
-- its chip should report before its next late record. NULL on cards never
-- replaced, and on cards replaced before this migration (their late records
-- are compared with the ledger's 0, as before).
ALTER TABLE cards ADD COLUMN replaced_purse bigint;
