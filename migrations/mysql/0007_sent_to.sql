-- The receiver the command's current attempt was published to: only that
-- receiver's reports move the command (PROTOCOL 4.2), and a cancel goes to it.
ALTER TABLE commands ADD COLUMN sent_to VARCHAR(255) NULL;
