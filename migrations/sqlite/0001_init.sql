-- studyhall schema v1 (SQLite). Keep in step with migrations/postgres/0001_init.sql:
-- same tables, same columns, same version numbers. Flags are INTEGER 0/1 so that one Store
-- implementation reads both backends the same way.
CREATE TABLE rooms (
    id           TEXT PRIMARY KEY,
    kind         TEXT   NOT NULL,
    title        TEXT   NOT NULL,
    visibility   TEXT   NOT NULL,
    qa_enabled   INTEGER NOT NULL DEFAULT 0,
    qa_moderated INTEGER NOT NULL DEFAULT 0,
    starts_at    INTEGER,
    archived     INTEGER NOT NULL DEFAULT 0,
    -- The room's sequence counter: bumped inside the transaction that stores each event, so
    -- the row lock serialises writers of one room across processes and a rollback leaves no gap.
    last_seq     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
);

CREATE TABLE room_members (
    room_id  TEXT   NOT NULL REFERENCES rooms (id),
    user_id  TEXT   NOT NULL,
    role     TEXT   NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

-- The room event log: body is the event's wire JSON, sent as is on replay and history.
CREATE TABLE events (
    room_id    TEXT   NOT NULL,
    seq        INTEGER NOT NULL,
    ts         INTEGER NOT NULL,
    kind       TEXT   NOT NULL,
    message_id TEXT,
    body       TEXT   NOT NULL,
    PRIMARY KEY (room_id, seq)
);

CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    room_id       TEXT   NOT NULL,
    seq           INTEGER NOT NULL,
    sender_id     TEXT   NOT NULL,
    client_msg_id TEXT,
    ts            INTEGER NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0
);
-- Idempotent send: one message per (room, sender, client_msg_id).
CREATE UNIQUE INDEX messages_idempotency ON messages (room_id, sender_id, client_msg_id);
CREATE INDEX messages_room_seq ON messages (room_id, seq);

CREATE TABLE reactions (
    message_id TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    emoji      TEXT   NOT NULL,
    ts         INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);
CREATE INDEX reactions_message_emoji ON reactions (message_id, emoji);

CREATE TABLE read_markers (
    room_id TEXT   NOT NULL,
    user_id TEXT   NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
