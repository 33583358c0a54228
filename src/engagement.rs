//! Engagement as plain logic: the point table and daily caps, levels, badge rules, streak
//! arithmetic, leaderboard ranking and the calendar (local days, ISO weeks, months and stats
//! buckets in an IANA time zone). Everything here is a pure function of its inputs (a
//! timestamp and a zone, never the system clock), so the rules are tested on a simulated
//! clock. It knows nothing of SQL, sockets or the hub; the store applies these rules inside
//! its write transactions and the room commands render them.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// A contribution that can earn points. The names are the keys of the point table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Message,
    Question,
    Answer,
    /// An answer marked helpful by host/ta or the asker (points to the answer's author).
    Helpful,
    /// A reaction from someone else to one's message (points to the message's author).
    ReactionReceived,
    Checkin,
    /// A correct answer to a quiz, awarded when the quiz closes (once per user and quiz).
    QuizCorrect,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Question => "question",
            Self::Answer => "answer",
            Self::Helpful => "helpful",
            Self::ReactionReceived => "reaction_received",
            Self::Checkin => "checkin",
            Self::QuizCorrect => "quiz_correct",
        }
    }
}

/// One number per [`Action`], keyed by the action's name in the configuration file: the
/// point table and the daily caps. `D` gives the number a key left out of the file takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, bound = "")]
pub struct ActionTable<D: TableDefaults> {
    pub message: i64,
    pub question: i64,
    pub answer: i64,
    pub helpful: i64,
    pub reaction_received: i64,
    pub checkin: i64,
    pub quiz_correct: i64,
    #[serde(skip)]
    defaults: PhantomData<D>,
}

/// The numbers an [`ActionTable`] of this kind starts from.
pub trait TableDefaults: Sized {
    fn defaults() -> ActionTable<Self>;
}

/// Points per action.
pub type PointTable = ActionTable<Points>;

/// Awards per user, room, action and local day (a key left out of the file keeps its default
/// cap, not its default points).
pub type DailyCaps = ActionTable<Caps>;

/// The defaults of [`PointTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Points {}

/// The defaults of [`DailyCaps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caps {}

impl TableDefaults for Points {
    fn defaults() -> PointTable {
        ActionTable {
            message: 1,
            question: 5,
            answer: 10,
            helpful: 15,
            reaction_received: 2,
            checkin: 3,
            quiz_correct: 10,
            defaults: PhantomData,
        }
    }
}

impl TableDefaults for Caps {
    fn defaults() -> DailyCaps {
        ActionTable {
            message: 50,
            question: 10,
            answer: 20,
            helpful: 20,
            reaction_received: 50,
            checkin: 1,
            quiz_correct: 20,
            defaults: PhantomData,
        }
    }
}

impl<D: TableDefaults> Default for ActionTable<D> {
    fn default() -> Self {
        D::defaults()
    }
}

impl<D: TableDefaults> ActionTable<D> {
    pub fn get(&self, a: Action) -> i64 {
        match a {
            Action::Message => self.message,
            Action::Question => self.question,
            Action::Answer => self.answer,
            Action::Helpful => self.helpful,
            Action::ReactionReceived => self.reaction_received,
            Action::Checkin => self.checkin,
            Action::QuizCorrect => self.quiz_correct,
        }
    }

    fn values(&self) -> [i64; 7] {
        [
            self.message,
            self.question,
            self.answer,
            self.helpful,
            self.reaction_received,
            self.checkin,
            self.quiz_correct,
        ]
    }
}

/// What a badge rule counts, per user per room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Messages,
    Questions,
    Answers,
    /// Reactions from others to one's messages that still stand.
    ReactionsReceived,
    /// One's answers currently marked helpful.
    Helpful,
    Checkins,
    /// The current check-in streak, in days.
    Streak,
    Points,
}

/// A badge: earned once per user per room when `metric` reaches `threshold`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadgeRule {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub metric: Metric,
    pub threshold: i64,
}

fn rule(id: &str, name: &str, description: &str, metric: Metric, threshold: i64) -> BadgeRule {
    BadgeRule {
        id: id.into(),
        name: name.into(),
        description: description.into(),
        metric,
        threshold,
    }
}

/// The badges a server has unless its configuration lists its own.
pub fn default_badges() -> Vec<BadgeRule> {
    vec![
        rule(
            "first_question",
            "First question",
            "Asked a first question",
            Metric::Questions,
            1,
        ),
        rule(
            "first_answer",
            "First answer",
            "Answered a first question",
            Metric::Answers,
            1,
        ),
        rule(
            "streak_7",
            "7-day streak",
            "Checked in 7 days in a row",
            Metric::Streak,
            7,
        ),
        rule(
            "streak_30",
            "30-day streak",
            "Checked in 30 days in a row",
            Metric::Streak,
            30,
        ),
        rule(
            "likes_100",
            "100 likes",
            "Received 100 reactions from others",
            Metric::ReactionsReceived,
            100,
        ),
        rule(
            "helpful_10",
            "10 helpful answers",
            "Had 10 answers marked helpful",
            Metric::Helpful,
            10,
        ),
    ]
}

/// The `[engagement]` table of the configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngagementConfig {
    /// Points per action.
    pub points: PointTable,
    /// How many times per local day (the user's zone) an action earns points; past it the
    /// action still counts as activity but earns nothing.
    pub daily_caps: DailyCaps,
    /// Ascending point thresholds: reaching `levels[i]` gives level `i + 1`.
    pub levels: Vec<i64>,
    pub badges: Vec<BadgeRule>,
}

impl Default for EngagementConfig {
    fn default() -> Self {
        Self {
            points: PointTable::default(),
            daily_caps: DailyCaps::default(),
            levels: vec![0, 50, 150, 400, 1000, 2500, 5000, 10_000],
            badges: default_badges(),
        }
    }
}

impl EngagementConfig {
    /// Why the table is unusable, if it is.
    pub fn check(&self) -> Result<(), String> {
        if self.levels.first() != Some(&0) {
            return Err("levels must start at 0".into());
        }
        if self.levels.windows(2).any(|w| w[0] >= w[1]) {
            return Err("levels must be strictly ascending".into());
        }
        let caps = self.daily_caps.values();
        if self.points.values().iter().any(|p| *p < 0) || caps.iter().any(|c| *c < 0) {
            return Err("points and daily caps must be >= 0".into());
        }
        let mut ids = std::collections::HashSet::new();
        for b in &self.badges {
            if b.id.is_empty() || b.id.len() > 64 || !ids.insert(b.id.as_str()) {
                return Err(format!(
                    "badge id {:?} is empty, too long or repeated",
                    b.id
                ));
            }
            if b.threshold < 1 {
                return Err(format!("badge {} needs a threshold >= 1", b.id));
            }
        }
        Ok(())
    }

    /// The level of a point total (1 for anything below the second threshold).
    pub fn level(&self, points: i64) -> i64 {
        self.levels
            .iter()
            .take_while(|t| **t <= points)
            .count()
            .max(1) as i64
    }

    /// Points at which the next level starts, or `None` at the top level.
    pub fn next_level_points(&self, points: i64) -> Option<i64> {
        self.levels.iter().copied().find(|t| *t > points)
    }

    pub fn badge(&self, id: &str) -> Option<&BadgeRule> {
        self.badges.iter().find(|b| b.id == id)
    }

    /// The rules whose threshold `metric` crossed going from `old` to `new`.
    pub fn crossed(&self, metric: Metric, old: i64, new: i64) -> impl Iterator<Item = &BadgeRule> {
        self.badges
            .iter()
            .filter(move |b| b.metric == metric && old < b.threshold && b.threshold <= new)
    }
}

// -- time zones and the calendar ----------------------------------------------------------------

/// The zone of an IANA name; `None` for an unknown name.
pub fn zone(name: &str) -> Option<TimeZone> {
    if name.is_empty() || name.len() > 64 {
        return None;
    }
    TimeZone::get(name).ok()
}

/// The zone of a name already validated (a stored room or user setting); UTC if it no longer
/// resolves (the zone database changed under us).
pub fn zone_or_utc(name: &str) -> TimeZone {
    zone(name).unwrap_or(TimeZone::UTC)
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The local calendar day of an instant.
pub fn local_day(ms: i64, tz: &TimeZone) -> Date {
    ts(ms).to_zoned(tz.clone()).date()
}

/// When a local day starts (ms). A day that begins inside a DST gap starts at the first
/// instant that exists.
pub fn day_start(day: Date, tz: &TimeZone) -> i64 {
    day.to_zoned(tz.clone())
        .map(|z| z.timestamp().as_millisecond())
        .unwrap_or(0)
}

/// Start of the local day holding `ms`.
pub fn day_start_of(ms: i64, tz: &TimeZone) -> i64 {
    day_start(local_day(ms, tz), tz)
}

/// The Monday of the ISO week holding `day`.
pub fn monday_of(day: Date) -> Date {
    let back = i64::from(day.weekday().to_monday_zero_offset());
    day.checked_sub(back.days()).unwrap_or(day)
}

/// Start (ms) of the current ISO week (Monday 00:00 local) at `now`.
pub fn week_start(now: i64, tz: &TimeZone) -> i64 {
    day_start(monday_of(local_day(now, tz)), tz)
}

/// Start (ms) of the current calendar month at `now`.
pub fn month_start(now: i64, tz: &TimeZone) -> i64 {
    day_start(local_day(now, tz).first_of_month(), tz)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Day,
    Week,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            _ => None,
        }
    }
}

/// Starts (ms) of the buckets covering `[from, to)`: the local day (or ISO week) holding
/// `from` first, the one holding `to - 1` last. `None` when there would be more than `max`.
pub fn buckets(from: i64, to: i64, bucket: Bucket, tz: &TimeZone, max: usize) -> Option<Vec<i64>> {
    let first = local_day(from, tz);
    let mut day = match bucket {
        Bucket::Day => first,
        Bucket::Week => monday_of(first),
    };
    let step = match bucket {
        Bucket::Day => 1.days(),
        Bucket::Week => 7.days(),
    };
    let mut out = Vec::new();
    loop {
        let start = day_start(day, tz);
        if start >= to && !out.is_empty() {
            break;
        }
        if out.len() == max {
            return None;
        }
        out.push(start);
        day = day.checked_add(step).ok()?;
    }
    Some(out)
}

/// Index of the bucket holding `ms` (buckets as from [`buckets`]); `None` if outside them.
pub fn bucket_of(starts: &[i64], end: i64, ms: i64) -> Option<usize> {
    if starts.is_empty() || ms < starts[0] || ms >= end {
        return None;
    }
    Some(starts.partition_point(|s| *s <= ms) - 1)
}

/// Where one bucket list ends: the start of the bucket after the last one.
pub fn buckets_end(starts: &[i64], bucket: Bucket, tz: &TimeZone) -> i64 {
    let Some(last) = starts.last() else {
        return 0;
    };
    let day = local_day(*last, tz);
    let next = match bucket {
        Bucket::Day => day.checked_add(1.days()),
        Bucket::Week => day.checked_add(7.days()),
    };
    next.map(|d| day_start(d, tz)).unwrap_or(i64::MAX)
}

// -- streaks ---------------------------------------------------------------------------------

/// A user's check-in streak in one room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streak {
    pub current: i64,
    pub longest: i64,
}

/// The result of checking in on `today` after last checking in on `last` with `before`.
/// `already` when `last` is today: nothing changes. A check-in the day after `last` extends
/// the streak; any later one (a missed day) starts a new streak of 1.
pub fn check_in(last: Option<Date>, before: Streak, today: Date) -> (Streak, bool) {
    match last {
        Some(l) if l == today => (before, true),
        // A last day after today: the user's zone moved west. The streak stands; no new day.
        Some(l) if l > today => (before, true),
        Some(l) if l.tomorrow().ok() == Some(today) => {
            let current = before.current + 1;
            (
                Streak {
                    current,
                    longest: before.longest.max(current),
                },
                false,
            )
        }
        _ => (
            Streak {
                current: 1,
                longest: before.longest.max(1),
            },
            false,
        ),
    }
}

/// The streak as shown on `today`: the stored one while it can still be extended (last
/// check-in today or yesterday), else a current streak of 0.
pub fn streak_on(last: Option<Date>, stored: Streak, today: Date) -> Streak {
    match last {
        Some(l) if l >= today || l.tomorrow().ok() == Some(today) => stored,
        _ => Streak {
            current: 0,
            longest: stored.longest,
        },
    }
}

// -- ranking ---------------------------------------------------------------------------------

/// Competition ranks (1, 2, 2, 4) for points already sorted from high to low.
pub fn competition_ranks(points: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(points.len());
    for (i, p) in points.iter().enumerate() {
        if i > 0 && points[i - 1] == *p {
            out.push(out[i - 1]);
        } else {
            out.push(i as i64 + 1);
        }
    }
    out
}

/// Median and 90th percentile (nearest rank) of durations; `None` for none.
pub fn median_p90(mut v: Vec<i64>) -> (Option<i64>, Option<i64>) {
    if v.is_empty() {
        return (None, None);
    }
    v.sort_unstable();
    let rank = |p: f64| {
        let r = (p * v.len() as f64).ceil() as usize;
        v[r.clamp(1, v.len()) - 1]
    };
    (Some(rank(0.5)), Some(rank(0.9)))
}

/// Where a weekly active ratio stands against the healthy band.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Low,
    Healthy,
    High,
}

/// Where a weekly active ratio stands against the healthy band (bounds inclusive).
pub fn health(ratio: f64, low: f64, high: f64) -> Health {
    if ratio < low {
        Health::Low
    } else if ratio > high {
        Health::High
    } else {
        Health::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn local_days_follow_the_zone() {
        let utc = TimeZone::UTC;
        let ny = zone("America/New_York").unwrap();
        let tokyo = zone("Asia/Tokyo").unwrap();
        // 2026-03-02 03:30 UTC: still March 1st in New York, already the 2nd in Tokyo.
        let t = ms("2026-03-02T03:30:00Z");
        assert_eq!(local_day(t, &utc), date(2026, 3, 2));
        assert_eq!(local_day(t, &ny), date(2026, 3, 1));
        assert_eq!(local_day(t, &tokyo), date(2026, 3, 2));
        // One millisecond before and at local midnight.
        let midnight_ny = ms("2026-03-02T05:00:00Z");
        assert_eq!(local_day(midnight_ny - 1, &ny), date(2026, 3, 1));
        assert_eq!(local_day(midnight_ny, &ny), date(2026, 3, 2));
        assert_eq!(day_start_of(midnight_ny + 3_600_000, &ny), midnight_ny);
        assert!(zone("Not/AZone").is_none());
        assert!(zone("").is_none());
    }

    #[test]
    fn streaks_extend_reset_and_repeat() {
        let s0 = Streak::default();
        let (s1, already) = check_in(None, s0, date(2026, 1, 1));
        assert_eq!(
            (s1, already),
            (
                Streak {
                    current: 1,
                    longest: 1
                },
                false
            )
        );
        let (s2, _) = check_in(Some(date(2026, 1, 1)), s1, date(2026, 1, 2));
        assert_eq!(
            s2,
            Streak {
                current: 2,
                longest: 2
            }
        );
        let (same, already) = check_in(Some(date(2026, 1, 2)), s2, date(2026, 1, 2));
        assert!(already);
        assert_eq!(same, s2);
        // A missed day (Jan 3) resets the current streak, the longest stays.
        let (s3, _) = check_in(Some(date(2026, 1, 2)), s2, date(2026, 1, 4));
        assert_eq!(
            s3,
            Streak {
                current: 1,
                longest: 2
            }
        );
        // Across a month and a year boundary.
        let (s4, _) = check_in(Some(date(2025, 12, 31)), s1, date(2026, 1, 1));
        assert_eq!(s4.current, 2);
        let (s5, _) = check_in(Some(date(2028, 2, 28)), s1, date(2028, 2, 29));
        assert_eq!(s5.current, 2, "leap day follows Feb 28");
        // Shown later: a streak not extended yesterday shows 0 current.
        assert_eq!(streak_on(Some(date(2026, 1, 2)), s2, date(2026, 1, 3)), s2);
        assert_eq!(
            streak_on(Some(date(2026, 1, 2)), s2, date(2026, 1, 4)),
            Streak {
                current: 0,
                longest: 2
            }
        );
    }

    /// A simulated clock: check-ins at instants, each turned into the user's local day.
    fn run(tz: &TimeZone, instants: &[&str]) -> Vec<(Streak, bool)> {
        let mut last = None;
        let mut s = Streak::default();
        instants
            .iter()
            .map(|i| {
                let today = local_day(ms(i), tz);
                let (next, already) = check_in(last, s, today);
                if !already {
                    last = Some(today);
                    s = next;
                }
                (next, already)
            })
            .collect()
    }

    #[test]
    fn streaks_on_a_simulated_clock_across_zones_and_dst() {
        // 23:30 and 00:30 local in New York are two different days (a streak of 2) although
        // they are one hour apart; in UTC the same instants are one day.
        let ny = zone("America/New_York").unwrap();
        let r = run(&ny, &["2026-01-06T04:30:00Z", "2026-01-06T05:30:00Z"]);
        assert_eq!(
            r[1],
            (
                Streak {
                    current: 2,
                    longest: 2
                },
                false
            )
        );
        let r = run(
            &TimeZone::UTC,
            &["2026-01-06T04:30:00Z", "2026-01-06T05:30:00Z"],
        );
        assert!(r[1].1, "same UTC day: already checked in");
        // Across the spring-forward night (2026-03-08, 23 hours) and the fall-back night
        // (2026-11-01, 25 hours): one check-in per local day keeps the streak going.
        let r = run(
            &ny,
            &[
                "2026-03-07T17:00:00Z",
                "2026-03-08T16:00:00Z",
                "2026-03-09T16:00:00Z",
            ],
        );
        assert_eq!(r[2].0.current, 3);
        let r = run(
            &ny,
            &[
                "2026-11-01T03:59:00Z", // Oct 31, 23:59 EDT
                "2026-11-01T04:00:00Z", // Nov 1, 00:00 EDT
                "2026-11-02T04:59:00Z", // Nov 1, 23:59 EST: the 25-hour day is one day
                "2026-11-02T05:00:00Z", // Nov 2, 00:00 EST
            ],
        );
        let currents: Vec<(i64, bool)> = r.iter().map(|(s, a)| (s.current, *a)).collect();
        assert_eq!(
            currents,
            vec![(1, false), (2, false), (2, true), (3, false)]
        );
        // Kolkata (+05:30) and Kathmandu (+05:45): half and quarter hour offsets.
        let kol = zone("Asia/Kolkata").unwrap();
        assert_eq!(
            local_day(ms("2026-01-01T18:29:59Z"), &kol),
            date(2026, 1, 1)
        );
        assert_eq!(
            local_day(ms("2026-01-01T18:30:00Z"), &kol),
            date(2026, 1, 2)
        );
        let ktm = zone("Asia/Kathmandu").unwrap();
        assert_eq!(
            local_day(ms("2026-01-01T18:15:00Z"), &ktm),
            date(2026, 1, 2)
        );
        // A skipped day in Samoa's 2011 date line jump (Dec 30 never happened) still counts
        // as a missed calendar day: the arithmetic is on dates, not on 24-hour spans.
        let apia = zone("Pacific/Apia").unwrap();
        let r = run(&apia, &["2011-12-29T12:00:00Z", "2011-12-30T12:00:00Z"]);
        assert_eq!(
            local_day(ms("2011-12-30T12:00:00Z"), &apia),
            date(2011, 12, 31)
        );
        assert_eq!(r[1].0.current, 1);
    }

    #[test]
    fn weeks_months_and_buckets() {
        let ny = zone("America/New_York").unwrap();
        // Wednesday 2026-03-11 12:00 EDT: the week began Monday 2026-03-09 00:00 EDT (04:00Z),
        // the month on 2026-03-01 00:00 EST (05:00Z).
        let now = ms("2026-03-11T16:00:00Z");
        assert_eq!(week_start(now, &ny), ms("2026-03-09T04:00:00Z"));
        assert_eq!(month_start(now, &ny), ms("2026-03-01T05:00:00Z"));
        // A Monday is its own week's start; a Sunday belongs to the week before.
        assert_eq!(monday_of(date(2026, 3, 9)), date(2026, 3, 9));
        assert_eq!(monday_of(date(2026, 3, 15)), date(2026, 3, 9));
        // Day buckets across the DST change: 23-hour day on March 8.
        let b = buckets(
            ms("2026-03-07T12:00:00Z"),
            ms("2026-03-10T12:00:00Z"),
            Bucket::Day,
            &ny,
            366,
        )
        .unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b[0], ms("2026-03-07T05:00:00Z"));
        assert_eq!(b[2] - b[1], 23 * 3_600_000);
        assert_eq!(b[3], ms("2026-03-10T04:00:00Z"));
        let end = buckets_end(&b, Bucket::Day, &ny);
        assert_eq!(end, ms("2026-03-11T04:00:00Z"));
        assert_eq!(bucket_of(&b, end, ms("2026-03-08T12:00:00Z")), Some(1));
        assert_eq!(bucket_of(&b, end, b[0] - 1), None);
        assert_eq!(bucket_of(&b, end, end), None);
        // Week buckets start on Mondays; a range ending on a bucket start excludes it.
        let utc = TimeZone::UTC;
        let w = buckets(
            ms("2026-03-04T00:00:00Z"),
            ms("2026-03-16T00:00:00Z"),
            Bucket::Week,
            &utc,
            366,
        )
        .unwrap();
        assert_eq!(
            w,
            vec![ms("2026-03-02T00:00:00Z"), ms("2026-03-09T00:00:00Z")]
        );
        assert!(buckets(0, 400 * 86_400_000, Bucket::Day, &utc, 366).is_none());
        assert_eq!(buckets(5, 5, Bucket::Day, &utc, 366).unwrap().len(), 1);
    }

    #[test]
    fn levels_badges_and_ranks() {
        let c = EngagementConfig::default();
        c.check().unwrap();
        assert_eq!(c.level(0), 1);
        assert_eq!(c.level(49), 1);
        assert_eq!(c.level(50), 2);
        assert_eq!(c.level(10_000), 8);
        assert_eq!(c.level(-5), 1);
        assert_eq!(c.next_level_points(49), Some(50));
        assert_eq!(c.next_level_points(10_000), None);
        let got: Vec<&str> = c
            .crossed(Metric::Streak, 6, 7)
            .map(|b| b.id.as_str())
            .collect();
        assert_eq!(got, vec!["streak_7"]);
        assert_eq!(c.crossed(Metric::Streak, 7, 8).count(), 0, "earned once");
        assert_eq!(c.crossed(Metric::ReactionsReceived, 99, 100).count(), 1);
        assert_eq!(c.crossed(Metric::Helpful, 9, 10).count(), 1);
        assert_eq!(c.crossed(Metric::Questions, 0, 1).count(), 1);
        assert_eq!(c.crossed(Metric::Answers, 0, 1).count(), 1);
        assert_eq!(
            c.crossed(Metric::Streak, 29, 30).next().unwrap().id,
            "streak_30"
        );
        // A partial table from a file keeps the other defaults of its own kind.
        let part: EngagementConfig =
            toml::from_str("[daily_caps]\nmessage = 5\n[points]\nanswer = 7\n").unwrap();
        assert_eq!(part.daily_caps.message, 5);
        assert_eq!(
            part.daily_caps.question, 10,
            "a cap default, not a points default"
        );
        assert_eq!(part.points.answer, 7);
        assert_eq!(part.points.message, 1);
        assert_eq!(part.badges.len(), 6);
        assert!(toml::from_str::<EngagementConfig>("[points]\nlikes = 1\n").is_err());
        let mut bad = c.clone();
        bad.levels = vec![0, 10, 10];
        assert!(bad.check().is_err());
        let mut bad = c.clone();
        bad.badges.push(bad.badges[0].clone());
        assert!(bad.check().is_err());
        assert_eq!(
            competition_ranks(&[9, 7, 7, 5, 5, 5, 1]),
            vec![1, 2, 2, 4, 4, 4, 7]
        );
        assert_eq!(competition_ranks(&[]), Vec::<i64>::new());
        assert_eq!(median_p90(vec![]), (None, None));
        assert_eq!(
            median_p90(vec![10, 1, 9, 2, 8, 3, 7, 4, 6, 5]),
            (Some(5), Some(9))
        );
        assert_eq!(health(0.1, 0.15, 0.3), Health::Low);
        assert_eq!(health(0.15, 0.15, 0.3), Health::Healthy);
        assert_eq!(health(0.31, 0.15, 0.3), Health::High);
    }
}
