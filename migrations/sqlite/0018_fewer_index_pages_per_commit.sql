-- Fewer index pages written per stored message (SQLite). Keep in step with the PostgreSQL
-- file of the same version.
--
-- A group commit writes every page it dirtied to the log whole, and an index keyed by room
-- first dirties one page per room the commit wrote to. Two such indexes did not need it:

-- Search rows are found through the full-text index (by rowid) or by (kind, ref_id), never by
-- room alone: SQLite's search plan reads the FTS5 matches and filters them by room, with or
-- without this index, so it only cost every stored message and question an insert.
DROP INDEX search_docs_room;

-- The ledger is looked up by (room, content id), both given. With the content id first, the
-- awards for new content (time-ordered ids) go to the index's last pages, whatever their room.
DROP INDEX points_ledger_ref;
CREATE INDEX points_ledger_ref ON points_ledger (ref_id, room_id);
