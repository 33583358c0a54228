//! Which cluster node runs a room's SFU (`sfu_owners`). The rule: the first node that needs a
//! room's SFU inserts the room's row naming itself (insert if absent) and runs it; every other
//! node sends its sessions' SFU commands to the node the row names. A row whose node is not
//! among the live nodes (it died) is taken over by the next node that claims the room, with a
//! compare-and-set on the old owner so that two claimants agree on one winner. The owner deletes
//! its row when its SFU room empties, and a node deletes every row of its name when it starts
//! (its SFU starts empty). Single-node servers never call this. It knows nothing of the SFU.

use super::{Result, Store, StoreError};
use crate::protocol::RoomId;
use sqlx::Row;

/// Inserts tried before a claim gives up on a room released as fast as it is claimed.
const CLAIM_TRIES: usize = 3;

impl Store {
    /// Claims the room's SFU for `node` unless another node holds it; a holder that is not in
    /// `live` (known dead) is replaced. `live` is `None` while this node cannot tell who is
    /// alive: then nobody's claim is taken over. Returns the node that runs the room's SFU.
    pub async fn sfu_claim(
        &self,
        room: &RoomId,
        node: &str,
        live: Option<&[String]>,
        now_ms: i64,
    ) -> Result<String> {
        // Each try: insert if absent, then read who holds it. A release between the two
        // leaves no row (try again); a dead holder's claim is moved to this node by a
        // compare-and-set, and the next try reads who won it (this node, another claimant,
        // or nobody if the row went meanwhile: then it is inserted again).
        for _ in 0..CLAIM_TRIES {
            sqlx::query(
                "INSERT INTO sfu_owners (room_id, node, claimed_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (room_id) DO NOTHING",
            )
            .bind(room.as_str())
            .bind(node)
            .bind(now_ms)
            .execute(self.pool())
            .await?;
            let Some(owner) = self.sfu_owner(room).await? else {
                continue;
            };
            let dead = owner != node && live.is_some_and(|l| !l.contains(&owner));
            if !dead {
                return Ok(owner);
            }
            let moved = sqlx::query(
                "UPDATE sfu_owners SET node = $2, claimed_at = $3 WHERE room_id = $1 AND node = $4",
            )
            .bind(room.as_str())
            .bind(node)
            .bind(now_ms)
            .bind(&owner)
            .execute(self.pool())
            .await?
            .rows_affected();
            if moved == 1 {
                tracing::info!(room = %room, dead = %owner, "took over the SFU of a node that is gone");
            }
        }
        Err(StoreError::Conflict(
            "the room's SFU is being claimed and released: try again".into(),
        ))
    }

    /// The node that runs the room's SFU, if any does.
    pub async fn sfu_owner(&self, room: &RoomId) -> Result<Option<String>> {
        let row = sqlx::query("SELECT node FROM sfu_owners WHERE room_id = $1")
            .bind(room.as_str())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("node")).transpose()?)
    }

    /// `node` no longer runs the room's SFU (its SFU room emptied). A row another node took
    /// over stays.
    pub async fn sfu_release(&self, room: &RoomId, node: &str) -> Result<()> {
        sqlx::query("DELETE FROM sfu_owners WHERE room_id = $1 AND node = $2")
            .bind(room.as_str())
            .bind(node)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Forgets every SFU room of `node` (it starts again under its name, its SFU empty);
    /// returns how many went.
    pub async fn sfu_release_node(&self, node: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM sfu_owners WHERE node = $1")
            .bind(node)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
