-- Fewer index pages written per stored message (PostgreSQL). Keep in step with the SQLite
-- file of the same version.
--
-- The ledger is looked up by (room, content id), both given. With the content id first, the
-- awards for new content (time-ordered ids) go to the index's last pages, whatever their room,
-- instead of one page per room a commit writes to.
DROP INDEX points_ledger_ref;
CREATE INDEX points_ledger_ref ON points_ledger (ref_id, room_id);

-- Unlike SQLite's, PostgreSQL's search may combine its room index (search_docs_room) with the
-- GIN index on the text (a word common across rooms is then read for one room only): it stays.
