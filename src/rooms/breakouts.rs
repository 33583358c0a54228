//! Breakout groups: `breakout_open`, `breakout_move`, `breakout_broadcast`, `breakout_close`
//! (host/ta of the parent room) and `help` (a group member); how the parent's online students
//! are dealt into groups; the group rooms' derived ids; and the clock that closes groups at
//! `closes_at` (found in the store, so it survives a restart). Each group is an ordinary
//! invite-only room whose members are its students plus the parent's host/ta; rights inside it
//! are the usual ones. The same clock warns every session in the parent and the groups
//! `breakout_warning_s` before `closes_at`. Nothing here touches a socket or SQL.

use super::check_room_id;
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::Frame;
use crate::protocol::{
    self, BreakoutAssign, BreakoutGroup, BreakoutOpenOk, EmptyOk, GroupSpec, RoomId, RoomKind,
    RoomRole, ServerMsg, UserId, UserRef, Visibility,
};
use crate::store::{Breakout, NewBreakout, NewGroup, Room, SendOp, WriteOp, now_ms};
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// What `breakout_open` asked for, as a client sent it.
pub(super) struct OpenSpec {
    pub groups: Option<Vec<GroupSpec>>,
    pub count: Option<u32>,
    pub assign: Option<BreakoutAssign>,
    pub duration_s: Option<u32>,
}

fn moderator(ctx: &Ctx, room: &RoomId) -> Result<RoomRole> {
    check_room_id(room)?;
    let role = ctx.joined_role(room)?;
    if !role.can_moderate() {
        return Err(Error::Forbidden("only host/ta run breakout groups".into()));
    }
    Ok(role)
}

fn check_user(user: &UserId) -> Result<()> {
    if user.as_str().is_empty() || user.as_str().chars().count() > 64 {
        return Err(Error::bad_request("user ids are 1..=64 characters"));
    }
    Ok(())
}

/// The id of group `k` (1-based) of the parent's `n`th breakout: `<parent>.g<k>` the first
/// time, `<parent>.b<n>.g<k>` after; the parent's part is cut so the id stays within 64.
pub fn group_room_id(parent: &RoomId, n: i64, k: usize) -> RoomId {
    let suffix = if n <= 1 {
        format!(".g{k}")
    } else {
        format!(".b{n}.g{k}")
    };
    let keep = 64usize
        .saturating_sub(suffix.len())
        .min(parent.as_str().len());
    // Room ids are ASCII, so any byte index is a character boundary.
    RoomId(format!("{}{suffix}", &parent.as_str()[..keep]))
}

/// Deals `users` into `groups`, each to a smallest group (the first of them on a tie), in the
/// order `assign` says: shuffled, or by user id.
pub fn deal(groups: &mut [Vec<UserId>], mut users: Vec<UserId>, assign: BreakoutAssign) {
    if groups.is_empty() {
        return;
    }
    match assign {
        BreakoutAssign::Random => users.shuffle(&mut rand::rng()),
        BreakoutAssign::Balanced => users.sort(),
    }
    for u in users {
        let smallest = (0..groups.len())
            .min_by_key(|&i| groups[i].len())
            .unwrap_or(0);
        groups[smallest].push(u);
    }
}

/// Checks the request and decides who goes where: (title, students) per group.
fn plan(ctx: &Ctx, room: &RoomId, spec: OpenSpec) -> Result<Vec<(String, Vec<UserId>)>> {
    let cfg = &ctx.app.config;
    let explicit = spec.groups.unwrap_or_default();
    let n = match (explicit.len(), spec.count) {
        (0, None) => return Err(Error::bad_request("breakout_open needs groups or count")),
        (0, Some(c)) => c as usize,
        (_, Some(_)) => return Err(Error::bad_request("give groups or count, not both")),
        (n, None) => n,
    };
    if n == 0 || n > cfg.breakout_max_groups {
        return Err(Error::bad_request(format!(
            "breakout groups must be 1..={}",
            cfg.breakout_max_groups
        )));
    }
    let mut named = HashSet::new();
    let mut groups = Vec::with_capacity(n);
    for (i, g) in explicit.into_iter().enumerate() {
        let title = g.title.unwrap_or_else(|| format!("Group {}", i + 1));
        if title.trim().is_empty() || title.chars().count() > cfg.breakout_max_title_chars {
            return Err(Error::bad_request(format!(
                "group titles are 1..={} characters",
                cfg.breakout_max_title_chars
            )));
        }
        for u in &g.members {
            check_user(u)?;
            if !named.insert(u.clone()) {
                return Err(Error::bad_request(format!("{u} is named in two groups")));
            }
        }
        groups.push((title, g.members));
    }
    while groups.len() < n {
        groups.push((format!("Group {}", groups.len() + 1), Vec::new()));
    }
    if spec.count.is_some() || spec.assign.is_some() {
        // The parent's online students (plain members) not named already.
        let online: Vec<UserId> = ctx
            .app
            .hub
            .online_users(room)
            .into_iter()
            .filter(|u| u.role == RoomRole::Member.into() && !named.contains(&u.id))
            .map(|u| u.id)
            .collect();
        let mut students: Vec<Vec<UserId>> = groups
            .iter_mut()
            .map(|g| std::mem::take(&mut g.1))
            .collect();
        deal(&mut students, online, spec.assign.unwrap_or_default());
        for (g, s) in groups.iter_mut().zip(students) {
            g.1 = s;
        }
    }
    Ok(groups)
}

/// The parent's host/ta, who belong to every group: stored, online now, and the opener.
async fn moderators(ctx: &Ctx, room: &RoomId, me: RoomRole) -> Result<BTreeMap<UserId, RoomRole>> {
    let mut mods: BTreeMap<UserId, RoomRole> = ctx
        .app
        .store
        .members(room)
        .await?
        .into_iter()
        .filter(|(_, r)| r.can_moderate())
        .collect();
    for u in ctx.app.hub.online_users(room) {
        if let Some(r) = u.role.room().filter(|r| r.can_moderate()) {
            mods.entry(u.id).or_insert(r);
        }
    }
    mods.insert(ctx.me.user.clone(), me);
    Ok(mods)
}

fn group_room(id: RoomId, title: String) -> Room {
    Room::new(id, RoomKind::Group, title, Visibility::Invite)
}

fn assigned(room: &RoomId, group_room: &RoomId) -> Frame {
    Frame::from(protocol::encode(&ServerMsg::BreakoutAssigned {
        room,
        group_room,
    }))
}

pub(super) async fn open(ctx: &mut Ctx, room: RoomId, spec: OpenSpec) -> Result<Outcome> {
    let me = moderator(ctx, &room)?;
    let cfg = &ctx.app.config;
    if spec
        .duration_s
        .is_some_and(|d| d == 0 || d > cfg.breakout_max_duration_s)
    {
        return Err(Error::bad_request(format!(
            "duration_s must be 1..={}",
            cfg.breakout_max_duration_s
        )));
    }
    let closes_at = spec.duration_s.map(|d| now_ms() + i64::from(d) * 1000);
    let plan = plan(ctx, &room, spec)?;
    let mods = moderators(ctx, &room, me).await?;
    let n = ctx.app.store.breakout_count(&room).await? + 1;
    let mut groups = Vec::with_capacity(plan.len());
    let mut reply = Vec::with_capacity(plan.len());
    for (k, (title, students)) in plan.into_iter().enumerate() {
        let id = group_room_id(&room, n, k + 1);
        let mut members = mods.clone();
        for s in &students {
            members.entry(s.clone()).or_insert(RoomRole::Member);
        }
        groups.push(NewGroup {
            room: group_room(id.clone(), title.clone()),
            members: members.into_iter().collect(),
        });
        reply.push(BreakoutGroup {
            room: id,
            title,
            members: students,
        });
    }
    let new = NewBreakout {
        id: format!("{room}/{n}"),
        parent: room.clone(),
        by: ctx.me.user.clone(),
        closes_at,
        groups,
    };
    ctx.app.store.open_breakout(&new).await?;
    ctx.app.policies.extras_changed(&room);
    tracing::info!(room = %room, groups = reply.len(), "breakout groups opened");
    for g in &reply {
        let frame = assigned(&room, &g.room);
        for user in &g.members {
            ctx.app.hub.notify_user(&room, user, &frame);
        }
    }
    Ok(Outcome::ok(BreakoutOpenOk {
        groups: reply,
        closes_at,
    }))
}

async fn open_of(ctx: &Ctx, room: &RoomId) -> Result<Breakout> {
    ctx.app
        .store
        .open_breakout_of(room)
        .await?
        .ok_or_else(|| Error::NotFound(format!("room {room} has no open breakout groups")))
}

pub(super) async fn move_user(
    ctx: &mut Ctx,
    room: RoomId,
    user: UserId,
    to: RoomId,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    check_user(&user)?;
    check_room_id(&to)?;
    let b = open_of(ctx, &room).await?;
    if !b.groups.iter().any(|g| g.room == to) {
        return Err(Error::NotFound(format!(
            "{to} is not a group of this breakout"
        )));
    }
    let store = &ctx.app.store;
    if store
        .member_role(&to, &user)
        .await?
        .is_some_and(|r| r.can_moderate())
    {
        return Err(Error::bad_request("host/ta are in every group already"));
    }
    let left = store.move_breakout_member(&b, &user, &to).await?;
    let policies = &ctx.app.policies;
    for g in &left {
        policies.member_changed(g, &user, None);
    }
    policies.member_changed(&to, &user, Some(RoomRole::Member));
    let mut rooms = vec![room.clone()];
    rooms.extend(left);
    ctx.app
        .hub
        .notify_once(&rooms, Some(&user), &assigned(&room, &to));
    Ok(Outcome::ok(EmptyOk {}))
}

pub(super) async fn broadcast(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    text: String,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    if text.trim().is_empty() {
        return Err(Error::bad_request("text must not be empty"));
    }
    let max = ctx.app.config.max_text_chars;
    if text.chars().count() > max {
        return Err(Error::TooLarge(format!(
            "text is longer than {max} characters"
        )));
    }
    let b = open_of(ctx, &room).await?;
    // From the reserved system sender (no token carries it), named after who broadcast it.
    let from = UserRef {
        id: UserId(crate::auth::SYSTEM_USER.into()),
        name: ctx.me.name.clone(),
        role: crate::protocol::ShownRole::System,
    };
    let mut pending = Vec::with_capacity(b.groups.len());
    for g in b.groups {
        let op = WriteOp::Send(SendOp {
            room: g.room,
            from: from.clone(),
            text: text.clone(),
            client_msg_id: None,
            reply_to: None,
        });
        pending.push(ctx.app.store.submit(op).await?);
    }
    Ok(Outcome::Deferred(Box::pin(async move {
        for rx in pending {
            let result = match rx.await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Unavailable("server is shutting down".into())),
            };
            if let Err(e) = result {
                return Some(crate::command::error_frame(rid, &e));
            }
        }
        rid.map(|rid| protocol::encode_ok_as(rid, &EmptyOk {}))
    })))
}

/// Closes a breakout (a command or the clock): its group rooms are archived, and every session
/// in the parent or a group hears `breakout_closed`. False if it was closed already.
pub async fn close_breakout(app: &App, b: &Breakout) -> Result<bool> {
    if !app.store.close_breakout(&b.id).await? {
        return Ok(false);
    }
    app.policies.extras_changed(&b.parent);
    let mut rooms = vec![b.parent.clone()];
    for g in &b.groups {
        if let Some(r) = app.store.room(&g.room).await? {
            app.policies.room_changed(r);
        }
        rooms.push(g.room.clone());
    }
    let frame = Frame::from(protocol::encode(&ServerMsg::BreakoutClosed {
        room: &b.parent,
    }));
    app.hub.notify_once(&rooms, None, &frame);
    tracing::info!(room = %b.parent, "breakout groups closed");
    Ok(true)
}

pub(super) async fn close(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    moderator(ctx, &room)?;
    let b = open_of(ctx, &room).await?;
    if !close_breakout(&ctx.app, &b).await? {
        return Err(Error::Conflict(
            "the breakout groups are closed already".into(),
        ));
    }
    Ok(Outcome::ok(EmptyOk {}))
}

/// `help {room}`: `room` is the group room the student is in (or the parent, whose open
/// breakout then tells their group); host/ta in the parent room hear `help_requested`.
pub(super) async fn help(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    let role = ctx.joined_role(&room)?;
    let store = &ctx.app.store;
    let (b, group) = match store.breakout_of_group(&room).await? {
        Some(b) => (b, room.clone()),
        None => {
            let b = open_of(ctx, &room).await?;
            let mut mine = None;
            for g in &b.groups {
                if store
                    .member_role(&g.room, &ctx.me.user)
                    .await?
                    .is_some_and(|r| !r.can_moderate())
                {
                    mine = Some(g.room.clone());
                    break;
                }
            }
            let group = mine.ok_or_else(|| {
                Error::NotMember("you are not in a breakout group of this room".into())
            })?;
            (b, group)
        }
    };
    if !b.open {
        return Err(Error::Conflict("the breakout groups are closed".into()));
    }
    let user = ctx.me.room_ref(role);
    let frame = Frame::from(protocol::encode(&ServerMsg::HelpRequested {
        room: &b.parent,
        group_room: &group,
        user: &user,
    }));
    ctx.app.hub.notify_moderators(&b.parent, None, &frame);
    Ok(Outcome::ok(EmptyOk {}))
}

/// Sends `breakout_warning` for the breakouts closing within `breakout_warning_s`: once per
/// breakout (the store hands each warning to one node, whose hub relays it to the others), to
/// every session in the parent or a group room, once per session.
async fn warn_closing(app: &App) {
    let within = i64::from(app.config.breakout_warning_s) * 1000;
    let due = match app.store.claim_breakout_warnings(now_ms(), within).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "breakout warning scan failed");
            return;
        }
    };
    for (id, parent, closes_at) in due {
        let b = match app.store.open_breakout_of(&parent).await {
            Ok(Some(b)) if b.id == id => b,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, room = %parent, "breakout warning: groups not read");
                continue;
            }
        };
        let mut rooms = vec![b.parent.clone()];
        rooms.extend(b.groups.iter().map(|g| g.room.clone()));
        let frame = Frame::from(protocol::encode(&ServerMsg::BreakoutWarning {
            room: &b.parent,
            closes_at,
        }));
        app.hub.notify_once(&rooms, None, &frame);
        tracing::info!(room = %b.parent, "breakout groups warned of their close");
    }
}

/// Every `class_clock_ms`: warns the breakouts about to close and closes those past
/// `closes_at` (the store says which, so groups opened before a restart close after it too).
pub async fn run_clock(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.class_clock_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        warn_closing(&app).await;
        let due = match app.store.due_breakouts(now_ms()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "breakout clock scan failed");
                continue;
            }
        };
        for (id, parent) in due {
            let closed = match app.store.open_breakout_of(&parent).await {
                Ok(Some(b)) if b.id == id => close_breakout(&app, &b).await,
                Ok(_) => Ok(false),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = closed {
                tracing::warn!(error = %e, room = %parent, "closing breakout groups by the clock failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_are_valid_room_ids() {
        let short = RoomId::from("algebra");
        assert_eq!(group_room_id(&short, 1, 3).as_str(), "algebra.g3");
        assert_eq!(group_room_id(&short, 2, 1).as_str(), "algebra.b2.g1");
        let long = RoomId::from("x".repeat(64).as_str());
        for (n, k) in [(1, 1), (1, 50), (12, 50)] {
            let id = group_room_id(&long, n, k);
            assert!(protocol::valid_room_id(id.as_str()), "{id}");
        }
    }

    #[test]
    fn dealing_fills_the_smallest_group_first() {
        let users: Vec<UserId> = ["e", "a", "d", "c", "b"].map(UserId::from).to_vec();
        let mut groups = vec![vec![UserId::from("x"), UserId::from("y")], vec![], vec![]];
        deal(&mut groups, users.clone(), BreakoutAssign::Balanced);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 2, 2]);
        assert_eq!(groups[1], ["a", "c"].map(UserId::from).to_vec());
        assert_eq!(groups[2], ["b", "d"].map(UserId::from).to_vec());
        let mut random = vec![vec![], vec![]];
        deal(&mut random, users, BreakoutAssign::Random);
        assert_eq!(random.iter().map(Vec::len).sum::<usize>(), 5);
        assert!(random.iter().all(|g| (2..=3).contains(&g.len())));
    }
}
