//! Room health statistics for teachers, read from the incremental counters (one row per
//! room, room-local day and active user in `engagement_daily`), the membership table and the
//! questions table, each through an index on (room, time). The cost follows the number of
//! active user-days in the window, not the number of events in the room's log. The calendar
//! (bucket starts in the room's zone) is computed by the caller with [`crate::engagement`];
//! this file knows nothing of sessions or HTTP.

use super::{Result, Room, Store};
use crate::engagement::{self as eng, Bucket};
use crate::protocol::UserId;
pub use crate::protocol::views::{
    Band, Churn, ChurnUser, Contributor, FirstAnswer, QuestionStats, RoomStats, SeriesPoint,
};
use sqlx::Row;
use std::collections::HashMap;

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

/// `sql` with the buckets as a `(VALUES ($2, $3), ...) b` table (columns `column1`, `column2`
/// on both backends) in place of `{buckets}`, bound to the room id (`$1`) and the buckets'
/// (start, end) pairs.
fn per_bucket(
    sql: &str,
    room: &str,
    buckets: &[(i64, i64)],
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let rows: Vec<String> = (0..buckets.len())
        .map(|i| format!("(${}, ${})", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let sql = sql.replace("{buckets}", &format!("(VALUES {}) b", rows.join(", ")));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(room.to_owned());
    for (a, b) in buckets {
        query = query.bind(*a).bind(*b);
    }
    query
}

/// A day row holds a contribution in `[$a, $b)`: its first or its last one is in there. Exact
/// for windows of a day or more (a row spans one local day).
const ACTIVE_IN: &str =
    "((d.first_ts >= $2 AND d.first_ts < $3) OR (d.last_ts >= $2 AND d.last_ts < $3))";

impl Store {
    pub async fn room_stats(&self, room: &Room, q: &StatsQuery) -> Result<RoomStats> {
        let id = room.id.as_str();
        let series = self.stats_series(id, q).await?;
        let (members, new_members) = self.member_counts(id, q).await?;
        let weekly = self.weekly_active(id, q).await?;
        let at_risk = self.churn_risk(id, q).await?;
        let listed: Vec<&str> = at_risk
            .iter()
            .take(q.churn_list_max)
            .map(String::as_str)
            .collect();
        let top = self.top_contributors(room, q).await?;

        let mut wanted: Vec<&str> = listed
            .iter()
            .copied()
            .chain(top.iter().map(|(u, _)| u.as_str()))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let (names, last_active) = self
            .names_and_last_active(id, &wanted, &listed, q.to)
            .await?;
        let name_of = |u: &str| names.get(u).cloned().unwrap_or_else(|| u.to_owned());

        let questions = self.question_stats(room, q).await?;
        let ratio = if members == 0 {
            0.0
        } else {
            weekly as f64 / members as f64
        };
        Ok(RoomStats {
            room: room.id.clone(),
            from: q.from,
            to: q.to,
            bucket: q.bucket,
            members,
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
                .iter()
                .map(|(u, t)| Contributor {
                    user: super::UserBrief {
                        id: UserId(u.clone()),
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

    /// The series: day rows and memberships grouped by bucket, in SQL.
    async fn stats_series(&self, id: &str, q: &StatsQuery) -> Result<Vec<SeriesPoint>> {
        let pool = self.pool();
        let bounds: Vec<(i64, i64)> = q
            .starts
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, q.starts.get(i + 1).copied().unwrap_or(q.end)))
            .collect();
        let mut series: Vec<SeriesPoint> = q
            .starts
            .iter()
            .map(|s| SeriesPoint {
                start: *s,
                ..Default::default()
            })
            .collect();
        let index: HashMap<i64, usize> =
            q.starts.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        for chunk in bounds.chunks(400) {
            let query = per_bucket(
                "SELECT b.column1 AS start, CAST(SUM(d.messages) AS BIGINT) AS messages, \
                 CAST(SUM(d.questions) AS BIGINT) AS questions, \
                 CAST(SUM(d.answers) AS BIGINT) AS answers, \
                 COUNT(DISTINCT CASE WHEN d.first_ts IS NOT NULL THEN d.user_id END) AS active \
                 FROM {buckets} JOIN engagement_daily d ON d.room_id = $1 \
                 AND d.day_start >= b.column1 AND d.day_start < b.column2 GROUP BY b.column1",
                id,
                chunk,
            );
            for r in query.fetch_all(pool).await? {
                if let Some(&i) = index.get(&r.try_get::<i64, _>("start")?) {
                    series[i].messages = r.try_get("messages")?;
                    series[i].questions = r.try_get("questions")?;
                    series[i].answers = r.try_get("answers")?;
                    series[i].active_members = r.try_get("active")?;
                }
            }
            let query = per_bucket(
                "SELECT b.column1 AS start, COUNT(*) AS n FROM {buckets} JOIN room_members m \
                 ON m.room_id = $1 AND m.added_at >= b.column1 AND m.added_at < b.column2 \
                 GROUP BY b.column1",
                id,
                chunk,
            );
            for r in query.fetch_all(pool).await? {
                if let Some(&i) = index.get(&r.try_get::<i64, _>("start")?) {
                    series[i].new_members = r.try_get("n")?;
                }
            }
        }
        Ok(series)
    }

    /// The room's members, and how many of them joined in the window.
    async fn member_counts(&self, id: &str, q: &StatsQuery) -> Result<(i64, i64)> {
        let pool = self.pool();
        let members: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM room_members WHERE room_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?;
        let new_members: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM room_members WHERE room_id = $1 AND added_at >= $2 AND added_at < $3",
        )
        .bind(id)
        .bind(q.from)
        .bind(q.to)
        .fetch_one(pool)
        .await?;
        Ok((members, new_members))
    }

    /// Weekly active stored members: day rows of the last 7 days (and the day before, which
    /// may still hold a contribution inside the window).
    async fn weekly_active(&self, id: &str, q: &StatsQuery) -> Result<i64> {
        let week_from = q.to - 7 * DAY_MS;
        let sql = format!(
            "SELECT COUNT(DISTINCT d.user_id) FROM engagement_daily d JOIN room_members m \
             ON m.room_id = d.room_id AND m.user_id = d.user_id \
             WHERE d.room_id = $1 AND d.day_start >= $4 AND d.day_start < $3 AND {ACTIVE_IN}"
        );
        let weekly: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(week_from)
            .bind(q.to)
            .bind(week_from - DAY_MS)
            .fetch_one(self.pool())
            .await?;
        Ok(weekly)
    }

    /// Churn risk: members from before the inactivity window with no contribution in it.
    async fn churn_risk(&self, id: &str, q: &StatsQuery) -> Result<Vec<String>> {
        let inactive_ms = i64::from(q.inactive_days) * DAY_MS;
        let churn_from = q.to - inactive_ms;
        let sql = format!(
            "SELECT m.user_id FROM room_members m WHERE m.room_id = $1 AND m.added_at < $2 \
             AND NOT EXISTS (SELECT 1 FROM engagement_daily d WHERE d.room_id = m.room_id \
             AND d.user_id = m.user_id AND d.day_start >= $4 AND d.day_start < $3 AND {ACTIVE_IN}) \
             ORDER BY m.user_id"
        );
        let at_risk: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(churn_from)
            .bind(q.to)
            .bind(churn_from - DAY_MS)
            .fetch_all(self.pool())
            .await?;
        Ok(at_risk)
    }

    /// Top contributors by points in the window's days: each user with their points,
    /// messages, questions and answers.
    async fn top_contributors(
        &self,
        room: &Room,
        q: &StatsQuery,
    ) -> Result<Vec<(String, [i64; 4])>> {
        let first_day = eng::day_start_of(q.from, &eng::zone_or_utc(&room.engagement.timezone));
        let rows = sqlx::query(
            "SELECT user_id, CAST(SUM(points) AS BIGINT) AS points, \
             CAST(SUM(messages) AS BIGINT) AS messages, CAST(SUM(questions) AS BIGINT) AS questions, \
             CAST(SUM(answers) AS BIGINT) AS answers FROM engagement_daily \
             WHERE room_id = $1 AND day_start >= $2 AND day_start < $3 GROUP BY user_id \
             HAVING SUM(points) > 0 OR SUM(messages) + SUM(questions) + SUM(answers) > 0 \
             ORDER BY 2 DESC, user_id LIMIT CAST($4 AS BIGINT)",
        )
        .bind(room.id.as_str())
        .bind(first_day)
        .bind(q.to)
        .bind(q.top_n as i64)
        .fetch_all(self.pool())
        .await?;
        let mut top: Vec<(String, [i64; 4])> = Vec::with_capacity(rows.len());
        for r in &rows {
            top.push((
                r.try_get("user_id")?,
                [
                    r.try_get("points")?,
                    r.try_get("messages")?,
                    r.try_get("questions")?,
                    r.try_get("answers")?,
                ],
            ));
        }
        Ok(top)
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
                super::placeholders(users.len(), 2)
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
                super::placeholders(churned.len(), 3)
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
        let pool = self.pool();
        let sla_ms = room.answer_sla_s.saturating_mul(1000);
        let row = sqlx::query(
            "SELECT COUNT(*) AS asked, \
             COUNT(CASE WHEN first_answer_at IS NOT NULL OR status = 'answered' THEN 1 END) AS answered, \
             COUNT(first_answer_at) AS timed, \
             COUNT(CASE WHEN status IN ('pending', 'open', 'pinned') AND ts < $4 THEN 1 END) AS overdue \
             FROM questions WHERE room_id = $1 AND ts >= $2 AND ts < $3",
        )
        .bind(room.id.as_str())
        .bind(q.from)
        .bind(q.to)
        .bind(q.now.saturating_sub(sla_ms))
        .fetch_one(pool)
        .await?;
        let asked: i64 = row.try_get("asked")?;
        let answered: i64 = row.try_get("answered")?;
        let timed: i64 = row.try_get("timed")?;
        let overdue: i64 = row.try_get("overdue")?;
        // Nearest-rank percentiles, read by offset from the sorted waits.
        let nth = |p: f64| ((p * timed as f64).ceil() as i64).clamp(1, timed.max(1)) - 1;
        let mut at = Vec::new();
        for k in [nth(0.5), nth(0.9)] {
            if timed == 0 {
                at.push(None);
                continue;
            }
            let w: Option<i64> = sqlx::query_scalar(
                "SELECT first_answer_at - ts AS w FROM questions WHERE room_id = $1 AND ts >= $2 \
                 AND ts < $3 AND first_answer_at IS NOT NULL ORDER BY w LIMIT 1 OFFSET $4",
            )
            .bind(room.id.as_str())
            .bind(q.from)
            .bind(q.to)
            .bind(k)
            .fetch_optional(pool)
            .await?;
            at.push(w.map(|w| w.max(0)));
        }
        Ok(QuestionStats {
            asked,
            answered,
            answered_share: if asked == 0 {
                0.0
            } else {
                answered as f64 / asked as f64
            },
            first_answer_ms: FirstAnswer {
                median: at[0],
                p90: at[1],
            },
            overdue,
        })
    }
}
