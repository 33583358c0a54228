//! `stats-bench`: times the teacher statistics and the leaderboards on a room with a large
//! event log (default 1,000,000 events over a year), on SQLite and PostgreSQL. The room is
//! filled by bulk SQL: the event log and messages as the writer stores them, questions with
//! answer times, memberships, and the incremental counters (day rows and member totals) the
//! writer maintains for those events. Then the real Store queries (`room_stats`,
//! `leaderboard`) are timed. No server, no sockets: this measures the store's read path.

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::AnyPool;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use studyhall::engagement::{self as eng, Bucket};
use studyhall::protocol::{RoomId, RoomKind, Visibility};
use studyhall::store::{Room, StatsQuery, Store, StoreOptions};

const DAY: i64 = 86_400_000;
/// Rows per multi-row INSERT.
const ROWS: usize = 500;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Events in the room's log.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Stored members of the room.
    #[arg(long, default_value_t = 2000)]
    pub members: usize,
    /// Days the events spread over (ending today).
    #[arg(long, default_value_t = 365)]
    pub days: usize,
    /// Members active on any one day.
    #[arg(long, default_value_t = 300)]
    pub active_per_day: usize,
    /// Timed runs of each query (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub repeat: usize,
    /// Backends: sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<String>,
    // The report: stats-bench.json and stats-bench.md in `--out`.
    #[command(flatten)]
    pub db: super::BenchDb,
}

fn insert_sql(table_cols: &str, cols: usize, rows: usize) -> String {
    let mut s = format!("INSERT INTO {table_cols} VALUES ");
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("${n}"));
            n += 1;
        }
        s.push(')');
    }
    s
}

/// One value of a bulk row.
#[derive(Clone)]
enum V {
    I(i64),
    N(Option<i64>),
    S(String),
}

async fn bulk(pool: &AnyPool, table_cols: &str, cols: usize, rows: &[Vec<V>]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for chunk in rows.chunks(ROWS) {
        let sql = insert_sql(table_cols, cols, chunk.len());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for v in row {
                q = match v {
                    V::I(i) => q.bind(*i),
                    V::N(n) => q.bind(*n),
                    V::S(s) => q.bind(s.clone()),
                };
            }
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Fills room `big` on the database at `url` (already migrated). Returns what it stored.
async fn fill(url: &str, a: &Args, now: i64) -> Result<serde_json::Value> {
    let pool = AnyPool::connect(url).await?;
    let mut rng = StdRng::seed_from_u64(7);
    let first_day = eng::day_start_of(now, &eng::zone_or_utc("UTC")) - (a.days as i64 - 1) * DAY;
    let member_ids: Vec<String> = (0..a.members).map(|i| format!("u{i:05}")).collect();
    let members = membership_rows(&mut rng, &member_ids, first_day);
    bulk(
        &pool,
        "room_members (room_id, user_id, role, added_at)",
        4,
        &members,
    )
    .await?;

    let per_day = a.events / a.days;
    let mut log = EventLog::new(rng, &member_ids);
    for d in 0..a.days {
        let start = first_day + d as i64 * DAY;
        let day = log.day(a, start, now, per_day);
        insert_day(&pool, &day).await?;
    }
    let day_rows = log.day_rows();
    bulk(
        &pool,
        "engagement_daily (room_id, day_start, user_id, messages, questions, answers, points, \
         first_ts, last_ts)",
        9,
        &day_rows,
    )
    .await?;
    bulk(
        &pool,
        "engagement_members (room_id, user_id, name, messages, questions, answers, points)",
        7,
        &log.member_rows(),
    )
    .await?;
    sqlx::query("UPDATE rooms SET last_seq = $1 WHERE id = 'big'")
        .bind(log.seq)
        .execute(&pool)
        .await?;
    // Fresh statistics for both planners, as a long-running database would have.
    sqlx::query("ANALYZE").execute(&pool).await?;
    pool.close().await;
    Ok(json!({
        "events": log.seq, "messages": log.messages_n, "questions": log.questions_n,
        "day_rows": day_rows.len(), "members": a.members, "days": a.days,
    }))
}

/// The `room_members` rows: every member joined up to 60 days before the first day.
fn membership_rows(rng: &mut StdRng, member_ids: &[String], first_day: i64) -> Vec<Vec<V>> {
    member_ids
        .iter()
        .map(|u| {
            vec![
                V::S("big".into()),
                V::S(u.clone()),
                V::S("member".into()),
                V::I(first_day - rng.random_range(0..60) * DAY),
            ]
        })
        .collect()
}

/// One day's generated rows, inserted together.
#[derive(Default)]
struct Day {
    events: Vec<Vec<V>>,
    messages: Vec<Vec<V>>,
    questions: Vec<Vec<V>>,
}

/// Inserts one day's events, messages and questions.
async fn insert_day(pool: &AnyPool, day: &Day) -> Result<()> {
    bulk(
        pool,
        "events (room_id, seq, ts, kind, message_id, body)",
        6,
        &day.events,
    )
    .await?;
    bulk(
        pool,
        "messages (id, room_id, seq, sender_id, client_msg_id, ts)",
        6,
        &day.messages,
    )
    .await?;
    bulk(
        pool,
        "questions (id, room_id, seq, author_id, author_name, author_role, anonymous, text, \
         status, ts, first_answer_at)",
        11,
        &day.questions,
    )
    .await
}

/// The generator of the event log, with the counters the writer would have kept for it. One
/// seeded random stream drives everything, so the same arguments give the same room.
struct EventLog<'a> {
    rng: StdRng,
    member_ids: &'a [String],
    /// Last sequence number handed out.
    seq: i64,
    /// (day start, member) -> messages, questions, answers, -, -, points.
    daily: BTreeMap<(i64, usize), [i64; 6]>,
    /// (day start, member) -> first and last event time that day.
    first_last: HashMap<(i64, usize), (i64, i64)>,
    /// member -> messages, questions, answers, points over the whole log.
    totals: HashMap<usize, [i64; 4]>,
    questions_n: usize,
    messages_n: usize,
}

impl<'a> EventLog<'a> {
    /// An empty log for `member_ids`, drawing from `rng` (already used for the memberships).
    fn new(rng: StdRng, member_ids: &'a [String]) -> Self {
        Self {
            rng,
            member_ids,
            seq: 0,
            daily: BTreeMap::new(),
            first_last: HashMap::new(),
            totals: HashMap::new(),
            questions_n: 0,
            messages_n: 0,
        }
    }

    /// Generates the `per_day` events of the day starting at `start`, spread over that day's
    /// `--active-per-day` randomly drawn members.
    fn day(&mut self, a: &Args, start: i64, now: i64, per_day: usize) -> Day {
        let active: Vec<usize> = (0..a.active_per_day)
            .map(|_| self.rng.random_range(0..a.members))
            .collect();
        let mut day = Day {
            events: Vec::with_capacity(per_day),
            ..Day::default()
        };
        for _ in 0..per_day {
            self.event(&mut day, &active, start, now);
        }
        day
    }

    /// One event (mostly messages, some questions and question updates) with its message or
    /// question row, counted into the engagement counters.
    fn event(&mut self, day: &mut Day, active: &[usize], start: i64, now: i64) {
        self.seq += 1;
        let seq = self.seq;
        let rng = &mut self.rng;
        let user = active[rng.random_range(0..active.len())];
        let ts = start + rng.random_range(0..DAY - 1).min(now - start - 1).max(0);
        let roll = rng.random_range(0..100);
        let (kind, col, points) = match roll {
            0..=3 => ("question", 1, 5),
            4..=7 => ("question_updated", 2, 10),
            _ => ("message", 0, 1),
        };
        let id = format!("{}{seq:010}", &kind[..1]);
        day.events.push(vec![
            V::S("big".into()),
            V::I(seq),
            V::I(ts),
            V::S(kind.into()),
            V::S(id.clone()),
            V::S(format!(
                r#"{{"type":"{kind}","room":"big","seq":{seq},"id":"{id}","ts":{ts}}}"#
            )),
        ]);
        match kind {
            "message" => {
                self.messages_n += 1;
                day.messages.push(vec![
                    V::S(id),
                    V::S("big".into()),
                    V::I(seq),
                    V::S(self.member_ids[user].clone()),
                    V::S(format!("c{seq}")),
                    V::I(ts),
                ]);
            }
            "question" => {
                self.questions_n += 1;
                let answered = rng.random_range(0..10) < 8;
                let first = answered.then(|| ts + rng.random_range(10_000..3_600_000));
                day.questions.push(vec![
                    V::S(id),
                    V::S("big".into()),
                    V::I(seq),
                    V::S(self.member_ids[user].clone()),
                    V::S("Q".into()),
                    V::S("member".into()),
                    V::I(0),
                    V::S("q".into()),
                    V::S(if answered { "answered" } else { "open" }.into()),
                    V::I(ts),
                    V::N(first),
                ]);
            }
            _ => {}
        }
        self.count(start, user, ts, col, points);
    }

    /// Adds one event to the day row and the member total, as the writer's counters would.
    fn count(&mut self, start: i64, user: usize, ts: i64, col: usize, points: i64) {
        let row = self.daily.entry((start, user)).or_default();
        row[col] += 1;
        row[5] += points;
        let fl = self.first_last.entry((start, user)).or_insert((ts, ts));
        fl.0 = fl.0.min(ts);
        fl.1 = fl.1.max(ts);
        let t = self.totals.entry(user).or_default();
        t[col] += 1;
        t[3] += points;
    }

    /// The `engagement_daily` rows, one per member and day with any activity.
    fn day_rows(&self) -> Vec<Vec<V>> {
        self.daily
            .iter()
            .map(|((start, user), c)| {
                let (f, l) = self.first_last[&(*start, *user)];
                vec![
                    V::S("big".into()),
                    V::I(*start),
                    V::S(self.member_ids[*user].clone()),
                    V::I(c[0]),
                    V::I(c[1]),
                    V::I(c[2]),
                    V::I(c[5]),
                    V::N(Some(f)),
                    V::N(Some(l)),
                ]
            })
            .collect()
    }

    /// The `engagement_members` rows, one per member with any activity.
    fn member_rows(&self) -> Vec<Vec<V>> {
        self.totals
            .iter()
            .map(|(user, t)| {
                vec![
                    V::S("big".into()),
                    V::S(self.member_ids[*user].clone()),
                    V::S(self.member_ids[*user].to_uppercase()),
                    V::I(t[0]),
                    V::I(t[1]),
                    V::I(t[2]),
                    V::I(t[3]),
                ]
            })
            .collect()
    }
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn time<F, Fut, T>(repeat: usize, mut f: F) -> Result<(f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = studyhall::store::Result<T>>,
{
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f().await.context("query")?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    Ok((median_ms(times), max))
}

fn query(room: &Room, from: i64, to: i64, bucket: Bucket, now: i64) -> StatsQuery {
    let tz = eng::zone_or_utc(&room.engagement.timezone);
    let starts = eng::buckets(from, to, bucket, &tz, 10_000).unwrap_or_default();
    let end = eng::buckets_end(&starts, bucket, &tz);
    StatsQuery {
        from,
        to,
        bucket,
        starts,
        end,
        band_low: 0.15,
        band_high: 0.30,
        inactive_days: 14,
        churn_list_max: 50,
        top_n: 10,
        now,
    }
}

async fn bench_one(backend: &str, url: &str, a: &Args) -> Result<serde_json::Value> {
    let now = studyhall::store::now_ms();
    let metrics = Arc::new(studyhall::metrics::Metrics::default());
    let store = Store::open(&StoreOptions::new(url), metrics.clone(), None).await?;
    let room = Room {
        created_at: now,
        ..Room::new(
            RoomId::from("big"),
            RoomKind::Group,
            "Big".into(),
            Visibility::Open,
        )
    };
    store.create_room(&room).await?;
    store.close().await;
    let t = Instant::now();
    let filled = fill(url, a, now).await?;
    let fill_s = t.elapsed().as_secs_f64();
    eprintln!("{backend}: filled {filled} in {fill_s:.1} s");

    let store = Store::open(&StoreOptions::new(url), metrics, None).await?;
    let room = store.room(&room.id).await?.context("room")?;
    let mut rows = Vec::new();
    let cases = [
        ("stats 30 days, day buckets", now - 30 * DAY, Bucket::Day),
        ("stats 90 days, week buckets", now - 90 * DAY, Bucket::Week),
        ("stats 365 days, day buckets", now - 365 * DAY, Bucket::Day),
    ];
    for (name, from, bucket) in cases {
        let q = query(&room, from, now, bucket, now);
        let (median, max) = time(a.repeat, || store.room_stats(&room, &q)).await?;
        rows.push(json!({"query": name, "median_ms": median, "max_ms": max}));
    }
    let tz = eng::zone_or_utc("UTC");
    for (name, since) in [
        ("leaderboard week", Some(eng::week_start(now, &tz))),
        ("leaderboard month", Some(eng::month_start(now, &tz))),
        ("leaderboard all", None),
    ] {
        let (median, max) = time(a.repeat, || store.leaderboard(&room.id, since, 10)).await?;
        rows.push(json!({"query": name, "median_ms": median, "max_ms": max}));
    }
    store.close().await;
    Ok(json!({"backend": backend, "filled": filled, "fill_s": fill_s, "queries": rows}))
}

pub async fn run(a: Args) -> Result<bool> {
    std::fs::create_dir_all(&a.db.out)?;
    let mut results = Vec::new();
    for backend in &a.backends {
        match backend.as_str() {
            "sqlite" => {
                let dir = super::fresh_dir(&a.db.out.join("stats-bench-sqlite"))?;
                let url = format!("sqlite://{}", dir.join("big.db").display());
                results.push(bench_one("sqlite", &url, &a).await?);
                let _ = std::fs::remove_dir_all(&dir);
            }
            "postgres" => {
                let r =
                    a.db.on_postgres(async |url| bench_one("postgres", url, &a).await);
                results.push(r.await?);
            }
            other => anyhow::bail!("unknown backend {other}: sqlite or postgres"),
        }
    }
    let mut md = String::from("| backend | query | median ms | max ms |\n|---|---|---|---|\n");
    let mut ok = true;
    for r in &results {
        for q in r["queries"].as_array().into_iter().flatten() {
            let median = q["median_ms"].as_f64().unwrap_or(f64::MAX);
            ok &= median < 1000.0;
            md.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} |\n",
                r["backend"].as_str().unwrap_or("?"),
                q["query"].as_str().unwrap_or("?"),
                median,
                q["max_ms"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    std::fs::write(
        a.db.out.join("stats-bench.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(a.db.out.join("stats-bench.md"), &md)?;
    println!("{md}");
    Ok(ok)
}
