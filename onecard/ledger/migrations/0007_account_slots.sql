-- Hot system accounts (each operator's payable, the issuer's cash by
-- channel) take a summed delta from every group-commit batch. On one row per
-- account, every batch of every process locked that row until its COMMIT,
-- so concurrent batches committed one after another: with four upload
-- transactions in flight the account update waited 27% of the run
-- (pg_stat_statements, benchmarks.throughput, 10,000,000 cards) and
-- PostgreSQL could not flush their WAL together.
--
-- Batches now add their deltas to one of several slot rows per account,
-- chosen by the database session, so concurrent batches rarely share a row.
-- An account's balance is its own row plus its slots: read it through the
-- account_balances view. Desk operations, which are rare, still update the
-- account row itself.
CREATE TABLE account_slots (
    account_id  bigint NOT NULL REFERENCES accounts,
    slot        smallint NOT NULL,
    balance     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, slot)
);

CREATE VIEW account_balances AS
SELECT a.account_id, a.code, a.kind, a.balance + coalesce(s.total, 0) AS balance
FROM accounts a
LEFT JOIN (
    SELECT account_id, sum(balance) AS total FROM account_slots GROUP BY account_id
) s USING (account_id);
