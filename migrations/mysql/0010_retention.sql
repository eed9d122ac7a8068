-- Retention (the sweeper deletes final commands older than --retention-ms, in
-- batches, oldest first) and collapsed notes (a note identical to the
-- command's latest event adds to that event's `repeats` instead of a new row).
ALTER TABLE commands ADD INDEX commands_completed (completed_at);
ALTER TABLE command_events ADD COLUMN repeats BIGINT NOT NULL DEFAULT 1;
ALTER TABLE command_events ADD COLUMN last_at BIGINT NULL;
ALTER TABLE device_presence ADD INDEX device_presence_seen (online, seen_at);
