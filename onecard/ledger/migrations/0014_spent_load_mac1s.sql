-- A load's MAC1 (card, online counter, card random) is spent once the ledger
-- has answered it, refused or approved: a refused load resent under a new
-- terminal seq, once the card was active again, was credited for cash that
-- had been handed back. The online batch now looks a load's (card, counter)
-- up among every answered load, which 0011's unique index (approved loads
-- only) cannot serve; without this index that look-up scans terminal_txns.
CREATE INDEX IF NOT EXISTS terminal_txns_answered_loads
    ON terminal_txns (card_no, online_counter)
    WHERE online_counter IS NOT NULL;
