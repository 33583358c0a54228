//! The hub: which sessions are connected, which have joined which room, who is online where,
//! and fan-out. An event is encoded once and the same bytes are `try_send`-ed into each
//! member's bounded outbox; a full outbox marks that session for closing with 4008 and never
//! slows the others. A session that joins with replay is "gated": live events are held for it
//! until its replay from the store has been queued, then released without duplicates, at the
//! pace the client reads, after one `presence` per user whose state changed meanwhile.
//! The hub does no I/O and never awaits while holding a map guard. It knows nothing of SQL,
//! tokens or sockets (only the frame type the sockets take).

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Refused};
use crate::protocol::{
    self, Listed, OnlineList, PresenceState, RoomId, RoomRole, ServerMsg, SessionId, ShownRole,
    UserId, UserRef, close,
};
use crate::store::{CommittedEvent, now_ms};
use dashmap::DashMap;
use std::collections::HashMap;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::Notify;

pub use crate::outbox::{Frame, Outgoing};

/// A session's close code: 0 while it may go on, then the first code asked for. Its tasks wait
/// on it. One atomic and one wait list: a watch channel would carry a dozen wait lists, about
/// 400 bytes per connection.
#[derive(Debug, Default)]
pub struct CloseSignal {
    code: std::sync::atomic::AtomicU16,
    changed: Notify,
}

impl CloseSignal {
    /// The code asked for; 0 while none was.
    pub fn code(&self) -> u16 {
        self.code.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks for `code` unless a code was asked for already; wakes the waiters if it was set.
    fn set(&self, code: u16) {
        let first = self
            .code
            .compare_exchange(
                0,
                code,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok();
        if first {
            self.changed.notify_waiters();
        }
    }

    /// Resolves once the code satisfies `pred`.
    pub async fn wait_for(&self, pred: impl Fn(u16) -> bool) {
        loop {
            // Registered before the check, so a code set in between still wakes this wait.
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if pred(self.code()) {
                return;
            }
            notified.await;
        }
    }
}

/// What the hub holds of a session: where to queue frames and how to close it.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    pub user: UserId,
    /// This device takes a second call while in one (call waiting).
    pub call_waiting: bool,
    outbox: Outbox,
    /// 0 while open; the close code once the session must end. Watched by its tasks.
    close: Arc<CloseSignal>,
    /// When the client was last heard from (ms), for the heartbeat round's idle check.
    last_heard: std::sync::atomic::AtomicI64,
}

impl SessionHandle {
    pub fn new(id: SessionId, user: UserId, outbox: Outbox) -> (Arc<Self>, Arc<CloseSignal>) {
        Self::with_call_waiting(id, user, outbox, false)
    }

    pub fn with_call_waiting(
        id: SessionId,
        user: UserId,
        outbox: Outbox,
        call_waiting: bool,
    ) -> (Arc<Self>, Arc<CloseSignal>) {
        let close = Arc::new(CloseSignal::default());
        let rx = close.clone();
        (
            Arc::new(Self {
                id,
                user,
                call_waiting,
                outbox,
                close,
                last_heard: std::sync::atomic::AtomicI64::new(crate::store::now_ms()),
            }),
            rx,
        )
    }

    /// Notes that the client was heard from (a frame read, or a reply it waited for).
    pub fn heard(&self, now_ms: i64) {
        self.last_heard.store(now_ms, Relaxed);
    }

    /// Asks the session to close with `code`; the first code asked for wins.
    pub fn close(&self, code: u16) {
        self.close.set(code);
        // A parked write loop must see it too.
        self.outbox.wake();
    }

    /// The close code asked for; 0 while the session may go on.
    pub fn close_code(&self) -> u16 {
        self.close.code()
    }

    /// The session's close signal, for a task that waits on it.
    pub fn close_signal(&self) -> Arc<CloseSignal> {
        self.close.clone()
    }

    /// Resolves once a close is asked for.
    pub async fn closed(&self) {
        self.close.wait_for(|c| c != 0).await;
    }

    /// Queues a frame without waiting. A full outbox closes the session as a slow consumer.
    fn offer(&self, frame: &Frame, metrics: &Metrics) -> bool {
        self.offer_as(frame, false, metrics)
    }

    fn offer_as(&self, frame: &Frame, lazy: bool, metrics: &Metrics) -> bool {
        let out = Outgoing {
            frame: frame.clone(),
            lazy,
        };
        match self.outbox.try_send(out) {
            Ok(()) => true,
            Err(Refused::Full(_)) => {
                if self.close.code() == 0 {
                    metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                    tracing::info!(session = %self.id, user = %self.user, "slow consumer, closing 4008");
                }
                self.close(close::SLOW_CONSUMER);
                false
            }
            Err(Refused::Closed) => false,
        }
    }
}

struct Member {
    handle: Arc<SessionHandle>,
    user: UserRef,
    /// Host or TA in this room: receives the full rendering of restricted events.
    moderator: bool,
    /// `Some` while the session's replay is being queued: live frames wait here.
    gate: Option<Gate>,
    /// The highest room seq queued to this session. A sequenced frame at or below it is a
    /// duplicate and is dropped: an event can be committed, read by a joining session's
    /// replay, and only then published.
    last_seq: i64,
    /// The room's presence clock when this session joined: its join reply listed who was
    /// online then, so only presence changes after it are news to it.
    presence_seen: u64,
}

/// What waits for a gated session: the live frames held for it and, while it hears per-user
/// presence, who was online when it joined.
#[derive(Default)]
struct Gate {
    /// Live frames with their seq (unsequenced frames such as typing carry `None`).
    held: VecDeque<(Option<i64>, Outgoing)>,
    /// Who was online when the session joined (all of them, sorted by id; its reply listed
    /// the first `presence_limit`), while it hears per-user presence: presence rounds pass the
    /// session by, and the gate's opening tells it the net difference instead (one frame per
    /// user whose being online changed, however often the room churned).
    shown: Option<Arc<[Arc<Listed>]>>,
    /// How many of that difference's frames are still at the front of `held`: they do not
    /// count against the gate's cap.
    extra: usize,
}

/// A user whose presence changed since the room last heard of them.
struct PendingPresence {
    user: UserRef,
    /// What the room last heard: online or not.
    announced: bool,
    online: bool,
    /// The room's presence clock at the first change of this round: a session that joined
    /// after it may have been told the other state in its join reply.
    since: u64,
    /// The room's presence clock at the last change.
    at: u64,
}

#[derive(Default)]
struct RoomState {
    sessions: HashMap<SessionId, Member>,
    /// Users online in the room (by id, so a join reply lists the first ones cheaply) and how
    /// many of their sessions have joined it.
    online: BTreeMap<UserId, (Arc<Listed>, usize)>,
    /// A `live` room: its audience hears who is online as a count, not user by user.
    live: bool,
    /// The last `online_count` sent to the room.
    count_sent: Option<usize>,
    /// Presence changes not yet announced, by user: gathered for `presence_interval_ms` so each
    /// period announces only the net change (someone who drops and resumes within it is never
    /// announced gone).
    presence_pending: HashMap<UserId, PendingPresence>,
    /// Counts presence changes (see `Member::presence_seen`).
    presence_clock: u64,
    /// Raised hands in raise order, with when they went up (ms).
    hands: Vec<(UserRef, i64)>,
    /// Users allowed to publish audio/video, in the order they went on stage.
    stage: Vec<UserRef>,
    /// When each user on stage went on (ms): their continuous time there, for the talk-time
    /// cap. Entries of users no longer on stage are stale and replaced when they go on again.
    stage_since: HashMap<UserId, i64>,
    /// The highest seq fanned out to the room, once known: from the store at the room's first
    /// join here, then from every event published (in seq order).
    published: Option<i64>,
    /// Which life of the room on this node this is: the room's state is dropped when its last
    /// session leaves, and what was published meanwhile was not seen here.
    era: u64,
    /// The seq of the last event published here that changes what a join snapshot shows (see
    /// [`crate::protocol::changes_join_snapshot`]); 0 if none in this era.
    snapshot_changed: i64,
    /// The latest events published here, for resumes (see [`Recent`]).
    recent: Recent,
}

/// A room's latest events as published here, in both renderings, so that a resume replays
/// them from memory instead of reading the store: seqs without a gap, up to `cap` bytes, the
/// oldest dropped first. An event that changes the stored copy of an earlier one (an edit, a
/// delete, a reaction: see [`crate::protocol::rewrites_history`]) empties it first, since a
/// replay shows messages as they are stored now; it then starts again from that event.
#[derive(Debug, Default)]
struct Recent {
    events: VecDeque<RecentEvent>,
    /// The bytes of the frames held, plus [`RECENT_OVERHEAD`] per event.
    bytes: usize,
}

#[derive(Debug)]
struct RecentEvent {
    seq: i64,
    frame: Frame,
    /// What members who are not host/ta see, when that differs.
    public: Option<Frame>,
}

/// What an event costs [`Recent`] besides its frames' bytes (the entry and the frames' heads).
const RECENT_OVERHEAD: usize = 96;

impl RecentEvent {
    fn size(&self) -> usize {
        self.frame.len() + self.public.as_ref().map_or(0, |p| p.len()) + RECENT_OVERHEAD
    }
}

impl Recent {
    /// Keeps event `seq`, published after the ones held; at most `cap` bytes stay held.
    fn record(&mut self, seq: i64, frame: &Frame, public: Option<&Frame>, cap: usize) {
        let next = self.events.back().map(|e| e.seq + 1);
        let rewrites = crate::protocol::rewrites_history(frame.as_str());
        if next.is_some_and(|n| seq < n) {
            // Published before (fan-out drops it as a duplicate); what it rewrote, if anything,
            // is not known to be rewritten in what is held.
            if rewrites {
                self.clear();
            }
            return;
        }
        if rewrites || next.is_some_and(|n| seq != n) {
            self.clear();
        }
        let event = RecentEvent {
            seq,
            frame: frame.clone(),
            public: public.cloned(),
        };
        let size = event.size();
        if size > cap {
            self.clear();
            return;
        }
        self.events.push_back(event);
        self.bytes += size;
        while self.bytes > cap {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.size();
        }
    }

    fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
    }
}

/// A resume's replay served from memory (see [`Hub::replay`]).
#[derive(Debug, Default, PartialEq)]
pub struct Replay {
    /// The events after the resume's seq, oldest first, as the session's role sees them.
    pub frames: Vec<Frame>,
    /// The seq of the last of them; `None` when there are none.
    pub last: Option<i64>,
    /// More events than the limit asked for: the client must page the history instead.
    pub gap: bool,
}

/// Which sessions of a room a frame is for.
#[derive(Clone, Copy)]
enum Audience<'a> {
    Everyone,
    Others(&'a UserId),
    /// Host/TA sessions of users other than this one.
    OtherModerators(&'a UserId),
    /// Host/TA sessions, plus every session of this user if given.
    Moderators(Option<&'a UserId>),
    User(&'a UserId),
    /// Every session but this one (a board message goes to the room's other sessions).
    OtherSessions(&'a SessionId),
}

/// Who a room notice is for, owned: how notices travel to other nodes (cluster mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeTo {
    Everyone,
    Others(UserId),
    Moderators(Option<UserId>),
    User(UserId),
}

impl NoticeTo {
    fn audience(&self) -> Audience<'_> {
        match self {
            Self::Everyone => Audience::Everyone,
            Self::Others(u) => Audience::Others(u),
            Self::Moderators(u) => Audience::Moderators(u.as_ref()),
            Self::User(u) => Audience::User(u),
        }
    }
}

/// What the hub did locally that other nodes must repeat for their sessions (cluster mode).
#[derive(Clone, Debug)]
pub enum Relayed {
    /// An unsequenced room frame (typing, muted, slow_mode, report, question_overdue).
    Notice {
        room: RoomId,
        frame: Frame,
        to: NoticeTo,
    },
    /// `kicked` then close 4003 for the user's sessions in the room.
    Kick {
        room: RoomId,
        user: UserId,
        reason: String,
    },
    /// A hand went up (with when) or down.
    Hand {
        room: RoomId,
        user: UserRef,
        raised: bool,
        ts: i64,
    },
    /// A user went on or off stage.
    Stage {
        room: RoomId,
        user: UserRef,
        on: bool,
    },
}

/// Where the hub sends what other nodes must repeat: a bounded channel that the cluster
/// broker drains (none on a single node). Lossy like the bus behind it: a relay that finds
/// the channel full is dropped.
pub type RelaySender = tokio::sync::mpsc::Sender<Relayed>;

impl Audience<'_> {
    fn includes(&self, m: &Member) -> bool {
        match self {
            Self::Everyone => true,
            Self::Others(u) => &m.user.id != *u,
            Self::OtherModerators(u) => m.moderator && &m.user.id != *u,
            Self::Moderators(u) => m.moderator || u.is_some_and(|u| &m.user.id == u),
            Self::User(u) => &m.user.id == *u,
            Self::OtherSessions(s) => &m.handle.id != *s,
        }
    }
}

impl RoomState {
    /// Takes `user`'s hand down, if raised, and tells host/ta (and `user`'s own sessions when
    /// they are still here). The user, if the hand was up.
    fn lower_hand(
        &mut self,
        room: &RoomId,
        user: &UserId,
        tell_user: bool,
        out: Out<'_>,
    ) -> Option<UserRef> {
        let pos = self.hands.iter().position(|(u, _)| &u.id == user)?;
        let (who, _) = self.hands.remove(pos);
        let frame = Frame::from(protocol::encode(&ServerMsg::Hand {
            room,
            user: &who,
            raised: false,
        }));
        let to = Audience::Moderators(tell_user.then_some(user));
        self.fan_out(&frame, None, None, to, out);
        Some(who)
    }

    /// Tells everyone in the room that the user went on or off stage.
    fn stage_changed(&mut self, room: &RoomId, user: &UserRef, on: bool, out: Out<'_>) {
        let frame = Frame::from(protocol::encode(&ServerMsg::Stage { room, user, on }));
        self.fan_out(&frame, None, None, Audience::Everyone, out);
    }

    /// Tells host/ta (and the user) that the user's hand went up.
    fn hand_raised(&mut self, room: &RoomId, user: &UserRef, out: Out<'_>) {
        let frame = Frame::from(protocol::encode(&ServerMsg::Hand {
            room,
            user,
            raised: true,
        }));
        let to = Audience::Moderators(Some(&user.id));
        self.fan_out(&frame, None, None, to, out);
    }

    /// Who hears that `user` came or went: host/ta of a live room; in other rooms everyone
    /// else while no more than `limit` users are online here. `None`: nobody (the sessions
    /// that do not hear it learn the change from the next `online_count`).
    fn presence_audience<'u>(&self, user: &'u UserId, limit: usize) -> Option<Audience<'u>> {
        if self.live {
            Some(Audience::OtherModerators(user))
        } else if self.online.len() <= limit {
            Some(Audience::Others(user))
        } else {
            None
        }
    }

    /// Whether a session (host/ta: `moderator`) hears per-user presence now: see
    /// [`RoomState::presence_audience`].
    fn hears_presence(&self, moderator: bool, limit: usize) -> bool {
        if self.live {
            moderator
        } else {
            self.online.len() <= limit
        }
    }

    /// Whether some of the room's sessions follow its online users by `online_count`.
    fn counts_online(&self, limit: usize) -> bool {
        self.live || self.online.len() > limit
    }

    /// Tells the room's presence audience where `p.user` now stands: sessions that joined
    /// before the last change, except, when the user is back where the room last heard them,
    /// those that joined before the first change (for them nothing changed). Sessions that
    /// joined after the last change already know from their join reply.
    fn announce_presence(
        &mut self,
        room: &RoomId,
        p: &PendingPresence,
        limit: usize,
        out: Out<'_>,
    ) -> u64 {
        let Some(to) = self.presence_audience(&p.user.id, limit) else {
            return 0;
        };
        let frame = Frame::from(protocol::encode(&ServerMsg::Presence {
            room,
            user: &p.user,
            state: if p.online {
                PresenceState::Online
            } else {
                PresenceState::Offline
            },
        }));
        let from = if p.online == p.announced { p.since } else { 0 };
        let mut delivered = 0;
        for m in self.sessions.values_mut() {
            let news = (from..p.at).contains(&m.presence_seen) && !m.awaits_presence_diff();
            if news && to.includes(m) && deliver(m, &frame, None, true, out) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Records that `user` came (`online`) or went, to announce at the next presence round;
    /// true if the room has something to announce now.
    fn presence_change(&mut self, user: &UserRef, online: bool) -> bool {
        self.presence_clock += 1;
        let at = self.presence_clock;
        match self.presence_pending.entry(user.id.clone()) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                // Kept even when back to what the room last heard: sessions that joined in
                // between were told otherwise.
                let p = e.get_mut();
                p.online = online;
                p.user = user.clone();
                p.at = at;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(PendingPresence {
                    user: user.clone(),
                    announced: !online,
                    online,
                    since: at,
                    at,
                });
            }
        }
        true
    }

    /// The pending presence changes this round announces: all of them, or the `max` oldest.
    fn take_presence_round(&mut self, max: usize) -> Vec<PendingPresence> {
        if self.presence_pending.len() <= max {
            return std::mem::take(&mut self.presence_pending)
                .into_values()
                .collect();
        }
        let mut oldest: Vec<(u64, UserId)> = self
            .presence_pending
            .iter()
            .map(|(u, p)| (p.since, u.clone()))
            .collect();
        oldest.select_nth_unstable(max - 1);
        oldest.truncate(max);
        oldest
            .into_iter()
            .filter_map(|(_, u)| self.presence_pending.remove(&u))
            .collect()
    }

    /// Online users here and on other nodes (`remote`), counted once each.
    fn online_count(&self, remote: Option<&HashMap<UserId, UserRef>>) -> usize {
        let elsewhere = remote.map_or(0, |r| {
            r.keys().filter(|u| !self.online.contains_key(*u)).count()
        });
        self.online.len() + elsewhere
    }

    /// Queues `frame` to the sessions in `to`; host/ta get `frame`, others `public` if given.
    fn fan_out(
        &mut self,
        frame: &Frame,
        public: Option<&Frame>,
        seq: Option<i64>,
        to: Audience<'_>,
        out: Out<'_>,
    ) -> u64 {
        self.queue(frame, public, seq, to, false, out)
    }

    /// Queues an unsequenced frame that may wait for the session's next write (presence,
    /// online counts, typing).
    fn fan_out_lazy(&mut self, frame: &Frame, to: Audience<'_>, out: Out<'_>) -> u64 {
        self.queue(frame, None, None, to, true, out)
    }

    fn queue(
        &mut self,
        frame: &Frame,
        public: Option<&Frame>,
        seq: Option<i64>,
        to: Audience<'_>,
        lazy: bool,
        out: Out<'_>,
    ) -> u64 {
        let mut delivered = 0;
        for m in self.sessions.values_mut() {
            if !to.includes(m) {
                continue;
            }
            let frame = match public {
                Some(p) if !m.moderator => p,
                _ => frame,
            };
            if deliver(m, frame, seq, lazy, out) {
                delivered += 1;
            }
        }
        delivered
    }
}

/// The first `limit` users online in the room by id, here and on other nodes (`remote`).
fn online_list(
    state: &RoomState,
    remote: Option<&HashMap<UserId, UserRef>>,
    limit: usize,
) -> Vec<Arc<Listed>> {
    let mut list: Vec<Arc<Listed>> = state
        .online
        .values()
        .take(limit)
        .map(|(u, _)| u.clone())
        .collect();
    if let Some(r) = remote {
        list.extend(
            r.values()
                .filter(|u| !state.online.contains_key(&u.id))
                .map(|u| Listed::new(u.clone())),
        );
        list.sort_by(|a, b| a.user.id.cmp(&b.user.id));
        list.truncate(limit);
    }
    list
}

/// The `presence` frames that bring a session from `shown` (who was online at its join)
/// to `now`, both sorted by user id; nothing about `me`.
fn presence_diff(
    room: &RoomId,
    shown: &[Arc<Listed>],
    now: &[Arc<Listed>],
    me: &UserId,
) -> Vec<Frame> {
    let frame = |user: &UserRef, online: bool| {
        let state = if online {
            PresenceState::Online
        } else {
            PresenceState::Offline
        };
        Frame::from(protocol::encode(&ServerMsg::Presence { room, user, state }))
    };
    let (mut was, mut is) = (shown.iter().peekable(), now.iter().peekable());
    let mut frames = Vec::new();
    loop {
        let (user, online) = match (was.peek(), is.peek()) {
            (None, None) => break,
            (Some(a), Some(b)) if a.user.id == b.user.id => {
                was.next();
                is.next();
                continue;
            }
            (Some(a), Some(b)) if a.user.id < b.user.id => (was.next(), false),
            (Some(_), None) => (was.next(), false),
            _ => (is.next(), true),
        };
        if let Some(u) = user
            && &u.user.id != me
        {
            frames.push(frame(&u.user, online));
        }
    }
    frames
}

impl Member {
    /// Gated, and told who is online only when the gate opens (as a difference from its join).
    fn awaits_presence_diff(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.shown.is_some())
    }
}

/// Queues one frame to one member: held while its gate is up, dropped if its seq was already
/// queued; true if it went into the outbox.
fn deliver(m: &mut Member, frame: &Frame, seq: Option<i64>, lazy: bool, out: Out<'_>) -> bool {
    match &mut m.gate {
        Some(gate) => {
            if gate.held.len() >= out.gate_cap + gate.extra {
                if m.handle.close_code() == 0 {
                    out.metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                }
                m.handle.close(close::SLOW_CONSUMER);
            } else {
                let frame = frame.clone();
                gate.held.push_back((seq, Outgoing { frame, lazy }));
            }
            false
        }
        None => {
            if let Some(s) = seq {
                if s <= m.last_seq {
                    return false;
                }
                m.last_seq = s;
            }
            m.handle.offer_as(frame, lazy, out.metrics)
        }
    }
}

/// What fan-out needs from the hub: the gate's limit and the counters.
#[derive(Clone, Copy)]
struct Out<'a> {
    gate_cap: usize,
    metrics: &'a Metrics,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("this user already has the maximum of {0} sessions")]
    TooManySessions(usize),
    #[error("the room is full ({0} sessions)")]
    RoomFull(usize),
}

/// The result of a join: who is online (the joiner included), who is on stage, and (for
/// host/ta) the raised hands.
pub struct Joined {
    /// Online users, sorted by id, at most the presence limit, encoded for the reply.
    pub online: OnlineList,
    pub online_count: usize,
    pub stage: Vec<UserRef>,
    pub hands: Vec<(UserRef, i64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StageError {
    #[error("that user is not in the room")]
    NotInRoom,
    #[error("the stage is full ({0} people)")]
    Full(usize),
}

pub struct Hub {
    rooms: DashMap<RoomId, RoomState>,
    users: DashMap<UserId, Vec<Arc<SessionHandle>>>,
    /// Every signed-in session, for directed delivery (calls and signals).
    sessions: DashMap<SessionId, Arc<SessionHandle>>,
    metrics: Arc<Metrics>,
    max_sessions_per_user: usize,
    max_room_sessions: usize,
    /// Above this many online users a room stops sending per-user presence and typing (the
    /// join reply still counts them): otherwise a big live room costs O(n^2) frames to fill.
    presence_limit: usize,
    /// Most users whose presence change a room announces in one round (the rest wait).
    presence_round_max: usize,
    /// Most frames held for a gated session before it counts as a slow consumer.
    gate_cap: usize,
    // -- cluster mode: fed by the cluster broker; empty on a single node --
    /// Carries notices, kicks, hands and stage changes to the other nodes.
    relay: Option<RelaySender>,
    /// Users online in a room on other nodes (the union over the other nodes' heartbeats).
    remote_online: DashMap<RoomId, HashMap<UserId, UserRef>>,
    /// Sessions of a user on other nodes, with their call-waiting flag.
    remote_sessions: DashMap<UserId, Vec<(String, bool)>>,
    /// Woken when local presence changes, so the bus sends a heartbeat soon.
    pub presence_changed: Notify,
    /// Rooms whose online count changed since the last `online_count` round.
    counts_due: std::sync::Mutex<HashSet<RoomId>>,
    /// Rooms with presence changes for the next presence round.
    presence_due: std::sync::Mutex<HashSet<RoomId>>,
    /// The last era given to a room's state (see [`SnapshotMark`]).
    eras: std::sync::atomic::AtomicU64,
    /// Most bytes of recent events each room keeps for resumes (see [`Recent`]); 0: none.
    replay_cache_bytes: usize,
}

/// Where a room's events stand on this node, for caches of what a join snapshot shows: a copy
/// read from the store when the mark was `m` is still good at mark `now` if
/// [`SnapshotMark::still_good`] says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotMark {
    era: u64,
    /// The highest seq published here.
    published: i64,
    /// The seq of the last published event that changes a join snapshot.
    changed: i64,
}

impl SnapshotMark {
    /// Whether what was read from the store after `self` was taken still holds at `now`: the
    /// room has lived on this node since, and no event published after `self` changed it
    /// (every event up to `self.published` had committed before the read).
    pub fn still_good(&self, now: &SnapshotMark) -> bool {
        self.era == now.era && now.changed <= self.published
    }
}

impl Hub {
    pub fn new(
        metrics: Arc<Metrics>,
        max_sessions_per_user: usize,
        max_room_sessions: usize,
        gate_cap: usize,
    ) -> Self {
        Self {
            rooms: DashMap::new(),
            users: DashMap::new(),
            sessions: DashMap::new(),
            metrics,
            max_sessions_per_user,
            max_room_sessions,
            presence_limit: usize::MAX,
            presence_round_max: usize::MAX,
            gate_cap,
            relay: None,
            remote_online: DashMap::new(),
            remote_sessions: DashMap::new(),
            presence_changed: Notify::new(),
            counts_due: std::sync::Mutex::default(),
            presence_due: std::sync::Mutex::default(),
            eras: std::sync::atomic::AtomicU64::new(0),
            replay_cache_bytes: 0,
        }
    }

    fn out(&self) -> Out<'_> {
        Out {
            gate_cap: self.gate_cap,
            metrics: &self.metrics,
        }
    }

    /// Sends what other nodes must repeat to `relay` (cluster mode).
    pub fn with_relay(mut self, relay: RelaySender) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Sets the room size above which presence and typing are not broadcast.
    pub fn with_presence_limit(mut self, limit: usize) -> Self {
        self.presence_limit = limit;
        self
    }

    /// Sets how many users' presence changes one round may announce per room.
    pub fn with_presence_round_max(mut self, max: usize) -> Self {
        self.presence_round_max = max.max(1);
        self
    }

    /// Sets how many bytes of its latest events each room keeps to replay resumes from.
    pub fn with_replay_cache(mut self, bytes: usize) -> Self {
        self.replay_cache_bytes = bytes;
        self
    }

    pub fn sessions(&self) -> usize {
        self.users.iter().map(|u| u.len()).sum()
    }

    pub fn active_rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Admits a signed-in session, within the per-user session limit.
    pub fn register(&self, handle: Arc<SessionHandle>) -> Result<(), HubError> {
        let remote = self
            .remote_sessions
            .get(&handle.user)
            .map_or(0, |s| s.len());
        let mut entry = self.users.entry(handle.user.clone()).or_default();
        if entry.len() + remote >= self.max_sessions_per_user {
            return Err(HubError::TooManySessions(self.max_sessions_per_user));
        }
        self.sessions.insert(handle.id.clone(), handle.clone());
        entry.push(handle);
        drop(entry);
        self.presence_changed.notify_one();
        Ok(())
    }

    pub fn unregister(&self, handle: &SessionHandle) {
        self.sessions.remove(&handle.id);
        self.users.remove_if_mut(&handle.user, |_, sessions| {
            sessions.retain(|s| s.id != handle.id);
            sessions.is_empty()
        });
        self.presence_changed.notify_one();
    }

    /// Joins `handle` to `room`, gated: live events are held until [`Hub::open_gate`].
    /// Re-joining a room the session is already in re-gates it (a resync). `live`: the room
    /// is of kind `live` (its audience follows presence by count).
    pub fn join(
        &self,
        room: &RoomId,
        handle: &Arc<SessionHandle>,
        user: UserRef,
        moderator: bool,
        live: bool,
    ) -> Result<Joined, HubError> {
        let mut state = self.rooms.entry(room.clone()).or_insert_with(|| RoomState {
            era: self.eras.fetch_add(1, Relaxed) + 1,
            ..RoomState::default()
        });
        let state = &mut *state;
        state.live = live;
        if let Some(m) = state.sessions.get_mut(&handle.id) {
            // A resync: the role may have changed since the first join.
            m.gate.get_or_insert_with(Gate::default);
            m.moderator = moderator;
            m.user = user.clone();
            if let Some(entry) = state.online.get_mut(&user.id) {
                entry.0 = Listed::new(user.clone());
            }
        } else {
            self.add_member(room, state, handle, &user, moderator)?;
        }
        let remote_guard = self.remote_online.get(room);
        let remote = remote_guard.as_deref();
        let online_count = state.online_count(remote);
        // What the gate's opening compares with: everyone online now, not only the reply's
        // first `presence_limit` (a user past that cut is not gone).
        let shown: Option<Arc<[Arc<Listed>]>> = state
            .hears_presence(moderator, self.presence_limit)
            .then(|| online_list(state, remote, usize::MAX).into());
        let limit = self.presence_limit;
        let online = if live && !moderator {
            let view = self.audience_view(state, remote);
            OnlineList::new(view.iter().map(|u| &**u))
        } else if let Some(all) = &shown {
            OnlineList::new(all.iter().take(limit).map(|u| &**u))
        } else if remote.is_none() {
            // The common big room: copied straight from the room's map, in one pass.
            OnlineList::new(state.online.values().take(limit).map(|(u, _)| &**u))
        } else {
            let view = online_list(state, remote, limit);
            OnlineList::new(view.iter().map(|u| &**u))
        };
        drop(remote_guard);
        if let Some(gate) = state
            .sessions
            .get_mut(&handle.id)
            .and_then(|m| m.gate.as_mut())
        {
            gate.shown = shown;
        }
        let hands = if moderator {
            state.hands.clone()
        } else {
            Vec::new()
        };
        Ok(Joined {
            online,
            online_count,
            stage: state.stage.clone(),
            hands,
        })
    }

    /// A new session in the room (within `max_room_sessions`), gated; the user's first
    /// session here makes them online (presence and counts become due).
    fn add_member(
        &self,
        room: &RoomId,
        state: &mut RoomState,
        handle: &Arc<SessionHandle>,
        user: &UserRef,
        moderator: bool,
    ) -> Result<(), HubError> {
        if state.sessions.len() >= self.max_room_sessions {
            return Err(HubError::RoomFull(self.max_room_sessions));
        }
        state.sessions.insert(
            handle.id.clone(),
            Member {
                handle: handle.clone(),
                user: user.clone(),
                moderator,
                gate: Some(Gate::default()),
                last_seq: 0,
                presence_seen: state.presence_clock,
            },
        );
        let first = match state.online.entry(user.id.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().1 += 1;
                false
            }
            Entry::Vacant(e) => {
                e.insert((Listed::new(user.clone()), 1));
                true
            }
        };
        if first {
            self.presence_changed.notify_one();
            if !self.online_elsewhere(room, &user.id) {
                if state.presence_change(user, true) {
                    self.due(&self.presence_due, room);
                }
                if state.counts_online(self.presence_limit) {
                    self.due(&self.counts_due, room);
                }
            }
        }
        Ok(())
    }

    /// Who the audience of a live room sees online: who runs it and who is on stage (here and
    /// on other nodes), by id, at most `presence_limit`; the rest is a count.
    fn audience_view(
        &self,
        state: &RoomState,
        remote: Option<&HashMap<UserId, UserRef>>,
    ) -> Vec<Arc<Listed>> {
        let visible = |u: &UserRef| {
            u.role.room().is_some_and(RoomRole::can_moderate)
                || state.stage.iter().any(|s| s.id == u.id)
        };
        let mut list: Vec<Arc<Listed>> = state
            .online
            .values()
            .map(|(u, _)| u)
            .filter(|u| visible(&u.user))
            .cloned()
            .chain(
                remote
                    .iter()
                    .flat_map(|r| r.values())
                    .filter(|u| visible(u))
                    .map(|u| Listed::new(u.clone())),
            )
            .collect();
        list.sort_by(|a, b| a.user.id.cmp(&b.user.id));
        list.dedup_by(|a, b| a.user.id == b.user.id);
        list.truncate(self.presence_limit);
        list
    }

    /// Opens a gated session's gate: frames held with seq <= `delivered_seq` were already sent
    /// by the replay and are dropped; the rest go to its outbox in order, after a `presence`
    /// frame for each user whose being online changed since the session joined (when it hears
    /// per-user presence). A frame the outbox has no room for is handed back, the gate
    /// still up (what arrives meanwhile queues behind it): the caller waits for room, queues
    /// it, and calls again, until `None` says the gate is open.
    pub fn open_gate(
        &self,
        room: &RoomId,
        session: &SessionId,
        delivered_seq: i64,
    ) -> Option<Outgoing> {
        let mut state = self.rooms.get_mut(room)?;
        let state = &mut *state;
        let m = state.sessions.get(session)?;
        let diff = match m.gate.as_ref()?.shown.as_ref() {
            Some(shown) if state.hears_presence(m.moderator, self.presence_limit) => {
                let remote = self.remote_online.get(room);
                let now = online_list(state, remote.as_deref(), usize::MAX);
                presence_diff(room, shown, &now, &m.user.id)
            }
            _ => Vec::new(),
        };
        let clock = state.presence_clock;
        let Member {
            gate,
            last_seq,
            handle,
            presence_seen,
            ..
        } = state.sessions.get_mut(session)?;
        let g = gate.as_mut()?;
        if g.shown.take().is_some() {
            // Rounds from now on tell it what changes after this.
            *presence_seen = clock;
            g.extra += diff.len();
            for frame in diff.into_iter().rev() {
                g.held.push_front((None, Outgoing { frame, lazy: true }));
            }
        }
        *last_seq = (*last_seq).max(delivered_seq);
        while let Some((seq, queued)) = g.held.pop_front() {
            g.extra = g.extra.saturating_sub(1);
            if let Some(s) = seq {
                if s <= *last_seq {
                    continue;
                }
                *last_seq = s;
            }
            match handle.outbox.try_send(queued) {
                Ok(()) => {}
                Err(Refused::Full(queued)) => return Some(queued),
                Err(Refused::Closed) => break,
            }
        }
        *gate = None;
        None
    }

    /// A session's role in a room changed while it is joined (a grant refreshed, a membership
    /// changed through the API): what it is shown and which rendering it gets follow at once.
    pub fn set_session_role(&self, room: &RoomId, session: &SessionId, role: RoomRole) {
        if let Some(mut state) = self.rooms.get_mut(room)
            && let Some(m) = state.sessions.get_mut(session)
        {
            m.moderator = role.can_moderate();
            m.user.role = role.into();
        }
    }

    /// Removes a session from a room; the user's last session leaving announces `offline`.
    pub fn leave(&self, room: &RoomId, session: &SessionId) -> bool {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return false;
        };
        let Some(member) = state.sessions.remove(session) else {
            return false;
        };
        let uid = member.user.id.clone();
        let last = match state.online.get_mut(&uid) {
            Some((_, n)) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                state.online.remove(&uid);
                true
            }
            None => false,
        };
        if last {
            self.presence_changed.notify_one();
            if !self.online_elsewhere(room, &uid) {
                if state.presence_change(&member.user, false) {
                    self.due(&self.presence_due, room);
                }
                if state.counts_online(self.presence_limit.saturating_sub(1)) {
                    self.due(&self.counts_due, room);
                }
            }
            // Hands and stage belong to people who are here (on any node).
            if !self.online_elsewhere(room, &uid) {
                if let Some(who) = state.lower_hand(room, &uid, false, self.out()) {
                    self.relay_with(|| Relayed::Hand {
                        room: room.clone(),
                        user: who,
                        raised: false,
                        ts: 0,
                    });
                }
                if let Some(pos) = state.stage.iter().position(|u| u.id == uid) {
                    state.stage.remove(pos);
                    self.relay_with(|| Relayed::Stage {
                        room: room.clone(),
                        user: member.user.clone(),
                        on: false,
                    });
                    state.stage_changed(room, &member.user, false, self.out());
                }
            }
        }
        let empty = state.sessions.is_empty();
        drop(state);
        if empty {
            self.rooms.remove_if(room, |_, s| s.sessions.is_empty());
        }
        true
    }

    /// Fans a committed room event out to every session in the room (host/ta get the full
    /// rendering, others the public one when it differs).
    pub fn publish(&self, ev: CommittedEvent) {
        let frame = Frame::from(ev.json);
        let public = ev.public_json.map(Frame::from);
        if let Some(mut state) = self.rooms.get_mut(&ev.room) {
            state.published = state.published.max(Some(ev.seq));
            if crate::protocol::changes_join_snapshot(frame.as_str()) {
                state.snapshot_changed = ev.seq;
            }
            if self.replay_cache_bytes > 0 {
                let cap = self.replay_cache_bytes;
                state.recent.record(ev.seq, &frame, public.as_ref(), cap);
            }
            let out = self.out();
            let n = state.fan_out(
                &frame,
                public.as_ref(),
                Some(ev.seq),
                Audience::Everyone,
                out,
            );
            self.metrics.deliveries.fetch_add(n, Relaxed);
        }
        self.metrics.events_published.fetch_add(1, Relaxed);
    }

    /// Notes that `room` has something for the next round of `set`'s kind (presence or
    /// online counts).
    fn due(&self, set: &std::sync::Mutex<HashSet<RoomId>>, room: &RoomId) {
        set.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(room.clone());
    }

    /// Announces the presence changes gathered since the last round (the net change per user:
    /// see `RoomState::presence_change`), at most `presence_round_max` users per room, oldest
    /// change first; the rest stay pending for the next round (where they may cancel out).
    /// Called every `presence_interval_ms`.
    pub fn send_presence(&self) {
        let due = std::mem::take(&mut *self.presence_due.lock().unwrap_or_else(|p| p.into_inner()));
        for room in due {
            let Some(mut state) = self.rooms.get_mut(&room) else {
                continue;
            };
            for p in state.take_presence_round(self.presence_round_max) {
                let out = self.out();
                let n = state.announce_presence(&room, &p, self.presence_limit, out);
                self.metrics.deliveries.fetch_add(n, Relaxed);
            }
            if !state.presence_pending.is_empty() {
                self.due(&self.presence_due, &room);
            }
        }
    }

    /// Sends `online_count` to every room whose count changed since the last call (and since
    /// it was last sent), for the sessions that follow it by count. Called every
    /// `online_count_ms`.
    pub fn send_online_counts(&self) {
        let due = std::mem::take(&mut *self.counts_due.lock().unwrap_or_else(|p| p.into_inner()));
        for room in due {
            let Some(mut state) = self.rooms.get_mut(&room) else {
                continue;
            };
            let count = state.online_count(self.remote_online.get(&room).as_deref());
            if state.count_sent == Some(count) {
                continue;
            }
            state.count_sent = Some(count);
            let frame = Frame::from(protocol::encode(&ServerMsg::OnlineCount {
                room: &room,
                count,
            }));
            let n = state.fan_out_lazy(&frame, Audience::Everyone, self.out());
            self.metrics.deliveries.fetch_add(n, Relaxed);
        }
    }

    /// The highest seq fanned out to the room on this node, if known (see
    /// [`Hub::note_published_seq`]).
    pub fn published_seq(&self, room: &RoomId) -> Option<i64> {
        self.rooms.get(room).and_then(|s| s.published)
    }

    /// A resume's replay from memory: the events after `after` (at most `limit`), as host/ta
    /// (`moderator`) or others see them, when this node holds every one of them up to the
    /// last published here; `None` when it does not, and the store must be read. Called after
    /// the session joined (gated): what is published later reaches the gate, and the gate
    /// drops what the replay already holds.
    pub fn replay(
        &self,
        room: &RoomId,
        after: i64,
        limit: usize,
        moderator: bool,
    ) -> Option<Replay> {
        let state = self.rooms.get(room)?;
        let published = state.published?;
        if after >= published {
            return Some(Replay::default());
        }
        let events = &state.recent.events;
        let (first, last) = (events.front()?.seq, events.back()?.seq);
        if first > after + 1 || last < published {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        let n = events.len() - skip.min(events.len());
        if n > limit {
            return Some(Replay {
                gap: true,
                ..Replay::default()
            });
        }
        let frames = events
            .range(events.len() - n..)
            .map(|e| match (&e.public, moderator) {
                (Some(p), false) => p.clone(),
                _ => e.frame.clone(),
            })
            .collect();
        Some(Replay {
            frames,
            last: Some(last),
            gap: false,
        })
    }

    /// Where the room's events stand here (see [`SnapshotMark`]); `None` while the room has no
    /// session here or its published seq is not known yet.
    pub fn snapshot_mark(&self, room: &RoomId) -> Option<SnapshotMark> {
        let state = self.rooms.get(room)?;
        Some(SnapshotMark {
            era: state.era,
            published: state.published?,
            changed: state.snapshot_changed,
        })
    }

    /// Records the room's last seq as read from the store by a join (while the room has
    /// sessions here, publishing keeps it current).
    pub fn note_published_seq(&self, room: &RoomId, seq: i64) {
        if let Some(mut state) = self.rooms.get_mut(room) {
            state.published = state.published.max(Some(seq));
        }
    }

    fn send(&self, room: &RoomId, frame: &Frame, to: Audience<'_>) -> u64 {
        let n = match self.rooms.get_mut(room) {
            Some(mut state) => state.fan_out(frame, None, None, to, self.out()),
            None => 0,
        };
        self.metrics.deliveries.fetch_add(n, Relaxed);
        n
    }

    /// Sends an unsequenced frame (typing) to the room's sessions of other users.
    pub fn notify_others(&self, room: &RoomId, from: &UserId, frame: &Frame) {
        self.typing_local(room, from, frame);
        self.relay_notice(room, frame, || NoticeTo::Others(from.clone()));
    }

    /// Typing goes where presence goes (see `RoomState::presence_audience`): host/ta of a
    /// live room, everyone else in a room under the presence limit.
    fn typing_local(&self, room: &RoomId, from: &UserId, frame: &Frame) {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(to) = state.presence_audience(from, self.presence_limit) {
            let n = state.fan_out_lazy(frame, to, self.out());
            self.metrics.deliveries.fetch_add(n, Relaxed);
        }
    }

    /// Sends an unsequenced frame to everyone in the room.
    pub fn notify_all(&self, room: &RoomId, frame: &Frame) {
        self.send(room, frame, Audience::Everyone);
        self.relay_notice(room, frame, || NoticeTo::Everyone);
    }

    /// Sends an unsequenced frame to the room's host/ta sessions (and `also`'s sessions).
    pub fn notify_moderators(&self, room: &RoomId, also: Option<&UserId>, frame: &Frame) {
        self.send(room, frame, Audience::Moderators(also));
        self.relay_notice(room, frame, || NoticeTo::Moderators(also.cloned()));
    }

    fn relay_notice(&self, room: &RoomId, frame: &Frame, to: impl FnOnce() -> NoticeTo) {
        self.relay_with(|| Relayed::Notice {
            room: room.clone(),
            frame: frame.clone(),
            to: to(),
        });
    }

    /// Sends a frame to this node's sessions in the room but `session` (if given), and not to
    /// other nodes: for what travels between nodes in a form of its own (whiteboard updates).
    pub fn notify_local(&self, room: &RoomId, except: Option<&SessionId>, frame: &Frame) {
        match except {
            Some(session) => self.send(room, frame, Audience::OtherSessions(session)),
            None => self.send(room, frame, Audience::Everyone),
        };
    }

    /// Sends an unsequenced frame to every session in the room but `session` (on other nodes:
    /// to every session, since the sender is not there).
    pub fn notify_other_sessions(&self, room: &RoomId, session: &SessionId, frame: &Frame) {
        self.send(room, frame, Audience::OtherSessions(session));
        self.relay_notice(room, frame, || NoticeTo::Everyone);
    }

    /// Sends a frame once to each session in any of `rooms` (only `user`'s sessions, if given),
    /// however many of the rooms it has joined. Other nodes get it per room.
    pub fn notify_once(&self, rooms: &[RoomId], user: Option<&UserId>, frame: &Frame) {
        let mut seen = HashSet::new();
        let mut n = 0;
        for room in rooms {
            if let Some(mut state) = self.rooms.get_mut(room) {
                for m in state.sessions.values_mut() {
                    if user.is_some_and(|u| &m.user.id != u) || !seen.insert(m.handle.id.clone()) {
                        continue;
                    }
                    if deliver(m, frame, None, false, self.out()) {
                        n += 1;
                    }
                }
            }
            self.relay_notice(room, frame, || match user {
                Some(u) => NoticeTo::User(u.clone()),
                None => NoticeTo::Everyone,
            });
        }
        self.metrics.deliveries.fetch_add(n, Relaxed);
    }

    /// The users online in the room, on this node and (cluster mode) the others, with their
    /// room role, in user id order.
    pub fn online_users(&self, room: &RoomId) -> Vec<UserRef> {
        let mut users: BTreeMap<UserId, UserRef> = self
            .rooms
            .get(room)
            .map(|state| {
                state
                    .online
                    .iter()
                    .map(|(id, (u, _))| (id.clone(), u.user.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(remote) = self.remote_online.get(room) {
            for (id, u) in remote.iter() {
                users.entry(id.clone()).or_insert_with(|| u.clone());
            }
        }
        users.into_values().collect()
    }

    /// The room role a user holds in the room on this node right now, if online here.
    pub fn local_role(&self, room: &RoomId, user: &UserId) -> Option<ShownRole> {
        self.rooms
            .get(room)
            .and_then(|state| state.online.get(user).map(|(u, _)| u.user.role))
    }

    /// The room role a user holds in the room right now, if online there: on this node, else
    /// on another node (cluster mode, as its last heartbeat said).
    pub fn online_role(&self, room: &RoomId, user: &UserId) -> Option<ShownRole> {
        let local = self
            .rooms
            .get(room)
            .and_then(|state| state.online.get(user).map(|(u, _)| u.user.role));
        local.or_else(|| self.remote_role(room, user))
    }

    /// The room role another node says the user is online with (cluster mode).
    pub fn remote_role(&self, room: &RoomId, user: &UserId) -> Option<ShownRole> {
        self.remote_online
            .get(room)
            .and_then(|m| m.get(user).map(|u| u.role))
    }

    /// Sends `kicked` to every session of `user` in the room and closes them 4003 (on every
    /// node in cluster mode; the count is this node's).
    pub fn kick(&self, room: &RoomId, user: &UserId, reason: &str) -> usize {
        self.relay_with(|| Relayed::Kick {
            room: room.clone(),
            user: user.clone(),
            reason: reason.to_owned(),
        });
        self.kick_local(room, user, reason, false)
    }

    /// [`Hub::kick`] for this node's sessions only (a kick relayed from another node).
    ///
    /// `spare_moderators`: leave the user's host/ta sessions alone (a kick or ban relayed
    /// from another node, whose check could not see this node's sessions; host and ta cannot
    /// be moderated).
    pub fn kick_local(
        &self,
        room: &RoomId,
        user: &UserId,
        reason: &str,
        spare_moderators: bool,
    ) -> usize {
        let frame = Frame::from(protocol::encode(&ServerMsg::Kicked { room, reason }));
        let mut kicked = 0;
        if let Some(mut state) = self.rooms.get_mut(room) {
            for m in state
                .sessions
                .values_mut()
                .filter(|m| &m.user.id == user && !(spare_moderators && m.moderator))
            {
                m.gate = None;
                m.handle.offer(&frame, &self.metrics);
                m.handle.close(close::KICKED);
                kicked += 1;
            }
        }
        kicked
    }

    /// Puts a hand up (raise order is kept); returns its 1-based position.
    pub fn raise_hand(&self, room: &RoomId, user: &UserRef, now_ms: i64) -> usize {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return 0;
        };
        if let Some(pos) = state.hands.iter().position(|(u, _)| u.id == user.id) {
            return pos + 1;
        }
        state.hands.push((user.clone(), now_ms));
        state.hand_raised(room, user, self.out());
        let position = state.hands.len();
        drop(state);
        self.relay_with(|| Relayed::Hand {
            room: room.clone(),
            user: user.clone(),
            raised: true,
            ts: now_ms,
        });
        position
    }

    /// Lowers a hand; false if it was not up.
    pub fn lower_hand(&self, room: &RoomId, user: &UserId) -> bool {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return false;
        };
        let lowered = state.lower_hand(room, user, true, self.out());
        drop(state);
        match lowered {
            Some(who) => {
                self.relay_with(|| Relayed::Hand {
                    room: room.clone(),
                    user: who,
                    raised: false,
                    ts: 0,
                });
                true
            }
            None => false,
        }
    }

    pub fn hands(&self, room: &RoomId) -> Vec<(UserRef, i64)> {
        self.rooms
            .get(room)
            .map(|s| s.hands.clone())
            .unwrap_or_default()
    }

    /// Puts a user (who must be in the room) on or off stage, within `max` on stage; going on
    /// stage lowers their hand. Returns the stage after the change.
    pub fn set_stage(
        &self,
        room: &RoomId,
        user: &UserId,
        on: bool,
        max: usize,
    ) -> Result<Vec<UserRef>, StageError> {
        let mut state = self.rooms.get_mut(room).ok_or(StageError::NotInRoom)?;
        let state = &mut *state;
        let who = state
            .online
            .get(user)
            .map(|(u, _)| u.user.clone())
            .or_else(|| {
                self.remote_online
                    .get(room)
                    .and_then(|m| m.get(user).cloned())
            })
            .ok_or(StageError::NotInRoom)?;
        let present = state.stage.iter().position(|u| &u.id == user);
        match (on, present) {
            (true, None) => {
                if state.stage.len() >= max {
                    return Err(StageError::Full(max));
                }
                state.stage.push(who.clone());
                state.stage_since.insert(user.clone(), now_ms());
                state.lower_hand(room, user, true, self.out());
            }
            (false, Some(pos)) => {
                state.stage.remove(pos);
            }
            _ => return Ok(state.stage.clone()),
        }
        state.stage_changed(room, &who, on, self.out());
        // Never touches the hub: safe under the room's guard.
        self.relay_with(|| Relayed::Stage {
            room: room.clone(),
            user: who.clone(),
            on,
        });
        Ok(state.stage.clone())
    }

    /// Who is on stage in the room, in the order they went on, with since when (ms).
    pub fn stage_spells(&self, room: &RoomId) -> Vec<(UserRef, i64)> {
        self.rooms
            .get(room)
            .map(|s| {
                s.stage
                    .iter()
                    .map(|u| (u.clone(), s.stage_since.get(&u.id).copied().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The rooms of this node with someone on stage: (room, [(user, on stage since)]).
    pub fn stages(&self) -> Vec<(RoomId, Vec<(UserRef, i64)>)> {
        self.rooms
            .iter()
            .filter(|e| !e.stage.is_empty())
            .map(|e| {
                let spells = e
                    .stage
                    .iter()
                    .map(|u| (u.clone(), e.stage_since.get(&u.id).copied().unwrap_or(0)))
                    .collect();
                (e.key().clone(), spells)
            })
            .collect()
    }

    /// The class ended: every raised hand goes down and everyone on stage comes off, with the
    /// usual `hand` and `stage` events (and relays, so other nodes follow). Returns who came
    /// off stage.
    pub fn clear_hands_and_stage(&self, room: &RoomId) -> Vec<UserRef> {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        let state = &mut *state;
        let raised: Vec<UserId> = state.hands.iter().map(|(u, _)| u.id.clone()).collect();
        for user in raised {
            if let Some(who) = state.lower_hand(room, &user, true, self.out()) {
                self.relay_with(|| Relayed::Hand {
                    room: room.clone(),
                    user: who,
                    raised: false,
                    ts: 0,
                });
            }
        }
        let off = std::mem::take(&mut state.stage);
        for who in &off {
            state.stage_changed(room, who, false, self.out());
            self.relay_with(|| Relayed::Stage {
                room: room.clone(),
                user: who.clone(),
                on: false,
            });
        }
        off
    }

    /// Whether the user is on stage (may publish audio/video in a live room).
    pub fn on_stage(&self, room: &RoomId, user: &UserId) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|s| s.stage.iter().any(|u| &u.id == user))
    }

    /// Queues a frame to one session (directed traffic: calls, signals). False if it is gone.
    pub fn send_to_session(&self, session: &str, frame: &Frame) -> bool {
        let Some(handle) = self.sessions.get(session).map(|h| h.clone()) else {
            return false;
        };
        let ok = handle.offer(frame, &self.metrics);
        if ok {
            self.metrics.deliveries.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Whether any of the user's sessions takes call waiting.
    pub fn call_waiting(&self, user: &UserId) -> bool {
        self.users
            .get(user)
            .is_some_and(|s| s.iter().any(|h| h.call_waiting))
            || self
                .remote_sessions
                .get(user)
                .is_some_and(|s| s.iter().any(|(_, w)| *w))
    }

    /// How many nodes hold signed-in sessions of the user: this one (counted always: the
    /// caller is one of them) and, in cluster mode, each other node the directory lists one on.
    pub fn nodes_with_sessions_of(&self, user: &UserId) -> usize {
        let Some(remote) = self.remote_sessions.get(user) else {
            return 1;
        };
        // Distinct nodes without allocating (a user has a handful of sessions at most).
        let node = |i: usize| protocol::node_of(&remote[i].0);
        1 + (0..remote.len())
            .filter(|&i| node(i).is_some() && !(0..i).any(|j| node(j) == node(i)))
            .count()
    }

    /// The ids of a user's signed-in sessions (on every node in cluster mode).
    pub fn session_ids(&self, user: &UserId) -> Vec<String> {
        let mut ids: Vec<String> = self
            .users
            .get(user)
            .map(|s| s.iter().map(|h| h.id.0.clone()).collect())
            .unwrap_or_default();
        ids.extend(self.remote_session_ids(user));
        ids
    }

    /// Sends a frame to every session of `user` in the room.
    pub fn notify_user(&self, room: &RoomId, user: &UserId, frame: &Frame) {
        self.send(room, frame, Audience::User(user));
        self.relay_notice(room, frame, || NoticeTo::User(user.clone()));
    }

    /// Tells every session of the user on this node (in any room or none) that they earned a
    /// badge, and returns the frame so that cluster mode can send it to the user's sessions on
    /// other nodes ([`Hub::remote_session_ids`]).
    pub fn badge_earned(&self, b: &crate::store::EarnedBadge) -> Frame {
        let frame = Frame::from(crate::protocol::encode(
            &crate::protocol::ServerMsg::Badge {
                room: &b.room,
                badge: &b.badge,
                user: &b.user,
                ts: b.ts,
            },
        ));
        let sessions: Vec<Arc<SessionHandle>> = self
            .users
            .get(&b.user.id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for h in sessions {
            if h.offer(&frame, &self.metrics) {
                self.metrics.deliveries.fetch_add(1, Relaxed);
            }
        }
        frame
    }

    /// The ids of a user's sessions on other nodes, as the last heartbeats listed them (none
    /// on a single node).
    pub fn remote_session_ids(&self, user: &UserId) -> Vec<String> {
        self.remote_sessions
            .get(user)
            .map(|s| s.iter().map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// The heartbeat round, every `heartbeat_s`: closes sessions not heard from for `idle_ms`
    /// (close 1000, "idle timeout") and asks every other one to ping its client. One pass
    /// over the sessions instead of two timers in each.
    pub fn heartbeat(&self, now_ms: i64, idle_ms: i64) {
        for s in self.sessions.iter() {
            if now_ms - s.last_heard.load(Relaxed) > idle_ms {
                tracing::debug!(session = %s.id, "idle timeout");
                s.close(close::NORMAL);
            } else {
                s.outbox.ping();
            }
        }
    }

    /// Asks every session to close with `code` (shutdown).
    pub fn close_all(&self, code: u16) {
        for user in self.users.iter() {
            for s in user.iter() {
                s.close(code);
            }
        }
    }
}

/// Cluster mode: what the cluster broker (`cluster/`) feeds in and reads out. Plain map updates, no I/O.
impl Hub {
    fn relay_with(&self, what: impl FnOnce() -> Relayed) {
        if let Some(relay) = &self.relay
            && relay.try_send(what()).is_err()
        {
            tracing::warn!("a notice for the other nodes was dropped: the bus queue is full");
        }
    }

    /// A hand raised or lowered on another node: this node's queue follows (kept in raise
    /// order), and its host/ta (and the user's sessions here) hear it.
    pub fn apply_hand(&self, room: &RoomId, user: &UserRef, raised: bool, ts: i64) {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return;
        };
        if !raised {
            state.lower_hand(room, &user.id, true, self.out());
            return;
        }
        if state.hands.iter().any(|(u, _)| u.id == user.id) {
            return;
        }
        let at = state.hands.partition_point(|(_, t)| *t <= ts);
        state.hands.insert(at, (user.clone(), ts));
        state.hand_raised(room, user, self.out());
    }

    /// A stage change made on another node; true if this node's stage changed.
    pub fn apply_stage(&self, room: &RoomId, user: &UserRef, on: bool) -> bool {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return false;
        };
        let state = &mut *state;
        let present = state.stage.iter().position(|u| u.id == user.id);
        match (on, present) {
            (true, None) => {
                state.stage.push(user.clone());
                state.stage_since.insert(user.id.clone(), now_ms());
                state.lower_hand(room, &user.id, true, self.out());
            }
            (false, Some(pos)) => {
                state.stage.remove(pos);
            }
            _ => return false,
        }
        state.stage_changed(room, user, on, self.out());
        true
    }

    /// Whether other nodes report the user online in the room.
    fn online_elsewhere(&self, room: &RoomId, user: &UserId) -> bool {
        self.remote_online
            .get(room)
            .is_some_and(|m| m.contains_key(user))
    }

    /// A notice relayed from another node, for this node's sessions.
    pub fn apply_notice(&self, room: &RoomId, frame: &Frame, to: &NoticeTo) {
        match to {
            // Typing, the only notice to "others": this node's rules for who hears it.
            NoticeTo::Others(from) => self.typing_local(room, from, frame),
            to => {
                self.send(room, frame, to.audience());
            }
        }
    }

    /// Whether any session of this node has joined the room.
    pub fn has_room(&self, room: &RoomId) -> bool {
        self.rooms.contains_key(room)
    }

    /// Another node's users went online (`Some`) or offline in a room: record it, and tell
    /// this node's sessions when the union over nodes changed (the user is not online here).
    pub fn remote_presence(&self, room: &RoomId, user: &UserRef, online: bool) {
        // The room's guard is taken first and held across the update, so a join or a gate
        // opening here sees the other nodes' users and the room's presence clock change
        // together (the order everywhere: a room, then `remote_online`).
        let state = self.rooms.get_mut(room);
        let changed = if online {
            self.remote_online
                .entry(room.clone())
                .or_default()
                .insert(user.id.clone(), user.clone())
                .is_none()
        } else {
            let mut removed = false;
            self.remote_online.remove_if_mut(room, |_, m| {
                removed = m.remove(&user.id).is_some();
                m.is_empty()
            });
            removed
        };
        if !changed {
            return;
        }
        let Some(mut state) = state else {
            return;
        };
        if state.online.contains_key(&user.id) {
            return;
        }
        if !online {
            // Gone from every node (a node died, say): hands and stage belong to people here.
            state.lower_hand(room, &user.id, false, self.out());
            if let Some(pos) = state.stage.iter().position(|u| u.id == user.id) {
                state.stage.remove(pos);
                state.stage_changed(room, user, false, self.out());
            }
        }
        if state.presence_change(user, online) {
            self.due(&self.presence_due, room);
        }
        if state.counts_online(self.presence_limit.saturating_sub(1)) {
            self.due(&self.counts_due, room);
        }
    }

    /// Replaces the directory of other nodes' sessions (user -> (session id, call waiting)).
    pub fn set_remote_sessions(&self, all: HashMap<UserId, Vec<(String, bool)>>) {
        self.remote_sessions.retain(|u, _| all.contains_key(u));
        for (user, sessions) in all {
            self.remote_sessions.insert(user, sessions);
        }
    }

    /// Replaces the other nodes' sessions of some users (an empty list: they have none left).
    pub fn update_remote_sessions(&self, changes: Vec<(UserId, Vec<(String, bool)>)>) {
        for (user, sessions) in changes {
            if sessions.is_empty() {
                self.remote_sessions.remove(&user);
            } else {
                self.remote_sessions.insert(user, sessions);
            }
        }
    }

    /// This node's online users per room, for its heartbeat.
    pub fn presence_snapshot(&self) -> Vec<(RoomId, Vec<UserRef>)> {
        self.rooms
            .iter()
            .map(|r| {
                let users = r.online.values().map(|(u, _)| u.user.clone()).collect();
                (r.key().clone(), users)
            })
            .collect()
    }

    /// This node's sessions per user with their call-waiting flag, for its heartbeat.
    /// One user's sessions on this node: (session id, call waiting).
    pub fn local_sessions(&self, user: &UserId) -> Vec<(String, bool)> {
        self.users
            .get(user)
            .map(|s| s.iter().map(|h| (h.id.0.clone(), h.call_waiting)).collect())
            .unwrap_or_default()
    }

    pub fn sessions_snapshot(&self) -> Vec<(UserId, Vec<(String, bool)>)> {
        self.users
            .iter()
            .map(|u| {
                let s = u.iter().map(|h| (h.id.0.clone(), h.call_waiting)).collect();
                (u.key().clone(), s)
            })
            .collect()
    }

    /// Asks up to `n` sessions that are still open to close with `code`; returns how many it
    /// asked (a drain in batches).
    pub fn close_some(&self, code: u16, n: usize) -> usize {
        let mut asked = 0;
        for user in self.users.iter() {
            for s in user.iter() {
                if asked >= n {
                    return asked;
                }
                if s.close_code() == 0 {
                    s.close(code);
                    asked += 1;
                }
            }
        }
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: id.to_uppercase(),
            role: ShownRole::Member,
        }
    }

    fn session(
        id: &str,
        uid: &str,
        cap: usize,
    ) -> (
        Arc<SessionHandle>,
        crate::outbox::OutboxReader,
        Arc<CloseSignal>,
    ) {
        let (tx, rx) = crate::outbox::outbox(cap);
        let (h, close) = SessionHandle::new(id.into(), uid.into(), tx);
        (h, rx, close)
    }

    fn ev(room: &str, seq: i64) -> CommittedEvent {
        CommittedEvent {
            room: room.into(),
            seq,
            json: format!("{{\"seq\":{seq}}}"),
            public_json: None,
        }
    }

    /// Joins session `sid` of user `uid` (an outbox of 16) to `room` as a member who sees
    /// presence; its handle and outbox.
    fn enter(
        hub: &Hub,
        room: &RoomId,
        sid: &str,
        uid: &str,
    ) -> (Arc<SessionHandle>, crate::outbox::OutboxReader) {
        let (h, rx, _) = session(sid, uid, 16);
        hub.join(room, &h, user(uid), false, false).unwrap();
        (h, rx)
    }

    /// [`enter`], with the gate opened at once: the session hears the room from now on.
    fn watch(
        hub: &Hub,
        room: &RoomId,
        sid: &str,
        uid: &str,
    ) -> (Arc<SessionHandle>, crate::outbox::OutboxReader) {
        let (h, rx) = enter(hub, room, sid, uid);
        hub.open_gate(room, &h.id, 0);
        (h, rx)
    }

    /// What a session has after the presence round.
    fn flushed(hub: &Hub, rx: &mut crate::outbox::OutboxReader) -> Vec<String> {
        hub.send_presence();
        drain(rx)
    }

    fn drain(rx: &mut crate::outbox::OutboxReader) -> Vec<String> {
        let mut out = vec![];
        while let Some(q) = rx.try_recv() {
            out.push(q.frame.as_str().to_owned());
        }
        out
    }

    #[test]
    fn gate_holds_live_events_and_drops_replayed_ones() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (a, mut arx) = enter(&hub, &"r".into(), "s1", "a");
        hub.publish(ev("r", 5));
        hub.publish(ev("r", 6));
        assert!(drain(&mut arx).is_empty(), "gated");
        hub.open_gate(&"r".into(), &a.id, 5);
        assert_eq!(drain(&mut arx), vec!["{\"seq\":6}"]);
        hub.publish(ev("r", 7));
        assert_eq!(drain(&mut arx), vec!["{\"seq\":7}"]);
    }

    /// A hub whose rooms keep `cap` bytes of recent events, with one session watching `r`.
    fn recent_hub(cap: usize) -> (Hub, RoomId, crate::outbox::OutboxReader) {
        let hub = Hub::new(Arc::default(), 10, 100, 100).with_replay_cache(cap);
        let room: RoomId = "r".into();
        let (_, rx) = watch(&hub, &room, "s0", "z");
        (hub, room, rx)
    }

    fn texts(replay: &Replay) -> Vec<&str> {
        replay.frames.iter().map(|f| f.as_str()).collect()
    }

    #[test]
    fn a_resume_replays_the_latest_events_from_memory_as_its_role_sees_them() {
        let (hub, room, _rx) = recent_hub(1 << 16);
        assert_eq!(hub.replay(&room, 0, 10, false), None, "seq not known yet");
        hub.note_published_seq(&room, 4);
        assert_eq!(
            hub.replay(&room, 4, 10, false),
            Some(Replay::default()),
            "caught up: nothing to replay"
        );
        assert_eq!(hub.replay(&room, 3, 10, false), None, "not held");
        hub.publish(ev("r", 5));
        hub.publish(CommittedEvent {
            public_json: Some(r#"{"seq":6,"type":"hidden"}"#.into()),
            ..ev("r", 6)
        });
        hub.publish(ev("r", 7));
        let member = hub.replay(&room, 5, 10, false).unwrap();
        assert_eq!(
            texts(&member),
            [r#"{"seq":6,"type":"hidden"}"#, r#"{"seq":7}"#]
        );
        assert_eq!((member.last, member.gap), (Some(7), false));
        let host = hub.replay(&room, 4, 10, true).unwrap();
        assert_eq!(
            texts(&host),
            [r#"{"seq":5}"#, r#"{"seq":6}"#, r#"{"seq":7}"#]
        );
        assert_eq!(hub.replay(&room, 3, 10, true), None, "seq 4 is not held");
        let over = hub.replay(&room, 4, 2, true).unwrap();
        assert!(over.gap && over.frames.is_empty(), "more than the limit");
        assert_eq!(
            hub.replay(&room, 9, 10, true),
            Some(Replay::default()),
            "ahead"
        );
    }

    #[test]
    fn recent_events_stay_gap_free_and_within_their_bytes() {
        let one = ev("r", 1).json.len() + RECENT_OVERHEAD;
        let (hub, room, _rx) = recent_hub(3 * one);
        for seq in 1..=5 {
            hub.publish(ev("r", seq));
        }
        assert_eq!(hub.replay(&room, 1, 10, false), None, "seq 2 was dropped");
        assert_eq!(texts(&hub.replay(&room, 2, 10, false).unwrap()).len(), 3);
        // A gap (seq 6 never published here): what is held no longer reaches the last seq
        // without one, so it starts again.
        hub.publish(ev("r", 7));
        assert_eq!(hub.replay(&room, 4, 10, false), None);
        assert_eq!(
            texts(&hub.replay(&room, 6, 10, false).unwrap()),
            [r#"{"seq":7}"#]
        );
        // A late copy of an earlier seq changes nothing.
        hub.publish(ev("r", 5));
        assert_eq!(
            texts(&hub.replay(&room, 6, 10, false).unwrap()),
            [r#"{"seq":7}"#]
        );
        // An event bigger than the whole budget empties it.
        hub.publish(CommittedEvent {
            json: format!(r#"{{"seq":8,"x":"{}"}}"#, "x".repeat(4 * one)),
            ..ev("r", 8)
        });
        assert_eq!(hub.replay(&room, 7, 10, false), None);
        // Kept nothing at all: the store is read.
        let (hub, room, _rx) = recent_hub(0);
        hub.note_published_seq(&room, 1);
        hub.publish(ev("r", 2));
        assert_eq!(hub.replay(&room, 1, 10, false), None);
    }

    #[test]
    fn an_event_that_rewrites_a_stored_one_empties_the_recent_events() {
        for kind in ["message_edited", "message_deleted", "reaction"] {
            let (hub, room, _rx) = recent_hub(1 << 16);
            hub.publish(ev("r", 1));
            hub.publish(ev("r", 2));
            let rewrite = format!(r#"{{"room":"r","seq":3,"type":"{kind}","id":"m1"}}"#);
            hub.publish(CommittedEvent {
                json: rewrite.clone(),
                ..ev("r", 3)
            });
            assert_eq!(hub.replay(&room, 0, 10, false), None, "{kind}");
            assert_eq!(
                texts(&hub.replay(&room, 2, 10, false).unwrap()),
                [rewrite.as_str()],
                "{kind}"
            );
        }
    }

    #[test]
    fn an_event_replayed_before_it_is_published_is_not_sent_twice() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (a, mut arx) = enter(&hub, &"r".into(), "s1", "a");
        // Seq 6 is committed and the joiner's replay read it (delivered 6) before the writer
        // got to publish it.
        hub.open_gate(&"r".into(), &a.id, 6);
        hub.publish(ev("r", 6));
        hub.publish(ev("r", 7));
        hub.publish(ev("r", 7));
        assert_eq!(drain(&mut arx), vec!["{\"seq\":7}"]);
    }

    #[test]
    fn a_snapshot_mark_moves_with_the_events_that_change_a_join_snapshot() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let room: RoomId = "r".into();
        let (a, _arx) = watch(&hub, &room, "s1", "a");
        assert_eq!(
            hub.snapshot_mark(&room),
            None,
            "published seq not known yet"
        );
        hub.note_published_seq(&room, 4);
        let read = hub.snapshot_mark(&room).unwrap();
        hub.publish(ev("r", 5));
        assert!(
            read.still_good(&hub.snapshot_mark(&room).unwrap()),
            "a plain event"
        );
        let created = r#"{"room":"r","seq":6,"type":"poll","poll":{},"change":"created"}"#;
        hub.publish(CommittedEvent {
            json: created.into(),
            ..ev("r", 6)
        });
        let now = hub.snapshot_mark(&room).unwrap();
        assert!(!read.still_good(&now), "a poll created after the read");
        assert!(now.still_good(&now), "a read after it");
        // The room's last session leaves: what is published while it has none is not seen
        // here, so nothing read before holds in its next life.
        hub.leave(&room, &a.id);
        let (_b, _brx) = watch(&hub, &room, "s2", "b");
        hub.note_published_seq(&room, 9);
        assert!(!now.still_good(&hub.snapshot_mark(&room).unwrap()));
    }

    #[test]
    fn big_rooms_stop_broadcasting_presence_and_typing_but_count_everyone() {
        let hub = Hub::new(Arc::default(), 10, 100, 100).with_presence_limit(2);
        let (_w, mut wrx) = watch(&hub, &"r".into(), "w", "w");
        let (_a, _ar) = enter(&hub, &"r".into(), "a", "a");
        assert_eq!(
            flushed(&hub, &mut wrx).len(),
            1,
            "second user: presence still sent"
        );
        let (b, _br, _) = session("b", "b", 16);
        let joined = hub.join(&"r".into(), &b, user("b"), false, false).unwrap();
        assert!(
            flushed(&hub, &mut wrx).is_empty(),
            "third user: over the limit"
        );
        assert_eq!((joined.online.len(), joined.online_count), (2, 3));
        hub.notify_others(&"r".into(), &"a".into(), &Frame::from("typing"));
        assert!(
            flushed(&hub, &mut wrx).is_empty(),
            "no typing in a big room"
        );
    }

    #[test]
    fn a_live_audience_follows_presence_by_count() {
        let hub = Hub::new(Arc::default(), 10, 10_000, 100);
        let r = RoomId::from("lecture");
        let mut host = user("h");
        host.role = ShownRole::Host;
        let (h, mut hrx, _) = session("h1", "h", 4096);
        hub.join(&r, &h, host, true, true).unwrap();
        hub.open_gate(&r, &h.id, 0);
        let mut audience = Vec::new();
        for i in 0..50 {
            let id = format!("u{i}");
            let (s, rx, _) = session(&id, &id, 64);
            let joined = hub.join(&r, &s, user(&id), false, true).unwrap();
            hub.open_gate(&r, &s.id, 0);
            assert_eq!(joined.online_count, i + 2);
            assert_eq!(
                joined
                    .online
                    .users()
                    .into_iter()
                    .map(|u| u.id.0)
                    .collect::<Vec<_>>(),
                vec!["h"],
                "the audience sees who runs the room, not each other"
            );
            audience.push((s, rx));
        }
        // The host heard every arrival, lazily (presence may wait for the next write).
        hub.send_presence();
        let mut presence = 0;
        while let Some(q) = hrx.try_recv() {
            assert!(q.lazy && q.frame.as_str().contains("\"presence\""));
            presence += 1;
        }
        assert_eq!(presence, 50);
        // The audience heard nobody arrive: O(N) frames for the room, not O(N^2).
        for (_, rx) in &mut audience {
            assert!(drain(rx).is_empty());
        }
        // One count for everyone, and none again while it stays the same.
        hub.send_online_counts();
        for (_, rx) in &mut audience {
            assert_eq!(
                drain(rx),
                vec![r#"{"type":"online_count","room":"lecture","count":51}"#]
            );
        }
        assert_eq!(drain(&mut hrx).len(), 1);
        hub.send_online_counts();
        assert!(drain(&mut audience[0].1).is_empty());
        let (gone, _) = audience.pop().unwrap();
        hub.leave(&r, &gone.id);
        hub.send_online_counts();
        assert!(drain(&mut audience[0].1)[0].contains("\"count\":50"));
    }

    #[test]
    fn a_drop_and_resume_within_a_presence_round_is_never_announced() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (_w, mut wrx) = watch(&hub, &r, "w", "w");
        let (a1, _a1rx) = enter(&hub, &r, "a1", "a");
        assert_eq!(flushed(&hub, &mut wrx).len(), 1, "a came");
        hub.leave(&r, &a1.id);
        let (a2, _a2rx) = enter(&hub, &r, "a2", "a");
        assert!(
            flushed(&hub, &mut wrx).is_empty(),
            "gone and back: nothing to say"
        );
        hub.leave(&r, &a2.id);
        let frames = flushed(&hub, &mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("offline"));
    }

    #[test]
    fn a_newcomer_is_not_told_what_its_join_reply_said() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (_w, mut wrx) = watch(&hub, &r, "w", "w");
        let (a, _arx) = enter(&hub, &r, "a", "a");
        // "n" joins in the same presence round: its reply lists a and w already.
        let (n, mut nrx, _) = session("n", "n", 16);
        let joined = hub.join(&r, &n, user("n"), false, false).unwrap();
        hub.open_gate(&r, &n.id, 0);
        assert_eq!(joined.online.len(), 3);
        assert_eq!(flushed(&hub, &mut nrx).len(), 0, "nothing it did not know");
        assert_eq!(drain(&mut wrx).len(), 2, "w hears of a and n");
        // A change after n joined is news to n.
        hub.leave(&r, &a.id);
        let frames = flushed(&hub, &mut nrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("offline"));
    }

    #[test]
    fn a_newcomer_hears_that_someone_it_was_told_had_gone_is_back() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (_w, mut wrx) = watch(&hub, &r, "w", "w");
        let (a1, _a1rx) = enter(&hub, &r, "a1", "a");
        flushed(&hub, &mut wrx);
        // a drops; n joins and is told a is not here; a resumes, all within one round.
        hub.leave(&r, &a1.id);
        let (n, mut nrx, _) = session("n", "n", 16);
        let joined = hub.join(&r, &n, user("n"), false, false).unwrap();
        hub.open_gate(&r, &n.id, 0);
        assert!(joined.online.users().iter().all(|u| u.id.as_str() != "a"));
        let (_a2, _a2rx) = enter(&hub, &r, "a2", "a");
        let told = flushed(&hub, &mut nrx);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].contains("\"a\"") && told[0].contains("online"));
        let w_told = drain(&mut wrx);
        assert_eq!(w_told.len(), 1, "w hears only of n: for w, a never left");
        assert!(w_told[0].contains("\"n\""));
    }

    /// The users a presence frame is about, with the state it gives them.
    fn presence_of(frames: &[String]) -> Vec<(String, String)> {
        frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f).unwrap();
                assert_eq!(v["type"], "presence", "{f}");
                let id = v["user"]["id"].as_str().unwrap().to_owned();
                (id, v["state"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    #[test]
    fn a_gated_session_hears_the_net_presence_change_when_its_gate_opens() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (w, _wrx) = watch(&hub, &r, "w", "w");
        let (n, mut nrx, _) = session("n", "n", 16);
        let joined = hub.join(&r, &n, user("n"), false, false).unwrap();
        assert_eq!(joined.online.len(), 2);
        // While n's replay runs: a comes, b comes and goes, w goes, over two rounds.
        let (a, _arx) = enter(&hub, &r, "a", "a");
        let (b, _brx) = enter(&hub, &r, "b", "b");
        hub.send_presence();
        hub.leave(&r, &b.id);
        hub.leave(&r, &w.id);
        hub.send_presence();
        assert!(drain(&mut nrx).is_empty(), "gated: nothing held per round");
        assert!(hub.open_gate(&r, &n.id, 0).is_none());
        let told = presence_of(&drain(&mut nrx));
        let want = [("a", "online"), ("w", "offline")].map(|(u, s)| (u.into(), s.into()));
        assert_eq!(told, want);
        // From now on the rounds tell it what changes, once.
        assert!(
            flushed(&hub, &mut nrx).is_empty(),
            "nothing it was not told"
        );
        hub.leave(&r, &a.id);
        let told = presence_of(&flushed(&hub, &mut nrx));
        assert_eq!(told, [("a".into(), "offline".into())]);
    }

    #[test]
    fn a_round_announces_at_most_presence_round_max_users_oldest_first() {
        let hub = Hub::new(Arc::default(), 10, 100, 100).with_presence_round_max(2);
        let r = RoomId::from("r");
        let (_w, mut wrx) = watch(&hub, &r, "w", "w");
        flushed(&hub, &mut wrx);
        let mut came = Vec::new();
        for u in ["e", "d", "c", "b", "a"] {
            came.push(enter(&hub, &r, u, u));
        }
        let rounds: Vec<Vec<(String, String)>> = (0..4)
            .map(|_| presence_of(&flushed(&hub, &mut wrx)))
            .collect();
        let online = |u: &str| (u.to_owned(), "online".to_owned());
        assert_eq!(rounds[0].len(), 2, "{rounds:?}");
        let mut first = rounds[0].clone();
        first.sort();
        assert_eq!(first, [online("d"), online("e")], "the oldest two first");
        assert_eq!(rounds[1].len(), 2);
        assert_eq!(rounds[2], [online("a")]);
        assert!(rounds[3].is_empty());
    }

    #[test]
    fn a_gate_opens_at_the_pace_the_client_reads() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (s, mut rx, close) = session("s", "s", 2);
        hub.join(&r, &s, user("s"), false, false).unwrap();
        for seq in 1..=7 {
            hub.publish(ev("r", seq));
        }
        let (mut got, mut next, mut handed_back) = (Vec::new(), 8, 0);
        let mut waiting = hub.open_gate(&r, &s.id, 0);
        while let Some(frame) = waiting {
            handed_back += 1;
            // Live events go on arriving; the client reads what is queued; the session
            // queues the frame handed back and goes on.
            hub.publish(ev("r", next));
            next += 1;
            got.extend(drain(&mut rx));
            s.outbox.try_send(frame).expect("room made");
            waiting = hub.open_gate(&r, &s.id, 0);
        }
        got.extend(drain(&mut rx));
        hub.publish(ev("r", next));
        got.extend(drain(&mut rx));
        let seqs: Vec<i64> = got
            .iter()
            .map(|f| {
                serde_json::from_str::<serde_json::Value>(f).unwrap()["seq"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert!(handed_back > 0, "an outbox of 2 cannot take 7 at once");
        assert_eq!(
            seqs,
            (1..=next).collect::<Vec<_>>(),
            "every seq once, in order"
        );
        assert_eq!(close.code(), 0, "never a slow consumer");
    }

    #[test]
    fn full_outbox_closes_only_that_session() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (slow, _srx, slow_close) = session("s1", "a", 2);
        let (fast, mut frx, fast_close) = session("s2", "b", 64);
        for h in [&slow, &fast] {
            hub.join(&"r".into(), h, user(h.user.as_str()), false, false)
                .unwrap();
            hub.open_gate(&"r".into(), &h.id, 0);
        }
        drain(&mut frx);
        for seq in 1..=10 {
            hub.publish(ev("r", seq));
        }
        assert_eq!(slow_close.code(), close::SLOW_CONSUMER);
        assert_eq!(fast_close.code(), 0);
        assert_eq!(drain(&mut frx).len(), 10);
    }

    #[test]
    fn presence_is_the_union_with_other_nodes() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (_w, mut wrx) = watch(&hub, &r, "w", "w");
        // Another node has "a" online: this node's sessions hear it once.
        hub.remote_presence(&r, &user("a"), true);
        hub.remote_presence(&r, &user("a"), true);
        let frames = flushed(&hub, &mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("online"));
        // "a" also joins here: already online in the union, so no second announcement; the
        // join reply lists everyone once.
        let (a, _arx, _) = session("a1", "a", 16);
        let joined = hub.join(&r, &a, user("a"), false, false).unwrap();
        assert!(flushed(&hub, &mut wrx).is_empty());
        assert_eq!(joined.online_count, 2);
        // Leaving here while still online elsewhere: no offline.
        hub.leave(&r, &a.id);
        assert!(flushed(&hub, &mut wrx).is_empty());
        // The other node drops "a": now it is offline everywhere.
        hub.remote_presence(&r, &user("a"), false);
        let frames = flushed(&hub, &mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("offline"));
    }

    #[test]
    fn sessions_on_other_nodes_count_for_the_limit_and_ring() {
        let hub = Hub::new(Arc::default(), 2, 100, 100);
        hub.set_remote_sessions(HashMap::from([(
            UserId::from("a"),
            vec![("s9.n2".to_owned(), true)],
        )]));
        let (p1, _r1, _) = session("p1", "a", 16);
        let (p2, _r2, _) = session("p2", "a", 16);
        hub.register(p1).unwrap();
        assert_eq!(hub.register(p2), Err(HubError::TooManySessions(2)));
        assert_eq!(hub.session_ids(&"a".into()), vec!["p1", "s9.n2"]);
        assert!(hub.call_waiting(&"a".into()));
        // The bus updates one user at a time; an empty list drops the user's remote sessions.
        hub.update_remote_sessions(vec![(UserId::from("a"), vec![("s8.n3".to_owned(), false)])]);
        assert_eq!(hub.session_ids(&"a".into()), vec!["p1", "s8.n3"]);
        assert!(!hub.call_waiting(&"a".into()));
        hub.update_remote_sessions(vec![(UserId::from("a"), Vec::new())]);
        assert_eq!(hub.session_ids(&"a".into()), vec!["p1"]);
        assert_eq!(hub.nodes_with_sessions_of(&"a".into()), 1);
        // The per-user limits' share: this node and each other node with a session, once.
        let on = |ids: &[&str]| ids.iter().map(|s| (s.to_string(), false)).collect();
        hub.update_remote_sessions(vec![(UserId::from("a"), on(&["s1.n3", "s2.n4", "s3.n3"]))]);
        assert_eq!(hub.nodes_with_sessions_of(&"a".into()), 3);
    }

    #[test]
    fn a_drain_closes_sessions_a_batch_at_a_time() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let mut closes = Vec::new();
        let mut keep = Vec::new();
        for i in 0..5 {
            let (h, rx, c) = session(&format!("s{i}"), &format!("u{i}"), 4);
            hub.register(h).unwrap();
            closes.push(c);
            keep.push(rx);
        }
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 2);
        assert_eq!(closes.iter().filter(|c| c.code() != 0).count(), 2);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 2);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 1);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 0);
        assert!(closes.iter().all(|c| c.code() == close::GOING_AWAY));
    }

    #[test]
    fn presence_once_per_user_and_session_limit() {
        let hub = Hub::new(Arc::default(), 2, 100, 100);
        let (watcher, mut wrx, _) = session("w", "w", 16);
        hub.join(&"r".into(), &watcher, user("w"), false, false)
            .unwrap();
        hub.open_gate(&"r".into(), &watcher.id, 0);
        let (p1, _r1, _) = session("p1", "a", 16);
        let (p2, _r2, _) = session("p2", "a", 16);
        let (p3, _r3, _) = session("p3", "a", 16);
        hub.register(p1.clone()).unwrap();
        hub.register(p2.clone()).unwrap();
        assert_eq!(hub.register(p3), Err(HubError::TooManySessions(2)));
        let joined = hub.join(&"r".into(), &p1, user("a"), false, false).unwrap();
        assert_eq!(joined.online.len(), 2);
        hub.join(&"r".into(), &p2, user("a"), false, false).unwrap();
        assert_eq!(
            flushed(&hub, &mut wrx).len(),
            1,
            "one online for two sessions"
        );
        hub.leave(&"r".into(), &p1.id);
        assert!(flushed(&hub, &mut wrx).is_empty(), "still online on p2");
        hub.leave(&"r".into(), &p2.id);
        let frames = flushed(&hub, &mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("offline"));
    }
}

/// Property test of the join gate: random interleavings of commits, publishes (in commit
/// order, with stray repeats) and joins with and without replay, each join split into the
/// steps `rooms::join` takes (gate, last seq, store read, replay pushes, open the gate).
/// Budget and longer runs: see `crate::fuzz`.
#[cfg(test)]
mod props {
    use super::*;
    use crate::fuzz::{check, pick};
    use rand::Rng;

    enum Step {
        Start,
        /// Gated; the ok's `last_seq` not read yet.
        Gated,
        /// The hub had no published seq: the store's last seq was read, not yet noted.
        StoreLast(i64),
        /// `last_seq` known; the replay not read yet.
        LastSeq(i64),
        /// Replaying `rest` (seqs read from the store), `delivered` so far.
        Replaying {
            rest: Vec<i64>,
            delivered: i64,
        },
        /// Opening the gate: `open_gate` handed this frame back for want of room.
        Opening(Outgoing, i64),
        Done,
    }

    impl Step {
        fn name(&self) -> String {
            match self {
                Step::Start => "start".into(),
                Step::Gated => "gated".into(),
                Step::StoreLast(s) => format!("read the store's last seq {s}"),
                Step::LastSeq(s) => format!("last_seq {s}"),
                Step::Replaying { rest, delivered } => {
                    format!("replaying {rest:?}, delivered {delivered}")
                }
                Step::Opening(f, _) => format!("gate opening, {} handed back", f.frame),
                Step::Done => "gate open".into(),
            }
        }
    }

    struct Joiner {
        handle: Arc<SessionHandle>,
        close: Arc<CloseSignal>,
        cap: usize,
        /// The seqs the client has read so far.
        got: Vec<i64>,
        outbox: Outbox,
        rx: crate::outbox::OutboxReader,
        after: Option<i64>,
        /// The seq after which this session must get every event: `after_seq`, or the ok's
        /// `last_seq` for a join without replay.
        start: Option<i64>,
        step: Step,
    }

    fn frame(seq: i64) -> String {
        format!("{{\"seq\":{seq}}}")
    }

    /// Moves a joiner one step on, as `rooms::join` would; `committed` is the store's last seq.
    fn advance(
        hub: &Hub,
        room: &RoomId,
        j: &mut Joiner,
        committed: i64,
        published: i64,
        rng: &mut rand::rngs::StdRng,
    ) {
        j.step = match std::mem::replace(&mut j.step, Step::Done) {
            Step::Start => {
                // A client resumes from a seq it saw, so at most what was published.
                j.after = rng
                    .random_bool(0.7)
                    .then(|| rng.random_range(0..=published));
                let user = UserRef {
                    id: j.handle.user.clone(),
                    name: "U".into(),
                    role: ShownRole::Member,
                };
                hub.join(room, &j.handle, user, false, false).expect("join");
                Step::Gated
            }
            Step::Gated => match hub.published_seq(room) {
                Some(seq) => Step::LastSeq(seq),
                None => Step::StoreLast(committed),
            },
            Step::StoreLast(seq) => {
                hub.note_published_seq(room, seq);
                Step::LastSeq(seq)
            }
            Step::LastSeq(last) => {
                j.start = Some(j.after.unwrap_or(last));
                let rest = match j.after {
                    Some(after) => (after + 1..=committed).collect(),
                    None => Vec::new(),
                };
                Step::Replaying {
                    rest,
                    delivered: last,
                }
            }
            Step::Replaying {
                mut rest,
                delivered,
            } => {
                if rest.is_empty() {
                    opening(hub.open_gate(room, &j.handle.id, delivered), delivered)
                } else if j.outbox.try_send(frame(rest[0])).is_ok() {
                    let seq = rest.remove(0);
                    Step::Replaying {
                        rest,
                        delivered: delivered.max(seq),
                    }
                } else {
                    // Full: the replay waits for the client to read.
                    Step::Replaying { rest, delivered }
                }
            }
            Step::Opening(f, delivered) => match j.outbox.try_send(f) {
                Ok(()) => opening(hub.open_gate(room, &j.handle.id, delivered), delivered),
                Err(Refused::Full(f)) => Step::Opening(f, delivered),
                Err(Refused::Closed) => unreachable!("the reader is here"),
            },
            Step::Done => Step::Done,
        };
    }

    fn opening(back: Option<Outgoing>, delivered: i64) -> Step {
        match back {
            Some(f) => Step::Opening(f, delivered),
            None => Step::Done,
        }
    }

    impl Joiner {
        /// The client reads what is queued (the join's presence difference aside).
        fn read(&mut self) {
            while let Some(q) = self.rx.try_recv() {
                let v: serde_json::Value = serde_json::from_str(q.frame.as_str()).unwrap();
                match v["seq"].as_i64() {
                    Some(seq) => self.got.push(seq),
                    None => assert_eq!(v["type"], "presence", "{}", q.frame),
                }
            }
        }
    }

    #[test]
    fn joins_with_replay_get_every_seq_once_in_order_whatever_the_interleaving() {
        check("hub gate", 1_500, |rng| {
            let hub = Hub::new(Arc::default(), 10, 100, 100_000);
            let room = RoomId::from("r");
            let (mut committed, mut published) = (0i64, 0i64);
            let mut joiners: Vec<Joiner> = Vec::new();
            let mut trace: Vec<String> = Vec::new();
            let steps = rng.random_range(5..150);
            for _ in 0..steps {
                match rng.random_range(0..10) {
                    0 | 1 => {
                        committed += 1;
                        trace.push(format!("commit {committed}"));
                    }
                    2 | 3 => {
                        if published < committed {
                            published += 1;
                            hub.publish(ev(&room, published));
                            trace.push(format!("publish {published}"));
                        }
                    }
                    4 => {
                        // A repeat of the last publish (a retried batch). Repeats of older
                        // seqs are not modelled: the writer and the cluster sequencer publish
                        // in seq order, and an old repeat reaching a room whose state was just
                        // created (published seq unknown) would set it too low.
                        if published > 0 {
                            let again = published;
                            hub.publish(ev(&room, again));
                            trace.push(format!("publish {again} again"));
                        }
                    }
                    5 => {
                        if joiners.len() < 5 {
                            let id = format!("s{}", joiners.len());
                            // Small outboxes make the replay wait and the gate hand back.
                            let cap = if rng.random_bool(0.5) {
                                rng.random_range(1..6)
                            } else {
                                100_000
                            };
                            let (tx, rx) = crate::outbox::outbox(cap);
                            let user = *pick(rng, &["ana", "ben", "cai"]);
                            let (handle, close) =
                                SessionHandle::new(id.as_str().into(), user.into(), tx.clone());
                            joiners.push(Joiner {
                                handle,
                                close,
                                cap,
                                got: Vec::new(),
                                outbox: tx,
                                rx,
                                after: None,
                                start: None,
                                step: Step::Start,
                            });
                        }
                    }
                    _ => {
                        if !joiners.is_empty() {
                            let i = rng.random_range(0..joiners.len());
                            advance(&hub, &room, &mut joiners[i], committed, published, rng);
                            trace.push(format!("s{i}: {}", joiners[i].step.name()));
                        }
                    }
                }
                // Clients read now and then.
                for (i, j) in joiners.iter_mut().enumerate() {
                    if rng.random_bool(0.6) {
                        j.read();
                        trace.push(format!("s{i} reads"));
                    }
                }
            }
            // Everything still under way finishes, the client reading; the writer publishes
            // what is committed.
            for j in &mut joiners {
                while !matches!(j.step, Step::Done) {
                    advance(&hub, &room, j, committed, published, rng);
                    j.read();
                }
            }
            while published < committed {
                published += 1;
                hub.publish(ev(&room, published));
                joiners.iter_mut().for_each(Joiner::read);
            }
            for j in &mut joiners {
                j.read();
                if j.close.code() != 0 {
                    // Closed 4008 for not reading: what it got is not the point.
                    assert_eq!(j.close.code(), close::SLOW_CONSUMER);
                    assert!(j.cap < 100_000, "only a small outbox fills");
                    continue;
                }
                let start = j.start.expect("joined");
                let want: Vec<i64> = (start + 1..=committed).collect();
                let got = &j.got;
                assert_eq!(
                    *got, want,
                    "session {} (after_seq {:?}) must get each seq after {start} once, in order; \
                     steps: {trace:?}",
                    j.handle.id, j.after
                );
            }
        });
    }

    /// A session of the presence property and what it believes: who is online.
    struct Believer {
        handle: Arc<SessionHandle>,
        rx: crate::outbox::OutboxReader,
        believes: std::collections::BTreeSet<UserId>,
    }

    impl Believer {
        /// Applies the presence frames queued for it (others are not modelled here); each must
        /// say where its user stands `now` (frames are read in the step that made them).
        fn read(&mut self, now: &std::collections::BTreeSet<UserId>) {
            while let Some(q) = self.rx.try_recv() {
                let v: serde_json::Value = serde_json::from_str(q.frame.as_str()).unwrap();
                let user = UserId::from(v["user"]["id"].as_str().unwrap());
                let online = v["state"] == "online";
                assert_eq!(
                    online,
                    now.contains(&user),
                    "{} was told {} about {user}",
                    self.handle.id,
                    q.frame
                );
                match online {
                    true => self.believes.insert(user),
                    false => self.believes.remove(&user),
                };
            }
        }
    }

    /// Opens a session's gate (the outboxes here never fill).
    fn open(hub: &Hub, room: &RoomId, s: &SessionId) {
        let back = hub.open_gate(room, s, 0);
        assert!(back.is_none(), "an outbox of 100,000 handed back {back:?}");
    }

    /// Random joins, leaves, resyncs, gate openings, other nodes' users coming and going, and
    /// capped presence rounds, in a group room (everyone listed) or a live room whose sessions
    /// all moderate and whose join replies list only the first two users. Every presence
    /// frame must be true when read, and once the rounds are done every session must believe
    /// exactly who is online (in the live room: believe no one online who is not).
    #[test]
    fn every_session_ends_up_knowing_who_is_online_whatever_the_interleaving() {
        check("hub presence", 1_500, |rng| {
            let round_max = *pick(rng, &[1, 2, 3, usize::MAX]);
            let live = rng.random_bool(0.3);
            let hub = Hub::new(Arc::default(), 10, 100, 100_000)
                .with_presence_round_max(round_max)
                .with_presence_limit(if live { 2 } else { usize::MAX });
            let room = RoomId::from("r");
            let mut sessions: Vec<Believer> = Vec::new();
            let mut elsewhere = std::collections::BTreeSet::new();
            let mut trace: Vec<String> = vec![format!("live {live}, round max {round_max}")];
            let mut made = 0;
            let join = |hub: &Hub, handle: &Arc<SessionHandle>| {
                let user = UserRef {
                    id: handle.user.clone(),
                    name: "U".into(),
                    role: ShownRole::Member,
                };
                let joined = hub.join(&room, handle, user, live, live).expect("join");
                joined.online.users().into_iter().map(|u| u.id).collect()
            };
            let online_now = |sessions: &[Believer], elsewhere: &std::collections::BTreeSet<_>| {
                let mut all: std::collections::BTreeSet<UserId> =
                    sessions.iter().map(|s| s.handle.user.clone()).collect();
                all.extend(elsewhere.iter().cloned());
                all
            };
            for _ in 0..rng.random_range(5..150) {
                match rng.random_range(0..12) {
                    0..=2 if sessions.len() < 12 => {
                        made += 1;
                        let user = *pick(rng, &["ana", "ben", "cai", "dan"]);
                        let (tx, rx) = crate::outbox::outbox(100_000);
                        let id = format!("s{made}");
                        let (handle, _) = SessionHandle::new(id.as_str().into(), user.into(), tx);
                        let believes = join(&hub, &handle);
                        trace.push(format!("{id} ({user}) joins"));
                        sessions.push(Believer {
                            handle,
                            rx,
                            believes,
                        });
                    }
                    3 | 4 if !sessions.is_empty() => {
                        let s = &sessions[rng.random_range(0..sessions.len())];
                        open(&hub, &room, &s.handle.id);
                        trace.push(format!("{}: gate opens", s.handle.id));
                    }
                    5 if !sessions.is_empty() => {
                        let s = sessions.remove(rng.random_range(0..sessions.len()));
                        hub.leave(&room, &s.handle.id);
                        trace.push(format!("{} leaves", s.handle.id));
                    }
                    6 if !sessions.is_empty() => {
                        // A resync: what was queued before is read first, then the new reply.
                        let i = rng.random_range(0..sessions.len());
                        let now = online_now(&sessions, &elsewhere);
                        sessions[i].read(&now);
                        sessions[i].believes = join(&hub, &sessions[i].handle);
                        trace.push(format!("{} joins again", sessions[i].handle.id));
                    }
                    7 => {
                        // A user of another node (cluster mode) comes or goes.
                        let user = *pick(rng, &["ben", "eve", "fay"]);
                        let online = !elsewhere.contains(&UserId::from(user));
                        let u = UserRef {
                            id: user.into(),
                            name: "U".into(),
                            role: ShownRole::Member,
                        };
                        hub.remote_presence(&room, &u, online);
                        match online {
                            true => elsewhere.insert(u.id),
                            false => elsewhere.remove(&u.id),
                        };
                        trace.push(format!("{user} online elsewhere: {online}"));
                    }
                    _ => {
                        hub.send_presence();
                        trace.push("round".into());
                    }
                }
                let now = online_now(&sessions, &elsewhere);
                for s in &mut sessions {
                    s.read(&now);
                }
            }
            for s in &sessions {
                open(&hub, &room, &s.handle.id);
            }
            // Enough rounds for six users' changes at one per round.
            for _ in 0..6 {
                hub.send_presence();
            }
            let online = online_now(&sessions, &elsewhere);
            for s in &mut sessions {
                s.read(&online);
                if live {
                    assert!(
                        s.believes.is_subset(&online),
                        "{} believes {:?} online, only {online:?} are; steps: {trace:?}",
                        s.handle.id,
                        s.believes
                    );
                } else {
                    assert_eq!(
                        s.believes, online,
                        "{} believes the wrong users are online; steps: {trace:?}",
                        s.handle.id
                    );
                }
            }
        });
    }

    fn ev(room: &RoomId, seq: i64) -> CommittedEvent {
        CommittedEvent {
            room: room.clone(),
            seq,
            json: frame(seq),
            public_json: None,
        }
    }
}
