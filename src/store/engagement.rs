//! Engagement in the store: the points ledger (awards, daily caps, reversals), the
//! incremental counters (per room, room-local day and user; running totals per room and
//! user), badges, check-ins and `helpful` marks, all applied inside the group-commit
//! transaction that commits the contribution, so nothing is counted for a write that did not
//! commit and an idempotent resend (which commits nothing) counts nothing. Batches of
//! contributions cost a fixed number of multi-row statements. Also the reads behind
//! leaderboards and profiles. The rules themselves (points, caps, levels, badges, calendar)
//! come from [`crate::engagement`]; this file knows nothing of sessions or the hub.

use super::rows::{self, Sql};
use super::writer::{Applied, CommittedEvent, Tx, WriteOutcome, backend_of, bump_seq};
use super::{Result, Store, StoreError, now_ms};
use crate::engagement::{self as eng, Action, BadgeRule, EngagementConfig, Metric, Streak};
pub use crate::protocol::views::{BadgeView, UserBrief};
use crate::protocol::{CheckinOk, QuestionId, RoomId, UserId, UserRef};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// A room's engagement settings (`engagement` in the room JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngagementSettings {
    /// Announce earned badges in the room as a system message.
    pub announce_badges: bool,
    /// IANA zone of the room: its days for statistics and leaderboard periods, and the
    /// check-in day of users whose token names no zone.
    pub timezone: String,
}

impl Default for EngagementSettings {
    fn default() -> Self {
        Self {
            announce_badges: false,
            timezone: "UTC".into(),
        }
    }
}

impl EngagementSettings {
    pub(super) fn parse(json: &str) -> Self {
        serde_json::from_str(json).unwrap_or_default()
    }

    pub(super) fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// A badge just earned, told to the user's sessions once its transaction committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EarnedBadge {
    pub room: RoomId,
    pub user: UserBrief,
    pub badge: BadgeView,
    pub ts: i64,
}

/// Called once per earned badge, after the commit, in commit order.
pub type BadgeHook = Arc<dyn Fn(EarnedBadge) + Send + Sync>;
pub(super) type BadgeHookSlot = Arc<OnceLock<BadgeHook>>;

/// What engagement added to a write: announcement events (sequenced, published after the
/// write's own event) and earned badges.
#[derive(Default)]
pub(super) struct Effects {
    pub events: Vec<CommittedEvent>,
    pub badges: Vec<EarnedBadge>,
}

/// What a contribution counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Message,
    Question,
    /// Earns points once per question and answerer (`ref_id` is the question).
    Answer,
    /// Activity of the reacting user; earns nothing.
    ReactionGiven,
    /// Points to a message's author; not the author's activity.
    ReactionReceived,
    /// Points to an answer's author; not the author's activity.
    Helpful,
    Checkin,
    /// A correct quiz answer, awarded at the quiz's close (`ref_id` is the quiz); earns once
    /// per quiz and user. Not activity: the answer was counted (or not) when given.
    QuizCorrect,
}

impl Kind {
    fn action(self) -> Option<Action> {
        match self {
            Self::Message => Some(Action::Message),
            Self::Question => Some(Action::Question),
            Self::Answer => Some(Action::Answer),
            Self::ReactionGiven => None,
            Self::ReactionReceived => Some(Action::ReactionReceived),
            Self::Helpful => Some(Action::Helpful),
            Self::Checkin => Some(Action::Checkin),
            Self::QuizCorrect => Some(Action::QuizCorrect),
        }
    }

    fn active(self) -> bool {
        !matches!(
            self,
            Self::ReactionReceived | Self::Helpful | Self::QuizCorrect
        )
    }

    /// Earns at most once per `ref_id` and user: an item after an earlier standing award for
    /// the same reference is no attempt at all (so a retried or repeated award adds nothing).
    fn once_per_ref(self) -> bool {
        matches!(self, Self::Answer | Self::QuizCorrect)
    }

    /// Index into [`Daily::counts`].
    fn daily_col(self) -> Option<usize> {
        match self {
            Self::Message => Some(0),
            Self::Question => Some(1),
            Self::Answer => Some(2),
            Self::ReactionGiven => Some(3),
            Self::Checkin => Some(4),
            Self::ReactionReceived | Self::Helpful | Self::QuizCorrect => None,
        }
    }

    /// Index into [`MEMBER_METRICS`].
    fn member_col(self) -> Option<usize> {
        match self {
            Self::Message => Some(0),
            Self::Question => Some(1),
            Self::Answer => Some(2),
            Self::ReactionReceived => Some(3),
            Self::Helpful => Some(4),
            Self::Checkin => Some(5),
            Self::ReactionGiven | Self::QuizCorrect => None,
        }
    }
}

/// The counted columns of `engagement_members`, in [`Kind::member_col`] order.
const MEMBER_METRICS: [(&str, Metric); 6] = [
    ("messages", Metric::Messages),
    ("questions", Metric::Questions),
    ("answers", Metric::Answers),
    ("reactions_received", Metric::ReactionsReceived),
    ("helpful", Metric::Helpful),
    ("checkins", Metric::Checkins),
];

/// One contribution to count (and maybe reward) inside a write transaction.
#[derive(Clone, Debug)]
pub(super) struct Contribution {
    pub room: RoomId,
    pub user: UserId,
    /// Display name to keep for leaderboards; empty when unknown (points received).
    pub name: String,
    pub kind: Kind,
    pub ref_id: String,
    pub detail: String,
    pub ts: i64,
    /// Earns nothing and counts toward no badge metric (marking one's own answer helpful).
    pub no_points: bool,
    /// Badges this crosses are never announced in the room: the contribution does not show
    /// its author to the room (an anonymous or pending question).
    pub quiet: bool,
    /// The zone of the earner's local day for the cap, when this write names one (a
    /// check-in's own zone); else the zone the user's token named, else the room's.
    pub zone: Option<String>,
}

impl Contribution {
    pub fn new(room: &RoomId, user: &UserRef, kind: Kind, ref_id: &str, ts: i64) -> Self {
        Self {
            room: room.clone(),
            user: user.id.clone(),
            name: user.name.clone(),
            kind,
            ref_id: ref_id.to_owned(),
            detail: String::new(),
            ts,
            no_points: false,
            quiet: false,
            zone: None,
        }
    }
}

/// The sender of badge announcements.
fn badge_sender() -> UserRef {
    UserRef {
        id: UserId(crate::auth::SYSTEM_USER.into()),
        name: "Badges".into(),
        role: crate::protocol::ShownRole::System,
    }
}

/// True for the system sender: announcements earn nothing and count as nobody's activity.
pub(super) fn is_system(user: &UserId) -> bool {
    user.as_str() == crate::auth::SYSTEM_USER
}

const ROOM_SETTINGS: Sql = Sql {
    sqlite: "SELECT id, engagement FROM rooms WHERE id IN (SELECT value FROM json_each($1))",
    postgres: "SELECT id, engagement FROM rooms \
               WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))",
};

const USER_ZONES: Sql = Sql {
    sqlite: "SELECT user_id, tz FROM user_zones \
             WHERE user_id IN (SELECT value FROM json_each($1))",
    postgres: "SELECT user_id, tz FROM user_zones \
               WHERE user_id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))",
};

/// Adds attempts to the day counters and returns each key's new total. (SQLite needs the
/// `WHERE true` to read `ON CONFLICT` as the upsert, not as a join constraint.)
const COUNT_ATTEMPTS: Sql = Sql {
    sqlite: "INSERT INTO points_caps (room_id, user_id, action, day, n) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 \
             FROM jsonb_each($1) WHERE true \
             ON CONFLICT (room_id, user_id, action, day) DO UPDATE SET n = points_caps.n + excluded.n \
             RETURNING room_id, user_id, action, day, n",
    postgres: "INSERT INTO points_caps (room_id, user_id, action, day, n) \
               SELECT v ->> 0, v ->> 1, v ->> 2, v ->> 3, (v ->> 4)::bigint \
               FROM jsonb_array_elements($1::jsonb) AS v \
               ON CONFLICT (room_id, user_id, action, day) DO UPDATE SET n = points_caps.n + excluded.n \
               RETURNING room_id, user_id, action, day, n",
};

const INSERT_AWARDS: Sql = Sql {
    sqlite: "INSERT INTO points_ledger (room_id, user_id, action, kind, ref_id, detail, day, \
             bucket, points, ts) SELECT value ->> 0, value ->> 1, value ->> 2, 'award', \
             value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8 \
             FROM jsonb_each($1)",
    postgres: "INSERT INTO points_ledger (room_id, user_id, action, kind, ref_id, detail, day, \
               bucket, points, ts) SELECT v ->> 0, v ->> 1, v ->> 2, 'award', v ->> 3, v ->> 4, \
               v ->> 5, (v ->> 6)::bigint, (v ->> 7)::bigint, (v ->> 8)::bigint \
               FROM jsonb_array_elements($1::jsonb) AS v",
};

/// How a day row takes new counts: summed, with the first and last activity kept. One text
/// for both backends' `ADD_DAILY`.
macro_rules! add_daily_on_conflict {
    () => {
        " ON CONFLICT (room_id, day_start, user_id) DO UPDATE SET \
         messages = engagement_daily.messages + excluded.messages, \
         questions = engagement_daily.questions + excluded.questions, \
         answers = engagement_daily.answers + excluded.answers, \
         reactions = engagement_daily.reactions + excluded.reactions, \
         checkins = engagement_daily.checkins + excluded.checkins, \
         points = engagement_daily.points + excluded.points, \
         first_ts = CASE WHEN excluded.first_ts IS NULL THEN engagement_daily.first_ts \
           WHEN engagement_daily.first_ts IS NULL OR excluded.first_ts < engagement_daily.first_ts \
           THEN excluded.first_ts ELSE engagement_daily.first_ts END, \
         last_ts = CASE WHEN excluded.last_ts IS NULL THEN engagement_daily.last_ts \
           WHEN engagement_daily.last_ts IS NULL OR excluded.last_ts > engagement_daily.last_ts \
           THEN excluded.last_ts ELSE engagement_daily.last_ts END"
    };
}

/// Adds to the day rows (one per room, room-local day and user).
const ADD_DAILY: Sql = Sql {
    sqlite: concat!(
        "INSERT INTO engagement_daily (room_id, day_start, user_id, messages, questions, \
         answers, reactions, checkins, points, first_ts, last_ts) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
         value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 \
         FROM jsonb_each($1) WHERE true",
        add_daily_on_conflict!()
    ),
    postgres: concat!(
        "INSERT INTO engagement_daily (room_id, day_start, user_id, messages, questions, \
         answers, reactions, checkins, points, first_ts, last_ts) \
         SELECT v ->> 0, (v ->> 1)::bigint, v ->> 2, (v ->> 3)::bigint, (v ->> 4)::bigint, \
         (v ->> 5)::bigint, (v ->> 6)::bigint, (v ->> 7)::bigint, (v ->> 8)::bigint, \
         (v ->> 9)::bigint, (v ->> 10)::bigint FROM jsonb_array_elements($1::jsonb) AS v",
        add_daily_on_conflict!()
    ),
};

/// How a member's totals take new counts: summed, the name kept unless a new one is given, the
/// row returned. One text for both backends' `ADD_TOTALS`.
macro_rules! add_totals_on_conflict {
    () => {
        " ON CONFLICT (room_id, user_id) DO UPDATE SET \
         name = CASE WHEN excluded.name = '' THEN engagement_members.name ELSE excluded.name END, \
         messages = engagement_members.messages + excluded.messages, \
         questions = engagement_members.questions + excluded.questions, \
         answers = engagement_members.answers + excluded.answers, \
         reactions_received = engagement_members.reactions_received + excluded.reactions_received, \
         helpful = engagement_members.helpful + excluded.helpful, \
         checkins = engagement_members.checkins + excluded.checkins, \
         points = engagement_members.points + excluded.points \
         RETURNING room_id, user_id, name, messages, questions, answers, reactions_received, \
         helpful, checkins, points"
    };
}

/// Adds to the running totals (one row per room and user) and returns the new totals.
const ADD_TOTALS: Sql = Sql {
    sqlite: concat!(
        "INSERT INTO engagement_members (room_id, user_id, name, messages, questions, \
         answers, reactions_received, helpful, checkins, points) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
         value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9 \
         FROM jsonb_each($1) WHERE true",
        add_totals_on_conflict!()
    ),
    postgres: concat!(
        "INSERT INTO engagement_members (room_id, user_id, name, messages, questions, \
         answers, reactions_received, helpful, checkins, points) \
         SELECT v ->> 0, v ->> 1, v ->> 2, (v ->> 3)::bigint, (v ->> 4)::bigint, \
         (v ->> 5)::bigint, (v ->> 6)::bigint, (v ->> 7)::bigint, (v ->> 8)::bigint, \
         (v ->> 9)::bigint FROM jsonb_array_elements($1::jsonb) AS v",
        add_totals_on_conflict!()
    ),
};

/// Zones and badge-announcement flags of rooms, by id.
async fn room_settings(
    tx: &mut Tx<'_>,
    rooms: &[&RoomId],
) -> Result<HashMap<String, EngagementSettings>> {
    let ids: Vec<&str> = rooms.iter().map(|r| r.as_str()).collect();
    let rows = sqlx::query(ROOM_SETTINGS.get(backend_of(tx)))
        .bind(rows::json(&ids)?)
        .fetch_all(&mut **tx)
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        out.insert(
            row.try_get::<String, _>("id")?,
            EngagementSettings::parse(&row.try_get::<String, _>("engagement")?),
        );
    }
    Ok(out)
}

async fn user_zones(tx: &mut Tx<'_>, users: &[&UserId]) -> Result<HashMap<String, String>> {
    let ids: Vec<&str> = users.iter().map(|u| u.as_str()).collect();
    let rows = sqlx::query(USER_ZONES.get(backend_of(tx)))
        .bind(rows::json(&ids)?)
        .fetch_all(&mut **tx)
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        out.insert(row.try_get("user_id")?, row.try_get("tz")?);
    }
    Ok(out)
}

type CapKey = (String, String, &'static str, String);

/// Adds this batch's attempts to the day counters; returns each key's new total.
async fn count_attempts(
    tx: &mut Tx<'_>,
    attempts: &BTreeMap<CapKey, i64>,
) -> Result<HashMap<CapKey, i64>> {
    let mut out = HashMap::new();
    if attempts.is_empty() {
        return Ok(out);
    }
    let rows: Vec<_> = attempts
        .iter()
        .map(|((r, u, a, d), n)| (r, u, a, d, n))
        .collect();
    let returned = sqlx::query(COUNT_ATTEMPTS.get(backend_of(tx)))
        .bind(rows::json(&rows)?)
        .fetch_all(&mut **tx)
        .await?;
    for row in returned {
        let action: String = row.try_get("action")?;
        let Some(a) = ACTIONS.iter().find(|a| **a == action) else {
            continue;
        };
        out.insert(
            (
                row.try_get("room_id")?,
                row.try_get("user_id")?,
                *a,
                row.try_get("day")?,
            ),
            row.try_get("n")?,
        );
    }
    Ok(out)
}

const ACTIONS: [&str; 7] = [
    "message",
    "question",
    "answer",
    "helpful",
    "reaction_received",
    "checkin",
    "quiz_correct",
];

fn action_str(a: Action) -> &'static str {
    // Same strings as `ACTIONS`, as 'static for the cap keys.
    a.as_str()
}

/// Counts `items` (in order) and awards their points within the daily caps: ledger rows,
/// the day counters and the running totals, a fixed number of statements for any number of
/// items. Badges whose thresholds are crossed are earned (and announced) into `fx`. Returns
/// the points each item earned.
pub(super) async fn contribute(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    items: &[Contribution],
    fx: &mut Effects,
) -> Result<Vec<i64>> {
    let items: Vec<&Contribution> = items.iter().filter(|c| !is_system(&c.user)).collect();
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut rooms: Vec<&RoomId> = items.iter().map(|c| &c.room).collect();
    rooms.sort();
    rooms.dedup();
    let settings = room_settings(tx, &rooms).await?;
    let placed = place(tx, cfg, &items, &rooms, &settings).await?;
    let points = points_within_caps(tx, cfg, &items, &placed).await?;
    insert_awards(tx, &items, &placed, &points).await?;
    add_daily(tx, &items, &placed, &points).await?;
    add_totals(tx, cfg, &items, &points, &settings, fx).await?;
    Ok(points)
}

/// Where one contribution counts: its room-local day, and the earner's local day for caps.
struct Placed {
    bucket: i64,
    day: String,
    /// The cap key of an item that can earn points; `None` when it earns nothing.
    cap: Option<CapKey>,
}

/// Places each item on its days; an answer after an earlier award for the same question is
/// no attempt at all.
async fn place(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    items: &[&Contribution],
    rooms: &[&RoomId],
    settings: &HashMap<String, EngagementSettings>,
) -> Result<Vec<Placed>> {
    let mut users: Vec<&UserId> = items.iter().map(|c| &c.user).collect();
    users.sort();
    users.dedup();
    let zones = user_zones(tx, &users).await?;
    let default_settings = EngagementSettings::default();
    let mut room_tz = HashMap::new();
    for r in rooms {
        let s = settings.get(r.as_str()).unwrap_or(&default_settings);
        room_tz.insert(r.as_str(), eng::zone_or_utc(&s.timezone));
    }

    let mut placed: Vec<Placed> = Vec::with_capacity(items.len());
    for c in items {
        let rtz = &room_tz[c.room.as_str()];
        let bucket = eng::day_start_of(c.ts, rtz);
        let day = match c.zone.as_ref().or_else(|| zones.get(c.user.as_str())) {
            Some(z) => eng::local_day(c.ts, &eng::zone_or_utc(z)),
            None => eng::local_day(c.ts, rtz),
        }
        .to_string();
        let cap = c
            .kind
            .action()
            .filter(|a| !c.no_points && cfg.points.get(*a) > 0)
            .map(|a| {
                (
                    c.room.0.clone(),
                    c.user.0.clone(),
                    action_str(a),
                    day.clone(),
                )
            });
        placed.push(Placed { bucket, day, cap });
    }
    // Answers earn once per question and answerer, correct quiz answers once per quiz and
    // user: an item after an earlier award is no attempt at all.
    for (c, p) in items.iter().zip(placed.iter_mut()) {
        if let (true, Some(action)) = (c.kind.once_per_ref() && p.cap.is_some(), c.kind.action()) {
            let before: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM points_ledger WHERE room_id = $1 AND user_id = $2 \
                 AND action = $3 AND ref_id = $4 AND kind = 'award' LIMIT 1",
            )
            .bind(c.room.as_str())
            .bind(c.user.as_str())
            .bind(action.as_str())
            .bind(c.ref_id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            if before.is_some() {
                p.cap = None;
            }
        }
    }
    Ok(placed)
}

/// The points each placed item earns: its attempt's points while the day's attempts stay
/// within the cap.
async fn points_within_caps(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    items: &[&Contribution],
    placed: &[Placed],
) -> Result<Vec<i64>> {
    // Attempts per (room, user, action, local day), counted in `points_caps`: the i-th attempt
    // of a day earns its points if i <= the cap, so awards = min(attempts, cap).
    let mut attempts: BTreeMap<CapKey, i64> = BTreeMap::new();
    for p in placed {
        if let Some(k) = &p.cap {
            *attempts.entry(k.clone()).or_default() += 1;
        }
    }
    let totals = count_attempts(tx, &attempts).await?;
    let mut seen: HashMap<CapKey, i64> = HashMap::new();
    let mut points = Vec::with_capacity(items.len());
    for (c, p) in items.iter().zip(placed) {
        let (Some(key), Some(action)) = (&p.cap, c.kind.action()) else {
            points.push(0);
            continue;
        };
        let k = attempts.get(key).copied().unwrap_or(0);
        let before = totals.get(key).copied().unwrap_or(k) - k;
        let i = seen.entry(key.clone()).or_insert(0);
        *i += 1;
        points.push(if before + *i <= cfg.daily_caps.get(action) {
            cfg.points.get(action)
        } else {
            0
        });
    }
    Ok(points)
}

/// Writes the ledger rows of the items that earned points.
async fn insert_awards(
    tx: &mut Tx<'_>,
    items: &[&Contribution],
    placed: &[Placed],
    points: &[i64],
) -> Result<()> {
    let awards: Vec<_> = (0..items.len())
        .filter(|i| points[*i] > 0)
        .map(|i| {
            let (c, p) = (items[i], &placed[i]);
            (
                c.room.as_str(),
                c.user.as_str(),
                c.kind.action().map_or("", Action::as_str),
                c.ref_id.as_str(),
                c.detail.as_str(),
                p.day.as_str(),
                p.bucket,
                points[i],
                c.ts,
            )
        })
        .collect();
    if !awards.is_empty() {
        sqlx::query(INSERT_AWARDS.get(backend_of(tx)))
            .bind(rows::json(&awards)?)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// What a batch adds to one (room, day, user) row of the day counters.
#[derive(Default)]
struct Daily {
    counts: [i64; 5],
    points: i64,
    first: Option<i64>,
    last: Option<i64>,
}

/// Adds the items to the day counters, one row per (room, day, user).
async fn add_daily(
    tx: &mut Tx<'_>,
    items: &[&Contribution],
    placed: &[Placed],
    points: &[i64],
) -> Result<()> {
    let mut daily: BTreeMap<(String, i64, String), Daily> = BTreeMap::new();
    for (i, (c, p)) in items.iter().zip(placed).enumerate() {
        let d = daily
            .entry((c.room.0.clone(), p.bucket, c.user.0.clone()))
            .or_default();
        if let Some(col) = c.kind.daily_col() {
            d.counts[col] += 1;
        }
        d.points += points[i];
        if c.kind.active() {
            d.first = Some(d.first.map_or(c.ts, |f| f.min(c.ts)));
            d.last = Some(d.last.map_or(c.ts, |l| l.max(c.ts)));
        }
    }
    let rows: Vec<_> = daily
        .iter()
        .map(|((room, bucket, user), d)| {
            let [m, q, a, r, c] = d.counts;
            (room, bucket, user, m, q, a, r, c, d.points, d.first, d.last)
        })
        .collect();
    sqlx::query(ADD_DAILY.get(backend_of(tx)))
        .bind(rows::json(&rows)?)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What a batch adds to one (room, user) row of the running totals.
#[derive(Default)]
struct Total {
    name: String,
    counts: [i64; 6],
    points: i64,
}

/// Adds the items to the running totals, one row per (room, user), and earns the badges whose
/// thresholds the new totals cross.
async fn add_totals(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    items: &[&Contribution],
    points: &[i64],
    settings: &HashMap<String, EngagementSettings>,
    fx: &mut Effects,
) -> Result<()> {
    let mut totals: BTreeMap<(String, String), Total> = BTreeMap::new();
    for (i, c) in items.iter().enumerate() {
        let t = totals
            .entry((c.room.0.clone(), c.user.0.clone()))
            .or_default();
        if !c.name.is_empty() {
            t.name.clone_from(&c.name);
        }
        // A mark of one's own answer counts toward no metric (`helpful` is marks by others).
        if let Some(col) = c.kind.member_col().filter(|_| !c.no_points) {
            t.counts[col] += 1;
        }
        t.points += points[i];
    }
    let rows: Vec<_> = totals
        .iter()
        .map(|((room, user), t)| {
            let [m, q, a, rr, h, c] = t.counts;
            (room, user, &t.name, m, q, a, rr, h, c, t.points)
        })
        .collect();
    let returned = sqlx::query(ADD_TOTALS.get(backend_of(tx)))
        .bind(rows::json(&rows)?)
        .fetch_all(&mut **tx)
        .await?;
    let deltas: HashMap<(&str, &str), &Total> = totals
        .iter()
        .map(|((r, u), t)| ((r.as_str(), u.as_str()), t))
        .collect();
    for row in returned {
        let room: String = row.try_get("room_id")?;
        let user: String = row.try_get("user_id")?;
        let Some(delta) = deltas.get(&(room.as_str(), user.as_str())) else {
            continue;
        };
        earn_crossed(tx, cfg, items, settings, &row, delta, fx).await?;
    }
    Ok(())
}

/// Earns the badges one user's new totals (`row`) crossed by adding `delta`, announcing them
/// unless a quiet contribution is among the user's items or the room does not announce.
async fn earn_crossed(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    items: &[&Contribution],
    settings: &HashMap<String, EngagementSettings>,
    row: &sqlx::any::AnyRow,
    delta: &Total,
    fx: &mut Effects,
) -> Result<()> {
    let room: String = row.try_get("room_id")?;
    let user: String = row.try_get("user_id")?;
    let mut earned: Vec<BadgeRule> = Vec::new();
    for (col, (name, metric)) in MEMBER_METRICS.iter().enumerate() {
        if delta.counts[col] != 0 {
            let new: i64 = row.try_get(*name)?;
            earned.extend(cfg.crossed(*metric, new - delta.counts[col], new).cloned());
        }
    }
    if delta.points != 0 {
        let new: i64 = row.try_get("points")?;
        earned.extend(
            cfg.crossed(Metric::Points, new - delta.points, new)
                .cloned(),
        );
    }
    if earned.is_empty() {
        return Ok(());
    }
    let name: String = row.try_get("name")?;
    let room = RoomId(room);
    let ts = items
        .iter()
        .filter(|c| c.room == room && c.user.as_str() == user)
        .map(|c| c.ts)
        .max()
        .unwrap_or_else(now_ms);
    // Never announce what an anonymous or pending contribution crossed: the
    // announcement, next to it in the log, would name its author.
    let quiet = items
        .iter()
        .any(|c| c.quiet && c.room == room && c.user.as_str() == user);
    let announce = !quiet
        && settings
            .get(room.as_str())
            .is_some_and(|s| s.announce_badges);
    let user = UserBrief {
        name: if name.is_empty() { user.clone() } else { name },
        id: UserId(user),
    };
    earn(tx, &room, &user, &earned, ts, announce, fx).await
}

/// Records badges (each once per user and room), and announces the new ones if asked.
pub(super) async fn earn(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: &UserBrief,
    rules: &[BadgeRule],
    ts: i64,
    announce: bool,
    fx: &mut Effects,
) -> Result<()> {
    for rule in rules {
        let res = sqlx::query(
            "INSERT INTO engagement_badges (room_id, user_id, badge_id, ts) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id, badge_id) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.id.as_str())
        .bind(rule.id.as_str())
        .bind(ts)
        .execute(&mut **tx)
        .await?;
        if res.rows_affected() == 0 {
            continue;
        }
        fx.badges.push(EarnedBadge {
            room: room.clone(),
            user: user.clone(),
            badge: BadgeView::of(rule),
            ts,
        });
        if announce {
            let text = format!("{} earned the badge “{}”", user.name, rule.name);
            fx.events.push(announcement(tx, room, &text, ts).await?);
        }
    }
    Ok(())
}

/// A system message in the room, stored and sequenced like an HTTP API announcement.
async fn announcement(
    tx: &mut Tx<'_>,
    room: &RoomId,
    text: &str,
    ts: i64,
) -> Result<CommittedEvent> {
    let from = badge_sender();
    let new = super::messages::NewMessage {
        from: &from,
        text,
        reply_to: None,
        client_msg_id: None,
    };
    Ok(super::messages::insert_message(tx, room, ts, new).await?.1)
}

/// An award just reversed: whose, for what and on which of the earner's cap days.
pub(super) struct Reversed {
    pub user: String,
    pub action: String,
    pub day: String,
}

/// Reverses the standing awards for `ref_id` in `room` (all of them, or only those of one
/// action and detail): each gets a negative ledger row and its points leave the counters.
/// Returns the awards reversed.
pub(super) async fn reverse(
    tx: &mut Tx<'_>,
    room: &RoomId,
    ref_id: &str,
    only: Option<(Action, &str)>,
) -> Result<Vec<Reversed>> {
    let (action, detail) = only.map_or(("", ""), |(a, d)| (a.as_str(), d));
    let rows = sqlx::query(
        "SELECT id, user_id, action, detail, day, bucket, points FROM points_ledger \
         WHERE room_id = $1 AND ref_id = $2 AND kind = 'award' AND reversed = 0 \
         AND ($3 = '' OR (action = $3 AND detail = $4))",
    )
    .bind(room.as_str())
    .bind(ref_id)
    .bind(action)
    .bind(detail)
    .fetch_all(&mut **tx)
    .await?;
    let ts = now_ms();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let user: String = row.try_get("user_id")?;
        let bucket: i64 = row.try_get("bucket")?;
        let points: i64 = row.try_get("points")?;
        sqlx::query("UPDATE points_ledger SET reversed = 1 WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO points_ledger (room_id, user_id, action, kind, ref_id, detail, day, \
             bucket, points, ts) VALUES ($1, $2, $3, 'reversal', $4, $5, $6, $7, $8, $9)",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(row.try_get::<String, _>("action")?)
        .bind(ref_id)
        .bind(row.try_get::<String, _>("detail")?)
        .bind(row.try_get::<String, _>("day")?)
        .bind(bucket)
        .bind(-points)
        .bind(ts)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE engagement_daily SET points = points - $1 \
             WHERE room_id = $2 AND day_start = $3 AND user_id = $4",
        )
        .bind(points)
        .bind(room.as_str())
        .bind(bucket)
        .bind(user.as_str())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE engagement_members SET points = points - $1 WHERE room_id = $2 AND user_id = $3",
        )
        .bind(points)
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(&mut **tx)
        .await?;
        out.push(Reversed {
            user,
            action: row.try_get("action")?,
            day: row.try_get("day")?,
        });
    }
    Ok(out)
}

/// Gives withdrawn awards their places under the earner's daily cap back (a reaction or
/// helpful mark taken back), so that someone else cannot use up a user's cap by adding and
/// withdrawing the same thing over and over.
pub(super) async fn refund(tx: &mut Tx<'_>, room: &RoomId, reversed: &[Reversed]) -> Result<()> {
    for r in reversed {
        sqlx::query(
            "UPDATE points_caps SET n = n - 1 WHERE room_id = $1 AND user_id = $2 \
             AND action = $3 AND day = $4 AND n > 0",
        )
        .bind(room.as_str())
        .bind(r.user.as_str())
        .bind(r.action.as_str())
        .bind(r.day.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Takes `n` standing reactions from a user's running total (their message deleted by
/// moderation: `reactions_received` counts reactions still standing).
pub(super) async fn uncount_reactions(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: &str,
    n: i64,
) -> Result<()> {
    if n <= 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE engagement_members SET reactions_received = CASE WHEN reactions_received > $1 \
         THEN reactions_received - $1 ELSE 0 END WHERE room_id = $2 AND user_id = $3",
    )
    .bind(n)
    .bind(room.as_str())
    .bind(user)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes one from a running total (a reaction withdrawn, a helpful mark removed).
pub(super) async fn uncount(tx: &mut Tx<'_>, room: &RoomId, user: &str, kind: Kind) -> Result<()> {
    let sql = match kind {
        Kind::ReactionReceived => {
            "UPDATE engagement_members SET reactions_received = reactions_received - 1 \
             WHERE room_id = $1 AND user_id = $2 AND reactions_received > 0"
        }
        Kind::Helpful => {
            "UPDATE engagement_members SET helpful = helpful - 1 \
             WHERE room_id = $1 AND user_id = $2 AND helpful > 0"
        }
        _ => return Ok(()),
    };
    sqlx::query(sql)
        .bind(room.as_str())
        .bind(user)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Any failure of engagement bookkeeping inside a write aborts (and so retries) the batch:
/// the write has already taken its seq.
pub(super) fn abort(e: StoreError) -> StoreError {
    match e {
        StoreError::Db(_) | StoreError::Corrupt(_) => e,
        other => StoreError::Corrupt(format!("engagement: {other}")),
    }
}

/// `checkin`: once per user, room and local day; extends or restarts the streak.
pub(super) async fn checkin(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    user: &UserRef,
    tz: Option<&str>,
    fx: &mut Effects,
) -> Result<Applied> {
    let settings = lock_for_checkin(tx, room).await?;
    let tz_name = tz
        .filter(|z| eng::zone(z).is_some())
        .unwrap_or(settings.timezone.as_str())
        .to_owned();
    let zone = eng::zone_or_utc(&tz_name);
    let now = now_ms();
    let today = eng::local_day(now, &zone);
    let (before, last) = stored_streak(tx, room, user).await?;
    let (streak, already) = eng::check_in(last, before, today);
    let mut points = 0;
    if !already {
        let day = today.to_string();
        let mut c = Contribution::new(room, user, Kind::Checkin, &day, now);
        c.detail = tz_name.clone();
        // The cap day is the check-in's own day, in the zone it was made in.
        c.zone = Some(tz_name.clone());
        points = contribute(tx, cfg, &[c], fx)
            .await
            .map_err(abort)?
            .first()
            .copied()
            .unwrap_or(0);
        save_streak(tx, room, user, &streak, &day).await?;
        let earned: Vec<BadgeRule> = cfg
            .crossed(
                Metric::Streak,
                before.current.min(streak.current - 1),
                streak.current,
            )
            .cloned()
            .collect();
        if !earned.is_empty() {
            let brief = UserBrief {
                id: user.id.clone(),
                name: user.name.clone(),
            };
            earn(tx, room, &brief, &earned, now, settings.announce_badges, fx).await?;
        }
    }
    Ok(Applied {
        outcome: WriteOutcome::CheckedIn(CheckinOk {
            room: room.clone(),
            day: today.to_string(),
            tz: tz_name,
            already,
            streak: if already { before } else { streak },
            points,
        }),
        event: None,
    })
}

/// Locks the room row for a check-in and reads the room's engagement settings; an archived
/// room takes no check-ins. The lock comes first, as for every write (bump_seq): the
/// room-ordered lock order holds, and two check-ins of one user on two nodes (PostgreSQL)
/// run one after the other, the second reading the member row the first committed. A no-op
/// write locks on both backends.
async fn lock_for_checkin(tx: &mut Tx<'_>, room: &RoomId) -> Result<EngagementSettings> {
    let row = sqlx::query(
        "UPDATE rooms SET last_seq = last_seq WHERE id = $1 RETURNING archived, engagement",
    )
    .bind(room.as_str())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(StoreError::NotFound("room"))?;
    if row.try_get::<i64, _>("archived")? != 0 {
        return Err(StoreError::Forbidden("the room is archived".into()));
    }
    Ok(EngagementSettings::parse(
        &row.try_get::<String, _>("engagement")?,
    ))
}

/// Stores a member's streak after a check-in on `day`.
async fn save_streak(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: &UserRef,
    streak: &Streak,
    day: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE engagement_members SET streak_current = $1, streak_longest = $2, \
         last_checkin_day = $3 WHERE room_id = $4 AND user_id = $5",
    )
    .bind(streak.current)
    .bind(streak.longest)
    .bind(day)
    .bind(room.as_str())
    .bind(user.id.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The streak of an `engagement_members` row (its `streak_current` and `streak_longest`).
fn stored_streak_of(r: &sqlx::any::AnyRow) -> Result<Streak> {
    Ok(Streak {
        current: r.try_get("streak_current")?,
        longest: r.try_get("streak_longest")?,
    })
}

/// A member's stored streak and the day of their last check-in (none before the first).
async fn stored_streak(
    tx: &mut Tx<'_>,
    room: &RoomId,
    user: &UserRef,
) -> Result<(Streak, Option<jiff::civil::Date>)> {
    let stored = sqlx::query(
        "SELECT streak_current, streak_longest, last_checkin_day FROM engagement_members \
         WHERE room_id = $1 AND user_id = $2",
    )
    .bind(room.as_str())
    .bind(user.id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match &stored {
        Some(r) => (
            stored_streak_of(r)?,
            r.try_get::<Option<String>, _>("last_checkin_day")?
                .and_then(|d| d.parse::<jiff::civil::Date>().ok()),
        ),
        None => (Streak::default(), None),
    })
}

/// `helpful`: marks (or unmarks) an answer of a question helpful; the answer's author gets
/// the points unless they marked it themselves.
#[allow(clippy::too_many_arguments)]
pub(super) async fn helpful(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    question: &QuestionId,
    answer: Option<&str>,
    by: &UserRef,
    as_moderator: bool,
    on: bool,
    fx: &mut Effects,
) -> Result<Applied> {
    let mut conn_q = super::qa::load(tx, room, question).await?;
    if !as_moderator && conn_q.author.id != by.id {
        return Err(StoreError::Forbidden(
            "only host/ta or the asker mark an answer helpful".into(),
        ));
    }
    let idx = match answer {
        Some(a) => conn_q
            .answers
            .iter()
            .position(|x| x.id == a)
            .ok_or(StoreError::NotFound("answer"))?,
        None if conn_q.answers.is_empty() => {
            return Err(StoreError::BadRequest(
                "the question has no answer yet".into(),
            ));
        }
        None => 0,
    };
    if conn_q.answers[idx].helpful == on {
        return Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        });
    }
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    let answer_id = conn_q.answers[idx].id.clone();
    sqlx::query("UPDATE answers SET helpful = $1 WHERE id = $2")
        .bind(i64::from(on))
        .bind(answer_id.as_str())
        .execute(&mut **tx)
        .await?;
    conn_q.answers[idx].helpful = on;
    let author = conn_q.answers[idx].author.clone();
    if on {
        let mut c = Contribution::new(room, &author, Kind::Helpful, &answer_id, ts);
        c.no_points = author.id == by.id;
        contribute(tx, cfg, &[c], fx).await.map_err(abort)?;
    } else {
        let reversed = reverse(tx, room, &answer_id, Some((Action::Helpful, "")))
            .await
            .map_err(abort)?;
        refund(tx, room, &reversed).await.map_err(abort)?;
        // A self-mark counted nothing: uncount only a mark that earned points or was made by
        // someone else (the marker is not stored; an unmark by the author is taken as
        // undoing their own mark).
        if !reversed.is_empty() || author.id != by.id {
            uncount(tx, room, author.id.as_str(), Kind::Helpful)
                .await
                .map_err(abort)?;
        }
    }
    super::qa::emit_update(tx, &conn_q, "helpful", seq, ts).await
}

// -- reads -------------------------------------------------------------------------------------

/// One user's engagement in one room, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEngagement {
    pub room: RoomId,
    pub name: String,
    pub points: i64,
    pub streak: Streak,
    pub last_checkin_day: Option<String>,
    /// Badge ids with when they were earned, oldest first.
    pub badges: Vec<(String, i64)>,
}

/// One leaderboard row before ranking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderRow {
    pub user: UserBrief,
    /// Points in the period.
    pub points: i64,
    /// All-time points in the room (for the level).
    pub total: i64,
}

impl Store {
    /// Keeps the zone a user's token names, for their local day in caps.
    pub async fn remember_zone(&self, user: &UserId, tz: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO user_zones (user_id, tz) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE SET tz = excluded.tz",
        )
        .bind(user.as_str())
        .bind(tz)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn user_zone(&self, user: &UserId) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT tz FROM user_zones WHERE user_id = $1")
                .bind(user.as_str())
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Installs the hook told about earned badges (set once, at start).
    pub fn on_badge(&self, hook: BadgeHook) {
        let _ = self.inner.badge_hook.set(hook);
    }

    /// Users with points in `room` since `since` (all time when `None`), most first, ties by
    /// user id; at most `limit`.
    pub async fn leaderboard(
        &self,
        room: &RoomId,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LeaderRow>> {
        let rows = match since {
            None => {
                sqlx::query(
                    "SELECT user_id, name, points, points AS total FROM engagement_members \
                     WHERE room_id = $1 AND points > 0 ORDER BY points DESC, user_id \
                     LIMIT CAST($2 AS BIGINT)",
                )
                .bind(room.as_str())
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await?
            }
            Some(since) => {
                sqlx::query(
                    "SELECT d.user_id, m.name, d.points, m.points AS total FROM \
                     (SELECT user_id, CAST(SUM(points) AS BIGINT) AS points FROM engagement_daily \
                      WHERE room_id = $1 AND day_start >= $2 GROUP BY user_id) d \
                     JOIN engagement_members m ON m.room_id = $1 AND m.user_id = d.user_id \
                     WHERE d.points > 0 ORDER BY d.points DESC, d.user_id LIMIT CAST($3 AS BIGINT)",
                )
                .bind(room.as_str())
                .bind(since)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("user_id")?;
                let name: String = r.try_get("name")?;
                Ok(LeaderRow {
                    user: UserBrief {
                        name: if name.is_empty() { id.clone() } else { name },
                        id: UserId(id),
                    },
                    points: r.try_get("points")?,
                    total: r.try_get("total")?,
                })
            })
            .collect()
    }

    /// A user's engagement per room (`room` = only that one), rooms in id order.
    pub async fn engagement_of(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
    ) -> Result<Vec<MemberEngagement>> {
        let rows = sqlx::query(
            "SELECT room_id, name, points, streak_current, streak_longest, last_checkin_day \
             FROM engagement_members WHERE user_id = $1 AND ($2 = '' OR room_id = $2) \
             ORDER BY room_id",
        )
        .bind(user.as_str())
        .bind(room.map_or("", RoomId::as_str))
        .fetch_all(self.pool())
        .await?;
        let badges = sqlx::query(
            "SELECT room_id, badge_id, ts FROM engagement_badges WHERE user_id = $1 \
             AND ($2 = '' OR room_id = $2) ORDER BY ts, badge_id",
        )
        .bind(user.as_str())
        .bind(room.map_or("", RoomId::as_str))
        .fetch_all(self.pool())
        .await?;
        let mut out: Vec<MemberEngagement> = rows
            .iter()
            .map(|r| {
                Ok(MemberEngagement {
                    room: RoomId(r.try_get("room_id")?),
                    name: r.try_get("name")?,
                    points: r.try_get("points")?,
                    streak: stored_streak_of(r)?,
                    last_checkin_day: r.try_get("last_checkin_day")?,
                    badges: Vec::new(),
                })
            })
            .collect::<Result<_>>()?;
        for b in &badges {
            let room: String = b.try_get("room_id")?;
            if let Some(m) = out.iter_mut().find(|m| m.room.as_str() == room) {
                m.badges.push((b.try_get("badge_id")?, b.try_get("ts")?));
            }
        }
        Ok(out)
    }
}
