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
mod stage;

pub(crate) use crate::command::check_room_id;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::protocol::{self, ClientMsg, PlatformRole, RoomId, RoomRole, Visibility};
use crate::store::{EventType, Room};
use policy::Policy;

use crate::node::CallAction;
use crate::ratelimit::Action;
use crate::rtc;

pub(crate) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    // Rights follow the session: a joined room's role is checked again before each command on
    // it (a cached policy lookup), so changes made elsewhere apply at once.
    if let Some(room) = msg.room()
        && ctx.joined.contains_key(room)
        && !matches!(msg, ClientMsg::Leave { .. })
    {
        let room = room.clone();
        access::recheck(ctx, &room).await?;
    }
    if let Some(action) = user_action(&msg)
        && !ctx.app.user_limits.take(&ctx.me.user, action)
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
        ClientMsg::Send {
            room,
            text,
            client_msg_id,
            reply_to,
        } => chat::send(ctx, rid, room, text, client_msg_id, reply_to).await,
        ClientMsg::Edit { room, id, text } => chat::edit(ctx, rid, room, id, text).await,
        ClientMsg::Delete { room, id } => chat::delete(ctx, rid, room, id).await,
        ClientMsg::React { room, id, emoji } => chat::react(ctx, rid, room, id, emoji, true).await,
        ClientMsg::Unreact { room, id, emoji } => {
            chat::react(ctx, rid, room, id, emoji, false).await
        }
        ClientMsg::History {
            room,
            before_seq,
            limit,
        } => chat::history(ctx, room, before_seq, limit).await,
        ClientMsg::Typing { room } => chat::typing(ctx, room),
        ClientMsg::Read { room, seq } => chat::read(ctx, room, seq).await,
        ClientMsg::Rooms => chat::rooms(ctx).await,
        ClientMsg::Ask {
            room,
            text,
            anonymous,
        } => qa::ask(ctx, rid, room, text, anonymous).await,
        ClientMsg::Vote { room, question, up } => qa::vote(ctx, rid, room, question, up).await,
        ClientMsg::Answer {
            room,
            question,
            text,
        } => qa::answer(ctx, rid, room, question, text).await,
        ClientMsg::QuestionStatus {
            room,
            question,
            status,
        } => qa::set_status(ctx, rid, room, question, status).await,
        ClientMsg::Questions { room, sort, status } => qa::list(ctx, room, sort, status).await,
        ClientMsg::RaiseHand { room } => stage::raise(ctx, room),
        ClientMsg::LowerHand { room, user } => stage::lower(ctx, room, user),
        ClientMsg::Hands { room } => stage::hands(ctx, room),
        ClientMsg::Stage { room, user, on } => stage::stage(ctx, room, user, on),
        ClientMsg::Mute {
            room,
            user,
            seconds,
        } => moderation::mute(ctx, room, user, seconds).await,
        ClientMsg::Unmute { room, user } => moderation::unmute(ctx, room, user).await,
        ClientMsg::Kick { room, user } => moderation::kick(ctx, room, user).await,
        ClientMsg::Ban { room, user } => moderation::ban(ctx, room, user).await,
        ClientMsg::Unban { room, user } => moderation::unban(ctx, room, user).await,
        ClientMsg::SlowMode { room, seconds } => moderation::slow_mode(ctx, room, seconds).await,
        ClientMsg::Report { room, id, reason } => moderation::report(ctx, room, id, reason).await,
        ClientMsg::Reports { room, state } => moderation::reports(ctx, room, state).await,
        ClientMsg::ReportResolve {
            room,
            report,
            resolution,
        } => moderation::report_resolve(ctx, room, report, resolution).await,
        ClientMsg::Search {
            room,
            q,
            limit,
            offset,
        } => chat::search(ctx, room, q, limit, offset).await,
        ClientMsg::Call { to, media, room } => rtc::call(ctx, to, media, room).await,
        ClientMsg::CallAccept { call_id } => {
            rtc::call_action(ctx, rid, CallAction::Accept, call_id)
        }
        ClientMsg::CallReject { call_id } => {
            rtc::call_action(ctx, rid, CallAction::Reject, call_id)
        }
        ClientMsg::CallHangup { call_id } => {
            rtc::call_action(ctx, rid, CallAction::Hangup, call_id)
        }
        ClientMsg::CallResume { call_id } => {
            rtc::call_action(ctx, rid, CallAction::Resume, call_id)
        }
        ClientMsg::AvJoin { room } => rtc::av_join(ctx, room).await,
        ClientMsg::AvLeave { room } => rtc::av_leave(ctx, room).await,
        ClientMsg::AvMute { room, user, kind } => rtc::av_mute(ctx, room, user, kind).await,
        ClientMsg::Signal {
            call_id,
            room,
            to,
            data,
        } => rtc::signal(ctx, rid, call_id, room, to, data).await,
        // -- engagement and room health --
        ClientMsg::Checkin { room } => engagement::checkin(ctx, rid, room).await,
        ClientMsg::Leaderboard {
            room,
            period,
            limit,
        } => engagement::leaderboard(ctx, room, period, limit).await,
        ClientMsg::Profile { user, room } => engagement::profile(ctx, user, room).await,
        ClientMsg::Stats {
            room,
            from,
            to,
            bucket,
        } => engagement::stats(ctx, room, from, to, bucket).await,
        ClientMsg::Helpful {
            room,
            question,
            answer,
            on,
        } => engagement::helpful(ctx, rid, room, question, answer, on).await,
        ClientMsg::PollCreate {
            room,
            kind,
            question,
            options,
            multiple,
            correct,
            duration_s,
            show_results,
        } => {
            let new = polls::NewPoll {
                kind,
                question,
                options,
                multiple,
                correct,
                duration_s,
                show_results,
            };
            polls::create(ctx, rid, room, new).await
        }
        ClientMsg::PollOpen { room, poll } => {
            polls::set_state(ctx, rid, room, poll, protocol::PollState::Open).await
        }
        ClientMsg::PollClose { room, poll } => {
            polls::set_state(ctx, rid, room, poll, protocol::PollState::Closed).await
        }
        ClientMsg::PollAnswer {
            room,
            poll,
            choices,
            text,
        } => polls::answer(ctx, rid, room, poll, choices, text).await,
        ClientMsg::Polls { room } => polls::list(ctx, room).await,
        ClientMsg::ClassStart { room } => {
            class::set(ctx, rid, room, protocol::ClassState::Live).await
        }
        ClientMsg::ClassEnd { room } => {
            class::set(ctx, rid, room, protocol::ClassState::Ended).await
        }
        ClientMsg::BreakoutOpen {
            room,
            groups,
            count,
            assign,
            duration_s,
        } => {
            let spec = breakouts::OpenSpec {
                groups,
                count,
                assign,
                duration_s,
            };
            breakouts::open(ctx, room, spec).await
        }
        ClientMsg::BreakoutMove {
            room,
            user,
            group_room,
        } => breakouts::move_user(ctx, room, user, group_room).await,
        ClientMsg::BreakoutBroadcast { room, text } => {
            breakouts::broadcast(ctx, rid, room, text).await
        }
        ClientMsg::BreakoutClose { room } => breakouts::close(ctx, room).await,
        ClientMsg::Help { room } => breakouts::help(ctx, room).await,
        ClientMsg::Board { room, board, data } => boards::message(ctx, room, board, data).await,
        ClientMsg::BoardGrant {
            room,
            board,
            user,
            draw,
        } => boards::grant(ctx, room, board, user, draw).await,
    }
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
    let policy = ctx.app.policies.get(&ctx.app.store, &room_id).await?;
    let (role, open_only) = resolve_role(ctx, &policy)?;
    let role = role.ok_or_else(|| Error::Forbidden("this room is invite-only".into()))?;
    if open_only {
        // Joining an open room makes it one of the user's rooms (as a plain member).
        let seen = ctx.app.policies.version(&room_id);
        ctx.app
            .store
            .ensure_member(&room_id, &ctx.me.user, role)
            .await?;
        ctx.app
            .policies
            .member_recorded(&room_id, &ctx.me.user, role, seen);
    }
    let room = policy.room.clone();

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
    let entering = ctx.app.hub.online_role(&room_id, &ctx.me.user).is_none();
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
    // A ban or a removal that landed while this join was on its way missed the session (kick
    // only sees sessions already in the room): look again now that it is in.
    let policies = &ctx.app.policies;
    let recheck = match policies
        .refresh_user(&ctx.app.store, &room_id, &ctx.me.user)
        .await
    {
        Ok(()) => policies
            .get(&ctx.app.store, &room_id)
            .await
            .and_then(|p| resolve_role(ctx, &p)),
        Err(e) => Err(e),
    };
    let recheck = match recheck {
        Ok((Some(_), _)) => Ok(()),
        Ok((None, _)) => Err(Error::Forbidden("this room is invite-only".into())),
        Err(e) => Err(e),
    };
    let result = match recheck {
        Ok(()) => replay_and_reply(ctx, rid, &room, role, joined, after_seq).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        ctx.app.hub.leave(&room_id, &ctx.handle.id);
        ctx.joined.remove(&room_id);
        broker.leave_room(&room_id);
    } else {
        if entering {
            // Before the reply: the user's next write in the room comes after it in the outbox.
            let me = ctx.me.room_ref(role);
            if let Err(e) = ctx
                .app
                .store
                .member_event(EventType::MemberJoined, &room_id, me, None)
                .await
            {
                tracing::warn!(error = %e, room = %room_id, "webhooks: member.joined not recorded");
            }
        }
        if first_join {
            let me = ctx.me.room_ref(role);
            class::attended(&ctx.app, &room_id, &me, ctx.handle.id.as_str(), true);
        }
        // Moderation must know a host or ta while they are offline too (their token's grant
        // or admin role is known only while they are here).
        if first_join
            && role.can_moderate()
            && let Err(e) = ctx
                .app
                .store
                .remember_rank(&room_id, &ctx.me.user, role)
                .await
        {
            tracing::warn!(error = %e, room = %room_id, "rank not remembered");
        }
    }
    result
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
        Some(after) => {
            let page = ctx
                .app
                .store
                .events_after(&room.id, after, ctx.app.config.replay_limit, view)
                .await?;
            if page.has_more {
                (None, true)
            } else {
                (Some(page), false)
            }
        }
        None => (None, false),
    };
    if let Some(rid) = rid {
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
            replayed: after_seq.map(|_| page.as_ref().map_or(0, |p| p.events.len())),
        };
        ctx.push(protocol::encode_ok_as(rid, &reply)).await;
    }
    let mut delivered = last_seq;
    if let Some(page) = page {
        for body in page.events {
            delivered = delivered.max(seq_of(&body).unwrap_or(0));
            if !ctx.push(body).await {
                break;
            }
        }
    }
    ctx.app.hub.open_gate(&room.id, &ctx.handle.id, delivered);
    Ok(Outcome::Done)
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
