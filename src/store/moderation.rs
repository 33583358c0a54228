//! Moderation state in the store: mutes and bans (persisted, so they survive restarts),
//! the per-room report queue, and the audit log of every moderation action. Plain reads and
//! writes; rights are checked by the callers.

use super::{Result, Store, StoreError, now_ms, writer::new_id};
pub use crate::protocol::views::Report;
use crate::protocol::views::{ReportTarget, UserBrief};
use crate::protocol::{RoomEvent, RoomId, RoomRole, SequencedEvent, UserId};
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// Longest report reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Most audit entries one page returns.
const MAX_AUDIT_PAGE: i64 = 500;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub room: RoomId,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: Option<String>,
    pub ts: i64,
}

fn report_from_row(r: &sqlx::any::AnyRow) -> Result<Report> {
    Ok(Report {
        id: r.try_get("id")?,
        room: RoomId(r.try_get("room_id")?),
        target_kind: r.try_get("target_kind")?,
        target_id: r.try_get("target_id")?,
        reporter: UserId(r.try_get("reporter_id")?),
        reason: r.try_get("reason")?,
        ts: r.try_get("ts")?,
        resolved_at: r.try_get("resolved_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolution: r.try_get("resolution")?,
    })
}

impl Store {
    pub async fn set_mute(&self, room: &RoomId, user: &UserId, until: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO mutes (room_id, user_id, until) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET until = excluded.until",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(until)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn clear_mute(&self, room: &RoomId, user: &UserId) -> Result<bool> {
        let res = sqlx::query("DELETE FROM mutes WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(self.pool())
            .await?;
        Ok(res.rows_affected() > 0)
    }

    /// Remembers that `user` joined `room` as host or ta (see migration `0011_room_ranks`).
    pub async fn remember_rank(&self, room: &RoomId, user: &UserId, role: RoomRole) -> Result<()> {
        sqlx::query(
            "INSERT INTO room_ranks (room_id, user_id, role, seen_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role, seen_at = excluded.seen_at",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(role.as_str())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets a remembered rank (the platform set the user's role in the room through the API,
    /// which is the authority from then on).
    pub async fn forget_rank(&self, room: &RoomId, user: &UserId) -> Result<()> {
        sqlx::query("DELETE FROM room_ranks WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The role `user` was last seen joining `room` with, when it was host or ta.
    pub async fn remembered_rank(&self, room: &RoomId, user: &UserId) -> Result<Option<RoomRole>> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM room_ranks WHERE room_id = $1 AND user_id = $2")
                .bind(room.as_str())
                .bind(user.as_str())
                .fetch_optional(self.pool())
                .await?;
        Ok(role.as_deref().and_then(RoomRole::parse))
    }

    pub async fn ban(&self, room: &RoomId, user: &UserId, by: &UserId) -> Result<()> {
        sqlx::query(
            "INSERT INTO bans (room_id, user_id, by_id, ts) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(by.as_str())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn unban(&self, room: &RoomId, user: &UserId) -> Result<bool> {
        let res = sqlx::query("DELETE FROM bans WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(self.pool())
            .await?;
        Ok(res.rows_affected() > 0)
    }

    pub async fn is_banned(&self, room: &RoomId, user: &UserId) -> Result<bool> {
        let hit: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM bans WHERE room_id = $1 AND user_id = $2")
                .bind(room.as_str())
                .bind(user.as_str())
                .fetch_optional(self.pool())
                .await?;
        Ok(hit.is_some())
    }

    /// Files a report on a message or question of the room.
    pub async fn add_report(
        &self,
        room: &RoomId,
        target_id: &str,
        reporter: &UserId,
        reason: &str,
    ) -> Result<Report> {
        let is_message: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM messages WHERE id = $1 AND room_id = $2 AND deleted = 0",
        )
        .bind(target_id)
        .bind(room.as_str())
        .fetch_optional(self.pool())
        .await?;
        let kind = if is_message.is_some() {
            "message"
        } else {
            let is_question: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM questions WHERE id = $1 AND room_id = $2 AND status <> 'pending' AND approved = 1",
            )
            .bind(target_id)
            .bind(room.as_str())
            .fetch_optional(self.pool())
            .await?;
            if is_question.is_none() {
                return Err(StoreError::NotFound("message or question"));
            }
            "question"
        };
        let report = Report {
            id: new_id('r'),
            room: room.clone(),
            target_kind: kind.into(),
            target_id: target_id.into(),
            reporter: reporter.clone(),
            reason: reason.into(),
            ts: now_ms(),
            resolved_at: None,
            resolved_by: None,
            resolution: None,
        };
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO reports (id, room_id, target_kind, target_id, reporter_id, reason, ts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (room_id, target_id, reporter_id) DO NOTHING",
        )
        .bind(report.id.as_str())
        .bind(room.as_str())
        .bind(kind)
        .bind(target_id)
        .bind(reporter.as_str())
        .bind(reason)
        .bind(report.ts)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict("you already reported this".into()));
        }
        let kind = super::EventType::ReportCreated;
        let what = || "report".to_owned();
        let queued = self
            .enqueue_value(&mut tx, kind, Some(room), report.ts, &report, what)
            .await?;
        self.commit_and_wake(tx, queued).await?;
        Ok(report)
    }

    /// The room's reports, oldest first; only open ones unless `all`.
    pub async fn reports(&self, room: &RoomId, all: bool) -> Result<Vec<Report>> {
        let rows = sqlx::query(
            "SELECT id, room_id, target_kind, target_id, reporter_id, reason, ts, resolved_at, resolved_by, \
             resolution FROM reports WHERE room_id = $1 AND ($2 = 1 OR resolved_at IS NULL) ORDER BY ts, id LIMIT 1000",
        )
        .bind(room.as_str())
        .bind(i64::from(all))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(report_from_row).collect()
    }

    /// What a report points at: a message's current text and sender (`None` once deleted or
    /// gone), or a question's text and asker.
    pub async fn report_target(
        &self,
        room: &RoomId,
        kind: &str,
        id: &str,
    ) -> Result<Option<ReportTarget>> {
        if kind == "question" {
            let row = sqlx::query(
                "SELECT text, author_id, author_name, ts FROM questions WHERE id = $1 AND room_id = $2",
            )
            .bind(id)
            .bind(room.as_str())
            .fetch_optional(self.pool())
            .await?;
            return row
                .map(|r| {
                    Ok(ReportTarget {
                        text: r.try_get("text")?,
                        author: UserBrief {
                            id: UserId(r.try_get("author_id")?),
                            name: r.try_get("author_name")?,
                        },
                        ts: r.try_get("ts")?,
                    })
                })
                .transpose();
        }
        let body: Option<String> = sqlx::query_scalar(
            "SELECT e.body FROM messages m JOIN events e ON e.room_id = m.room_id AND e.seq = m.seq \
             WHERE m.id = $1 AND m.room_id = $2 AND m.deleted = 0",
        )
        .bind(id)
        .bind(room.as_str())
        .fetch_optional(self.pool())
        .await?;
        let Some(body) = body else { return Ok(None) };
        let ev: SequencedEvent = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("message {room}/{id}: {e}")))?;
        Ok(match ev.event {
            RoomEvent::Message {
                from,
                text,
                ts,
                deleted: false,
                ..
            } => Some(ReportTarget {
                text,
                author: UserBrief {
                    id: from.id,
                    name: from.name,
                },
                ts,
            }),
            _ => None,
        })
    }

    pub async fn resolve_report(
        &self,
        room: &RoomId,
        id: &str,
        by: &str,
        resolution: &str,
    ) -> Result<Report> {
        let res = sqlx::query(
            "UPDATE reports SET resolved_at = $1, resolved_by = $2, resolution = $3 \
             WHERE room_id = $4 AND id = $5 AND resolved_at IS NULL",
        )
        .bind(now_ms())
        .bind(by)
        .bind(resolution)
        .bind(room.as_str())
        .bind(id)
        .execute(self.pool())
        .await?;
        let row = sqlx::query(
            "SELECT id, room_id, target_kind, target_id, reporter_id, reason, ts, resolved_at, resolved_by, \
             resolution FROM reports WHERE room_id = $1 AND id = $2",
        )
        .bind(room.as_str())
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        .ok_or(StoreError::NotFound("report"))?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(
                "the report is already resolved".into(),
            ));
        }
        report_from_row(&row)
    }

    /// Records a moderation action.
    pub async fn audit(
        &self,
        room: &RoomId,
        actor: &str,
        action: &str,
        target: Option<&str>,
        detail: Option<&str>,
    ) -> Result<()> {
        sqlx::query("INSERT INTO audit (room_id, actor_id, action, target, detail, ts) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(room.as_str())
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail)
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The room's audit log, oldest first, after entry `after_id`.
    pub async fn audit_log(&self, room: &RoomId, after_id: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, room_id, actor_id, action, target, detail, ts FROM audit \
             WHERE room_id = $1 AND id > $2 ORDER BY id LIMIT CAST($3 AS BIGINT)",
        )
        .bind(room.as_str())
        .bind(after_id)
        .bind(MAX_AUDIT_PAGE)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    room: RoomId(r.try_get("room_id")?),
                    actor: r.try_get("actor_id")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: r.try_get("detail")?,
                    ts: r.try_get("ts")?,
                })
            })
            .collect()
    }
}
