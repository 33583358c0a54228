-- Polls and quizzes, the class lifecycle and attendance (postgres). Keep in step with the SQLite
-- file of the same version: same tables and columns. (0008 is the webhooks migration.)

-- Class lifecycle: class_state is the last state recorded ('scheduled', 'live', 'ended');
-- the clock moves it on at starts_at/ends_at, class_start/class_end by hand. started_at and
-- ended_at are when that happened.
ALTER TABLE rooms ADD COLUMN ends_at BIGINT;
ALTER TABLE rooms ADD COLUMN class_state TEXT NOT NULL DEFAULT 'live';
ALTER TABLE rooms ADD COLUMN started_at BIGINT;
ALTER TABLE rooms ADD COLUMN ended_at BIGINT;
UPDATE rooms SET class_state = 'scheduled' WHERE starts_at > CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT);
CREATE INDEX rooms_scheduled ON rooms (starts_at) WHERE class_state = 'scheduled';
CREATE INDEX rooms_ending ON rooms (ends_at) WHERE class_state <> 'ended' AND ends_at IS NOT NULL;

-- options and correct are JSON arrays; correct is NULL except for quizzes.
CREATE TABLE polls (
    id           TEXT PRIMARY KEY,
    room_id      TEXT   NOT NULL REFERENCES rooms (id),
    seq          BIGINT NOT NULL,
    kind         TEXT   NOT NULL,
    question     TEXT   NOT NULL,
    options      TEXT   NOT NULL,
    multiple     BIGINT NOT NULL,
    correct      TEXT,
    duration_s   BIGINT,
    show_results TEXT   NOT NULL,
    state        TEXT   NOT NULL,
    created_by   TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    opened_at    BIGINT,
    closes_at    BIGINT,
    closed_at    BIGINT
);
CREATE INDEX polls_room ON polls (room_id, created_at);
CREATE INDEX polls_due ON polls (closes_at) WHERE state = 'open' AND closes_at IS NOT NULL;

-- One answer per user and poll, replaced while the poll is open. choices is a JSON array.
CREATE TABLE poll_answers (
    poll_id TEXT   NOT NULL REFERENCES polls (id),
    user_id TEXT   NOT NULL,
    choices TEXT   NOT NULL,
    text    TEXT,
    ts      BIGINT NOT NULL,
    PRIMARY KEY (poll_id, user_id)
);

-- Attendance and time on stage: one row per session in a room (kind 'attend') or per stage
-- spell of a user (kind 'stage', session_id ''); ended_at NULL while it lasts.
CREATE TABLE room_presence (
    room_id    TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    user_name  TEXT   NOT NULL,
    session_id TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at   BIGINT
);
CREATE INDEX room_presence_room ON room_presence (room_id, user_id);
CREATE INDEX room_presence_open ON room_presence (room_id, session_id, kind) WHERE ended_at IS NULL;
