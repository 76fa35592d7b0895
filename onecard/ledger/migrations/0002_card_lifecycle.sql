-- What the card's later life needs on its own row, shared by the service
-- desk (loss, replacement) and the offline upload (records of a card used
-- after its loss, or of a replaced card, still arriving).

-- When the card was reported lost (NULL when it is not lost). Offline
-- records dated after this moment are posted with a CARD_LOST exception.
ALTER TABLE cards ADD COLUMN lost_at timestamptz;

-- A replaced card is blocked for good and names its successor; money of its
-- late offline records follows to the new card by a transfer posting.
ALTER TABLE cards ADD COLUMN replaced_by bigint REFERENCES cards (card_no);
