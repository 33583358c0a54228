-- Engagement and room health (PostgreSQL). Keep in step with the SQLite file of the same
-- version: same tables and columns.

-- JSON: {"announce_badges": bool, "timezone": "IANA name"}
ALTER TABLE rooms ADD COLUMN engagement TEXT NOT NULL DEFAULT '{}';
-- An answer marked helpful by host/ta or the asker.
ALTER TABLE answers ADD COLUMN helpful BIGINT NOT NULL DEFAULT 0;

-- The zone a user's token last named (claim `tz`): their local day for caps and streaks.
CREATE TABLE user_zones (
    user_id TEXT PRIMARY KEY,
    tz      TEXT NOT NULL
);

-- Every point award and reversal. An award is reversed at most once (reversed = 1) by a
-- row of kind 'reversal' with the negated points.
CREATE TABLE points_ledger (
    id       BIGSERIAL PRIMARY KEY,
    room_id  TEXT    NOT NULL,
    user_id  TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    -- The content the points are for: message, question or answer id, or the check-in day.
    ref_id   TEXT    NOT NULL,
    -- Which reaction (reactor and emoji) for reaction_received, else ''.
    detail   TEXT    NOT NULL DEFAULT '',
    -- The earner's local day (YYYY-MM-DD) of the award.
    day      TEXT    NOT NULL,
    -- The start of the room-local day of the award: the engagement_daily row it counts in.
    bucket   BIGINT NOT NULL,
    points   BIGINT NOT NULL,
    ts       BIGINT NOT NULL,
    reversed BIGINT NOT NULL DEFAULT 0
);
-- Daily caps: how many times an action tried to earn points per user, room and local day
-- (the i-th attempt earns if i <= the cap), one primary-key upsert per batch and key.
CREATE TABLE points_caps (
    room_id TEXT    NOT NULL,
    user_id TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    day     TEXT    NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, action, day)
);
CREATE INDEX points_ledger_ref ON points_ledger (room_id, ref_id);

-- Incremental counters per room, room-local day and user: contributions, points, and the
-- first and last contribution of the day (NULL when the row only holds points received).
CREATE TABLE engagement_daily (
    room_id   TEXT    NOT NULL,
    day_start BIGINT NOT NULL,
    user_id   TEXT    NOT NULL,
    messages  BIGINT NOT NULL DEFAULT 0,
    questions BIGINT NOT NULL DEFAULT 0,
    answers   BIGINT NOT NULL DEFAULT 0,
    reactions BIGINT NOT NULL DEFAULT 0,
    checkins  BIGINT NOT NULL DEFAULT 0,
    points    BIGINT NOT NULL DEFAULT 0,
    first_ts  BIGINT ,
    last_ts   BIGINT ,
    PRIMARY KEY (room_id, day_start, user_id)
);
CREATE INDEX engagement_daily_user ON engagement_daily (room_id, user_id, day_start);

-- Running totals per room and user: points, the badge metrics and the check-in streak.
CREATE TABLE engagement_members (
    room_id            TEXT    NOT NULL,
    user_id            TEXT    NOT NULL,
    name               TEXT    NOT NULL,
    points             BIGINT NOT NULL DEFAULT 0,
    messages           BIGINT NOT NULL DEFAULT 0,
    questions          BIGINT NOT NULL DEFAULT 0,
    answers            BIGINT NOT NULL DEFAULT 0,
    reactions_received BIGINT NOT NULL DEFAULT 0,
    helpful            BIGINT NOT NULL DEFAULT 0,
    checkins           BIGINT NOT NULL DEFAULT 0,
    streak_current     BIGINT NOT NULL DEFAULT 0,
    streak_longest     BIGINT NOT NULL DEFAULT 0,
    last_checkin_day   TEXT,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX engagement_members_points ON engagement_members (room_id, points);
CREATE INDEX engagement_members_user ON engagement_members (user_id);

-- Badges earned: once per user, room and badge.
CREATE TABLE engagement_badges (
    room_id  TEXT    NOT NULL,
    user_id  TEXT    NOT NULL,
    badge_id TEXT    NOT NULL,
    ts       BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, badge_id)
);

-- Room statistics read members by join time and questions by time asked.
CREATE INDEX room_members_added ON room_members (room_id, added_at);
-- (covering: the statistics read only these columns)
CREATE INDEX questions_room_ts ON questions (room_id, ts, first_answer_at, status);
