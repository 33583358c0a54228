//! The batched path for the hot write: plain `send`s (no `reply_to`) inside a group commit,
//! at a fixed number of statements for any number of sends over any number of rooms. One
//! statement finds earlier copies (idempotency), one reserves every room's run of seqs, and
//! the messages, events and search rows go in with three statements on SQLite, one on
//! PostgreSQL (where each is a round trip); rows travel as one JSON parameter, see `rows.rs`.
//! On SQLite the writer's thread encodes the next statement's rows while one runs. Same
//! results, in the same order, as applying the sends one by one; the conformance suite runs it
//! on both backends.

use super::rows::{self, Sql};
use super::writer::{Applied, CommittedEvent, SendOp, Tx, WriteOp, WriteOutcome, new_message_id};
use super::{Backend, Result, StoreError, now_ms};
use crate::protocol::{MessageId, RoomEvent, RoomId, SequencedEvent, UserRef};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::task::Poll;

/// A send's idempotency key (room, sender, client_msg_id), borrowed from the send.
type Key<'a> = (&'a str, &'a str, &'a str);

/// A plain send (one without `reply_to`), or `None` for any other write.
pub(super) fn plain_send(op: &WriteOp) -> Option<&SendOp> {
    match op {
        WriteOp::Send(send) if send.reply_to.is_none() => Some(send),
        _ => None,
    }
}

const PRIOR: Sql = Sql {
    sqlite: "SELECT m.room_id, m.sender_id, m.client_msg_id, m.id, m.seq, m.ts \
             FROM jsonb_each($1) AS k JOIN messages m ON m.room_id = k.value ->> 0 \
             AND m.sender_id = k.value ->> 1 AND m.client_msg_id = k.value ->> 2",
    // LATERAL ... LIMIT 1 keeps it one index probe per key: as a plain join, a planner that
    // has not analysed the table yet hashes the whole `messages` table instead.
    postgres: "SELECT m.room_id, m.sender_id, m.client_msg_id, m.id, m.seq, m.ts \
               FROM jsonb_array_elements($1::jsonb) AS k(v), LATERAL (SELECT * FROM messages \
               WHERE room_id = k.v ->> 0 AND sender_id = k.v ->> 1 \
               AND client_msg_id = k.v ->> 2 LIMIT 1) AS m",
};

/// Adds `n` to each listed room's `last_seq` (unless archived) and returns the new values.
const RESERVE: Sql = Sql {
    sqlite: "UPDATE rooms SET last_seq = rooms.last_seq + r.n \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS n FROM jsonb_each($1)) AS r \
             WHERE rooms.id = r.id AND rooms.archived = 0 RETURNING id, last_seq",
    // `= ANY(ARRAY(...))` finds the rows through the primary key whatever the planner knows.
    postgres: "UPDATE rooms SET last_seq = rooms.last_seq + r.n \
               FROM (SELECT v ->> 0 AS id, (v ->> 1)::bigint AS n \
               FROM jsonb_array_elements($1::jsonb) AS v) AS r \
               WHERE rooms.id = r.id AND rooms.archived = 0 AND rooms.id = ANY(ARRAY( \
               SELECT v ->> 0 FROM jsonb_array_elements($1::jsonb) AS v)) \
               RETURNING rooms.id, rooms.last_seq",
};

/// Whether listed rooms exist and are archived (only asked when a reservation missed one).
const ROOM_STATE: Sql = Sql {
    sqlite: "SELECT id, archived FROM rooms WHERE id IN (SELECT value FROM json_each($1))",
    postgres: "SELECT id, archived FROM rooms \
               WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))",
};

/// SQLite: a batch's `messages`, `events` and search rows, one statement each (PostgreSQL
/// inserts all three in one, `INSERT_ALL_POSTGRES`; keep them in step).
const INSERT_MESSAGES_SQLITE: &str = "INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, ts, deleted) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
     value ->> 5, 0 FROM jsonb_each($1)";

const INSERT_EVENTS_SQLITE: &str = "INSERT INTO events (room_id, seq, ts, kind, message_id, body, public_body) \
     SELECT value ->> 0, value ->> 1, value ->> 2, 'message', value ->> 3, \
     value ->> 4, NULL FROM jsonb_each($1)";

const INSERT_SEARCH_SQLITE: &str = "INSERT INTO search_docs (room_id, kind, ref_id, seq, ts, pending, text) \
     SELECT value ->> 0, 'message', value ->> 1, value ->> 2, value ->> 3, 0, \
     value ->> 4 FROM jsonb_each($1)";

/// PostgreSQL: the messages, events and search rows of a batch in one statement (one round
/// trip instead of three), each part the SQLite statement above in PostgreSQL's words.
const INSERT_ALL_POSTGRES: &str = "WITH m AS (\
    INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, ts, deleted) \
    SELECT v ->> 0, v ->> 1, (v ->> 2)::bigint, v ->> 3, v ->> 4, (v ->> 5)::bigint, 0 \
    FROM jsonb_array_elements($1::jsonb) AS v), \
    e AS (INSERT INTO events (room_id, seq, ts, kind, message_id, body, public_body) \
    SELECT v ->> 0, (v ->> 1)::bigint, (v ->> 2)::bigint, 'message', v ->> 3, v ->> 4, NULL \
    FROM jsonb_array_elements($2::jsonb) AS v) \
    INSERT INTO search_docs (room_id, kind, ref_id, seq, ts, pending, text) \
    SELECT v ->> 0, 'message', v ->> 1, (v ->> 2)::bigint, (v ->> 3)::bigint, 0, v ->> 4 \
    FROM jsonb_array_elements($3::jsonb) AS v";

/// Messages already stored under these (room, sender, client_msg_id) keys: key -> (id, seq, ts).
async fn prior_sends<'a>(
    tx: &mut Tx<'_>,
    backend: Backend,
    keys: &[Key<'a>],
) -> Result<HashMap<Key<'a>, (MessageId, i64, i64)>> {
    let mut prior = HashMap::new();
    if keys.is_empty() {
        return Ok(prior);
    }
    let rows = sqlx::query(PRIOR.get(backend))
        .bind(rows::json(keys)?)
        .fetch_all(&mut **tx)
        .await?;
    if rows.is_empty() {
        return Ok(prior);
    }
    // Each row is one of the keys asked: found by its text, kept as the send's own borrow.
    let asked: HashMap<Key<'a>, usize> = keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    for row in rows {
        let (room, sender, cid): (String, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let found = {
            let asked: &HashMap<Key<'_>, usize> = &asked;
            asked
                .get(&(room.as_str(), sender.as_str(), cid.as_str()))
                .copied()
        };
        let i = found.ok_or_else(|| StoreError::Corrupt("a stored send not asked for".into()))?;
        prior.insert(
            keys[i],
            (MessageId(row.try_get(3)?), row.try_get(4)?, row.try_get(5)?),
        );
    }
    Ok(prior)
}

/// Reserves `n` seqs in each room: room -> the first of its run. A room that is missing or
/// archived is left out of the map and reported in the second value.
async fn reserve(
    tx: &mut Tx<'_>,
    backend: Backend,
    wanted: &[(&str, i64)],
) -> Result<(HashMap<String, i64>, HashMap<String, StoreError>)> {
    let mut first = HashMap::with_capacity(wanted.len());
    let mut refused = HashMap::new();
    if wanted.is_empty() {
        return Ok((first, refused));
    }
    let rows = sqlx::query(RESERVE.get(backend))
        .bind(rows::json(wanted)?)
        .fetch_all(&mut **tx)
        .await?;
    let want: HashMap<&str, i64> = wanted.iter().copied().collect();
    for row in rows {
        let (id, last): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        let n = want
            .get(id.as_str())
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("seqs reserved in {id}, not asked")))?;
        first.insert(id, last - n + 1);
    }
    if first.len() < wanted.len() {
        let missed: Vec<&str> = wanted
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| !first.contains_key(*r))
            .collect();
        let rows = sqlx::query(ROOM_STATE.get(backend))
            .bind(rows::json(&missed)?)
            .fetch_all(&mut **tx)
            .await?;
        let existing: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        for room in missed {
            // It exists, so the reservation skipped it for being archived.
            let why = if existing.iter().any(|a| a == room) {
                StoreError::Forbidden("the room is archived".into())
            } else {
                StoreError::NotFound("room")
            };
            refused.insert(room.to_owned(), why);
        }
    }
    Ok((first, refused))
}

/// A message to insert once the whole batch is planned.
pub(super) struct Staged {
    room: RoomId,
    id: MessageId,
    seq: i64,
    sender: String,
    /// The sender's display name (kept for leaderboards).
    name: String,
    text: String,
    ts: i64,
    json: String,
}

/// What a run of sends came to: each send's result (in the order given) and the rows to
/// insert at the end of the transaction.
pub(super) struct Planned {
    pub results: Vec<Result<Applied>>,
    pub staged: Vec<Staged>,
    /// The `messages` rows when they are not inserted yet (PostgreSQL: they go in with the
    /// events and search rows, see [`insert_staged`]).
    pub messages: Option<String>,
}

fn key_of<'a>(room: &'a RoomId, from: &'a UserRef, cid: &'a Option<String>) -> Option<Key<'a>> {
    cid.as_deref().map(|c| (room.as_str(), from.id.as_str(), c))
}

/// Which sends are new (not stored before, not repeated earlier in the batch): a new send's
/// slot is its index among its room's new sends, in queue order; a duplicate's is `None`.
/// Also returns how many new sends each room has.
fn slots<'a>(
    sends: &[&'a SendOp],
    prior: &HashMap<Key<'a>, (MessageId, i64, i64)>,
) -> (Vec<Option<i64>>, BTreeMap<&'a str, i64>) {
    let mut seen: HashSet<Key<'a>> = HashSet::with_capacity(sends.len());
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    let mut slot = Vec::with_capacity(sends.len());
    for &SendOp {
        room,
        from,
        client_msg_id: cid,
        ..
    } in sends
    {
        let new = match key_of(room, from, cid) {
            Some(k) if prior.contains_key(&k) || seen.contains(&k) => false,
            Some(k) => {
                seen.insert(k);
                true
            }
            None => true,
        };
        if new {
            let n = counts.entry(room.as_str()).or_default();
            slot.push(Some(*n));
            *n += 1;
        } else {
            slot.push(None);
        }
    }
    (slot, counts)
}

/// A duplicate's outcome: that of the stored message, or of its first copy in this batch.
fn duplicate(
    key: Option<Key<'_>>,
    prior: &HashMap<Key<'_>, (MessageId, i64, i64)>,
    made: &HashMap<Key<'_>, (MessageId, i64)>,
    ts: i64,
) -> Result<Applied> {
    let k = key.ok_or_else(|| StoreError::Corrupt("a duplicate without a key".into()))?;
    let (id, seq, at) = match prior.get(&k) {
        Some((id, seq, at)) => (id.clone(), *seq, *at),
        None => {
            let (id, seq) = made
                .get(&k)
                .cloned()
                .ok_or_else(|| StoreError::Corrupt("duplicate without original".into()))?;
            (id, seq, ts)
        }
    };
    Ok(Applied {
        outcome: WriteOutcome::Sent {
            id,
            seq,
            ts: at,
            duplicate: true,
        },
        event: None,
    })
}

/// A new send stored as `id` at `seq`: its outcome and event, and the rows still to insert.
fn fresh(send: &SendOp, id: MessageId, seq: i64, ts: i64) -> (Applied, Staged) {
    let SendOp {
        room,
        from,
        text,
        client_msg_id: cid,
        ..
    } = send;
    let json = crate::protocol::encode(&SequencedEvent {
        room: room.clone(),
        seq,
        event: RoomEvent::Message {
            id: id.clone(),
            from: from.clone(),
            text: text.clone(),
            reply_to: None,
            ts,
            client_msg_id: cid.clone(),
            edited_ts: None,
            deleted: false,
            reactions: Vec::new(),
        },
    });
    let applied = Applied {
        outcome: WriteOutcome::Sent {
            id: id.clone(),
            seq,
            ts,
            duplicate: false,
        },
        event: Some(CommittedEvent {
            room: room.clone(),
            seq,
            json: json.clone(),
            public_json: None,
        }),
    };
    let staged = Staged {
        room: room.clone(),
        id,
        seq,
        sender: from.id.0.clone(),
        name: from.name.clone(),
        text: text.clone(),
        ts,
        json,
    };
    (applied, staged)
}

/// What the first pass over a batch's sends decided for one: its outcome already (a
/// duplicate or a refusal), or a new message's id and seq.
enum Decided {
    /// Boxed: rare, and an outcome is large.
    Done(Box<Result<Applied>>),
    New {
        id: MessageId,
        seq: i64,
    },
}

/// Plans plain sends (each room's in queue order): duplicates get the first send's outcome,
/// new ones consecutive seqs of their room. Reads and reserves with a fixed number of
/// statements; on SQLite it also inserts the `messages` rows, encoding the events while that
/// runs. The rest is inserted later (see [`insert_staged`]).
pub(super) async fn plan(tx: &mut Tx<'_>, backend: Backend, ops: &[&WriteOp]) -> Result<Planned> {
    let mut sends = Vec::with_capacity(ops.len());
    for op in ops {
        sends.push(
            plain_send(op)
                .ok_or_else(|| StoreError::Corrupt("plan takes plain sends only".into()))?,
        );
    }
    let keys: Vec<Key<'_>> = sends
        .iter()
        .filter_map(|s| key_of(&s.room, &s.from, &s.client_msg_id))
        .collect();
    let prior = prior_sends(tx, backend, &keys).await?;
    let (slot, counts) = slots(&sends, &prior);
    let fresh_counts: Vec<(&str, i64)> = counts.into_iter().collect();
    let (first, refused) = reserve(tx, backend, &fresh_counts).await?;
    let ts = now_ms();
    let mut made: HashMap<Key<'_>, (MessageId, i64)> = HashMap::with_capacity(sends.len());
    let mut decided = Vec::with_capacity(sends.len());
    for (&send, slot) in sends.iter().zip(slot) {
        let key = key_of(&send.room, &send.from, &send.client_msg_id);
        let room = &send.room;
        let Some(n) = slot else {
            decided.push(Decided::Done(Box::new(duplicate(key, &prior, &made, ts))));
            continue;
        };
        // A resend of a stored message gets its first outcome even from an archived room, as
        // on the one-by-one path; only new messages are refused.
        if let Some(why) = refused.get(room.as_str()) {
            decided.push(Decided::Done(Box::new(Err(why.duplicate()))));
            continue;
        }
        let seq = first
            .get(room.as_str())
            .ok_or_else(|| StoreError::Corrupt(format!("no seqs reserved in {room}")))?
            + n;
        let id = new_message_id(ts);
        if let Some(k) = key {
            made.insert(k, (id.clone(), seq));
        }
        decided.push(Decided::New { id, seq });
    }
    let messages = {
        let rows: Vec<_> = sends
            .iter()
            .zip(&decided)
            .filter_map(|(s, d)| match d {
                Decided::New { id, seq } => Some((
                    id.as_str(),
                    s.room.as_str(),
                    *seq,
                    s.from.id.as_str(),
                    s.client_msg_id.as_deref(),
                    ts,
                )),
                Decided::Done(_) => None,
            })
            .collect();
        (!rows.is_empty()).then(|| rows::json(&rows)).transpose()?
    };
    let build = || {
        let mut results = Vec::with_capacity(sends.len());
        let mut staged = Vec::with_capacity(sends.len());
        for (&send, d) in sends.iter().zip(decided) {
            match d {
                Decided::Done(r) => results.push(*r),
                Decided::New { id, seq } => {
                    let (applied, row) = fresh(send, id, seq, ts);
                    results.push(Ok(applied));
                    staged.push(row);
                }
            }
        }
        Planned {
            results,
            staged,
            messages: None,
        }
    };
    let Some(messages) = messages else {
        return Ok(build());
    };
    if backend == Backend::Postgres {
        // Each statement is a round trip there: the rows wait for the one insert of all three.
        return Ok(Planned {
            messages: Some(messages),
            ..build()
        });
    }
    let insert = sqlx::query(INSERT_MESSAGES_SQLITE)
        .bind(messages)
        .execute(&mut **tx);
    let (inserted, planned) = overlapped(insert, build).await;
    inserted?;
    Ok(planned)
}

/// Runs `work` on this thread while the database runs `statement`: the statement's first
/// poll hands it to the connection (sqlx's SQLite worker thread, or the PostgreSQL socket),
/// `work` runs meanwhile, then the statement is awaited. Between two statements of a batch
/// the database would otherwise wait for this thread's encoding.
async fn overlapped<F: Future, T>(statement: F, work: impl FnOnce() -> T) -> (F::Output, T) {
    let mut statement = std::pin::pin!(statement);
    let early = std::future::poll_fn(|cx| Poll::Ready(statement.as_mut().poll(cx))).await;
    let done = work();
    let out = match early {
        Poll::Ready(out) => out,
        Poll::Pending => statement.await,
    };
    (out, done)
}

/// Inserts the staged messages' events and search rows, and their `messages` rows when
/// [`plan`] left them (`messages`). On SQLite two statements (the messages went in with
/// `plan`), the search rows encoded while the events go in; on PostgreSQL, where each
/// statement is a round trip, one statement of three inserts.
pub(super) async fn insert_staged(
    tx: &mut Tx<'_>,
    backend: Backend,
    messages: Option<String>,
    staged: &[Staged],
) -> Result<()> {
    if staged.is_empty() {
        return Ok(());
    }
    let events: Vec<_> = staged
        .iter()
        .map(|m| (m.room.as_str(), m.seq, m.ts, m.id.as_str(), m.json.as_str()))
        .collect();
    let events = rows::json(&events)?;
    let docs = || {
        let docs: Vec<_> = staged
            .iter()
            .map(|m| (m.room.as_str(), m.id.as_str(), m.seq, m.ts, m.text.as_str()))
            .collect();
        rows::json(&docs)
    };
    if backend == Backend::Postgres {
        sqlx::query(INSERT_ALL_POSTGRES)
            .bind(messages.unwrap_or_else(|| "[]".to_owned()))
            .bind(events)
            .bind(docs()?)
            .execute(&mut **tx)
            .await?;
        return Ok(());
    }
    if let Some(messages) = messages {
        sqlx::query(INSERT_MESSAGES_SQLITE)
            .bind(messages)
            .execute(&mut **tx)
            .await?;
    }
    let insert = sqlx::query(INSERT_EVENTS_SQLITE)
        .bind(events)
        .execute(&mut **tx);
    let (inserted, docs) = overlapped(insert, docs).await;
    inserted?;
    sqlx::query(INSERT_SEARCH_SQLITE)
        .bind(docs?)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The staged sends as contributions (points and counters for their senders), taking their
/// strings: called once they are inserted.
pub(super) fn contributions(staged: Vec<Staged>) -> Vec<super::engagement::Contribution> {
    staged
        .into_iter()
        .map(|m| super::engagement::Contribution {
            room: m.room,
            user: crate::protocol::UserId(m.sender),
            name: m.name,
            kind: super::engagement::Kind::Message,
            ref_id: m.id.0,
            detail: String::new(),
            ts: m.ts,
            no_points: false,
            quiet: false,
            zone: None,
        })
        .collect()
}
