-- The highest room role each user was seen with when joining a room (host or ta), whatever
-- gave it: a stored membership, a token's grant or the platform admin role. Moderation reads
-- it so that a host or ta offline at the time cannot be muted, kicked or banned. It grants no
-- access: a token's grant is still never stored as a membership.
CREATE TABLE room_ranks (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
