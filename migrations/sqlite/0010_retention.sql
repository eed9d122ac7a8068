-- Retention (the sweeper deletes final commands older than --retention-ms, in
-- batches, oldest first) and collapsed notes (a note identical to the
-- command's latest event adds to that event's `repeats` instead of a new row).
CREATE INDEX commands_completed ON commands (completed_at);
ALTER TABLE command_events ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1;
ALTER TABLE command_events ADD COLUMN last_at INTEGER NULL;
CREATE INDEX device_presence_seen ON device_presence (online, seen_at);
