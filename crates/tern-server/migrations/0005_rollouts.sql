-- Rollouts replace deployments (a deployment is now a rollout of one phase): the tables are
-- renamed and gain the rollout's specification (selector, phases, thresholds, window,
-- timeout), the phases opened so far and their cut-offs, the approval, and a cache of how
-- many devices each phase selects. Which phase a device belongs to is a pure function of
-- the rollout id and the device's `bucket` (a hash of its id, filled in by the server), so
-- no row is written per device until the device itself acts.
ALTER TABLE deployments RENAME TO rollouts;
ALTER TABLE deployment_devices RENAME TO rollout_devices;
ALTER TABLE rollout_devices RENAME COLUMN deployment_id TO rollout_id;
ALTER TABLE rollouts ADD COLUMN spec TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN opened BIGINT NOT NULL DEFAULT 1;
ALTER TABLE rollouts ADD COLUMN cutoffs TEXT NOT NULL DEFAULT '[4294967296]';
ALTER TABLE rollouts ADD COLUMN selected TEXT NOT NULL DEFAULT '[]';
ALTER TABLE rollouts ADD COLUMN approval TEXT NOT NULL DEFAULT 'none';
ALTER TABLE rollouts ADD COLUMN approved_by TEXT;
ALTER TABLE rollouts ADD COLUMN creator_token TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN start_mode TEXT NOT NULL DEFAULT 'auto';
ALTER TABLE rollouts ADD COLUMN start_at BIGINT;
ALTER TABLE rollouts ADD COLUMN reason TEXT;
ALTER TABLE rollouts ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;
UPDATE rollouts SET status = 'running' WHERE status = 'active';
CREATE INDEX rollouts_by_status ON rollouts (status);

ALTER TABLE rollout_devices ADD COLUMN phase BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollout_devices ADD COLUMN status_since BIGINT NOT NULL DEFAULT 0;
UPDATE rollout_devices SET status_since = updated_at;
CREATE INDEX rollout_devices_by_status ON rollout_devices (rollout_id, status, status_since);

-- Progress, kept incrementally in the transaction that moves a device's row: devices per
-- rollout, phase and status.
CREATE TABLE rollout_counts (
    rollout_id TEXT NOT NULL,
    phase BIGINT NOT NULL,
    status TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, phase, status)
);
INSERT INTO rollout_counts (rollout_id, phase, status, n)
    SELECT rollout_id, 0, status, COUNT(*) FROM rollout_devices GROUP BY rollout_id, status;

-- Every status transition of a device in a rollout, and every order it refused.
CREATE TABLE device_history (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    at_us BIGINT NOT NULL,
    rollout_id TEXT NOT NULL,
    from_status TEXT NOT NULL,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX device_history_by_device ON device_history (device_id, at_us);

-- Inventory: the position a device takes in every rollout (a hash of its id), and the
-- version its booted slot holds, for search and metrics.
ALTER TABLE devices ADD COLUMN bucket BIGINT;
ALTER TABLE devices ADD COLUMN installed_version TEXT;
CREATE INDEX devices_by_bucket ON devices (bucket);
CREATE INDEX devices_by_type ON devices (device_type, hardware);
CREATE INDEX devices_by_version ON devices (installed_version);
CREATE INDEX devices_by_status ON devices (status);
