-- Every upload batch asks which of its cards were replaced (their late
-- records' money follows to the successor). Almost none are, but probing the
-- primary key for each of thousands of card numbers was 8-12% of the
-- database's time per upload (pg_stat_statements, benchmarks.throughput).
-- A partial index holds only replaced cards, so the probe stays small.
CREATE INDEX cards_replaced ON cards (card_no) WHERE replaced_by IS NOT NULL;
