-- A caller's cancel of a command that may already be at a receiver or its
-- device is a request: recorded here, it stops re-sends, and the command
-- becomes `canceled` only when a receiver reports it never wrote it.
ALTER TABLE commands ADD COLUMN cancel_requested_at INTEGER NULL;
