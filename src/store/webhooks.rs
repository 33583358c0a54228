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
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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

/// What one pruning pass removed (see [`Store::prune_webhooks`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub deliveries: u64,
    pub attempts: u64,
    pub events: u64,
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

/// The subscribed types of every enabled endpoint, one bit per [`EventType`]; and what the
/// member events of this store's run need (see [`Store::member_entered`]).
pub(super) struct Subscribed {
    mask: AtomicU32,
    /// This run has written `webhook_member_nodes` rows (so leaving deletes them even after
    /// the last member subscription went).
    members_tracked: AtomicBool,
    /// This run of a single node (random per store opened), its `epoch` in member rows.
    run: i64,
}

impl Default for Subscribed {
    fn default() -> Self {
        Self {
            mask: AtomicU32::new(0),
            members_tracked: AtomicBool::new(false),
            // Positive, so it never meets a cluster node's epoch cast from u64 by chance.
            run: rand::random::<i64>().saturating_abs(),
        }
    }
}

impl Subscribed {
    pub(super) fn has(&self, t: EventType) -> bool {
        self.mask.load(Ordering::Relaxed) & t.bit() != 0
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

/// Which runs of a node [`Store::members_forget_node`] forgets.
#[derive(Clone, Copy, Debug)]
pub enum MemberRuns {
    /// One run (a node that died or left).
    One(i64),
    /// Every run but this one (the node itself, starting again under its name).
    AllBut(i64),
}

/// Tries of [`lock_member`] when the row it locks keeps going away under it.
const MEMBER_LOCK_TRIES: usize = 8;

/// Takes the lock of the user's `webhook_members` row in the room (held to commit), making
/// the row when there is none. A row deleted between the insert and the lock (its last node
/// left meanwhile) is made again.
async fn lock_member(tx: &mut Tx<'_>, room: &RoomId, user: &crate::protocol::UserId) -> Result<()> {
    for _ in 0..MEMBER_LOCK_TRIES {
        sqlx::query(
            "INSERT INTO webhook_members (room_id, user_id) VALUES ($1, $2) \
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(&mut **tx)
        .await?;
        let locked = sqlx::query(
            "UPDATE webhook_members SET user_id = user_id WHERE room_id = $1 AND user_id = $2",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if locked > 0 {
            return Ok(());
        }
    }
    Err(StoreError::Conflict(
        "webhook member row kept going away".into(),
    ))
}

/// How many node runs have the user in the room (under the user's member lock).
async fn member_nodes(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: &crate::protocol::UserId,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_member_nodes WHERE room_id = $1 AND user_id = $2",
    )
    .bind(room.as_str())
    .bind(user.as_str())
    .fetch_one(&mut **tx)
    .await?)
}

/// Deletes a node run's row of the user in the room, under the user's member lock; when it
/// deleted one and no other node has the user there, drops the member row and queues
/// `member.left` with `reason`. Returns whether a delivery was queued.
async fn forget_member(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: crate::protocol::UserRef,
    node: &str,
    epoch: i64,
    reason: &'static str,
) -> Result<bool> {
    lock_member(tx, room, &user.id).await?;
    let deleted = sqlx::query(
        "DELETE FROM webhook_member_nodes WHERE room_id = $1 AND user_id = $2 AND node = $3 \
         AND epoch = $4",
    )
    .bind(room.as_str())
    .bind(user.id.as_str())
    .bind(node)
    .bind(epoch)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if member_nodes(tx, room, &user.id).await? > 0 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM webhook_members WHERE room_id = $1 AND user_id = $2")
        .bind(room.as_str())
        .bind(user.id.as_str())
        .execute(&mut **tx)
        .await?;
    if deleted == 0 {
        return Ok(false);
    }
    enqueue(
        tx,
        member_outgoing(EventType::MemberLeft, room, user, Some(reason))?,
    )
    .await
}

/// A `member.*` event for the outbox: data `{"user", "reason"?}`.
fn member_outgoing<'a>(
    kind: EventType,
    room: &'a RoomId,
    user: crate::protocol::UserRef,
    reason: Option<&'static str>,
) -> Result<Outgoing<'a>> {
    #[derive(Serialize)]
    struct Member {
        user: crate::protocol::UserRef,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    }
    let data = serde_json::to_value(Member { user, reason })
        .map_err(|e| StoreError::Corrupt(format!("member event: {e}")))?;
    Ok(Outgoing {
        kind,
        room: Some(room),
        seq: None,
        ts: now_ms(),
        data,
    })
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

    /// Queues a `kind` event whose data is `value`, inside `tx`, when some endpoint subscribes
    /// to `kind`; returns whether a delivery was queued (notify the sender after commit).
    /// `what` names the value in the error should it not serialise.
    pub(super) async fn enqueue_value<T: Serialize>(
        &self,
        tx: &mut Tx<'_>,
        kind: EventType,
        room: Option<&RoomId>,
        ts: i64,
        value: &T,
        what: impl FnOnce() -> String,
    ) -> Result<bool> {
        if !self.webhooks_want(kind) {
            return Ok(false);
        }
        let data = serde_json::to_value(value)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?;
        let ev = Outgoing {
            kind,
            room,
            seq: None,
            ts,
            data,
        };
        enqueue(tx, ev).await
    }

    /// Commits `tx` and then, when it `queued` deliveries, wakes the sender.
    pub(super) async fn commit_and_wake(&self, tx: Tx<'_>, queued: bool) -> Result<()> {
        tx.commit().await?;
        if queued {
            self.inner.outbox.notify_one();
        }
        Ok(())
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
        self.inner.subscribed.mask.store(mask, Ordering::Relaxed);
        Ok(())
    }

    /// The epoch of a single node's member rows: random per store opened (per run).
    pub fn member_run(&self) -> i64 {
        self.inner.subscribed.run
    }

    /// Whether member rows are kept: some endpoint subscribes to `member.*`.
    fn members_wanted(&self) -> bool {
        self.webhooks_want(EventType::MemberJoined) || self.webhooks_want(EventType::MemberLeft)
    }

    /// The user's first session on this node (`node`, '' for a single node, in its run
    /// `epoch`) entered the room: records that the node has the user there and, when no
    /// other node has, queues `member.joined`. Decided under the lock of the user's
    /// `webhook_members` row, so across the nodes of a cluster one transition makes one
    /// event. Nothing is written while no endpoint subscribes to `member.*`.
    pub async fn member_entered(
        &self,
        room: &RoomId,
        user: crate::protocol::UserRef,
        node: &str,
        epoch: i64,
    ) -> Result<()> {
        if !self.members_wanted() {
            return Ok(());
        }
        self.inner
            .subscribed
            .members_tracked
            .store(true, Ordering::Relaxed);
        let mut tx = self.begin_write().await?;
        lock_member(&mut tx, room, &user.id).await?;
        let inserted = sqlx::query(
            "INSERT INTO webhook_member_nodes (room_id, user_id, node, epoch, user_name, role, \
             since) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (room_id, user_id, node, epoch) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.id.as_str())
        .bind(node)
        .bind(epoch)
        .bind(user.name.as_str())
        .bind(user.role.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let present = member_nodes(&mut tx, room, &user.id).await?;
        let queued = if inserted > 0 && present == 1 {
            enqueue(
                &mut tx,
                member_outgoing(EventType::MemberJoined, room, user, None)?,
            )
            .await?
        } else {
            false
        };
        self.commit_and_wake(tx, queued).await?;
        Ok(())
    }

    /// The user's last session on this node left the room (`reason` `leave`, or `disconnect`
    /// when the session ended or timed out while in the room): forgets this node's row and,
    /// when it was the last node that had the user there, queues `member.left`. A user who
    /// entered before any endpoint subscribed to `member.*` has no row, and gets no
    /// `member.left` for that stay (nor had a `member.joined`).
    pub async fn member_exited(
        &self,
        room: &RoomId,
        user: crate::protocol::UserRef,
        node: &str,
        epoch: i64,
        reason: &'static str,
    ) -> Result<()> {
        if !self.members_wanted()
            && !self
                .inner
                .subscribed
                .members_tracked
                .load(Ordering::Relaxed)
        {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let queued = forget_member(&mut tx, room, user, node, epoch, reason).await?;
        self.commit_and_wake(tx, queued).await?;
        Ok(())
    }

    /// A run of a node is gone (it died, or starts again): its member rows go, each with a
    /// `member.left` (`disconnect`) where it was the last node that had the user in the room.
    /// `runs` picks one run, or every run but the current one. Every node that sees a node go
    /// may call it: a row goes once, and only the call that deleted it queues the event.
    /// Returns how many `member.left` were queued.
    pub async fn members_forget_node(&self, node: &str, runs: MemberRuns) -> Result<u64> {
        let (sql, epoch) = match runs {
            MemberRuns::One(e) => ("epoch = $2", e),
            MemberRuns::AllBut(e) => ("epoch <> $2", e),
        };
        // Only a fixed condition is formatted in; every value is bound.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT room_id, user_id, user_name, role, epoch FROM webhook_member_nodes \
             WHERE node = $1 AND {sql}"
        )))
        .bind(node)
        .bind(epoch)
        .fetch_all(self.pool())
        .await?;
        let mut left = 0;
        for r in &rows {
            let room = RoomId(r.try_get("room_id")?);
            let user = crate::protocol::UserRef {
                id: crate::protocol::UserId(r.try_get("user_id")?),
                name: r.try_get("user_name")?,
                role: crate::protocol::ShownRole::parse(r.try_get("role")?).unwrap_or_default(),
            };
            let run: i64 = r.try_get("epoch")?;
            let mut tx = self.begin_write().await?;
            let queued = forget_member(&mut tx, &room, user, node, run, "disconnect").await?;
            self.commit_and_wake(tx, queued).await?;
            left += u64::from(queued);
        }
        Ok(left)
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
             WHERE d.webhook_id = $1 ORDER BY d.id DESC LIMIT CAST($2 AS BIGINT)",
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
    /// already has; the event keeps its id. `None` when there is no such delivery (or it was
    /// pruned, see [`Store::prune_webhooks`]).
    pub async fn replay_delivery(&self, webhook: &str, delivery: i64) -> Result<Option<i64>> {
        let now = now_ms();
        // The event must still be there, and stay: on PostgreSQL its row is share-locked, so
        // a pruning pass that took it first makes this find nothing, and one that comes after
        // sees the new delivery (see `prune_events`). SQLite runs one writer at a time.
        let lock = match self.backend() {
            super::Backend::Postgres => " FOR SHARE OF e",
            super::Backend::Sqlite => "",
        };
        let sql = format!(
            "INSERT INTO webhook_deliveries (webhook_id, event_id, lane, state, attempts, \
             next_at, created_at) SELECT d.webhook_id, d.event_id, d.lane, 'pending', 0, $3, $3 \
             FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
             WHERE d.id = $1 AND d.webhook_id = $2{lock} RETURNING id"
        );
        // Only a fixed locking clause is formatted in; every value is bound.
        let id: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
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
             AND d2.webhook_id = d.webhook_id AND d2.lane = d.lane) ORDER BY d.id \
             LIMIT CAST($2 AS BIGINT)",
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

    /// Removes what the delivery log no longer needs to keep, in transactions of at most
    /// `batch` rows each (so a large backlog never holds a long transaction): deliveries
    /// finished (delivered or given up) before `cutoff` (ms) with their attempts; deliveries
    /// of an endpoint that is disabled or gone, created before `cutoff`, whatever their state
    /// (they can never be sent); then outbox events older than `cutoff` that no delivery
    /// refers to any more. A pending delivery of an enabled endpoint, and the event it needs,
    /// are never removed.
    pub async fn prune_webhooks(&self, cutoff: i64, batch: usize) -> Result<Pruned> {
        let batch = batch.max(1);
        let mut pruned = Pruned::default();
        loop {
            let (deliveries, attempts) = self.prune_deliveries(cutoff, batch).await?;
            pruned.deliveries += deliveries;
            pruned.attempts += attempts;
            if deliveries < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        loop {
            let events = self.prune_events(cutoff, batch).await?;
            pruned.events += events;
            if events < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok(pruned)
    }

    /// One batch of [`Store::prune_webhooks`]'s deliveries: how many went, and their attempts.
    async fn prune_deliveries(&self, cutoff: i64, batch: usize) -> Result<(u64, u64)> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT d.id FROM webhook_deliveries d \
             WHERE (d.state <> 'pending' AND d.done_at < $1) \
             OR (d.created_at < $1 AND NOT EXISTS \
             (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id AND w.disabled = 0)) \
             ORDER BY d.id LIMIT CAST($2 AS BIGINT)",
        )
        .bind(cutoff)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let list = super::placeholders(ids.len(), 1);
        // Only numbered placeholders are formatted in; every value is bound.
        let mut attempts = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM webhook_attempts WHERE delivery_id IN ({list})"
        )));
        let mut deliveries = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM webhook_deliveries WHERE id IN ({list})"
        )));
        for id in &ids {
            attempts = attempts.bind(*id);
            deliveries = deliveries.bind(*id);
        }
        let a = attempts.execute(&mut *tx).await?.rows_affected();
        let d = deliveries.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok((d, a))
    }

    /// One batch of [`Store::prune_webhooks`]'s events: how many went. On PostgreSQL the
    /// candidates are locked first (skipping any a replay holds) and checked again after, so
    /// a replay that queued a delivery of one meanwhile keeps it.
    async fn prune_events(&self, cutoff: i64, batch: usize) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let lock = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        // Only a fixed locking clause is formatted in; every value is bound.
        let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT e.id FROM webhook_events e WHERE e.ts < $1 AND NOT EXISTS \
             (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id) \
             ORDER BY e.ts LIMIT CAST($2 AS BIGINT){lock}"
        )))
        .bind(cutoff)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let list = super::placeholders(ids.len(), 1);
        // Only numbered placeholders are formatted in; every value is bound.
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM webhook_events WHERE id IN ({list}) AND NOT EXISTS \
             (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = webhook_events.id)"
        )));
        for id in &ids {
            q = q.bind(id.as_str());
        }
        let n = q.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
