//! Breakout groups in the store: a breakout session of a parent room (`breakouts`, at most one
//! open per parent), its group rooms (`breakout_groups`; each group is an ordinary invite-only
//! room, and who is in it is that room's `room_members`), opening one in a single transaction
//! (rooms, memberships, rows), closing it (the group rooms archived in the same transaction),
//! the clock scan for `closes_at`, and the moves between groups. Knows nothing of sessions,
//! the hub or who may call what.

use super::{Result, Room, Store, StoreError, now_ms};
use crate::protocol::{RoomId, RoomRole, UserId};
use sqlx::Row;

/// One group of a breakout to create: its room, its title, and who is in it with what role.
#[derive(Clone, Debug)]
pub struct NewGroup {
    pub room: Room,
    pub members: Vec<(UserId, RoomRole)>,
}

/// A breakout session to open in one transaction.
#[derive(Clone, Debug)]
pub struct NewBreakout {
    pub id: String,
    pub parent: RoomId,
    pub by: UserId,
    pub closes_at: Option<i64>,
    pub groups: Vec<NewGroup>,
}

/// A group room of a breakout, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakoutGroupRow {
    pub room: RoomId,
    pub title: String,
}

/// A breakout session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breakout {
    pub id: String,
    pub parent: RoomId,
    pub open: bool,
    pub closes_at: Option<i64>,
    pub groups: Vec<BreakoutGroupRow>,
}

impl Store {
    /// How many breakout sessions the parent has had (open or closed).
    pub async fn breakout_count(&self, parent: &RoomId) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM breakouts WHERE parent_id = $1")
                .bind(parent.as_str())
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Opens a breakout: its group rooms, their members and its rows, all or nothing. A parent
    /// with an open breakout, or a group id that exists already, is a `conflict`.
    pub async fn open_breakout(&self, b: &NewBreakout) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let open: Option<String> =
            sqlx::query_scalar("SELECT id FROM breakouts WHERE parent_id = $1 AND state = 'open'")
                .bind(b.parent.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        if open.is_some() {
            return Err(StoreError::Conflict(format!(
                "room {} already has open breakout groups",
                b.parent
            )));
        }
        sqlx::query(
            "INSERT INTO breakouts (id, parent_id, state, opened_by, opened_at, closes_at) \
             VALUES ($1, $2, 'open', $3, $4, $5)",
        )
        .bind(b.id.as_str())
        .bind(b.parent.as_str())
        .bind(b.by.as_str())
        .bind(now_ms())
        .bind(b.closes_at)
        .execute(&mut *tx)
        .await?;
        let mut queued = false;
        for (i, g) in b.groups.iter().enumerate() {
            queued |= self.create_room_in(&mut tx, &g.room).await?.1;
            sqlx::query(
                "INSERT INTO breakout_groups (room_id, breakout_id, position, title) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(g.room.id.as_str())
            .bind(b.id.as_str())
            .bind(i as i64)
            .bind(g.room.title.as_str())
            .execute(&mut *tx)
            .await?;
            for (user, role) in &g.members {
                sqlx::query(
                    "INSERT INTO room_members (room_id, user_id, role, added_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (room_id, user_id) DO NOTHING",
                )
                .bind(g.room.id.as_str())
                .bind(user.as_str())
                .bind(role.as_str())
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
        }
        self.commit_and_wake(tx, queued).await?;
        Ok(())
    }

    async fn breakout_where(&self, sql: &'static str, key: &str) -> Result<Option<Breakout>> {
        let Some(row) = sqlx::query(sql)
            .bind(key)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        let state: String = row.try_get("state")?;
        let groups = sqlx::query(
            "SELECT room_id, title FROM breakout_groups WHERE breakout_id = $1 ORDER BY position",
        )
        .bind(id.as_str())
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(BreakoutGroupRow {
                room: RoomId(r.try_get("room_id")?),
                title: r.try_get("title")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Some(Breakout {
            id,
            parent: RoomId(row.try_get("parent_id")?),
            open: state == "open",
            closes_at: row.try_get("closes_at")?,
            groups,
        }))
    }

    /// The parent's open breakout, if any.
    pub async fn open_breakout_of(&self, parent: &RoomId) -> Result<Option<Breakout>> {
        self.breakout_where(
            "SELECT id, parent_id, state, closes_at FROM breakouts \
             WHERE parent_id = $1 AND state = 'open'",
            parent.as_str(),
        )
        .await
    }

    /// The breakout a group room belongs to (open or closed), if it is a group room.
    pub async fn breakout_of_group(&self, group: &RoomId) -> Result<Option<Breakout>> {
        self.breakout_where(
            "SELECT b.id, b.parent_id, b.state, b.closes_at FROM breakouts b \
             JOIN breakout_groups g ON g.breakout_id = b.id WHERE g.room_id = $1",
            group.as_str(),
        )
        .await
    }

    /// Closes an open breakout and archives its group rooms, in one transaction that also
    /// queues a `room.archived` webhook per group room it archived (one archived before, through
    /// the API, is not reported again); false if it was not open (closed meanwhile, by a
    /// command, the clock or another node).
    pub async fn close_breakout(&self, id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE breakouts SET state = 'closed', closed_at = $1 WHERE id = $2 AND state = 'open'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT room_id FROM breakout_groups WHERE breakout_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let mut queued = false;
        for room in groups {
            queued |= self.archive_room_in(&mut tx, &RoomId(room)).await?;
        }
        self.commit_and_wake(tx, queued).await?;
        Ok(true)
    }

    /// Open breakouts past `closes_at`: (breakout id, parent).
    pub async fn due_breakouts(&self, now: i64) -> Result<Vec<(String, RoomId)>> {
        sqlx::query(
            "SELECT id, parent_id FROM breakouts \
             WHERE state = 'open' AND closes_at IS NOT NULL AND closes_at <= $1",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, RoomId(r.try_get("parent_id")?))))
        .collect()
    }

    /// Moves `user` into the group room `to` as a member, out of the breakout's other groups
    /// (where they were a plain member or viewer: host/ta memberships stay), in one
    /// transaction. Returns the groups the user left.
    pub async fn move_breakout_member(
        &self,
        b: &Breakout,
        user: &UserId,
        to: &RoomId,
    ) -> Result<Vec<RoomId>> {
        let mut tx = self.begin_write().await?;
        let mut left = Vec::new();
        for g in b.groups.iter().filter(|g| &g.room != to) {
            let res = sqlx::query(
                "DELETE FROM room_members WHERE room_id = $1 AND user_id = $2 \
                 AND role IN ('member', 'viewer')",
            )
            .bind(g.room.as_str())
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() > 0 {
                left.push(g.room.clone());
            }
        }
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, added_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .bind(to.as_str())
        .bind(user.as_str())
        .bind(RoomRole::Member.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(left)
    }

    /// The students of each group of `b` (stored members other than host/ta), in the groups'
    /// order, each list by user id: one query.
    pub async fn breakout_students(&self, b: &Breakout) -> Result<Vec<Vec<UserId>>> {
        let rows = sqlx::query(
            "SELECT g.room_id, m.user_id FROM breakout_groups g \
             JOIN room_members m ON m.room_id = g.room_id \
             WHERE g.breakout_id = $1 AND m.role NOT IN ('host', 'ta') \
             ORDER BY g.position, m.user_id",
        )
        .bind(b.id.as_str())
        .fetch_all(self.pool())
        .await?;
        let mut out = vec![Vec::new(); b.groups.len()];
        for r in &rows {
            let room: String = r.try_get("room_id")?;
            if let Some(i) = b.groups.iter().position(|g| g.room.as_str() == room) {
                out[i].push(UserId(r.try_get("user_id")?));
            }
        }
        Ok(out)
    }

    /// Claims the warnings due: open breakouts closing within `within_ms` of `now` whose
    /// warning has not gone out, each marked as sent here (a breakout another node claimed
    /// first is left out). (breakout id, parent, `closes_at`).
    pub async fn claim_breakout_warnings(
        &self,
        now: i64,
        within_ms: i64,
    ) -> Result<Vec<(String, RoomId, i64)>> {
        let rows = sqlx::query(
            "SELECT id, parent_id, closes_at FROM breakouts WHERE state = 'open' \
             AND closes_at IS NOT NULL AND closes_at > $1 AND closes_at <= $2 \
             AND warned_at IS NULL",
        )
        .bind(now)
        .bind(now.saturating_add(within_ms))
        .fetch_all(self.pool())
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            let res = sqlx::query(
                "UPDATE breakouts SET warned_at = $1 WHERE id = $2 AND warned_at IS NULL",
            )
            .bind(now)
            .bind(id.as_str())
            .execute(self.pool())
            .await?;
            if res.rows_affected() == 1 {
                claimed.push((id, RoomId(r.try_get("parent_id")?), r.try_get("closes_at")?));
            }
        }
        Ok(claimed)
    }
}
