//! Cluster mode: several studyhall nodes on one PostgreSQL, joined by NATS. It owns the NATS
//! connection and everything that crosses nodes:
//!
//! - **Room events.** After commit, the committing node publishes each event once on the
//!   room's subject; every node with local members of the room is subscribed (from its first
//!   local member to its last) and hands the events to its hub through a per-room
//!   [`RoomSequencer`], in seq order, refilling from the store what NATS lost (a gap that
//!   stays open past `bus_gap_ms`, or a `last_seq` sweep). The bus is a lossy hint; the store
//!   is the truth.
//! - **Room notices and kicks** (typing, muted, slow_mode, report, overdue) on the same subject.
//! - **Directed frames** (calls, signals) on the owning node's subject: session and call ids
//!   end in `.NODE`. Call commands for a call another node owns, and SFU commands for a room
//!   whose SFU runs on another node, are forwarded there as a request and answered.
//! - **Presence**: each node's heartbeat lists its online users per room and its sessions,
//!   in parts that fit NATS's `max_payload` (split and reassembled by `presence_parts`); the
//!   union over live nodes is who is online, and a node silent past `presence_ttl_ms` drops
//!   out.
//! - **Control**: policy-cache invalidation and closed sessions, to every node.
//!
//! It knows nothing of sockets or SQL: it calls the hub, the store API and `rtc`.

pub mod presence_parts;
pub mod sequencer;

use crate::config::Config;
use crate::error::Error;
use crate::hub::{Frame, Hub, NoticeTo, Relayed};
use crate::metrics::Metrics;
use crate::node::{
    AvChange, BoardRelay, Broker, CallCommand, Inbound, SfuCommand, SfuReply, node_of,
};
use crate::protocol::{ErrorCode, RoomId, UserId, UserRef};
use crate::store::{CommittedEvent, Store, StoreError};
use async_nats::{Client, ConnectOptions, Event, Message, Subscriber};
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use presence_parts::{Assembled, Assembler, Part, Snapshot};
use sequencer::{Offered, RoomSequencer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

/// Subject prefix of every studyhall subject.
const PREFIX: &str = "studyhall";
/// Every node's heartbeat.
const PRESENCE_SUBJECT: &str = "studyhall.presence";
/// Cluster-wide control (policy invalidation, closed sessions).
const CTL_SUBJECT: &str = "studyhall.ctl";
/// Events read from the store per refill query.
const REFILL_PAGE: u32 = 1000;
/// Bytes per heartbeat part when the server did not say its `max_payload` (half NATS's
/// default).
const DEFAULT_PART_BUDGET: usize = 512 * 1024;

/// The channels between the bus and the rest of the node, made before either exists.
pub struct Links {
    /// What other nodes said that the app applies (see [`Inbound`]).
    pub inbound: mpsc::Sender<Inbound>,
    /// The hub's notices, kicks, hands and stage changes for the other nodes.
    pub relays: mpsc::Receiver<Relayed>,
    /// Rooms whose cached policy changed here.
    pub policy_changes: mpsc::Receiver<RoomId>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {why}")]
    Connect { url: String, why: String },
}

/// This node's name on the bus: the configured one, or a random one.
fn node_name(cfg: &Config) -> String {
    cfg.node_id
        .clone()
        .unwrap_or_else(|| format!("n{:08x}", rand::random::<u32>()))
}

/// What the bus does about a NATS connection event. After a (re)connect or a slow-consumer
/// drop, messages may have been missed: the node counts as disrupted and the sweep checks
/// its rooms for gaps at once. A disconnect ends the healthy stretch.
fn on_nats_event(
    ev: Event,
    node: &str,
    sweep_now: &Notify,
    disrupted: &AtomicBool,
    healthy: &Mutex<Option<Instant>>,
) {
    match ev {
        Event::Connected => {
            tracing::info!(node = %node, "NATS connected: checking rooms for gaps");
            *lock(healthy) = Some(Instant::now());
            disrupted.store(true, Relaxed);
            sweep_now.notify_one();
        }
        Event::SlowConsumer(sid) => {
            tracing::warn!(node = %node, sid, "NATS slow consumer: refilling from the store");
            *lock(healthy) = Some(Instant::now());
            disrupted.store(true, Relaxed);
            sweep_now.notify_one();
        }
        Event::Disconnected => {
            *lock(healthy) = None;
            tracing::warn!(node = %node, "NATS disconnected")
        }
        other => tracing::info!(node = %node, event = %other, "NATS event"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps updated without awaiting: usable after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A subject token for an id: bytes outside `[A-Za-z0-9_-]` (the `.` of room ids above all)
/// become `~XX`, so the encoding is one token and one-to-one.
pub fn subject_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

pub fn room_subject(room: &RoomId) -> String {
    format!("{PREFIX}.room.{}", subject_token(room.as_str()))
}

pub fn node_subject(node: &str) -> String {
    format!("{PREFIX}.node.{node}")
}

// -- the bus's own message encoding (between nodes only; never seen by clients) --------------

struct Writer(BytesMut);

impl Writer {
    fn new(tag: Tag, cap: usize) -> Self {
        let mut b = BytesMut::with_capacity(cap + 1);
        b.put_u8(tag as u8);
        Self(b)
    }
    fn str16(mut self, s: &str) -> Self {
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.0.put_u16(bytes.len() as u16);
        self.0.put_slice(bytes);
        self
    }
    fn rest(mut self, s: &[u8]) -> Bytes {
        self.0.put_slice(s);
        self.0.freeze()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str16(&mut self) -> Option<&'a str> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn rest_str(&mut self) -> Option<&'a str> {
        let s = std::str::from_utf8(self.0).ok();
        self.0 = &[];
        s
    }
}

/// The first byte of every bus message: what the rest of it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    /// Room subject: a committed event.
    Event = b'E',
    /// Room subject: a notice (typing, muted, ...) for some of the room's sessions.
    Notice = b'N',
    /// Room subject: a user removed from the room.
    Kick = b'K',
    /// Room subject: a hand raised or lowered.
    Hand = b'H',
    /// Room subject: a stage change.
    Stage = b'T',
    /// Node subject: a frame for one of the node's sessions.
    SessionFrame = b'S',
    /// Node subject: a call command, answered.
    Call = b'R',
    /// Control subject: a room's cached policy is stale.
    Invalidate = b'I',
    /// Control subject: a session closed.
    SessionClosed = b'X',
    /// Room subject: an A/V membership change.
    Av = b'A',
    /// Control subject: which sessions a user has on each node (a question, answered).
    Who = b'W',
    /// Room subject: a whiteboard update or sync.
    Board = b'B',
    /// Node subject: an SFU command for the room's owner node, answered.
    Sfu = b'F',
}

impl Tag {
    const ALL: [Tag; 13] = [
        Tag::Event,
        Tag::Notice,
        Tag::Kick,
        Tag::Hand,
        Tag::Stage,
        Tag::SessionFrame,
        Tag::Call,
        Tag::Invalidate,
        Tag::SessionClosed,
        Tag::Av,
        Tag::Who,
        Tag::Board,
        Tag::Sfu,
    ];

    /// The tag a message starts with, if it is one of ours.
    fn of(payload: &[u8]) -> Option<Tag> {
        let b = *payload.first()?;
        Tag::ALL.into_iter().find(|t| *t as u8 == b)
    }
}

fn encode_event(ev: &CommittedEvent) -> Bytes {
    let public = ev.public_json.as_deref().unwrap_or("");
    let mut b = BytesMut::with_capacity(ev.json.len() + public.len() + 26);
    b.put_u8(Tag::Event as u8);
    b.put_i64(ev.seq);
    b.put_u64(now_us());
    b.put_u32(ev.json.len() as u32);
    b.put_slice(ev.json.as_bytes());
    b.put_u8(u8::from(ev.public_json.is_some()));
    b.put_slice(public.as_bytes());
    b.freeze()
}

/// An event and when it was published (µs since the epoch).
fn decode_event(room: &RoomId, payload: &[u8]) -> Option<(CommittedEvent, u64)> {
    let mut r = Reader(payload.get(1..)?);
    let seq = r.u64()? as i64;
    let ts = r.u64()?;
    let n = r.u32()? as usize;
    let json = std::str::from_utf8(r.take(n)?).ok()?.to_owned();
    let has_public = r.u8()? == 1;
    let rest = r.rest_str()?;
    let public_json = has_public.then(|| rest.to_owned());
    Some((
        CommittedEvent {
            room: room.clone(),
            seq,
            json,
            public_json,
        },
        ts,
    ))
}

fn encode_notice(frame: &Frame, to: &NoticeTo) -> Bytes {
    let (tag, user) = match to {
        NoticeTo::Everyone => (0u8, ""),
        NoticeTo::Others(u) => (1, u.as_str()),
        NoticeTo::Moderators(None) => (2, ""),
        NoticeTo::Moderators(Some(u)) => (3, u.as_str()),
        NoticeTo::User(u) => (4, u.as_str()),
    };
    let mut w = Writer::new(Tag::Notice, frame.len() + user.len() + 3);
    w.0.put_u8(tag);
    w.str16(user).rest(frame.as_str().as_bytes())
}

fn decode_notice(payload: &[u8]) -> Option<(Frame, NoticeTo)> {
    let mut r = Reader(payload.get(1..)?);
    let tag = r.u8()?;
    let user = UserId::from(r.str16()?);
    let to = match tag {
        0 => NoticeTo::Everyone,
        1 => NoticeTo::Others(user),
        2 => NoticeTo::Moderators(None),
        3 => NoticeTo::Moderators(Some(user)),
        4 => NoticeTo::User(user),
        _ => return None,
    };
    Some((Frame::from(r.rest_str()?.to_owned()), to))
}

/// A forwarded command's answer from the node that ran it: `code` is `None` for success,
/// with `reply` (left out when it is the default).
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(
    serialize = "R: Serialize + Default + PartialEq",
    deserialize = "R: Deserialize<'de> + Default"
))]
struct Answer<R> {
    code: Option<ErrorCode>,
    message: String,
    #[serde(default, skip_serializing_if = "is_default")]
    reply: R,
}

fn is_default<R: Default + PartialEq>(r: &R) -> bool {
    *r == R::default()
}

impl<R: Default> Answer<R> {
    fn of(result: Result<R, Error>) -> Self {
        match result {
            Ok(reply) => Self {
                code: None,
                message: String::new(),
                reply,
            },
            Err(e) => Self {
                code: Some(e.code()),
                message: e.public_message(),
                reply: R::default(),
            },
        }
    }

    fn into_result(self) -> Result<R, Error> {
        match self.code {
            None => Ok(self.reply),
            Some(code) => Err(Error::from_code(code, self.message)),
        }
    }
}

struct NodeView {
    epoch: u64,
    version: u64,
    seen: Instant,
    rooms: HashMap<RoomId, HashMap<UserId, UserRef>>,
    sessions: SessionMap,
}

/// A node's sessions per user: (session id, call waiting).
type SessionMap = HashMap<UserId, Vec<(String, bool)>>;

/// Ready state of a room's subscription.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sub {
    Pending,
    Subscribed,
}

struct RoomEntry {
    seq: Mutex<RoomSequencer>,
    subscribed: watch::Sender<Sub>,
    /// Set (under `seq`) when the last local member left: nothing more goes to the hub.
    dead: AtomicBool,
    refilling: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct RoomSlot {
    /// Local sessions that have joined the room.
    refs: usize,
    /// The first joiner subscribes.
    fresh: bool,
    entry: Arc<RoomEntry>,
}

/// The node's side of the cluster.
pub struct Bus {
    pub node: String,
    /// This bus, for the tasks that `enter_room` spawns.
    me: std::sync::Weak<Bus>,
    client: Client,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    rooms: DashMap<RoomId, RoomSlot>,
    out: mpsc::Sender<(String, Bytes)>,
    out_rx: Mutex<Option<mpsc::Receiver<(String, Bytes)>>>,
    /// Woken by NATS reconnects and slow-consumer events: check every room against the store.
    sweep_now: Arc<Notify>,
    /// Set by a NATS (re)connect or slow-consumer event: policy invalidations may have been
    /// lost, so the sweep drops every cached room policy (they reload from the store).
    disrupted: Arc<AtomicBool>,
    /// Payload bytes in the publish queue (`out`).
    out_bytes: std::sync::atomic::AtomicUsize,
    /// `bus_queue_bytes`.
    out_bytes_max: usize,
    gap: Duration,
    sweep: Duration,
    heartbeat: Duration,
    ttl: Duration,
    request_timeout: Duration,
    nodes: Mutex<HashMap<String, NodeView>>,
    /// Other nodes' heartbeats whose parts have not all arrived (locked after `nodes`).
    assembly: Mutex<Assembler>,
    /// Where what concerns more than the hub goes (see [`Inbound`]).
    inbound: mpsc::Sender<Inbound>,
    /// The hub's relays and the policy cache's changes, until `start` drains them.
    relays: Mutex<Option<mpsc::Receiver<Relayed>>>,
    policy_changes: Mutex<Option<mpsc::Receiver<RoomId>>>,
    epoch: u64,
    version: AtomicU64,
    leaving: AtomicBool,
    /// Since when the NATS connection has been up without losses (`None` while it is down).
    healthy_since: Arc<Mutex<Option<Instant>>>,
    /// Node runs that went silent while this node could not tell a dead node from its own
    /// bad connection: their A/V members go once it can (see [`Bus::expire`]).
    silent_unsure: Mutex<Vec<(String, u64)>>,
}

impl Bus {
    /// Connects to NATS (failing at once if it cannot: a misconfigured cluster must say so at
    /// start).
    pub async fn connect(
        cfg: &Config,
        url: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        links: Links,
    ) -> Result<Arc<Self>, BusError> {
        let node = node_name(cfg);
        let sweep_now = Arc::new(Notify::new());
        let events = sweep_now.clone();
        let disrupted = Arc::new(AtomicBool::new(false));
        let disrupted_ev = disrupted.clone();
        let healthy_since = Arc::new(Mutex::new(Some(Instant::now())));
        let healthy_ev = healthy_since.clone();
        let event_node = node.clone();
        let client = ConnectOptions::new()
            .name(format!("studyhall-{node}"))
            .no_echo()
            .request_timeout(Some(Duration::from_millis(cfg.bus_request_timeout_ms)))
            .event_callback(move |ev| {
                let events = events.clone();
                let node = event_node.clone();
                let disrupted = disrupted_ev.clone();
                let healthy = healthy_ev.clone();
                async move { on_nats_event(ev, &node, &events, &disrupted, &healthy) }
            })
            .connect(url)
            .await
            .map_err(|e| BusError::Connect {
                url: crate::config::redact_url(url),
                why: e.to_string(),
            })?;
        let (out, out_rx) = mpsc::channel(cfg.bus_queue_max);
        tracing::info!(node = %node, "joined the cluster bus");
        Ok(Arc::new_cyclic(|me| Self {
            node,
            me: me.clone(),
            client,
            hub,
            metrics,
            rooms: DashMap::new(),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            sweep_now,
            disrupted,
            out_bytes: std::sync::atomic::AtomicUsize::new(0),
            out_bytes_max: cfg.bus_queue_bytes,
            gap: Duration::from_millis(cfg.bus_gap_ms),
            sweep: Duration::from_millis(cfg.bus_sweep_ms),
            heartbeat: Duration::from_millis(cfg.presence_heartbeat_ms),
            ttl: Duration::from_millis(cfg.presence_ttl_ms),
            request_timeout: Duration::from_millis(cfg.bus_request_timeout_ms),
            nodes: Mutex::new(HashMap::new()),
            assembly: Mutex::new(Assembler::default()),
            inbound: links.inbound,
            relays: Mutex::new(Some(links.relays)),
            policy_changes: Mutex::new(Some(links.policy_changes)),
            epoch: rand::random(),
            version: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            healthy_since,
            silent_unsure: Mutex::new(Vec::new()),
        }))
    }

    /// Queues a message for the publisher task without waiting; false if the queue is full.
    fn enqueue(&self, subject: String, payload: Bytes) -> bool {
        // Bounded in bytes as well as in messages: while NATS stalls, 65,536 large events
        // must not pile up into gigabytes. A dropped publish is refilled like any NATS loss.
        let len = payload.len();
        if self.out_bytes.fetch_add(len, AcqRel) + len > self.out_bytes_max {
            self.out_bytes.fetch_sub(len, AcqRel);
            return false;
        }
        if self.out.try_send((subject, payload)).is_err() {
            self.out_bytes.fetch_sub(len, AcqRel);
            return false;
        }
        true
    }

    /// The commit hook in cluster mode (runs in commit order on the committing node): publish
    /// once on the room's subject, and hand the event to this node's sequencer.
    fn publish_committed(&self, ev: CommittedEvent) {
        if self.enqueue(room_subject(&ev.room), encode_event(&ev)) {
            self.metrics.bus_published.fetch_add(1, Relaxed);
        }
        let entry = self.rooms.get(&ev.room).map(|s| s.entry.clone());
        if let Some(entry) = entry {
            self.offer(&entry, ev, false);
        }
    }

    /// Hands an event to the room's sequencer; what follows in order goes to the hub, under
    /// the room's lock so that the hub sees seq order.
    fn offer(&self, entry: &RoomEntry, ev: CommittedEvent, refill: bool) {
        let mut seq = lock(&entry.seq);
        if entry.dead.load(Relaxed) {
            return;
        }
        let hub = &self.hub;
        match seq.offer(ev, Instant::now(), &mut |e| hub.publish(e)) {
            Offered::Delivered if refill => {
                self.metrics.bus_refilled_events.fetch_add(1, Relaxed);
            }
            Offered::Duplicate if !refill => {
                self.metrics.bus_duplicates.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }

    /// A local session is joining `room`: make sure this node is subscribed to it and knows
    /// where its sequence stands, BEFORE the session's gate is set and its replay read, so
    /// every event after the replay reaches the hub in order. Balanced by [`Bus::leave_room`]
    /// (also when this fails).
    async fn subscribe_room(&self, room: &RoomId, store: &Store) -> Result<(), StoreError> {
        let (entry, fresh) = {
            let mut slot = self.rooms.entry(room.clone()).or_insert_with(|| RoomSlot {
                refs: 0,
                fresh: true,
                entry: Arc::new(RoomEntry {
                    seq: Mutex::new(RoomSequencer::new()),
                    subscribed: watch::channel(Sub::Pending).0,
                    dead: AtomicBool::new(false),
                    refilling: AtomicBool::new(false),
                    task: Mutex::new(None),
                }),
            });
            slot.refs += 1;
            (slot.entry.clone(), std::mem::take(&mut slot.fresh))
        };
        if fresh {
            match self.client.subscribe(room_subject(room)).await {
                Ok(sub) => {
                    let Some(me) = self.me.upgrade() else {
                        return Ok(());
                    };
                    let task = tokio::spawn(me.room_task(room.clone(), entry.clone(), sub));
                    *lock(&entry.task) = Some(task);
                    if entry.dead.load(Relaxed) {
                        // The last member left while this was subscribing.
                        if let Some(t) = lock(&entry.task).take() {
                            t.abort();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "NATS subscribe failed; the sweep refills this room")
                }
            }
            // The server has the subscription once a round trip has come back.
            let _ = tokio::time::timeout(self.request_timeout, self.client.flush()).await;
            entry.subscribed.send_replace(Sub::Subscribed);
        } else {
            let mut rx = entry.subscribed.subscribe();
            let _ = rx.wait_for(|s| *s == Sub::Subscribed).await;
        }
        if lock(&entry.seq).next().is_none() {
            match store.last_seq(room).await {
                Ok(last) => {
                    let mut seq = lock(&entry.seq);
                    let hub = &self.hub;
                    if !entry.dead.load(Relaxed) {
                        seq.start(last, Instant::now(), &mut |e| hub.publish(e));
                    }
                }
                Err(e) => {
                    self.unsubscribe_room(room);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A local session left `room` (or failed to join it): after the last one, unsubscribe.
    fn unsubscribe_room(&self, room: &RoomId) {
        let removed = self.rooms.remove_if_mut(room, |_, slot| {
            slot.refs = slot.refs.saturating_sub(1);
            slot.refs == 0
        });
        if let Some((_, slot)) = removed {
            let _seq = lock(&slot.entry.seq);
            slot.entry.dead.store(true, Relaxed);
            if let Some(task) = lock(&slot.entry.task).take() {
                // Dropping the subscriber unsubscribes.
                task.abort();
            }
        }
    }

    /// Rooms this node is subscribed to.
    pub fn subscribed_rooms(&self) -> usize {
        self.rooms.len()
    }

    async fn room_task(self: Arc<Self>, room: RoomId, entry: Arc<RoomEntry>, mut sub: Subscriber) {
        while let Some(msg) = sub.next().await {
            let payload = &msg.payload;
            match Tag::of(payload) {
                Some(Tag::Event) => self.room_event(&room, &entry, payload).await,
                Some(Tag::Notice) => {
                    if let Some((frame, to)) = decode_notice(payload) {
                        self.hub.apply_notice(&room, &frame, &to);
                    }
                }
                Some(Tag::Kick) => self.room_kick(&room, payload).await,
                Some(Tag::Hand) => {
                    let mut r = Reader(&payload[1..]);
                    if let (Some(raised), Some(ts)) = (r.u8(), r.u64())
                        && let Ok(user) = serde_json::from_slice::<UserRef>(r.0)
                    {
                        self.hub.apply_hand(&room, &user, raised == 1, ts as i64);
                    }
                }
                Some(_) => {
                    if let Some(inbound) = self.room_inbound(&room, payload) {
                        let _ = self.inbound.send(inbound).await;
                    }
                }
                None => {}
            }
        }
    }

    /// A room event committed on another node: to the app (slow-mode clocks), then in seq
    /// order to this node's sessions. A class that moved goes in another order: the app drops
    /// the room's cached state before the sessions hear of it (so what they send next is
    /// checked against the new state), and what the move does here (an end closes the A/V)
    /// comes after they heard.
    async fn room_event(&self, room: &RoomId, entry: &Arc<RoomEntry>, payload: &[u8]) {
        let Some((ev, ts)) = decode_event(room, payload) else {
            return;
        };
        self.metrics.bus_received.fetch_add(1, Relaxed);
        let remote = Inbound::RemoteEvent {
            room: room.clone(),
            json: ev.json.clone(),
        };
        self.metrics
            .bus_latency(Duration::from_micros(now_us().saturating_sub(ts)));
        if !crate::protocol::ClassState::in_event(&ev.json) {
            let _ = self.inbound.send(remote).await;
            self.offer(entry, ev, false);
            return;
        }
        let (done, applied) = tokio::sync::oneshot::channel();
        let _ = self
            .inbound
            .send(Inbound::PolicyChanged(room.clone()))
            .await;
        if self.inbound.send(Inbound::Barrier(done)).await.is_ok() {
            let _ = applied.await;
        }
        self.offer(entry, ev, false);
        let _ = self.inbound.send(remote).await;
    }

    /// A kick (or ban, or removal) made on another node, for this node's sessions.
    async fn room_kick(&self, room: &RoomId, payload: &[u8]) {
        let mut r = Reader(&payload[1..]);
        if let (Some(user), Some(reason)) = (r.str16(), r.rest_str()) {
            // A ban or removal comes with a kick: drop the cached access now, so a join racing
            // it here rechecks against the store (the invalidation on the control subject may
            // come later than the kick).
            let _ = self
                .inbound
                .send(Inbound::PolicyChanged(room.clone()))
                .await;
            // A removal over the HTTP API ("removed") is the platform's word and takes host/ta
            // too; a kick or ban from a session's command spares them.
            self.hub
                .kick_local(room, &UserId::from(user), reason, reason != "removed");
        }
    }

    /// What a room message of another node asks of the app (A/V membership, whiteboards,
    /// stage changes), decoded; `None` for an unknown or malformed one, or one of our own.
    fn room_inbound(&self, room: &RoomId, payload: &[u8]) -> Option<Inbound> {
        let mut r = Reader(payload.get(1..)?);
        match Tag::of(payload)? {
            Tag::Av => {
                let (joined, generation, run, session, user) =
                    (r.u8()?, r.u64()?, r.u64()?, r.str16()?, r.rest_str()?);
                // Our own relays come back on the room subject too.
                if node_of(session) == Some(self.node.as_str()) {
                    return None;
                }
                let change = AvChange {
                    session: session.to_owned(),
                    user: user.to_owned(),
                    generation,
                    run,
                    joined: joined == 1,
                };
                Some(Inbound::Av {
                    room: room.clone(),
                    change,
                })
            }
            Tag::Board => {
                let (kind, board) = (r.u8()?, r.str16()?);
                let bytes = r.0.to_vec();
                let relay = match kind {
                    0 => BoardRelay::Update(bytes),
                    1 => BoardRelay::Sync(bytes),
                    _ => return None,
                };
                Some(Inbound::Board {
                    room: room.clone(),
                    board: board.to_owned(),
                    relay,
                })
            }
            Tag::Stage => {
                let on = r.u8()? == 1;
                let user = serde_json::from_slice::<UserRef>(r.0).ok()?;
                self.hub
                    .apply_stage(room, &user, on)
                    .then(|| Inbound::Stage {
                        room: room.clone(),
                        user: user.id.clone(),
                        on,
                    })
            }
            _ => None,
        }
    }

    /// Reads the seqs after the last one handed on from the store and offers them.
    async fn refill(self: Arc<Self>, room: RoomId, entry: Arc<RoomEntry>, store: Store) {
        if entry.refilling.swap(true, AcqRel) {
            return;
        }
        self.metrics.bus_gap_refills.fetch_add(1, Relaxed);
        loop {
            let Some(after) = lock(&entry.seq).next().map(|n| n - 1) else {
                break;
            };
            match store.committed_after(&room, after, REFILL_PAGE).await {
                Ok(events) => {
                    let n = events.len();
                    for ev in events {
                        self.offer(&entry, ev, true);
                    }
                    if n < REFILL_PAGE as usize || entry.dead.load(Relaxed) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "gap refill failed; retrying at the next check");
                    break;
                }
            }
        }
        entry.refilling.store(false, Relaxed);
    }

    /// Refills rooms whose gap has been open past the bound.
    async fn gap_task(self: Arc<Self>, store: Store) {
        let mut tick = tokio::time::interval((self.gap / 2).max(Duration::from_millis(5)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let due: Vec<(RoomId, Arc<RoomEntry>)> = self
                .rooms
                .iter()
                .filter(|s| lock(&s.entry.seq).refill_due(now, self.gap).is_some())
                .map(|s| (s.key().clone(), s.entry.clone()))
                .collect();
            for (room, entry) in due {
                tokio::spawn(self.clone().refill(room, entry, store.clone()));
            }
        }
    }

    /// Compares every subscribed room's `last_seq` in the store with what was handed on: an
    /// event lost at the end of a burst shows no gap until this looks.
    async fn sweep_task(self: Arc<Self>, store: Store) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.sweep) => {}
                _ = self.sweep_now.notified() => {}
            }
            if self.disrupted.swap(false, AcqRel) {
                let _ = self.inbound.send(Inbound::PoliciesStale).await;
            }
            let rooms: Vec<(RoomId, Arc<RoomEntry>)> = self
                .rooms
                .iter()
                .map(|s| (s.key().clone(), s.entry.clone()))
                .collect();
            // One query per few hundred rooms, not one per room.
            let ids: Vec<RoomId> = rooms.iter().map(|(r, _)| r.clone()).collect();
            let lasts = match store.last_seqs(&ids).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "sweep: last_seq failed");
                    continue;
                }
            };
            for (room, entry) in rooms {
                let Some(next) = lock(&entry.seq).next() else {
                    continue;
                };
                if lasts.get(&room).is_some_and(|last| *last >= next) {
                    tokio::spawn(self.clone().refill(room, entry, store.clone()));
                }
            }
        }
    }

    async fn publisher_task(self: Arc<Self>, mut rx: mpsc::Receiver<(String, Bytes)>) {
        let mut failures = 0u64;
        while let Some((subject, payload)) = rx.recv().await {
            self.out_bytes.fetch_sub(payload.len(), AcqRel);
            if let Err(e) = self.client.publish(subject, payload).await {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "NATS publish failed (receivers refill from the store)");
                }
            }
        }
    }

    // -- directed traffic ---------------------------------------------------------------------

    /// Queues a frame to a session on whichever node holds it. False if it is a local session
    /// that is gone (a remote one is sent and assumed there).
    fn send_directed(&self, session: &str, frame: &Frame) -> bool {
        match node_of(session) {
            Some(node) if node != self.node => {
                let payload = Writer::new(Tag::SessionFrame, session.len() + frame.len() + 2)
                    .str16(session)
                    .rest(frame.as_str().as_bytes());
                self.metrics.bus_directed.fetch_add(1, Relaxed);
                self.enqueue(node_subject(node), payload)
            }
            _ => self.hub.send_to_session(session, frame),
        }
    }

    /// Forwards a call command to the node that owns the call and waits for its answer.
    /// Sends a command (`tag`, JSON body) to `node` and waits, at most `timeout`, for its
    /// answer; `unavailable` (saying `unanswered`) if none comes.
    async fn request<C: Serialize, R: serde::de::DeserializeOwned + Default>(
        client: Client,
        timeout: Duration,
        node: String,
        tag: Tag,
        cmd: C,
        unanswered: String,
    ) -> Result<R, Error> {
        let body = serde_json::to_vec(&cmd).map_err(|e| Error::Internal(e.to_string()))?;
        let payload = Writer::new(tag, body.len()).rest(&body);
        let answer =
            tokio::time::timeout(timeout, client.request(node_subject(&node), payload)).await;
        let Ok(Ok(msg)) = answer else {
            return Err(Error::Unavailable(unanswered));
        };
        serde_json::from_slice::<Answer<R>>(&msg.payload)
            .map_err(|e| Error::Internal(format!("bad answer from node {node}: {e}")))?
            .into_result()
    }

    /// Answers a command another node sent with [`Bus::request`]: `run` does it here.
    async fn answer<C, R, F>(&self, msg: Message, what: &str, run: impl FnOnce(C) -> F)
    where
        C: serde::de::DeserializeOwned,
        R: Serialize + Default + PartialEq,
        F: std::future::Future<Output = Result<R, Error>>,
    {
        let Some(reply) = msg.reply else { return };
        let answer = match serde_json::from_slice::<C>(msg.payload.get(1..).unwrap_or_default()) {
            Ok(command) => Answer::of(run(command).await),
            Err(e) => Answer::of(Err(Error::bad_request(format!("bad {what}: {e}")))),
        };
        if let Ok(body) = serde_json::to_vec(&answer)
            && let Err(e) = self.client.publish(reply, Bytes::from(body)).await
        {
            tracing::warn!(error = %e, "could not answer a forwarded {what}");
        }
    }

    /// Hands a forwarded command to the app (`make` wraps it with the answer's sender) and
    /// waits for its answer.
    async fn ask_app<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<R, Error>>) -> Inbound,
    ) -> Result<R, Error> {
        let gone = || Error::Unavailable("the server is shutting down".into());
        let (answer, answered) = oneshot::channel();
        if self.inbound.send(make(answer)).await.is_err() {
            return Err(gone());
        }
        answered.await.unwrap_or_else(|_| Err(gone()))
    }

    async fn node_task(self: Arc<Self>, mut sub: Subscriber) {
        while let Some(msg) = sub.next().await {
            match Tag::of(&msg.payload) {
                Some(Tag::SessionFrame) => {
                    let mut r = Reader(&msg.payload[1..]);
                    if let (Some(sid), Some(frame)) = (r.str16(), r.rest_str()) {
                        self.hub
                            .send_to_session(sid, &Frame::from(frame.to_owned()));
                    }
                }
                Some(Tag::Call) => self.answer_call(msg).await,
                // Not awaited here: an SFU join reads the store. A session's SFU commands keep
                // their order, since its node waits for each answer before sending the next.
                Some(Tag::Sfu) => {
                    tokio::spawn(self.clone().answer_sfu(msg));
                }
                _ => {}
            }
        }
    }

    async fn answer_call(&self, msg: Message) {
        self.answer(msg, "call command", async |command| {
            self.ask_app(|answer| Inbound::Call { command, answer })
                .await
        })
        .await;
    }

    async fn answer_sfu(self: Arc<Self>, msg: Message) {
        self.answer(msg, "SFU command", async |command| {
            self.ask_app(|answer| Inbound::Sfu { command, answer })
                .await
        })
        .await;
    }

    // -- control --------------------------------------------------------------------------------

    /// A room's settings or mutes changed here: other nodes drop their cached policy.
    fn policy_changed(&self, room: &RoomId) {
        self.enqueue(
            CTL_SUBJECT.into(),
            Writer::new(Tag::Invalidate, room.as_str().len()).rest(room.as_str().as_bytes()),
        );
    }

    /// A local session ended: calls on other nodes give it the grace period.
    fn announce_closed(&self, user: &UserId, session: &str) {
        self.enqueue(
            CTL_SUBJECT.into(),
            Writer::new(Tag::SessionClosed, user.as_str().len() + session.len() + 2)
                .str16(user.as_str())
                .rest(session.as_bytes()),
        );
    }

    /// Carries the hub's notices and kicks to the nodes subscribed to the room.
    fn relay(&self, what: Relayed) {
        match what {
            Relayed::Notice { room, frame, to } => {
                self.enqueue(room_subject(&room), encode_notice(&frame, &to));
            }
            Relayed::Kick { room, user, reason } => {
                let payload = Writer::new(Tag::Kick, user.as_str().len() + reason.len() + 2)
                    .str16(user.as_str())
                    .rest(reason.as_bytes());
                self.enqueue(room_subject(&room), payload);
            }
            Relayed::Hand {
                room,
                user,
                raised,
                ts,
            } => {
                if let Ok(json) = serde_json::to_vec(&user) {
                    let mut w = Writer::new(Tag::Hand, json.len() + 9);
                    w.0.put_u8(u8::from(raised));
                    w.0.put_u64(ts.max(0) as u64);
                    self.enqueue(room_subject(&room), w.rest(&json));
                }
            }
            Relayed::Stage { room, user, on } => {
                if let Ok(json) = serde_json::to_vec(&user) {
                    let mut w = Writer::new(Tag::Stage, json.len() + 1);
                    w.0.put_u8(u8::from(on));
                    self.enqueue(room_subject(&room), w.rest(&json));
                }
            }
        }
    }

    /// Publishes what the hub relays (see [`crate::hub::RelaySender`]).
    async fn relay_task(self: Arc<Self>, mut rx: mpsc::Receiver<Relayed>) {
        while let Some(what) = rx.recv().await {
            self.relay(what);
        }
    }

    /// Announces the policy cache's local changes.
    async fn policy_task(self: Arc<Self>, mut rx: mpsc::Receiver<RoomId>) {
        while let Some(room) = rx.recv().await {
            self.policy_changed(&room);
        }
    }

    /// A local session joined or left a room's A/V: the other nodes with members of the room
    /// tell their A/V members (`av_peer`) and can relay signals to it.
    fn relay_av(&self, room: &RoomId, change: &AvChange) {
        let mut w = Writer::new(Tag::Av, change.session.len() + change.user.len() + 19);
        w.0.put_u8(u8::from(change.joined));
        w.0.put_u64(change.generation);
        w.0.put_u64(change.run);
        let payload = w.str16(&change.session).rest(change.user.as_bytes());
        self.enqueue(room_subject(room), payload);
    }

    /// This run's epoch (random at each start).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn ctl_task(self: Arc<Self>, mut sub: Subscriber) {
        while let Some(msg) = sub.next().await {
            let mut r = Reader(msg.payload.get(1..).unwrap_or_default());
            match Tag::of(&msg.payload) {
                Some(Tag::Invalidate) => {
                    if let Some(room) = r.rest_str() {
                        let _ = self
                            .inbound
                            .send(Inbound::PolicyChanged(RoomId::from(room)))
                            .await;
                    }
                }
                Some(Tag::Who) => {
                    // Not its own question: the asker counts the other nodes' answers.
                    if let (Some(reply), Some(asker), Some(user)) =
                        (msg.reply.clone(), r.str16(), r.rest_str())
                        && asker != self.node
                    {
                        let mine = self.hub.local_sessions(&UserId::from(user));
                        if let Ok(body) = serde_json::to_vec(&mine)
                            && let Err(e) = self.client.publish(reply, Bytes::from(body)).await
                        {
                            tracing::debug!(error = %e, "could not answer a sessions question");
                        }
                    }
                }
                Some(Tag::SessionClosed) => {
                    if let (Some(user), Some(sid)) = (r.str16(), r.rest_str()) {
                        let closed = Inbound::SessionClosed {
                            user: UserId::from(user),
                            session: sid.to_owned(),
                        };
                        let _ = self.inbound.send(closed).await;
                    }
                }
                _ => {}
            }
        }
    }

    /// Asks every other node for `user`'s sessions there (one question on the control
    /// subject, naming the asker so that it does not answer itself; every other node answers
    /// on one inbox). Returns once every node this one hears has answered, or after the
    /// timeout with what came.
    async fn ask_sessions_now(
        client: Client,
        timeout: Duration,
        expected: usize,
        asker: String,
        user: UserId,
    ) -> Vec<(String, bool)> {
        let inbox = client.new_inbox();
        let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
            return Vec::new();
        };
        let question = Writer::new(Tag::Who, asker.len() + user.as_str().len() + 2)
            .str16(&asker)
            .rest(user.as_str().as_bytes());
        if client
            .publish_with_reply(CTL_SUBJECT, inbox, question)
            .await
            .is_err()
        {
            return Vec::new();
        }
        let mut found = Vec::new();
        let mut answered = 0;
        let _ = tokio::time::timeout(timeout, async {
            while let Some(msg) = answers.next().await {
                if let Ok(sessions) = serde_json::from_slice::<Vec<(String, bool)>>(&msg.payload) {
                    found.extend(sessions);
                }
                answered += 1;
                // Every node this one hears has answered; one it does not hear yet may still,
                // within the timeout, unless the others already named sessions.
                if answered >= expected.max(1) {
                    break;
                }
            }
        })
        .await;
        found
    }

    // -- presence -------------------------------------------------------------------------------

    fn heartbeat_now(&self, leaving: bool) -> Snapshot {
        Snapshot {
            node: self.node.clone(),
            epoch: self.epoch,
            version: self.version.fetch_add(1, Relaxed) + 1,
            leaving,
            rooms: if leaving {
                Vec::new()
            } else {
                self.hub.presence_snapshot()
            },
            sessions: if leaving {
                Vec::new()
            } else {
                self.hub.sessions_snapshot()
            },
        }
    }

    /// Publishes this node's presence snapshot, in parts of at most half the server's
    /// `max_payload` each (so any node size fits; a receiver applies it once it has every part).
    async fn publish_heartbeat(&self, leaving: bool) {
        let hb = self.heartbeat_now(leaving);
        let max_payload = self.client.server_info().max_payload;
        let budget = if max_payload == 0 {
            DEFAULT_PART_BUDGET
        } else {
            max_payload / 2
        };
        let parts = match crate::cluster::presence_parts::split(&hb, budget) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat not encoded");
                return;
            }
        };
        self.metrics.bus_heartbeats.fetch_add(1, Relaxed);
        self.metrics
            .bus_heartbeat_parts
            .fetch_add(parts.len() as u64, Relaxed);
        for part in parts {
            if let Err(e) = self
                .client
                .publish(PRESENCE_SUBJECT, Bytes::from(part))
                .await
            {
                tracing::debug!(error = %e, "heartbeat part not sent");
            }
        }
    }

    /// Sends this node's heartbeat every `presence_heartbeat_ms`, and soon after a local
    /// presence change (a quarter heartbeat later, at least 50 ms); expires silent nodes.
    async fn heartbeat_task(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => {}
                _ = self.hub.presence_changed.notified() => {
                    // Coalesce a burst of joins into one heartbeat.
                    tokio::time::sleep((self.heartbeat / 4).max(Duration::from_millis(50))).await;
                }
            }
            if self.leaving.load(Relaxed) {
                continue;
            }
            self.publish_heartbeat(false).await;
            self.expire(Instant::now());
        }
    }

    async fn presence_task(self: Arc<Self>, mut sub: Subscriber) {
        while let Some(msg) = sub.next().await {
            match serde_json::from_slice::<Part>(&msg.payload) {
                Ok(part) if part.node != self.node => self.heartbeat_part(part),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "bad heartbeat"),
            }
        }
    }

    /// One part of another node's heartbeat: any part of the node's current epoch shows it is
    /// alive; the snapshot is applied once all its parts are here (until then the node keeps
    /// its previous view).
    fn heartbeat_part(&self, part: Part) {
        let now = Instant::now();
        let mut nodes = lock(&self.nodes);
        let view = nodes.get_mut(&part.node);
        let applied = view.map(|v| {
            if v.epoch == part.epoch {
                v.seen = now;
            }
            (v.epoch, v.version)
        });
        let node = part.node.clone();
        let assembled = lock(&self.assembly).offer(part, applied, now);
        match assembled {
            Assembled::Complete(hb) => self.apply_heartbeat(&mut nodes, hb),
            Assembled::Partial | Assembled::Stale => {}
            Assembled::Invalid => tracing::debug!(node = %node, "bad heartbeat part"),
        }
    }

    fn apply_heartbeat(&self, nodes: &mut HashMap<String, NodeView>, hb: Snapshot) {
        if let Some(old) = nodes.get_mut(&hb.node)
            && old.epoch == hb.epoch
        {
            if hb.version <= old.version {
                return;
            }
            if !hb.leaving && same_rooms(&old.rooms, &hb.rooms) {
                // The common case: nothing changed but the time.
                old.seen = Instant::now();
                old.version = hb.version;
                let new: SessionMap = hb.sessions.into_iter().collect();
                let changed = changed_users(&old.sessions, &new);
                old.sessions = new;
                self.update_directory(nodes, changed);
                return;
            }
        }
        if hb.leaving {
            self.node_gone(&hb.node, hb.epoch);
        }
        if let Some(old) = nodes.get(&hb.node)
            && old.epoch != hb.epoch
        {
            // The node started again under its name: its earlier run is gone.
            self.node_gone(&hb.node, old.epoch);
        }
        let (old, old_sessions) = nodes
            .remove(&hb.node)
            .map(|n| (n.rooms, n.sessions))
            .unwrap_or_default();
        let new_sessions: SessionMap = if hb.leaving {
            HashMap::new()
        } else {
            hb.sessions.into_iter().collect()
        };
        let changed = changed_users(&old_sessions, &new_sessions);
        let new: HashMap<RoomId, HashMap<UserId, UserRef>> = if hb.leaving {
            HashMap::new()
        } else {
            hb.rooms
                .into_iter()
                .map(|(room, users)| {
                    let users = users.into_iter().map(|u| (u.id.clone(), u)).collect();
                    (room, users)
                })
                .collect()
        };
        self.transitions(nodes, &old, &new);
        if !hb.leaving {
            nodes.insert(
                hb.node,
                NodeView {
                    epoch: hb.epoch,
                    version: hb.version,
                    seen: Instant::now(),
                    rooms: new,
                    sessions: new_sessions,
                },
            );
        }
        self.update_directory(nodes, changed);
    }

    /// Presence changes of one node going from `old` to `new`, given the other nodes.
    fn transitions(
        &self,
        others: &HashMap<String, NodeView>,
        old: &HashMap<RoomId, HashMap<UserId, UserRef>>,
        new: &HashMap<RoomId, HashMap<UserId, UserRef>>,
    ) {
        let elsewhere = |room: &RoomId, user: &UserId| {
            others
                .values()
                .any(|n| n.rooms.get(room).is_some_and(|m| m.contains_key(user)))
        };
        for (room, users) in old {
            for (id, user) in users {
                let still = new.get(room).is_some_and(|m| m.contains_key(id));
                if !still && !elsewhere(room, id) {
                    self.hub.remote_presence(room, user, false);
                }
            }
        }
        for (room, users) in new {
            for (id, user) in users {
                let before = old.get(room).is_some_and(|m| m.contains_key(id));
                if !before && !elsewhere(room, id) {
                    self.hub.remote_presence(room, user, true);
                }
            }
        }
    }

    /// Tells the hub the other nodes' sessions of the users whose sessions changed on some
    /// node (for ringing calls and the per-user limit): each one's entry is put together
    /// again from every node, so the work follows the change, not the cluster's size.
    fn update_directory(&self, nodes: &HashMap<String, NodeView>, users: Vec<UserId>) {
        if users.is_empty() {
            return;
        }
        let changes = users
            .into_iter()
            .map(|user| {
                let all: Vec<(String, bool)> = nodes
                    .values()
                    .filter_map(|n| n.sessions.get(&user))
                    .flatten()
                    .cloned()
                    .collect();
                (user, all)
            })
            .collect();
        self.hub.update_remote_sessions(changes);
    }

    /// Drops the nodes whose last heartbeat is older than the TTL.
    fn expire(&self, now: Instant) {
        let mut nodes = lock(&self.nodes);
        if let Some(cutoff) = now.checked_sub(self.ttl) {
            lock(&self.assembly).discard_before(cutoff);
        }
        let dead: Vec<String> = nodes
            .iter()
            .filter(|(_, n)| now.duration_since(n.seen) > self.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for node in dead {
            tracing::warn!(node = %node, "node silent past the presence TTL: its users go offline");
            lock(&self.assembly).forget(&node);
            if let Some(view) = nodes.remove(&node) {
                lock(&self.silent_unsure).push((node, view.epoch));
                self.transitions(&nodes, &view.rooms, &HashMap::new());
                let gone = view.sessions.into_keys().collect();
                self.update_directory(&nodes, gone);
            }
        }
        // A/V members of silent nodes go only when the silence is theirs, not this node's
        // (NATS down here, or messages lost): calls between peers outlive a bus hiccup.
        if self.knows_every_node() {
            let silent = std::mem::take(&mut *lock(&self.silent_unsure));
            for (node, epoch) in silent {
                if nodes.get(&node).is_none_or(|v| v.epoch != epoch) {
                    self.node_gone(&node, epoch);
                }
            }
        }
    }

    /// A run of a node left or died: its sessions leave the A/V rooms known here, and its
    /// stored memberships go.
    fn node_gone(&self, node: &str, epoch: u64) {
        let gone = Inbound::NodeGone {
            node: node.to_owned(),
            run: epoch,
        };
        if self.inbound.try_send(gone).is_err() {
            tracing::warn!(node, "could not tell the app that a node is gone");
        }
    }

    /// Whether a silence here means a dead node: this node has been connected to NATS, with
    /// no slow-consumer loss, for longer than the presence TTL (so it would have heard every
    /// live node's heartbeat).
    pub fn knows_every_node(&self) -> bool {
        lock(&self.healthy_since).is_some_and(|t| t.elapsed() > self.ttl + self.heartbeat)
    }

    /// Nodes this node currently hears from (itself excluded).
    fn heard_nodes(&self) -> Vec<String> {
        lock(&self.nodes).keys().cloned().collect()
    }

    // -- life cycle -----------------------------------------------------------------------------

    /// Starts the bus tasks; returns them so `serve` can stop them at the end.
    pub async fn start(self: &Arc<Self>, store: Store) -> Vec<JoinHandle<()>> {
        *lock(&self.healthy_since) = Some(Instant::now());
        // A/V memberships left by an earlier run under this node's name are stale.
        if let Err(e) = store.av_forget_node(&self.node, None).await {
            tracing::warn!(error = %e, "could not forget this node's earlier A/V members");
        }
        // So are its SFU rooms: this run's SFU starts empty.
        if let Err(e) = store.sfu_release_node(&self.node).await {
            tracing::warn!(error = %e, "could not forget this node's earlier SFU rooms");
        }
        let mut tasks = Vec::new();
        if let Some(rx) = lock(&self.out_rx).take() {
            tasks.push(tokio::spawn(self.clone().publisher_task(rx)));
        }
        if let Some(rx) = lock(&self.relays).take() {
            tasks.push(tokio::spawn(self.clone().relay_task(rx)));
        }
        if let Some(rx) = lock(&self.policy_changes).take() {
            tasks.push(tokio::spawn(self.clone().policy_task(rx)));
        }
        for (subject, kind) in [
            (node_subject(&self.node), 0),
            (CTL_SUBJECT.to_owned(), 1),
            (PRESENCE_SUBJECT.to_owned(), 2),
        ] {
            match self.client.subscribe(subject.clone()).await {
                Ok(sub) => tasks.push(match kind {
                    0 => tokio::spawn(self.clone().node_task(sub)),
                    1 => tokio::spawn(self.clone().ctl_task(sub)),
                    _ => tokio::spawn(self.clone().presence_task(sub)),
                }),
                Err(e) => tracing::error!(subject, error = %e, "NATS subscribe failed"),
            }
        }
        tasks.push(tokio::spawn(self.clone().gap_task(store.clone())));
        tasks.push(tokio::spawn(self.clone().sweep_task(store)));
        tasks.push(tokio::spawn(self.clone().heartbeat_task()));
        let _ = tokio::time::timeout(self.request_timeout, self.client.flush()).await;
        self.publish_heartbeat(false).await;
        tasks
    }

    /// Leaves the cluster: a last heartbeat that says so (other nodes drop this node's users
    /// at once), then everything queued is flushed to NATS.
    pub async fn leave(&self) {
        self.leaving.store(true, Relaxed);
        self.publish_heartbeat(true).await;
        // Let the publisher task empty its queue, then make sure NATS has it all.
        let deadline = Instant::now() + self.request_timeout;
        while self.out.capacity() < self.out.max_capacity() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tokio::time::timeout(self.request_timeout, self.client.flush()).await;
        tracing::info!(node = %self.node, "left the cluster bus");
    }
}

impl Broker for Bus {
    fn node_id(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn run(&self) -> u64 {
        self.epoch
    }

    fn committed(&self, ev: CommittedEvent) {
        self.publish_committed(ev);
    }

    fn enter_room<'a>(
        &'a self,
        room: &'a RoomId,
        store: &'a Store,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.subscribe_room(room, store))
    }

    fn leave_room(&self, room: &RoomId) {
        self.unsubscribe_room(room);
    }

    fn send_to_session(&self, session: &str, frame: &Frame) -> bool {
        self.send_directed(session, frame)
    }

    fn session_closed(&self, user: &UserId, session: &str) {
        self.announce_closed(user, session);
    }

    fn call_owner(&self, call_id: &str) -> Option<String> {
        node_of(call_id)
            .filter(|n| *n != self.node)
            .map(str::to_owned)
    }

    fn forward_call(
        &self,
        node: String,
        cmd: CallCommand,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(Bus::request(
            self.client.clone(),
            self.request_timeout,
            node,
            Tag::Call,
            cmd,
            "the node holding this call did not answer".into(),
        ))
    }

    fn forward_sfu(
        &self,
        node: String,
        cmd: SfuCommand,
    ) -> BoxFuture<'static, Result<SfuReply, Error>> {
        let unanswered = format!("node {node}, which runs this room's SFU, did not answer");
        Box::pin(Bus::request(
            self.client.clone(),
            self.request_timeout,
            node,
            Tag::Sfu,
            cmd,
            unanswered,
        ))
    }

    fn av_changed(&self, room: &RoomId, change: AvChange) {
        self.relay_av(room, &change);
    }

    fn live_nodes(&self) -> Option<Vec<String>> {
        self.knows_every_node().then(|| self.heard_nodes())
    }

    fn ask_sessions(&self, user: &UserId) -> BoxFuture<'static, Vec<(String, bool)>> {
        // It ends as soon as every node heard from has answered, so an unknown user costs
        // one round trip; the bound only matters for a node that does not answer, or one not
        // heard from yet on a busy machine.
        Box::pin(Bus::ask_sessions_now(
            self.client.clone(),
            self.request_timeout,
            self.heard_nodes().len(),
            self.node.clone(),
            user.clone(),
        ))
    }

    fn board(&self, room: &RoomId, board: &str, relay: BoardRelay) {
        let (kind, bytes) = match &relay {
            BoardRelay::Update(b) => (0u8, b),
            BoardRelay::Sync(b) => (1, b),
        };
        let mut w = Writer::new(Tag::Board, board.len() + bytes.len() + 3);
        w.0.put_u8(kind);
        self.enqueue(room_subject(room), w.str16(board).rest(bytes));
    }
}

/// The users whose sessions differ between a node's `old` and `new` lists.
fn changed_users(old: &SessionMap, new: &SessionMap) -> Vec<UserId> {
    let mut changed: Vec<UserId> = new
        .iter()
        .filter(|(user, sessions)| old.get(*user) != Some(*sessions))
        .map(|(user, _)| user.clone())
        .collect();
    changed.extend(old.keys().filter(|u| !new.contains_key(*u)).cloned());
    changed
}

fn same_rooms(
    old: &HashMap<RoomId, HashMap<UserId, UserRef>>,
    new: &[(RoomId, Vec<UserRef>)],
) -> bool {
    old.len() == new.len()
        && new.iter().all(|(room, users)| {
            old.get(room).is_some_and(|m| {
                m.len() == users.len() && users.iter().all(|u| m.get(&u.id) == Some(u))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call command's answer (no reply beyond success).
    type CallAnswer = Answer<()>;
    /// An SFU command's answer.
    type SfuAnswer = Answer<SfuReply>;

    #[test]
    fn every_tag_has_its_own_byte_and_is_read_back() {
        let bytes: std::collections::HashSet<u8> = Tag::ALL.iter().map(|t| *t as u8).collect();
        assert_eq!(bytes.len(), Tag::ALL.len());
        for t in Tag::ALL {
            assert_eq!(Tag::of(&Writer::new(t, 0).rest(b"x")), Some(t));
        }
        assert_eq!(Tag::of(b"?"), None);
        assert_eq!(Tag::of(b""), None);
    }

    #[test]
    fn subject_tokens_are_one_token_and_one_to_one() {
        assert_eq!(subject_token("algebra-101"), "algebra-101");
        assert_eq!(subject_token("a.b"), "a~2Eb");
        assert_ne!(subject_token("a.b"), subject_token("a~2Eb"));
        assert!(!room_subject(&RoomId::from("x.y.z"))[15..].contains('.'));
        assert_eq!(node_of("s0123.n1"), Some("n1"));
        assert_eq!(node_of("s0123"), None);
    }

    #[test]
    fn events_and_notices_round_trip() {
        let ev = CommittedEvent {
            room: "r.1".into(),
            seq: 42,
            json: "{\"a\":1}".into(),
            public_json: Some("{\"type\":\"hidden\"}".into()),
        };
        let (back, _) = decode_event(&"r.1".into(), &encode_event(&ev)).unwrap();
        assert_eq!(
            (back.seq, back.json.as_str(), back.public_json.as_deref()),
            (42, "{\"a\":1}", Some("{\"type\":\"hidden\"}"))
        );
        let plain = CommittedEvent {
            public_json: None,
            ..ev
        };
        let (back, _) = decode_event(&"r".into(), &encode_event(&plain)).unwrap();
        assert_eq!(back.public_json, None);
        let frame = Frame::from("{\"type\":\"typing\"}");
        let to = NoticeTo::Others(UserId::from("u1"));
        let (f, t) = decode_notice(&encode_notice(&frame, &to)).unwrap();
        assert_eq!((f.as_str(), t), (frame.as_str(), to));
        assert!(decode_event(&"r".into(), b"E\x00").is_none(), "short input");
    }

    #[test]
    fn call_answers_carry_every_error_code() {
        let muted = Error::Muted("you are muted".into());
        let body = serde_json::to_string(&CallAnswer::of(Err(muted))).unwrap();
        assert_eq!(body, r#"{"code":"muted","message":"you are muted"}"#);
        let back: CallAnswer = serde_json::from_str(&body).unwrap();
        let err = Error::from_code(back.code.unwrap(), back.message);
        assert_eq!(err.code(), ErrorCode::Muted);
        assert_eq!(err.public_message(), "you are muted");
        let ok: CallAnswer = serde_json::from_str(r#"{"code":null,"message":""}"#).unwrap();
        assert!(ok.code.is_none());
        assert!(serde_json::from_str::<CallAnswer>(r#"{"code":"nope","message":""}"#).is_err());
    }

    #[test]
    fn sfu_commands_and_answers_round_trip() {
        use crate::node::SfuAction;
        let cmd = SfuCommand {
            room: "r.1".into(),
            user: "u".into(),
            session: "s1.n1".into(),
            action: SfuAction::Signal {
                data: serde_json::json!({"candidate": null}),
            },
        };
        let body = serde_json::to_vec(&cmd).unwrap();
        assert_eq!(serde_json::from_slice::<SfuCommand>(&body).unwrap(), cmd);
        let join: SfuCommand = serde_json::from_str(
            r#"{"room":"r","user":"u","session":"s","action":{"kind":"join","can_publish":true}}"#,
        )
        .unwrap();
        assert_eq!(join.action, SfuAction::Join { can_publish: true });
        let answer = SfuAnswer {
            code: None,
            message: String::new(),
            reply: SfuReply {
                peers: vec![("s2.n0".into(), "v".into())],
                found: false,
            },
        };
        let back: SfuAnswer =
            serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
        assert_eq!(back.reply, answer.reply);
        // An error answer may leave the reply out.
        let err: SfuAnswer =
            serde_json::from_str(r#"{"code":"unavailable","message":"gone"}"#).unwrap();
        assert_eq!(err.code, Some(ErrorCode::Unavailable));
        assert_eq!(err.reply, SfuReply::default());
    }

    #[test]
    fn changed_users_are_the_added_removed_and_altered_ones() {
        let s = |id: &str, waiting: bool| vec![(id.to_owned(), waiting)];
        let old: SessionMap = HashMap::from([
            (UserId::from("same"), s("s1", false)),
            (UserId::from("gone"), s("s2", false)),
            (UserId::from("ringing"), s("s3", false)),
        ]);
        let new: SessionMap = HashMap::from([
            (UserId::from("same"), s("s1", false)),
            (UserId::from("ringing"), s("s3", true)),
            (UserId::from("fresh"), s("s4", false)),
        ]);
        let mut changed: Vec<String> = changed_users(&old, &new)
            .iter()
            .map(|u| u.as_str().to_owned())
            .collect();
        changed.sort();
        assert_eq!(changed, ["fresh", "gone", "ringing"]);
        assert!(changed_users(&new, &new).is_empty());
    }

    #[test]
    fn same_rooms_compares_users() {
        let u = UserRef {
            id: "a".into(),
            name: "A".into(),
            role: crate::protocol::ShownRole::Member,
        };
        let mut old = HashMap::new();
        old.insert(
            RoomId::from("r"),
            HashMap::from([(u.id.clone(), u.clone())]),
        );
        assert!(same_rooms(&old, &[(RoomId::from("r"), vec![u.clone()])]));
        assert!(!same_rooms(&old, &[(RoomId::from("r"), vec![])]));
        assert!(!same_rooms(&old, &[]));
    }
}
