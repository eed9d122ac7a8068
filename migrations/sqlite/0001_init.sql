-- Embedded store. Times are milliseconds since the Unix epoch (BIGINT), payloads raw bytes (BLOB).
CREATE TABLE devices (
    id          TEXT    PRIMARY KEY NOT NULL,
    enabled     BIGINT  NOT NULL,
    labels      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

-- What receivers report, kept apart from the registry: a device may connect before it is registered.
CREATE TABLE device_presence (
    device_id   TEXT    PRIMARY KEY NOT NULL,
    online      BIGINT  NOT NULL,
    receiver_id TEXT    NOT NULL,
    seen_at     BIGINT  NOT NULL
);

CREATE TABLE commands (
    id              TEXT    PRIMARY KEY NOT NULL,
    device_id       TEXT    NOT NULL REFERENCES devices(id),
    name            TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    payload_json    BIGINT  NOT NULL,
    status          TEXT    NOT NULL,
    attempts        BIGINT  NOT NULL,
    max_attempts    BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL,
    scheduled_at    BIGINT  NULL,
    expires_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    next_attempt_at BIGINT  NULL,
    delivered_at    BIGINT  NULL,
    completed_at    BIGINT  NULL,
    result_code     BIGINT  NULL,
    result_payload  BLOB    NULL,
    result_message  TEXT    NULL,
    error_kind      TEXT    NULL,
    error_message   TEXT    NULL,
    idempotency_key TEXT    NULL,
    request_hash    TEXT    NULL,
    reply_to        TEXT    NULL,
    correlation_id  TEXT    NULL
);
CREATE UNIQUE INDEX commands_idempotency ON commands(device_id, idempotency_key);
CREATE INDEX commands_device ON commands(device_id, id);
CREATE INDEX commands_status_due ON commands(status, next_attempt_at);

CREATE TABLE command_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id  TEXT    NOT NULL,
    at          BIGINT  NOT NULL,
    from_status TEXT    NULL,
    to_status   TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    detail      TEXT    NULL
);
CREATE INDEX command_events_command ON command_events(command_id, id);
