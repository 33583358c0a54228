//! Raise hand and stage: a per-room queue of raised hands in raise order (shown to host/ta)
//! and the list of people allowed to publish audio/video, both held by the hub in memory and
//! cleared for a user whose last session leaves the room. The stage opens only while the class
//! is live; the stage clock brings a speaker down past the room's talk-time cap
//! (`stage.talk_cap_s` with `auto_down`).

use super::check_room_id;
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::StageError;
use crate::protocol::{
    ClientMsg, HandsOk, LowerHandOk, RaiseHandOk, RaisedHand, RoomId, StageOk, StageSpell, UserId,
};
use crate::store::now_ms;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn raise(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    let role = super::writable(ctx, &room)?;
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

pub(super) async fn hands(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
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
    let stage = ctx
        .app
        .hub
        .stage_spells(&room)
        .into_iter()
        .map(|(user, since)| StageSpell { user, since })
        .collect();
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    Ok(Outcome::ok(HandsOk {
        hands,
        stage,
        talk_cap_s: policy.room.stage.talk_cap_s,
    }))
}

pub(super) async fn stage(ctx: &mut Ctx, room: RoomId, user: UserId, on: bool) -> Result<Outcome> {
    check_room_id(&room)?;
    if !ctx.joined_role(&room)?.can_moderate() {
        return Err(Error::Forbidden("only host/ta put people on stage".into()));
    }
    if on {
        super::class::check_live(&ctx.app, &room, "the stage").await?;
    }
    let max = ctx.app.config.max_on_stage;
    match ctx.app.hub.set_stage(&room, &user, on, max) {
        Ok(stage) => {
            let who = stage
                .iter()
                .find(|u| u.id == user)
                .cloned()
                .unwrap_or_else(|| crate::protocol::UserRef {
                    id: user.clone(),
                    name: user.to_string(),
                    role: crate::protocol::ShownRole::Member,
                });
            changed(&ctx.app, &room, &who, on);
            Ok(Outcome::ok(StageOk { stage }))
        }
        Err(StageError::NotInRoom) => Err(Error::NotFound(format!("{user} is not in the room"))),
        Err(e @ StageError::Full(_)) => Err(Error::Conflict(e.to_string())),
    }
}

/// What follows a stage change made here: publishing rights and the stage log.
fn changed(app: &App, room: &RoomId, who: &crate::protocol::UserRef, on: bool) {
    crate::rtc::stage_changed(app, room, &who.id, on);
    super::class::staged(app, room, who, on);
}

/// Routes a stage command: raised hands and who is on stage.
pub(super) async fn dispatch(ctx: &mut Ctx, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::RaiseHand { room } => raise(ctx, room),
        ClientMsg::LowerHand { room, user } => lower(ctx, room, user),
        ClientMsg::Hands { room } => hands(ctx, room).await,
        ClientMsg::Stage { room, user, on } => stage(ctx, room, user, on).await,
        other => Err(crate::command::misrouted(&other)),
    }
}

/// Every `stage_clock_ms`: brings down each speaker of this node's rooms whose continuous time
/// on stage passed the room's cap, where the room enforces it (`stage.auto_down`), with the
/// usual `stage` event. Two nodes doing it at once send the event once per session: taking
/// someone off a stage they are not on changes nothing.
pub async fn run_clock(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.stage_clock_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        for (room, spells) in app.hub.stages() {
            let cap = match app.policies.get(&app.store, &room).await {
                Ok(p) => p.room.stage.enforced_ms(),
                Err(e) => {
                    tracing::warn!(error = %e, room = %room, "stage clock: room settings not read");
                    continue;
                }
            };
            let Some(cap) = cap else { continue };
            for (who, since) in spells {
                if now - since < cap || !app.hub.on_stage(&room, &who.id) {
                    continue;
                }
                let max = app.config.max_on_stage;
                if app.hub.set_stage(&room, &who.id, false, max).is_err() {
                    continue;
                }
                tracing::info!(room = %room, "talk-time cap: a speaker was brought down");
                changed(&app, &room, &who, false);
            }
        }
    }
}
