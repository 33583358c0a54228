//! Wire shapes of polls, quizzes and word clouds, and of the class lifecycle: the poll object
//! as one audience sees it (`PollView`), its results, the class state, and the body of
//! `GET /api/rooms/{id}/summary`; the answers host/ta list (`poll_answers`, the results export)
//! and the quiz leaderboard. Who sees which fields (results, `correct`) is decided by the
//! store when it renders an event; these types only carry what was decided. Knows nothing of
//! sockets, the hub or SQL.

use super::views::UserBrief;
use super::{RoomId, UserId};
use serde::{Deserialize, Serialize};

/// What a poll asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollKind {
    /// Choose among options; no answer is right.
    Poll,
    /// Choose among options; `correct` says which are right (shown to members after close).
    Quiz,
    /// A short free text; results are word counts.
    WordCloud,
}

/// What `poll_create` asks for, beside its room: the fields as a client sends them (checked
/// against the limits and the kind's rules when the poll is made).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct NewPoll {
    pub kind: PollKind,
    pub question: String,
    #[serde(default)]
    pub options: Option<Vec<String>>,
    #[serde(default)]
    pub multiple: bool,
    #[serde(default)]
    pub correct: Option<Vec<u32>>,
    #[serde(default)]
    pub duration_s: Option<u32>,
    #[serde(default)]
    pub show_results: Option<ShowResults>,
}

impl PollKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poll => "poll",
            Self::Quiz => "quiz",
            Self::WordCloud => "word_cloud",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "poll" => Some(Self::Poll),
            "quiz" => Some(Self::Quiz),
            "word_cloud" => Some(Self::WordCloud),
            _ => None,
        }
    }
}

/// A poll's life: created as `draft`, answered while `open`, final once `closed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollState {
    Draft,
    Open,
    Closed,
}

impl PollState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "draft" => Some(Self::Draft),
            "open" => Some(Self::Open),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// When members see results: `live` (always) or `after_close`. Host/ta always see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShowResults {
    Live,
    AfterClose,
}

impl ShowResults {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::AfterClose => "after_close",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Self::Live),
            "after_close" => Some(Self::AfterClose),
            _ => None,
        }
    }
}

/// One word of a word cloud and how many answers hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WordCount {
    pub word: String,
    pub count: i64,
}

/// A poll's results: `answers` is how many users answered; `counts` (polls and quizzes) is how
/// many chose each option, in option order; `words` (word clouds) the most frequent words.
/// Quizzes, for host/ta (and for everyone once closed): `correct_answers`, how many answers
/// are exactly the correct set, and `avg_response_ms`, the mean time from the open to an
/// answer (absent with no answers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollResults {
    pub answers: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<WordCount>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct_answers: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_response_ms: Option<i64>,
}

/// A poll as one audience sees it. `results` and `correct` are left out where that audience
/// may not see them yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollView {
    pub id: String,
    pub kind: PollKind,
    pub question: String,
    pub options: Vec<String>,
    pub multiple: bool,
    pub show_results: ShowResults,
    pub state: PollState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<PollResults>,
    pub created_at: i64,
}

/// One user's answer as host/ta list it (`poll_answers`, the results export): `choices`
/// sorted (empty for a word cloud), `text` for word clouds, `ts` when it was last given;
/// quizzes add `correct` (the choice set is exactly the correct one) and `response_ms` (from
/// the quiz's open to `ts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollAnswerEntry {
    pub user: UserBrief,
    pub choices: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_ms: Option<i64>,
}

/// `poll_answers` (host/ta): one page of a poll's answers, oldest first; `next_cursor` asks
/// for the next page (`null` on the last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollAnswersOk {
    pub poll: String,
    pub answers: Vec<PollAnswerEntry>,
    pub next_cursor: Option<String>,
}

/// The body of `GET /api/rooms/{id}/polls/{poll}/results` (JSON): the poll as host/ta see it
/// and every answer, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollExport {
    pub poll: PollView,
    pub answers: Vec<PollAnswerEntry>,
}

/// One row of the quiz leaderboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizLeaderEntry {
    /// Competition rank over (`correct`, `total_response_ms`): ties in both share it.
    pub rank: i64,
    pub user: UserBrief,
    /// Correct answers over the room's closed quizzes.
    pub correct: i64,
    /// Closed quizzes answered.
    pub answered: i64,
    /// Sum of the response times of the correct answers (the tie-break: less is better).
    pub total_response_ms: i64,
}

/// `quiz_leaderboard`, and the body of `GET /api/rooms/{id}/quiz-leaderboard`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizLeaderboardOk {
    pub room: RoomId,
    /// Closed quizzes in the room.
    pub quizzes: i64,
    pub entries: Vec<QuizLeaderEntry>,
}

/// A room's class state: `scheduled` before it starts, `live`, then `ended` (until the host
/// reopens it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassState {
    Scheduled,
    #[default]
    Live,
    Ended,
}

impl ClassState {
    /// Whether an event as stored (its JSON) is a `class_state` event. A substring search, no
    /// parse (it runs on every event another node commits); text inside a string value has its
    /// quotes escaped, so it cannot fake the key.
    pub fn in_event(json: &str) -> bool {
        json.contains(r#""type":"class_state""#)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Live => "live",
            Self::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "scheduled" => Some(Self::Scheduled),
            "live" => Some(Self::Live),
            "ended" => Some(Self::Ended),
            _ => None,
        }
    }

    /// The state at `now` of a room whose recorded state is `self`: the clock starts a
    /// scheduled class at `starts_at` (or at once without one) and ends any class at `ends_at`.
    pub fn at(self, starts_at: Option<i64>, ends_at: Option<i64>, now: i64) -> Self {
        match self {
            Self::Ended => Self::Ended,
            _ if ends_at.is_some_and(|e| e <= now) => Self::Ended,
            Self::Scheduled if starts_at.is_none_or(|s| s <= now) => Self::Live,
            other => other,
        }
    }
}

/// The class part of the `join` reply: the state now and the class's times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassBrief {
    pub state: ClassState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
}

/// One user's attendance: first join, last leave (`null` while still present), time present
/// (overlapping sessions counted once) and how many sessions joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attendance {
    pub user: UserId,
    pub name: String,
    pub first_join: i64,
    pub last_leave: Option<i64>,
    pub present_ms: i64,
    pub sessions: i64,
}

/// Time one user spent on stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTime {
    pub user: UserId,
    pub name: String,
    pub on_stage_ms: i64,
}

/// Questions asked and answered in the room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionCounts {
    pub asked: i64,
    pub answered: i64,
}

/// `GET /api/rooms/{id}/summary`: the class as it went (so far, before it ends).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSummary {
    pub room: RoomId,
    pub state: ClassState,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub attendance: Vec<Attendance>,
    pub questions: QuestionCounts,
    pub polls: Vec<PollView>,
    pub stage: Vec<StageTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_class_states_on() {
        use ClassState::*;
        assert_eq!(Scheduled.at(Some(10), None, 5), Scheduled);
        assert_eq!(Scheduled.at(Some(10), None, 10), Live);
        assert_eq!(Scheduled.at(None, None, 10), Live);
        assert_eq!(Live.at(Some(1), Some(20), 19), Live);
        assert_eq!(Live.at(Some(1), Some(20), 20), Ended);
        assert_eq!(Scheduled.at(Some(30), Some(20), 25), Ended);
        assert_eq!(Ended.at(None, None, 0), Ended);
    }
}
