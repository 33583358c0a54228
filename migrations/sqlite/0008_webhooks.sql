-- Webhooks (SQLite). Keep in step with the PostgreSQL file of the same version.
-- Endpoints: `events` is the subscribed types between commas (",room.created,message.created,"),
-- so the outbox insert finds subscribers with one LIKE. During a secret rotation the previous
-- secret keeps signing until `old_secret_until` (ms).
CREATE TABLE webhooks (
    id               TEXT PRIMARY KEY,
    url              TEXT    NOT NULL,
    events           TEXT    NOT NULL,
    secret           TEXT    NOT NULL,
    old_secret       TEXT,
    old_secret_until INTEGER,
    disabled         INTEGER NOT NULL DEFAULT 0,
    disabled_reason  TEXT,
    created_at       INTEGER NOT NULL
);
-- The outbox: one row per event, written in the transaction of the change it reports.
CREATE TABLE webhook_events (
    id      TEXT PRIMARY KEY,
    type    TEXT    NOT NULL,
    room_id TEXT,
    ts      INTEGER NOT NULL,
    body    TEXT    NOT NULL
);
-- One row per event and subscribed endpoint (and per replay). `lane` is the room id ('' for
-- events without a room): a lane's deliveries go out one at a time, in id order.
CREATE TABLE webhook_deliveries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    lane       TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    done_at    INTEGER
);
CREATE INDEX webhook_deliveries_lane ON webhook_deliveries (state, webhook_id, lane, id);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries (webhook_id, id);
-- The delivery log: every attempt with its HTTP status or error.
CREATE TABLE webhook_attempts (
    delivery_id INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, at);
