-- The sweeper finds due work by next_attempt_at alone: every non-final command has one
-- (never later than its deadline), every final command has NULL.
ALTER TABLE commands DROP INDEX commands_status_due, ADD INDEX commands_due (next_attempt_at, id);
