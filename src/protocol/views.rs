//! The wire shapes of what the store reads for a reply or an event: reports, badges, users as
//! leaderboards show them, room summaries, search hits and the room health statistics. They
//! are protocol types (docs/protocol.md names every field); the store fills them and knows
//! the SQL, this file knows none of it.

use super::{RoomId, RoomKind, RoomRole, UserId};
use crate::engagement::{self as eng, Bucket};
use serde::{Deserialize, Serialize};

/// A user as leaderboards and badges show them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserBrief {
    pub id: UserId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadgeView {
    pub id: String,
    pub name: String,
    pub description: String,
}

impl BadgeView {
    pub fn of(rule: &eng::BadgeRule) -> Self {
        Self {
            id: rule.id.clone(),
            name: rule.name.clone(),
            description: rule.description.clone(),
        }
    }
}

/// One row of the `rooms` command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub id: RoomId,
    pub kind: RoomKind,
    pub title: String,
    pub role: RoomRole,
    pub last_seq: i64,
    pub unread: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub room: RoomId,
    /// `message` or `question`.
    pub target_kind: String,
    pub target_id: String,
    pub reporter: UserId,
    pub reason: String,
    pub ts: i64,
    pub resolved_at: Option<i64>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
}

/// What a report points at, as the `reports` command shows it to host/ta: the message's
/// current text and author, or the question's text and asker (even when anonymous).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportTarget {
    pub text: String,
    pub author: UserBrief,
    pub ts: i64,
}

/// One row of the `reports` command: the report and its target, `null` when the target is
/// gone (a deleted message).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportEntry {
    #[serde(flatten)]
    pub report: Report,
    pub target: Option<ReportTarget>,
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchHit {
    /// `message` or `question`.
    pub kind: String,
    pub id: String,
    pub seq: i64,
    pub ts: i64,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Band {
    pub low: f64,
    pub high: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub start: i64,
    pub messages: i64,
    pub questions: i64,
    pub answers: i64,
    pub active_members: i64,
    pub new_members: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstAnswer {
    pub median: Option<i64>,
    pub p90: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionStats {
    pub asked: i64,
    pub answered: i64,
    pub answered_share: f64,
    pub first_answer_ms: FirstAnswer,
    pub overdue: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChurnUser {
    pub id: UserId,
    pub name: String,
    pub last_active_ts: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Churn {
    pub inactive_days: u32,
    pub count: i64,
    pub users: Vec<ChurnUser>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contributor {
    pub user: UserBrief,
    pub points: i64,
    pub messages: i64,
    pub questions: i64,
    pub answers: i64,
}

/// The `stats` object (see docs/protocol.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomStats {
    pub room: RoomId,
    pub from: i64,
    pub to: i64,
    pub bucket: Bucket,
    pub members: i64,
    pub new_members: i64,
    pub weekly_active_members: i64,
    pub weekly_active_ratio: f64,
    pub healthy_band: Band,
    pub health: eng::Health,
    pub series: Vec<SeriesPoint>,
    pub questions: QuestionStats,
    pub churn_risk: Churn,
    pub top_contributors: Vec<Contributor>,
}
