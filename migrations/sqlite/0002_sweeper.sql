-- The sweeper finds due work by next_attempt_at alone: every non-final command has one
-- (never later than its deadline), every final command has NULL.
DROP INDEX commands_status_due;
CREATE INDEX commands_due ON commands(next_attempt_at, id);
