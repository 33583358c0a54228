-- Class lifecycle (sqlite): a room's stage settings (the talk-time cap in seconds, NULL for none,
-- and whether the server brings a speaker down past it) and the breakout timer warning (when
-- a breakout's warning went out, so two nodes send it once). Keep in step with the other
-- backend's file of the same version.
ALTER TABLE rooms ADD COLUMN stage_talk_cap_s INTEGER;
ALTER TABLE rooms ADD COLUMN stage_auto_down INTEGER NOT NULL DEFAULT 0;
ALTER TABLE breakouts ADD COLUMN warned_at INTEGER;
