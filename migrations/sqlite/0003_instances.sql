-- Several gateway instances on one database: see migrations/mysql/0003_instances.sql.
CREATE TABLE gateway_instances (
    id           TEXT    NOT NULL PRIMARY KEY,
    nonce        TEXT    NOT NULL,
    started_at   BIGINT  NOT NULL,
    heartbeat_at BIGINT  NOT NULL
);

CREATE TABLE mqtt_submissions (
    submission_key TEXT    NOT NULL PRIMARY KEY,
    created_at     BIGINT  NOT NULL
);
CREATE INDEX mqtt_submissions_created ON mqtt_submissions (created_at);
