//! The class lifecycle commands (`class_start`, `class_end`: host only), the class clock (a
//! scheduled class goes live at `starts_at`, any class ends at `ends_at`), and the attendance
//! log a session leaves behind (join/leave per session, stage on/off per user), written through
//! the store without waiting and without a seq. Nothing here touches a socket or SQL.

use super::chat::write_ok;
use super::check_room_id;
use crate::App;
use crate::command::{Ctx, Outcome, deferred};
use crate::error::{Error, Result};
use crate::protocol::{ClassState, ClientMsg, RoomId, RoomRole, UserRef};
use crate::store::{PresenceKind, WriteOp, now_ms};
use std::sync::Arc;
use std::time::Duration;

/// `class_start` (`Live`) and `class_end` (`Ended`).
pub(super) async fn set(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    target: ClassState,
) -> Result<Outcome> {
    check_room_id(&room)?;
    if ctx.joined_role(&room)? != RoomRole::Host {
        return Err(Error::Forbidden(
            "only the host starts and ends the class".into(),
        ));
    }
    let op = WriteOp::ClassState {
        room,
        target: Some(target),
    };
    let rx = ctx.app.store.submit(op).await?;
    Ok(Outcome::Deferred(deferred(rid, rx, write_ok)))
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
            if let Err(e) = app
                .store
                .write(WriteOp::ClassState { room, target: None })
                .await
            {
                tracing::warn!(error = %e, "moving a class on by the clock failed");
            }
        }
    }
}

/// Routes a classroom command: polls, the class lifecycle, breakouts and whiteboards.
pub(super) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
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
            let new = super::polls::NewPoll {
                kind,
                question,
                options,
                multiple,
                correct,
                duration_s,
                show_results,
            };
            super::polls::create(ctx, rid, room, new).await
        }
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
        ClientMsg::ClassStart { room } => set(ctx, rid, room, ClassState::Live).await,
        ClientMsg::ClassEnd { room } => set(ctx, rid, room, ClassState::Ended).await,
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
