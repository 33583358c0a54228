//! Whiteboards in the store: each board's Yjs document as one encoded state (written coalesced
//! by the caller, replaced whole), and who besides host/ta may draw on it. The bytes are opaque
//! here: this module knows nothing of Yjs, sessions, the hub or who may call what.

use super::{Result, Store, now_ms};
use crate::protocol::{RoomId, UserId};
use sqlx::Row;

impl Store {
    /// A board's stored document state, if it was ever saved.
    pub async fn board_state(&self, room: &RoomId, board: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT state FROM boards WHERE room_id = $1 AND board_id = $2")
            .bind(room.as_str())
            .bind(board)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get::<Vec<u8>, _>("state")).transpose()?)
    }

    /// Replaces a board's stored document state (creating the board).
    pub async fn save_board(&self, room: &RoomId, board: &str, state: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO boards (room_id, board_id, state, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, board_id) DO UPDATE SET state = excluded.state, \
             updated_at = excluded.updated_at",
        )
        .bind(room.as_str())
        .bind(board)
        .bind(state.to_vec())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The ids of the room's saved boards.
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
