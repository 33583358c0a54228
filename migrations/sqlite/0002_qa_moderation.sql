-- Live Q&A, moderation and search (SQLite). Keep in step with the PostgreSQL file of the same
-- version: same tables and columns; only the search index differs (FTS5 here, tsvector there).
ALTER TABLE rooms ADD COLUMN qa_peer_answers INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rooms ADD COLUMN answer_sla_s INTEGER NOT NULL DEFAULT 14400;
ALTER TABLE rooms ADD COLUMN slow_mode_s INTEGER NOT NULL DEFAULT 0;
-- JSON: {"blocked_words": [...], "links": "allow" | "deny" | {"domains": [...]}}
ALTER TABLE rooms ADD COLUMN rules TEXT NOT NULL DEFAULT '{}';

-- Sequenced events seen differently by members: body is what host/ta see, public_body (when
-- not NULL) what everyone else sees (anonymous authors removed, pending questions hidden).
ALTER TABLE events ADD COLUMN public_body TEXT;

CREATE TABLE questions (
    id                TEXT PRIMARY KEY,
    room_id           TEXT   NOT NULL,
    seq               INTEGER NOT NULL,
    author_id         TEXT   NOT NULL,
    author_name       TEXT   NOT NULL,
    author_role       TEXT   NOT NULL,
    anonymous         INTEGER NOT NULL,
    text              TEXT   NOT NULL,
    status            TEXT   NOT NULL,
    votes             INTEGER NOT NULL DEFAULT 0,
    ts                INTEGER NOT NULL,
    first_answer_at   INTEGER,
    overdue_announced INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX questions_room_status ON questions (room_id, status);

CREATE TABLE question_votes (
    question_id TEXT   NOT NULL,
    user_id     TEXT   NOT NULL,
    ts          INTEGER NOT NULL,
    PRIMARY KEY (question_id, user_id)
);

CREATE TABLE answers (
    id          TEXT PRIMARY KEY,
    question_id TEXT   NOT NULL,
    room_id     TEXT   NOT NULL,
    author_id   TEXT   NOT NULL,
    author_name TEXT   NOT NULL,
    author_role TEXT   NOT NULL,
    text        TEXT   NOT NULL,
    ts          INTEGER NOT NULL
);
CREATE INDEX answers_question ON answers (question_id, ts);

CREATE TABLE mutes (
    room_id TEXT   NOT NULL,
    user_id TEXT   NOT NULL,
    until   INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE bans (
    room_id TEXT   NOT NULL,
    user_id TEXT   NOT NULL,
    by_id   TEXT   NOT NULL,
    ts      INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE reports (
    id          TEXT PRIMARY KEY,
    room_id     TEXT   NOT NULL,
    target_kind TEXT   NOT NULL,
    target_id   TEXT   NOT NULL,
    reporter_id TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    ts          INTEGER NOT NULL,
    resolved_at INTEGER,
    resolved_by TEXT,
    resolution  TEXT
);
CREATE INDEX reports_room ON reports (room_id, ts);

CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    room_id   TEXT   NOT NULL,
    actor_id  TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    target    TEXT,
    detail    TEXT,
    ts        INTEGER NOT NULL
);
CREATE INDEX audit_room ON audit (room_id, id);

-- Full-text search over messages and questions: the rows, and an FTS5 index kept in step by
-- triggers (external content).
CREATE TABLE search_docs (
    room_id TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    ref_id  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    text    TEXT    NOT NULL,
    PRIMARY KEY (kind, ref_id)
);
CREATE INDEX search_docs_room ON search_docs (room_id);
CREATE VIRTUAL TABLE search_fts USING fts5(text, content='search_docs', content_rowid='rowid');
CREATE TRIGGER search_docs_ai AFTER INSERT ON search_docs BEGIN
    INSERT INTO search_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER search_docs_ad AFTER DELETE ON search_docs BEGIN
    INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER search_docs_au AFTER UPDATE ON search_docs BEGIN
    INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO search_fts (rowid, text) VALUES (new.rowid, new.text);
END;
