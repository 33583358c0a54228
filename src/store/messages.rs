//! Chat messages in the store: sends, edits, deletions and reactions as sequenced writes
//! (applied inside the group-commit transaction, one event each), with the rewrites that keep
//! the stored `message` event showing the message as it is now. The batched path for plain
//! sends is `sends.rs`.

use super::engagement::{self, Contribution, Effects, Kind};
use super::writer::{Applied, SendOp, Tx, WriteOutcome, bump_seq, insert_event, new_message_id};
use super::{Result, StoreError, now_ms};
use crate::engagement::EngagementConfig;
use crate::protocol::{
    MessageId, ReactionCount, RoomEvent, RoomId, SequencedEvent, UserId, UserRef,
};
use sqlx::Row;

/// Applies a `send`: idempotent on `client_msg_id`, checks `reply_to`, stores and indexes the
/// message and counts it for engagement.
pub(super) async fn send(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    send: &SendOp,
    fx: &mut Effects,
) -> Result<Applied> {
    let SendOp {
        room,
        from,
        text,
        client_msg_id,
        reply_to,
    } = send;
    if let Some(cid) = client_msg_id
        && let Some(earlier) = earlier_send(tx, room, from, cid).await?
    {
        return Ok(earlier);
    }
    if let Some(target) = reply_to {
        let found = load_message(tx, room, target).await;
        if matches!(found, Err(StoreError::NotFound(_))) {
            return Err(StoreError::BadRequest(
                "reply_to does not name a message in this room".into(),
            ));
        }
        found?;
    }
    let ts = now_ms();
    let new = NewMessage {
        from,
        text,
        reply_to: reply_to.clone(),
        client_msg_id: client_msg_id.clone(),
    };
    let (id, committed) = insert_message(tx, room, ts, new).await?;
    let seq = committed.seq;
    let c = Contribution::new(room, from, Kind::Message, id.as_str(), ts);
    engagement::contribute(tx, cfg, &[c], fx)
        .await
        .map_err(engagement::abort)?;
    Ok(Applied {
        outcome: WriteOutcome::Sent {
            id,
            seq,
            ts,
            duplicate: false,
        },
        event: Some(committed),
    })
}

/// A message to store (see [`insert_message`]).
pub(super) struct NewMessage<'a> {
    pub from: &'a UserRef,
    pub text: &'a str,
    pub reply_to: Option<MessageId>,
    pub client_msg_id: Option<String>,
}

/// Stores one message at the room's next seq: its row, its search entry and its `message`
/// event (the one-by-one path; the batched path for plain sends is `sends.rs`). Returns its id
/// and the committed event.
pub(super) async fn insert_message(
    tx: &mut Tx<'_>,
    room: &RoomId,
    ts: i64,
    new: NewMessage<'_>,
) -> Result<(MessageId, super::CommittedEvent)> {
    let seq = bump_seq(tx, room).await?;
    let id = new_message_id(ts);
    sqlx::query(
        "INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, ts, deleted) \
         VALUES ($1, $2, $3, $4, $5, $6, 0)",
    )
    .bind(id.as_str())
    .bind(room.as_str())
    .bind(seq)
    .bind(new.from.id.as_str())
    .bind(new.client_msg_id.as_deref())
    .bind(ts)
    .execute(&mut **tx)
    .await?;
    super::search::index(tx, room, "message", id.as_str(), seq, ts, new.text, false).await?;
    let event = RoomEvent::Message {
        id: id.clone(),
        from: new.from.clone(),
        text: new.text.to_owned(),
        reply_to: new.reply_to,
        ts,
        client_msg_id: new.client_msg_id,
        edited_ts: None,
        deleted: false,
        reactions: Vec::new(),
    };
    let committed = insert_event(tx, room, seq, ts, id.as_str(), event, None).await?;
    Ok((id, committed))
}

/// The send `from` already made with `client_msg_id` `cid` in this room, answered again as a
/// duplicate; `None` when there is none.
async fn earlier_send(
    tx: &mut Tx<'_>,
    room: &RoomId,
    from: &UserRef,
    cid: &str,
) -> Result<Option<Applied>> {
    let prior = sqlx::query(
        "SELECT id, seq, ts FROM messages \
         WHERE room_id = $1 AND sender_id = $2 AND client_msg_id = $3",
    )
    .bind(room.as_str())
    .bind(from.id.as_str())
    .bind(cid)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = prior {
        return Ok(Some(Applied {
            outcome: WriteOutcome::Sent {
                id: MessageId(row.try_get("id")?),
                seq: row.try_get("seq")?,
                ts: row.try_get("ts")?,
                duplicate: true,
            },
            event: None,
        }));
    }
    Ok(None)
}

/// Applies an `edit` by the author: rewrites the stored message and its search row.
pub(super) async fn edit(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &MessageId,
    by: &UserRef,
    text: &str,
) -> Result<Applied> {
    let msg = load_message(tx, room, id).await?;
    if msg.deleted {
        return Err(StoreError::NotFound("message"));
    }
    if msg.sender != by.id.as_str() {
        return Err(StoreError::Forbidden(
            "only the author may edit a message".into(),
        ));
    }
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    rewrite_message(tx, room, msg.seq, |ev| {
        if let RoomEvent::Message {
            text: t, edited_ts, ..
        } = ev
        {
            text.clone_into(t);
            *edited_ts = Some(ts);
        }
    })
    .await?;
    super::search::reindex(tx, "message", id.as_str(), text).await?;
    let event = RoomEvent::MessageEdited {
        id: id.clone(),
        text: text.to_owned(),
        by: by.clone(),
        ts,
    };
    insert_event(tx, room, seq, ts, id.as_str(), event, None)
        .await
        .map(Applied::changed)
}

/// Applies a `delete` by the author or a host/ta: erases the text and reactions from the log
/// and the index, and reverses what the message earned when moderation removed it.
pub(super) async fn delete(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &MessageId,
    by: &UserRef,
    as_moderator: bool,
) -> Result<Applied> {
    let msg = load_message(tx, room, id).await?;
    if msg.sender != by.id.as_str() && !as_moderator {
        return Err(StoreError::Forbidden(
            "only the author or a host/ta may delete a message".into(),
        ));
    }
    if msg.deleted {
        return Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        });
    }
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    sqlx::query("UPDATE messages SET deleted = 1 WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    // Reactions by others standing on it, counted in the author's `reactions_received`.
    let standing: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM reactions WHERE message_id = $1 AND user_id <> $2",
    )
    .bind(id.as_str())
    .bind(msg.sender.as_str())
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM reactions WHERE message_id = $1")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    // The text is erased from the log, not only hidden.
    rewrite_message(tx, room, msg.seq, |ev| {
        if let RoomEvent::Message {
            text,
            deleted,
            reactions,
            edited_ts,
            ..
        } = ev
        {
            text.clear();
            *deleted = true;
            reactions.clear();
            *edited_ts = None;
        }
    })
    .await?;
    scrub_edits(tx, room, id).await?;
    super::search::unindex(tx, "message", id.as_str()).await?;
    if msg.sender != by.id.as_str() {
        // Deleted by moderation: the message earns nothing, nor its reactions.
        engagement::reverse(tx, room, id.as_str(), None)
            .await
            .map_err(engagement::abort)?;
        engagement::uncount_reactions(tx, room, &msg.sender, standing)
            .await
            .map_err(engagement::abort)?;
    }
    let event = RoomEvent::MessageDeleted {
        id: id.clone(),
        by: by.clone(),
        ts,
    };
    insert_event(tx, room, seq, ts, id.as_str(), event, None)
        .await
        .map(Applied::changed)
}

/// Applies a reaction added or removed: enforces `max_distinct`, updates the stored counts and
/// the engagement of the giver and the author.
#[allow(clippy::too_many_arguments)]
pub(super) async fn react(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    id: &MessageId,
    user: &UserRef,
    emoji: &str,
    add: bool,
    max_distinct: u32,
    fx: &mut Effects,
) -> Result<Applied> {
    let msg = load_message(tx, room, id).await?;
    if msg.deleted {
        return Err(StoreError::NotFound("message"));
    }
    let mine: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3",
    )
    .bind(id.as_str())
    .bind(user.id.as_str())
    .bind(emoji)
    .fetch_optional(&mut **tx)
    .await?;
    if mine.is_some() == add {
        return Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        });
    }
    if add {
        check_distinct(tx, id, emoji, max_distinct).await?;
    }
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    store_reaction(tx, id, user, emoji, add, ts).await?;
    let counts = reaction_counts(tx, id).await?;
    let count = counts
        .iter()
        .find(|c| c.emoji == emoji)
        .map_or(0, |c| c.count);
    rewrite_message(tx, room, msg.seq, |ev| {
        if let RoomEvent::Message { reactions, .. } = ev {
            *reactions = counts;
        }
    })
    .await?;
    count_reaction(tx, cfg, room, id, user, &msg.sender, emoji, add, ts, fx).await?;
    let event = RoomEvent::Reaction {
        id: id.clone(),
        emoji: emoji.to_owned(),
        user: user.clone(),
        count,
        added: add,
        ts,
    };
    insert_event(tx, room, seq, ts, id.as_str(), event, None)
        .await
        .map(Applied::changed)
}

/// Refuses a new emoji on a message that already carries `max_distinct` different ones.
async fn check_distinct(
    tx: &mut Tx<'_>,
    id: &MessageId,
    emoji: &str,
    max_distinct: u32,
) -> Result<()> {
    let others: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT emoji) FROM reactions WHERE message_id = $1 AND emoji <> $2",
    )
    .bind(id.as_str())
    .bind(emoji)
    .fetch_one(&mut **tx)
    .await?;
    let used: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM reactions WHERE message_id = $1 AND emoji = $2 LIMIT 1")
            .bind(id.as_str())
            .bind(emoji)
            .fetch_optional(&mut **tx)
            .await?;
    if used.is_none() && others >= i64::from(max_distinct) {
        return Err(StoreError::TooLarge(format!(
            "a message carries at most {max_distinct} different reactions"
        )));
    }
    Ok(())
}

/// Adds or removes the user's reaction row.
async fn store_reaction(
    tx: &mut Tx<'_>,
    id: &MessageId,
    user: &UserRef,
    emoji: &str,
    add: bool,
    ts: i64,
) -> Result<()> {
    if add {
        sqlx::query(
            "INSERT INTO reactions (message_id, user_id, emoji, ts) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(user.id.as_str())
        .bind(emoji)
        .bind(ts)
        .execute(&mut **tx)
        .await?;
    } else {
        sqlx::query("DELETE FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3")
            .bind(id.as_str())
            .bind(user.id.as_str())
            .bind(emoji)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Counts a reaction for engagement: an added one for its giver and the message's `author`, a
/// removed one reverses what it earned the author.
#[allow(clippy::too_many_arguments)]
async fn count_reaction(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    id: &MessageId,
    user: &UserRef,
    author: &str,
    emoji: &str,
    add: bool,
    ts: i64,
    fx: &mut Effects,
) -> Result<()> {
    let detail = format!("{} {emoji}", user.id);
    let for_author = author != user.id.as_str();
    if add {
        let mut items = vec![Contribution::new(
            room,
            user,
            Kind::ReactionGiven,
            id.as_str(),
            ts,
        )];
        if for_author {
            // Points to the message's author, whose name this write does not know.
            let mut c = Contribution::new(room, user, Kind::ReactionReceived, id.as_str(), ts);
            c.user = UserId(author.to_owned());
            c.name = String::new();
            c.detail = detail;
            items.push(c);
        }
        engagement::contribute(tx, cfg, &items, fx)
            .await
            .map_err(engagement::abort)?;
    } else if for_author {
        let reversed = engagement::reverse(
            tx,
            room,
            id.as_str(),
            Some((crate::engagement::Action::ReactionReceived, &detail)),
        )
        .await
        .map_err(engagement::abort)?;
        engagement::refund(tx, room, &reversed)
            .await
            .map_err(engagement::abort)?;
        engagement::uncount(tx, room, author, Kind::ReactionReceived)
            .await
            .map_err(engagement::abort)?;
    }
    Ok(())
}

struct MessageRow {
    sender: String,
    seq: i64,
    deleted: bool,
}

async fn load_message(tx: &mut Tx<'_>, room: &RoomId, id: &MessageId) -> Result<MessageRow> {
    let row =
        sqlx::query("SELECT sender_id, seq, deleted FROM messages WHERE id = $1 AND room_id = $2")
            .bind(id.as_str())
            .bind(room.as_str())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound("message"))?;
    Ok(MessageRow {
        sender: row.try_get("sender_id")?,
        seq: row.try_get("seq")?,
        deleted: row.try_get::<i64, _>("deleted")? != 0,
    })
}

/// Rewrites the stored `message` event so history shows the message as it is now.
async fn rewrite_message(
    tx: &mut Tx<'_>,
    room: &RoomId,
    seq: i64,
    change: impl FnOnce(&mut RoomEvent),
) -> Result<()> {
    let body: String =
        sqlx::query_scalar("SELECT body FROM events WHERE room_id = $1 AND seq = $2")
            .bind(room.as_str())
            .bind(seq)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("message event {room}/{seq} missing")))?;
    change_event(tx, room, seq, &body, change).await
}

/// Parses a stored event body, applies `change` to it and stores it back.
async fn change_event(
    tx: &mut Tx<'_>,
    room: &RoomId,
    seq: i64,
    body: &str,
    change: impl FnOnce(&mut RoomEvent),
) -> Result<()> {
    let mut ev: SequencedEvent = serde_json::from_str(body)
        .map_err(|e| StoreError::Corrupt(format!("event {room}/{seq}: {e}")))?;
    change(&mut ev.event);
    sqlx::query("UPDATE events SET body = $1 WHERE room_id = $2 AND seq = $3")
        .bind(crate::protocol::encode(&ev))
        .bind(room.as_str())
        .bind(seq)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Erases the text of a deleted message's earlier edit events too.
async fn scrub_edits(tx: &mut Tx<'_>, room: &RoomId, id: &MessageId) -> Result<()> {
    let rows = sqlx::query(
        "SELECT seq, body FROM events WHERE room_id = $1 AND message_id = $2 AND kind = 'message_edited'",
    )
    .bind(room.as_str())
    .bind(id.as_str())
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let seq: i64 = row.try_get("seq")?;
        let body: String = row.try_get("body")?;
        change_event(tx, room, seq, &body, |ev| {
            if let RoomEvent::MessageEdited { text, .. } = ev {
                text.clear();
            }
        })
        .await?;
    }
    Ok(())
}

async fn reaction_counts(tx: &mut Tx<'_>, id: &MessageId) -> Result<Vec<ReactionCount>> {
    let rows = sqlx::query(
        "SELECT emoji, COUNT(*) AS n FROM reactions WHERE message_id = $1 \
         GROUP BY emoji ORDER BY MIN(ts), emoji",
    )
    .bind(id.as_str())
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ReactionCount {
                emoji: r.try_get("emoji")?,
                count: r.try_get("n")?,
            })
        })
        .collect()
}
