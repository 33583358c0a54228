//! Moderation commands for host/ta: mute/unmute, kick, ban/unban, slow mode; and `report`
//! for members, with `reports` and `report_resolve` for host/ta to work the queue. Mutes and bans are persisted (they survive restarts); every action lands in
//! the room's audit log. Host and TA cannot be moderated by these commands.

use super::check_room_id;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::Frame;
use crate::protocol::{self, ClientMsg, RoomId, RoomRole, ServerMsg, ShownRole, UserId};
use crate::store::{RoomPatch, now_ms};

/// Longest mute: 30 days.
const MAX_MUTE_S: u64 = 30 * 86_400;
/// Longest slow-mode interval: 1 hour.
const MAX_SLOW_MODE_S: u64 = 3600;

fn moderator(ctx: &Ctx, room: &RoomId) -> Result<RoomRole> {
    check_room_id(room)?;
    let role = ctx.joined_role(room)?;
    if !role.can_moderate() {
        return Err(Error::Forbidden("only host/ta moderate this room".into()));
    }
    Ok(role)
}

/// Refuses actions against host/ta (as they are online in the room, or stored members).
fn check_user_id(user: &UserId) -> Result<()> {
    if user.as_str().is_empty() || user.as_str().chars().count() > 64 {
        return Err(Error::bad_request("user ids are 1..=64 characters"));
    }
    Ok(())
}

async fn check_target(ctx: &Ctx, room: &RoomId, user: &UserId) -> Result<()> {
    check_user_id(user)?;
    if user == &ctx.me.user {
        return Err(Error::bad_request("you cannot moderate yourself"));
    }
    // Online here or, in cluster mode, on another node (a token-granted host connected
    // elsewhere is known here only from that node's heartbeat).
    let hub = &ctx.app.hub;
    let local = hub.online_role(room, user).and_then(ShownRole::room);
    let remote = hub.remote_role(room, user).and_then(ShownRole::room);
    let stored = ctx
        .app
        .policies
        .get(&ctx.app.store, room)
        .await?
        .stored_role(user);
    // Offline, a host or ta by grant or admin role is known from their last join.
    let remembered = ctx.app.store.remembered_rank(room, user).await?;
    if local
        .max(remote)
        .max(stored)
        .max(remembered)
        .is_some_and(RoomRole::can_moderate)
    {
        return Err(Error::Forbidden("host and ta cannot be moderated".into()));
    }
    Ok(())
}

async fn audit(
    ctx: &Ctx,
    room: &RoomId,
    action: &str,
    target: &UserId,
    detail: Option<String>,
) -> Result<()> {
    tracing::info!(room = %room, actor = %ctx.me.user, action, target = %target, "moderation");
    ctx.app
        .store
        .audit(
            room,
            ctx.me.user.as_str(),
            action,
            Some(target.as_str()),
            detail.as_deref(),
        )
        .await?;
    Ok(())
}

fn muted_frame(room: &RoomId, user: &UserId, until: i64) -> Frame {
    Frame::from(protocol::encode(&ServerMsg::Muted { room, user, until }))
}

pub(super) async fn mute(
    ctx: &mut Ctx,
    room: RoomId,
    user: UserId,
    seconds: u64,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    if !(1..=MAX_MUTE_S).contains(&seconds) {
        return Err(Error::bad_request(format!(
            "seconds must be 1..={MAX_MUTE_S}"
        )));
    }
    check_target(ctx, &room, &user).await?;
    let until = now_ms() + (seconds as i64) * 1000;
    ctx.app.store.set_mute(&room, &user, until).await?;
    ctx.app.policies.set_mute(&room, &user, Some(until));
    ctx.app
        .hub
        .notify_moderators(&room, Some(&user), &muted_frame(&room, &user, until));
    audit(ctx, &room, "mute", &user, Some(format!("{seconds}s"))).await?;
    Ok(Outcome::ok(protocol::MuteOk { until }))
}

pub(super) async fn unmute(ctx: &mut Ctx, room: RoomId, user: UserId) -> Result<Outcome> {
    moderator(ctx, &room)?;
    // Undoing a mute needs no rank over its target: a host or ta muted while they were not
    // known as such (or oneself) can be unmuted by any host or ta.
    check_user_id(&user)?;
    let was = ctx.app.store.clear_mute(&room, &user).await?;
    ctx.app.policies.set_mute(&room, &user, None);
    ctx.app
        .hub
        .notify_moderators(&room, Some(&user), &muted_frame(&room, &user, 0));
    audit(ctx, &room, "unmute", &user, None).await?;
    Ok(Outcome::ok(protocol::UnmuteOk { was_muted: was }))
}

pub(super) async fn kick(ctx: &mut Ctx, room: RoomId, user: UserId) -> Result<Outcome> {
    moderator(ctx, &room)?;
    check_target(ctx, &room, &user).await?;
    let sessions = ctx.app.hub.kick(&room, &user, "kicked");
    audit(ctx, &room, "kick", &user, None).await?;
    Ok(Outcome::ok(protocol::KickOk { sessions }))
}

pub(super) async fn ban(ctx: &mut Ctx, room: RoomId, user: UserId) -> Result<Outcome> {
    moderator(ctx, &room)?;
    check_target(ctx, &room, &user).await?;
    ctx.app.store.ban(&room, &user, &ctx.me.user).await?;
    ctx.app.policies.ban_changed(&room, &user, true);
    let sessions = ctx.app.hub.kick(&room, &user, "banned");
    audit(ctx, &room, "ban", &user, None).await?;
    Ok(Outcome::ok(protocol::KickOk { sessions }))
}

pub(super) async fn unban(ctx: &mut Ctx, room: RoomId, user: UserId) -> Result<Outcome> {
    moderator(ctx, &room)?;
    if !ctx.app.store.unban(&room, &user).await? {
        return Err(Error::NotFound(format!("{user} is not banned here")));
    }
    ctx.app.policies.ban_changed(&room, &user, false);
    audit(ctx, &room, "unban", &user, None).await?;
    Ok(Outcome::ok(protocol::EmptyOk {}))
}

pub(super) async fn slow_mode(ctx: &mut Ctx, room: RoomId, seconds: u64) -> Result<Outcome> {
    moderator(ctx, &room)?;
    if seconds > MAX_SLOW_MODE_S {
        return Err(Error::bad_request(format!(
            "seconds must be 0..={MAX_SLOW_MODE_S}"
        )));
    }
    let patch = RoomPatch {
        slow_mode_s: Some(seconds as i64),
        ..Default::default()
    };
    let updated = ctx.app.store.update_room(&room, &patch).await?;
    ctx.app.policies.room_changed(updated);
    ctx.app.hub.notify_all(
        &room,
        &Frame::from(protocol::encode(&ServerMsg::SlowMode {
            room: &room,
            seconds,
        })),
    );
    tracing::info!(room = %room, actor = %ctx.me.user, seconds, "slow mode");
    ctx.app
        .store
        .audit(
            &room,
            ctx.me.user.as_str(),
            "slow_mode",
            None,
            Some(&format!("{seconds}s")),
        )
        .await?;
    Ok(Outcome::ok(protocol::SlowModeOk { seconds }))
}

pub(super) async fn report(
    ctx: &mut Ctx,
    room: RoomId,
    id: String,
    reason: String,
) -> Result<Outcome> {
    check_room_id(&room)?;
    ctx.joined_role(&room)?;
    let max = crate::store::MAX_REASON_CHARS;
    if crate::protocol::is_blank(&reason) || reason.chars().count() > max {
        return Err(Error::bad_request(format!(
            "reason must be 1..={max} characters"
        )));
    }
    if id.is_empty() || id.len() > 64 {
        return Err(Error::bad_request("id must name a message or question"));
    }
    let report = ctx
        .app
        .store
        .add_report(&room, &id, &ctx.me.user, &reason)
        .await?;
    report_changed(ctx, &room, &report);
    Ok(Outcome::ok(protocol::ReportOk { id: report.id }))
}

/// Host/ta: the room's reports (the store's queue, as `GET /api/rooms/{id}/reports` lists it),
/// each with the message or question it points at.
pub(super) async fn reports(
    ctx: &mut Ctx,
    room: RoomId,
    state: protocol::ReportsState,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    let all = state != protocol::ReportsState::Open;
    let store = &ctx.app.store;
    let mut reports = Vec::new();
    for report in store.reports(&room, all).await? {
        if state == protocol::ReportsState::Resolved && report.resolved_at.is_none() {
            continue;
        }
        let target = store
            .report_target(&room, &report.target_kind, &report.target_id)
            .await?;
        reports.push(protocol::views::ReportEntry { report, target });
    }
    Ok(Outcome::ok(protocol::ReportsOk { reports }))
}

/// Host/ta: resolves an open report (as `POST /api/rooms/{id}/reports/{report}/resolve`
/// does), records it in the audit log and tells the room's host/ta sessions with a `report`
/// event carrying the resolved report.
pub(super) async fn report_resolve(
    ctx: &mut Ctx,
    room: RoomId,
    report: String,
    resolution: String,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    if report.is_empty() || report.len() > 64 {
        return Err(Error::bad_request("report must name a report"));
    }
    if resolution.trim().is_empty() || resolution.chars().count() > 200 {
        return Err(Error::bad_request("resolution must be 1..=200 characters"));
    }
    let done = ctx
        .app
        .store
        .resolve_report(&room, &report, ctx.me.user.as_str(), &resolution)
        .await?;
    ctx.app
        .store
        .audit(
            &room,
            ctx.me.user.as_str(),
            "resolve_report",
            Some(&report),
            Some(&resolution),
        )
        .await?;
    report_changed(ctx, &room, &done);
    Ok(Outcome::ok(protocol::ReportResolveOk { report: done }))
}

/// Routes a moderation command: mutes, kicks, bans, slow mode, reports.
pub(super) async fn dispatch(ctx: &mut Ctx, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::Mute {
            room,
            user,
            seconds,
        } => mute(ctx, room, user, seconds).await,
        ClientMsg::Unmute { room, user } => unmute(ctx, room, user).await,
        ClientMsg::Kick { room, user } => kick(ctx, room, user).await,
        ClientMsg::Ban { room, user } => ban(ctx, room, user).await,
        ClientMsg::Unban { room, user } => unban(ctx, room, user).await,
        ClientMsg::SlowMode { room, seconds } => slow_mode(ctx, room, seconds).await,
        ClientMsg::Report { room, id, reason } => report(ctx, room, id, reason).await,
        ClientMsg::Reports { room, state } => reports(ctx, room, state).await,
        ClientMsg::ReportResolve {
            room,
            report,
            resolution,
        } => report_resolve(ctx, room, report, resolution).await,
        other => Err(crate::command::misrouted(&other)),
    }
}

/// Tells the room's host/ta (the `report` event) that a report was filed or resolved.
fn report_changed(ctx: &Ctx, room: &RoomId, report: &protocol::views::Report) {
    let frame = Frame::from(protocol::encode(&ServerMsg::Report { room, report }));
    ctx.app.hub.notify_moderators(room, None, &frame);
}
