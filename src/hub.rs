//! The hub: which sessions are connected, which have joined which room, who is online where,
//! and fan-out. An event is encoded once and the same bytes are `try_send`-ed into each
//! member's bounded outbox; a full outbox marks that session for closing with 4008 and never
//! slows the others. A session that joins with replay is "gated": live events are held for it
//! until its replay from the store has been queued, then released without duplicates.
//! The hub does no I/O and never awaits while holding a map guard. It knows nothing of SQL,
//! tokens or sockets (only the frame type the sockets take).

use crate::metrics::Metrics;
use crate::protocol::{self, PresenceState, RoomId, ServerMsg, SessionId, UserId, UserRef, close};
use crate::store::CommittedEvent;
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use tokio::sync::{Notify, mpsc, watch};

/// One encoded text frame, shared by every outbox it is queued in.
pub type Frame = Utf8Bytes;

/// What the hub holds of a session: where to queue frames and how to close it.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    pub user: UserId,
    /// This device takes a second call while in one (call waiting).
    pub call_waiting: bool,
    outbox: mpsc::Sender<Frame>,
    /// 0 while open; the close code once the session must end. Watched by its tasks.
    close: watch::Sender<u16>,
}

impl SessionHandle {
    pub fn new(
        id: SessionId,
        user: UserId,
        outbox: mpsc::Sender<Frame>,
    ) -> (Arc<Self>, watch::Receiver<u16>) {
        Self::with_call_waiting(id, user, outbox, false)
    }

    pub fn with_call_waiting(
        id: SessionId,
        user: UserId,
        outbox: mpsc::Sender<Frame>,
        call_waiting: bool,
    ) -> (Arc<Self>, watch::Receiver<u16>) {
        let (close, rx) = watch::channel(0);
        (
            Arc::new(Self {
                id,
                user,
                call_waiting,
                outbox,
                close,
            }),
            rx,
        )
    }

    /// Asks the session to close with `code`; the first code asked for wins.
    pub fn close(&self, code: u16) {
        self.close.send_if_modified(|c| {
            if *c == 0 {
                *c = code;
                true
            } else {
                false
            }
        });
    }

    /// Queues a frame without waiting. A full outbox closes the session as a slow consumer.
    fn offer(&self, frame: &Frame, metrics: &Metrics) -> bool {
        match self.outbox.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if *self.close.borrow() == 0 {
                    metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                    tracing::info!(session = %self.id, user = %self.user, "slow consumer, closing 4008");
                }
                self.close(close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

struct Member {
    handle: Arc<SessionHandle>,
    user: UserRef,
    /// Host or TA in this room: receives the full rendering of restricted events.
    moderator: bool,
    /// `Some` while the session's replay is being queued: live frames wait here, with their
    /// seq (unsequenced frames such as typing carry `None`).
    gate: Option<Vec<(Option<i64>, Frame)>>,
    /// The highest room seq queued to this session. A sequenced frame at or below it is a
    /// duplicate and is dropped: an event can be committed, read by a joining session's
    /// replay, and only then published.
    last_seq: i64,
}

#[derive(Default)]
struct RoomState {
    sessions: HashMap<SessionId, Member>,
    /// Users online in the room and how many of their sessions have joined it.
    online: HashMap<UserId, (UserRef, usize)>,
    /// Raised hands in raise order, with when they went up (ms).
    hands: Vec<(UserRef, i64)>,
    /// Users allowed to publish audio/video, in the order they went on stage.
    stage: Vec<UserRef>,
    /// The highest seq fanned out to the room, once known: from the store at the room's first
    /// join here, then from every event published (in seq order).
    published: Option<i64>,
}

/// Which sessions of a room a frame is for.
#[derive(Clone, Copy)]
enum Audience<'a> {
    Everyone,
    Others(&'a UserId),
    /// Host/TA sessions, plus every session of this user if given.
    Moderators(Option<&'a UserId>),
    User(&'a UserId),
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
pub enum Relayed<'a> {
    /// An unsequenced room frame (typing, muted, slow_mode, report, question_overdue).
    Notice {
        room: &'a RoomId,
        frame: &'a Frame,
        to: NoticeTo,
    },
    /// `kicked` then close 4003 for the user's sessions in the room.
    Kick {
        room: &'a RoomId,
        user: &'a UserId,
        reason: &'a str,
    },
    /// A hand went up (with when) or down.
    Hand {
        room: &'a RoomId,
        user: &'a UserRef,
        raised: bool,
        ts: i64,
    },
    /// A user went on or off stage.
    Stage {
        room: &'a RoomId,
        user: &'a UserRef,
        on: bool,
    },
}

/// The function that carries [`Relayed`] actions to the other nodes.
pub type Relay = Box<dyn Fn(Relayed<'_>) + Send + Sync>;

impl Audience<'_> {
    fn includes(&self, m: &Member) -> bool {
        match self {
            Self::Everyone => true,
            Self::Others(u) => &m.user.id != *u,
            Self::Moderators(u) => m.moderator || u.is_some_and(|u| &m.user.id == u),
            Self::User(u) => &m.user.id == *u,
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
        gate_cap: usize,
        metrics: &Metrics,
    ) -> Option<UserRef> {
        let pos = self.hands.iter().position(|(u, _)| &u.id == user)?;
        let (who, _) = self.hands.remove(pos);
        let frame = Frame::from(protocol::encode(&ServerMsg::Hand {
            room,
            user: &who,
            raised: false,
        }));
        let to = Audience::Moderators(tell_user.then_some(user));
        self.fan_out(&frame, None, None, to, gate_cap, metrics);
        Some(who)
    }

    /// Tells everyone in the room that the user went on or off stage.
    fn stage_changed(
        &mut self,
        room: &RoomId,
        user: &UserRef,
        on: bool,
        gate_cap: usize,
        metrics: &Metrics,
    ) {
        let frame = Frame::from(protocol::encode(&ServerMsg::Stage { room, user, on }));
        self.fan_out(&frame, None, None, Audience::Everyone, gate_cap, metrics);
    }

    /// Tells host/ta (and the user) that the user's hand went up.
    fn hand_raised(&mut self, room: &RoomId, user: &UserRef, gate_cap: usize, metrics: &Metrics) {
        let frame = Frame::from(protocol::encode(&ServerMsg::Hand {
            room,
            user,
            raised: true,
        }));
        let to = Audience::Moderators(Some(&user.id));
        self.fan_out(&frame, None, None, to, gate_cap, metrics);
    }

    /// Queues `frame` to the sessions in `to`; host/ta get `frame`, others `public` if given.
    fn fan_out(
        &mut self,
        frame: &Frame,
        public: Option<&Frame>,
        seq: Option<i64>,
        to: Audience<'_>,
        gate_cap: usize,
        metrics: &Metrics,
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
            match &mut m.gate {
                Some(held) => {
                    if held.len() >= gate_cap {
                        if *m.handle.close.borrow() == 0 {
                            metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                        }
                        m.handle.close(close::SLOW_CONSUMER);
                    } else {
                        held.push((seq, frame.clone()));
                    }
                }
                None => {
                    if let Some(s) = seq {
                        if s <= m.last_seq {
                            continue;
                        }
                        m.last_seq = s;
                    }
                    if m.handle.offer(frame, metrics) {
                        delivered += 1;
                    }
                }
            }
        }
        delivered
    }
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
    /// Online users, sorted by id, at most the presence limit.
    pub online: Vec<UserRef>,
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
    /// Most frames held for a gated session before it counts as a slow consumer.
    gate_cap: usize,
    // -- cluster mode: set and fed by `bus.rs`; empty on a single node --
    /// Carries notices and kicks to the other nodes.
    relay: OnceLock<Relay>,
    /// Users online in a room on other nodes (the union over the other nodes' heartbeats).
    remote_online: DashMap<RoomId, HashMap<UserId, UserRef>>,
    /// Sessions of a user on other nodes, with their call-waiting flag.
    remote_sessions: DashMap<UserId, Vec<(String, bool)>>,
    /// Woken when local presence changes, so the bus sends a heartbeat soon.
    pub presence_changed: Notify,
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
            gate_cap,
            relay: OnceLock::new(),
            remote_online: DashMap::new(),
            remote_sessions: DashMap::new(),
            presence_changed: Notify::new(),
        }
    }

    /// Sets the room size above which presence and typing are not broadcast.
    pub fn with_presence_limit(mut self, limit: usize) -> Self {
        self.presence_limit = limit;
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
    /// Re-joining a room the session is already in re-gates it (a resync).
    pub fn join(
        &self,
        room: &RoomId,
        handle: &Arc<SessionHandle>,
        user: UserRef,
        moderator: bool,
    ) -> Result<Joined, HubError> {
        let mut state = self.rooms.entry(room.clone()).or_default();
        let state = &mut *state;
        if let Some(m) = state.sessions.get_mut(&handle.id) {
            // A resync: the role may have changed since the first join.
            m.gate.get_or_insert_with(Vec::new);
            m.moderator = moderator;
            m.user = user.clone();
            if let Some(entry) = state.online.get_mut(&user.id) {
                entry.0 = user.clone();
            }
        } else {
            if state.sessions.len() >= self.max_room_sessions {
                return Err(HubError::RoomFull(self.max_room_sessions));
            }
            state.sessions.insert(
                handle.id.clone(),
                Member {
                    handle: handle.clone(),
                    user: user.clone(),
                    moderator,
                    gate: Some(Vec::new()),
                    last_seq: 0,
                },
            );
            let first = match state.online.entry(user.id.clone()) {
                Entry::Occupied(mut e) => {
                    e.get_mut().1 += 1;
                    false
                }
                Entry::Vacant(e) => {
                    e.insert((user.clone(), 1));
                    true
                }
            };
            let elsewhere = self.online_elsewhere(room, &user.id);
            if first {
                self.presence_changed.notify_one();
            }
            if first && !elsewhere && state.online.len() <= self.presence_limit {
                let frame = Frame::from(protocol::encode(&ServerMsg::Presence {
                    room,
                    user: &user,
                    state: PresenceState::Online,
                }));
                state.fan_out(
                    &frame,
                    None,
                    None,
                    Audience::Others(&user.id),
                    self.gate_cap,
                    &self.metrics,
                );
            }
        }
        let mut online: Vec<UserRef> = state.online.values().map(|(u, _)| u.clone()).collect();
        if let Some(remote) = self.remote_online.get(room) {
            online.extend(
                remote
                    .values()
                    .filter(|u| !state.online.contains_key(&u.id))
                    .cloned(),
            );
        }
        let online_count = online.len();
        online.sort_by(|a, b| a.id.cmp(&b.id));
        online.truncate(self.presence_limit);
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

    /// Releases the frames held for a gated session: those with seq <= `delivered_seq` were
    /// already sent by the replay and are dropped; the rest go out in order.
    pub fn open_gate(&self, room: &RoomId, session: &SessionId, delivered_seq: i64) {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(m) = state.sessions.get_mut(session) else {
            return;
        };
        let Some(held) = m.gate.take() else { return };
        m.last_seq = m.last_seq.max(delivered_seq);
        for (seq, frame) in held {
            if let Some(s) = seq {
                if s <= m.last_seq {
                    continue;
                }
                m.last_seq = s;
            }
            if !m.handle.offer(&frame, &self.metrics) {
                break;
            }
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
        }
        if last {
            if state.online.len() < self.presence_limit && !self.online_elsewhere(room, &uid) {
                let frame = Frame::from(protocol::encode(&ServerMsg::Presence {
                    room,
                    user: &member.user,
                    state: PresenceState::Offline,
                }));
                state.fan_out(
                    &frame,
                    None,
                    None,
                    Audience::Others(&uid),
                    self.gate_cap,
                    &self.metrics,
                );
            }
            // Hands and stage belong to people who are here (on any node).
            if !self.online_elsewhere(room, &uid) {
                if let Some(who) = state.lower_hand(room, &uid, false, self.gate_cap, &self.metrics)
                {
                    self.relay_with(Relayed::Hand {
                        room,
                        user: &who,
                        raised: false,
                        ts: 0,
                    });
                }
                if let Some(pos) = state.stage.iter().position(|u| u.id == uid) {
                    state.stage.remove(pos);
                    self.relay_with(Relayed::Stage {
                        room,
                        user: &member.user,
                        on: false,
                    });
                    state.stage_changed(room, &member.user, false, self.gate_cap, &self.metrics);
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
            let n = state.fan_out(
                &frame,
                public.as_ref(),
                Some(ev.seq),
                Audience::Everyone,
                self.gate_cap,
                &self.metrics,
            );
            self.metrics.deliveries.fetch_add(n, Relaxed);
        }
        self.metrics.events_published.fetch_add(1, Relaxed);
    }

    /// The highest seq fanned out to the room on this node, if known (see
    /// [`Hub::note_published_seq`]).
    pub fn published_seq(&self, room: &RoomId) -> Option<i64> {
        self.rooms.get(room).and_then(|s| s.published)
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
            Some(mut state) => state.fan_out(frame, None, None, to, self.gate_cap, &self.metrics),
            None => 0,
        };
        self.metrics.deliveries.fetch_add(n, Relaxed);
        n
    }

    /// Sends an unsequenced frame (typing) to the room's sessions of other users.
    pub fn notify_others(&self, room: &RoomId, from: &UserId, frame: &Frame) {
        if self
            .rooms
            .get(room)
            .is_some_and(|st| st.online.len() > self.presence_limit)
        {
            return;
        }
        self.send(room, frame, Audience::Others(from));
        self.relay_notice(room, frame, || NoticeTo::Others(from.clone()));
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
        if let Some(relay) = self.relay.get() {
            relay(Relayed::Notice {
                room,
                frame,
                to: to(),
            });
        }
    }

    /// The room role a user holds in the room right now, if online there: on this node, else
    /// on another node (cluster mode, as its last heartbeat said).
    pub fn online_role(&self, room: &RoomId, user: &UserId) -> Option<String> {
        let local = self
            .rooms
            .get(room)
            .and_then(|state| state.online.get(user).map(|(u, _)| u.role.clone()));
        local.or_else(|| self.remote_role(room, user))
    }

    /// The room role another node says the user is online with (cluster mode).
    pub fn remote_role(&self, room: &RoomId, user: &UserId) -> Option<String> {
        self.remote_online
            .get(room)
            .and_then(|m| m.get(user).map(|u| u.role.clone()))
    }

    /// Sends `kicked` to every session of `user` in the room and closes them 4003 (on every
    /// node in cluster mode; the count is this node's).
    pub fn kick(&self, room: &RoomId, user: &UserId, reason: &str) -> usize {
        if let Some(relay) = self.relay.get() {
            relay(Relayed::Kick { room, user, reason });
        }
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
        state.hand_raised(room, user, self.gate_cap, &self.metrics);
        let position = state.hands.len();
        drop(state);
        self.relay_with(Relayed::Hand {
            room,
            user,
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
        let lowered = state.lower_hand(room, user, true, self.gate_cap, &self.metrics);
        drop(state);
        match lowered {
            Some(who) => {
                self.relay_with(Relayed::Hand {
                    room,
                    user: &who,
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
            .map(|(u, _)| u.clone())
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
                state.lower_hand(room, user, true, self.gate_cap, &self.metrics);
            }
            (false, Some(pos)) => {
                state.stage.remove(pos);
            }
            _ => return Ok(state.stage.clone()),
        }
        state.stage_changed(room, &who, on, self.gate_cap, &self.metrics);
        // Never touches the hub: safe under the room's guard.
        self.relay_with(Relayed::Stage {
            room,
            user: &who,
            on,
        });
        Ok(state.stage.clone())
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

    /// Asks every session to close with `code` (shutdown).
    pub fn close_all(&self, code: u16) {
        for user in self.users.iter() {
            for s in user.iter() {
                s.close(code);
            }
        }
    }
}

/// Cluster mode: what `bus.rs` feeds in and reads out. Plain map updates, no I/O.
impl Hub {
    /// Installs the function that carries notices and kicks to the other nodes (once).
    pub fn set_relay(&self, relay: Relay) {
        let _ = self.relay.set(relay);
    }

    fn relay_with(&self, what: Relayed<'_>) {
        if let Some(relay) = self.relay.get() {
            relay(what);
        }
    }

    /// A hand raised or lowered on another node: this node's queue follows (kept in raise
    /// order), and its host/ta (and the user's sessions here) hear it.
    pub fn apply_hand(&self, room: &RoomId, user: &UserRef, raised: bool, ts: i64) {
        let Some(mut state) = self.rooms.get_mut(room) else {
            return;
        };
        if !raised {
            state.lower_hand(room, &user.id, true, self.gate_cap, &self.metrics);
            return;
        }
        if state.hands.iter().any(|(u, _)| u.id == user.id) {
            return;
        }
        let at = state.hands.partition_point(|(_, t)| *t <= ts);
        state.hands.insert(at, (user.clone(), ts));
        state.hand_raised(room, user, self.gate_cap, &self.metrics);
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
                state.lower_hand(room, &user.id, true, self.gate_cap, &self.metrics);
            }
            (false, Some(pos)) => {
                state.stage.remove(pos);
            }
            _ => return false,
        }
        state.stage_changed(room, user, on, self.gate_cap, &self.metrics);
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
        self.send(room, frame, to.audience());
    }

    /// Whether any session of this node has joined the room.
    pub fn has_room(&self, room: &RoomId) -> bool {
        self.rooms.contains_key(room)
    }

    /// Another node's users went online (`Some`) or offline in a room: record it, and tell
    /// this node's sessions when the union over nodes changed (the user is not online here).
    pub fn remote_presence(&self, room: &RoomId, user: &UserRef, online: bool) {
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
        let Some(mut state) = self.rooms.get_mut(room) else {
            return;
        };
        if state.online.contains_key(&user.id) {
            return;
        }
        if !online {
            // Gone from every node (a node died, say): hands and stage belong to people here.
            state.lower_hand(room, &user.id, false, self.gate_cap, &self.metrics);
            if let Some(pos) = state.stage.iter().position(|u| u.id == user.id) {
                state.stage.remove(pos);
                state.stage_changed(room, user, false, self.gate_cap, &self.metrics);
            }
        }
        if state.online.len() >= self.presence_limit {
            return;
        }
        let frame = Frame::from(protocol::encode(&ServerMsg::Presence {
            room,
            user,
            state: if online {
                PresenceState::Online
            } else {
                PresenceState::Offline
            },
        }));
        let n = state.fan_out(
            &frame,
            None,
            None,
            Audience::Everyone,
            self.gate_cap,
            &self.metrics,
        );
        self.metrics.deliveries.fetch_add(n, Relaxed);
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
                let users = r.online.values().map(|(u, _)| u.clone()).collect();
                (r.key().clone(), users)
            })
            .collect()
    }

    /// This node's sessions per user with their call-waiting flag, for its heartbeat.
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
                if *s.close.borrow() == 0 {
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
            role: "member".into(),
        }
    }

    fn session(
        id: &str,
        uid: &str,
        cap: usize,
    ) -> (
        Arc<SessionHandle>,
        mpsc::Receiver<Frame>,
        watch::Receiver<u16>,
    ) {
        let (tx, rx) = mpsc::channel(cap);
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

    fn drain(rx: &mut mpsc::Receiver<Frame>) -> Vec<String> {
        let mut out = vec![];
        while let Ok(f) = rx.try_recv() {
            out.push(f.as_str().to_owned());
        }
        out
    }

    #[test]
    fn gate_holds_live_events_and_drops_replayed_ones() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (a, mut arx, _) = session("s1", "a", 16);
        hub.join(&"r".into(), &a, user("a"), false).unwrap();
        hub.publish(ev("r", 5));
        hub.publish(ev("r", 6));
        assert!(drain(&mut arx).is_empty(), "gated");
        hub.open_gate(&"r".into(), &a.id, 5);
        assert_eq!(drain(&mut arx), vec!["{\"seq\":6}"]);
        hub.publish(ev("r", 7));
        assert_eq!(drain(&mut arx), vec!["{\"seq\":7}"]);
    }

    #[test]
    fn an_event_replayed_before_it_is_published_is_not_sent_twice() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (a, mut arx, _) = session("s1", "a", 16);
        hub.join(&"r".into(), &a, user("a"), false).unwrap();
        // Seq 6 is committed and the joiner's replay read it (delivered 6) before the writer
        // got to publish it.
        hub.open_gate(&"r".into(), &a.id, 6);
        hub.publish(ev("r", 6));
        hub.publish(ev("r", 7));
        hub.publish(ev("r", 7));
        assert_eq!(drain(&mut arx), vec!["{\"seq\":7}"]);
    }

    #[test]
    fn big_rooms_stop_broadcasting_presence_and_typing_but_count_everyone() {
        let hub = Hub::new(Arc::default(), 10, 100, 100).with_presence_limit(2);
        let (w, mut wrx, _) = session("w", "w", 16);
        hub.join(&"r".into(), &w, user("w"), false).unwrap();
        hub.open_gate(&"r".into(), &w.id, 0);
        let (a, _ar, _) = session("a", "a", 16);
        hub.join(&"r".into(), &a, user("a"), false).unwrap();
        assert_eq!(drain(&mut wrx).len(), 1, "second user: presence still sent");
        let (b, _br, _) = session("b", "b", 16);
        let joined = hub.join(&"r".into(), &b, user("b"), false).unwrap();
        assert!(drain(&mut wrx).is_empty(), "third user: over the limit");
        assert_eq!((joined.online.len(), joined.online_count), (2, 3));
        hub.notify_others(&"r".into(), &"a".into(), &Frame::from("typing"));
        assert!(drain(&mut wrx).is_empty(), "no typing in a big room");
    }

    #[test]
    fn full_outbox_closes_only_that_session() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let (slow, _srx, slow_close) = session("s1", "a", 2);
        let (fast, mut frx, fast_close) = session("s2", "b", 64);
        for h in [&slow, &fast] {
            hub.join(&"r".into(), h, user(h.user.as_str()), false)
                .unwrap();
            hub.open_gate(&"r".into(), &h.id, 0);
        }
        drain(&mut frx);
        for seq in 1..=10 {
            hub.publish(ev("r", seq));
        }
        assert_eq!(*slow_close.borrow(), close::SLOW_CONSUMER);
        assert_eq!(*fast_close.borrow(), 0);
        assert_eq!(drain(&mut frx).len(), 10);
    }

    #[test]
    fn presence_is_the_union_with_other_nodes() {
        let hub = Hub::new(Arc::default(), 10, 100, 100);
        let r = RoomId::from("r");
        let (w, mut wrx, _) = session("w", "w", 16);
        hub.join(&r, &w, user("w"), false).unwrap();
        hub.open_gate(&r, &w.id, 0);
        // Another node has "a" online: this node's sessions hear it once.
        hub.remote_presence(&r, &user("a"), true);
        hub.remote_presence(&r, &user("a"), true);
        let frames = drain(&mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("online"));
        // "a" also joins here: already online in the union, so no second announcement; the
        // join reply lists everyone once.
        let (a, _arx, _) = session("a1", "a", 16);
        let joined = hub.join(&r, &a, user("a"), false).unwrap();
        assert!(drain(&mut wrx).is_empty());
        assert_eq!(joined.online_count, 2);
        // Leaving here while still online elsewhere: no offline.
        hub.leave(&r, &a.id);
        assert!(drain(&mut wrx).is_empty());
        // The other node drops "a": now it is offline everywhere.
        hub.remote_presence(&r, &user("a"), false);
        let frames = drain(&mut wrx);
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
        assert_eq!(closes.iter().filter(|c| *c.borrow() != 0).count(), 2);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 2);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 1);
        assert_eq!(hub.close_some(close::GOING_AWAY, 2), 0);
        assert!(closes.iter().all(|c| *c.borrow() == close::GOING_AWAY));
    }

    #[test]
    fn presence_once_per_user_and_session_limit() {
        let hub = Hub::new(Arc::default(), 2, 100, 100);
        let (watcher, mut wrx, _) = session("w", "w", 16);
        hub.join(&"r".into(), &watcher, user("w"), false).unwrap();
        hub.open_gate(&"r".into(), &watcher.id, 0);
        let (p1, _r1, _) = session("p1", "a", 16);
        let (p2, _r2, _) = session("p2", "a", 16);
        let (p3, _r3, _) = session("p3", "a", 16);
        hub.register(p1.clone()).unwrap();
        hub.register(p2.clone()).unwrap();
        assert_eq!(hub.register(p3), Err(HubError::TooManySessions(2)));
        let joined = hub.join(&"r".into(), &p1, user("a"), false).unwrap();
        assert_eq!(joined.online.len(), 2);
        hub.join(&"r".into(), &p2, user("a"), false).unwrap();
        assert_eq!(drain(&mut wrx).len(), 1, "one online for two sessions");
        hub.leave(&"r".into(), &p1.id);
        assert!(drain(&mut wrx).is_empty(), "still online on p2");
        hub.leave(&"r".into(), &p2.id);
        let frames = drain(&mut wrx);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("offline"));
    }
}
