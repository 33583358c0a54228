//! The class lifecycle commands (`class_start`, `class_end`, `class_reopen`: host only), the
//! class clock (a scheduled class goes live at `starts_at`, any class ends at `ends_at`), what
//! the end of a class does (hands down, stage cleared, open polls closed; the room read-only
//! for members until reopened), and the attendance log a session leaves behind (join/leave per
//! session, stage on/off per user), written through the store without waiting and without a
//! seq. Nothing here touches a socket or SQL.

use super::check_room_id;
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::protocol::{ClassOk, ClassState, ClientMsg, PollState, RoomId, RoomRole, UserRef};
use crate::store::{PresenceKind, View, WriteOp, WriteOutcome, now_ms};
use std::sync::Arc;
use std::time::Duration;

/// `class_start` (`Live`), `class_end` (`Ended`) and `class_reopen` (`reopen`: `Ended` ->
/// `Live`). Waits for the commit, then applies what the move means here (see [`moved`]).
pub(super) async fn set(
    ctx: &mut Ctx,
    room: RoomId,
    target: ClassState,
    reopen: bool,
) -> Result<Outcome> {
    check_room_id(&room)?;
    if ctx.joined_role(&room)? != RoomRole::Host {
        return Err(Error::Forbidden(
            "only the host starts, ends and reopens the class".into(),
        ));
    }
    let op = WriteOp::ClassState {
        room: room.clone(),
        target: Some(target),
        reopen,
    };
    match ctx.app.store.write(op).await? {
        WriteOutcome::Class { state, seq } => {
            moved(&ctx.app, &room, state).await;
            Ok(Outcome::ok(ClassOk { state, seq }))
        }
        other => Err(Error::Internal(format!(
            "a class change answered {other:?}"
        ))),
    }
}

/// The class state of `room` now, from the cached policy (no store read): the recorded state
/// moved on by the clock where `starts_at`/`ends_at` have passed.
pub(crate) async fn state_now(app: &App, room: &RoomId) -> Result<ClassState> {
    let policy = app.policies.get(&app.store, room).await?;
    let r = &policy.room;
    Ok(r.state.at(r.starts_at, r.ends_at, now_ms()))
}

/// The class of `room` moved to `state` (committed; by the host or the clock): the policy
/// cache follows (other nodes drop theirs), and an ended class clears its hands and stage and
/// closes its open polls.
pub(crate) async fn moved(app: &App, room: &RoomId, state: ClassState) {
    match app.store.room(room).await {
        Ok(Some(r)) => app.policies.room_changed(r),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, room = %room, "class moved: room not re-read");
            app.policies.invalidate(room);
        }
    }
    tracing::info!(room = %room, state = state.as_str(), "class state changed");
    if state == ClassState::Ended {
        ended(app, room).await;
    }
}

/// The end of a class: raised hands go down and the stage clears (the usual `hand` and
/// `stage` events; publishing stops), A/V closes (`av_closed`), and the room's open polls close as `poll_close` closes
/// them (the same `poll` event).
async fn ended(app: &App, room: &RoomId) {
    clear_stage(app, room);
    let words = app.config.poll_word_cloud_top;
    let open = match app.store.polls(room, View::Moderator, words).await {
        Ok(polls) => polls,
        Err(e) => {
            tracing::warn!(error = %e, room = %room, "class end: open polls not read");
            return;
        }
    };
    for p in open.into_iter().filter(|p| p.state == PollState::Open) {
        let op = WriteOp::PollState {
            room: room.clone(),
            poll: p.id,
            target: PollState::Closed,
            words,
        };
        if let Err(e) = app.store.write(op).await {
            tracing::warn!(error = %e, room = %room, "class end: closing a poll failed");
        }
    }
}

/// Lowers this node's raised hands and clears its stage in `room` (events to its sessions,
/// relays to the other nodes), withdrawing publishing and logging the stage spells' end, and
/// closes the A/V of this node's sessions in the room.
fn clear_stage(app: &App, room: &RoomId) {
    for who in app.hub.clear_hands_and_stage(room) {
        crate::rtc::stage_changed(app, room, &who.id, false);
        staged(app, room, &who, false);
    }
    crate::rtc::class_ended(app, room);
}

/// Whether a committed event (its stored JSON) ends a class: a `class_state` event to `ended`.
/// A substring search, no parse (it runs on every event another node commits); text inside a
/// string value has its quotes escaped, so it cannot fake either key.
pub(crate) fn is_end_event(json: &str) -> bool {
    ClassState::in_event(json) && json.contains(r#""state":"ended""#)
}

/// Cluster mode: a class ended by another node (its clock may have no session of the room,
/// so nothing of this node's hands and stage): this node clears its own. The polls were closed
/// by the node that ended it.
pub(crate) fn ended_elsewhere(app: &App, room: &RoomId) {
    if app.hub.has_room(room) {
        clear_stage(app, room);
    }
}

/// Members' writes to an ended class are refused (host/ta keep writing; reads, `leave`,
/// `delete` of one's own message and `report` still work). `role` is the session's role in
/// `room`.
pub(crate) async fn check_open_for(app: &App, room: &RoomId, role: RoomRole) -> Result<()> {
    if role.can_moderate() {
        return Ok(());
    }
    if state_now(app, room).await? == ClassState::Ended {
        return Err(Error::Forbidden("the class has ended".into()));
    }
    Ok(())
}

/// The stage and A/V open only while the class is live: `conflict` (saying why) otherwise.
pub(crate) async fn check_live(app: &App, room: &RoomId, what: &str) -> Result<()> {
    match state_now(app, room).await? {
        ClassState::Live => Ok(()),
        ClassState::Scheduled => Err(Error::Conflict(format!(
            "the class has not started: {what} opens when it is live"
        ))),
        ClassState::Ended => Err(Error::Conflict(format!(
            "the class has ended: {what} is closed until the host reopens it"
        ))),
    }
}

/// `class_summary` (host/ta, no join needed): the summary `GET /api/rooms/{id}/summary` gives.
async fn summary(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    if !super::readable_role(ctx, &room).await?.can_moderate() {
        return Err(Error::Forbidden(
            "only host/ta read the class summary".into(),
        ));
    }
    let summary = ctx
        .app
        .store
        .class_summary(&room, now_ms(), ctx.app.config.poll_word_cloud_top)
        .await?;
    Ok(Outcome::ok(crate::protocol::ClassSummaryOk { summary }))
}

/// Logs a session entering (`on`) or leaving a room, for the class summary.
pub(crate) fn attended(app: &App, room: &RoomId, user: &UserRef, session: &str, on: bool) {
    app.store.submit_detached(WriteOp::Presence {
        room: room.clone(),
        user: user.id.clone(),
        name: user.name.clone(),
        session: session.to_owned(),
        kind: PresenceKind::Attend,
        on,
        ts: now_ms(),
    });
}

/// Logs a session that left `room` (after the hub let it go): its attendance ends, and so does
/// the user's time on stage if leaving took them off it.
pub(crate) fn left(app: &App, room: &RoomId, user: &UserRef, session: &str, was_on_stage: bool) {
    attended(app, room, user, session, false);
    if was_on_stage && !app.hub.on_stage(room, &user.id) {
        staged(app, room, user, false);
    }
}

/// Logs a user going on or off stage, for the class summary.
pub(crate) fn staged(app: &App, room: &RoomId, user: &UserRef, on: bool) {
    app.store.submit_detached(WriteOp::Presence {
        room: room.clone(),
        user: user.id.clone(),
        name: user.name.clone(),
        session: String::new(),
        kind: PresenceKind::Stage,
        on,
        ts: now_ms(),
    });
}

/// Every `class_clock_ms`: moves on the classes whose `starts_at` or `ends_at` has passed
/// (the writer re-derives the state, so two nodes doing it at once announce it once).
pub async fn run_clock(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.class_clock_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = match app.store.due_classes(now_ms()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "class clock scan failed");
                continue;
            }
        };
        for room in due {
            let op = WriteOp::ClassState {
                room: room.clone(),
                target: None,
                reopen: false,
            };
            match app.store.write(op).await {
                Ok(WriteOutcome::Class { state, .. }) => moved(&app, &room, state).await,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "moving a class on by the clock failed"),
            }
        }
    }
}

/// Routes a classroom command: polls, the class lifecycle, breakouts and whiteboards.
pub(super) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::PollCreate { room, poll } => super::polls::create(ctx, rid, room, poll).await,
        ClientMsg::PollOpen { room, poll } => {
            super::polls::set_state(ctx, rid, room, poll, crate::protocol::PollState::Open).await
        }
        ClientMsg::PollClose { room, poll } => {
            super::polls::set_state(ctx, rid, room, poll, crate::protocol::PollState::Closed).await
        }
        ClientMsg::PollAnswer {
            room,
            poll,
            choices,
            text,
        } => super::polls::answer(ctx, rid, room, poll, choices, text).await,
        ClientMsg::Polls { room } => super::polls::list(ctx, room).await,
        ClientMsg::ClassStart { room } => set(ctx, room, ClassState::Live, false).await,
        ClientMsg::ClassEnd { room } => set(ctx, room, ClassState::Ended, false).await,
        ClientMsg::ClassReopen { room } => set(ctx, room, ClassState::Live, true).await,
        ClientMsg::ClassSummary { room } => summary(ctx, room).await,
        ClientMsg::BreakoutOpen {
            room,
            groups,
            count,
            assign,
            duration_s,
        } => {
            let spec = super::breakouts::OpenSpec {
                groups,
                count,
                assign,
                duration_s,
            };
            super::breakouts::open(ctx, room, spec).await
        }
        ClientMsg::BreakoutMove {
            room,
            user,
            group_room,
        } => super::breakouts::move_user(ctx, room, user, group_room).await,
        ClientMsg::BreakoutBroadcast { room, text } => {
            super::breakouts::broadcast(ctx, rid, room, text).await
        }
        ClientMsg::BreakoutClose { room } => super::breakouts::close(ctx, room).await,
        ClientMsg::Help { room } => super::breakouts::help(ctx, room).await,
        ClientMsg::Board { room, board, data } => {
            super::boards::message(ctx, room, board, data).await
        }
        ClientMsg::BoardGrant {
            room,
            board,
            user,
            draw,
        } => super::boards::grant(ctx, room, board, user, draw).await,
        other => Err(crate::command::misrouted(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{RoomEvent, SequencedEvent};

    #[test]
    fn only_a_class_state_to_ended_is_an_end_event() {
        let ev = |state| {
            crate::protocol::encode(&SequencedEvent {
                room: RoomId::from("r"),
                seq: 3,
                event: RoomEvent::ClassState { state, ts: 1 },
            })
        };
        assert!(is_end_event(&ev(ClassState::Ended)));
        assert!(!is_end_event(&ev(ClassState::Live)));
        assert!(!is_end_event(
            r#"{"type":"message","text":"\"state\":\"ended\""}"#
        ));
    }
}
