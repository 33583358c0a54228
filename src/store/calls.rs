//! The call log: one row per finished call (caller, callee, room, media, when it was created,
//! answered and ended, why it ended, how long it was connected), in both backends.

use super::{Result, Store};
use crate::protocol::{RoomId, UserId};
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// Most calls one listing returns.
const MAX_LISTED: i64 = 200;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallLogEntry {
    pub id: String,
    pub caller: UserId,
    pub callee: UserId,
    pub room: Option<RoomId>,
    pub media: studyhall_signaling::Media,
    pub created_at: i64,
    pub answered_at: Option<i64>,
    pub ended_at: i64,
    pub end_reason: String,
    pub duration_ms: i64,
}

impl Store {
    pub async fn insert_call(&self, c: &CallLogEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO calls (id, caller_id, callee_id, room_id, audio, video, created_at, answered_at, \
             ended_at, end_reason, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(c.id.as_str())
        .bind(c.caller.as_str())
        .bind(c.callee.as_str())
        .bind(c.room.as_ref().map(RoomId::as_str))
        .bind(i64::from(c.media.audio))
        .bind(i64::from(c.media.video))
        .bind(c.created_at)
        .bind(c.answered_at)
        .bind(c.ended_at)
        .bind(c.end_reason.as_str())
        .bind(c.duration_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let queued = if inserted > 0 {
            let kind = super::EventType::CallEnded;
            let what = || format!("call {}", c.id);
            self.enqueue_value(&mut tx, kind, c.room.as_ref(), c.ended_at, c, what)
                .await?
        } else {
            false
        };
        self.commit_and_wake(tx, queued).await?;
        Ok(())
    }

    /// Calls the user made or received, newest first.
    pub async fn calls_of(&self, user: &UserId) -> Result<Vec<CallLogEntry>> {
        let rows = sqlx::query(
            "SELECT id, caller_id, callee_id, room_id, audio, video, created_at, answered_at, ended_at, \
             end_reason, duration_ms FROM calls WHERE caller_id = $1 OR callee_id = $1 \
             ORDER BY created_at DESC, id LIMIT CAST($2 AS BIGINT)",
        )
        .bind(user.as_str())
        .bind(MAX_LISTED)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CallLogEntry {
                    id: r.try_get("id")?,
                    caller: UserId(r.try_get("caller_id")?),
                    callee: UserId(r.try_get("callee_id")?),
                    room: r.try_get::<Option<String>, _>("room_id")?.map(RoomId),
                    media: studyhall_signaling::Media {
                        audio: r.try_get::<i64, _>("audio")? != 0,
                        video: r.try_get::<i64, _>("video")? != 0,
                    },
                    created_at: r.try_get("created_at")?,
                    answered_at: r.try_get("answered_at")?,
                    ended_at: r.try_get("ended_at")?,
                    end_reason: r.try_get("end_reason")?,
                    duration_ms: r.try_get("duration_ms")?,
                })
            })
            .collect()
    }
}
