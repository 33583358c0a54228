//! Chat commands: send, edit, delete, react/unreact, history, typing, read markers and the
//! rooms list. Each validates its input, checks the session's role in the room, and hands
//! sequenced writes to the store's group-commit writer; the reply follows the commit.

use super::{readable_role, writable};
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::Frame;
use crate::protocol::{self, ClientMsg, HISTORY_MAX_LIMIT, MessageId, RoomId, ServerMsg};
use crate::store::View;
use crate::store::{SendOp, WriteOp, WriteOutcome};

fn check_text(ctx: &Ctx, text: &str) -> Result<()> {
    if crate::protocol::is_blank(text) {
        return Err(Error::bad_request("text must not be empty"));
    }
    let max = ctx.app.config.max_text_chars;
    if text.chars().count() > max {
        return Err(Error::TooLarge(format!(
            "text is longer than {max} characters"
        )));
    }
    Ok(())
}

fn check_message_id(id: &MessageId) -> Result<()> {
    if id.as_str().is_empty() || id.as_str().len() > 64 {
        return Err(Error::bad_request("message id must be 1..=64 characters"));
    }
    Ok(())
}

/// The `ok` of a committed write.
pub(super) fn write_ok(o: WriteOutcome) -> protocol::WriteOk {
    use protocol::WriteOk;
    match o {
        WriteOutcome::Sent { id, seq, ts, .. } => WriteOk::Sent(protocol::SentOk { id, seq, ts }),
        WriteOutcome::Changed { seq } => WriteOk::Seq(protocol::SeqOk { seq: Some(seq) }),
        WriteOutcome::Asked {
            id,
            seq,
            ts,
            status,
        } => WriteOk::Asked(protocol::AskOk {
            id,
            seq,
            ts,
            status,
        }),
        WriteOutcome::Unchanged => WriteOk::Seq(protocol::SeqOk { seq: None }),
        WriteOutcome::Poll { poll, seq } => WriteOk::Poll(protocol::PollOk { poll, seq }),
        WriteOutcome::PollAnswered {
            poll,
            choices,
            text,
            ts,
        } => WriteOk::PollAnswered(protocol::PollAnswerOk {
            poll,
            choices,
            text,
            ts,
        }),
        WriteOutcome::Class { state, seq } => WriteOk::Class(protocol::ClassOk { state, seq }),
        WriteOutcome::CheckedIn(ok) => WriteOk::CheckedIn(ok),
    }
}

pub(super) async fn send(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    text: String,
    client_msg_id: String,
    reply_to: Option<MessageId>,
) -> Result<Outcome> {
    let role = writable(ctx, &room)?;
    check_text(ctx, &text)?;
    let max_cid = ctx.app.config.max_client_msg_id_chars;
    if client_msg_id.is_empty() || client_msg_id.chars().count() > max_cid {
        return Err(Error::bad_request(format!(
            "client_msg_id must be 1..={max_cid} characters"
        )));
    }
    if let Some(r) = &reply_to {
        check_message_id(r)?;
    }
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    policy.check_post(&ctx.me.user, role, &text)?;
    policy.check_slow_mode(&ctx.me.user, role, &client_msg_id)?;
    let op = WriteOp::Send(SendOp {
        room,
        from: ctx.me.room_ref(role),
        text,
        client_msg_id: Some(client_msg_id),
        reply_to,
    });
    super::submit(ctx, rid, op).await
}

pub(super) async fn edit(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    id: MessageId,
    text: String,
) -> Result<Outcome> {
    let role = writable(ctx, &room)?;
    check_message_id(&id)?;
    check_text(ctx, &text)?;
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    super::submit_post(ctx, rid, &policy, role, text, |by, text| WriteOp::Edit {
        room,
        id,
        by,
        text,
    })
    .await
}

pub(super) async fn delete(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    id: MessageId,
) -> Result<Outcome> {
    let role = writable(ctx, &room)?;
    check_message_id(&id)?;
    let op = WriteOp::Delete {
        room,
        id,
        by: ctx.me.room_ref(role),
        as_moderator: role.can_moderate(),
    };
    super::submit(ctx, rid, op).await
}

pub(super) async fn react(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    id: MessageId,
    emoji: String,
    add: bool,
) -> Result<Outcome> {
    let role = writable(ctx, &room)?;
    check_message_id(&id)?;
    let max = ctx.app.config.max_emoji_chars;
    let n = emoji.chars().count();
    if n == 0 || n > max || emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::bad_request(format!(
            "emoji must be 1..={max} characters without spaces"
        )));
    }
    let op = WriteOp::React {
        room,
        id,
        user: ctx.me.room_ref(role),
        emoji,
        add,
        max_distinct: ctx.app.config.max_reactions_per_message,
    };
    super::submit(ctx, rid, op).await
}

pub(super) async fn history(
    ctx: &mut Ctx,
    room: RoomId,
    before_seq: Option<i64>,
    limit: Option<u32>,
) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    let limit = limit.unwrap_or(50);
    if !(1..=HISTORY_MAX_LIMIT).contains(&limit) {
        return Err(Error::bad_request(format!(
            "limit must be 1..={HISTORY_MAX_LIMIT}"
        )));
    }
    if matches!(before_seq, Some(s) if s < 1) {
        return Err(Error::bad_request("before_seq must be >= 1"));
    }
    let page = ctx
        .app
        .store
        .events_before(&room, before_seq, limit, crate::store::View::of(role))
        .await?;
    Ok(Outcome::Ok(Box::new(move |rid| {
        protocol::HistoryOk {
            events: &page.events,
            has_more: page.has_more,
        }
        .encode_ok(rid)
    })))
}

/// Shortest interval between two `typing` broadcasts of one session in one room.
const TYPING_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) fn typing(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    let role = writable(ctx, &room)?;
    let frame = Frame::from(protocol::encode(&ServerMsg::Typing {
        room: &room,
        user: &ctx.me.room_ref(role),
    }));
    // At most one broadcast per room every TYPING_EVERY: a held key must not flood a big room.
    let now = std::time::Instant::now();
    if ctx
        .last_typing
        .get(&room)
        .is_some_and(|t| now.duration_since(*t) < TYPING_EVERY)
    {
        return Ok(Outcome::ok(protocol::EmptyOk {}));
    }
    ctx.last_typing.insert(room.clone(), now);
    ctx.app.hub.notify_others(&room, &ctx.me.user, &frame);
    Ok(Outcome::ok(protocol::EmptyOk {}))
}

pub(super) async fn read(ctx: &mut Ctx, room: RoomId, seq: i64) -> Result<Outcome> {
    readable_role(ctx, &room).await?;
    if seq < 0 {
        return Err(Error::bad_request("seq must be >= 0"));
    }
    // A marker past the end would hide later messages from the unread count.
    let seq = seq.min(ctx.app.store.last_seq(&room).await?);
    ctx.app
        .store
        .set_read_marker(&room, &ctx.me.user, seq)
        .await?;
    Ok(Outcome::ok(protocol::ReadOk { seq }))
}

pub(super) async fn rooms(ctx: &mut Ctx) -> Result<Outcome> {
    let grants: Vec<_> = ctx
        .me
        .grants
        .iter()
        .map(|(r, role)| (r.clone(), *role))
        .collect();
    let rooms = ctx.app.store.user_rooms(&ctx.me.user, &grants).await?;
    Ok(Outcome::ok(protocol::RoomsOk { rooms }))
}

/// Most search results one page returns.
const MAX_SEARCH_PAGE: u32 = 50;

pub(super) async fn search(
    ctx: &mut Ctx,
    room: RoomId,
    q: String,
    limit: Option<u32>,
    offset: Option<u32>,
) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    if q.chars().count() > 200 {
        return Err(Error::bad_request("q is longer than 200 characters"));
    }
    let limit = limit.unwrap_or(20);
    if !(1..=MAX_SEARCH_PAGE).contains(&limit) {
        return Err(Error::bad_request(format!(
            "limit must be 1..={MAX_SEARCH_PAGE}"
        )));
    }
    let offset = offset.unwrap_or(0).min(10_000);
    let (results, has_more) = ctx
        .app
        .store
        .search(&room, &q, View::of(role) == View::Moderator, limit, offset)
        .await?;
    Ok(Outcome::ok(protocol::SearchOk { results, has_more }))
}

/// Routes a chat command: messages, reactions, history, typing, read markers, rooms, search.
pub(super) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::Send {
            room,
            text,
            client_msg_id,
            reply_to,
        } => send(ctx, rid, room, text, client_msg_id, reply_to).await,
        ClientMsg::Edit { room, id, text } => edit(ctx, rid, room, id, text).await,
        ClientMsg::Delete { room, id } => delete(ctx, rid, room, id).await,
        ClientMsg::React { room, id, emoji } => react(ctx, rid, room, id, emoji, true).await,
        ClientMsg::Unreact { room, id, emoji } => react(ctx, rid, room, id, emoji, false).await,
        ClientMsg::History {
            room,
            before_seq,
            limit,
        } => history(ctx, room, before_seq, limit).await,
        ClientMsg::Typing { room } => typing(ctx, room),
        ClientMsg::Read { room, seq } => read(ctx, room, seq).await,
        ClientMsg::Rooms => rooms(ctx).await,
        ClientMsg::Search {
            room,
            q,
            limit,
            offset,
        } => search(ctx, room, q, limit, offset).await,
        other => Err(crate::command::misrouted(&other)),
    }
}
