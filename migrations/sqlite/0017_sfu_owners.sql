-- Which node runs a room's SFU in a cluster (SQLite). Keep in step with the PostgreSQL file of
-- the same version. Used in cluster mode only: one node runs every room's SFU itself.

-- One row per room whose SFU runs somewhere: the first node to need it inserts the row (insert
-- if absent) and runs it; every other node sends its sessions' SFU commands there. A row whose
-- node is no longer live may be taken over; the owner deletes it when its SFU room empties, and
-- a node deletes its own rows when it starts.
CREATE TABLE sfu_owners (
    room_id    TEXT    PRIMARY KEY,
    node       TEXT    NOT NULL,
    claimed_at INTEGER NOT NULL
);
CREATE INDEX sfu_owners_node ON sfu_owners (node);
