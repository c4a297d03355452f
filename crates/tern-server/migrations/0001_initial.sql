-- Tern server schema. The same file runs on SQLite and PostgreSQL: only TEXT and BIGINT
-- columns, no autoincrement, no backend-specific functions. Times are Unix seconds.

-- Published TUF metadata, every version kept; repo_current names the versions served.
CREATE TABLE repo_metadata (
    role TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (role, version)
);

CREATE TABLE repo_current (
    role TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    expires BIGINT NOT NULL
);

-- Stored payloads by content; the files live in the artifact directory.
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    length BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE releases (
    name TEXT PRIMARY KEY,
    targets TEXT NOT NULL,
    uploaded_at BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    keyid TEXT NOT NULL,
    device_type TEXT NOT NULL,
    hardware TEXT NOT NULL,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    enrolled_via TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seen BIGINT,
    last_time BIGINT,
    last_nonce TEXT,
    phase TEXT,
    slots TEXT,
    refused_order TEXT
);

CREATE TABLE device_tags (
    device_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    release_name TEXT NOT NULL,
    selector_kind TEXT NOT NULL,
    selector TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    target TEXT NOT NULL,
    target_length BIGINT NOT NULL,
    target_hashes TEXT NOT NULL,
    version TEXT NOT NULL,
    status TEXT NOT NULL,
    progress_done BIGINT,
    progress_total BIGINT,
    reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_by_device ON deployment_devices (device_id, status);

-- API and enrollment tokens: only a hash of the secret is kept.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE audit (
    id TEXT PRIMARY KEY,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit (at_us);

-- Leases coordinate work between server processes sharing one database (the timestamp
-- re-signer): a row is held by `holder` until `until`.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
