-- The per-device cap (--max-device-queue) counts a device's non-final commands
-- (exactly those with a next_attempt_at) on each insert batch: an index range
-- scan of at most the cap's rows, not a walk over the device's whole history.
ALTER TABLE commands ADD INDEX commands_device_queue (device_id, next_attempt_at);
