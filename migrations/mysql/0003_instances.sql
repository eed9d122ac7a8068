-- Several gateway instances on one database.
-- Live instances: an id is used by one process at a time (`nonce` tells them
-- apart); a row whose heartbeat is stale may be taken over.
CREATE TABLE gateway_instances (
    id           VARCHAR(128)  NOT NULL PRIMARY KEY,
    nonce        CHAR(32)      NOT NULL,
    started_at   BIGINT        NOT NULL,
    heartbeat_at BIGINT        NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- MQTT submissions already taken by some instance (every instance receives
-- every submission): the first to insert the key answers it, in the
-- transaction that stores its command. Forgotten after a day.
CREATE TABLE mqtt_submissions (
    submission_key CHAR(64)  NOT NULL PRIMARY KEY,
    created_at     BIGINT    NOT NULL,
    KEY mqtt_submissions_created (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
