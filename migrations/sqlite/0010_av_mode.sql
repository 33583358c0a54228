-- A room's A/V mode (sqlite): 'auto' (mesh up to av_mesh_max, the SFU past it), 'mesh' or 'sfu'.
-- Keep in step with the other backend's file of the same version.
ALTER TABLE rooms ADD COLUMN av_mode TEXT NOT NULL DEFAULT 'auto';
