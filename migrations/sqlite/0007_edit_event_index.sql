-- Only edit events are looked up by message (deleting a message erases the text of its edit
-- events): index those alone, so that storing an ordinary message event touches one index
-- fewer. Keep in step with the other backend's file of the same version.
DROP INDEX events_message;
CREATE INDEX events_edits ON events (room_id, message_id) WHERE kind = 'message_edited';
