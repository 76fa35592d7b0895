-- An upload batch reaches each card once: one UPDATE locks the row, applies
-- the purse delta worked out before the lock and returns the state the batch
-- decides against. That state is the row before the update, which RETURNING
-- shows only from PostgreSQL 18 on (RETURNING OLD); the balance before is the
-- new one less the delta, but the offline counter is raised with greatest()
-- and cannot be taken back, so the UPDATE keeps the counter it replaced here.
-- Only the upload's UPDATE writes it and only its RETURNING reads it: it is
-- scratch, not a fact about the card (README Performance, "one access").
ALTER TABLE cards ADD COLUMN offline_counter_before integer;
