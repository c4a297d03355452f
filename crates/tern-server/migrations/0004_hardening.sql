-- Enrollment proves possession of the device key; enrollment tokens are capped in how many
-- devices they keep pending; check-ins answer a per-device challenge; the fleet view that
-- answers polls is updated device by device from an event log.
ALTER TABLE devices ADD COLUMN enrollment_token TEXT;
ALTER TABLE devices ADD COLUMN challenge TEXT;
CREATE INDEX devices_by_token_status ON devices (enrollment_token, status);
-- One row per change that matters to polls, numbered by the `fleet` counter in the same
-- transaction (so numbers are consecutive and commit in order); `*` means "reload all".
CREATE TABLE fleet_events (
    seq BIGINT PRIMARY KEY,
    device_id TEXT NOT NULL,
    at BIGINT NOT NULL
);
