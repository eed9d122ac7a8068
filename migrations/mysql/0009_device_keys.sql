-- Device keys (PROTOCOL.md §5.9). No key is stored: each is derived from the
-- fleet secret and the device's id and generation. Only which generations are
-- valid: the latest issued (POST /v1/devices/{id}/key) and the oldest still
-- accepted (raised when the device first authenticates with a newer one, or
-- at once with ?revoke_previous=true). A device without a row has generation 1.
CREATE TABLE device_keys (
    device_id          VARCHAR(128)  NOT NULL PRIMARY KEY,
    latest_generation  BIGINT        NOT NULL,
    min_generation     BIGINT        NOT NULL,
    updated_at         BIGINT        NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
