-- Encrypted releases: each device's encryption (X25519) public key, and the wrapped data
-- keys of encrypted payloads, one per payload and recipient key. A wrapped key opens
-- nothing without the recipient's private key; the server never holds a data key.
ALTER TABLE devices ADD COLUMN encryption_key TEXT;
CREATE TABLE recipients (
    sha256 TEXT NOT NULL,
    kid TEXT NOT NULL,
    enc TEXT NOT NULL,
    ct TEXT NOT NULL,
    key_commitment TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (sha256, kid)
);
