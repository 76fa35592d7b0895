-- Releasing a loss report (解挂) cleared lost_at, so an offline record dated
-- inside the loss period but uploaded after the release (a bus back in its
-- depot days later) was posted without the CARD_LOST exception: finance lost
-- the one sign that someone else had the card. The last loss period is kept
-- on the card; earlier ones are in the audit log.
ALTER TABLE cards ADD COLUMN last_loss_from timestamptz;
ALTER TABLE cards ADD COLUMN last_loss_until timestamptz;
