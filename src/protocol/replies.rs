//! The `ok` result of every command: one type per shape, encoded once with
//! [`encode_ok_as`](super::encode_ok_as) (`{"type":"ok","rid":N, ...fields}`). `history` is the
//! one reply spliced by hand, as its events are stored wire JSON already. Nested views built by
//! the store (rooms, search hits, statistics) keep their own types there.

use super::views::{BadgeView, Report, ReportEntry, RoomStats, RoomSummary, SearchHit, UserBrief};
use super::{
    ClassState, MessageId, PollView, QuestionId, QuestionStatus, QuestionView, RoomId, UserRef,
};
use crate::engagement::Streak;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
pub use studyhall_signaling::turn::IceServer;

/// An `ok` with no fields: `leave`, `typing`, `unban`, `av_leave`, `signal`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EmptyOk {}

/// `refresh`: when the new token expires (Unix seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshOk {
    pub exp: u64,
}

/// A message stored (`send`; a resend answers the first send's values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SentOk {
    pub id: MessageId,
    pub seq: i64,
    pub ts: i64,
}

/// The seq of the event a write committed, `null` when it changed nothing: `edit`, `delete`,
/// `react`, `unreact`, `vote`, `answer`, `question_status`, `helpful`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqOk {
    pub seq: Option<i64>,
}

/// A question asked (`ask`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AskOk {
    pub id: QuestionId,
    pub seq: i64,
    pub ts: i64,
    /// `pending` in a moderated room when a member asks, else `open`.
    pub status: QuestionStatus,
}

/// `checkin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinOk {
    pub room: RoomId,
    /// The local day of the check-in, `YYYY-MM-DD`.
    pub day: String,
    /// The zone the day was taken in.
    pub tz: String,
    /// Already checked in on this day: nothing changed.
    pub already: bool,
    pub streak: Streak,
    /// What this check-in earned.
    pub points: i64,
}

/// `poll_create`, `poll_open`, `poll_close`: the poll as host/ta see it, and the seq of its
/// event (`null` when nothing changed: closing a closed poll).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollOk {
    pub poll: PollView,
    pub seq: Option<i64>,
}

/// `poll_answer`: the answer as stored (it replaces the user's earlier one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollAnswerOk {
    pub poll: String,
    pub choices: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub ts: i64,
}

/// `polls`: the room's polls, oldest first, as the caller may see them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollsOk {
    pub polls: Vec<PollView>,
}

/// `class_start`, `class_end`: the new state and the seq of its `class_state` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassOk {
    pub state: ClassState,
    pub seq: i64,
}

/// The `ok` of `class_summary` (host/ta).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSummaryOk {
    pub summary: crate::protocol::ClassSummary,
}

/// The `ok` of a sequenced write, by what the write did (one of the shapes above).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WriteOk {
    Sent(SentOk),
    Seq(SeqOk),
    Asked(AskOk),
    CheckedIn(CheckinOk),
    Poll(PollOk),
    PollAnswered(PollAnswerOk),
    Class(ClassOk),
}

/// `read`: the seq as applied (lowered to the room's last seq).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadOk {
    pub seq: i64,
}

/// The `ok` of `history`, and the body of `GET /api/rooms/{id}/messages`: stored event bodies,
/// which are wire JSON already, spliced in without re-encoding.
#[derive(Clone, Copy, Debug)]
pub struct HistoryOk<'a> {
    /// Oldest first.
    pub events: &'a [String],
    pub has_more: bool,
}

impl HistoryOk<'_> {
    /// `{"type":"ok","rid":N,"events":[...],"has_more":B}`.
    pub fn encode_ok(&self, rid: i64) -> String {
        let mut out = self.buffer();
        let _ = write!(out, "{{\"type\":\"ok\",\"rid\":{rid},");
        self.push_fields(&mut out);
        out.push('}');
        out
    }

    /// `{"events":[...],"has_more":B}`.
    pub fn encode(&self) -> String {
        let mut out = self.buffer();
        out.push('{');
        self.push_fields(&mut out);
        out.push('}');
        out
    }

    fn buffer(&self) -> String {
        let len: usize = self.events.iter().map(|e| e.len() + 1).sum();
        String::with_capacity(len + 64)
    }

    fn push_fields(&self, out: &mut String) {
        out.push_str("\"events\":[");
        for (i, e) in self.events.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(e);
        }
        out.push_str("],\"has_more\":");
        out.push_str(if self.has_more { "true" } else { "false" });
    }
}

/// `rooms`: the user's rooms, by room id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomsOk {
    pub rooms: Vec<RoomSummary>,
}

/// `questions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionsOk {
    pub questions: Vec<QuestionView>,
}

/// `search`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchOk {
    pub results: Vec<SearchHit>,
    pub has_more: bool,
}

/// `raise_hand`: the 1-based place in the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RaiseHandOk {
    pub position: usize,
}

/// `lower_hand`: whether a hand was up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowerHandOk {
    pub lowered: bool,
}

/// A raised hand, in the `hands` reply and (for host/ta) the join reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RaisedHand {
    pub user: UserRef,
    pub ts: i64,
}

/// Someone on stage and since when (ms): their continuous time on stage so far, for host/ta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpell {
    pub user: UserRef,
    pub since: i64,
}

/// `hands`: the raised hands in raise order, and who is on stage since when (left out while
/// nobody is).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandsOk {
    pub hands: Vec<RaisedHand>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage: Vec<StageSpell>,
    /// The room's talk-time cap in seconds (its `stage.talk_cap_s`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub talk_cap_s: Option<u32>,
}

/// `stage`: the stage after the change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageOk {
    pub stage: Vec<UserRef>,
}

/// `mute`: when the mute ends (ms).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MuteOk {
    pub until: i64,
}

/// `unmute`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmuteOk {
    pub was_muted: bool,
}

/// `kick` and `ban`: how many sessions were removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KickOk {
    pub sessions: usize,
}

/// `slow_mode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlowModeOk {
    pub seconds: u64,
}

/// `report`: the new report's id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportOk {
    pub id: String,
}

/// `reports`: the room's reports, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportsOk {
    pub reports: Vec<ReportEntry>,
}

/// `report_resolve`: the report as resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportResolveOk {
    pub report: Report,
}

/// `call`, `call_accept`, `call_reject`, `call_hangup`, `call_resume`. `ice_servers` only for
/// `call`, `call_accept` and `call_resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallOk {
    pub call_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ice_servers: Option<Vec<IceServer>>,
}

/// A session already in a room's A/V, in the `av_join` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AvPeerRef {
    pub session: String,
    pub user: String,
}

/// How a session's A/V carries media, in the `av_join` reply: peer to peer (`mesh`), or
/// through the server (`sfu`: the session's only peer is the server, `to:"sfu"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvMode {
    Mesh,
    Sfu,
}

/// A room's A/V setting (`"av": {"mode"}` in the room object): `auto` (the default) is a
/// mesh up to `av_mesh_max` sessions and the SFU for joins past it; `mesh` and `sfu` fix it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvRoomMode {
    #[default]
    Auto,
    Mesh,
    Sfu,
}

impl AvRoomMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Mesh => "mesh",
            Self::Sfu => "sfu",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "mesh" => Some(Self::Mesh),
            "sfu" => Some(Self::Sfu),
            _ => None,
        }
    }
}

/// A track kind `av_mute` and `av_unmute` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvTrackKind {
    Audio,
    Video,
}

/// A room's A/V settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvSettings {
    #[serde(default)]
    pub mode: AvRoomMode,
}

/// A room's stage settings: the longest continuous time one speaker stays on stage
/// (`talk_cap_s`, `None` for no cap) and whether the server brings them down past it
/// (`auto_down`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSettings {
    #[serde(default)]
    pub talk_cap_s: Option<u32>,
    #[serde(default)]
    pub auto_down: bool,
}

impl StageSettings {
    /// The cap the server enforces, in ms: only with `auto_down`.
    pub fn enforced_ms(&self) -> Option<i64> {
        self.talk_cap_s
            .filter(|_| self.auto_down)
            .map(|s| i64::from(s) * 1000)
    }
}

/// `av_join`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AvJoinOk {
    /// The other sessions already in the room's A/V, by session id.
    pub peers: Vec<AvPeerRef>,
    pub ice_servers: Vec<IceServer>,
    pub mode: AvMode,
    /// Whether this session may send audio/video.
    pub publish: bool,
}

/// One leaderboard entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardEntry {
    /// Competition rank: ties share it (1, 2, 2, 4).
    pub rank: i64,
    pub user: UserBrief,
    /// Points in the period.
    pub points: i64,
    /// Of all-time points.
    pub level: i64,
}

/// `leaderboard`, and the body of `GET /api/rooms/{id}/leaderboard`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardOk {
    pub room: RoomId,
    /// `week`, `month` or `all`.
    pub period: String,
    /// The period's start (ms), `null` for `all`.
    pub since: Option<i64>,
    pub entries: Vec<LeaderboardEntry>,
}

/// A badge as a profile lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileBadge {
    pub id: String,
    pub name: String,
    pub description: String,
    pub earned_ts: i64,
}

impl ProfileBadge {
    pub fn new(badge: BadgeView, earned_ts: i64) -> Self {
        Self {
            id: badge.id,
            name: badge.name,
            description: badge.description,
            earned_ts,
        }
    }
}

/// A check-in streak as a profile shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileStreak {
    pub current: i64,
    pub longest: i64,
    /// The stored day of the last check-in.
    pub last_day: Option<String>,
}

/// One room of a profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileRoom {
    pub room: RoomId,
    pub points: i64,
    pub level: i64,
    /// `null` at the top level.
    pub next_level_points: Option<i64>,
    pub badges: Vec<ProfileBadge>,
    pub streak: ProfileStreak,
}

/// `profile`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileOk {
    pub user: UserBrief,
    pub rooms: Vec<ProfileRoom>,
}

/// `stats`, and the body of `GET /api/rooms/{id}/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsOk {
    #[serde(flatten)]
    pub stats: RoomStats,
    /// The zone the buckets are aligned to (IANA name).
    pub tz: String,
}
