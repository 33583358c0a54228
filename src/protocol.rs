//! The wire contract (`studyhall.v1`): every JSON shape a client sends or receives, the typed
//! ids, the error codes and the close codes. This is the only module that defines wire JSON;
//! the store persists sequenced room events in exactly this encoding so that replay and
//! history send the stored bytes unchanged. It knows nothing of sockets, the hub or SQL.

use serde::{Deserialize, Serialize};
use std::fmt;

mod classroom;
mod polls;
mod replies;
pub mod views;
pub use classroom::*;
pub use polls::*;
pub use replies::*;

/// The node of a session or call id (`s...`/`c...` then `.NODE`), if it names one: in cluster
/// mode session and call ids end in `.NODE_ID`.
pub fn node_of(id: &str) -> Option<&str> {
    id.rsplit_once('.')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod doc_check;
#[cfg(test)]
mod props;

/// The WebSocket subprotocol a client may offer; the server selects it when offered.
pub const SUBPROTOCOL: &str = "studyhall.v1";

/// Largest `limit` a `history` command may ask for.
pub const HISTORY_MAX_LIMIT: u32 = 100;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A room id: 1..=64 characters of `[A-Za-z0-9_.-]` (see [`valid_room_id`]).
    RoomId
);
string_id!(
    /// A user id, the token's `sub`: 1..=64 characters.
    UserId
);
string_id!(
    /// One WebSocket connection; a user may hold several (phone and laptop).
    SessionId
);
string_id!(
    /// A chat message id, assigned by the server.
    MessageId
);
string_id!(
    /// A Q&A question id, assigned by the server.
    QuestionId
);

/// Characters that show nothing or reorder the text around them: zero-width spaces and
/// joiners, the soft hyphen, the word joiner family, the byte-order mark and the bidi controls.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// Bidi overrides and isolates: text after them is shown in another order than stored.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Text that shows nothing: only whitespace and invisible characters.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || is_invisible(c))
}

/// Room ids are 1..=64 of `[A-Za-z0-9_.-]`.
pub fn valid_room_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Cluster node names: 1..=32 of `[A-Za-z0-9_-]`. No `.`, so a node name is one NATS subject
/// token and the part after the last `.` of a session or call id.
pub fn valid_node_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Platform role, from the token's `role` claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformRole {
    Student,
    Tutor,
    Admin,
}

impl PlatformRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Student => "student",
            Self::Tutor => "tutor",
            Self::Admin => "admin",
        }
    }
}

/// Role inside one room, ordered from least to most privileged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomRole {
    Viewer,
    Member,
    Ta,
    Host,
}

impl RoomRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Ta => "ta",
            Self::Host => "host",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "member" => Some(Self::Member),
            "ta" => Some(Self::Ta),
            "host" => Some(Self::Host),
            _ => None,
        }
    }

    /// May write to the room (send, react, typing); viewers are read-only.
    pub fn can_write(self) -> bool {
        self >= Self::Member
    }

    /// May moderate (delete others' messages, and later mute/kick/ban).
    pub fn can_moderate(self) -> bool {
        self >= Self::Ta
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    Group,
    Live,
    Tutoring,
    Class,
}

impl RoomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Live => "live",
            Self::Tutoring => "tutoring",
            Self::Class => "class",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "group" => Some(Self::Group),
            "live" => Some(Self::Live),
            "tutoring" => Some(Self::Tutoring),
            "class" => Some(Self::Class),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Open,
    Invite,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Invite => "invite",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "invite" => Some(Self::Invite),
            _ => None,
        }
    }
}

/// A user as shown to others: in `welcome` `role` is the platform role, in room events it is
/// the user's role in that room (so clients can badge the host and TAs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub id: UserId,
    pub name: String,
    pub role: ShownRole,
}

/// A user as a room's `online` list shows them: the user object and its JSON, encoded once
/// when they came online, so that a join reply listing a thousand users copies bytes instead
/// of encoding each one (and a room's list is shared, not copied, between replies).
#[derive(Debug)]
pub struct Listed {
    pub user: UserRef,
    json: Box<serde_json::value::RawValue>,
}

impl Listed {
    pub fn new(user: UserRef) -> std::sync::Arc<Self> {
        // Infallible: a struct of strings and a unit enum always encodes.
        let json = serde_json::value::to_raw_value(&user).expect("a user object encodes");
        std::sync::Arc::new(Self { user, json })
    }
}

impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

/// The `online` array of a join reply, encoded when the reply is made by copying each listed
/// user's stored JSON: one pass over the users, with no per-user serialisation and no
/// reference kept to them (a room of a thousand users makes this ~50 KB per join).
#[derive(Clone, Debug)]
pub struct OnlineList {
    json: String,
    len: usize,
}

impl OnlineList {
    /// The users in the order given (the hub gives them sorted by id).
    pub fn new<'a>(users: impl ExactSizeIterator<Item = &'a Listed>) -> Self {
        // Most user objects are 40-70 bytes: reserve once for the usual case.
        let mut json = String::with_capacity(2 + users.len() * 64);
        json.push('[');
        let mut len = 0;
        for u in users {
            if len > 0 {
                json.push(',');
            }
            json.push_str(u.json.get());
            len += 1;
        }
        json.push(']');
        Self { json, len }
    }

    /// How many users it lists.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The JSON array.
    pub fn as_json(&self) -> &str {
        &self.json
    }

    /// The users it lists, decoded again (tests read the list back through it).
    #[cfg(test)]
    pub fn users(&self) -> Vec<UserRef> {
        // Infallible: made only from encoded user objects.
        serde_json::from_str(&self.json).expect("an online list decodes")
    }
}

/// The role shown beside a user: their room role in a room's frames, their platform role in
/// `welcome`, `system` for the server's own announcements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownRole {
    Viewer,
    #[default]
    Member,
    Ta,
    Host,
    System,
    Student,
    Tutor,
    Admin,
}

impl ShownRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Student => PlatformRole::Student.as_str(),
            Self::Tutor => PlatformRole::Tutor.as_str(),
            Self::Admin => PlatformRole::Admin.as_str(),
            room => room.room().map_or("member", RoomRole::as_str),
        }
    }

    /// A stored or relayed role; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        RoomRole::parse(s).map(Self::from).or(match s {
            "system" => Some(Self::System),
            "student" => Some(Self::Student),
            "tutor" => Some(Self::Tutor),
            "admin" => Some(Self::Admin),
            _ => None,
        })
    }

    /// The room role it shows, if it is one.
    pub fn room(self) -> Option<RoomRole> {
        match self {
            Self::Viewer => Some(RoomRole::Viewer),
            Self::Member => Some(RoomRole::Member),
            Self::Ta => Some(RoomRole::Ta),
            Self::Host => Some(RoomRole::Host),
            _ => None,
        }
    }
}

impl From<RoomRole> for ShownRole {
    fn from(r: RoomRole) -> Self {
        match r {
            RoomRole::Viewer => Self::Viewer,
            RoomRole::Member => Self::Member,
            RoomRole::Ta => Self::Ta,
            RoomRole::Host => Self::Host,
        }
    }
}

impl From<PlatformRole> for ShownRole {
    fn from(r: PlatformRole) -> Self {
        match r {
            PlatformRole::Student => Self::Student,
            PlatformRole::Tutor => Self::Tutor,
            PlatformRole::Admin => Self::Admin,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client -> server

/// One client frame: an optional `rid` plus the command. (Serialize only in tests: the
/// property tests round-trip frames.)
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct ClientFrame {
    #[serde(default)]
    pub rid: Option<i64>,
    #[serde(flatten)]
    pub msg: ClientMsg,
}

/// Which reports the `reports` command lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportsState {
    /// Not resolved yet (the default).
    #[default]
    Open,
    Resolved,
    All,
}

/// Every client command. Unknown fields are ignored (forward compatibility); unknown types and
/// wrong field types are `bad_request`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Hello {
        token: String,
        /// Take a second call while in one (call waiting) instead of answering `busy`.
        #[serde(default)]
        call_waiting: bool,
    },
    Ping,
    /// A new token for this session, before the current one expires (same `sub`).
    Refresh {
        token: String,
    },
    Join {
        room: RoomId,
        #[serde(default)]
        after_seq: Option<i64>,
    },
    Leave {
        room: RoomId,
    },
    Send {
        room: RoomId,
        text: String,
        client_msg_id: String,
        #[serde(default)]
        reply_to: Option<MessageId>,
    },
    Edit {
        room: RoomId,
        id: MessageId,
        text: String,
    },
    Delete {
        room: RoomId,
        id: MessageId,
    },
    React {
        room: RoomId,
        id: MessageId,
        emoji: String,
    },
    Unreact {
        room: RoomId,
        id: MessageId,
        emoji: String,
    },
    History {
        room: RoomId,
        #[serde(default)]
        before_seq: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Typing {
        room: RoomId,
    },
    Read {
        room: RoomId,
        seq: i64,
    },
    Rooms,
    Ask {
        room: RoomId,
        text: String,
        #[serde(default)]
        anonymous: bool,
    },
    Vote {
        room: RoomId,
        question: QuestionId,
        up: bool,
    },
    Answer {
        room: RoomId,
        question: QuestionId,
        text: String,
    },
    QuestionStatus {
        room: RoomId,
        question: QuestionId,
        status: String,
    },
    Questions {
        room: RoomId,
        #[serde(default)]
        sort: Option<String>,
        #[serde(default)]
        status: Option<String>,
    },
    RaiseHand {
        room: RoomId,
    },
    LowerHand {
        room: RoomId,
        /// Host/TA may lower someone else's hand; default: one's own.
        #[serde(default)]
        user: Option<UserId>,
    },
    Hands {
        room: RoomId,
    },
    Stage {
        room: RoomId,
        user: UserId,
        on: bool,
    },
    Mute {
        room: RoomId,
        user: UserId,
        seconds: u64,
    },
    Unmute {
        room: RoomId,
        user: UserId,
    },
    Kick {
        room: RoomId,
        user: UserId,
    },
    Ban {
        room: RoomId,
        user: UserId,
    },
    Unban {
        room: RoomId,
        user: UserId,
    },
    SlowMode {
        room: RoomId,
        seconds: u64,
    },
    Report {
        room: RoomId,
        id: String,
        reason: String,
    },
    /// Host/ta: the room's report queue, with what each report points at.
    Reports {
        room: RoomId,
        #[serde(default)]
        state: ReportsState,
    },
    /// Host/ta: closes an open report with what was done about it.
    ReportResolve {
        room: RoomId,
        report: String,
        resolution: String,
    },
    Search {
        room: RoomId,
        q: String,
        #[serde(default)]
        limit: Option<u32>,
        #[serde(default)]
        offset: Option<u32>,
    },
    Call {
        to: UserId,
        #[serde(default = "default_media")]
        media: Media,
        /// A room both parties belong to (e.g. their `tutoring` room), recorded with the call.
        #[serde(default)]
        room: Option<RoomId>,
    },
    CallAccept {
        call_id: String,
    },
    CallReject {
        call_id: String,
    },
    CallHangup {
        call_id: String,
    },
    /// Take a call back after a dropped connection (or move it to this device).
    CallResume {
        call_id: String,
    },
    AvJoin {
        room: RoomId,
    },
    AvLeave {
        room: RoomId,
    },
    /// host/ta, SFU mode: stop forwarding `user`'s `kind` track in the room.
    AvMute {
        room: RoomId,
        user: UserId,
        kind: AvTrackKind,
    },
    /// host/ta, SFU mode: forward `user`'s `kind` track in the room again.
    AvUnmute {
        room: RoomId,
        user: UserId,
        kind: AvTrackKind,
    },
    Signal {
        #[serde(default)]
        call_id: Option<String>,
        #[serde(default)]
        room: Option<RoomId>,
        /// The target session, for A/V rooms.
        #[serde(default)]
        to: Option<String>,
        data: serde_json::Value,
    },
    // -- engagement and room health --
    /// Once per local day: the current and longest streak.
    Checkin {
        room: RoomId,
    },
    /// `period`: `week` (default), `month` or `all`.
    Leaderboard {
        room: RoomId,
        #[serde(default)]
        period: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Points, level, badges and streaks per room (`user` defaults to oneself).
    Profile {
        #[serde(default)]
        user: Option<UserId>,
        #[serde(default)]
        room: Option<RoomId>,
    },
    /// Room health for host/ta.
    Stats {
        room: RoomId,
        #[serde(default)]
        from: Option<i64>,
        #[serde(default)]
        to: Option<i64>,
        #[serde(default)]
        bucket: Option<String>,
    },
    /// Marks an answer helpful (`on: false` takes the mark back); host/ta or the asker.
    Helpful {
        room: RoomId,
        question: QuestionId,
        #[serde(default)]
        answer: Option<String>,
        #[serde(default = "default_true")]
        on: bool,
    },
    // -- polls and the class lifecycle --
    /// host/ta: a new poll, in `draft`.
    PollCreate {
        room: RoomId,
        #[serde(flatten)]
        poll: NewPoll,
    },
    PollOpen {
        room: RoomId,
        poll: String,
    },
    PollClose {
        room: RoomId,
        poll: String,
    },
    /// A member's answer (one per user, replaced while the poll is open).
    PollAnswer {
        room: RoomId,
        poll: String,
        #[serde(default)]
        choices: Option<Vec<u32>>,
        #[serde(default)]
        text: Option<String>,
    },
    Polls {
        room: RoomId,
    },
    /// host/ta: who answered a poll and when, one page at a time (`cursor`: the previous
    /// page's `next_cursor`).
    PollAnswers {
        room: RoomId,
        poll: String,
        #[serde(default)]
        cursor: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The room's ranking over its closed quizzes.
    QuizLeaderboard {
        room: RoomId,
        #[serde(default)]
        limit: Option<u32>,
    },
    ClassStart {
        room: RoomId,
    },
    ClassEnd {
        room: RoomId,
    },
    /// Host: moves an ended class back to `live`.
    ClassReopen {
        room: RoomId,
    },
    /// host/ta: the class summary (as `GET /api/rooms/{id}/summary` answers it).
    ClassSummary {
        room: RoomId,
    },
    // -- breakout groups and whiteboards --
    /// host/ta: splits the room into group rooms, by `groups`, by `count`, or both.
    BreakoutOpen {
        room: RoomId,
        #[serde(default)]
        groups: Option<Vec<GroupSpec>>,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        assign: Option<BreakoutAssign>,
        #[serde(default)]
        duration_s: Option<u32>,
    },
    /// host/ta: moves a user into another group of the room's open breakout.
    BreakoutMove {
        room: RoomId,
        user: UserId,
        group_room: RoomId,
    },
    /// host/ta: a message into every group room of the open breakout.
    BreakoutBroadcast {
        room: RoomId,
        text: String,
    },
    /// host/ta: closes the open breakout; its group rooms are archived.
    BreakoutClose {
        room: RoomId,
    },
    /// A group member asks host/ta for help (`room`: the group room, or the parent).
    Help {
        room: RoomId,
    },
    /// One y-protocols message (base64) for a board of the room.
    Board {
        room: RoomId,
        board: String,
        data: String,
    },
    /// host/ta: lets a user draw on a board (`draw: false` takes it back).
    BoardGrant {
        room: RoomId,
        board: String,
        user: UserId,
        draw: bool,
    },
}

fn default_true() -> bool {
    true
}

pub use studyhall_signaling::Media;

fn default_media() -> Media {
    Media {
        audio: true,
        video: true,
    }
}

impl ClientMsg {
    /// The command's `type`, for metrics and logs (never its body).
    /// The room a command acts on, if it names one.
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            Self::Join { room, .. }
            | Self::Leave { room, .. }
            | Self::Send { room, .. }
            | Self::Edit { room, .. }
            | Self::Delete { room, .. }
            | Self::React { room, .. }
            | Self::Unreact { room, .. }
            | Self::History { room, .. }
            | Self::Typing { room, .. }
            | Self::Read { room, .. }
            | Self::Ask { room, .. }
            | Self::Vote { room, .. }
            | Self::Answer { room, .. }
            | Self::QuestionStatus { room, .. }
            | Self::Questions { room, .. }
            | Self::RaiseHand { room, .. }
            | Self::LowerHand { room, .. }
            | Self::Hands { room, .. }
            | Self::Stage { room, .. }
            | Self::Mute { room, .. }
            | Self::Unmute { room, .. }
            | Self::Kick { room, .. }
            | Self::Ban { room, .. }
            | Self::Unban { room, .. }
            | Self::SlowMode { room, .. }
            | Self::Report { room, .. }
            | Self::Search { room, .. }
            | Self::AvJoin { room, .. }
            | Self::AvLeave { room, .. }
            | Self::AvMute { room, .. }
            | Self::AvUnmute { room, .. }
            | Self::Checkin { room, .. }
            | Self::Leaderboard { room, .. }
            | Self::Stats { room, .. }
            | Self::Helpful { room, .. }
            | Self::Reports { room, .. }
            | Self::ReportResolve { room, .. }
            | Self::PollCreate { room, .. }
            | Self::PollOpen { room, .. }
            | Self::PollClose { room, .. }
            | Self::PollAnswer { room, .. }
            | Self::Polls { room, .. }
            | Self::PollAnswers { room, .. }
            | Self::QuizLeaderboard { room, .. }
            | Self::ClassStart { room, .. }
            | Self::ClassEnd { room, .. }
            | Self::ClassReopen { room, .. }
            | Self::ClassSummary { room, .. }
            | Self::BreakoutOpen { room, .. }
            | Self::BreakoutMove { room, .. }
            | Self::BreakoutBroadcast { room, .. }
            | Self::BreakoutClose { room, .. }
            | Self::Help { room, .. }
            | Self::Board { room, .. }
            | Self::BoardGrant { room, .. } => Some(room),
            Self::Call { room, .. } | Self::Signal { room, .. } | Self::Profile { room, .. } => {
                room.as_ref()
            }
            _ => None,
        }
    }

    pub fn kind(&self) -> CommandKind {
        match self {
            Self::Hello { .. } => CommandKind::Hello,
            Self::Ping => CommandKind::Ping,
            Self::Refresh { .. } => CommandKind::Refresh,
            Self::Join { .. } => CommandKind::Join,
            Self::Leave { .. } => CommandKind::Leave,
            Self::Send { .. } => CommandKind::Send,
            Self::Edit { .. } => CommandKind::Edit,
            Self::Delete { .. } => CommandKind::Delete,
            Self::React { .. } => CommandKind::React,
            Self::Unreact { .. } => CommandKind::Unreact,
            Self::History { .. } => CommandKind::History,
            Self::Typing { .. } => CommandKind::Typing,
            Self::Read { .. } => CommandKind::Read,
            Self::Rooms => CommandKind::Rooms,
            Self::Ask { .. } => CommandKind::Ask,
            Self::Vote { .. } => CommandKind::Vote,
            Self::Answer { .. } => CommandKind::Answer,
            Self::QuestionStatus { .. } => CommandKind::QuestionStatus,
            Self::Questions { .. } => CommandKind::Questions,
            Self::RaiseHand { .. } | Self::LowerHand { .. } | Self::Hands { .. } => {
                CommandKind::Hand
            }
            Self::Stage { .. } => CommandKind::Stage,
            Self::Mute { .. }
            | Self::Unmute { .. }
            | Self::Kick { .. }
            | Self::Ban { .. }
            | Self::Unban { .. }
            | Self::SlowMode { .. }
            | Self::Reports { .. }
            | Self::ReportResolve { .. } => CommandKind::Moderate,
            Self::Report { .. } => CommandKind::Report,
            Self::Search { .. } => CommandKind::Search,
            Self::Call { .. }
            | Self::CallAccept { .. }
            | Self::CallReject { .. }
            | Self::CallHangup { .. }
            | Self::CallResume { .. } => CommandKind::Call,
            Self::AvJoin { .. }
            | Self::AvLeave { .. }
            | Self::AvMute { .. }
            | Self::AvUnmute { .. } => CommandKind::Av,
            Self::Signal { .. } => CommandKind::Signal,
            Self::Checkin { .. }
            | Self::Leaderboard { .. }
            | Self::Profile { .. }
            | Self::Stats { .. }
            | Self::Helpful { .. } => CommandKind::Engagement,
            Self::PollCreate { .. }
            | Self::PollOpen { .. }
            | Self::PollClose { .. }
            | Self::PollAnswer { .. }
            | Self::Polls { .. }
            | Self::PollAnswers { .. }
            | Self::QuizLeaderboard { .. } => CommandKind::Poll,
            Self::ClassStart { .. }
            | Self::ClassEnd { .. }
            | Self::ClassReopen { .. }
            | Self::ClassSummary { .. } => CommandKind::Class,
            Self::BreakoutOpen { .. }
            | Self::BreakoutMove { .. }
            | Self::BreakoutBroadcast { .. }
            | Self::BreakoutClose { .. }
            | Self::Help { .. } => CommandKind::Breakout,
            Self::Board { .. } | Self::BoardGrant { .. } => CommandKind::Board,
        }
    }
}

/// Command types as a closed set, so metrics can count them in a fixed array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Hello,
    Ping,
    Refresh,
    Join,
    Leave,
    Send,
    Edit,
    Delete,
    React,
    Unreact,
    History,
    Typing,
    Read,
    Rooms,
    Ask,
    Vote,
    Answer,
    QuestionStatus,
    Questions,
    Hand,
    Stage,
    Moderate,
    Report,
    Search,
    Call,
    Av,
    Signal,
    Invalid,
    Engagement,
    Poll,
    Class,
    Breakout,
    Board,
}

impl CommandKind {
    pub const ALL: [CommandKind; 33] = [
        Self::Hello,
        Self::Ping,
        Self::Refresh,
        Self::Join,
        Self::Leave,
        Self::Send,
        Self::Edit,
        Self::Delete,
        Self::React,
        Self::Unreact,
        Self::History,
        Self::Typing,
        Self::Read,
        Self::Rooms,
        Self::Ask,
        Self::Vote,
        Self::Answer,
        Self::QuestionStatus,
        Self::Questions,
        Self::Hand,
        Self::Stage,
        Self::Moderate,
        Self::Report,
        Self::Search,
        Self::Call,
        Self::Av,
        Self::Signal,
        Self::Invalid,
        Self::Engagement,
        Self::Poll,
        Self::Class,
        Self::Breakout,
        Self::Board,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Ping => "ping",
            Self::Refresh => "refresh",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Send => "send",
            Self::Edit => "edit",
            Self::Delete => "delete",
            Self::React => "react",
            Self::Unreact => "unreact",
            Self::History => "history",
            Self::Typing => "typing",
            Self::Read => "read",
            Self::Rooms => "rooms",
            Self::Ask => "ask",
            Self::Vote => "vote",
            Self::Answer => "answer",
            Self::QuestionStatus => "question_status",
            Self::Questions => "questions",
            Self::Hand => "hand",
            Self::Stage => "stage",
            Self::Moderate => "moderate",
            Self::Report => "report",
            Self::Search => "search",
            Self::Call => "call",
            Self::Av => "av",
            Self::Signal => "signal",
            Self::Invalid => "invalid",
            Self::Engagement => "engagement",
            Self::Poll => "poll",
            Self::Class => "class",
            Self::Breakout => "breakout",
            Self::Board => "board",
        }
    }
}

/// Best-effort read of a frame's `rid` when the frame as a whole did not parse, so the
/// `bad_request` reply can still carry it.
pub fn salvage_rid(text: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct RidOnly {
        rid: Option<i64>,
    }
    serde_json::from_str::<RidOnly>(text).ok()?.rid
}

// ---------------------------------------------------------------------------------------------
// Server -> client: sequenced room events (persisted, replayed, paged by history)

/// A persisted room event with its room and per-room `seq`, exactly as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequencedEvent {
    pub room: RoomId,
    pub seq: i64,
    #[serde(flatten)]
    pub event: RoomEvent,
}

/// The kinds of persisted room event. Each gets the room's next `seq` when committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A chat message (or an announcement from the HTTP API, `from.role == "system"`). The
    /// stored copy is kept current: `text`, `edited_ts`, `deleted` and `reactions` reflect later
    /// edits, deletes and reactions, so history shows each message as it is now.
    Message {
        id: MessageId,
        from: UserRef,
        text: String,
        reply_to: Option<MessageId>,
        ts: i64,
        client_msg_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edited_ts: Option<i64>,
        #[serde(default, skip_serializing_if = "is_false")]
        deleted: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reactions: Vec<ReactionCount>,
    },
    MessageEdited {
        id: MessageId,
        text: String,
        by: UserRef,
        ts: i64,
    },
    MessageDeleted {
        id: MessageId,
        by: UserRef,
        ts: i64,
    },
    Reaction {
        id: MessageId,
        emoji: String,
        user: UserRef,
        /// How many users now react with this emoji to this message.
        count: i64,
        /// `true` for `react`, `false` for `unreact`.
        added: bool,
        ts: i64,
    },
    /// A new question (members see `hidden` instead while it is pending).
    Question(QuestionView),
    /// A question changed: the whole question as it is now, and what changed.
    QuestionUpdated(QuestionUpdate),
    /// A poll was created, opened or closed, or its results changed (`change`: `created`,
    /// `opened`, `closed`, `results`). Members see drafts as `hidden`, and results and
    /// `correct` only once they may.
    Poll {
        poll: PollView,
        change: String,
    },
    /// The class started or ended (by the host or the clock).
    ClassState {
        state: ClassState,
        ts: i64,
    },
    /// What members see of an event meant only for host/ta (a pending question's events): the
    /// seq is used, so the order stays gap-free, but there is nothing to show.
    Hidden {},
}

/// Whether a committed event (its JSON as the server sends it) changes what a join snapshot
/// shows beyond the room's settings: a poll created, opened or closed (not a results update),
/// or a question's status changed (a pin among them; not a vote or an answer). Read from the
/// JSON, so it holds for events committed here, on another node or refilled from the store:
/// the tag and `change` are the encoder's, and a quote inside a string value is escaped.
pub fn changes_join_snapshot(json: &str) -> bool {
    if json.contains(r#""type":"poll","#) {
        return !json.ends_with(r#""change":"results"}"#);
    }
    json.contains(r#""type":"question_updated","#) && json.ends_with(r#""change":"status"}"#)
}

/// Whether committing the event `json` changed the stored copy of an earlier event: an edit, a
/// delete or a reaction rewrites its message's `message` event (and a delete its edits').
/// Read from the encoder's own output, where a quote inside a string value is escaped, so the
/// first `"type":"` is the event's tag (it follows `room` and `seq`); one scan per event.
pub fn rewrites_history(json: &str) -> bool {
    const TAG: &str = r#""type":""#;
    json.find(TAG).is_some_and(|at| {
        let kind = &json[at + TAG.len()..];
        ["message_edited\"", "message_deleted\"", "reaction\""]
            .iter()
            .any(|k| kind.starts_with(k))
    })
}

/// A question as shown to one audience: `author` is `null` for an anonymous question except
/// to host/ta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionView {
    pub id: QuestionId,
    pub text: String,
    pub author: Option<UserRef>,
    pub anonymous: bool,
    pub votes: i64,
    pub status: QuestionStatus,
    pub ts: i64,
    pub answers: Vec<AnswerView>,
    /// When the first answer was given.
    pub answered_at: Option<i64>,
    /// Unanswered past the room's answer SLA.
    #[serde(default)]
    pub overdue: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionUpdate {
    #[serde(flatten)]
    pub question: QuestionView,
    /// `vote`, `answer` or `status`.
    pub change: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnswerView {
    pub id: String,
    pub text: String,
    pub author: UserRef,
    pub ts: i64,
    /// Marked helpful by host/ta or the asker (`helpful` command).
    #[serde(default, skip_serializing_if = "is_false")]
    pub helpful: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionStatus {
    Pending,
    Open,
    Pinned,
    Answered,
    Dismissed,
}

impl QuestionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Open => "open",
            Self::Pinned => "pinned",
            Self::Answered => "answered",
            Self::Dismissed => "dismissed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "open" => Some(Self::Open),
            "pinned" => Some(Self::Pinned),
            "answered" => Some(Self::Answered),
            "dismissed" => Some(Self::Dismissed),
            _ => None,
        }
    }

    /// Still waiting for an answer (counts toward the answer SLA).
    pub fn is_unanswered(self) -> bool {
        matches!(self, Self::Pending | Self::Open | Self::Pinned)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionCount {
    pub emoji: String,
    pub count: i64,
}

// ---------------------------------------------------------------------------------------------
// Server -> client: everything else

/// Frames that are not persisted room events and not replies.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg<'a> {
    Welcome {
        session: &'a SessionId,
        user: &'a UserRef,
        heartbeat_s: u64,
    },
    Pong,
    Presence {
        room: &'a RoomId,
        user: &'a UserRef,
        state: PresenceState,
    },
    /// How many users are online in a room, for the sessions that get no per-user presence
    /// (a live room's audience, any room past the presence limit); at most once per
    /// `online_count_ms`, and only when it changed.
    OnlineCount {
        room: &'a RoomId,
        count: usize,
    },
    Typing {
        room: &'a RoomId,
        user: &'a UserRef,
    },
    Bye {
        reason: &'a str,
    },
    /// To host/ta (and the user's own sessions): a hand went up or down.
    Hand {
        room: &'a RoomId,
        user: &'a UserRef,
        raised: bool,
    },
    /// To everyone in the room: someone went on or off stage.
    Stage {
        room: &'a RoomId,
        user: &'a UserRef,
        on: bool,
    },
    /// To the removed sessions, just before they are closed 4003.
    Kicked {
        room: &'a RoomId,
        reason: &'a str,
    },
    /// To the muted user's sessions and host/ta: `until` is 0 when unmuted.
    Muted {
        room: &'a RoomId,
        user: &'a UserId,
        until: i64,
    },
    /// To everyone in the room: slow mode changed (0 = off).
    SlowMode {
        room: &'a RoomId,
        seconds: u64,
    },
    /// To host/ta: a new report in the room's moderation queue.
    Report {
        room: &'a RoomId,
        report: &'a views::Report,
    },
    /// To each session of the callee: a call is ringing.
    CallIncoming {
        call_id: &'a str,
        from: CallParty<'a>,
        media: Media,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a RoomId>,
    },
    /// To the parties: the call's state changed.
    CallState {
        call_id: &'a str,
        state: studyhall_signaling::calls::CallState,
    },
    /// To both parties once the call is over.
    CallEnded {
        call_id: &'a str,
        reason: studyhall_signaling::calls::EndReason,
        duration_ms: u64,
    },
    /// A relayed WebRTC signal (`call_id` for 1v1 calls, `room` for A/V rooms).
    Signal {
        #[serde(skip_serializing_if = "Option::is_none")]
        call_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        from: CallParty<'a>,
        data: &'a serde_json::Value,
    },
    /// To the A/V peers of a room: a session joined or left.
    AvPeer {
        room: &'a str,
        session: &'a str,
        user: &'a str,
        joined: bool,
    },
    /// To each session in a room's A/V when the server ends it for them (`reason`:
    /// `class_ended`): the session is out of the A/V, as after `av_leave`, and its peers got
    /// `av_peer {joined:false}`.
    AvClosed {
        room: &'a RoomId,
        reason: &'a str,
    },
    /// SFU mode, to each session of the owner: host/ta stopped forwarding its `kind` track.
    AvMuted {
        room: &'a RoomId,
        kind: AvTrackKind,
        by: &'a UserId,
    },
    /// SFU mode, to each session of the owner: host/ta forward its `kind` track again.
    AvUnmuted {
        room: &'a RoomId,
        kind: AvTrackKind,
        by: &'a UserId,
    },
    /// SFU mode, to the room's SFU sessions, at most every `sfu_speakers_ms` (500 ms or more),
    /// when the set changes: the users speaking now.
    ActiveSpeakers {
        room: &'a str,
        users: &'a [String],
    },
    /// To host/ta, once per question: it passed the room's answer SLA unanswered.
    QuestionOverdue {
        room: &'a RoomId,
        id: &'a QuestionId,
        ts: i64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<i64>,
        code: ErrorCode,
        message: &'a str,
    },
    // -- engagement --
    /// To every session of the user who earned it.
    Badge {
        room: &'a RoomId,
        badge: &'a views::BadgeView,
        user: &'a views::UserBrief,
        ts: i64,
    }, // -- breakout groups and whiteboards --
    /// To the user's sessions in the parent room: the group room they are in now.
    BreakoutAssigned {
        room: &'a RoomId,
        group_room: &'a RoomId,
    },
    /// To every session in the parent room and its group rooms: the groups are closed.
    BreakoutClosed {
        room: &'a RoomId,
    },
    /// To every session in the parent and the group rooms, once, `breakout_warning_s` before
    /// the groups close by themselves.
    BreakoutWarning {
        room: &'a RoomId,
        closes_at: i64,
    },
    /// To host/ta in the parent room: a group member asks for help.
    HelpRequested {
        room: &'a RoomId,
        group_room: &'a RoomId,
        user: &'a UserRef,
    },
    /// One y-protocols message (base64) of a board: relayed from another session, or the
    /// server's answer to a sync step 1.
    Board {
        room: &'a RoomId,
        board: &'a str,
        data: &'a str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    Online,
    Offline,
}

/// Who a call or signal comes from.
#[derive(Debug, Serialize)]
pub struct CallParty<'a> {
    pub user: &'a str,
    pub session: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
}

/// Whether a client frame's JSON holds a `\u0000` escape (a NUL character in some string).
/// No text the server keeps may hold one: PostgreSQL refuses it, and a refused row would
/// fail every write batched with it.
pub fn has_nul_escape(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while let Some(off) = b[i..].iter().position(|&c| c == b'\\') {
        let at = i + off;
        if b.get(at + 1) == Some(&b'u') && b.get(at + 2..at + 6) == Some(b"0000") {
            return true;
        }
        // Skip the escaped character (which may itself be a backslash).
        i = at + 2;
        if i >= b.len() {
            break;
        }
    }
    false
}

/// Encodes `{"type":"ok","rid":N, ...fields of result}` from a typed result (a struct that
/// serialises as a JSON object, one of [`replies`]), without building a `serde_json::Value`
/// first.
pub fn encode_ok_as<T: Serialize>(rid: i64, result: &T) -> String {
    #[derive(Serialize)]
    struct Ok<'a, T> {
        #[serde(rename = "type")]
        ty: &'static str,
        rid: i64,
        #[serde(flatten)]
        result: &'a T,
    }
    encode(&Ok {
        ty: "ok",
        rid,
        result,
    })
}

/// The room in a join reply.
#[derive(Debug, Serialize)]
pub struct RoomBrief<'a> {
    pub id: &'a RoomId,
    pub kind: RoomKind,
    pub title: &'a str,
}

/// The `ok` of `join`. Encode it with [`JoinOk::encode`]: its `Serialize` leaves `online` out
/// (that array is already encoded, and `encode` copies it in).
#[derive(Debug, Serialize)]
pub struct JoinOk<'a> {
    pub room: RoomBrief<'a>,
    pub role: RoomRole,
    pub last_seq: i64,
    /// Who is online (capped; `online_count` counts everyone): spliced in by
    /// [`JoinOk::encode`], already encoded.
    #[serde(skip)]
    pub online: &'a OnlineList,
    pub online_count: usize,
    pub stage: &'a [UserRef],
    /// Raised hands in raise order, for host/ta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hands: Option<Vec<RaisedHand>>,
    /// With `after_seq`: whether more was missed than the replay limit (page with `history`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<bool>,
    /// With `after_seq`: how many events follow this reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<usize>,
    /// The class state and times.
    pub class: ClassBrief,
    /// The pinned question, as the joiner's role sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<QuestionView>,
    /// The room's open polls, as the joiner's role sees them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub polls: Option<Vec<PollView>>,
    /// The room's open breakout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakout: Option<BreakoutSnapshot>,
    /// The ids of the room's boards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boards: Option<Vec<String>>,
}

impl JoinOk<'_> {
    /// The reply frame: `{"type":"ok","rid":N, ...the fields, "online":[...]}`, the online
    /// array copied in as it was encoded.
    pub fn encode(&self, rid: i64) -> String {
        let mut out = encode_ok_as(rid, self);
        // The struct encodes as an object, so the last byte is its `}`.
        debug_assert!(out.ends_with('}'));
        out.pop();
        out.reserve(12 + self.online.as_json().len());
        out.push_str(",\"online\":");
        out.push_str(self.online.as_json());
        out.push('}');
        out
    }
}

/// Which session description a `signal`'s `data` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    Offer,
    Answer,
}

/// The `data` of a `signal` that carries a session description (docs/protocol.md 10.7):
/// `{"sdp":{"type":"offer"|"answer","sdp":"v=0..."}}`.
pub fn sdp_signal(kind: SdpKind, sdp: &str) -> serde_json::Value {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: SdpKind,
        sdp: &'a str,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        sdp: Body<'a>,
    }
    // Two strings and an enum: serialising cannot fail.
    serde_json::to_value(Data {
        sdp: Body { kind, sdp },
    })
    .unwrap_or(serde_json::Value::Null)
}

/// `pong`, carrying the ping's `rid` when it had one.
pub fn encode_pong(rid: Option<i64>) -> String {
    match rid {
        Some(rid) => format!("{{\"type\":\"pong\",\"rid\":{rid}}}"),
        None => encode(&ServerMsg::Pong),
    }
}

/// Encodes a server frame. Serialization of these types cannot fail (no maps with non-string
/// keys, no foreign `Serialize` impls), so a failure is a bug and is reported as an internal
/// error frame rather than a panic.
pub fn encode<T: Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).unwrap_or_else(|_| {
        r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_owned()
    })
}

// ---------------------------------------------------------------------------------------------
// Errors and close codes

/// Protocol error codes (section 4 of the contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    NotMember,
    Muted,
    RateLimited,
    TooLarge,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::NotMember => "not_member",
            Self::Muted => "muted",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// WebSocket close codes the server uses.
pub mod close {
    /// Normal closure (idle timeout: no frame for 2 x heartbeat).
    pub const NORMAL: u16 = 1000;
    /// Server shutdown or drain.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (bad framing, unmasked frame, bad opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Frame larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
    /// No valid `hello` in time, bad or expired token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Kicked or banned.
    pub const KICKED: u16 = 4003;
    /// Slow consumer: its outbox overflowed.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Flooding past the rate limit, or too many sessions for one user.
    pub const RATE_LIMITED: u16 = 4029;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_signal_data_has_the_documented_shape() {
        assert_eq!(
            sdp_signal(SdpKind::Offer, "v=0"),
            serde_json::json!({"sdp": {"type": "offer", "sdp": "v=0"}})
        );
        assert_eq!(sdp_signal(SdpKind::Answer, "v=0")["sdp"]["type"], "answer");
    }

    #[test]
    fn shown_roles_keep_their_wire_names() {
        use ShownRole::*;
        for r in [Viewer, Member, Ta, Host, System, Student, Tutor, Admin] {
            let wire = serde_json::to_string(&r).unwrap();
            assert_eq!(wire, format!("\"{}\"", r.as_str()));
            assert_eq!(ShownRole::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::from_str::<ShownRole>(&wire).unwrap(), r);
        }
        assert_eq!(ShownRole::parse("owner"), None);
        assert_eq!(ShownRole::from(RoomRole::Ta).room(), Some(RoomRole::Ta));
        assert_eq!(ShownRole::from(PlatformRole::Tutor).room(), None);
    }

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul_escape(r#"{"text":"a\u0000b"}"#));
        assert!(
            !has_nul_escape(r#"{"text":"a\\u0000b"}"#),
            "an escaped backslash then text"
        );
        assert!(has_nul_escape(r#"{"text":"\\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"text":"\u0001 \n"}"#));
        assert!(!has_nul_escape(r#"{"text":"ends with \\"}"#));
    }

    #[test]
    fn room_ids() {
        assert!(valid_room_id("algebra-101"));
        assert!(valid_room_id("a.b_c-D9"));
        assert!(valid_room_id(&"x".repeat(64)));
        assert!(!valid_room_id(""));
        assert!(!valid_room_id(&"x".repeat(65)));
        assert!(!valid_room_id("has space"));
        assert!(!valid_room_id("slash/no"));
        assert!(!valid_room_id("émoji"));
    }

    #[test]
    fn parses_commands_with_rid_and_ignores_unknown_fields() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"join","rid":7,"room":"r1","after_seq":3,"x":1}"#)
                .unwrap();
        assert_eq!(f.rid, Some(7));
        assert!(matches!(
            f.msg,
            ClientMsg::Join {
                after_seq: Some(3),
                ..
            }
        ));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"join","room":5}"#).is_err());
        assert_eq!(salvage_rid(r#"{"type":"nope","rid":9}"#), Some(9));
    }

    /// `poll_create` carries its poll's fields flat beside `room`: all of them, only the
    /// required ones (the rest take their defaults), unknown ones ignored, wrong types refused.
    #[test]
    fn poll_create_reads_its_poll_fields_flat() {
        let parse = |json: &str| match serde_json::from_str::<ClientFrame>(json) {
            Ok(ClientFrame {
                rid,
                msg: ClientMsg::PollCreate { room, poll },
            }) => Ok((rid, room, poll)),
            Ok(other) => panic!("not a poll_create: {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let full = parse(
            r#"{"type":"poll_create","rid":2,"room":"r","kind":"quiz","question":"2 + 2?",
            "options":["3","4"],"multiple":true,"correct":[1],"duration_s":30,
            "show_results":"live","later":{"x":1}}"#,
        );
        let want = NewPoll {
            kind: PollKind::Quiz,
            question: "2 + 2?".into(),
            options: Some(vec!["3".into(), "4".into()]),
            multiple: true,
            correct: Some(vec![1]),
            duration_s: Some(30),
            show_results: Some(ShowResults::Live),
        };
        assert_eq!(full, Ok((Some(2), RoomId::from("r"), want)));
        let least =
            parse(r#"{"type":"poll_create","room":"r","kind":"word_cloud","question":"?"}"#);
        let want = NewPoll {
            kind: PollKind::WordCloud,
            question: "?".into(),
            options: None,
            multiple: false,
            correct: None,
            duration_s: None,
            show_results: None,
        };
        assert_eq!(least, Ok((None, RoomId::from("r"), want)));
        for bad in [
            r#"{"type":"poll_create","room":"r","question":"?"}"#,
            r#"{"type":"poll_create","room":"r","kind":"poll","question":"?","duration_s":-1}"#,
            r#"{"type":"poll_create","room":"r","kind":"poll","question":"?","multiple":"yes"}"#,
            r#"{"type":"poll_create","kind":"poll","question":"?"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn sequenced_event_round_trips_with_flat_shape() {
        let ev = SequencedEvent {
            room: "r".into(),
            seq: 4,
            event: RoomEvent::Message {
                id: "m1".into(),
                from: UserRef {
                    id: "u".into(),
                    name: "U".into(),
                    role: ShownRole::Member,
                },
                text: "hi".into(),
                reply_to: None,
                ts: 1,
                client_msg_id: Some("c1".into()),
                edited_ts: None,
                deleted: false,
                reactions: vec![],
            },
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["seq"], 4);
        assert_eq!(json["room"], "r");
        assert_eq!(json["from"]["id"], "u");
        assert!(json.get("deleted").is_none());
        let back: SequencedEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn ok_reply_merges_result_fields() {
        let v: serde_json::Value =
            serde_json::from_str(&encode_ok_as(3, &ReadOk { seq: 9 })).unwrap();
        assert_eq!(v, serde_json::json!({"type": "ok", "rid": 3, "seq": 9}));
        let empty = encode_ok_as(4, &EmptyOk {});
        assert_eq!(empty, r#"{"type":"ok","rid":4}"#);
        let unchanged = encode_ok_as(5, &WriteOk::Seq(SeqOk { seq: None }));
        assert_eq!(unchanged, r#"{"type":"ok","rid":5,"seq":null}"#);
    }

    #[test]
    fn history_splices_stored_events() {
        let events = vec![r#"{"type":"hidden","room":"r","seq":1}"#.to_owned(); 2];
        let page = HistoryOk {
            events: &events,
            has_more: true,
        };
        let v: serde_json::Value = serde_json::from_str(&page.encode_ok(7)).unwrap();
        assert_eq!(v["type"], "ok");
        assert_eq!(v["rid"], 7);
        assert_eq!(v["events"][1]["seq"], 1);
        assert_eq!(v["has_more"], true);
        let empty = HistoryOk {
            events: &[],
            has_more: false,
        };
        assert_eq!(empty.encode(), r#"{"events":[],"has_more":false}"#);
    }

    /// Every error code; `every_code_is_listed` stops compiling when a variant is added, as a
    /// reminder to list it here too.
    const ALL_CODES: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NotMember,
        ErrorCode::Muted,
        ErrorCode::RateLimited,
        ErrorCode::TooLarge,
        ErrorCode::Conflict,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    fn every_code_is_listed(code: ErrorCode) -> bool {
        match code {
            ErrorCode::BadRequest
            | ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::NotFound
            | ErrorCode::NotMember
            | ErrorCode::Muted
            | ErrorCode::RateLimited
            | ErrorCode::TooLarge
            | ErrorCode::Conflict
            | ErrorCode::Unavailable
            | ErrorCode::Internal => ALL_CODES.contains(&code),
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ALL_CODES {
            assert!(every_code_is_listed(code));
            let quoted = format!("\"{}\"", code.as_str());
            assert_eq!(serde_json::to_string(&code).unwrap(), quoted);
            let back: ErrorCode = serde_json::from_str(&quoted).unwrap();
            assert_eq!(back, code);
        }
        assert!(serde_json::from_str::<ErrorCode>(r#""no_such_code""#).is_err());
    }

    #[test]
    fn the_events_that_change_a_join_snapshot_or_history_are_told_from_their_json() {
        let event = |event: RoomEvent| {
            encode(&SequencedEvent {
                room: RoomId::from("r"),
                seq: 7,
                event,
            })
        };
        let poll: PollView = serde_json::from_str(
            r#"{"id":"p1","kind":"poll","question":"\"type\":\"poll\",","options":["a","b"],
                "multiple":false,"show_results":"live","state":"open","closes_at":null,
                "duration_s":null,"results":{"answers":0,"counts":[0,0]},"created_at":1}"#,
        )
        .unwrap();
        for (change, shown) in [
            ("created", true),
            ("opened", true),
            ("closed", true),
            ("results", false),
        ] {
            let change = change.to_owned();
            let json = event(RoomEvent::Poll {
                poll: poll.clone(),
                change,
            });
            assert_eq!(changes_join_snapshot(&json), shown, "{json}");
        }
        let question = QuestionView {
            id: QuestionId::from("q1"),
            text: r#"{"type":"poll","change":"status"}"#.into(),
            author: None,
            anonymous: true,
            votes: 2,
            status: QuestionStatus::Pinned,
            ts: 1,
            answers: vec![],
            answered_at: None,
            overdue: false,
        };
        for (change, shown) in [("status", true), ("vote", false), ("answer", false)] {
            let json = event(RoomEvent::QuestionUpdated(QuestionUpdate {
                question: question.clone(),
                change: change.to_owned(),
            }));
            assert_eq!(changes_join_snapshot(&json), shown, "{json}");
            assert!(!rewrites_history(&json), "{json}");
        }
        // A message or a new question that quotes the tags is neither.
        let json = event(RoomEvent::Question(question));
        assert!(!changes_join_snapshot(&json), "{json}");
        assert!(!rewrites_history(&json), "{json}");
        let text = r#"{"type":"poll","x":1,"change":"created"}","type":"reaction","#;
        let user = UserRef {
            id: UserId::from("u"),
            name: "U".into(),
            role: ShownRole::Student,
        };
        let id = MessageId::from("m1");
        let json = event(RoomEvent::Message {
            id: id.clone(),
            from: user.clone(),
            text: text.into(),
            reply_to: None,
            ts: 1,
            client_msg_id: None,
            edited_ts: None,
            deleted: false,
            reactions: vec![],
        });
        assert!(!changes_join_snapshot(&json), "{json}");
        assert!(!rewrites_history(&json), "{json}");
        // An edit, a delete and a reaction rewrite the stored message.
        for rewrite in [
            RoomEvent::MessageEdited {
                id: id.clone(),
                text: r#"x","type":"message","#.into(),
                by: user.clone(),
                ts: 1,
            },
            RoomEvent::MessageDeleted {
                id: id.clone(),
                by: user.clone(),
                ts: 1,
            },
            RoomEvent::Reaction {
                id: id.clone(),
                emoji: "+".into(),
                user: user.clone(),
                count: 1,
                added: true,
                ts: 1,
            },
        ] {
            let json = event(rewrite);
            assert!(rewrites_history(&json), "{json}");
            assert!(!changes_join_snapshot(&json), "{json}");
        }
    }

    #[test]
    fn a_join_reply_carries_its_online_list_as_encoded() {
        let user = |id: &str, name: &str| UserRef {
            id: UserId(id.into()),
            name: name.into(),
            role: ShownRole::Member,
        };
        let listed = [
            Listed::new(user("a", "Ann \"A\"")),
            Listed::new(user("b", "Bo")),
        ];
        let online = OnlineList::new(listed.iter().map(|u| &**u));
        assert_eq!(online.len(), 2);
        assert_eq!(
            online.users(),
            vec![user("a", "Ann \"A\""), user("b", "Bo")]
        );
        let empty = OnlineList::new(std::iter::empty());
        assert!(empty.is_empty());
        assert_eq!(empty.as_json(), "[]");
        for list in [&online, &empty] {
            let reply = JoinOk {
                room: RoomBrief {
                    id: &RoomId("r".into()),
                    kind: RoomKind::Group,
                    title: "R",
                },
                role: RoomRole::Member,
                last_seq: 7,
                online: list,
                online_count: list.len(),
                stage: &[],
                hands: None,
                gap: Some(false),
                replayed: Some(0),
                class: ClassBrief {
                    state: ClassState::Live,
                    starts_at: None,
                    ends_at: None,
                    started_at: None,
                },
                pinned: None,
                polls: None,
                breakout: None,
                boards: None,
            };
            let v: serde_json::Value = serde_json::from_str(&reply.encode(3)).unwrap();
            assert_eq!(
                (v["type"].as_str(), v["rid"].as_i64()),
                (Some("ok"), Some(3))
            );
            assert_eq!(v["last_seq"], 7);
            assert_eq!(
                v["online"],
                serde_json::from_str::<serde_json::Value>(list.as_json()).unwrap()
            );
            assert_eq!(v["online_count"], list.len());
        }
    }
}
