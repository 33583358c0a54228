//! Room A/V membership shared by cluster nodes: who is in a room's A/V mesh and on which node.
//! A join takes the room's `av_rooms` row lock, so the mesh limit holds cluster-wide and any
//! two joins of one room are ordered: the later one lists the earlier one. Single-node servers
//! never call this (their A/V lives in memory). It knows nothing of signaling or the bus.

use super::{Result, Store, StoreError};
use crate::protocol::{RoomId, UserId};
use sqlx::{AssertSqlSafe, Row};

/// A member of a room's A/V as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvMember {
    pub session: String,
    pub user: UserId,
}

/// What a cluster A/V join asks of the store.
pub struct AvJoin<'a> {
    pub room: &'a RoomId,
    pub session: &'a str,
    pub user: &'a UserId,
    pub node: &'a str,
    /// `av_mesh_max`.
    pub mesh_max: usize,
    /// When set, the nodes known to be alive: rows of any other node are stale (it died
    /// unseen) and are deleted first. `None` while this node cannot know yet.
    pub live_nodes: Option<&'a [String]>,
    pub now_ms: i64,
}

impl Store {
    /// Admits a session to a room's A/V, in join order: returns the members that joined
    /// before it (all of them, when it is already a member), or `Conflict` when the mesh is
    /// full.
    pub async fn av_join(&self, j: &AvJoin<'_>) -> Result<Vec<AvMember>> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO av_rooms (room_id, version) VALUES ($1, 0) ON CONFLICT (room_id) DO NOTHING")
            .bind(j.room.as_str())
            .execute(&mut *tx)
            .await?;
        // The lock that orders joins of this room (held to commit).
        sqlx::query("UPDATE av_rooms SET version = version + 1 WHERE room_id = $1")
            .bind(j.room.as_str())
            .execute(&mut *tx)
            .await?;
        if let Some(live) = j.live_nodes {
            let sql = format!(
                "DELETE FROM av_peers WHERE room_id = $1 AND node NOT IN ({})",
                super::placeholders(live.len() + 1, 2)
            );
            // Only numbered placeholders are formatted in; every value is bound.
            let mut q = sqlx::query(AssertSqlSafe(sql))
                .bind(j.room.as_str())
                .bind(j.node);
            for n in live {
                q = q.bind(n.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        let rows = sqlx::query(
            "SELECT session_id, user_id FROM av_peers WHERE room_id = $1 ORDER BY joined_at, session_id",
        )
        .bind(j.room.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut before = Vec::with_capacity(rows.len());
        let mut rejoin = false;
        for r in &rows {
            let session: String = r.try_get("session_id")?;
            if session == j.session {
                rejoin = true;
                continue;
            }
            before.push(AvMember {
                session,
                user: UserId(r.try_get("user_id")?),
            });
        }
        if !rejoin {
            if before.len() >= j.mesh_max {
                return Err(StoreError::Conflict(format!(
                    "A/V is full: a mesh holds {} participants",
                    j.mesh_max
                )));
            }
            sqlx::query(
                "INSERT INTO av_peers (room_id, session_id, user_id, node, joined_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(j.room.as_str())
            .bind(j.session)
            .bind(j.user.as_str())
            .bind(j.node)
            .bind(j.now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(before)
    }

    /// A session left a room's A/V.
    pub async fn av_leave(&self, room: &RoomId, session: &str) -> Result<()> {
        sqlx::query("DELETE FROM av_peers WHERE room_id = $1 AND session_id = $2")
            .bind(room.as_str())
            .bind(session)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The user of a session in a room's A/V, if it is a member.
    pub async fn av_member(&self, room: &RoomId, session: &str) -> Result<Option<UserId>> {
        let row =
            sqlx::query("SELECT user_id FROM av_peers WHERE room_id = $1 AND session_id = $2")
                .bind(room.as_str())
                .bind(session)
                .fetch_optional(self.pool())
                .await?;
        row.map(|r| Ok(UserId(r.try_get("user_id")?))).transpose()
    }

    /// Forgets every A/V membership of a node (it died, or it starts again under its name).
    pub async fn av_forget_node(&self, node: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM av_peers WHERE node = $1")
            .bind(node)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
