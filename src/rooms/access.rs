//! Rights that follow the session while it is open: `refresh` (a new token for the same user,
//! whose grants replace the old ones) and the re-check of a joined room's role before every
//! command on it, so a demotion, a removal or a ban made through the API, moderation or another
//! node applies at once rather than at the next join. Reads the cached room policy only (one
//! map lookup when nothing changed); knows nothing of sockets or SQL.

use super::{resolve_role, rtc};
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::protocol::{self, RoomId};

/// `refresh {token}`: the token must be valid and name the same user; the session's identity
/// (name, platform role, grants, expiry) becomes the new token's, and every joined room is
/// checked again under it.
pub(super) async fn refresh(ctx: &mut Ctx, token: String) -> Result<Outcome> {
    let me = ctx
        .app
        .tokens
        .verify(&token)
        .map_err(|e| Error::Unauthorized(e.to_string()))?;
    if me.user != ctx.me.user {
        return Err(Error::Forbidden(
            "a refreshed token must name the same user (sub)".into(),
        ));
    }
    let exp = me.exp;
    ctx.me = me;
    let rooms: Vec<RoomId> = ctx.joined.keys().cloned().collect();
    for room in rooms {
        // A room the new token no longer reaches is left; the refresh itself still succeeds.
        if let Err(e) = recheck(ctx, &room).await {
            tracing::debug!(room = %room, error = %e, "room left at refresh");
        }
    }
    tracing::info!(session = %ctx.handle.id, user = %ctx.me.user, "token refreshed");
    Ok(Outcome::ok(protocol::RefreshOk { exp }))
}

/// Checks the session's role in a joined room against the room's current policy and the
/// session's current token: a changed role is taken over (here and in the hub); a lost right
/// leaves the room and answers `forbidden`.
pub(super) async fn recheck(ctx: &mut Ctx, room: &RoomId) -> Result<()> {
    let Some(&joined) = ctx.joined.get(room) else {
        return Ok(());
    };
    let policy = ctx.app.policies.get(&ctx.app.store, room).await?;
    let now = match resolve_role(ctx, &policy) {
        Ok((Some(role), _)) => role,
        Ok((None, _)) => {
            leave_lost(ctx, room);
            return Err(Error::Forbidden(format!(
                "you no longer have access to room {room}"
            )));
        }
        Err(e) => {
            leave_lost(ctx, room);
            return Err(e);
        }
    };
    if now != joined {
        tracing::info!(room = %room, user = %ctx.me.user, from = joined.as_str(), to = now.as_str(), "role changed in a joined room");
        ctx.joined.insert(room.clone(), now);
        ctx.app.hub.set_session_role(room, &ctx.handle.id, now);
    }
    Ok(())
}

/// Leaves a joined room (the `leave` command, or access lost); false if it was not joined.
pub(super) fn leave_lost(ctx: &mut Ctx, room: &RoomId) -> bool {
    let Some(role) = ctx.joined.remove(room) else {
        return false;
    };
    let was_on_stage = ctx.app.hub.on_stage(room, &ctx.me.user);
    ctx.app.hub.leave(room, &ctx.handle.id);
    if ctx.app.hub.local_role(room, &ctx.me.user).is_none() {
        let (store, me, room) = (ctx.app.store.clone(), ctx.me.room_ref(role), room.clone());
        let (node, run) = ctx.app.member_node();
        tokio::spawn(async move {
            if let Err(e) = store.member_exited(&room, me, &node, run, "leave").await {
                tracing::warn!(error = %e, %room, "webhooks: member.left not recorded");
            }
        });
    }
    ctx.app.broker.leave_room(room);
    super::class::left(
        &ctx.app,
        room,
        &ctx.me.room_ref(role),
        ctx.handle.id.as_str(),
        was_on_stage,
    );
    rtc::left_room(
        &ctx.app,
        room,
        &ctx.me.user,
        ctx.handle.id.as_str(),
        was_on_stage,
    );
    true
}
