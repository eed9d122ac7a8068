-- Production store (MySQL 8 / MariaDB 10.6+). Times are milliseconds since the Unix epoch,
-- payloads raw bytes. Strings are VARCHAR (not TEXT) so sqlx's Any driver reads them as text.
CREATE TABLE devices (
    id          VARCHAR(128)  NOT NULL PRIMARY KEY,
    enabled     BIGINT        NOT NULL,
    labels      VARCHAR(8192) NOT NULL,
    created_at  BIGINT        NOT NULL,
    updated_at  BIGINT        NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- What receivers report, kept apart from the registry: a device may connect before it is registered.
CREATE TABLE device_presence (
    device_id   VARCHAR(128)  NOT NULL PRIMARY KEY,
    online      BIGINT        NOT NULL,
    receiver_id VARCHAR(128)  NOT NULL,
    seen_at     BIGINT        NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE commands (
    id              CHAR(36)      NOT NULL PRIMARY KEY,
    device_id       VARCHAR(128)  NOT NULL,
    name            VARCHAR(255)  NOT NULL,
    payload         MEDIUMBLOB    NOT NULL,
    payload_json    BIGINT        NOT NULL,
    status          VARCHAR(16)   NOT NULL,
    attempts        BIGINT        NOT NULL,
    max_attempts    BIGINT        NOT NULL,
    created_at      BIGINT        NOT NULL,
    scheduled_at    BIGINT        NULL,
    expires_at      BIGINT        NOT NULL,
    updated_at      BIGINT        NOT NULL,
    next_attempt_at BIGINT        NULL,
    delivered_at    BIGINT        NULL,
    completed_at    BIGINT        NULL,
    result_code     BIGINT        NULL,
    result_payload  MEDIUMBLOB    NULL,
    result_message  VARCHAR(1024) NULL,
    error_kind      VARCHAR(64)   NULL,
    error_message   VARCHAR(1024) NULL,
    idempotency_key VARCHAR(255)  NULL,
    request_hash    CHAR(64)      NULL,
    reply_to        VARCHAR(255)  NULL,
    correlation_id  VARCHAR(255)  NULL,
    UNIQUE KEY commands_idempotency (device_id, idempotency_key),
    KEY commands_device (device_id, id),
    KEY commands_status_due (status, next_attempt_at),
    CONSTRAINT commands_device_fk FOREIGN KEY (device_id) REFERENCES devices(id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE command_events (
    id          BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    command_id  CHAR(36)      NOT NULL,
    at          BIGINT        NOT NULL,
    from_status VARCHAR(16)   NULL,
    to_status   VARCHAR(16)   NOT NULL,
    attempt     BIGINT        NOT NULL,
    detail      VARCHAR(1024) NULL,
    KEY command_events_command (command_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
