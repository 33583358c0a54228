-- Breakout groups and whiteboards (sqlite). Keep in step with the postgres file of the same
-- version: same tables and columns.

-- One breakout session of a parent room: 'open' until breakout_close or closes_at (the clock
-- closes it, also after a restart), then 'closed'. At most one is open per parent.
CREATE TABLE breakouts (
    id         TEXT PRIMARY KEY,
    parent_id  TEXT    NOT NULL REFERENCES rooms (id),
    state      TEXT    NOT NULL,
    opened_by  TEXT    NOT NULL,
    opened_at  INTEGER NOT NULL,
    closes_at  INTEGER,
    closed_at  INTEGER
);
CREATE INDEX breakouts_parent ON breakouts (parent_id, state);
CREATE INDEX breakouts_due ON breakouts (closes_at) WHERE state = 'open' AND closes_at IS NOT NULL;

-- The group rooms of a breakout (rooms of their own; who is in a group is room_members).
CREATE TABLE breakout_groups (
    room_id     TEXT    PRIMARY KEY REFERENCES rooms (id),
    breakout_id TEXT    NOT NULL REFERENCES breakouts (id),
    position    INTEGER NOT NULL,
    title       TEXT    NOT NULL
);
CREATE INDEX breakout_groups_breakout ON breakout_groups (breakout_id, position);

-- A board's Yjs document as one encoded update (v1), written coalesced.
CREATE TABLE boards (
    room_id    TEXT    NOT NULL REFERENCES rooms (id),
    board_id   TEXT    NOT NULL,
    state      BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, board_id)
);

-- Who besides host/ta may draw on a board (board_grant).
CREATE TABLE board_grants (
    room_id  TEXT NOT NULL,
    board_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (room_id, board_id, user_id)
);
