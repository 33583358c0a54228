//! Wire shapes of breakout groups (what `breakout_open` asks for and answers) and the names of
//! the whiteboard's frames. A board's `data` is one y-protocols message in base64; its meaning
//! is the business of `rooms::boards`, not of these types. Knows nothing of sockets, the hub,
//! Yjs or SQL.

use super::{RoomId, UserId};
use serde::{Deserialize, Serialize};

/// How `breakout_open` deals the parent's online students into groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakoutAssign {
    /// Shuffled, then each to a smallest group (sizes differ by at most one).
    #[default]
    Random,
    /// In user id order, each to a smallest group: the same class gives the same groups.
    Balanced,
}

/// One group as `breakout_open` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub members: Vec<UserId>,
}

/// One group as `breakout_open` answers it: its room, its title, the students in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakoutGroup {
    pub room: RoomId,
    pub title: String,
    pub members: Vec<UserId>,
}

/// The `ok` of `breakout_open`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakoutOpenOk {
    pub groups: Vec<BreakoutGroup>,
    /// When the groups close by themselves (`duration_s`), in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<i64>,
}

/// The open breakout of a room as a late joiner sees it in the `join` reply: the groups, when
/// they close, and (for a student placed in one) their own group room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakoutSnapshot {
    pub groups: Vec<BreakoutGroup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_room: Option<RoomId>,
}
