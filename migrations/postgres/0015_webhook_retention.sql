-- Webhook retention and member events across nodes (PostgreSQL). Keep in step with the SQLite file
-- of the same version.
-- Pruning: finished deliveries by when they finished, deliveries by event (is an event still
-- referred to?), events by age.
CREATE INDEX webhook_deliveries_done ON webhook_deliveries (done_at);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE INDEX webhook_events_ts ON webhook_events (ts);
-- member.joined / member.left once per user and room across the nodes of a cluster. One row
-- per room and user present on some node: its lock orders that user's transitions in that
-- room, so two nodes never both see themselves first (or last).
CREATE TABLE webhook_members (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
-- Which nodes (and which run of each: epoch) have the user in the room ('' is a single node).
-- The user's name and role as the node saw them, for the member.left of a node that dies.
-- Rows of a dead run are deleted by the nodes that outlive it (and by the node itself when it
-- starts again under the same name), with a member.left where it was the user's last.
CREATE TABLE webhook_member_nodes (
    room_id   TEXT    NOT NULL,
    user_id   TEXT    NOT NULL,
    node      TEXT    NOT NULL,
    epoch     BIGINT  NOT NULL,
    user_name TEXT    NOT NULL,
    role      TEXT    NOT NULL,
    since     BIGINT  NOT NULL,
    PRIMARY KEY (room_id, user_id, node, epoch)
);
CREATE INDEX webhook_member_nodes_node ON webhook_member_nodes (node, epoch);
