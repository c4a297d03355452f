-- A counter bumped by every change that decides whether a device has an order waiting or may
-- poll at all; server processes reload their in-memory view of the fleet when it moves.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('fleet', 0);
