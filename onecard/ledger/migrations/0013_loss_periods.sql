-- Every loss period of a card, not only the last (migration 0012 kept the
-- last one on the card): an offline record dated inside an earlier period,
-- uploaded after the card was lost and released again, was posted without
-- the CARD_LOST exception. cards.last_loss_from/until stay as the latest,
-- read with the card's lock; this table is read only for records dated
-- before it.
CREATE TABLE card_loss_periods (
    card_no     bigint NOT NULL,
    lost_from   timestamptz NOT NULL,
    lost_until  timestamptz NOT NULL,
    PRIMARY KEY (card_no, lost_from),
    CHECK (lost_from <= lost_until)
);

-- The periods released so far: each release's audit entry holds the loss
-- time (its "before" view) and the release time; the card holds the last.
INSERT INTO card_loss_periods (card_no, lost_from, lost_until)
SELECT card_no, (before->>'lost_at')::timestamptz, at
FROM audit_log
WHERE operation = 'release_loss' AND card_no IS NOT NULL
  AND coalesce(before->>'lost_at', '') <> ''
ON CONFLICT DO NOTHING;

INSERT INTO card_loss_periods (card_no, lost_from, lost_until)
SELECT card_no, last_loss_from, last_loss_until
FROM cards
WHERE last_loss_from IS NOT NULL AND last_loss_until IS NOT NULL
ON CONFLICT DO NOTHING;

-- A card released before 0012 carried no last period, so its records went the
-- usual way and no period was looked at: the latest period goes on the card.
UPDATE cards c
SET last_loss_from = p.lost_from, last_loss_until = p.lost_until
FROM (
    SELECT DISTINCT ON (card_no) card_no, lost_from, lost_until
    FROM card_loss_periods
    ORDER BY card_no, lost_from DESC
) p
WHERE c.card_no = p.card_no AND c.last_loss_from IS NULL;
