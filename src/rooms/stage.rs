//! Raise hand and stage: a per-room queue of raised hands in raise order (shown to host/ta)
//! and the list of people allowed to publish audio/video, both held by the hub in memory and
//! cleared for a user whose last session leaves the room.

use super::check_room_id;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::StageError;
use crate::protocol::{
    ClientMsg, HandsOk, LowerHandOk, RaiseHandOk, RaisedHand, RoomId, StageOk, UserId,
};
use crate::store::now_ms;

pub(super) fn raise(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    let role = ctx.joined_role(&room)?;
    if !role.can_write() {
        return Err(Error::Forbidden(
            "viewers are read-only in this room".into(),
        ));
    }
    let position = ctx
        .app
        .hub
        .raise_hand(&room, &ctx.me.room_ref(role), now_ms());
    Ok(Outcome::ok(RaiseHandOk { position }))
}

pub(super) fn lower(ctx: &mut Ctx, room: RoomId, user: Option<UserId>) -> Result<Outcome> {
    check_room_id(&room)?;
    let role = ctx.joined_role(&room)?;
    let target = user.unwrap_or_else(|| ctx.me.user.clone());
    if target != ctx.me.user && !role.can_moderate() {
        return Err(Error::Forbidden(
            "only host/ta lower someone else's hand".into(),
        ));
    }
    let lowered = ctx.app.hub.lower_hand(&room, &target);
    Ok(Outcome::ok(LowerHandOk { lowered }))
}

pub(super) fn hands(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    if !ctx.joined_role(&room)?.can_moderate() {
        return Err(Error::Forbidden("only host/ta see the hand queue".into()));
    }
    let hands = ctx
        .app
        .hub
        .hands(&room)
        .into_iter()
        .map(|(user, ts)| RaisedHand { user, ts })
        .collect();
    Ok(Outcome::ok(HandsOk { hands }))
}

pub(super) fn stage(ctx: &mut Ctx, room: RoomId, user: UserId, on: bool) -> Result<Outcome> {
    check_room_id(&room)?;
    if !ctx.joined_role(&room)?.can_moderate() {
        return Err(Error::Forbidden("only host/ta put people on stage".into()));
    }
    let max = ctx.app.config.max_on_stage;
    match ctx.app.hub.set_stage(&room, &user, on, max) {
        Ok(stage) => {
            crate::rtc::stage_changed(&ctx.app, &room, &user, on);
            let who = stage
                .iter()
                .find(|u| u.id == user)
                .cloned()
                .unwrap_or_else(|| crate::protocol::UserRef {
                    id: user.clone(),
                    name: user.to_string(),
                    role: String::new(),
                });
            super::class::staged(&ctx.app, &room, &who, on);
            Ok(Outcome::ok(StageOk { stage }))
        }
        Err(StageError::NotInRoom) => Err(Error::NotFound(format!("{user} is not in the room"))),
        Err(e @ StageError::Full(_)) => Err(Error::Conflict(e.to_string())),
    }
}

/// Routes a stage command: raised hands and who is on stage.
pub(super) fn dispatch(ctx: &mut Ctx, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::RaiseHand { room } => raise(ctx, room),
        ClientMsg::LowerHand { room, user } => lower(ctx, room, user),
        ClientMsg::Hands { room } => hands(ctx, room),
        ClientMsg::Stage { room, user, on } => stage(ctx, room, user, on),
        other => Err(crate::command::misrouted(&other)),
    }
}
