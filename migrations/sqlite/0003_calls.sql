-- Call records (SQLite). Keep in step with the PostgreSQL file of the same version.
CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    caller_id   TEXT   NOT NULL,
    callee_id   TEXT   NOT NULL,
    room_id     TEXT,
    audio       INTEGER NOT NULL,
    video       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at    INTEGER NOT NULL,
    end_reason  TEXT   NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX calls_caller ON calls (caller_id, created_at);
CREATE INDEX calls_callee ON calls (callee_id, created_at);
