//! studyhall: a real-time chat and live-session server for online education.
//!
//! Layout (see ARCHITECTURE.md for the invariants):
//! - `config`   settings and limits: file < env < flags
//! - `protocol` the wire contract: every JSON shape, ids, error and close codes
//! - `auth`     HS256 tokens, room grants
//! - `store/`   the Store API over SQLite and PostgreSQL, group-commit writer; the only SQL
//! - `hub`      room map, presence, fan-out of pre-encoded frames into bounded outboxes
//! - `outbox`   a session's bounded queue of frames, allocated only while frames wait
//! - `heap`     giving freed heap pages back to the system after idle write loops parked
//! - `session`  one WebSocket: handshake, read loop, write loop, close codes
//! - `command`  what every command handler gets (`Ctx`) and gives back (`Outcome`)
//! - `rooms/`   room commands (join/replay, chat) with rights checks
//! - `rtc`      calls and audio/video over the `studyhall-signaling` machines
//! - `node`     the `Broker` a node reaches the others through; `LocalBroker` on one node
//! - `listener` the accept loop: connection caps, header and request timeouts
//! - `api`      HTTP router: `/ws`, `/healthz`, `/metrics`, `/api/...`, `/dev/token`
//! - `web`      the browser client's files, embedded
//! - `engagement` points, levels, badges, streaks and the calendar, as pure functions
//! - `webhooks` the webhook sender (signed, retried, in order per room) and endpoint checks
//! - `metrics`  counters and histograms in Prometheus text
//! - `error`    the one error type -> protocol code / HTTP status
//! - `cluster/` the NATS broker (cluster mode): room events, notices, directed frames,
//!   presence heartbeats, with `sequencer` keeping each room's events in seq order
//!
//! [`App::start`] opens the store and wires the hub to it; [`serve`] runs the listener until
//! the shutdown future resolves, then says goodbye to every session and flushes the store.

// The `settings!` list in `config.rs` is read one setting at a time by a recursive macro,
// and it has more settings than the default limit of 128 recursions.
#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod cluster;
pub mod command;
pub mod config;
pub mod engagement;
pub mod error;
pub mod heap;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod ratelimit;
pub mod rooms;
pub mod rtc;
pub mod session;
pub mod sfu;
pub mod store;
pub mod web;
pub mod webhooks;
pub mod ws;
pub mod wsio;

mod fuzz;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::{Broker, Inbound, LocalBroker};
use crate::store::{MemberRuns, Store, StoreError, StoreOptions};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// The settings key under which a generated token secret is kept.
pub const JWT_SECRET_KEY: &str = "jwt_secret";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] cluster::BusError),
    #[error(transparent)]
    Tls(#[from] webhooks::TlsError),
}

/// Everything a request or session needs, shared.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub tokens: auth::Tokens,
    pub metrics: Arc<Metrics>,
    /// Room settings, mutes and slow-mode clocks as sessions check them on every write.
    pub policies: rooms::policy::Policies,
    /// Calls and A/V rooms on this node.
    pub rtc: rtc::Rtc,
    /// Per-user rate limits, shared by the user's sessions on this node.
    pub user_limits: ratelimit::UserLimits,
    /// The node's SFU (every node runs one; in cluster mode a room's SFU runs on one node, see
    /// `rtc`). `None` only in tests that build an app without one.
    pub sfu: Option<sfu::Sfu>,
    pub(crate) shutting_down: AtomicBool,
    live_sessions: AtomicUsize,
    sessions_gone: Notify,
    /// How this node reaches the others ([`LocalBroker`] on a single node).
    pub broker: Arc<dyn Broker>,
    /// Cluster mode (`nats_url` set): the NATS broker itself, for starting and leaving.
    cluster: Option<Arc<cluster::Bus>>,
    /// What other nodes said, until `serve` starts applying it.
    inbound: Mutex<Option<mpsc::Receiver<Inbound>>>,
    /// Cluster mode: rooms this node's SFU no longer holds (their claim is released), until
    /// `serve` starts the task that releases them.
    sfu_emptied: Mutex<Option<mpsc::UnboundedReceiver<protocol::RoomId>>>,
    /// Polls answered since their last results update (see `rooms::polls::run_clock`).
    pub poll_results: rooms::polls::ResultsQueue,
    /// Whiteboards held on this node (see `rooms::boards`).
    pub boards: rooms::boards::Boards,
}

/// Counts a running connection task; dropping it lets shutdown know the task has finished.
pub(crate) struct SessionGuard(Arc<App>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.live_sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.sessions_gone.notify_waiters();
        }
    }
}

/// The open room every dev-mode user can join at once (`serve --dev` only).
pub const DEV_LOBBY: &str = "lobby";

async fn ensure_dev_lobby(store: &Store) -> Result<(), StoreError> {
    let lobby = store::Room {
        qa: store::QaSettings {
            enabled: true,
            moderated: false,
            peer_answers: true,
        },
        ..store::Room::new(
            protocol::RoomId::from(DEV_LOBBY),
            protocol::RoomKind::Group,
            "Lobby".into(),
            protocol::Visibility::Open,
        )
    };
    match store.create_room(&lobby).await {
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A random 256-bit secret, hex-encoded.
pub fn random_secret() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The token secret: the configured one, else the one kept in the store (created on first use).
pub async fn token_secret(config: &Config, store: &Store) -> Result<String, StoreError> {
    match &config.jwt_secret {
        Some(s) => Ok(s.clone()),
        None => store.setting_or_insert(JWT_SECRET_KEY, random_secret).await,
    }
}

/// The hub, sized by the config's session, room and presence limits.
fn new_hub(config: &Config, metrics: &Arc<Metrics>) -> Hub {
    Hub::new(
        metrics.clone(),
        config.max_sessions_per_user,
        config.max_room_sessions,
        config.outbox_frames,
    )
    .with_presence_limit(config.presence_limit)
    .with_presence_round_max(config.presence_round_max)
    // In cluster mode an edit on another node changes the stored copy of a message before this
    // node hears of it: every resume reads the store there.
    .with_replay_cache(match config.nats_url {
        Some(_) => 0,
        None => config.replay_cache_bytes,
    })
}

/// The hub, wired to its broker: the NATS bus in cluster mode (the hub then relays its
/// notices through it), this node's broker otherwise.
async fn connect_broker(
    config: &Config,
    hub: Hub,
    metrics: &Arc<Metrics>,
    inbound: mpsc::Sender<Inbound>,
    policy_changes: mpsc::Receiver<protocol::RoomId>,
) -> Result<(Arc<Hub>, Arc<dyn Broker>, Option<Arc<cluster::Bus>>), StartError> {
    let Some(url) = &config.nats_url else {
        let hub = Arc::new(hub);
        return Ok((hub.clone(), Arc::new(LocalBroker::new(hub)), None));
    };
    let (relay_tx, relays) = mpsc::channel(config.bus_queue_max.max(1));
    let hub = Arc::new(hub.with_relay(relay_tx));
    let links = cluster::Links {
        inbound,
        relays,
        policy_changes,
    };
    let bus = cluster::Bus::connect(config, url, hub.clone(), metrics.clone(), links).await?;
    Ok((hub, bus.clone(), Some(bus)))
}

/// Sends each badge the store awards to every session of the user: this node's, and in
/// cluster mode those on other nodes too (the earner is not always the one whose write
/// committed it here: reactions received, helpful marks).
fn send_badges(store: &Store, hub: &Arc<Hub>, broker: &Arc<dyn Broker>) {
    let (badges_to, badges_out) = (hub.clone(), broker.clone());
    store.on_badge(Arc::new(move |b| {
        let frame = badges_to.badge_earned(&b);
        for sid in badges_to.remote_session_ids(&b.user.id) {
            badges_out.send_to_session(&sid, &frame);
        }
    }));
}

/// The per-user rate limits: writes, joins, hands and calls.
fn user_limits(config: &Config) -> ratelimit::UserLimits {
    ratelimit::UserLimits::new([
        (config.user_write_per_s, config.user_write_burst),
        (config.user_join_per_s, config.user_join_burst),
        (config.user_hand_per_s, config.user_hand_burst),
        (config.user_call_per_s, config.user_call_burst),
    ])
}

impl App {
    /// Opens and migrates the store, resolves the token secret and wires fan-out.
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::default());
        let hub = new_hub(&config, &metrics);
        let policy_changes = mpsc::channel(config.bus_queue_max.max(1));
        let (inbound_tx, inbound_rx) = mpsc::channel(config.bus_queue_max.max(1));
        let (hub, broker, cluster) =
            connect_broker(&config, hub, &metrics, inbound_tx, policy_changes.1).await?;
        let committed = broker.clone();
        let hook: store::CommitHook = Arc::new(move |ev| committed.committed(ev));
        let store = Store::open(
            &StoreOptions::from_config(&config),
            metrics.clone(),
            Some(hook),
        )
        .await?;
        send_badges(&store, &hub, &broker);
        let secret = token_secret(&config, &store).await?;
        let rtc = rtc::Rtc::new(&config);
        let (emptied, sfu_emptied) = match cluster {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let notify = rtc::sfu_notify(broker.clone(), emptied);
        let sfu = Some(sfu::Sfu::start(rtc::sfu_config(&config), notify).await?);
        if config.dev {
            ensure_dev_lobby(&store).await?;
        }
        let policies = rooms::policy::Policies::new(cluster.is_some().then_some(policy_changes.0));
        Ok(Arc::new(Self {
            user_limits: user_limits(&config),
            tokens: auth::Tokens::new(secret.as_bytes()),
            config,
            store,
            hub,
            metrics,
            policies,
            rtc,
            sfu,
            shutting_down: AtomicBool::new(false),
            live_sessions: AtomicUsize::new(0),
            sessions_gone: Notify::new(),
            broker,
            cluster,
            inbound: Mutex::new(Some(inbound_rx)),
            sfu_emptied: Mutex::new(sfu_emptied),
            poll_results: Default::default(),
            boards: Default::default(),
        }))
    }

    /// A new session id; in cluster mode it ends in `.NODE`, so any node can route to it.
    pub fn new_session_id(&self) -> protocol::SessionId {
        protocol::SessionId(self.node_scoped('s'))
    }

    /// A new call id, naming the node that owns the call in cluster mode.
    pub fn new_call_id(&self) -> String {
        self.node_scoped('c')
    }

    fn node_scoped(&self, kind: char) -> String {
        let r = rand::random::<u64>();
        match self.broker.node_id() {
            Some(node) => format!("{kind}{r:016x}.{node}"),
            None => format!("{kind}{r:016x}"),
        }
    }

    /// Queues a directed frame to a session wherever it is connected.
    pub fn send_to_session(&self, session: &str, frame: &hub::Frame) -> bool {
        self.broker.send_to_session(session, frame)
    }

    /// Applies what another node said (see [`Inbound`]), in arrival order.
    fn apply(self: &Arc<Self>, what: Inbound) {
        match what {
            Inbound::PolicyChanged(room) => self.policies.invalidate(&room),
            Inbound::PoliciesStale => self.policies.invalidate_all(),
            Inbound::RemoteEvent { room, json } => {
                if rooms::class::is_end_event(&json) {
                    rooms::class::ended_elsewhere(self, &room);
                }
                self.policies.remote_event(&room, &json)
            }
            Inbound::Barrier(done) => {
                let _ = done.send(());
            }
            Inbound::SessionClosed { user, session } => {
                rtc::remote_session_closed(self, &user, &session)
            }
            Inbound::Call { command, answer } => {
                let _ = answer.send(rtc::remote_call(self, command));
            }
            Inbound::Sfu { command, answer } => {
                // Not in arrival order: an SFU join reads the store (a session's own commands
                // come one at a time, each after the answer to the last).
                let app = self.clone();
                tokio::spawn(async move {
                    let _ = answer.send(rtc::remote_sfu(&app, command).await);
                });
            }
            Inbound::Av { room, change } => rtc::remote_av(self, &room, change),
            Inbound::Stage { room, user, on } => rtc::stage_changed(self, &room, &user, on),
            Inbound::NodeGone { node, run } => {
                rtc::remote_node_gone(self, &node, run);
                forget_members(&self.store, node, MemberRuns::One(run as i64));
            }
            Inbound::Board { room, board, relay } => {
                rooms::boards::remote(self, &room, &board, relay)
            }
        }
    }

    /// Where this node's `member.*` rows are kept: its name ('' on a single node) and its
    /// run (the bus epoch in a cluster, the store's run on a single node).
    pub(crate) fn member_node(&self) -> (String, i64) {
        match self.broker.node_id() {
            Some(node) => (node.to_owned(), self.broker.run() as i64),
            None => (String::new(), self.store.member_run()),
        }
    }

    pub(crate) fn track_session(self: &Arc<Self>) -> SessionGuard {
        self.live_sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.clone())
    }

    /// Tells every session to say `bye` and close 1001, and waits (bounded) for them to go.
    async fn drain_sessions(&self) {
        self.shutting_down.store(true, Ordering::Release);
        if self.cluster.is_some() {
            self.drain_in_batches().await;
        }
        self.hub.close_all(protocol::close::GOING_AWAY);
        let wait = async {
            loop {
                let gone = self.sessions_gone.notified();
                if self.live_sessions.load(Ordering::Acquire) == 0 {
                    break;
                }
                // New connections upgraded during shutdown close themselves; re-ask anyway.
                self.hub.close_all(protocol::close::GOING_AWAY);
                let _ = tokio::time::timeout(Duration::from_millis(200), gone).await;
            }
        };
        let grace = Duration::from_millis(self.config.shutdown_grace_ms) + Duration::from_secs(2);
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::warn!("some sessions did not close within the shutdown grace");
        }
    }
}

impl App {
    /// Cluster drain: close sessions with 1001 a batch at a time, so their clients reconnect
    /// to the other nodes spread out rather than all at once. Bounded by the shutdown grace.
    async fn drain_in_batches(&self) {
        let cfg = &self.config;
        let interval = Duration::from_millis(cfg.drain_interval_ms);
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(cfg.shutdown_grace_ms)
            + Duration::from_secs(2);
        let mut batches = 0u64;
        while tokio::time::Instant::now() < deadline {
            let asked = self
                .hub
                .close_some(protocol::close::GOING_AWAY, cfg.drain_batch);
            if asked == 0 {
                break;
            }
            batches += 1;
            tokio::time::sleep(interval).await;
        }
        tracing::info!(batches, "drain: every session asked to reconnect elsewhere");
    }
}

/// Forgets a node's `member.*` rows of `runs` in the background, queuing the `member.left`
/// of users that no node has in the room any more (see [`Store::members_forget_node`]).
fn forget_members(store: &Store, node: String, runs: MemberRuns) {
    let store = store.clone();
    tokio::spawn(async move {
        match store.members_forget_node(&node, runs).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(node = %node, left = n, "member.left for a gone node's users"),
            Err(e) => tracing::warn!(error = %e, node = %node, "could not forget a node's members"),
        }
    });
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, says goodbye to
/// every session (`bye`, close 1001), commits every accepted write and returns.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    // Before anything starts: a bad `webhook_ca_file` stops the server with its reason.
    let webhook_cfg = webhooks::SenderConfig::from_config(&app.config)?;
    let router = api::router(app.clone());
    let background = Background::spawn(&app, webhook_cfg);
    let bus_tasks = start_bus_tasks(&app).await;
    let draining = app.clone();
    let limits = listener_limits(&app.config);
    let request_limit = Duration::from_millis(app.config.http_request_timeout_ms);
    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        listener::request_timeout(request_limit, req, next)
    }));
    tracing::info!(
        max_connections = limits.max_connections,
        "accepting connections"
    );
    listener::serve(listener, router, limits, async move {
        shutdown.await;
        // Resolving here stops the listener at once; sessions are told to go meanwhile.
        tracing::info!("shutting down: closing sessions");
        draining.shutting_down.store(true, Ordering::Release);
        if draining.cluster.is_none() {
            draining.hub.close_all(protocol::close::GOING_AWAY);
        }
    })
    .await?;
    app.drain_sessions().await;
    if let Some(sfu) = &app.sfu {
        sfu.stop();
    }
    if let Some(node) = app.broker.node_id() {
        // Its SFU rooms are free for the next node that needs them (its sessions on other
        // nodes are told `av_closed` once they hear this node left).
        if let Err(e) = app.store.sfu_release_node(node).await {
            tracing::warn!(error = %e, "could not release this node's SFU rooms");
        }
    }
    background.stop().await;
    // Boards whose logs the saver has not compacted yet.
    rooms::boards::save_all(&app, true).await;
    app.store.close().await;
    if let Some(bus) = &app.cluster {
        bus.leave().await;
    }
    for t in bus_tasks {
        t.abort();
    }
    tracing::info!("store flushed, bye");
    Ok(())
}

/// The node's own background tasks: timers, clocks, periodic sends, webhook delivery and the
/// board saver. They run for the server's life and are stopped at shutdown.
struct Background {
    sla: JoinHandle<()>,
    call_timers: JoinHandle<()>,
    counts: JoinHandle<()>,
    heartbeats: JoinHandle<()>,
    heap_trim: JoinHandle<()>,
    presence: JoinHandle<()>,
    webhooks: JoinHandle<()>,
    poll_clock: JoinHandle<()>,
    class_clock: JoinHandle<()>,
    breakout_clock: JoinHandle<()>,
    stage_clock: JoinHandle<()>,
    board_saver: JoinHandle<()>,
}

impl Background {
    /// Starts the tasks, and forgets the room members an earlier run of this node left behind
    /// before the room clocks start.
    fn spawn(app: &Arc<App>, webhook_cfg: webhooks::SenderConfig) -> Self {
        let sla = tokio::spawn(announce_overdue(app.clone()));
        let call_timers = tokio::spawn(rtc::run_timers(app.clone()));
        let counts = tokio::spawn(send_online_counts(app.clone()));
        let heartbeats = tokio::spawn(heartbeats(app.clone()));
        let heap_trim = tokio::spawn(trim_heap(app.clone()));
        let presence = tokio::spawn(send_presence(app.clone()));
        let webhooks = tokio::spawn(webhooks::run(app.store.clone(), webhook_cfg));
        // Users an earlier run of this node had in rooms are gone with it.
        let (node, run) = app.member_node();
        forget_members(&app.store, node, MemberRuns::AllBut(run));
        Self {
            sla,
            call_timers,
            counts,
            heartbeats,
            heap_trim,
            presence,
            webhooks,
            poll_clock: tokio::spawn(rooms::polls::run_clock(app.clone())),
            class_clock: tokio::spawn(rooms::class::run_clock(app.clone())),
            breakout_clock: tokio::spawn(rooms::breakouts::run_clock(app.clone())),
            stage_clock: tokio::spawn(rooms::stage::run_clock(app.clone())),
            board_saver: tokio::spawn(rooms::boards::run_saver(app.clone())),
        }
    }

    /// Stops every task, waiting for the two that must not be cut mid-write: webhook delivery
    /// and the board saver.
    async fn stop(self) {
        self.sla.abort();
        self.call_timers.abort();
        self.counts.abort();
        self.heartbeats.abort();
        self.heap_trim.abort();
        self.presence.abort();
        // Deliveries cut short stay pending in the outbox and go out after the next start.
        self.webhooks.abort();
        let _ = self.webhooks.await;
        self.poll_clock.abort();
        self.class_clock.abort();
        self.breakout_clock.abort();
        self.stage_clock.abort();
        self.board_saver.abort();
        let _ = self.board_saver.await;
    }
}

/// In cluster mode, the bus's tasks, the AV sweep and the task that applies what other nodes
/// said; none on a single node.
async fn start_bus_tasks(app: &Arc<App>) -> Vec<JoinHandle<()>> {
    let mut tasks = match &app.cluster {
        Some(bus) => {
            let mut tasks = bus.start(app.store.clone()).await;
            tasks.push(tokio::spawn(rtc::run_av_sweep(app.clone())));
            let emptied = app
                .sfu_emptied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(emptied) = emptied {
                tasks.push(tokio::spawn(rtc::run_sfu_releases(app.clone(), emptied)));
            }
            tasks
        }
        None => Vec::new(),
    };
    let inbound = app.inbound.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut inbound) = inbound {
        let to = app.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(what) = inbound.recv().await {
                to.apply(what);
            }
        }));
    }
    tasks
}

/// The listener's connection limits from the config (`max_connections` 0: the default).
fn listener_limits(cfg: &Config) -> listener::Limits {
    listener::Limits {
        max_connections: match cfg.max_connections {
            0 => listener::default_max_connections(),
            n => n,
        },
        max_per_ip: cfg.max_connections_per_ip,
        header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
    }
}

/// The heartbeat round (see [`hub::Hub::heartbeat`]): a client silent for two heartbeats is
/// closed, every other one pinged.
async fn heartbeats(app: Arc<App>) {
    let every = app.config.heartbeat();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_ms = i64::try_from((every * 2).as_millis()).unwrap_or(i64::MAX);
    loop {
        tick.tick().await;
        app.hub.heartbeat(store::now_ms(), idle_ms);
        app.user_limits.sweep();
    }
}

/// Gives freed heap pages back to the system (see [`heap::trim`]) once `heap_trim_parks`
/// write loops have parked since the last time, and at most once per `heap_trim_interval_s`:
/// a wave of connections going idle leaves their write tasks' memory freed between live
/// blocks. Looks every `write_idle_ms` (parks happen no faster); nothing to do when it or
/// `heap_trim_parks` is 0.
async fn trim_heap(app: Arc<App>) {
    let (every, after) = (app.config.write_idle_ms, app.config.heap_trim_parks);
    if every == 0 || after == 0 {
        return;
    }
    let every = Duration::from_millis(every);
    let gap = Duration::from_secs(app.config.heap_trim_interval_s);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = 0;
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let parked = app.metrics.writers_parked.load(Ordering::Relaxed);
        if parked.saturating_sub(trimmed_at) >= after && last.is_none_or(|t| t.elapsed() >= gap) {
            trimmed_at = parked;
            last = Some(tokio::time::Instant::now());
            // It walks every arena under its lock: off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(heap::trim).await;
            app.metrics.heap_trims.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Announces the presence changes gathered every `presence_interval_ms` (see
/// [`hub::Hub::send_presence`]).
async fn send_presence(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.presence_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        app.hub.send_presence();
    }
}

/// Sends the coalesced `online_count` events (see [`hub::Hub::send_online_counts`]).
async fn send_online_counts(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.online_count_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        app.hub.send_online_counts();
    }
}

/// Tells host/ta sessions, once per question, when a question passes its room's answer SLA.
async fn announce_overdue(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.sla_check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match app.store.claim_overdue(store::now_ms()).await {
            Ok(due) => {
                for (room, id) in due {
                    let frame =
                        hub::Frame::from(protocol::encode(&protocol::ServerMsg::QuestionOverdue {
                            room: &room,
                            id: &id,
                            ts: store::now_ms(),
                        }));
                    app.hub.notify_moderators(&room, None, &frame);
                }
            }
            Err(e) => tracing::warn!(error = %e, "answer SLA scan failed"),
        }
    }
}
