-- HTTP API keys (docs/security/http.md). A key is `gk_<id>_<secret>`; only
-- the SHA-256 of the secret (hex) is kept, so the table reveals no usable key.
-- `scopes` is a space-separated list (`commands:write commands:read
-- devices:admin`). Times are milliseconds since the Unix epoch; a revoked key
-- keeps its row (with `revoked_at`) for the record.
CREATE TABLE api_keys (
    id          VARCHAR(32)   NOT NULL PRIMARY KEY,
    name        VARCHAR(255)  NOT NULL,
    key_hash    CHAR(64)      NOT NULL,
    scopes      VARCHAR(255)  NOT NULL,
    created_at  BIGINT        NOT NULL,
    revoked_at  BIGINT        NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
