-- Which gateway process (its instance nonce) owes each final reply: another
-- instance sends it only when that process is dead, never beside a live but
-- slow one (which would make a second reply).
ALTER TABLE pending_replies ADD COLUMN owner VARCHAR(64) NULL;
