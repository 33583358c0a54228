//! Webhooks in the store: the endpoints (url, subscribed types, signing secrets), the outbox
//! (`webhook_events`, written inside the transaction of the change each event reports), one
//! delivery row per event and subscribed endpoint, and the delivery log (every attempt).
//! It also keeps the in-memory set of subscribed types, so that a write no endpoint listens
//! to costs one atomic load. It knows nothing of HTTP, signatures or retry schedules: the
//! sender in `crate::webhooks` reads due deliveries from here and reports each attempt back.

use super::writer::Tx;
use super::{Result, Store, StoreError, now_ms};
use crate::protocol::RoomId;
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::sync::atomic::{AtomicU32, Ordering};

/// The event types an endpoint may subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    RoomCreated,
    RoomArchived,
    MemberJoined,
    MemberLeft,
    MessageCreated,
    QuestionAsked,
    QuestionAnswered,
    ReportCreated,
    CallEnded,
    PollClosed,
    ClassStarted,
    ClassEnded,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
        Self::RoomCreated,
        Self::RoomArchived,
        Self::MemberJoined,
        Self::MemberLeft,
        Self::MessageCreated,
        Self::QuestionAsked,
        Self::QuestionAnswered,
        Self::ReportCreated,
        Self::CallEnded,
        Self::PollClosed,
        Self::ClassStarted,
        Self::ClassEnded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoomCreated => "room.created",
            Self::RoomArchived => "room.archived",
            Self::MemberJoined => "member.joined",
            Self::MemberLeft => "member.left",
            Self::MessageCreated => "message.created",
            Self::QuestionAsked => "question.asked",
            Self::QuestionAnswered => "question.answered",
            Self::ReportCreated => "report.created",
            Self::CallEnded => "call.ended",
            Self::PollClosed => "poll.closed",
            Self::ClassStarted => "class.started",
            Self::ClassEnded => "class.ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// An endpoint as the API lists it (the secret is shown only when created or rotated).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub disabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    pub created_at: i64,
}

/// An endpoint with what signs its deliveries: the current secret, and the previous one
/// while a rotation's grace period lasts.
#[derive(Clone, Debug)]
pub struct WebhookKeys {
    pub secret: String,
    pub old_secret: Option<String>,
    pub old_secret_until: Option<i64>,
}

/// One attempt of a delivery, as the delivery log shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attempt {
    pub at: i64,
    pub duration_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A delivery as the log lists it: which event, its state (`pending`, `delivered`,
/// `failed`), when it is next tried, and every attempt so far.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Delivery {
    pub id: i64,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_at: Option<i64>,
    pub created_at: i64,
    pub attempts: Vec<Attempt>,
}

/// A delivery that is due: the first pending one of its lane, with what the sender needs.
#[derive(Clone, Debug)]
pub struct DueDelivery {
    pub id: i64,
    pub webhook_id: String,
    pub event_id: String,
    pub attempts: i64,
    /// When it was due, as read (see [`Store::claim_delivery`]).
    pub next_at: i64,
    pub url: String,
    pub keys: WebhookKeys,
    pub body: String,
}

/// What became of one attempt.
#[derive(Clone, Debug)]
pub enum AttemptResult {
    /// 2xx: done.
    Delivered,
    /// Failed; try again at this time (ms).
    Retry { next_at: i64 },
    /// Failed for the last time.
    GiveUp,
    /// 410 Gone: the endpoint is disabled and its pending deliveries given up.
    Gone,
}

/// The body POSTed to endpoints: `{"id","type","ts","room"?,"seq"?,"data"}`.
#[derive(Serialize)]
struct Payload<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a RoomId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    data: &'a serde_json::Value,
}

/// An event to put in the outbox.
pub(crate) struct Outgoing<'a> {
    pub kind: EventType,
    pub room: Option<&'a RoomId>,
    pub seq: Option<i64>,
    pub ts: i64,
    pub data: serde_json::Value,
}

/// The subscribed types of every enabled endpoint, one bit per [`EventType`].
#[derive(Default)]
pub(super) struct Subscribed(AtomicU32);

impl Subscribed {
    pub(super) fn has(&self, t: EventType) -> bool {
        self.0.load(Ordering::Relaxed) & t.bit() != 0
    }
}

/// Writes one event to the outbox and a pending delivery for each enabled endpoint that
/// subscribes to its type, inside `tx`. Returns whether any delivery was queued.
pub(super) async fn enqueue(tx: &mut Tx<'_>, ev: Outgoing<'_>) -> Result<bool> {
    let id = format!("evt_{}", super::writer::new_id('e'));
    let body = serde_json::to_string(&Payload {
        id: &id,
        kind: ev.kind.as_str(),
        ts: ev.ts,
        room: ev.room,
        seq: ev.seq,
        data: &ev.data,
    })
    .map_err(|e| StoreError::Corrupt(format!("webhook payload: {e}")))?;
    let now = now_ms();
    let queued = sqlx::query(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, lane, state, attempts, next_at, \
         created_at) SELECT id, $1, $2, 'pending', 0, $3, $3 FROM webhooks \
         WHERE disabled = 0 AND events LIKE $4",
    )
    .bind(id.as_str())
    .bind(ev.room.map_or("", RoomId::as_str))
    .bind(now)
    .bind(format!("%,{},%", ev.kind.as_str()))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if queued == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO webhook_events (id, type, room_id, ts, body) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.as_str())
    .bind(ev.kind.as_str())
    .bind(ev.room.map(RoomId::as_str))
    .bind(ev.ts)
    .bind(body)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// The `data` of an event built from a stored room event's wire JSON: its fields without
/// `type`, `room` and `seq` (those are the payload's own).
pub(crate) fn data_of_event(json: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.remove("type");
        map.remove("room");
        map.remove("seq");
    }
    v
}

fn webhook_from_row(row: &AnyRow) -> Result<Webhook> {
    let events: String = row.try_get("events")?;
    Ok(Webhook {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        events: events
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        disabled: row.try_get::<i64, _>("disabled")? != 0,
        disabled_reason: row.try_get("disabled_reason")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Whether some enabled endpoint subscribes to `t` (as of the last refresh).
    pub(crate) fn webhooks_want(&self, t: EventType) -> bool {
        self.inner.subscribed.has(t)
    }

    /// Wakes the sender when a commit queued deliveries.
    pub fn outbox_notify(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.inner.outbox.clone()
    }

    /// Reloads the set of subscribed types from the endpoints table (called after every
    /// endpoint change here, and by the sender periodically, for changes made on other nodes).
    pub async fn refresh_webhook_subscriptions(&self) -> Result<()> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT events FROM webhooks WHERE disabled = 0")
                .fetch_all(self.pool())
                .await?;
        let mut mask = 0u32;
        for events in &rows {
            for t in events.split(',').filter_map(EventType::parse) {
                mask |= t.bit();
            }
        }
        self.inner.subscribed.0.store(mask, Ordering::Relaxed);
        Ok(())
    }

    /// Records an event that is not part of another change (a user entering or leaving a
    /// room), in a transaction of its own; nothing is written when no endpoint subscribes.
    pub async fn webhook_event(
        &self,
        kind: EventType,
        room: Option<&RoomId>,
        data: serde_json::Value,
    ) -> Result<()> {
        if !self.webhooks_want(kind) {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        let queued = enqueue(
            &mut tx,
            Outgoing {
                kind,
                room,
                seq: None,
                ts: now_ms(),
                data,
            },
        )
        .await?;
        tx.commit().await?;
        if queued {
            self.inner.outbox.notify_one();
        }
        Ok(())
    }

    /// `member.joined` / `member.left`: a user's first session entered the room, or their
    /// last one left it (`reason` `leave`, or `disconnect` when the session ended or timed
    /// out while in the room). Nothing is written when no endpoint subscribes.
    pub async fn member_event(
        &self,
        kind: EventType,
        room: &RoomId,
        user: crate::protocol::UserRef,
        reason: Option<&'static str>,
    ) -> Result<()> {
        if !self.webhooks_want(kind) {
            return Ok(());
        }
        #[derive(Serialize)]
        struct Member {
            user: crate::protocol::UserRef,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'static str>,
        }
        let data = serde_json::to_value(Member { user, reason })
            .map_err(|e| StoreError::Corrupt(format!("member event: {e}")))?;
        self.webhook_event(kind, Some(room), data).await
    }

    pub async fn webhook_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM webhooks")
            .fetch_one(self.pool())
            .await?)
    }

    pub async fn create_webhook(
        &self,
        id: &str,
        url: &str,
        events: &[EventType],
        secret: &str,
    ) -> Result<Webhook> {
        let list: String = events.iter().fold(",".into(), |mut acc, t| {
            acc.push_str(t.as_str());
            acc.push(',');
            acc
        });
        sqlx::query(
            "INSERT INTO webhooks (id, url, events, secret, disabled, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(id)
        .bind(url)
        .bind(list)
        .bind(secret)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        self.refresh_webhook_subscriptions().await?;
        self.webhook(id)
            .await?
            .ok_or(StoreError::NotFound("webhook"))
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>> {
        let row = sqlx::query(
            "SELECT id, url, events, disabled, disabled_reason, created_at FROM webhooks \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>> {
        let rows = sqlx::query(
            "SELECT id, url, events, disabled, disabled_reason, created_at FROM webhooks \
             ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    /// Deletes an endpoint with its deliveries and their log.
    pub async fn delete_webhook(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        let gone = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT id FROM webhook_deliveries WHERE webhook_id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.refresh_webhook_subscriptions().await?;
        Ok(gone > 0)
    }

    /// Replaces the secret; the previous one keeps signing until `old_until` (ms).
    pub async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        old_until: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE webhooks SET old_secret = secret, old_secret_until = $2, secret = $3 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(old_until)
        .bind(secret)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// The endpoint's deliveries, newest first, at most `limit`, each with its attempts.
    pub async fn webhook_deliveries(&self, id: &str, limit: usize) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "SELECT d.id, d.event_id, e.type, e.room_id, d.state, d.next_at, d.created_at \
             FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
             WHERE d.webhook_id = $1 ORDER BY d.id DESC LIMIT $2",
        )
        .bind(id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let state: String = r.try_get("state")?;
            let delivery_id: i64 = r.try_get("id")?;
            let attempts = sqlx::query(
                "SELECT at, duration_ms, status, error FROM webhook_attempts \
                 WHERE delivery_id = $1 ORDER BY at",
            )
            .bind(delivery_id)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|a| {
                Ok(Attempt {
                    at: a.try_get("at")?,
                    duration_ms: a.try_get("duration_ms")?,
                    status: a.try_get("status")?,
                    error: a.try_get("error")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
            out.push(Delivery {
                id: delivery_id,
                event_id: r.try_get("event_id")?,
                kind: r.try_get("type")?,
                room: r.try_get("room_id")?,
                next_at: (state == "pending")
                    .then(|| r.try_get("next_at"))
                    .transpose()?,
                state,
                created_at: r.try_get("created_at")?,
                attempts,
            });
        }
        Ok(out)
    }

    /// Queues the event of a delivery again for the same endpoint, behind what its lane
    /// already has; the event keeps its id. `None` when there is no such delivery.
    pub async fn replay_delivery(&self, webhook: &str, delivery: i64) -> Result<Option<i64>> {
        let now = now_ms();
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO webhook_deliveries (webhook_id, event_id, lane, state, attempts, \
             next_at, created_at) SELECT webhook_id, event_id, lane, 'pending', 0, $3, $3 \
             FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2 RETURNING id",
        )
        .bind(delivery)
        .bind(webhook)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        if id.is_some() {
            self.inner.outbox.notify_one();
        }
        Ok(id)
    }

    /// Due deliveries: the first pending delivery of each lane (endpoint and room), if its
    /// time has come and its endpoint is enabled, oldest first, at most `limit`.
    pub async fn due_deliveries(&self, now: i64, limit: usize) -> Result<Vec<DueDelivery>> {
        let rows = sqlx::query(
            "SELECT d.id, d.webhook_id, d.event_id, d.attempts, d.next_at, w.url, w.secret, w.old_secret, \
             w.old_secret_until, e.body FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id JOIN webhook_events e ON e.id = d.event_id \
             WHERE d.state = 'pending' AND d.next_at <= $1 AND w.disabled = 0 \
             AND d.id = (SELECT MIN(d2.id) FROM webhook_deliveries d2 WHERE d2.state = 'pending' \
             AND d2.webhook_id = d.webhook_id AND d2.lane = d.lane) ORDER BY d.id LIMIT $2",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DueDelivery {
                    id: r.try_get("id")?,
                    webhook_id: r.try_get("webhook_id")?,
                    event_id: r.try_get("event_id")?,
                    attempts: r.try_get("attempts")?,
                    next_at: r.try_get("next_at")?,
                    url: r.try_get("url")?,
                    keys: WebhookKeys {
                        secret: r.try_get("secret")?,
                        old_secret: r.try_get("old_secret")?,
                        old_secret_until: r.try_get("old_secret_until")?,
                    },
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    /// Takes a due delivery for one attempt: moves its time to `lease_until`, only if no one
    /// (another node's sender) took it since it was read. A sender that dies mid-attempt
    /// leaves it to be tried again at `lease_until`.
    pub async fn claim_delivery(&self, d: &DueDelivery, lease_until: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET next_at = $3 \
             WHERE id = $1 AND state = 'pending' AND next_at = $2",
        )
        .bind(d.id)
        .bind(d.next_at)
        .bind(lease_until)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// Logs one attempt of a delivery and moves the delivery on as `result` says.
    pub async fn record_attempt(
        &self,
        d: &DueDelivery,
        attempt: &Attempt,
        result: &AttemptResult,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, at, duration_ms, status, error) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(d.id)
        .bind(attempt.at)
        .bind(attempt.duration_ms)
        .bind(attempt.status)
        .bind(attempt.error.as_deref())
        .execute(&mut *tx)
        .await?;
        let now = now_ms();
        let (state, next_at) = match result {
            AttemptResult::Delivered => ("delivered", now),
            AttemptResult::Retry { next_at } => ("pending", *next_at),
            AttemptResult::GiveUp | AttemptResult::Gone => ("failed", now),
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $2, next_at = $3, \
             done_at = CASE WHEN $2 = 'pending' THEN NULL ELSE $4 END WHERE id = $1",
        )
        .bind(d.id)
        .bind(state)
        .bind(next_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let gone = matches!(result, AttemptResult::Gone);
        if gone {
            sqlx::query("UPDATE webhooks SET disabled = 1, disabled_reason = $2 WHERE id = $1")
                .bind(d.webhook_id.as_str())
                .bind("the endpoint answered 410 Gone")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE webhook_deliveries SET state = 'failed', done_at = $2 \
                 WHERE webhook_id = $1 AND state = 'pending'",
            )
            .bind(d.webhook_id.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if gone {
            self.refresh_webhook_subscriptions().await?;
        }
        Ok(())
    }
}
