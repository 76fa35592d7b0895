-- Refining 0008. Refusing every load whose counter is below the card's next
-- one also refused the card's own retry after a load it never completed
-- (approved, but the MAC2 did not reach the chip, and the terminal moved on
-- without reversing it): the chip stays at that counter for good, so the
-- card could never be topped up again. A retry by the card comes with a
-- fresh card random, a replay with the old one: what is single-use is the
-- pair (counter, random) of an approved load. Each load keeps its random,
-- and approved loads are found by card and counter.
ALTER TABLE terminal_txns ADD COLUMN card_random bytea;
CREATE INDEX terminal_txns_card_loads ON terminal_txns (card_no, online_counter)
    WHERE online_counter IS NOT NULL;
