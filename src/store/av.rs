//! Room A/V membership shared by cluster nodes: who is in a room's A/V mesh, on which node
//! (and which run of it), and in what order they joined. A join takes the room's `av_rooms`
//! row lock, so the mesh limit holds cluster-wide and any two joins of one room are ordered:
//! the later one lists the earlier one. Each membership gets a generation (the room's join
//! count), so a late delete or notice of an old membership never undoes a newer one.
//! Single-node servers never call this (their A/V lives in memory). It knows nothing of
//! signaling or the bus.

use super::{Result, Store, StoreError};
use crate::protocol::{RoomId, UserId};
use sqlx::{AssertSqlSafe, Row};

/// Rooms per snapshot query.
const SNAPSHOT_ROOMS: usize = 500;

/// A member of a room's A/V as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvMember {
    pub session: String,
    pub user: UserId,
    /// The membership's place in the room's join order.
    pub generation: i64,
    /// The node holding the session, and its run.
    pub node: String,
    pub epoch: i64,
}

impl AvMember {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self> {
        Ok(Self {
            session: r.try_get("session_id")?,
            user: UserId(r.try_get("user_id")?),
            generation: r.try_get("generation")?,
            node: r.try_get("node")?,
            epoch: r.try_get("epoch")?,
        })
    }
}

/// What a cluster A/V join asks of the store.
pub struct AvJoin<'a> {
    pub room: &'a RoomId,
    pub session: &'a str,
    pub user: &'a UserId,
    pub node: &'a str,
    /// The node's run (its bus epoch), so a dead run's rows can go without touching the next.
    pub epoch: i64,
    /// `av_mesh_max`.
    pub mesh_max: usize,
    /// When set, the nodes known to be alive: rows of any other node are stale (it died
    /// unseen) and are deleted first. `None` while this node cannot be sure.
    pub live_nodes: Option<&'a [String]>,
    pub now_ms: i64,
}

/// An admitted join.
#[derive(Debug)]
pub struct AvAdmitted {
    /// This membership's generation (a re-join gets a new one too, so that a late leave of the
    /// old membership cannot remove it).
    pub generation: i64,
    /// The members admitted before it, in join order (every other member for a re-join).
    pub before: Vec<AvMember>,
}

impl Store {
    /// Admits a session to a room's A/V, in join order, or refuses with `Conflict` when the
    /// mesh is full.
    pub async fn av_join(&self, j: &AvJoin<'_>) -> Result<AvAdmitted> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO av_rooms (room_id, version) VALUES ($1, 0) ON CONFLICT (room_id) DO NOTHING",
        )
        .bind(j.room.as_str())
        .execute(&mut *tx)
        .await?;
        // The lock that orders joins of this room (held to commit), and the next generation.
        let generation: i64 = sqlx::query(
            "UPDATE av_rooms SET version = version + 1 WHERE room_id = $1 RETURNING version",
        )
        .bind(j.room.as_str())
        .fetch_one(&mut *tx)
        .await?
        .try_get("version")?;
        if let Some(live) = j.live_nodes {
            delete_other_nodes(&mut tx, j.room, j.node, live).await?;
        }
        let rows = sqlx::query(
            "SELECT session_id, user_id, generation, node, epoch FROM av_peers \
             WHERE room_id = $1 ORDER BY generation",
        )
        .bind(j.room.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut before = Vec::with_capacity(rows.len());
        let mut rejoin = false;
        for r in &rows {
            let m = AvMember::from_row(r)?;
            if m.session == j.session {
                rejoin = true;
            } else {
                before.push(m);
            }
        }
        if rejoin {
            sqlx::query(
                "UPDATE av_peers SET generation = $3, node = $4, epoch = $5 \
                 WHERE room_id = $1 AND session_id = $2",
            )
            .bind(j.room.as_str())
            .bind(j.session)
            .bind(generation)
            .bind(j.node)
            .bind(j.epoch)
            .execute(&mut *tx)
            .await?;
        } else {
            if before.len() >= j.mesh_max {
                return Err(StoreError::Conflict(format!(
                    "A/V is full: a mesh holds {} participants",
                    j.mesh_max
                )));
            }
            sqlx::query(
                "INSERT INTO av_peers (room_id, session_id, user_id, node, epoch, generation, \
                 joined_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(j.room.as_str())
            .bind(j.session)
            .bind(j.user.as_str())
            .bind(j.node)
            .bind(j.epoch)
            .bind(generation)
            .bind(j.now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(AvAdmitted { generation, before })
    }

    /// Membership `generation` of a session left a room's A/V (a newer one stays).
    pub async fn av_leave(&self, room: &RoomId, session: &str, generation: i64) -> Result<()> {
        sqlx::query(
            "DELETE FROM av_peers WHERE room_id = $1 AND session_id = $2 AND generation <= $3",
        )
        .bind(room.as_str())
        .bind(session)
        .bind(generation)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A session's membership of a room's A/V, if it has one.
    pub async fn av_member(&self, room: &RoomId, session: &str) -> Result<Option<AvMember>> {
        let row = sqlx::query(
            "SELECT session_id, user_id, generation, node, epoch FROM av_peers \
             WHERE room_id = $1 AND session_id = $2",
        )
        .bind(room.as_str())
        .bind(session)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(AvMember::from_row).transpose()
    }

    /// Each room's join count and members, in one read (so every membership up to the count
    /// that is not listed has left). Rooms never joined are left out.
    pub async fn av_snapshot(&self, rooms: &[RoomId]) -> Result<Vec<(RoomId, i64, Vec<AvMember>)>> {
        let mut out: Vec<(RoomId, i64, Vec<AvMember>)> = Vec::new();
        for chunk in rooms.chunks(SNAPSHOT_ROOMS) {
            let sql = format!(
                "SELECT r.room_id AS room, r.version AS version, p.session_id, p.user_id, \
                 p.generation, p.node, p.epoch FROM av_rooms r \
                 LEFT JOIN av_peers p ON p.room_id = r.room_id \
                 WHERE r.room_id IN ({}) ORDER BY r.room_id, p.generation",
                super::placeholders(chunk.len(), 1)
            );
            // Only numbered placeholders are formatted in; every value is bound.
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for r in chunk {
                q = q.bind(r.as_str());
            }
            for row in q.fetch_all(self.pool()).await? {
                let room: String = row.try_get("room")?;
                let version: i64 = row.try_get("version")?;
                if out.last().is_none_or(|(r, _, _)| r.as_str() != room) {
                    out.push((RoomId(room), version, Vec::new()));
                }
                if row.try_get::<Option<String>, _>("session_id")?.is_some()
                    && let Some((_, _, members)) = out.last_mut()
                {
                    members.push(AvMember::from_row(&row)?);
                }
            }
        }
        Ok(out)
    }

    /// Deletes a room's A/V memberships of every node but `node` and `live` (nodes that died
    /// unseen), under the room's lock like a join (so the two never deadlock); returns how
    /// many went.
    pub async fn av_forget_other_nodes(
        &self,
        room: &RoomId,
        node: &str,
        live: &[String],
    ) -> Result<u64> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE av_rooms SET version = version WHERE room_id = $1")
            .bind(room.as_str())
            .execute(&mut *tx)
            .await?;
        let n = delete_other_nodes(&mut tx, room, node, live).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Forgets the A/V memberships of a node: of one run of it (it died, or left), or of
    /// every run (`None`: it starts again under its name).
    pub async fn av_forget_node(&self, node: &str, epoch: Option<i64>) -> Result<u64> {
        let done = match epoch {
            Some(e) => {
                sqlx::query("DELETE FROM av_peers WHERE node = $1 AND epoch = $2")
                    .bind(node)
                    .bind(e)
                    .execute(self.pool())
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM av_peers WHERE node = $1")
                    .bind(node)
                    .execute(self.pool())
                    .await?
            }
        };
        Ok(done.rows_affected())
    }
}

/// Deletes a room's rows of every node but `node` and `live`, in the caller's transaction
/// (which holds the room's `av_rooms` lock).
async fn delete_other_nodes(
    conn: &mut sqlx::AnyConnection,
    room: &RoomId,
    node: &str,
    live: &[String],
) -> Result<u64> {
    let sql = format!(
        "DELETE FROM av_peers WHERE room_id = $1 AND node NOT IN ({})",
        super::placeholders(live.len() + 1, 2)
    );
    // Only numbered placeholders are formatted in; every value is bound.
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(room.as_str())
        .bind(node);
    for n in live {
        q = q.bind(n.as_str());
    }
    Ok(q.execute(conn).await?.rows_affected())
}
