//! The Store API: rooms, members, the per-room event log, messages, reactions, read markers
//! and settings, over two backends (SQLite, the embedded default, and PostgreSQL) through one
//! implementation on sqlx's `Any` driver. Only this module runs SQL. Sequenced writes go
//! through the group-commit writer in `writer.rs`; the backend differences (connect options,
//! migrations, how a write transaction begins) live in `sqlite.rs` and `postgres.rs`.
//! The store knows nothing of WebSockets or the hub: committed events leave it through the
//! hook given to [`Store::open`].
//!
//! Every `LIMIT` takes its parameter as `CAST($n AS BIGINT)`: SQLite plans a bare `LIMIT $n`
//! with the bound value, so each new binding would expire the prepared statement and every
//! run would parse and plan it again.

mod av;
mod boards;
mod breakouts;
mod calls;
mod class;
mod engagement;
mod messages;
mod moderation;
mod polls;
mod postgres;
mod qa;
mod rows;
mod search;
mod sends;
mod sfu;
mod sqlite;
mod stats;
mod webhooks;
mod writer;

pub use crate::protocol::views::RoomSummary;
pub use av::{AvAdmitted, AvJoin, AvMember};
pub use boards::{Compacted, StoredBoard};
pub use breakouts::{Breakout, BreakoutGroupRow, NewBreakout, NewGroup};
pub use calls::CallLogEntry;
pub use class::{PresenceKind, RoomExtras};
pub use engagement::{
    BadgeHook, BadgeView, EarnedBadge, EngagementSettings, LeaderRow, MemberEngagement, UserBrief,
};
pub use moderation::{AuditEntry, MAX_REASON_CHARS, Report};
pub use polls::PollSpec;
pub use qa::{QuestionFilter, QuestionRecord, QuestionSort};
pub use search::SearchHit;
pub use stats::{RoomStats, StatsQuery};
pub use webhooks::{
    Attempt, AttemptResult, Delivery, DueDelivery, EventType, MemberRuns, Pruned, Webhook,
    WebhookKeys,
};
pub use writer::{CommitHook, CommittedEvent, SendOp, WriteOp, WriteOutcome};

use crate::metrics::Metrics;
use crate::protocol::{RoomId, RoomKind, RoomRole, UserId, Visibility};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The database did not answer the first connection at start. `target` is host and port
    /// only (never credentials); `cause` is why (connection refused, no such host, bad
    /// password, ...).
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Connect { target: String, cause: String },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store writer has shut down")]
    Closed,
    /// A bounded resource (the search slots) stayed busy: try again later.
    #[error("{0}")]
    Busy(String),
}

impl StoreError {
    /// The same refusal again, for each write of a batch it applies to (database errors are
    /// never duplicated: they abort the batch instead).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::NotFound(w) => Self::NotFound(w),
            Self::Conflict(m) => Self::Conflict(m.clone()),
            Self::Forbidden(m) => Self::Forbidden(m.clone()),
            Self::BadRequest(m) => Self::BadRequest(m.clone()),
            Self::TooLarge(m) => Self::TooLarge(m.clone()),
            Self::Corrupt(m) => Self::Corrupt(m.clone()),
            Self::Busy(m) => Self::Busy(m.clone()),
            Self::Db(_) | Self::Connect { .. } | Self::Migrate(_) | Self::Closed => Self::Closed,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How to open the store; a subset of [`crate::config::Config`] so tests can build it alone.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub url: String,
    pub pool_size: u32,
    pub batch_max: usize,
    pub batch_linger_us: u64,
    /// How long a batch of writes nobody waits for lingers for more (see the writer).
    pub detached_linger_ms: u64,
    pub queue: usize,
    pub sqlite_synchronous: String,
    /// Whether each `COMMIT` syncs the SQLite log itself (else the writer's publisher does,
    /// before answering: see `writer.rs`).
    pub sqlite_commit_syncs: bool,
    /// SQLite's page cache per connection, in KiB.
    pub sqlite_cache_kib: u32,
    /// Searches run at once; more wait up to `search_wait_ms`, then are refused.
    pub search_concurrency: usize,
    pub search_wait_ms: u64,
    /// Longest a search may run before its caller is answered `unavailable`.
    pub search_timeout_ms: u64,
    /// Points, caps and badge rules the writer applies to contributions.
    pub engagement: Arc<crate::engagement::EngagementConfig>,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        let d = crate::config::Config::default();
        Self {
            url: url.into(),
            pool_size: d.db_pool_size,
            batch_max: d.store_batch_max,
            batch_linger_us: d.store_batch_linger_us,
            detached_linger_ms: d.store_detached_linger_ms,
            queue: d.store_queue,
            sqlite_synchronous: d.sqlite_synchronous,
            sqlite_commit_syncs: d.sqlite_commit_syncs,
            sqlite_cache_kib: d.sqlite_cache_kib,
            search_concurrency: d.search_concurrency,
            search_wait_ms: d.search_wait_ms,
            search_timeout_ms: d.search_timeout_ms,
            engagement: Arc::new(d.engagement),
        }
    }

    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            url: c.database_url.clone(),
            pool_size: c.db_pool_size,
            batch_max: c.store_batch_max,
            batch_linger_us: c.store_batch_linger_us,
            detached_linger_ms: c.store_detached_linger_ms,
            queue: c.store_queue,
            sqlite_synchronous: c.sqlite_synchronous.clone(),
            sqlite_commit_syncs: c.sqlite_commit_syncs,
            sqlite_cache_kib: c.sqlite_cache_kib,
            search_concurrency: c.search_concurrency,
            search_wait_ms: c.search_wait_ms,
            search_timeout_ms: c.search_timeout_ms,
            engagement: Arc::new(c.engagement.clone()),
        }
    }
}

/// A room as the HTTP API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Room {
    pub id: RoomId,
    pub kind: RoomKind,
    pub title: String,
    pub visibility: Visibility,
    pub qa: QaSettings,
    pub starts_at: Option<i64>,
    /// When the class ends by the clock.
    #[serde(default)]
    pub ends_at: Option<i64>,
    /// The class state now (`scheduled`, `live`, `ended`): what was recorded, moved on by the
    /// clock where `starts_at`/`ends_at` have passed.
    #[serde(default)]
    pub state: crate::protocol::ClassState,
    /// When the class started (`class_start`, or the clock at `starts_at`).
    #[serde(default)]
    pub started_at: Option<i64>,
    /// When the class ended (`class_end`, or the clock at `ends_at`).
    #[serde(default)]
    pub ended_at: Option<i64>,
    pub archived: bool,
    pub last_seq: i64,
    pub created_at: i64,
    /// Seconds a question may wait for an answer before it is `overdue`.
    pub answer_sla_s: i64,
    /// At most one message per user per this many seconds (0 = off); host/ta are exempt.
    pub slow_mode_s: i64,
    pub rules: RoomRules,
    /// Badge announcements and the room's time zone.
    #[serde(default)]
    pub engagement: EngagementSettings,
    /// How the room's audio/video is carried (mesh, SFU, or auto).
    #[serde(default)]
    pub av: crate::protocol::AvSettings,
    /// The stage's talk-time cap and whether the server enforces it.
    #[serde(default)]
    pub stage: crate::protocol::StageSettings,
}

/// Default answer SLA: 4 hours.
pub const DEFAULT_ANSWER_SLA_S: i64 = 4 * 3600;

impl Room {
    /// A new room with every setting at its default (Q&A off, no schedule, nothing logged),
    /// created now; callers set what differs with struct update syntax.
    pub fn new(id: RoomId, kind: RoomKind, title: String, visibility: Visibility) -> Self {
        Self {
            id,
            kind,
            title,
            visibility,
            qa: QaSettings::default(),
            starts_at: None,
            ends_at: None,
            state: crate::protocol::ClassState::Live,
            started_at: None,
            ended_at: None,
            archived: false,
            last_seq: 0,
            created_at: now_ms(),
            answer_sla_s: DEFAULT_ANSWER_SLA_S,
            slow_mode_s: 0,
            rules: RoomRules::default(),
            engagement: EngagementSettings::default(),
            av: Default::default(),
            stage: Default::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaSettings {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub moderated: bool,
    /// Members may answer questions too (study groups), not only host/ta.
    #[serde(default)]
    pub peer_answers: bool,
}

/// Content rules the server enforces on messages, questions and answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRules {
    /// Words or phrases refused anywhere in a text (case-insensitive).
    #[serde(default)]
    pub blocked_words: Vec<String>,
    #[serde(default)]
    pub links: LinkPolicy,
}

/// Which links members may post: any, none, or only to these domains (and their subdomains).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LinkPolicy {
    #[default]
    #[serde(with = "allow_tag")]
    Allow,
    #[serde(with = "deny_tag")]
    Deny,
    Domains {
        domains: Vec<String>,
    },
}

macro_rules! unit_tag {
    ($module:ident, $tag:literal) => {
        mod $module {
            use serde::{Deserialize, Deserializer, Serializer, de::Error};
            pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($tag)
            }
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
                let v = String::deserialize(d)?;
                if v == $tag {
                    Ok(())
                } else {
                    Err(D::Error::custom(concat!("expected ", $tag)))
                }
            }
        }
    };
}
unit_tag!(allow_tag, "allow");
unit_tag!(deny_tag, "deny");

/// Changes to a room; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPatch {
    pub kind: Option<RoomKind>,
    pub title: Option<String>,
    pub visibility: Option<Visibility>,
    pub qa: Option<QaSettings>,
    /// `Some(None)` clears it.
    #[serde(default, with = "double_option")]
    pub starts_at: Option<Option<i64>>,
    /// `Some(None)` clears it.
    #[serde(default, with = "double_option")]
    pub ends_at: Option<Option<i64>>,
    pub archived: Option<bool>,
    pub answer_sla_s: Option<i64>,
    pub slow_mode_s: Option<i64>,
    pub rules: Option<RoomRules>,
    pub engagement: Option<EngagementSettings>,
    pub av: Option<crate::protocol::AvSettings>,
    pub stage: Option<crate::protocol::StageSettings>,
}

impl RoomPatch {
    /// Sets the fields the patch names on `room`.
    fn apply_to(&self, room: &mut Room) {
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(v) = &self.$field {
                    room.$field = v.clone();
                })*
            };
        }
        set!(
            kind,
            title,
            visibility,
            qa,
            starts_at,
            ends_at,
            archived,
            answer_sla_s,
            slow_mode_s,
            rules,
            engagement,
            av,
            stage
        );
    }
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

/// Binds a room's settings, in the order of the placeholders `$3` to `$18` that
/// [`write_room`] and `create_room` share (`$1` is the id, `$2` what differs).
fn bind_settings<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    room: &'q Room,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    q.bind(room.kind.as_str())
        .bind(room.title.as_str())
        .bind(room.visibility.as_str())
        .bind(i64::from(room.qa.enabled))
        .bind(i64::from(room.qa.moderated))
        .bind(room.starts_at)
        .bind(i64::from(room.qa.peer_answers))
        .bind(room.answer_sla_s)
        .bind(room.slow_mode_s)
        .bind(rules_json(&room.rules))
        .bind(room.engagement.json())
        .bind(room.ends_at)
        .bind(initial_state(room.starts_at, now_ms()).as_str())
        .bind(room.av.mode.as_str())
        .bind(room.stage.talk_cap_s.map(i64::from))
        .bind(i64::from(room.stage.auto_down))
}

/// Writes a room's settings (all but its id) to its row. A class not yet started takes the
/// state its (new) start time implies.
async fn write_room(tx: &mut writer::Tx<'_>, id: &RoomId, room: &Room) -> Result<()> {
    let q = sqlx::query(
        "UPDATE rooms SET archived = $2, kind = $3, title = $4, visibility = $5, \
         qa_enabled = $6, qa_moderated = $7, starts_at = $8, qa_peer_answers = $9, \
         answer_sla_s = $10, slow_mode_s = $11, rules = $12, engagement = $13, ends_at = $14, \
         class_state = CASE WHEN class_state <> 'ended' AND started_at IS NULL THEN $15 \
         ELSE class_state END, av_mode = $16, stage_talk_cap_s = $17, stage_auto_down = $18 \
         WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(i64::from(room.archived));
    bind_settings(q, room).execute(&mut **tx).await?;
    Ok(())
}

/// Which rooms one page of [`Store::rooms_page`] holds: rooms in id order after `after`,
/// optionally only of one kind, or only those where `member` has a stored membership.
#[derive(Clone, Debug, Default)]
pub struct RoomQuery {
    pub kind: Option<RoomKind>,
    pub member: Option<UserId>,
    /// Keyset cursor: only rooms whose id sorts after this one.
    pub after: Option<RoomId>,
    /// Most rooms in the page (at least 1 is used).
    pub limit: u32,
}

/// One page of rooms, in id order; `has_more` when rooms past the last one match too.
#[derive(Clone, Debug, Default)]
pub struct RoomPage {
    pub rooms: Vec<Room>,
    pub has_more: bool,
}

/// Which rendering of the event log a reader gets: host/ta (and the HTTP API) see everything;
/// members see anonymous authors removed and pending questions as `hidden`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Moderator,
    Member,
}

impl View {
    pub fn of(role: RoomRole) -> Self {
        if role.can_moderate() {
            Self::Moderator
        } else {
            Self::Member
        }
    }

    fn flag(self) -> i64 {
        i64::from(self == Self::Moderator)
    }
}

/// A page of the event log: wire JSON of each event, oldest first.
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    pub events: Vec<String>,
    pub has_more: bool,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<writer::Request>,
    writer_done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    badge_hook: engagement::BadgeHookSlot,
    /// Which webhook event types some enabled endpoint subscribes to (shared with the writer).
    subscribed: Arc<webhooks::Subscribed>,
    /// Notified when a commit queued webhook deliveries.
    outbox: Arc<tokio::sync::Notify>,
    /// Searches in flight hold a slot: they never take more than this many pool connections.
    search: search::Limits,
    /// The writer's latest edit, delete or reaction per room (shared with the writer).
    rewrites: Arc<writer::Rewrites>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The columns [`room_from_row`] reads.
macro_rules! room_columns {
    () => {
        "id, kind, title, visibility, qa_enabled, qa_moderated, qa_peer_answers, starts_at, \
         archived, last_seq, created_at, answer_sla_s, slow_mode_s, rules, engagement, ends_at, \
         class_state, started_at, ended_at, av_mode, stage_talk_cap_s, stage_auto_down"
    };
}
const SELECT_ROOM: &str = concat!("SELECT ", room_columns!(), " FROM rooms WHERE id = $1");

/// [`Store::room_access`]: the lists as JSON arrays beside the room's columns.
const SELECT_ROOM_ACCESS: rows::Sql = rows::Sql {
    sqlite: concat!(
        "SELECT ",
        room_columns!(),
        ", (SELECT json_group_array(json_array(user_id, role)) FROM room_members \
         WHERE room_id = $1) AS access_members, \
         (SELECT json_group_array(user_id) FROM bans WHERE room_id = $1) AS access_bans, \
         (SELECT json_group_array(json_array(user_id, until)) FROM mutes \
         WHERE room_id = $1 AND until > $2) AS access_mutes \
         FROM rooms WHERE id = $1"
    ),
    postgres: concat!(
        "SELECT ",
        room_columns!(),
        ", (SELECT json_agg(json_build_array(user_id, role))::text FROM room_members \
         WHERE room_id = $1) AS access_members, \
         (SELECT json_agg(user_id)::text FROM bans WHERE room_id = $1) AS access_bans, \
         (SELECT json_agg(json_build_array(user_id, until))::text FROM mutes \
         WHERE room_id = $1 AND until > $2) AS access_mutes \
         FROM rooms WHERE id = $1"
    ),
};

/// A room and who may do what in it ([`Store::room_access`]).
#[derive(Clone, Debug)]
pub struct RoomAccess {
    pub room: Room,
    pub members: Vec<(UserId, RoomRole)>,
    pub banned: Vec<UserId>,
    /// User -> muted until (ms).
    pub mutes: std::collections::HashMap<UserId, i64>,
}

/// The room as the caller's transaction sees it (`not found` when there is none).
async fn room_in(tx: &mut writer::Tx<'_>, id: &RoomId) -> Result<Room> {
    let row = sqlx::query(SELECT_ROOM)
        .bind(id.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref()
        .map(room_from_row)
        .transpose()?
        .ok_or(StoreError::NotFound("room"))
}

fn room_from_row(row: &AnyRow) -> Result<Room> {
    let kind: String = row.try_get("kind")?;
    let visibility: String = row.try_get("visibility")?;
    let state: String = row.try_get("class_state")?;
    let av_mode: String = row.try_get("av_mode")?;
    let starts_at: Option<i64> = row.try_get("starts_at")?;
    let ends_at: Option<i64> = row.try_get("ends_at")?;
    let state = crate::protocol::ClassState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("class state {state}")))?
        .at(starts_at, ends_at, now_ms());
    Ok(Room {
        id: RoomId(row.try_get("id")?),
        kind: RoomKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("room kind {kind}")))?,
        title: row.try_get("title")?,
        visibility: Visibility::parse(&visibility)
            .ok_or_else(|| StoreError::Corrupt(format!("room visibility {visibility}")))?,
        qa: QaSettings {
            enabled: row.try_get::<i64, _>("qa_enabled")? != 0,
            moderated: row.try_get::<i64, _>("qa_moderated")? != 0,
            peer_answers: row.try_get::<i64, _>("qa_peer_answers")? != 0,
        },
        starts_at,
        ends_at,
        state,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        archived: row.try_get::<i64, _>("archived")? != 0,
        last_seq: row.try_get("last_seq")?,
        created_at: row.try_get("created_at")?,
        answer_sla_s: row.try_get("answer_sla_s")?,
        slow_mode_s: row.try_get("slow_mode_s")?,
        rules: serde_json::from_str(&row.try_get::<String, _>("rules")?)
            .map_err(|e| StoreError::Corrupt(format!("room rules: {e}")))?,
        engagement: EngagementSettings::parse(&row.try_get::<String, _>("engagement")?),
        av: crate::protocol::AvSettings {
            mode: crate::protocol::AvRoomMode::parse(&av_mode)
                .ok_or_else(|| StoreError::Corrupt(format!("room av mode {av_mode}")))?,
        },
        stage: crate::protocol::StageSettings {
            talk_cap_s: row
                .try_get::<Option<i64>, _>("stage_talk_cap_s")?
                .and_then(|s| u32::try_from(s).ok()),
            auto_down: row.try_get::<i64, _>("stage_auto_down")? != 0,
        },
    })
}

/// The class state of a room not started yet: `scheduled` while `starts_at` is ahead, else
/// `live` (a room without a schedule is live from the start).
fn initial_state(starts_at: Option<i64>, now: i64) -> crate::protocol::ClassState {
    if starts_at.is_some_and(|s| s > now) {
        crate::protocol::ClassState::Scheduled
    } else {
        crate::protocol::ClassState::Live
    }
}

fn rules_json(r: &RoomRules) -> String {
    serde_json::to_string(r).unwrap_or_else(|_| "{}".into())
}

fn parse_role(s: &str) -> Result<RoomRole> {
    RoomRole::parse(s).ok_or_else(|| StoreError::Corrupt(format!("room role {s}")))
}

/// Most ids bound in one `IN (...)` list (well under both backends' parameter limits).
pub(crate) const ROOMS_PER_QUERY: usize = 500;

/// `$first, $first+1, ...`: `n` bind placeholders for an `IN (...)` list.
pub(crate) fn placeholders(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Connects, runs the backend's migrations and starts the group-commit writer. `hook` is
    /// called once per committed event, in commit order, before the writer acknowledges it.
    pub async fn open(
        opts: &StoreOptions,
        metrics: Arc<Metrics>,
        hook: Option<CommitHook>,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (pool, backend) = if opts.url.starts_with("sqlite:") {
            (sqlite::connect(opts).await?, Backend::Sqlite)
        } else {
            (postgres::connect(opts).await?, Backend::Postgres)
        };
        match backend {
            Backend::Sqlite => sqlite::migrate(&pool).await?,
            Backend::Postgres => postgres::migrate(&pool).await?,
        }
        let (tx, rx) = mpsc::channel(opts.queue);
        let badge_hook = engagement::BadgeHookSlot::default();
        let subscribed = Arc::new(webhooks::Subscribed::default());
        let outbox = Arc::new(tokio::sync::Notify::new());
        let rewrites = Arc::new(writer::Rewrites::default());
        let hooks = writer::Hooks {
            commit: hook,
            rewrites: rewrites.clone(),
            badge: badge_hook.clone(),
            subscribed: subscribed.clone(),
            outbox: outbox.clone(),
        };
        let run = writer::run(opts.clone(), backend, rx, hooks, metrics);
        // The writer runs on a thread of its own: a batch takes a dozen or so round trips to
        // the database, and on the shared runtime each one would wait behind every task the
        // fan-out has just woken.
        let (done_tx, handle) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Corrupt(format!("store writer runtime: {e}")))?;
        std::thread::Builder::new()
            .name("studyhall-writer".into())
            .spawn(move || {
                rt.block_on(run);
                let _ = done_tx.send(());
            })
            .map_err(|e| StoreError::Corrupt(format!("store writer thread: {e}")))?;
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                backend,
                writer: tx,
                writer_done: tokio::sync::Mutex::new(Some(handle)),
                badge_hook,
                subscribed,
                outbox,
                search: search::Limits::new(opts),
                rewrites,
            }),
        };
        store.refresh_webhook_subscriptions().await?;
        Ok(store)
    }

    /// Begins a write transaction on the pool the way the writer does (IMMEDIATE on SQLite).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let begin = match self.inner.backend {
            Backend::Sqlite => sqlite::BEGIN_WRITE,
            Backend::Postgres => postgres::BEGIN_WRITE,
        };
        Ok(self.pool().begin_with(begin).await?)
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Whether this process's writer has committed, or is committing, an edit, a delete or a
    /// reaction in `room` with a seq above `seq`: one that changed the stored copy of an
    /// earlier event. Asked after taking a copy of the room's latest events that ends at
    /// `seq` (see `hub::Recent`): `false` means every message in the copy is as stored.
    pub fn rewritten_after(&self, room: &RoomId, seq: i64) -> bool {
        self.inner.rewrites.after(room, seq)
    }

    /// Queues a sequenced write behind those already queued (so one session's writes commit in
    /// the order it sent them) and returns the receiver of its outcome. Waits only while the
    /// writer's queue is full.
    pub async fn submit(&self, op: WriteOp) -> Result<oneshot::Receiver<Result<WriteOutcome>>> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Request::Op { op, reply: tx })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Queues a write nobody waits for (the attendance log): never waits, and drops the write
    /// (with a warning) when the writer's queue is full, rather than hold up its caller.
    pub fn submit_detached(&self, op: WriteOp) {
        // Dropped before the write is queued: the writer knows a write nobody waits for by
        // its closed reply (see `store_detached_linger_ms`).
        let (tx, rx) = oneshot::channel();
        drop(rx);
        if let Err(e) = self
            .inner
            .writer
            .try_send(writer::Request::Op { op, reply: tx })
        {
            tracing::warn!(error = %e, "store queue full: a log write was dropped");
        }
    }

    /// Submits a write and waits for its commit.
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        self.submit(op)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Stops taking writes, commits everything already queued and waits for the writer.
    /// Every clone of the store must stop submitting first; later submits fail with `Closed`.
    pub async fn close(&self) {
        let handle = self.inner.writer_done.lock().await.take();
        if let Some(handle) = handle {
            // Closing is signalled by a sentinel so other clones' senders need not be dropped.
            let _ = self.inner.writer.send(writer::Request::Shutdown).await;
            let _ = handle.await;
        }
        self.inner.pool.close().await;
    }

    // -- rooms ---------------------------------------------------------------------------------

    pub async fn create_room(&self, room: &Room) -> Result<Room> {
        let mut tx = self.begin_write().await?;
        let (created, queued) = self.create_room_in(&mut tx, room).await?;
        self.commit_and_wake(tx, queued).await?;
        Ok(created)
    }

    /// Inserts a room inside the caller's transaction (`conflict` if the id exists) and queues
    /// its `room.created` webhook; true if one was queued (notify the sender after commit).
    pub(crate) async fn create_room_in(
        &self,
        tx: &mut writer::Tx<'_>,
        room: &Room,
    ) -> Result<(Room, bool)> {
        let q = sqlx::query(
            "INSERT INTO rooms (id, created_at, kind, title, visibility, qa_enabled, \
             qa_moderated, starts_at, qa_peer_answers, answer_sla_s, slow_mode_s, rules, \
             engagement, ends_at, class_state, av_mode, stage_talk_cap_s, stage_auto_down, \
             archived, last_seq) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, 0, 0) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(room.id.as_str())
        .bind(room.created_at);
        let res = bind_settings(q, room).execute(&mut **tx).await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "room {} already exists",
                room.id
            )));
        }
        let created = room_in(tx, &room.id).await?;
        let queued = self
            .webhook_in(tx, EventType::RoomCreated, &created)
            .await?;
        Ok((created, queued))
    }

    /// Archives a room inside the caller's transaction unless it is archived already, and then
    /// queues its `room.archived` webhook; true if one was queued (notify the sender after
    /// commit). A room archived before (by the API, say) is left alone and not reported twice.
    pub(crate) async fn archive_room_in(
        &self,
        tx: &mut writer::Tx<'_>,
        id: &RoomId,
    ) -> Result<bool> {
        let res = sqlx::query("UPDATE rooms SET archived = 1 WHERE id = $1 AND archived = 0")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
        if res.rows_affected() == 0 || !self.webhooks_want(EventType::RoomArchived) {
            return Ok(false);
        }
        let room = room_in(tx, id).await?;
        self.webhook_in(tx, EventType::RoomArchived, &room).await
    }

    /// Queues a room event (`room.created`, `room.archived`) with the room as its data, when
    /// some endpoint subscribes.
    async fn webhook_in(
        &self,
        tx: &mut writer::Tx<'_>,
        kind: EventType,
        room: &Room,
    ) -> Result<bool> {
        let what = || format!("room {}", room.id);
        self.enqueue_value(tx, kind, Some(&room.id), now_ms(), room, what)
            .await
    }

    /// The room with what its access policy is built from: its members, its bans and the
    /// mutes in force at `now` (ms), in one statement, so a cold room's first join reads all
    /// four with one round trip.
    pub async fn room_access(&self, id: &RoomId, now: i64) -> Result<Option<RoomAccess>> {
        let Some(row) = sqlx::query(SELECT_ROOM_ACCESS.get(self.backend()))
            .bind(id.as_str())
            .bind(now)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        let list = |column: &str| -> Result<String> {
            // NULL where the backend aggregates no rows to NULL.
            Ok(row
                .try_get::<Option<String>, _>(column)?
                .unwrap_or_else(|| "[]".into()))
        };
        let decode = |e: serde_json::Error| StoreError::Corrupt(format!("room access: {e}"));
        let members: Vec<(String, String)> =
            serde_json::from_str(&list("access_members")?).map_err(decode)?;
        let banned: Vec<String> = serde_json::from_str(&list("access_bans")?).map_err(decode)?;
        let mutes: Vec<(String, i64)> =
            serde_json::from_str(&list("access_mutes")?).map_err(decode)?;
        Ok(Some(RoomAccess {
            room: room_from_row(&row)?,
            members: members
                .into_iter()
                .map(|(u, role)| Ok((UserId(u), parse_role(&role)?)))
                .collect::<Result<_>>()?,
            banned: banned.into_iter().map(UserId).collect(),
            mutes: mutes.into_iter().map(|(u, t)| (UserId(u), t)).collect(),
        }))
    }

    pub async fn room(&self, id: &RoomId) -> Result<Option<Room>> {
        let row = sqlx::query(SELECT_ROOM)
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(room_from_row).transpose()
    }

    /// One page of rooms in id order (archived ones included), filtered as `q` says. Keyset
    /// paging: the next page starts after the last id of this one, so rooms created meanwhile
    /// never shift a page.
    pub async fn rooms_page(&self, q: &RoomQuery) -> Result<RoomPage> {
        let mut sql = concat!("SELECT ", room_columns!(), " FROM rooms WHERE 1 = 1").to_owned();
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("${n}")
        };
        if q.after.is_some() {
            sql += &format!(" AND id > {}", param());
        }
        if q.kind.is_some() {
            sql += &format!(" AND kind = {}", param());
        }
        if q.member.is_some() {
            sql += &format!(
                " AND EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = rooms.id \
                 AND m.user_id = {})",
                param()
            );
        }
        let limit = q.limit.max(1);
        sql += &format!(" ORDER BY id LIMIT CAST({} AS BIGINT)", param());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(after) = &q.after {
            query = query.bind(after.as_str());
        }
        if let Some(kind) = q.kind {
            query = query.bind(kind.as_str());
        }
        if let Some(member) = &q.member {
            query = query.bind(member.as_str());
        }
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let has_more = rows.len() > limit as usize;
        let rooms = rows
            .iter()
            .take(limit as usize)
            .map(room_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(RoomPage { rooms, has_more })
    }

    pub async fn update_room(&self, id: &RoomId, patch: &RoomPatch) -> Result<Room> {
        let mut room = self.room(id).await?.ok_or(StoreError::NotFound("room"))?;
        let was_archived = room.archived;
        patch.apply_to(&mut room);
        let mut tx = self.begin_write().await?;
        write_room(&mut tx, id, &room).await?;
        let queued = if room.archived && !was_archived {
            self.webhook_in(&mut tx, EventType::RoomArchived, &room)
                .await?
        } else {
            false
        };
        self.commit_and_wake(tx, queued).await?;
        self.room(id).await?.ok_or(StoreError::NotFound("room"))
    }

    // -- members -------------------------------------------------------------------------------

    pub async fn set_member(&self, room: &RoomId, user: &UserId, role: RoomRole) -> Result<()> {
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, added_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(role.as_str())
        .bind(now_ms())
        .execute(self.pool())
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                StoreError::NotFound("room")
            }
            other => other.into(),
        })?;
        Ok(())
    }

    /// Records that a user joined an open room, keeping any role they already have. Goes
    /// through the group-commit writer, so a burst of first joins shares commits.
    pub async fn ensure_member(&self, room: &RoomId, user: &UserId, role: RoomRole) -> Result<()> {
        self.write(WriteOp::EnsureMember {
            room: room.clone(),
            user: user.clone(),
            role,
        })
        .await?;
        Ok(())
    }

    pub async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool> {
        let res = sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(self.pool())
            .await?;
        Ok(res.rows_affected() > 0)
    }

    pub async fn member_role(&self, room: &RoomId, user: &UserId) -> Result<Option<RoomRole>> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM room_members WHERE room_id = $1 AND user_id = $2")
                .bind(room.as_str())
                .bind(user.as_str())
                .fetch_optional(self.pool())
                .await?;
        role.as_deref().map(parse_role).transpose()
    }

    pub async fn members(&self, room: &RoomId) -> Result<Vec<(UserId, RoomRole)>> {
        let rows = sqlx::query(
            "SELECT user_id, role FROM room_members WHERE room_id = $1 ORDER BY user_id",
        )
        .bind(room.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    UserId(r.try_get("user_id")?),
                    parse_role(&r.try_get::<String, _>("role")?)?,
                ))
            })
            .collect()
    }

    /// The rooms a user belongs to (stored memberships plus `granted` rooms from the token),
    /// archived rooms left out, with unread counts from the read markers.
    pub async fn user_rooms(
        &self,
        user: &UserId,
        granted: &[(RoomId, RoomRole)],
    ) -> Result<Vec<RoomSummary>> {
        let rows = sqlx::query(
            "SELECT r.id, r.kind, r.title, r.last_seq, m.role FROM rooms r \
             JOIN room_members m ON m.room_id = r.id \
             WHERE m.user_id = $1 AND r.archived = 0 ORDER BY r.id",
        )
        .bind(user.as_str())
        .fetch_all(self.pool())
        .await?;
        let mut out: Vec<RoomSummary> = Vec::with_capacity(rows.len() + granted.len());
        for r in &rows {
            let kind: String = r.try_get("kind")?;
            out.push(RoomSummary {
                id: RoomId(r.try_get("id")?),
                kind: RoomKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("room kind {kind}")))?,
                title: r.try_get("title")?,
                role: parse_role(&r.try_get::<String, _>("role")?)?,
                last_seq: r.try_get("last_seq")?,
                unread: 0,
            });
        }
        for (room, role) in granted {
            if let Some(existing) = out.iter_mut().find(|s| &s.id == room) {
                existing.role = existing.role.max(*role);
                continue;
            }
            if let Some(r) = self.room(room).await?
                && !r.archived
            {
                out.push(RoomSummary {
                    id: r.id,
                    kind: r.kind,
                    title: r.title,
                    role: *role,
                    last_seq: r.last_seq,
                    unread: 0,
                });
            }
        }
        // A banned user's rooms say nothing about them (a host/ta grant outranks a ban).
        let banned: Vec<String> = sqlx::query_scalar("SELECT room_id FROM bans WHERE user_id = $1")
            .bind(user.as_str())
            .fetch_all(self.pool())
            .await?;
        out.retain(|s| s.role.can_moderate() || !banned.iter().any(|b| b == s.id.as_str()));
        let ids: Vec<&str> = out.iter().map(|s| s.id.as_str()).collect();
        let counts = self.unread_in(&ids, user).await?;
        for s in &mut out {
            s.unread = counts.get(s.id.as_str()).copied().unwrap_or(0);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// [`Store::unread`] for many rooms at once: one query per `UNREAD_ROOMS_PER_QUERY` rooms;
    /// rooms with nothing unread are left out.
    async fn unread_in(
        &self,
        rooms: &[&str],
        user: &UserId,
    ) -> Result<std::collections::HashMap<String, i64>> {
        /// Rooms (bound parameters) in one unread-count query.
        const UNREAD_ROOMS_PER_QUERY: usize = 500;
        let mut out = std::collections::HashMap::new();
        for chunk in rooms.chunks(UNREAD_ROOMS_PER_QUERY) {
            let list: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT m.room_id, COUNT(*) FROM messages m \
                 LEFT JOIN read_markers r ON r.room_id = m.room_id AND r.user_id = $1 \
                 WHERE m.room_id IN ({}) AND m.sender_id <> $1 AND m.deleted = 0 \
                 AND m.seq > COALESCE(r.seq, 0) GROUP BY m.room_id",
                list.join(", ")
            );
            // Only numbered placeholders are spliced in; every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user.as_str());
            for room in chunk {
                q = q.bind(*room);
            }
            for row in q.fetch_all(self.pool()).await? {
                out.insert(row.try_get(0)?, row.try_get(1)?);
            }
        }
        Ok(out)
    }

    /// Messages from others after the user's read marker that are not deleted.
    pub async fn unread(&self, room: &RoomId, user: &UserId) -> Result<i64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages m WHERE m.room_id = $1 AND m.sender_id <> $2 \
             AND m.deleted = 0 AND m.seq > COALESCE((SELECT seq FROM read_markers \
             WHERE room_id = $1 AND user_id = $2), 0)",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }

    /// Moves the user's read marker forward (never back, so several devices agree).
    pub async fn set_read_marker(&self, room: &RoomId, user: &UserId, seq: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO read_markers (room_id, user_id, seq) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET seq = \
             CASE WHEN excluded.seq > read_markers.seq THEN excluded.seq ELSE read_markers.seq END",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(seq)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    // -- the event log -------------------------------------------------------------------------

    pub async fn last_seq(&self, room: &RoomId) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1")
            .bind(room.as_str())
            .fetch_optional(self.pool())
            .await?;
        seq.ok_or(StoreError::NotFound("room"))
    }

    /// `last_seq` of many rooms at once (the cluster's sweep), in queries of at most
    /// [`ROOMS_PER_QUERY`] ids; rooms that do not exist are left out.
    pub async fn last_seqs(
        &self,
        rooms: &[RoomId],
    ) -> Result<std::collections::HashMap<RoomId, i64>> {
        let mut out = std::collections::HashMap::with_capacity(rooms.len());
        for chunk in rooms.chunks(ROOMS_PER_QUERY) {
            let sql = format!(
                "SELECT id, last_seq FROM rooms WHERE id IN ({})",
                placeholders(chunk.len(), 1)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for room in chunk {
                q = q.bind(room.as_str());
            }
            for row in q.fetch_all(self.pool()).await? {
                let id: String = row.try_get(0)?;
                out.insert(RoomId::from(id.as_str()), row.try_get::<i64, _>(1)?);
            }
        }
        Ok(out)
    }

    /// Events with `seq > after_seq`, oldest first, at most `limit`; `has_more` when there are
    /// more after the page.
    pub async fn events_after(
        &self,
        room: &RoomId,
        after_seq: i64,
        limit: u32,
        view: View,
    ) -> Result<EventPage> {
        let sql = "SELECT CASE WHEN $3 = 1 THEN body ELSE COALESCE(public_body, body) END \
                   FROM events WHERE room_id = $1 AND seq > $2 ORDER BY seq \
                   LIMIT CAST($4 AS BIGINT)";
        self.event_page(sql, room, after_seq, view, limit).await
    }

    /// A page of event bodies from `sql`, which binds the room, a seq bound, the view's flag
    /// and how many rows to read: at most `limit` of them, in `sql`'s order, and whether more
    /// matched.
    async fn event_page(
        &self,
        sql: &'static str,
        room: &RoomId,
        seq: i64,
        view: View,
        limit: u32,
    ) -> Result<EventPage> {
        let mut events: Vec<String> = sqlx::query_scalar(sql)
            .bind(room.as_str())
            .bind(seq)
            .bind(view.flag())
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let has_more = events.len() > limit as usize;
        events.truncate(limit as usize);
        Ok(EventPage { events, has_more })
    }

    /// Committed events with `seq > after_seq`, oldest first, at most `limit`, in both
    /// renderings: how a cluster node refills seqs that the bus lost.
    pub async fn committed_after(
        &self,
        room: &RoomId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<CommittedEvent>> {
        let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT seq, body, public_body FROM events WHERE room_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT CAST($3 AS BIGINT)",
        )
        .bind(room.as_str())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, json, public_json)| CommittedEvent {
                room: room.clone(),
                seq,
                json,
                public_json,
            })
            .collect())
    }

    /// Events with `seq < before_seq` (or the newest when `None`), the newest `limit` of them,
    /// returned oldest first; `has_more` when older ones remain.
    pub async fn events_before(
        &self,
        room: &RoomId,
        before_seq: Option<i64>,
        limit: u32,
        view: View,
    ) -> Result<EventPage> {
        let sql = "SELECT CASE WHEN $3 = 1 THEN body ELSE COALESCE(public_body, body) END \
                   FROM events WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC \
                   LIMIT CAST($4 AS BIGINT)";
        let before = before_seq.unwrap_or(i64::MAX);
        let mut page = self.event_page(sql, room, before, view, limit).await?;
        page.events.reverse();
        Ok(page)
    }

    // -- settings ------------------------------------------------------------------------------

    /// Returns the stored value of `key`, storing `make()` first if there is none. Safe when
    /// several processes race: the first insert wins and everyone reads it back.
    pub async fn setting_or_insert(
        &self,
        key: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(make())
        .execute(self.pool())
        .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(self.pool())
            .await?;
        Ok(v)
    }

    /// Cheap liveness probe for `/healthz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query_scalar::<_, i64>("SELECT 1")
            .fetch_one(self.pool())
            .await?;
        Ok(())
    }
}
