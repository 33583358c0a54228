-- Call records (PostgreSQL). Keep in step with the SQLite file of the same version.
CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    caller_id   TEXT   NOT NULL,
    callee_id   TEXT   NOT NULL,
    room_id     TEXT,
    audio       BIGINT NOT NULL,
    video       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    answered_at BIGINT,
    ended_at    BIGINT NOT NULL,
    end_reason  TEXT   NOT NULL,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX calls_caller ON calls (caller_id, created_at);
CREATE INDEX calls_callee ON calls (callee_id, created_at);
