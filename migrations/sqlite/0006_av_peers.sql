-- Room A/V members across cluster nodes (SQLite). Keep in step with the PostgreSQL file of the
-- same version. Used in cluster mode only: one node keeps its A/V rooms in memory.

-- One row per room whose A/V has been joined in a cluster: joins of one room take this row's
-- lock, so the mesh limit holds and every two joins are ordered (the later one lists the
-- earlier one and offers to it); `version` counts the joins, and numbers each membership.
CREATE TABLE av_rooms (
    room_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0
);

-- Who is in a room's A/V, on which node (and which run of it: `epoch`); `generation` is the
-- membership's place in the room's join order. Rows of a node that dies are deleted by the
-- nodes that outlive it (and by itself when it starts again under the same name).
CREATE TABLE av_peers (
    room_id    TEXT   NOT NULL,
    session_id TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    node       TEXT   NOT NULL,
    epoch      INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    joined_at  INTEGER NOT NULL,
    PRIMARY KEY (room_id, session_id)
);
CREATE INDEX av_peers_node ON av_peers (node);
