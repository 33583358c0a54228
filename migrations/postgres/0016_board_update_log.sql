-- Whiteboards as an update log plus compacted snapshots (PostgreSQL). Keep in step with the
-- SQLite file of the same version.
-- boards.state is now the compacted snapshot: every update merged into it has left
-- board_updates. `version` counts compactions; a compaction writes its snapshot only if the
-- version is still the one it read, so two compactions never overwrite each other.
ALTER TABLE boards ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
-- Every Yjs update merged into a board, in arrival order, until a compaction folds it into the
-- snapshot and deletes it in the same transaction.
CREATE TABLE board_updates (
    id         BIGSERIAL PRIMARY KEY,
    room_id    TEXT    NOT NULL,
    board_id   TEXT    NOT NULL,
    data       BYTEA   NOT NULL,
    created_at BIGINT  NOT NULL
);
CREATE INDEX board_updates_board ON board_updates (room_id, board_id, id);
