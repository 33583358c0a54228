//! Whiteboards in the store: each board as a compacted snapshot (one encoded Yjs update) plus
//! the log of updates merged since, and who besides host/ta may draw on it. A compaction folds
//! log rows into the snapshot and deletes exactly those rows in the same transaction, and
//! writes only if no other compaction did in between, so no update is ever lost: every update
//! appended is in the log or in the snapshot at every moment. The bytes are opaque here (the
//! caller merges them): this module knows nothing of Yjs, sessions, the hub or who may call
//! what.

use super::{Result, Store, StoreError, now_ms, placeholders};
use crate::protocol::{RoomId, UserId};
use sqlx::{AssertSqlSafe, Row};

/// A board as stored: its snapshot and the updates logged since, oldest first.
#[derive(Debug, Clone, Default)]
pub struct StoredBoard {
    pub snapshot: Vec<u8>,
    pub updates: Vec<Vec<u8>>,
}

impl StoredBoard {
    /// Bytes stored for the board: the snapshot plus every logged update.
    pub fn len(&self) -> usize {
        self.snapshot.len() + self.updates.iter().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Log rows folded into the snapshot and deleted (by this compaction: never counted twice).
    pub folded: usize,
    /// The new snapshot's size in bytes.
    pub snapshot_bytes: usize,
    /// Another compaction of the same board committed first: nothing was written.
    pub lost_race: bool,
}

/// An empty Yjs update (no structs, no deletions): the snapshot of a board created by its first
/// update, before any compaction.
const EMPTY_UPDATE: [u8; 2] = [0, 0];

impl Store {
    /// A board's snapshot and logged updates, if the board exists.
    pub async fn board_state(&self, room: &RoomId, board: &str) -> Result<Option<StoredBoard>> {
        let row = sqlx::query("SELECT state FROM boards WHERE room_id = $1 AND board_id = $2")
            .bind(room.as_str())
            .bind(board)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let snapshot: Vec<u8> = row.try_get("state")?;
        let updates: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT data FROM board_updates WHERE room_id = $1 AND board_id = $2 ORDER BY id",
        )
        .bind(room.as_str())
        .bind(board)
        .fetch_all(self.pool())
        .await?;
        Ok(Some(StoredBoard { snapshot, updates }))
    }

    /// Creates a board with an empty snapshot (nothing if it exists).
    pub async fn create_board(&self, room: &RoomId, board: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO boards (room_id, board_id, state, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, board_id) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(board)
        .bind(EMPTY_UPDATE.to_vec())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Appends one update to a board's log.
    pub async fn append_board_update(&self, room: &RoomId, board: &str, data: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO board_updates (room_id, board_id, data, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(room.as_str())
        .bind(board)
        .bind(data.to_vec())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// How many updates a board's log holds.
    pub async fn board_log_len(&self, room: &RoomId, board: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM board_updates WHERE room_id = $1 AND board_id = $2",
        )
        .bind(room.as_str())
        .bind(board)
        .fetch_one(self.pool())
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Folds up to `max_rows` of a board's oldest logged updates into its snapshot: `merge`
    /// gets the snapshot and those updates (oldest first) and returns the new snapshot, which
    /// is written, and exactly those rows deleted, in one transaction. The snapshot is written
    /// only if no other compaction of the board committed since it was read (else nothing is
    /// written: `lost_race`). Rows are deleted by id, never by range, so an update whose
    /// insert commits during the compaction stays in the log.
    pub async fn compact_board<F>(
        &self,
        room: &RoomId,
        board: &str,
        max_rows: usize,
        merge: F,
    ) -> Result<Compacted>
    where
        F: FnOnce(&[u8], &[Vec<u8>]) -> std::result::Result<Vec<u8>, String>,
    {
        let limit = i64::try_from(max_rows.max(1)).unwrap_or(i64::MAX);
        let (snapshot, version) = self.versioned_snapshot(room, board).await?;
        let (ids, updates) = self.oldest_updates(room, board, limit).await?;
        if ids.is_empty() {
            return Ok(Compacted {
                snapshot_bytes: snapshot.len(),
                ..Compacted::default()
            });
        }
        let merged = merge(&snapshot, &updates)
            .map_err(|e| StoreError::Corrupt(format!("board {room}/{board}: {e}")))?;
        let mut tx = self.begin_write().await?;
        let written = sqlx::query(
            "UPDATE boards SET state = $1, version = version + 1, updated_at = $2 \
             WHERE room_id = $3 AND board_id = $4 AND version = $5",
        )
        .bind(merged.clone())
        .bind(now_ms())
        .bind(room.as_str())
        .bind(board)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        if written.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Compacted {
                lost_race: true,
                ..Compacted::default()
            });
        }
        let folded = delete_updates(&mut tx, room, board, &ids).await?;
        tx.commit().await?;
        Ok(Compacted {
            folded: usize::try_from(folded).unwrap_or(usize::MAX),
            snapshot_bytes: merged.len(),
            lost_race: false,
        })
    }

    /// A board's snapshot and its version (which a compaction's write must still find).
    async fn versioned_snapshot(&self, room: &RoomId, board: &str) -> Result<(Vec<u8>, i64)> {
        let row =
            sqlx::query("SELECT state, version FROM boards WHERE room_id = $1 AND board_id = $2")
                .bind(room.as_str())
                .bind(board)
                .fetch_optional(self.pool())
                .await?
                .ok_or(StoreError::NotFound("no such board"))?;
        Ok((row.try_get("state")?, row.try_get("version")?))
    }

    /// The board's oldest `limit` logged updates: their ids and their bytes, in log order.
    async fn oldest_updates(
        &self,
        room: &RoomId,
        board: &str,
        limit: i64,
    ) -> Result<(Vec<i64>, Vec<Vec<u8>>)> {
        let rows = sqlx::query(
            "SELECT id, data FROM board_updates WHERE room_id = $1 AND board_id = $2 \
             ORDER BY id LIMIT CAST($3 AS BIGINT)",
        )
        .bind(room.as_str())
        .bind(board)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut updates = Vec::with_capacity(rows.len());
        for row in rows {
            ids.push(row.try_get::<i64, _>("id")?);
            updates.push(row.try_get::<Vec<u8>, _>("data")?);
        }
        Ok((ids, updates))
    }

    /// The ids of the room's boards.
    pub async fn board_ids(&self, room: &RoomId) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT board_id FROM boards WHERE room_id = $1 ORDER BY board_id")
                .bind(room.as_str())
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Who was granted drawing on a board.
    pub async fn board_grants(&self, room: &RoomId, board: &str) -> Result<Vec<UserId>> {
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT user_id FROM board_grants WHERE room_id = $1 AND board_id = $2",
        )
        .bind(room.as_str())
        .bind(board)
        .fetch_all(self.pool())
        .await?;
        Ok(users.into_iter().map(UserId).collect())
    }

    /// Grants (`draw`) or takes back drawing on a board.
    pub async fn set_board_grant(
        &self,
        room: &RoomId,
        board: &str,
        user: &UserId,
        draw: bool,
    ) -> Result<()> {
        let sql = if draw {
            "INSERT INTO board_grants (room_id, board_id, user_id) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, board_id, user_id) DO NOTHING"
        } else {
            "DELETE FROM board_grants WHERE room_id = $1 AND board_id = $2 AND user_id = $3"
        };
        sqlx::query(sql)
            .bind(room.as_str())
            .bind(board)
            .bind(user.as_str())
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// Deletes the folded log rows, in chunks of 500 ids; how many went.
async fn delete_updates(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    room: &RoomId,
    board: &str,
    ids: &[i64],
) -> Result<u64> {
    let mut folded = 0;
    for chunk in ids.chunks(500) {
        let sql = format!(
            "DELETE FROM board_updates WHERE room_id = $1 AND board_id = $2 AND id IN ({})",
            placeholders(chunk.len(), 3)
        );
        // Only numbered placeholders are formatted in; every value is bound.
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(room.as_str())
            .bind(board);
        for id in chunk {
            q = q.bind(*id);
        }
        folded += q.execute(&mut **tx).await?.rows_affected();
    }
    Ok(folded)
}
