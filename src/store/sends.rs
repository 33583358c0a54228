//! The batched path for the hot write: plain `send`s (no `reply_to`) inside a group commit.
//! Across every room of the batch, one query finds earlier copies (idempotency); each room
//! reserves its run of seqs with one `UPDATE ... RETURNING` (taken in room order, like every
//! other write, so writers never deadlock); and multi-row INSERTs store all the messages,
//! events and search rows at the end of the transaction. Same results, in the same order, as
//! applying the sends one by one; the conformance suite runs it on both backends.

use super::writer::{Applied, CommittedEvent, Tx, WriteOp, WriteOutcome, new_message_id};
use super::{Result, StoreError, now_ms};
use crate::protocol::{MessageId, RoomEvent, RoomId, SequencedEvent, UserRef};
use sqlx::{AssertSqlSafe, Row};
use std::collections::HashMap;

/// Rows per multi-row statement (7 parameters each, well under both backends' limits).
const CHUNK: usize = 400;

type Key = (String, String, String);

/// `($1, $2, ..), ($k, ..)`: `rows` tuples of `cols` numbered placeholders from `$first`.
pub(super) fn placeholders(rows: usize, cols: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    let mut n = first;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&n.to_string());
            n += 1;
        }
        out.push(')');
    }
    out
}

/// A plain send's parts, or `None` for any other write.
pub(super) fn plain_send(op: &WriteOp) -> Option<(&RoomId, &UserRef, &String, &Option<String>)> {
    match op {
        WriteOp::Send {
            room,
            from,
            text,
            client_msg_id,
            reply_to: None,
        } => Some((room, from, text, client_msg_id)),
        _ => None,
    }
}

/// Messages already stored under these (room, sender, client_msg_id) keys: key -> (id, seq, ts).
pub(super) async fn prior_sends(
    tx: &mut Tx,
    ops: &[&WriteOp],
) -> Result<HashMap<Key, (MessageId, i64, i64)>> {
    let keys: Vec<(&str, &str, &str)> = ops
        .iter()
        .filter_map(|op| plain_send(op))
        .filter_map(|(room, from, _, cid)| {
            cid.as_deref().map(|c| (room.as_str(), from.id.as_str(), c))
        })
        .collect();
    let mut prior = HashMap::new();
    for chunk in keys.chunks(CHUNK) {
        let sql = format!(
            "SELECT room_id, sender_id, client_msg_id, id, seq, ts FROM messages \
             WHERE (room_id, sender_id, client_msg_id) IN (VALUES {})",
            placeholders(chunk.len(), 3, 1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (room, sender, cid) in chunk {
            q = q.bind(*room).bind(*sender).bind(*cid);
        }
        for row in q.fetch_all(&mut **tx).await? {
            prior.insert(
                (
                    row.try_get("room_id")?,
                    row.try_get("sender_id")?,
                    row.try_get("client_msg_id")?,
                ),
                (
                    MessageId(row.try_get("id")?),
                    row.try_get("seq")?,
                    row.try_get("ts")?,
                ),
            );
        }
    }
    Ok(prior)
}

/// A message to insert once the whole batch is planned.
pub(super) struct Staged {
    room: RoomId,
    id: MessageId,
    seq: i64,
    sender: String,
    /// The sender's display name (kept for leaderboards).
    name: String,
    client_msg_id: Option<String>,
    text: String,
    ts: i64,
    json: String,
}

/// Plans a run of plain sends to one room (in queue order): duplicates get the first send's
/// outcome, new ones get consecutive seqs reserved here; their rows go to `staged`.
pub(super) async fn plan_room(
    tx: &mut Tx,
    ops: &[&WriteOp],
    prior: &HashMap<Key, (MessageId, i64, i64)>,
    staged: &mut Vec<Staged>,
) -> Result<Vec<Applied>> {
    let mut sends = Vec::with_capacity(ops.len());
    for op in ops {
        sends.push(
            plain_send(op)
                .ok_or_else(|| StoreError::Corrupt("plan_room takes plain sends only".into()))?,
        );
    }
    let room = sends[0].0;
    let key_of = |from: &UserRef, cid: &Option<String>| {
        cid.as_ref()
            .map(|c| (room.0.clone(), from.id.0.clone(), c.clone()))
    };
    // Which sends are new: not stored before and not repeated earlier in this run.
    let mut seen: HashMap<Key, usize> = HashMap::new();
    let mut fresh = 0usize;
    let mut slot: Vec<Option<usize>> = Vec::with_capacity(sends.len());
    for (_, from, _, cid) in &sends {
        match key_of(from, cid) {
            Some(k) if prior.contains_key(&k) || seen.contains_key(&k) => slot.push(None),
            Some(k) => {
                seen.insert(k, fresh);
                slot.push(Some(fresh));
                fresh += 1;
            }
            None => {
                slot.push(Some(fresh));
                fresh += 1;
            }
        }
    }
    let ts = now_ms();
    let mut first = 0;
    if fresh > 0 {
        let last: Option<i64> = sqlx::query_scalar(
            "UPDATE rooms SET last_seq = last_seq + $2 WHERE id = $1 AND archived = 0 RETURNING last_seq",
        )
        .bind(room.as_str())
        .bind(fresh as i64)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(last) = last else {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT archived FROM rooms WHERE id = $1")
                    .bind(room.as_str())
                    .fetch_optional(&mut **tx)
                    .await?;
            return Err(match exists {
                Some(_) => StoreError::Forbidden("the room is archived".into()),
                None => StoreError::NotFound("room"),
            });
        };
        first = last - fresh as i64 + 1;
    }
    let mut made: HashMap<Key, (MessageId, i64)> = HashMap::new();
    let mut results = Vec::with_capacity(sends.len());
    for ((_, from, text, cid), slot) in sends.iter().zip(slot) {
        let key = key_of(from, cid);
        match slot {
            Some(n) => {
                let seq = first + n as i64;
                let id = new_message_id();
                let event = RoomEvent::Message {
                    id: id.clone(),
                    from: (*from).clone(),
                    text: (*text).clone(),
                    reply_to: None,
                    ts,
                    client_msg_id: (*cid).clone(),
                    edited_ts: None,
                    deleted: false,
                    reactions: Vec::new(),
                };
                let json = crate::protocol::encode(&SequencedEvent {
                    room: room.clone(),
                    seq,
                    event,
                });
                if let Some(k) = key {
                    made.insert(k, (id.clone(), seq));
                }
                staged.push(Staged {
                    room: room.clone(),
                    id: id.clone(),
                    seq,
                    sender: from.id.0.clone(),
                    name: from.name.clone(),
                    client_msg_id: (*cid).clone(),
                    text: (*text).clone(),
                    ts,
                    json: json.clone(),
                });
                results.push(Applied {
                    outcome: WriteOutcome::Sent {
                        id,
                        seq,
                        ts,
                        duplicate: false,
                    },
                    event: Some(CommittedEvent {
                        room: room.clone(),
                        seq,
                        json,
                        public_json: None,
                    }),
                });
            }
            None => {
                let k =
                    key.ok_or_else(|| StoreError::Corrupt("a duplicate without a key".into()))?;
                let (id, seq, at) = match prior.get(&k) {
                    Some((id, seq, at)) => (id.clone(), *seq, *at),
                    None => {
                        let (id, seq) = made.get(&k).cloned().ok_or_else(|| {
                            StoreError::Corrupt("duplicate without original".into())
                        })?;
                        (id, seq, ts)
                    }
                };
                results.push(Applied {
                    outcome: WriteOutcome::Sent {
                        id,
                        seq,
                        ts: at,
                        duplicate: true,
                    },
                    event: None,
                });
            }
        }
    }
    Ok(results)
}

/// Inserts every staged message: messages, events and search rows, a few statements in all.
pub(super) async fn insert_staged(tx: &mut Tx, staged: &[Staged]) -> Result<()> {
    for chunk in staged.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, ts, deleted) VALUES {}",
            placeholders(chunk.len(), 7, 1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for m in chunk {
            q = q
                .bind(m.id.as_str())
                .bind(m.room.as_str())
                .bind(m.seq)
                .bind(m.sender.as_str())
                .bind(m.client_msg_id.as_deref())
                .bind(m.ts)
                .bind(0i64);
        }
        q.execute(&mut **tx).await?;
        let sql = format!(
            "INSERT INTO events (room_id, seq, ts, kind, message_id, body, public_body) VALUES {}",
            placeholders(chunk.len(), 7, 1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for m in chunk {
            q = q
                .bind(m.room.as_str())
                .bind(m.seq)
                .bind(m.ts)
                .bind("message")
                .bind(m.id.as_str())
                .bind(m.json.as_str())
                .bind(None::<String>);
        }
        q.execute(&mut **tx).await?;
        let sql = format!(
            "INSERT INTO search_docs (room_id, kind, ref_id, seq, ts, pending, text) VALUES {}",
            placeholders(chunk.len(), 7, 1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for m in chunk {
            q = q
                .bind(m.room.as_str())
                .bind("message")
                .bind(m.id.as_str())
                .bind(m.seq)
                .bind(m.ts)
                .bind(0i64)
                .bind(m.text.as_str());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The staged sends as contributions (points and counters for their senders).
pub(super) fn contributions(staged: &[Staged]) -> Vec<super::engagement::Contribution> {
    staged
        .iter()
        .map(|m| super::engagement::Contribution {
            room: m.room.clone(),
            user: crate::protocol::UserId(m.sender.clone()),
            name: m.name.clone(),
            kind: super::engagement::Kind::Message,
            ref_id: m.id.0.clone(),
            detail: String::new(),
            ts: m.ts,
            no_points: false,
            quiet: false,
            zone: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbered_placeholders() {
        assert_eq!(super::placeholders(2, 3, 2), "($2, $3, $4), ($5, $6, $7)");
    }
}
