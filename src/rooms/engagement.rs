//! Engagement and room-health commands: `checkin`, `leaderboard`, `profile`, `stats` (host/ta
//! only) and `helpful`, plus the leaderboard and stats answers the HTTP API shares. Rights
//! are checked here; the rules live in [`crate::engagement`] and the counting in the store.

use super::{check_room_id, readable_role};
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::engagement::{self as eng, Bucket};
use crate::error::{Error, Result};
use crate::protocol::{
    ClientMsg, LeaderboardEntry, LeaderboardOk, ProfileBadge, ProfileOk, ProfileRoom,
    ProfileStreak, QuestionId, RoomId, StatsOk, UserId,
};
use crate::store::{BadgeView, Room, StatsQuery, UserBrief, WriteOp, now_ms};

/// Most entries one leaderboard answer carries.
pub const MAX_LEADERBOARD: u32 = 100;
/// Top contributors a stats answer lists.
const TOP_CONTRIBUTORS: usize = 10;
const DAY_MS: i64 = 86_400_000;

async fn room_of(app: &App, id: &RoomId) -> Result<Room> {
    app.store
        .room(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("room {id} not found")))
}

pub(super) async fn checkin(ctx: &mut Ctx, rid: Option<i64>, room: RoomId) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    if !role.can_write() {
        return Err(Error::Forbidden("viewers do not check in".into()));
    }
    let op = WriteOp::Checkin {
        room,
        user: ctx.me.room_ref(role),
        tz: ctx.me.tz.clone(),
    };
    super::submit(ctx, rid, op).await
}

/// The leaderboard answer (WebSocket `leaderboard` and `GET /api/rooms/{id}/leaderboard`).
pub(crate) async fn leaderboard_of(
    app: &App,
    room: &Room,
    period: Option<&str>,
    limit: Option<u32>,
) -> Result<LeaderboardOk> {
    let limit = limit.unwrap_or(10);
    if !(1..=MAX_LEADERBOARD).contains(&limit) {
        return Err(Error::bad_request(format!(
            "limit must be 1..={MAX_LEADERBOARD}"
        )));
    }
    let tz = eng::zone_or_utc(&room.engagement.timezone);
    let now = now_ms();
    let (period, since) = match period.unwrap_or("week") {
        "week" => ("week", Some(eng::week_start(now, &tz))),
        "month" => ("month", Some(eng::month_start(now, &tz))),
        "all" => ("all", None),
        _ => return Err(Error::bad_request("period must be week, month or all")),
    };
    let rows = app.store.leaderboard(&room.id, since, limit).await?;
    let points: Vec<i64> = rows.iter().map(|r| r.points).collect();
    let ranks = eng::competition_ranks(&points);
    let cfg = &app.config.engagement;
    let entries = rows
        .into_iter()
        .zip(ranks)
        .map(|(r, rank)| LeaderboardEntry {
            rank,
            level: cfg.level(r.total),
            user: r.user,
            points: r.points,
        })
        .collect();
    Ok(LeaderboardOk {
        room: room.id.clone(),
        period: period.to_owned(),
        since,
        entries,
    })
}

pub(super) async fn leaderboard(
    ctx: &mut Ctx,
    room: RoomId,
    period: Option<String>,
    limit: Option<u32>,
) -> Result<Outcome> {
    readable_role(ctx, &room).await?;
    let stored = room_of(&ctx.app, &room).await?;
    let reply = leaderboard_of(&ctx.app, &stored, period.as_deref(), limit).await?;
    Ok(Outcome::ok(reply))
}

pub(super) async fn profile(
    ctx: &mut Ctx,
    user: Option<UserId>,
    room: Option<RoomId>,
) -> Result<Outcome> {
    let user = user.unwrap_or_else(|| ctx.me.user.clone());
    if user.as_str().is_empty() || user.as_str().chars().count() > 64 {
        return Err(Error::bad_request("user ids are 1..=64 characters"));
    }
    if let Some(r) = &room {
        // Asking about one room the requester cannot read is refused outright.
        readable_role(ctx, r).await?;
    }
    let rows = ctx.app.store.engagement_of(&user, room.as_ref()).await?;
    let owner_tz = ctx.app.store.user_zone(&user).await?;
    let cfg = ctx.app.config.engagement.clone();
    let mut rooms = Vec::new();
    let mut name = None;
    let mut rows = rows.into_iter().peekable();
    let only = room.clone();
    let mut seen_only = false;
    loop {
        let row = match rows.next() {
            Some(r) => r,
            None if !seen_only && only.is_some() => {
                no_engagement(only.clone().unwrap_or_else(|| RoomId::from("")))
            }
            None => break,
        };
        seen_only = true;
        if readable_role(ctx, &row.room).await.is_err() {
            continue;
        }
        let Some(stored) = ctx.app.store.room(&row.room).await? else {
            continue;
        };
        if !row.name.is_empty() {
            name = Some(row.name.clone());
        }
        let zone = owner_tz
            .as_deref()
            .unwrap_or(stored.engagement.timezone.as_str());
        rooms.push(profile_room(&cfg, row, zone));
    }
    let name = if user == ctx.me.user {
        ctx.me.name.clone()
    } else {
        name.unwrap_or_else(|| user.to_string())
    };
    Ok(Outcome::ok(ProfileOk {
        user: UserBrief { id: user, name },
        rooms,
    }))
}

/// The engagement row of a room where the user has none yet: nothing earned.
fn no_engagement(room: RoomId) -> crate::store::MemberEngagement {
    crate::store::MemberEngagement {
        room,
        name: String::new(),
        points: 0,
        streak: eng::Streak::default(),
        last_checkin_day: None,
        badges: Vec::new(),
    }
}

/// One room of a profile: points, level, badges, and the streak as of today in `zone` (the
/// user's own zone, or else the room's).
fn profile_room(
    cfg: &eng::EngagementConfig,
    row: crate::store::MemberEngagement,
    zone: &str,
) -> ProfileRoom {
    let today = eng::local_day(now_ms(), &eng::zone_or_utc(zone));
    let last = row
        .last_checkin_day
        .as_deref()
        .and_then(|d| d.parse::<jiff::civil::Date>().ok());
    let streak = eng::streak_on(last, row.streak, today);
    let badges = row
        .badges
        .iter()
        .map(|(id, ts)| {
            let view = cfg.badge(id).map(BadgeView::of).unwrap_or(BadgeView {
                id: id.clone(),
                name: id.clone(),
                description: String::new(),
            });
            ProfileBadge::new(view, *ts)
        })
        .collect();
    ProfileRoom {
        room: row.room,
        points: row.points,
        level: cfg.level(row.points),
        next_level_points: cfg.next_level_points(row.points),
        badges,
        streak: ProfileStreak {
            current: streak.current,
            longest: streak.longest,
            last_day: row.last_checkin_day,
        },
    }
}

/// The stats answer (WebSocket `stats` and `GET /api/rooms/{id}/stats`).
pub(crate) async fn stats_of(
    app: &App,
    room: &Room,
    from: Option<i64>,
    to: Option<i64>,
    bucket: Option<&str>,
) -> Result<StatsOk> {
    let now = now_ms();
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to.saturating_sub(30 * DAY_MS));
    if from < 0 || to <= from {
        return Err(Error::bad_request(
            "from and to must satisfy 0 <= from < to",
        ));
    }
    let bucket = match bucket {
        None => Bucket::Day,
        Some(b) => {
            Bucket::parse(b).ok_or_else(|| Error::bad_request("bucket must be day or week"))?
        }
    };
    let tz = eng::zone_or_utc(&room.engagement.timezone);
    let max = app.config.stats_max_buckets;
    // A range too long to step through is refused before walking it.
    let span_days = (to - from) / DAY_MS;
    let approx = match bucket {
        Bucket::Day => span_days,
        Bucket::Week => span_days / 7,
    };
    let starts = if approx > max as i64 + 2 {
        None
    } else {
        eng::buckets(from, to, bucket, &tz, max)
    }
    .ok_or_else(|| Error::bad_request(format!("at most {max} buckets per query")))?;
    let end = eng::buckets_end(&starts, bucket, &tz);
    let c = &app.config;
    let q = StatsQuery {
        from,
        to,
        bucket,
        starts,
        end,
        band_low: c.health_band_low,
        band_high: c.health_band_high,
        inactive_days: c.churn_inactive_days,
        churn_list_max: c.churn_list_max,
        top_n: TOP_CONTRIBUTORS,
        now,
    };
    let stats = app.store.room_stats(room, &q).await?;
    Ok(StatsOk {
        stats,
        // The zone the buckets are aligned to, so a client labels them with the room's dates.
        tz: tz.iana_name().unwrap_or("UTC").to_owned(),
    })
}

pub(super) async fn stats(
    ctx: &mut Ctx,
    room: RoomId,
    from: Option<i64>,
    to: Option<i64>,
    bucket: Option<String>,
) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    if !role.can_moderate() {
        return Err(Error::Forbidden("only host/ta see room statistics".into()));
    }
    let stored = room_of(&ctx.app, &room).await?;
    let reply = stats_of(&ctx.app, &stored, from, to, bucket.as_deref()).await?;
    Ok(Outcome::ok(reply))
}

pub(super) async fn helpful(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    question: QuestionId,
    answer: Option<String>,
    on: bool,
) -> Result<Outcome> {
    check_room_id(&room)?;
    if question.as_str().is_empty() || question.as_str().len() > 64 {
        return Err(Error::bad_request("question id must be 1..=64 characters"));
    }
    if answer
        .as_ref()
        .is_some_and(|a| a.is_empty() || a.len() > 64)
    {
        return Err(Error::bad_request("answer id must be 1..=64 characters"));
    }
    let role = super::writer(readable_role(ctx, &room).await?)?;
    let op = WriteOp::Helpful {
        room,
        question,
        answer,
        by: ctx.me.room_ref(role),
        as_moderator: role.can_moderate(),
        on,
    };
    super::submit(ctx, rid, op).await
}

/// Routes an engagement command: check-ins, leaderboards, profiles, stats, helpful marks.
pub(super) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::Checkin { room } => checkin(ctx, rid, room).await,
        ClientMsg::Leaderboard {
            room,
            period,
            limit,
        } => leaderboard(ctx, room, period, limit).await,
        ClientMsg::Profile { user, room } => profile(ctx, user, room).await,
        ClientMsg::Stats {
            room,
            from,
            to,
            bucket,
        } => stats(ctx, room, from, to, bucket).await,
        ClientMsg::Helpful {
            room,
            question,
            answer,
            on,
        } => helpful(ctx, rid, room, question, answer, on).await,
        other => Err(crate::command::misrouted(&other)),
    }
}
