-- Review fixes (SQLite). Keep in step with the PostgreSQL file of the same version.
-- A question hidden from members until approved stays hidden if it is dismissed unapproved.
ALTER TABLE questions ADD COLUMN approved INTEGER NOT NULL DEFAULT 1;
UPDATE questions SET approved = 0 WHERE status = 'pending';
-- Deleting a message rewrites its edit events: find them without scanning the room's log.
CREATE INDEX events_message ON events (room_id, message_id);
-- One report per reporter and target.
CREATE UNIQUE INDEX reports_once ON reports (room_id, target_id, reporter_id);
