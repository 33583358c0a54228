//! Room features as plain command logic over the session context: access (who may join a
//! room and with what role), join/leave with gap-free replay, and dispatch of every command to
//! its handler. Rights are checked here on every command; the store and hub do the work.
//! Nothing here touches the socket or SQL directly.

mod access;
pub mod boards;
pub mod breakouts;
mod chat;
pub mod class;
pub(crate) mod engagement;
mod moderation;
pub mod policy;
pub mod polls;
mod qa;
pub mod stage;

pub(crate) use crate::command::check_room_id;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::protocol::{self, ClientMsg, PlatformRole, RoomId, RoomRole, Visibility};
use crate::store::Room;
use policy::Policy;

use crate::ratelimit::Action;
use crate::rtc;

/// Runs one command: checks the session may still act in its room and the per-user limits,
/// then hands the command to its feature.
pub(crate) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    admit(ctx, &msg).await?;
    match msg {
        ClientMsg::Hello { .. } => Err(Error::bad_request("already signed in")),
        ClientMsg::Ping => {
            let pong = protocol::encode_pong(rid);
            ctx.push(pong).await;
            Ok(Outcome::Done)
        }
        ClientMsg::Refresh { token } => access::refresh(ctx, token).await,
        ClientMsg::Join { room, after_seq } => join(ctx, rid, room, after_seq).await,
        ClientMsg::Leave { room } => leave(ctx, room),
        msg @ (ClientMsg::Send { .. }
        | ClientMsg::Edit { .. }
        | ClientMsg::Delete { .. }
        | ClientMsg::React { .. }
        | ClientMsg::Unreact { .. }
        | ClientMsg::History { .. }
        | ClientMsg::Typing { .. }
        | ClientMsg::Read { .. }
        | ClientMsg::Rooms
        | ClientMsg::Search { .. }) => chat::dispatch(ctx, rid, msg).await,
        msg @ (ClientMsg::Ask { .. }
        | ClientMsg::Vote { .. }
        | ClientMsg::Answer { .. }
        | ClientMsg::QuestionStatus { .. }
        | ClientMsg::Questions { .. }) => qa::dispatch(ctx, rid, msg).await,
        msg @ (ClientMsg::RaiseHand { .. }
        | ClientMsg::LowerHand { .. }
        | ClientMsg::Hands { .. }
        | ClientMsg::Stage { .. }) => stage::dispatch(ctx, msg).await,
        msg @ (ClientMsg::Mute { .. }
        | ClientMsg::Unmute { .. }
        | ClientMsg::Kick { .. }
        | ClientMsg::Ban { .. }
        | ClientMsg::Unban { .. }
        | ClientMsg::SlowMode { .. }
        | ClientMsg::Report { .. }
        | ClientMsg::Reports { .. }
        | ClientMsg::ReportResolve { .. }) => moderation::dispatch(ctx, msg).await,
        msg @ (ClientMsg::Call { .. }
        | ClientMsg::CallAccept { .. }
        | ClientMsg::CallReject { .. }
        | ClientMsg::CallHangup { .. }
        | ClientMsg::CallResume { .. }
        | ClientMsg::AvJoin { .. }
        | ClientMsg::AvLeave { .. }
        | ClientMsg::AvMute { .. }
        | ClientMsg::AvUnmute { .. }
        | ClientMsg::Signal { .. }) => calls_and_av(ctx, rid, msg).await,
        msg @ (ClientMsg::Checkin { .. }
        | ClientMsg::Leaderboard { .. }
        | ClientMsg::Profile { .. }
        | ClientMsg::Stats { .. }
        | ClientMsg::Helpful { .. }) => engagement::dispatch(ctx, rid, msg).await,
        msg @ (ClientMsg::PollAnswers { .. } | ClientMsg::QuizLeaderboard { .. }) => {
            polls::dispatch(ctx, msg).await
        }
        msg @ (ClientMsg::PollCreate { .. }
        | ClientMsg::PollOpen { .. }
        | ClientMsg::PollClose { .. }
        | ClientMsg::PollAnswer { .. }
        | ClientMsg::Polls { .. }
        | ClientMsg::ClassStart { .. }
        | ClientMsg::ClassEnd { .. }
        | ClientMsg::ClassReopen { .. }
        | ClientMsg::ClassSummary { .. }
        | ClientMsg::BreakoutOpen { .. }
        | ClientMsg::BreakoutMove { .. }
        | ClientMsg::BreakoutBroadcast { .. }
        | ClientMsg::BreakoutClose { .. }
        | ClientMsg::Help { .. }
        | ClientMsg::Board { .. }
        | ClientMsg::BoardGrant { .. }) => class::dispatch(ctx, rid, msg).await,
    }
}

/// Calls, A/V and signalling, run by `rtc`. A/V opens only while the class is live (rtc
/// checks the rest of `av_join`).
async fn calls_and_av(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    if let ClientMsg::AvJoin { room } = &msg
        && ctx.joined.contains_key(room)
    {
        class::check_live(&ctx.app, room, "audio/video").await?;
    }
    rtc::dispatch(ctx, rid, msg).await
}

/// Rights follow the session: a joined room's role is checked again before each command on
/// it (a cached policy lookup), so changes made elsewhere apply at once; then the command
/// counts against its per-user limit.
async fn admit(ctx: &mut Ctx, msg: &ClientMsg) -> Result<()> {
    if let Some(room) = msg.room()
        && ctx.joined.contains_key(room)
        && !matches!(msg, ClientMsg::Leave { .. })
    {
        access::recheck(ctx, room).await?;
        if member_write(msg)
            && let Some(&role) = ctx.joined.get(room)
        {
            class::check_open_for(&ctx.app, room, role).await?;
        }
    }
    if let Some(action) = user_action(msg)
        && !ctx.app.user_limits.take_share(
            &ctx.me.user,
            action,
            ctx.app.hub.nodes_with_sessions_of(&ctx.me.user),
        )
    {
        ctx.app
            .metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(Error::RateLimited(format!(
            "too many {} actions from this user: slow down",
            action.as_str()
        )));
    }
    Ok(())
}

/// Text a command carries: not blank (`bad_request`) and at most `max` characters
/// (`too_large`); `what` names it in the error.
pub(crate) fn check_len(text: &str, max: usize, what: &str) -> Result<()> {
    if protocol::is_blank(text) {
        return Err(Error::bad_request(format!("{what} must not be empty")));
    }
    if text.chars().count() > max {
        return Err(Error::TooLarge(format!(
            "{what} is longer than {max} characters"
        )));
    }
    Ok(())
}

/// The commands an ended class refuses from members and viewers: what adds to or changes the
/// room's content (deleting one's own message, reporting, reads and `leave` stay open).
fn member_write(msg: &ClientMsg) -> bool {
    matches!(
        msg,
        ClientMsg::Send { .. }
            | ClientMsg::Edit { .. }
            | ClientMsg::React { .. }
            | ClientMsg::Unreact { .. }
            | ClientMsg::Ask { .. }
            | ClientMsg::Vote { .. }
            | ClientMsg::Answer { .. }
            | ClientMsg::Helpful { .. }
            | ClientMsg::PollAnswer { .. }
            | ClientMsg::RaiseHand { .. }
            | ClientMsg::Help { .. }
    )
}

/// The per-user limit a command counts against, if any.
fn user_action(msg: &ClientMsg) -> Option<Action> {
    match msg {
        ClientMsg::Send { .. }
        | ClientMsg::Edit { .. }
        | ClientMsg::React { .. }
        | ClientMsg::Unreact { .. }
        | ClientMsg::Ask { .. }
        | ClientMsg::Answer { .. }
        | ClientMsg::Report { .. } => Some(Action::Write),
        ClientMsg::Join { .. } | ClientMsg::Leave { .. } => Some(Action::Join),
        ClientMsg::RaiseHand { .. } | ClientMsg::LowerHand { .. } | ClientMsg::Help { .. } => {
            Some(Action::Hand)
        }
        ClientMsg::Call { .. } => Some(Action::Call),
        _ => None,
    }
}

/// The user's role in a room: a platform admin is host everywhere; otherwise the higher of
/// the token's grant and the stored membership; otherwise `member` of an open room.
/// `Ok(None)` means the room is invite-only and the user was not invited. The flag says the
/// role comes only from the room being open (nothing stored, no grant): the one case a join
/// records as a membership. A token's grant is never stored, so a later token without it
/// takes it away. Reads the cached policy only: no database round trip.
pub(crate) fn resolve_role(ctx: &Ctx, policy: &Policy) -> Result<(Option<RoomRole>, bool)> {
    let room = &policy.room;
    if ctx.me.role == PlatformRole::Admin {
        return Ok((Some(RoomRole::Host), false));
    }
    let granted = ctx.me.grants.get(&room.id).copied();
    // The platform's grant of host/ta outranks a ban: host and ta cannot be moderated, and a
    // ta's ban of a host who was offline (so not known to be one) must not lock them out.
    if !granted.is_some_and(RoomRole::can_moderate) && policy.is_banned(&ctx.me.user) {
        return Err(Error::Forbidden("you are banned from this room".into()));
    }
    let best = granted.max(policy.stored_role(&ctx.me.user));
    match (best, room.visibility) {
        (Some(role), _) => Ok((Some(role), false)),
        (None, Visibility::Open) => Ok((Some(RoomRole::Member), true)),
        (None, Visibility::Invite) => Ok((None, false)),
    }
}

/// `role`, unless it may only read the room.
fn writer(role: RoomRole) -> Result<RoomRole> {
    if !role.can_write() {
        return Err(Error::Forbidden(
            "viewers are read-only in this room".into(),
        ));
    }
    Ok(role)
}

/// The session's role in a room it joined, unless that role may only read it.
fn writable(ctx: &Ctx, room: &RoomId) -> Result<RoomRole> {
    check_room_id(room)?;
    writer(ctx.joined_role(room)?)
}

/// Hands a sequenced write to the store's group-commit writer; the reply (`ok` with the
/// committed write's fields, or the error) follows the commit.
async fn submit(ctx: &Ctx, rid: Option<i64>, op: crate::store::WriteOp) -> Result<Outcome> {
    let rx = ctx.app.store.submit(op).await?;
    Ok(Outcome::Deferred(crate::command::deferred(
        rid,
        rx,
        chat::write_ok,
    )))
}

/// Submits a posted text (a message, an edit, a question, an answer) once it keeps the room's
/// posting rules ([`Policy::check_post`]); `write` builds the write from its author and text.
async fn submit_post(
    ctx: &Ctx,
    rid: Option<i64>,
    policy: &Policy,
    role: RoomRole,
    text: String,
    write: impl FnOnce(protocol::UserRef, String) -> crate::store::WriteOp,
) -> Result<Outcome> {
    policy.check_post(&ctx.me.user, role, &text)?;
    submit(ctx, rid, write(ctx.me.room_ref(role), text)).await
}

/// The role for a read-only command on a room the session may not have joined.
pub(crate) async fn readable_role(ctx: &Ctx, room: &RoomId) -> Result<RoomRole> {
    check_room_id(room)?;
    if let Some(role) = ctx.joined.get(room) {
        return Ok(*role);
    }
    let policy = ctx.app.policies.get(&ctx.app.store, room).await?;
    match resolve_role(ctx, &policy)? {
        (Some(role), _) => Ok(role),
        (None, _) => Err(Error::Forbidden("this room is invite-only".into())),
    }
}

async fn join(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room_id: RoomId,
    after_seq: Option<i64>,
) -> Result<Outcome> {
    check_room_id(&room_id)?;
    if matches!(after_seq, Some(s) if s < 0) {
        return Err(Error::bad_request("after_seq must be >= 0"));
    }
    if !ctx.joined.contains_key(&room_id)
        && ctx.joined.len() >= ctx.app.config.max_rooms_per_session
    {
        return Err(Error::Forbidden(format!(
            "a session may join at most {} rooms",
            ctx.app.config.max_rooms_per_session
        )));
    }
    let (room, role) = join_role(ctx, &room_id).await?;

    // Cluster mode: subscribed to the room and its sequencer started before the gate is set,
    // so every event after this join's replay reaches the hub, in order.
    let first_join = !ctx.joined.contains_key(&room_id);
    let broker = ctx.app.broker.clone();
    if first_join {
        broker.enter_room(&room_id, &ctx.app.store).await?;
        // Cluster mode: cached while members are here, so events from other nodes keep its
        // slow-mode clocks current.
        if broker.node_id().is_some()
            && let Err(e) = ctx.app.policies.get(&ctx.app.store, &room_id).await
        {
            broker.leave_room(&room_id);
            return Err(e);
        }
    }
    // The user's first session on this node (the store decides whether it is the first on
    // any node).
    let entering = ctx.app.hub.local_role(&room_id, &ctx.me.user).is_none();
    // Gate first, read the store second: anything committed after the gate is either in the
    // read or held by the gate (or both, and then dropped by seq), never lost.
    let joined = match ctx.app.hub.join(
        &room_id,
        &ctx.handle,
        ctx.me.room_ref(role),
        role.can_moderate(),
        room.kind == protocol::RoomKind::Live,
    ) {
        Ok(j) => j,
        Err(e) => {
            if first_join {
                broker.leave_room(&room_id);
            }
            return Err(Error::Forbidden(e.to_string()));
        }
    };
    ctx.joined.insert(room_id.clone(), role);
    let result = match recheck(ctx, &room_id).await {
        Ok(()) => replay_and_reply(ctx, rid, &room, role, joined, after_seq).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        ctx.app.hub.leave(&room_id, &ctx.handle.id);
        ctx.joined.remove(&room_id);
        broker.leave_room(&room_id);
    } else {
        joined_effects(ctx, &room_id, role, entering, first_join).await;
    }
    result
}

/// The join's access check: the room's policy gives the role (an open room's newcomer is
/// stored as a member). The room and the role, or why not.
async fn join_role(ctx: &mut Ctx, room_id: &RoomId) -> Result<(Room, RoomRole)> {
    let policy = ctx.app.policies.get(&ctx.app.store, room_id).await?;
    let (role, open_only) = resolve_role(ctx, &policy)?;
    let role = role.ok_or_else(|| Error::Forbidden("this room is invite-only".into()))?;
    if open_only {
        // Joining an open room makes it one of the user's rooms (as a plain member).
        let seen = ctx.app.policies.version(room_id);
        ctx.app
            .store
            .ensure_member(room_id, &ctx.me.user, role)
            .await?;
        ctx.app
            .policies
            .member_recorded(room_id, &ctx.me.user, role, seen);
    }
    Ok((policy.room.clone(), role))
}

/// A ban or a removal that landed while this join was on its way missed the session (kick
/// only sees sessions already in the room): look again now that it is in.
async fn recheck(ctx: &Ctx, room_id: &RoomId) -> Result<()> {
    let policies = &ctx.app.policies;
    policies
        .refresh_user(&ctx.app.store, room_id, &ctx.me.user)
        .await?;
    let policy = policies.get(&ctx.app.store, room_id).await?;
    match resolve_role(ctx, &policy)? {
        (Some(_), _) => Ok(()),
        (None, _) => Err(Error::Forbidden("this room is invite-only".into())),
    }
}

/// What a successful join leaves behind: `member.joined` for a user entering the room, the
/// session's attendance, and a host or ta's rank for moderation while they are offline.
async fn joined_effects(
    ctx: &Ctx,
    room_id: &RoomId,
    role: RoomRole,
    entering: bool,
    first_join: bool,
) {
    if entering {
        // Before the reply: the user's next write in the room comes after it in the outbox.
        let me = ctx.me.room_ref(role);
        let (node, run) = ctx.app.member_node();
        if let Err(e) = ctx.app.store.member_entered(room_id, me, &node, run).await {
            tracing::warn!(error = %e, room = %room_id, "webhooks: member.joined not recorded");
        }
    }
    if first_join {
        let me = ctx.me.room_ref(role);
        class::attended(&ctx.app, room_id, &me, ctx.handle.id.as_str(), true);
    }
    // Moderation must know a host or ta while they are offline too (their token's grant
    // or admin role is known only while they are here).
    if first_join
        && role.can_moderate()
        && let Err(e) = ctx
            .app
            .store
            .remember_rank(room_id, &ctx.me.user, role)
            .await
    {
        tracing::warn!(error = %e, room = %room_id, "rank not remembered");
    }
}

async fn replay_and_reply(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: &Room,
    role: RoomRole,
    joined: crate::hub::Joined,
    after_seq: Option<i64>,
) -> Result<Outcome> {
    let view = crate::store::View::of(role);
    // The last seq fanned out to the room here (read from the store once, when the room has
    // no session on this node yet): everything after it reaches the gate.
    let last_seq = match ctx.app.hub.published_seq(&room.id) {
        Some(seq) => seq,
        None => {
            let seq = ctx.app.store.last_seq(&room.id).await?;
            ctx.app.hub.note_published_seq(&room.id, seq);
            seq
        }
    };
    let (page, gap) = match after_seq {
        Some(after) => replay(ctx, &room.id, after, view).await?,
        None => (None, false),
    };
    if let Some(rid) = rid {
        let snap = snapshot(ctx, room, role).await?;
        let reply = protocol::JoinOk {
            room: protocol::RoomBrief {
                id: &room.id,
                kind: room.kind,
                title: &room.title,
            },
            role,
            last_seq,
            online: &joined.online,
            online_count: joined.online_count,
            stage: &joined.stage,
            hands: role.can_moderate().then(|| {
                joined
                    .hands
                    .into_iter()
                    .map(|(user, ts)| protocol::RaisedHand { user, ts })
                    .collect()
            }),
            gap: after_seq.map(|_| gap),
            replayed: after_seq.map(|_| page.as_ref().map_or(0, |p| p.frames.len())),
            class: snap.class,
            pinned: snap.pinned,
            polls: snap.polls,
            breakout: snap.breakout,
            boards: snap.boards,
        };
        ctx.push(reply.encode(rid)).await;
    }
    let mut delivered = last_seq;
    if let Some(page) = page {
        delivered = delivered.max(page.last.unwrap_or(0));
        for frame in page.frames {
            if !ctx.push(frame).await {
                break;
            }
        }
    }
    // The held frames go at the pace the client reads, like the replay before them.
    let mut waiting = ctx.app.hub.open_gate(&room.id, &ctx.handle.id, delivered);
    while let Some(frame) = waiting {
        if !ctx.push(frame).await {
            break;
        }
        waiting = ctx.app.hub.open_gate(&room.id, &ctx.handle.id, delivered);
    }
    Ok(Outcome::Done)
}

/// A resume's replay: the events after `after` as `view` sees them, from the hub's copy of
/// the room's latest events when it holds them all, else from the store; `None` and a gap
/// when there are more than `replay_limit`.
async fn replay(
    ctx: &Ctx,
    room: &RoomId,
    after: i64,
    view: crate::store::View,
) -> Result<(Option<crate::hub::Replay>, bool)> {
    let app = &ctx.app;
    let limit = app.config.replay_limit;
    let moderator = view == crate::store::View::Moderator;
    let metrics = &app.metrics;
    // The copy is read first: an edit committed but not yet published when it was read
    // shows in the store's note of rewrites, read after it.
    let page = match app.hub.replay(room, after, limit as usize, moderator) {
        Some(page)
            if page
                .last
                .is_none_or(|last| !app.store.rewritten_after(room, last)) =>
        {
            metrics
                .replays_from_memory
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            page
        }
        _ => {
            metrics
                .replays_from_store
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let page = app.store.events_after(room, after, limit, view).await?;
            crate::hub::Replay {
                last: page.events.iter().filter_map(|e| seq_of(e)).max(),
                frames: page
                    .events
                    .into_iter()
                    .map(crate::hub::Frame::from)
                    .collect(),
                gap: page.has_more,
            }
        }
    };
    Ok(if page.gap {
        (None, true)
    } else {
        (Some(page), false)
    })
}

/// What a late joiner needs at once, besides stage and hands: the class state and times, the
/// pinned question, the open polls, the open breakout and the boards, each as `role` may see
/// it.
struct Snapshot {
    class: protocol::ClassBrief,
    pinned: Option<protocol::QuestionView>,
    polls: Option<Vec<protocol::PollView>>,
    breakout: Option<protocol::BreakoutSnapshot>,
    boards: Option<Vec<String>>,
}

/// Reads the join snapshot: the class from the cached policy, then which of the rest the room
/// has (cached with the policy: a plain room in use costs no read), and the details only of
/// those.
async fn snapshot(ctx: &Ctx, room: &Room, role: RoomRole) -> Result<Snapshot> {
    let app = &ctx.app;
    let policy = app.policies.get(&app.store, &room.id).await?;
    let r = &policy.room;
    let now = crate::store::now_ms();
    let class = protocol::ClassBrief {
        state: r.state.at(r.starts_at, r.ends_at, now),
        starts_at: r.starts_at,
        ends_at: r.ends_at,
        started_at: r.started_at,
    };
    let view = crate::store::View::of(role);
    let mark = app.hub.snapshot_mark(&room.id);
    let has = app.policies.extras(&app.store, &policy, mark).await?;
    let pinned = if has.pinned {
        let filter = crate::store::QuestionFilter {
            status: Some(protocol::QuestionStatus::Pinned),
            ..Default::default()
        };
        app.store
            .questions(
                &room.id,
                &filter,
                crate::store::QuestionSort::Recent,
                view,
                r.answer_sla_s,
                now,
            )
            .await?
            .into_iter()
            .next()
    } else {
        None
    };
    let polls = if has.open_polls {
        let all = app
            .store
            .polls(&room.id, view, app.config.poll_word_cloud_top)
            .await?;
        let open: Vec<_> = all
            .into_iter()
            .filter(|p| p.state == protocol::PollState::Open)
            .collect();
        (!open.is_empty()).then_some(open)
    } else {
        None
    };
    let breakout = if has.breakout {
        breakout_snapshot(ctx, &room.id).await?
    } else {
        None
    };
    let boards = if has.boards {
        Some(app.store.board_ids(&room.id).await?)
    } else {
        None
    };
    Ok(Snapshot {
        class,
        pinned,
        polls,
        breakout,
        boards,
    })
}

/// The room's open breakout as the joiner sees it: every group with its students, and the
/// joiner's own group if they are a student in one.
async fn breakout_snapshot(ctx: &Ctx, room: &RoomId) -> Result<Option<protocol::BreakoutSnapshot>> {
    let Some(b) = ctx.app.store.open_breakout_of(room).await? else {
        return Ok(None);
    };
    let students = ctx.app.store.breakout_students(&b).await?;
    let groups: Vec<protocol::BreakoutGroup> = b
        .groups
        .into_iter()
        .zip(students)
        .map(|(g, members)| protocol::BreakoutGroup {
            room: g.room,
            title: g.title,
            members,
        })
        .collect();
    let group_room = groups
        .iter()
        .find(|g| g.members.contains(&ctx.me.user))
        .map(|g| g.room.clone());
    Ok(Some(protocol::BreakoutSnapshot {
        groups,
        closes_at: b.closes_at,
        group_room,
    }))
}

/// The `seq` of a stored event body (written by us, so it is there).
fn seq_of(body: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: i64,
    }
    serde_json::from_str::<Seq>(body).ok().map(|s| s.seq)
}

fn leave(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    // Leaving the room leaves its A/V too, and a stage spot given up here ends the right to
    // publish for the user's other sessions as well.
    if !access::leave_lost(ctx, &room) {
        return Err(Error::NotMember(format!("not in room {room}")));
    }
    Ok(Outcome::ok(protocol::EmptyOk {}))
}
