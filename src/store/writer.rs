//! The group-commit writer: one task that takes sequenced writes from a bounded queue, applies
//! a batch of them (up to `batch_max`, or whatever is queued, optionally lingering a little)
//! in ONE transaction, assigns each room event the room's next `seq` inside that transaction,
//! commits once, then hands the committed events to the hook in commit order and only then
//! acknowledges each write (a publisher task does that while the next batch runs). A batch
//! that fails at the database level is retried write by write so one bad write cannot fail
//! its neighbours. Knows the schema and the event encoding; knows nothing of sessions or the
//! hub.

use super::engagement::{self, BadgeHookSlot, Effects};
use super::{Backend, Result, StoreError, now_ms, postgres, sqlite};
use crate::engagement::EngagementConfig;
use crate::metrics::Metrics;
use crate::protocol::{
    MessageId, QuestionId, QuestionStatus, RoomEvent, RoomId, SequencedEvent, UserId, UserRef,
};
use sqlx::AnyConnection;
use sqlx::Connection;
use sqlx::Transaction;
use sqlx::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Called with each committed event, in commit order, before the write is acknowledged.
pub type CommitHook = Arc<dyn Fn(CommittedEvent) + Send + Sync>;

/// An event that is durably committed: its room, seq and wire JSON (as host/ta see it), and
/// what everyone else sees when that differs.
#[derive(Clone, Debug)]
pub struct CommittedEvent {
    pub room: RoomId,
    pub seq: i64,
    pub json: String,
    pub public_json: Option<String>,
}

/// A chat message to store: what a `send` write carries.
#[derive(Clone, Debug)]
pub struct SendOp {
    pub room: RoomId,
    pub from: UserRef,
    pub text: String,
    /// The sender's id for this message; a resend under the same id is answered with the first
    /// send's outcome.
    pub client_msg_id: Option<String>,
    pub reply_to: Option<MessageId>,
}

/// A sequenced write. The writer checks what only the database can know (the message exists,
/// its author, the room is not archived); the caller has already checked the user's rights.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Send(SendOp),
    Edit {
        room: RoomId,
        id: MessageId,
        by: UserRef,
        text: String,
    },
    Delete {
        room: RoomId,
        id: MessageId,
        by: UserRef,
        /// Host/TA may delete anyone's message; others only their own.
        as_moderator: bool,
    },
    React {
        room: RoomId,
        id: MessageId,
        user: UserRef,
        emoji: String,
        add: bool,
        max_distinct: u32,
    },
    Ask {
        room: RoomId,
        author: UserRef,
        text: String,
        anonymous: bool,
        /// The room is moderated: the question waits for approval, visible to host/ta only.
        pending: bool,
    },
    Vote {
        room: RoomId,
        question: QuestionId,
        user: UserId,
        up: bool,
    },
    Answer {
        room: RoomId,
        question: QuestionId,
        author: UserRef,
        text: String,
    },
    SetQuestionStatus {
        room: RoomId,
        question: QuestionId,
        status: QuestionStatus,
    },
    /// Records that a user belongs to a room (first join of an open room), keeping any role
    /// they already have. Not sequenced; batched so a burst of joins shares commits.
    EnsureMember {
        room: RoomId,
        user: UserId,
        role: crate::protocol::RoomRole,
    },
    // -- engagement --
    /// Once per user, room and local day (in `tz`, the token's zone, else the room's).
    /// Not sequenced.
    Checkin {
        room: RoomId,
        user: UserRef,
        tz: Option<String>,
    },
    /// Marks (`on`) or unmarks an answer helpful; `answer` defaults to the first answer.
    Helpful {
        room: RoomId,
        question: QuestionId,
        answer: Option<String>,
        by: UserRef,
        /// Host/TA may mark any question's answer; others only answers to their own question.
        as_moderator: bool,
        on: bool,
    },
    // -- polls and the class lifecycle --
    /// A new poll, in `draft`.
    PollCreate {
        room: RoomId,
        by: UserId,
        spec: super::PollSpec,
    },
    /// Opens a draft or closes an open poll (`target`: `Open` or `Closed`). `words`: how many
    /// words a word cloud's results list.
    PollState {
        room: RoomId,
        poll: String,
        target: crate::protocol::PollState,
        words: usize,
    },
    /// Publishes an open poll's results as they are now (the coalesced update).
    PollResults {
        room: RoomId,
        poll: String,
        words: usize,
    },
    /// A user's answer to an open poll, replacing any earlier one. Not sequenced.
    PollAnswer {
        room: RoomId,
        poll: String,
        user: UserId,
        /// The answerer's display name, kept with the answer.
        name: String,
        choices: Vec<u32>,
        text: Option<String>,
    },
    /// Moves the class to `target` (host), or where the clock says (`None`); `reopen` moves an
    /// ended class back to `live` (`target` is then `Live`).
    ClassState {
        room: RoomId,
        target: Option<crate::protocol::ClassState>,
        reopen: bool,
    },
    /// Attendance and stage log: a session entering/leaving, a user going on/off stage.
    /// Not sequenced.
    Presence {
        room: RoomId,
        user: UserId,
        name: String,
        session: String,
        kind: super::PresenceKind,
        on: bool,
        ts: i64,
    },
}

impl WriteOp {
    pub(super) fn room(&self) -> &RoomId {
        match self {
            Self::Send(SendOp { room, .. })
            | Self::Edit { room, .. }
            | Self::Delete { room, .. }
            | Self::React { room, .. }
            | Self::Ask { room, .. }
            | Self::Vote { room, .. }
            | Self::Answer { room, .. }
            | Self::SetQuestionStatus { room, .. }
            | Self::EnsureMember { room, .. }
            | Self::Checkin { room, .. }
            | Self::Helpful { room, .. }
            | Self::PollCreate { room, .. }
            | Self::PollState { room, .. }
            | Self::PollResults { room, .. }
            | Self::PollAnswer { room, .. }
            | Self::ClassState { room, .. }
            | Self::Presence { room, .. } => room,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A message was stored (or, `duplicate`, had been stored before under the same
    /// `client_msg_id`: this is the first write's result and nothing new was published).
    Sent {
        id: MessageId,
        seq: i64,
        ts: i64,
        duplicate: bool,
    },
    /// A new event with this seq was committed.
    Changed { seq: i64 },
    /// A question was asked.
    Asked {
        id: QuestionId,
        seq: i64,
        ts: i64,
        status: QuestionStatus,
    },
    /// The write changed nothing (reacting twice, unreacting what was not there, deleting a
    /// deleted message).
    Unchanged,
    /// A poll was created, opened or closed: the poll as host/ta see it, and the seq of its
    /// event (`None` when nothing changed).
    Poll {
        poll: crate::protocol::PollView,
        seq: Option<i64>,
    },
    /// A poll answer was stored.
    PollAnswered {
        poll: String,
        choices: Vec<u32>,
        text: Option<String>,
        ts: i64,
    },
    /// The class moved to `state`.
    Class {
        state: crate::protocol::ClassState,
        seq: i64,
    },
    /// A check-in (`already` when the user had checked in on this local day), as its `ok`
    /// reports it.
    CheckedIn(crate::protocol::CheckinOk),
}

pub(super) enum Request {
    Op {
        op: WriteOp,
        reply: oneshot::Sender<Result<WriteOutcome>>,
    },
    /// Sent by `Store::close`: commit what is queued, then stop.
    Shutdown,
}

pub(super) struct Applied {
    pub outcome: WriteOutcome,
    pub event: Option<CommittedEvent>,
}

impl Applied {
    /// A write that changed something: its stored event, reported as `Changed`.
    pub fn changed(event: CommittedEvent) -> Self {
        Self {
            outcome: WriteOutcome::Changed { seq: event.seq },
            event: Some(event),
        }
    }
}

type Pending = (WriteOp, oneshot::Sender<Result<WriteOutcome>>);

/// Per room, the highest seq of an edit, delete or reaction this writer committed or is about
/// to commit: each changes the stored copy of an earlier event, and a copy of the room's events
/// read before it was published may hold the old one (see [`super::Store::rewritten_after`]).
/// Set before the commit, so a reader that sees no rewrite after seq S here, after it read
/// its copy, knows no rewrite after S had committed when it read. One `i64` per room that
/// ever had one in this process.
#[derive(Debug, Default)]
pub(super) struct Rewrites(dashmap::DashMap<RoomId, i64>);

impl Rewrites {
    /// Notes the rewrites among `out`, the results of `ops` about to be committed.
    fn note(&self, ops: &[&WriteOp], out: &[Result<(Applied, Effects)>]) {
        for (op, result) in ops.iter().zip(out) {
            let rewrites = matches!(
                op,
                WriteOp::Edit { .. } | WriteOp::Delete { .. } | WriteOp::React { .. }
            );
            if rewrites
                && let Ok((applied, _)) = result
                && let Some(ev) = &applied.event
            {
                let mut seq = self.0.entry(ev.room.clone()).or_insert(ev.seq);
                *seq = (*seq).max(ev.seq);
            }
        }
    }

    /// Whether a rewrite with a seq above `seq` in `room` has committed (or is committing).
    pub(super) fn after(&self, room: &RoomId, seq: i64) -> bool {
        self.0.get(room).is_some_and(|s| *s > seq)
    }
}

/// Who hears of a commit: the commit hook (fan-out), the badge hook, and the webhook sender
/// (through the outbox and its notifier, with the set of subscribed types that says whether
/// to write outbox rows at all).
pub(super) struct Hooks {
    pub commit: Option<CommitHook>,
    pub rewrites: Arc<Rewrites>,
    pub badge: BadgeHookSlot,
    pub subscribed: Arc<super::webhooks::Subscribed>,
    pub outbox: Arc<tokio::sync::Notify>,
}

pub(super) async fn run(
    opts: super::StoreOptions,
    backend: Backend,
    mut rx: mpsc::Receiver<Request>,
    hooks: Hooks,
    metrics: Arc<Metrics>,
) {
    let batch_max = opts.batch_max;
    let linger = Duration::from_micros(opts.batch_linger_us);
    let detached_linger = Duration::from_millis(opts.detached_linger_ms);
    let engagement = opts.engagement.clone();
    let begin = match backend {
        Backend::Sqlite => sqlite::BEGIN_WRITE,
        Backend::Postgres => postgres::BEGIN_WRITE,
    };
    // Batch N is published and acknowledged by a task of its own while batch N+1's
    // statements run: the writer's thread would otherwise sit idle while the database works.
    // One task, fed in commit order, keeps the order the hub relies on; batch N+1 commits
    // only once batch N is published (see `Writer::unpublished`), so at most one batch is
    // ever in the channel.
    let publisher = Publisher {
        hook: hooks.commit,
        badge_hook: hooks.badge,
    };
    let (published, to_publish) = mpsc::channel::<Committed>(1);
    let log = match backend {
        Backend::Sqlite => sqlite::deferred_log(&opts).ok().flatten(),
        Backend::Postgres => None,
    };
    let publishing = tokio::spawn(publish_all(to_publish, publisher, log, metrics.clone()));
    let mut w = Writer {
        opts,
        conn: None,
        backend,
        begin,
        published,
        unpublished: None,
        rewrites: hooks.rewrites,
        metrics,
        engagement,
        subscribed: hooks.subscribed,
        outbox: hooks.outbox,
    };
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_max);
    let mut stopping = false;
    while let Some(first) = rx.recv().await {
        match first {
            Request::Op { op, reply } => batch.push((op, reply)),
            Request::Shutdown => stopping = true,
        }
        let mut lingered = linger.is_zero();
        // A batch of log writes nobody waits for (their receivers are gone) waits a little
        // for more, until a write someone waits for arrives: see `store_detached_linger_ms`.
        let mut awaited = batch.iter().any(|(_, reply)| !reply.is_closed());
        let mut detached_until = None;
        while batch.len() < batch_max {
            let next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(_) if !lingered && !stopping => {
                    lingered = true;
                    tokio::time::timeout(linger, rx.recv()).await.ok().flatten()
                }
                Err(_) if !awaited && !stopping && !detached_linger.is_zero() => {
                    let until = *detached_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + detached_linger);
                    tokio::time::timeout_at(until, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            match next {
                Some(Request::Op { op, reply }) => {
                    awaited |= !reply.is_closed();
                    batch.push((op, reply));
                }
                Some(Request::Shutdown) => stopping = true,
                None => break,
            }
        }
        if !batch.is_empty() && !w.commit(&mut batch).await {
            break;
        }
        if stopping {
            // Refuse new writes, but commit every write that was already accepted.
            rx.close();
            while let Some(req) = rx.recv().await {
                if let Request::Op { op, reply } = req {
                    batch.push((op, reply));
                    if batch.len() >= batch_max && !w.commit(&mut batch).await {
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                w.commit(&mut batch).await;
            }
            break;
        }
    }
    // Every committed batch is published and acknowledged before the writer counts as stopped.
    drop(w);
    if let Err(e) = publishing.await {
        tracing::error!(error = %e, "store publisher failed");
    }
    tracing::debug!("store writer stopped");
}

/// The publisher's loop: each committed batch in commit order, published and answered. With
/// `log` (SQLite at `full` whose commits do not sync, see `sqlite::deferred_log`), the log is
/// synced first, on a blocking thread while the writer runs the next batch's statements: one
/// sync covers every commit written before it, so nothing of the batch is told before it
/// would survive power loss. A failed sync stops the publisher: the batch's submitters and
/// every later one hear that the store closed (their writes may be on disk or not; a resend
/// with the same `client_msg_id` finds out), as after a panicking hook.
async fn publish_all(
    mut batches: mpsc::Receiver<Committed>,
    publisher: Publisher,
    log: Option<std::path::PathBuf>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = batches.recv().await {
        if let Some(path) = &log {
            let path = path.clone();
            let started = Instant::now();
            let synced = tokio::task::spawn_blocking(move || sync_log(&path)).await;
            match synced {
                Ok(Ok(())) => metrics.store_log_sync(started.elapsed()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "syncing the SQLite log failed; the writer stops");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the SQLite log sync did not finish; the writer stops");
                    return;
                }
            }
        }
        publisher.publish_and_reply(batch);
    }
}

/// Syncs the log file's data to the disk. The log exists from the first commit on while the
/// store is open, so a missing one means the path is not SQLite's log: an error, never a
/// sync skipped in silence.
fn sync_log(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

/// One committed batch, on its way to be published and acknowledged: each write's reply
/// (queue order), `order[i]` the queue position of the `i`th result, the effects of the
/// whole batch, and what tells the writer it is done.
struct Committed {
    replies: Vec<oneshot::Sender<Result<WriteOutcome>>>,
    order: Vec<usize>,
    results: Vec<Answered>,
    batch_fx: Effects,
    done: oneshot::Sender<()>,
}

/// Tells the hooks what committed, then the submitters.
struct Publisher {
    hook: Option<CommitHook>,
    badge_hook: BadgeHookSlot,
}

impl Publisher {
    /// Publishes what the batch committed, in commit order, then acknowledges each write: a
    /// writer's own session sees its event before its `ok`, and nobody can see an `ok` for an
    /// event not yet fanned out. Then signals the batch done.
    fn publish_and_reply(&self, batch: Committed) {
        let Committed {
            replies,
            order,
            results,
            batch_fx,
            done,
        } = batch;
        let mut replies: Vec<Option<_>> = replies.into_iter().map(Some).collect();
        let badge_hook = self.badge_hook.get();
        // Debug builds check the order the hub relies on: within one commit, each room's
        // seqs reach the hook strictly increasing (its per-member high-water mark would drop
        // a lower one as already seen).
        #[cfg(debug_assertions)]
        let last_seq = std::cell::RefCell::new(std::collections::HashMap::<RoomId, i64>::new());
        let publish = |ev: CommittedEvent| {
            #[cfg(debug_assertions)]
            {
                let mut last = last_seq.borrow_mut();
                let prev = last.insert(ev.room.clone(), ev.seq);
                debug_assert!(
                    prev.is_none_or(|p| p < ev.seq),
                    "room {} seq {} published after seq {prev:?}",
                    ev.room,
                    ev.seq
                );
            }
            if let Some(hook) = &self.hook {
                hook(ev);
            }
        };
        let tell = |fx: Effects| {
            for ev in fx.events {
                publish(ev);
            }
            if let Some(hook) = badge_hook {
                for b in fx.badges {
                    hook(b);
                }
            }
        };
        for (idx, (result, after)) in order.into_iter().zip(results) {
            let result = result.map(|(applied, fx)| {
                if let Some(ev) = applied.event {
                    publish(ev);
                }
                tell(fx);
                applied.outcome
            });
            tell(after);
            if let Some(reply) = replies[idx].take() {
                // The submitter may have gone away (connection closed); the write stands.
                let _ = reply.send(result);
            }
        }
        // What the batched sends earned (announcements come after their room's messages).
        tell(batch_fx);
        let _ = done.send(());
    }
}

struct Writer {
    opts: super::StoreOptions,
    /// The writer's own connection, opened on the writer's own runtime (its socket is polled
    /// there, not through the shared runtime's I/O driver): no pool hand-over or liveness
    /// ping per batch. Dropped after a failed transaction and opened anew for the next.
    conn: Option<AnyConnection>,
    backend: Backend,
    begin: &'static str,
    /// To the publisher (see [`Publisher`]).
    published: mpsc::Sender<Committed>,
    /// Fires when the publisher has told everything of the last batch handed to it. The next
    /// batch commits only after that: if a hook panics, no later batch commits unannounced.
    unpublished: Option<oneshot::Receiver<()>>,
    rewrites: Arc<Rewrites>,
    metrics: Arc<Metrics>,
    engagement: Arc<EngagementConfig>,
    subscribed: Arc<super::webhooks::Subscribed>,
    outbox: Arc<tokio::sync::Notify>,
}

type Results = (Vec<Result<(Applied, Effects)>>, Effects);

/// One write's result, and the effects to publish right after it.
type Answered = (Result<(Applied, Effects)>, Effects);

impl Writer {
    /// Commits the batch and hands it to the publisher. Returns false once the publisher is
    /// gone (a hook panicked): the batch was rolled back (see `try_transaction`), its
    /// submitters hear that the store closed, and the writer stops, as it would have with the
    /// hook on its own thread.
    async fn commit(&mut self, batch: &mut Vec<Pending>) -> bool {
        let started = Instant::now();
        // Every writer (in this process or another) takes room-row locks in room-id order, so
        // two batches touching the same rooms cannot deadlock. The sort is stable: writes to
        // one room keep their queue order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| batch[a].0.room().cmp(batch[b].0.room()));
        let ops: Vec<&WriteOp> = order.iter().map(|&i| &batch[i].0).collect();
        let (results, batch_fx) = self.run_batch(&ops).await;
        self.metrics.store_batch(ops.len(), started.elapsed());
        drop(ops);
        let (done, unpublished) = oneshot::channel();
        self.unpublished = Some(unpublished);
        let committed = Committed {
            replies: batch.drain(..).map(|(_, reply)| reply).collect(),
            order,
            results,
            batch_fx,
            done,
        };
        // Fails only if the publisher is gone: the replies are dropped with the batch.
        let handed = self.published.send(committed).await.is_ok();
        if !handed {
            tracing::error!("store publisher gone; the writer stops");
        }
        handed
    }

    /// Runs the batch in one transaction; if that fails, each write in a transaction of its
    /// own, so one bad write cannot sink the others. Each result comes with effects to
    /// publish right after it: on the retry path, what the op's own transaction added at its
    /// end (announcements of a retried send), so a room's seqs still reach the hook in
    /// increasing order. Then the effects of the whole batch.
    async fn run_batch(&mut self, ops: &[&WriteOp]) -> (Vec<Answered>, Effects) {
        match self.transaction(ops).await {
            Ok((results, fx)) => (
                results
                    .into_iter()
                    .map(|r| (r, Effects::default()))
                    .collect::<Vec<_>>(),
                fx,
            ),
            // The publisher is gone (see `try_transaction`): no write may commit any more.
            Err(_) if self.published.is_closed() => (
                ops.iter()
                    .map(|_| (Err(StoreError::Closed), Effects::default()))
                    .collect(),
                Effects::default(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, size = ops.len(), "batch failed, retrying writes one by one");
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(match self.transaction(std::slice::from_ref(op)).await {
                        Ok((mut one, fx)) => (one.pop().unwrap_or(Err(StoreError::Closed)), fx),
                        Err(e) => (Err(StoreError::Db(e)), Effects::default()),
                    });
                }
                (results, Effects::default())
            }
        }
    }

    /// Applies `ops` (sorted by room) in one transaction. A database error aborts (and rolls
    /// back) the whole transaction; a refusal of one write (not found, forbidden) only fails
    /// that write. Rooms whose writes are all plain sends (the hot path) go through
    /// `sends.rs` together, at a fixed number of statements; other writes apply one by one.
    async fn transaction(&mut self, ops: &[&WriteOp]) -> Result<Results, sqlx::Error> {
        let result = self.try_transaction(ops).await;
        if result.is_err() {
            // Whatever broke (the server went away, say), the next batch starts afresh.
            self.conn = None;
        }
        result
    }

    async fn try_transaction(&mut self, ops: &[&WriteOp]) -> Result<Results, sqlx::Error> {
        let conn = connection(&mut self.conn, self.backend, &self.opts).await?;
        let mut tx = conn.begin_with(self.begin).await?;
        if self.backend == Backend::Postgres {
            lock_rooms(&mut tx, ops).await.map_err(abort_batch)?;
        }
        let paths = paths(ops);
        let planned = super::sends::plan(&mut tx, self.backend, &plain_sends(ops, &paths))
            .await
            .map_err(abort_batch)?;
        record_members(&mut tx, self.backend, &new_members(ops))
            .await
            .map_err(abort_batch)?;
        super::class::record_presence(&mut tx, self.backend, &log_writes(ops))
            .await
            .map_err(abort_batch)?;
        let mut planned_results = planned.results.into_iter();
        let mut out: Vec<Result<(Applied, Effects)>> = Vec::with_capacity(ops.len());
        for (op, path) in ops.iter().zip(paths) {
            match path {
                Path::Send => {
                    let r = planned_results.next().unwrap_or_else(|| {
                        Err(StoreError::Corrupt("a send was not planned".into()))
                    });
                    out.push(r.map(|a| (a, Effects::default())));
                    continue;
                }
                Path::Member | Path::Log => {
                    out.push(Ok((
                        Applied {
                            outcome: WriteOutcome::Unchanged,
                            event: None,
                        },
                        Effects::default(),
                    )));
                    continue;
                }
                Path::One | Path::Unsequenced => {}
            }
            let mut fx = Effects::default();
            match apply(&mut tx, &self.engagement, op, &mut fx).await {
                Err(StoreError::Db(e)) => return Err(e),
                // Corrupt data can surface after a seq was taken: roll back, never commit a
                // seq without its event.
                Err(e @ StoreError::Corrupt(_)) => return Err(abort_batch(e)),
                other => out.push(other.map(|a| (a, fx))),
            }
        }
        super::sends::insert_staged(&mut tx, self.backend, planned.messages, &planned.staged)
            .await
            .map_err(abort_batch)?;
        // Points and counters of the batched sends: a fixed number of statements for all.
        let mut batch_fx = Effects::default();
        let sends = super::sends::contributions(planned.staged);
        engagement::contribute(&mut tx, &self.engagement, &sends, &mut batch_fx)
            .await
            .map_err(abort_batch)?;
        let queued = webhook_events(&mut tx, &self.subscribed, ops, &out)
            .await
            .map_err(abort_batch)?;
        self.rewrites.note(ops, &out);
        if let Some(previous) = self.unpublished.take()
            && previous.await.is_err()
        {
            // The publisher died telling the previous batch (a hook panicked): roll back.
            return Err(abort_batch(StoreError::Closed));
        }
        tx.commit().await?;
        if queued {
            self.outbox.notify_one();
        }
        Ok((out, batch_fx))
    }
}

/// The writer's connection, opened first if the last one was dropped (or there was none).
async fn connection<'a>(
    slot: &'a mut Option<AnyConnection>,
    backend: Backend,
    opts: &super::StoreOptions,
) -> Result<&'a mut AnyConnection, sqlx::Error> {
    if let Some(c) = slot {
        return Ok(c);
    }
    let opened = match backend {
        Backend::Sqlite => sqlite::connect_one(opts).await,
        Backend::Postgres => postgres::connect_one(opts).await,
    };
    Ok(slot.insert(opened.map_err(abort_batch)?))
}

/// The batch's writes that take the bulk send path, in batch order.
fn plain_sends<'a>(ops: &[&'a WriteOp], paths: &[Path]) -> Vec<&'a WriteOp> {
    ops.iter()
        .zip(paths)
        .filter(|(_, p)| **p == Path::Send)
        .map(|(op, _)| *op)
        .collect()
}

/// The memberships the batch ensures: (room, user, role).
fn new_members<'a>(ops: &[&'a WriteOp]) -> Vec<(&'a str, &'a str, &'a str)> {
    ops.iter()
        .filter_map(|op| match op {
            WriteOp::EnsureMember { room, user, role } => {
                Some((room.as_str(), user.as_str(), role.as_str()))
            }
            _ => None,
        })
        .collect()
}

/// The batch's attendance and stage log writes, in batch order.
fn log_writes<'a>(ops: &[&'a WriteOp]) -> Vec<super::class::LogWrite<'a>> {
    ops.iter()
        .filter_map(|op| match op {
            WriteOp::Presence {
                room,
                user,
                name,
                session,
                kind,
                on,
                ts,
            } => Some(super::class::LogWrite {
                room: room.as_str(),
                user: user.as_str(),
                name,
                session,
                kind: *kind,
                on: *on,
                ts: *ts,
            }),
            _ => None,
        })
        .collect()
}

/// Writes the webhook events of the batch's committed-to-be writes into the outbox, in
/// the batch's own transaction (each room's in seq order); nothing when no endpoint
/// subscribes to their types.
async fn webhook_events(
    tx: &mut Tx<'_>,
    subscribed: &super::webhooks::Subscribed,
    ops: &[&WriteOp],
    out: &[Result<(Applied, Effects)>],
) -> Result<bool> {
    use super::webhooks::{EventType, Outgoing, data_of_event, enqueue};
    let wanted = |t| subscribed.has(t);
    if !(wanted(EventType::MessageCreated)
        || wanted(EventType::QuestionAsked)
        || wanted(EventType::QuestionAnswered)
        || wanted(EventType::PollClosed)
        || wanted(EventType::ClassStarted)
        || wanted(EventType::ClassEnded))
    {
        return Ok(false);
    }
    let mut queued = false;
    for (op, result) in ops.iter().zip(out) {
        let Ok((applied, _)) = result else { continue };
        let Some(ev) = &applied.event else { continue };
        let (kind, ts) = match (op, &applied.outcome) {
            (WriteOp::Send(_), WriteOutcome::Sent { ts, .. }) => (EventType::MessageCreated, *ts),
            (WriteOp::Ask { .. }, WriteOutcome::Asked { ts, .. }) => {
                (EventType::QuestionAsked, *ts)
            }
            (WriteOp::Answer { .. }, _) => (EventType::QuestionAnswered, now_ms()),
            (
                WriteOp::PollState {
                    target: crate::protocol::PollState::Closed,
                    ..
                },
                WriteOutcome::Poll { seq: Some(_), .. },
            ) => (EventType::PollClosed, now_ms()),
            (WriteOp::ClassState { .. }, WriteOutcome::Class { state, .. }) => match state {
                crate::protocol::ClassState::Live => (EventType::ClassStarted, now_ms()),
                crate::protocol::ClassState::Ended => (EventType::ClassEnded, now_ms()),
                crate::protocol::ClassState::Scheduled => continue,
            },
            _ => continue,
        };
        if !wanted(kind) {
            continue;
        }
        queued |= enqueue(
            tx,
            Outgoing {
                kind,
                room: Some(&ev.room),
                seq: Some(ev.seq),
                ts,
                data: data_of_event(&ev.json),
            },
        )
        .await?;
    }
    Ok(queued)
}

/// How a write of a batch is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// With every plain send of the batch (`sends.rs`), at a fixed number of statements.
    Send,
    /// With every membership record of the batch, in one statement.
    Member,
    /// With every attendance and stage log write of the batch, in two statements.
    Log,
    /// On its own, in queue order, but taking no seq (so it never moves a room's sends off
    /// the bulk path).
    Unsequenced,
    /// On its own, in queue order.
    One,
}

/// The path of each write of `ops` (sorted by room). A room's plain sends go the bulk way
/// only if no write to that room takes its own path, so each room's seqs follow its queue
/// order either way; membership records never take a seq.
fn paths(ops: &[&WriteOp]) -> Vec<Path> {
    let mut out: Vec<Path> = ops
        .iter()
        .map(|op| match op {
            WriteOp::EnsureMember { .. } => Path::Member,
            WriteOp::Presence { .. } => Path::Log,
            WriteOp::PollAnswer { .. } => Path::Unsequenced,
            op if super::sends::plain_send(op).is_some() => Path::Send,
            _ => Path::One,
        })
        .collect();
    let mut start = 0;
    for i in 1..=ops.len() {
        if i == ops.len() || ops[i].room() != ops[start].room() {
            if out[start..i].contains(&Path::One) {
                for p in &mut out[start..i] {
                    if *p == Path::Send {
                        *p = Path::One;
                    }
                }
            }
            start = i;
        }
    }
    out
}

/// Records first joins of open rooms (room, user, role), keeping any role already stored.
async fn record_members(
    tx: &mut Tx<'_>,
    backend: Backend,
    rows: &[(&str, &str, &str)],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    const SQL: super::rows::Sql = super::rows::Sql {
        sqlite: "INSERT INTO room_members (room_id, user_id, role, added_at) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, $2 FROM jsonb_each($1) WHERE true \
                 ON CONFLICT (room_id, user_id) DO NOTHING",
        postgres: "INSERT INTO room_members (room_id, user_id, role, added_at) \
                   SELECT v ->> 0, v ->> 1, v ->> 2, $2 FROM jsonb_array_elements($1::jsonb) AS v \
                   ON CONFLICT (room_id, user_id) DO NOTHING",
    };
    sqlx::query(SQL.get(backend))
        .bind(super::rows::json(rows)?)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Locks the row of every room the batch writes to, in byte order of the id, before anything
/// else (PostgreSQL). Every writer, on every node, takes its rooms in that one order, so two
/// batches touching the same rooms wait for each other instead of deadlocking; the seq
/// reservations and counter upserts that follow find their room already held.
async fn lock_rooms(tx: &mut Tx<'_>, ops: &[&WriteOp]) -> Result<()> {
    let mut rooms: Vec<&str> = ops.iter().map(|op| op.room().as_str()).collect();
    rooms.dedup();
    sqlx::query(
        "SELECT id FROM rooms WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))) \
         ORDER BY id COLLATE \"C\" FOR NO KEY UPDATE",
    )
    .bind(super::rows::json(&rooms)?)
    .fetch_all(&mut **tx)
    .await?;
    Ok(())
}

/// Turns any failure of a bulk step into one that aborts (and so retries) the batch.
fn abort_batch(e: StoreError) -> sqlx::Error {
    match e {
        StoreError::Db(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

pub(super) type Tx<'c> = Transaction<'c, Any>;

/// Which backend a transaction runs on (for the few statements written per dialect).
pub(super) fn backend_of(tx: &Tx) -> Backend {
    if tx.backend_name().eq_ignore_ascii_case("postgresql") {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// A new message id for a message stored at `ts` (see [`new_id`]).
pub(super) fn new_message_id(ts: i64) -> MessageId {
    MessageId(time_ordered_id('m', ts))
}

/// A fresh id with a one-letter prefix saying what it names (see [`time_ordered_id`]).
pub(super) fn new_id(prefix: char) -> String {
    time_ordered_id(prefix, now_ms())
}

/// `prefix`, the time in ms as 12 hex digits, then 40 bits that keep ids made in the same
/// millisecond apart: random (so other nodes' ids differ), and one more than the last id made
/// here when that one had the same or a later millisecond. Ids made later on one node thus
/// sort later (reports list oldest first by id), and the indexes keyed by them (messages, edit
/// events, search rows, the points ledger) take new rows at their right edge instead of
/// dirtying a random page per row.
fn time_ordered_id(prefix: char, ts: i64) -> String {
    static LAST: std::sync::Mutex<(i64, u64)> = std::sync::Mutex::new((0, 0));
    let ts = ts.clamp(0, 0xffff_ffff_ffff);
    let (ts, low) = {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let next = if ts <= last.0 && last.1 < (1 << 40) - 1 {
            (last.0, last.1 + 1)
        } else {
            // A new millisecond: random in the lower half, so that increments stay in 40 bits.
            (ts.max(last.0 + 1), rand::random::<u64>() >> 25)
        };
        *last = next;
        next
    };
    format!("{prefix}{ts:012x}{low:010x}")
}

/// Gives the room its next seq. Must be the first write of each op: everything before it only
/// reads, so a refusal leaves nothing behind and a rollback leaves no gap.
pub(super) async fn bump_seq(tx: &mut Tx<'_>, room: &RoomId) -> Result<i64> {
    let seq: Option<i64> = sqlx::query_scalar(
        "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 AND archived = 0 RETURNING last_seq",
    )
    .bind(room.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(seq) = seq {
        return Ok(seq);
    }
    let exists: Option<i64> = sqlx::query_scalar("SELECT archived FROM rooms WHERE id = $1")
        .bind(room.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    match exists {
        Some(_) => Err(StoreError::Forbidden("the room is archived".into())),
        None => Err(StoreError::NotFound("room")),
    }
}

/// Stores a sequenced event. `ref_id` is the message or question it is about; `public` is
/// what members see when it differs from what host/ta see.
pub(super) async fn insert_event(
    tx: &mut Tx<'_>,
    room: &RoomId,
    seq: i64,
    ts: i64,
    ref_id: &str,
    event: RoomEvent,
    public: Option<RoomEvent>,
) -> Result<CommittedEvent> {
    let kind = match &event {
        RoomEvent::Message { .. } => "message",
        RoomEvent::MessageEdited { .. } => "message_edited",
        RoomEvent::MessageDeleted { .. } => "message_deleted",
        RoomEvent::Reaction { .. } => "reaction",
        RoomEvent::Question(_) => "question",
        RoomEvent::QuestionUpdated(_) => "question_updated",
        RoomEvent::Hidden {} => "hidden",
        RoomEvent::Poll { .. } => "poll",
        RoomEvent::ClassState { .. } => "class_state",
    };
    let json = crate::protocol::encode(&SequencedEvent {
        room: room.clone(),
        seq,
        event,
    });
    let public_json = public.map(|event| {
        crate::protocol::encode(&SequencedEvent {
            room: room.clone(),
            seq,
            event,
        })
    });
    sqlx::query(
        "INSERT INTO events (room_id, seq, ts, kind, message_id, body, public_body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(room.as_str())
    .bind(seq)
    .bind(ts)
    .bind(kind)
    .bind(ref_id)
    .bind(json.as_str())
    .bind(public_json.as_deref())
    .execute(&mut **tx)
    .await?;
    Ok(CommittedEvent {
        room: room.clone(),
        seq,
        json,
        public_json,
    })
}

/// What one write is applied with: the batch's transaction, the engagement rules and the
/// effects the batch collects.
struct Apply<'a, 'c> {
    tx: &'a mut Tx<'c>,
    cfg: &'a EngagementConfig,
    fx: &'a mut Effects,
}

/// Applies one write in the batch's transaction, by kind.
async fn apply(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    op: &WriteOp,
    fx: &mut Effects,
) -> Result<Applied> {
    let a = Apply { tx, cfg, fx };
    match op {
        WriteOp::Send(_)
        | WriteOp::Edit { .. }
        | WriteOp::Delete { .. }
        | WriteOp::React { .. } => apply_message(a, op).await,
        WriteOp::Ask { .. }
        | WriteOp::Vote { .. }
        | WriteOp::Answer { .. }
        | WriteOp::SetQuestionStatus { .. } => apply_qa(a, op).await,
        WriteOp::PollCreate { .. }
        | WriteOp::PollState { .. }
        | WriteOp::PollResults { .. }
        | WriteOp::PollAnswer { .. } => apply_poll(a, op).await,
        _ => apply_room(a, op).await,
    }
}

/// Messages: send, edit, delete, react.
async fn apply_message(Apply { tx, cfg, fx }: Apply<'_, '_>, op: &WriteOp) -> Result<Applied> {
    match op {
        WriteOp::Send(send) => super::messages::send(tx, cfg, send, fx).await,
        WriteOp::Edit { room, id, by, text } => super::messages::edit(tx, room, id, by, text).await,
        WriteOp::Delete {
            room,
            id,
            by,
            as_moderator,
        } => super::messages::delete(tx, room, id, by, *as_moderator).await,
        WriteOp::React {
            room,
            id,
            user,
            emoji,
            add,
            max_distinct,
        } => super::messages::react(tx, cfg, room, id, user, emoji, *add, *max_distinct, fx).await,

        _ => Err(StoreError::Corrupt(
            "apply_message was given another kind of write".into(),
        )),
    }
}

/// Questions: ask, vote, answer, status.
async fn apply_qa(Apply { tx, cfg, fx }: Apply<'_, '_>, op: &WriteOp) -> Result<Applied> {
    match op {
        WriteOp::Ask {
            room,
            author,
            text,
            anonymous,
            pending,
        } => super::qa::apply_ask(tx, cfg, room, author, text, *anonymous, *pending, fx).await,
        WriteOp::Vote {
            room,
            question,
            user,
            up,
        } => super::qa::vote(tx, room, question, user, *up).await,
        WriteOp::Answer {
            room,
            question,
            author,
            text,
        } => super::qa::apply_answer(tx, cfg, room, question, author, text, fx).await,
        WriteOp::SetQuestionStatus {
            room,
            question,
            status,
        } => super::qa::apply_status(tx, cfg, room, question, *status, fx).await,
        _ => Err(StoreError::Corrupt(
            "apply_qa was given another kind of write".into(),
        )),
    }
}

/// Polls: create, open/close, results, answers.
async fn apply_poll(Apply { tx, cfg, fx }: Apply<'_, '_>, op: &WriteOp) -> Result<Applied> {
    match op {
        WriteOp::PollCreate { room, by, spec } => super::polls::create(tx, room, by, spec).await,
        WriteOp::PollState {
            room,
            poll,
            target,
            words,
        } => super::polls::set_state(tx, cfg, room, poll, *target, *words, fx).await,
        WriteOp::PollResults { room, poll, words } => {
            super::polls::publish_results(tx, room, poll, *words).await
        }
        WriteOp::PollAnswer {
            room,
            poll,
            user,
            name,
            choices,
            text,
        } => super::polls::answer(tx, room, poll, user, name, choices, text.as_deref()).await,
        _ => Err(StoreError::Corrupt(
            "apply_poll was given another kind of write".into(),
        )),
    }
}

/// Check-ins, helpful marks, the class state, presence and members.
async fn apply_room(Apply { tx, cfg, fx }: Apply<'_, '_>, op: &WriteOp) -> Result<Applied> {
    match op {
        WriteOp::Checkin { room, user, tz } => {
            engagement::checkin(tx, cfg, room, user, tz.as_deref(), fx).await
        }
        WriteOp::Helpful {
            room,
            question,
            answer,
            by,
            as_moderator,
            on,
        } => {
            engagement::helpful(
                tx,
                cfg,
                room,
                question,
                answer.as_deref(),
                by,
                *as_moderator,
                *on,
                fx,
            )
            .await
        }
        WriteOp::ClassState {
            room,
            target,
            reopen,
        } => super::class::change(tx, room, *target, *reopen).await,
        // Recorded in bulk by the batch (see `record_members` and `class::record_presence`).
        WriteOp::Presence { .. } | WriteOp::EnsureMember { .. } => Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        }),
        _ => Err(StoreError::Corrupt(
            "apply_room was given another kind of write".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_synced_a_missing_or_bad_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t.db-wal");
        std::fs::write(&log, b"frames").unwrap();
        sync_log(&log).expect("an existing log syncs");
        sync_log(&dir.path().join("gone-wal")).expect_err("a log that is not there fails");
        sync_log(&log.join("x")).expect_err("a log that cannot be opened fails");
    }

    /// A batch that ran `Unchanged`, with its submitter's receiver and the done signal's.
    fn one_batch() -> (
        Committed,
        oneshot::Receiver<Result<WriteOutcome>>,
        oneshot::Receiver<()>,
    ) {
        let (reply, answer) = oneshot::channel();
        let (done, finished) = oneshot::channel();
        let applied = Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        };
        let batch = Committed {
            replies: vec![reply],
            order: vec![0],
            results: vec![(Ok((applied, Effects::default())), Effects::default())],
            batch_fx: Effects::default(),
            done,
        };
        (batch, answer, finished)
    }

    #[tokio::test]
    async fn a_batch_is_answered_after_its_log_sync_and_never_when_the_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t.db-wal");
        std::fs::write(&log, b"frames").unwrap();
        for (path, syncs) in [(log.clone(), true), (log.join("x"), false)] {
            let metrics = Arc::new(Metrics::default());
            let publisher = Publisher {
                hook: None,
                badge_hook: Arc::default(),
            };
            let (tx, rx) = mpsc::channel(1);
            let publishing = tokio::spawn(publish_all(rx, publisher, Some(path), metrics.clone()));
            let (batch, answer, finished) = one_batch();
            assert!(tx.send(batch).await.is_ok());
            let answered = answer.await;
            let done = finished.await;
            drop(tx);
            publishing.await.unwrap();
            let text = metrics.render(0, 0, &[]);
            let counted = text.contains("studyhall_store_log_sync_seconds_count 1");
            if syncs {
                assert!(matches!(answered, Ok(Ok(WriteOutcome::Unchanged))));
                assert!(done.is_ok() && counted, "synced, then answered and done");
            } else {
                assert!(answered.is_err(), "no answer without a sync");
                assert!(done.is_err(), "the writer hears the publisher is gone");
                assert!(!counted);
            }
        }
    }

    #[test]
    fn ids_made_later_here_sort_later_even_within_one_millisecond() {
        let mut last = time_ordered_id('r', 1_000);
        for i in 0..2_000 {
            // The same millisecond, and a clock that went back: still after the last one.
            let id = time_ordered_id('r', if i % 2 == 0 { 1_000 } else { 999 });
            assert!(id > last, "{id} after {last}");
            assert_eq!(id.len(), 23);
            last = id;
        }
        // (Other tests make ids meanwhile: they only move the last one on.)
        let later = time_ordered_id('r', now_ms());
        assert!(later > last);
    }
}
