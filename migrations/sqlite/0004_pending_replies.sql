-- Final answers owed to MQTT callers: see migrations/mysql/0004_pending_replies.sql.
CREATE TABLE pending_replies (
    command_id  TEXT    NOT NULL PRIMARY KEY,
    due_at      BIGINT  NOT NULL
);
CREATE INDEX pending_replies_due ON pending_replies (due_at);
