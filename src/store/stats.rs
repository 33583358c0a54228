//! Room health statistics for teachers, read from the incremental counters (one row per
//! room, room-local day and active user in `engagement_daily`), the membership table and the
//! questions table, each through an index on (room, time). The cost follows the number of
//! active user-days in the window, not the number of events in the room's log. The calendar
//! (bucket starts in the room's zone) is computed by the caller with [`crate::engagement`];
//! this file knows nothing of sessions or HTTP.

use super::{Result, Room, Store};
use crate::engagement::{self as eng, Bucket};
use crate::protocol::UserId;
use serde::Serialize;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};

const DAY_MS: i64 = 86_400_000;

/// What to compute; built by the command or endpoint after validating the input.
#[derive(Clone, Debug)]
pub struct StatsQuery {
    pub from: i64,
    pub to: i64,
    pub bucket: Bucket,
    /// Bucket starts in the room's zone (from [`eng::buckets`]), and where the last one ends.
    pub starts: Vec<i64>,
    pub end: i64,
    pub band_low: f64,
    pub band_high: f64,
    pub inactive_days: u32,
    pub churn_list_max: usize,
    pub top_n: usize,
    /// The clock for `overdue`.
    pub now: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Band {
    pub low: f64,
    pub high: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SeriesPoint {
    pub start: i64,
    pub messages: i64,
    pub questions: i64,
    pub answers: i64,
    pub active_members: i64,
    pub new_members: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FirstAnswer {
    pub median: Option<i64>,
    pub p90: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuestionStats {
    pub asked: i64,
    pub answered: i64,
    pub answered_share: f64,
    pub first_answer_ms: FirstAnswer,
    pub overdue: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChurnUser {
    pub id: UserId,
    pub name: String,
    pub last_active_ts: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Churn {
    pub inactive_days: u32,
    pub count: i64,
    pub users: Vec<ChurnUser>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Contributor {
    pub user: super::UserBrief,
    pub points: i64,
    pub messages: i64,
    pub questions: i64,
    pub answers: i64,
}

/// The `stats` object (see docs/protocol.md).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoomStats {
    pub room: crate::protocol::RoomId,
    pub from: i64,
    pub to: i64,
    pub bucket: Bucket,
    pub members: i64,
    pub new_members: i64,
    pub weekly_active_members: i64,
    pub weekly_active_ratio: f64,
    pub healthy_band: Band,
    pub health: &'static str,
    pub series: Vec<SeriesPoint>,
    pub questions: QuestionStats,
    pub churn_risk: Churn,
    pub top_contributors: Vec<Contributor>,
}

struct DayRow {
    day_start: i64,
    user: String,
    messages: i64,
    questions: i64,
    answers: i64,
    points: i64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
}

impl DayRow {
    /// Some contribution of this row falls in `[a, b)`. Exact for windows longer than a day:
    /// a row spans one local day, so if neither its first nor its last contribution is in the
    /// window, none between them can be either.
    fn active_in(&self, a: i64, b: i64) -> bool {
        let inside = |t: Option<i64>| t.is_some_and(|t| a <= t && t < b);
        inside(self.first_ts) || inside(self.last_ts)
    }
}

fn in_list(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    pub async fn room_stats(&self, room: &Room, q: &StatsQuery) -> Result<RoomStats> {
        let id = room.id.as_str();
        let members: Vec<(String, i64)> = sqlx::query(
            "SELECT user_id, added_at FROM room_members WHERE room_id = $1 ORDER BY user_id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get("user_id")?, r.try_get("added_at")?)))
        .collect::<Result<_>>()?;

        let inactive_ms = i64::from(q.inactive_days) * DAY_MS;
        // A day row may start up to a day before the earliest instant it is read for.
        let lo = q
            .starts
            .first()
            .copied()
            .unwrap_or(q.from)
            .min(q.to - inactive_ms.max(7 * DAY_MS) - DAY_MS);
        let hi = q.end.max(q.to);
        let rows: Vec<DayRow> = sqlx::query(
            "SELECT day_start, user_id, messages, questions, answers, points, first_ts, last_ts \
             FROM engagement_daily WHERE room_id = $1 AND day_start >= $2 AND day_start < $3",
        )
        .bind(id)
        .bind(lo)
        .bind(hi)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(DayRow {
                day_start: r.try_get("day_start")?,
                user: r.try_get("user_id")?,
                messages: r.try_get("messages")?,
                questions: r.try_get("questions")?,
                answers: r.try_get("answers")?,
                points: r.try_get("points")?,
                first_ts: r.try_get("first_ts")?,
                last_ts: r.try_get("last_ts")?,
            })
        })
        .collect::<Result<_>>()?;

        // The series, one point per bucket, zeros included.
        let mut series: Vec<SeriesPoint> = q
            .starts
            .iter()
            .map(|s| SeriesPoint {
                start: *s,
                ..Default::default()
            })
            .collect();
        let mut active_sets: Vec<HashSet<&str>> = vec![HashSet::new(); series.len()];
        for r in &rows {
            if let Some(i) = eng::bucket_of(&q.starts, q.end, r.day_start) {
                series[i].messages += r.messages;
                series[i].questions += r.questions;
                series[i].answers += r.answers;
                if r.first_ts.is_some() {
                    active_sets[i].insert(r.user.as_str());
                }
            }
        }
        for (p, set) in series.iter_mut().zip(&active_sets) {
            p.active_members = set.len() as i64;
        }
        let mut new_members = 0;
        for (_, added) in &members {
            if (q.from..q.to).contains(added) {
                new_members += 1;
            }
            if let Some(i) = eng::bucket_of(&q.starts, q.end, *added) {
                series[i].new_members += 1;
            }
        }

        // Weekly active members and churn risk, over stored members only.
        let member_set: HashSet<&str> = members.iter().map(|(u, _)| u.as_str()).collect();
        let week: HashSet<&str> = rows
            .iter()
            .filter(|r| r.active_in(q.to - 7 * DAY_MS, q.to))
            .map(|r| r.user.as_str())
            .filter(|u| member_set.contains(u))
            .collect();
        let recent: HashSet<&str> = rows
            .iter()
            .filter(|r| r.active_in(q.to - inactive_ms, q.to))
            .map(|r| r.user.as_str())
            .collect();
        let at_risk: Vec<&str> = members
            .iter()
            .filter(|(u, added)| *added < q.to - inactive_ms && !recent.contains(u.as_str()))
            .map(|(u, _)| u.as_str())
            .collect();
        let listed: Vec<&str> = at_risk.iter().take(q.churn_list_max).copied().collect();

        // Top contributors by points in the window's days.
        let first_day = eng::day_start_of(q.from, &eng::zone_or_utc(&room.engagement.timezone));
        let mut per_user: BTreeMap<&str, [i64; 4]> = BTreeMap::new();
        for r in rows
            .iter()
            .filter(|r| r.day_start >= first_day && r.day_start < q.to)
        {
            let t = per_user.entry(r.user.as_str()).or_default();
            t[0] += r.points;
            t[1] += r.messages;
            t[2] += r.questions;
            t[3] += r.answers;
        }
        let mut top: Vec<(&str, [i64; 4])> = per_user
            .into_iter()
            .filter(|(_, t)| t[0] > 0 || t[1] + t[2] + t[3] > 0)
            .collect();
        top.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then(a.0.cmp(b.0)));
        top.truncate(q.top_n);

        let mut wanted: Vec<&str> = listed
            .iter()
            .chain(top.iter().map(|(u, _)| u))
            .copied()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let (names, last_active) = self
            .names_and_last_active(id, &wanted, &listed, q.to)
            .await?;
        let name_of = |u: &str| names.get(u).cloned().unwrap_or_else(|| u.to_owned());

        let questions = self.question_stats(room, q).await?;
        let members_n = members.len() as i64;
        let weekly = week.len() as i64;
        let ratio = if members_n == 0 {
            0.0
        } else {
            weekly as f64 / members_n as f64
        };
        Ok(RoomStats {
            room: room.id.clone(),
            from: q.from,
            to: q.to,
            bucket: q.bucket,
            members: members_n,
            new_members,
            weekly_active_members: weekly,
            weekly_active_ratio: ratio,
            healthy_band: Band {
                low: q.band_low,
                high: q.band_high,
            },
            health: eng::health(ratio, q.band_low, q.band_high),
            series,
            questions,
            churn_risk: Churn {
                inactive_days: q.inactive_days,
                count: at_risk.len() as i64,
                users: listed
                    .iter()
                    .map(|u| ChurnUser {
                        id: UserId((*u).to_owned()),
                        name: name_of(u),
                        last_active_ts: last_active.get(*u).copied(),
                    })
                    .collect(),
            },
            top_contributors: top
                .into_iter()
                .map(|(u, t)| Contributor {
                    user: super::UserBrief {
                        id: UserId(u.to_owned()),
                        name: name_of(u),
                    },
                    points: t[0],
                    messages: t[1],
                    questions: t[2],
                    answers: t[3],
                })
                .collect(),
        })
    }

    /// Display names of `users`, and when each of `churned` last contributed before `to`.
    async fn names_and_last_active(
        &self,
        room: &str,
        users: &[&str],
        churned: &[&str],
        to: i64,
    ) -> Result<(HashMap<String, String>, HashMap<String, i64>)> {
        let mut names = HashMap::new();
        if !users.is_empty() {
            let sql = format!(
                "SELECT user_id, name FROM engagement_members WHERE room_id = $1 AND user_id IN ({})",
                in_list(users.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(room);
            for u in users {
                query = query.bind(*u);
            }
            for r in query.fetch_all(self.pool()).await? {
                let name: String = r.try_get("name")?;
                if !name.is_empty() {
                    names.insert(r.try_get("user_id")?, name);
                }
            }
        }
        let mut last = HashMap::new();
        if !churned.is_empty() {
            // The latest day with a contribution before `to`; its last one if that is before
            // `to`, else its first.
            let sql = format!(
                "SELECT user_id, first_ts, last_ts FROM engagement_daily d WHERE room_id = $1 \
                 AND user_id IN ({}) AND first_ts IS NOT NULL AND first_ts < $2 \
                 AND day_start = (SELECT MAX(day_start) FROM engagement_daily e \
                   WHERE e.room_id = d.room_id AND e.user_id = d.user_id \
                   AND e.first_ts IS NOT NULL AND e.first_ts < $2)",
                in_list(churned.len(), 3)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(room).bind(to);
            for u in churned {
                query = query.bind(*u);
            }
            for r in query.fetch_all(self.pool()).await? {
                let first: i64 = r.try_get("first_ts")?;
                let last_ts: Option<i64> = r.try_get("last_ts")?;
                let at = last_ts.filter(|l| *l < to).unwrap_or(first);
                last.insert(r.try_get("user_id")?, at);
            }
        }
        Ok((names, last))
    }

    async fn question_stats(&self, room: &Room, q: &StatsQuery) -> Result<QuestionStats> {
        let rows = sqlx::query(
            "SELECT ts, first_answer_at, status FROM questions \
             WHERE room_id = $1 AND ts >= $2 AND ts < $3",
        )
        .bind(room.id.as_str())
        .bind(q.from)
        .bind(q.to)
        .fetch_all(self.pool())
        .await?;
        let sla_ms = room.answer_sla_s.saturating_mul(1000);
        let (mut asked, mut answered, mut overdue) = (0i64, 0i64, 0i64);
        let mut waits = Vec::new();
        for r in &rows {
            let ts: i64 = r.try_get("ts")?;
            let first: Option<i64> = r.try_get("first_answer_at")?;
            let status: String = r.try_get("status")?;
            asked += 1;
            if first.is_some() || status == "answered" {
                answered += 1;
            }
            if let Some(f) = first {
                waits.push((f - ts).max(0));
            }
            let unanswered =
                crate::protocol::QuestionStatus::parse(&status).is_some_and(|s| s.is_unanswered());
            if unanswered && ts.saturating_add(sla_ms) < q.now {
                overdue += 1;
            }
        }
        let (median, p90) = eng::median_p90(waits);
        Ok(QuestionStats {
            asked,
            answered,
            answered_share: if asked == 0 {
                0.0
            } else {
                answered as f64 / asked as f64
            },
            first_answer_ms: FirstAnswer { median, p90 },
            overdue,
        })
    }
}
