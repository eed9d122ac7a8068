-- Final answers owed to MQTT callers: a row is written in the transaction
-- that makes a command with a reply_to final, and deleted once the reply is
-- published. An instance that dies in between leaves the row; another
-- instance's sweeper publishes the reply once `due_at` has passed.
CREATE TABLE pending_replies (
    command_id  CHAR(36)  NOT NULL PRIMARY KEY,
    due_at      BIGINT    NOT NULL,
    KEY pending_replies_due (due_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
