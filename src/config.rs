//! Server configuration: every setting and every limit as a named value with a default, read
//! from an optional TOML file, then `STUDYHALL_*` environment variables, then `serve` flags
//! (flags beat env, env beats file). Tests build a [`Config`] directly. This module knows
//! nothing of sockets or SQL; it only validates values.

use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Everything `serve` needs. Field docs say why each limit exists; the README's configuration
/// table lists the same names.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen address.
    pub addr: SocketAddr,
    /// `sqlite://PATH` (embedded default) or `postgres://...`.
    pub database_url: String,
    /// HS256 secret for client tokens. Unset: a random one is generated on first start and
    /// kept in the database, so `studyhall token` on the same database signs valid tokens.
    pub jwt_secret: Option<String>,
    /// Bearer key of the server-to-server HTTP API. Unset: the API answers 503.
    pub api_key: Option<String>,
    /// Enables `POST /dev/token`. Never on without the `--dev` flag (not a file key).
    #[serde(skip)]
    pub dev: bool,
    /// Comma-separated Origin allowlist checked before the WebSocket upgrade; empty = any.
    pub allowed_origins: Vec<String>,
    /// NATS URL for multi-node fan-out (cluster mode; needs PostgreSQL). Unset: one node.
    pub nats_url: Option<String>,
    /// Largest WebSocket frame/message a client may send, in bytes (close 1009 beyond it).
    pub max_frame_bytes: usize,
    /// Frames queued for one session before it counts as a slow consumer (close 4008).
    pub outbox_frames: usize,
    /// Frames the write loop coalesces into one flush.
    pub write_batch_frames: usize,
    /// Seconds between server pings; a client silent for twice this is closed.
    pub heartbeat_s: u64,
    /// Milliseconds a new connection has to send `hello` (close 4001 after).
    pub hello_timeout_ms: u64,
    /// Sustained commands per second one connection may send (token bucket refill rate).
    pub rate_per_s: f64,
    /// Burst size of the per-connection token bucket.
    pub rate_burst: f64,
    /// Refused (rate-limited or malformed) frames within 10 s after which the connection is
    /// closed 4029.
    pub abuse_strikes: u32,
    /// Rooms one session may have joined at once.
    pub max_rooms_per_session: usize,
    /// Concurrent WebSocket sessions one user may hold.
    pub max_sessions_per_user: usize,
    /// Sessions one room may have joined at once.
    pub max_room_sessions: usize,
    /// Online users above which a room sends no per-user presence or typing events (the join
    /// reply still has `online_count` and the first this-many users).
    pub presence_limit: usize,
    /// Milliseconds a presence, typing or online-count frame may wait to leave in the same
    /// write as the frames after it.
    pub presence_flush_ms: u64,
    /// Milliseconds over which presence changes are gathered: each room announces the net
    /// change once per period, so someone who drops and resumes within it is never announced
    /// gone, and a reconnect storm costs each session one frame per changed user per period.
    pub presence_interval_ms: u64,
    /// Milliseconds between `online_count` events to rooms whose count changed (a live room's
    /// audience, and rooms past `presence_limit`, follow presence by count).
    pub online_count_ms: u64,
    /// Writes one session may have waiting for commit; it stops reading beyond this.
    pub max_inflight_per_session: usize,
    /// Most events `join {after_seq}` replays; beyond it the reply says `gap: true`.
    pub replay_limit: u32,
    /// Longest message text (and answer) in characters.
    pub max_text_chars: usize,
    /// Longest question in characters.
    pub max_question_chars: usize,
    /// People on stage at once in one room.
    pub max_on_stage: usize,
    /// Milliseconds between scans for questions past their room's answer SLA.
    pub sla_check_interval_ms: u64,
    /// Seconds a call rings before it is missed.
    pub ring_timeout_s: u64,
    /// Seconds a call party whose connection dropped has to resume the call.
    pub call_grace_s: u64,
    /// Most participants in one room's A/V mesh.
    pub av_mesh_max: usize,
    /// STUN URLs handed to clients (comma-separated in env), e.g. `stun:stun.example.org:3478`.
    pub stun_urls: Vec<String>,
    /// TURN URLs handed to clients with time-limited credentials, e.g. `turn:turn.example.org:3478`.
    pub turn_urls: Vec<String>,
    /// The TURN server's shared secret (coturn `static-auth-secret`); TURN is offered only with it.
    pub turn_secret: Option<String>,
    /// Lifetime of TURN credentials in seconds.
    pub turn_ttl_s: u64,
    /// Milliseconds between call timer checks (ring timeout, grace period).
    pub call_tick_ms: u64,
    /// Longest reaction emoji in characters.
    pub max_emoji_chars: usize,
    /// Longest `client_msg_id` in characters.
    pub max_client_msg_id_chars: usize,
    /// Distinct emoji reactions one message may carry.
    pub max_reactions_per_message: u32,
    /// Most writes one group commit carries.
    pub store_batch_max: usize,
    /// Microseconds the writer lingers for more writes when the queue runs dry before a
    /// commit; 0 = commit as soon as the queue is empty (batches still form while the previous
    /// commit is in flight).
    pub store_batch_linger_us: u64,
    /// Writes queued for the group-commit writer before senders wait.
    pub store_queue: usize,
    /// Database connections in the pool.
    pub db_pool_size: u32,
    /// SQLite `synchronous` pragma: `full` (default: an ack survives power loss) or `normal`
    /// (survives a process crash, not power loss).
    pub sqlite_synchronous: String,
    /// Milliseconds shutdown waits for sessions to say goodbye before flushing the store.
    pub shutdown_grace_ms: u64,
    // -- engagement and room health (issue 7) --
    /// Point table, daily caps, levels and badge rules: the `[engagement]` table of the file
    /// (file only: nested tables have no sensible flag form).
    pub engagement: crate::engagement::EngagementConfig,
    /// Weekly active ratio below this is flagged `low`.
    pub health_band_low: f64,
    /// Weekly active ratio above this is flagged `high`.
    pub health_band_high: f64,
    /// Members with no contribution for this many days before `to` are a churn risk.
    pub churn_inactive_days: u32,
    /// Most churn-risk users a stats answer lists (the count is always exact).
    pub churn_list_max: usize,
    /// Most buckets one stats query may span (bad_request beyond).
    pub stats_max_buckets: usize,
    // -- cluster mode (issue 8: several nodes on NATS); used only with `nats_url` --
    /// This node's name in the cluster: 1..=32 of `[A-Za-z0-9_-]`, unique per node. Unset: a
    /// random `n` + 8 hex digits at each start. Session and call ids carry it.
    pub node_id: Option<String>,
    /// Milliseconds a node holds back a room event whose predecessor has not arrived over
    /// NATS before it refills the missing seqs from the store.
    pub bus_gap_ms: u64,
    /// Milliseconds between checks of every subscribed room's `last_seq` in the store, which
    /// catch an event lost at the end of a burst (no later event shows the gap).
    pub bus_sweep_ms: u64,
    /// Milliseconds between a node's presence heartbeats (its online users and sessions).
    pub presence_heartbeat_ms: u64,
    /// Milliseconds after a node's last heartbeat that its users stop counting as online.
    pub presence_ttl_ms: u64,
    /// Sessions a draining node (SIGTERM in cluster mode) closes with 1001 per batch.
    pub drain_batch: usize,
    /// Milliseconds between two drain batches.
    pub drain_interval_ms: u64,
    /// Milliseconds a node waits for another node to answer a forwarded call command.
    pub bus_request_timeout_ms: u64,
    /// Messages waiting for the NATS publisher at most; past it a publish is dropped (the
    /// receivers refill room events from the store).
    pub bus_queue_max: usize,
    /// Payload bytes waiting for the NATS publisher at most (same as above, in bytes).
    pub bus_queue_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://studyhall.db".into(),
            jwt_secret: None,
            api_key: None,
            dev: false,
            allowed_origins: Vec::new(),
            nats_url: None,
            max_frame_bytes: 64 * 1024,
            outbox_frames: 1024,
            write_batch_frames: 64,
            heartbeat_s: 25,
            hello_timeout_ms: 10_000,
            rate_per_s: 50.0,
            rate_burst: 100.0,
            abuse_strikes: 50,
            max_rooms_per_session: 100,
            max_sessions_per_user: 10,
            max_room_sessions: 50_000,
            presence_limit: 1000,
            presence_flush_ms: 50,
            presence_interval_ms: 1000,
            online_count_ms: 1000,
            max_inflight_per_session: 256,
            replay_limit: 1000,
            max_text_chars: 4000,
            max_question_chars: 1000,
            max_on_stage: 10,
            sla_check_interval_ms: 10_000,
            ring_timeout_s: 30,
            call_grace_s: 15,
            av_mesh_max: 6,
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: None,
            turn_ttl_s: 3600,
            call_tick_ms: 250,
            max_emoji_chars: 16,
            max_client_msg_id_chars: 64,
            max_reactions_per_message: 64,
            store_batch_max: 512,
            store_batch_linger_us: 0,
            store_queue: 8192,
            db_pool_size: 8,
            sqlite_synchronous: "full".into(),
            shutdown_grace_ms: 5_000,
            engagement: crate::engagement::EngagementConfig::default(),
            health_band_low: 0.15,
            health_band_high: 0.30,
            churn_inactive_days: 14,
            churn_list_max: 50,
            stats_max_buckets: 366,
            node_id: None,
            bus_gap_ms: 100,
            bus_sweep_ms: 1_000,
            presence_heartbeat_ms: 1_000,
            presence_ttl_ms: 3_500,
            drain_batch: 100,
            drain_interval_ms: 100,
            bus_request_timeout_ms: 2_000,
            bus_queue_max: 65_536,
            bus_queue_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid setting {name}: {why}")]
    Invalid { name: &'static str, why: String },
}

/// `serve` flags. Each also reads its `STUDYHALL_*` variable (clap's `env`), so one struct
/// carries "env, then flags"; the file is layered underneath in [`Config::load`].
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "STUDYHALL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[arg(long, env = "STUDYHALL_ADDR")]
    pub addr: Option<SocketAddr>,
    #[arg(long, env = "STUDYHALL_DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, env = "STUDYHALL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, env = "STUDYHALL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Enable the dev-only token endpoint used by the web client's sign-in form.
    #[arg(long)]
    pub dev: bool,
    #[arg(long, env = "STUDYHALL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    #[arg(long, env = "STUDYHALL_NATS_URL")]
    pub nats_url: Option<String>,
    #[arg(long, env = "STUDYHALL_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    #[arg(long, env = "STUDYHALL_OUTBOX_FRAMES")]
    pub outbox_frames: Option<usize>,
    #[arg(long, env = "STUDYHALL_WRITE_BATCH_FRAMES")]
    pub write_batch_frames: Option<usize>,
    #[arg(long, env = "STUDYHALL_HEARTBEAT_S")]
    pub heartbeat_s: Option<u64>,
    #[arg(long, env = "STUDYHALL_HELLO_TIMEOUT_MS")]
    pub hello_timeout_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_RATE_PER_S")]
    pub rate_per_s: Option<f64>,
    #[arg(long, env = "STUDYHALL_RATE_BURST")]
    pub rate_burst: Option<f64>,
    #[arg(long, env = "STUDYHALL_ABUSE_STRIKES")]
    pub abuse_strikes: Option<u32>,
    #[arg(long, env = "STUDYHALL_MAX_ROOMS_PER_SESSION")]
    pub max_rooms_per_session: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_SESSIONS_PER_USER")]
    pub max_sessions_per_user: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_ROOM_SESSIONS")]
    pub max_room_sessions: Option<usize>,
    #[arg(long, env = "STUDYHALL_PRESENCE_LIMIT")]
    pub presence_limit: Option<usize>,
    #[arg(long, env = "STUDYHALL_PRESENCE_FLUSH_MS")]
    pub presence_flush_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_PRESENCE_INTERVAL_MS")]
    pub presence_interval_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_ONLINE_COUNT_MS")]
    pub online_count_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_MAX_INFLIGHT_PER_SESSION")]
    pub max_inflight_per_session: Option<usize>,
    #[arg(long, env = "STUDYHALL_REPLAY_LIMIT")]
    pub replay_limit: Option<u32>,
    #[arg(long, env = "STUDYHALL_MAX_TEXT_CHARS")]
    pub max_text_chars: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_EMOJI_CHARS")]
    pub max_emoji_chars: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_CLIENT_MSG_ID_CHARS")]
    pub max_client_msg_id_chars: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_REACTIONS_PER_MESSAGE")]
    pub max_reactions_per_message: Option<u32>,
    #[arg(long, env = "STUDYHALL_MAX_QUESTION_CHARS")]
    pub max_question_chars: Option<usize>,
    #[arg(long, env = "STUDYHALL_MAX_ON_STAGE")]
    pub max_on_stage: Option<usize>,
    #[arg(long, env = "STUDYHALL_SLA_CHECK_INTERVAL_MS")]
    pub sla_check_interval_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_RING_TIMEOUT_S")]
    pub ring_timeout_s: Option<u64>,
    #[arg(long, env = "STUDYHALL_CALL_GRACE_S")]
    pub call_grace_s: Option<u64>,
    #[arg(long, env = "STUDYHALL_AV_MESH_MAX")]
    pub av_mesh_max: Option<usize>,
    #[arg(long, env = "STUDYHALL_STUN_URLS", value_delimiter = ',')]
    pub stun_urls: Option<Vec<String>>,
    #[arg(long, env = "STUDYHALL_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Option<Vec<String>>,
    #[arg(long, env = "STUDYHALL_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,
    #[arg(long, env = "STUDYHALL_TURN_TTL_S")]
    pub turn_ttl_s: Option<u64>,
    #[arg(long, env = "STUDYHALL_CALL_TICK_MS")]
    pub call_tick_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_STORE_BATCH_MAX")]
    pub store_batch_max: Option<usize>,
    #[arg(long, env = "STUDYHALL_STORE_BATCH_LINGER_US")]
    pub store_batch_linger_us: Option<u64>,
    #[arg(long, env = "STUDYHALL_STORE_QUEUE")]
    pub store_queue: Option<usize>,
    #[arg(long, env = "STUDYHALL_DB_POOL_SIZE")]
    pub db_pool_size: Option<u32>,
    #[arg(long, env = "STUDYHALL_SQLITE_SYNCHRONOUS")]
    pub sqlite_synchronous: Option<String>,
    #[arg(long, env = "STUDYHALL_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    // -- engagement and room health (issue 7) --
    #[arg(long, env = "STUDYHALL_HEALTH_BAND_LOW")]
    pub health_band_low: Option<f64>,
    #[arg(long, env = "STUDYHALL_HEALTH_BAND_HIGH")]
    pub health_band_high: Option<f64>,
    #[arg(long, env = "STUDYHALL_CHURN_INACTIVE_DAYS")]
    pub churn_inactive_days: Option<u32>,
    #[arg(long, env = "STUDYHALL_CHURN_LIST_MAX")]
    pub churn_list_max: Option<usize>,
    #[arg(long, env = "STUDYHALL_STATS_MAX_BUCKETS")]
    pub stats_max_buckets: Option<usize>,
    // -- cluster mode --
    #[arg(long, env = "STUDYHALL_NODE_ID")]
    pub node_id: Option<String>,
    #[arg(long, env = "STUDYHALL_BUS_GAP_MS")]
    pub bus_gap_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_BUS_SWEEP_MS")]
    pub bus_sweep_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_PRESENCE_HEARTBEAT_MS")]
    pub presence_heartbeat_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_PRESENCE_TTL_MS")]
    pub presence_ttl_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_DRAIN_BATCH")]
    pub drain_batch: Option<usize>,
    #[arg(long, env = "STUDYHALL_DRAIN_INTERVAL_MS")]
    pub drain_interval_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_BUS_REQUEST_TIMEOUT_MS")]
    pub bus_request_timeout_ms: Option<u64>,
    #[arg(long, env = "STUDYHALL_BUS_QUEUE_MAX")]
    pub bus_queue_max: Option<usize>,
    #[arg(long, env = "STUDYHALL_BUS_QUEUE_BYTES")]
    pub bus_queue_bytes: Option<usize>,
}

macro_rules! overlay {
    ($cfg:ident, $args:ident, $($field:ident),* $(,)?) => {
        $( if let Some(v) = $args.$field.clone() { $cfg.$field = v; } )*
    };
}

impl Config {
    /// File (if any) < env < flags, then validation.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut cfg = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        overlay!(
            cfg,
            args,
            addr,
            database_url,
            allowed_origins,
            max_frame_bytes,
            outbox_frames,
            write_batch_frames,
            heartbeat_s,
            hello_timeout_ms,
            rate_per_s,
            rate_burst,
            abuse_strikes,
            max_rooms_per_session,
            max_sessions_per_user,
            max_room_sessions,
            presence_limit,
            presence_flush_ms,
            presence_interval_ms,
            online_count_ms,
            max_inflight_per_session,
            replay_limit,
            max_text_chars,
            max_emoji_chars,
            max_client_msg_id_chars,
            max_reactions_per_message,
            max_question_chars,
            max_on_stage,
            sla_check_interval_ms,
            ring_timeout_s,
            call_grace_s,
            av_mesh_max,
            stun_urls,
            turn_urls,
            turn_ttl_s,
            call_tick_ms,
            store_batch_max,
            store_batch_linger_us,
            store_queue,
            db_pool_size,
            sqlite_synchronous,
            shutdown_grace_ms,
            // engagement (issue 7)
            health_band_low,
            health_band_high,
            churn_inactive_days,
            churn_list_max,
            stats_max_buckets,
            bus_gap_ms,
            bus_sweep_ms,
            presence_heartbeat_ms,
            presence_ttl_ms,
            drain_batch,
            drain_interval_ms,
            bus_request_timeout_ms,
            bus_queue_max,
            bus_queue_bytes,
        );
        if args.node_id.is_some() {
            cfg.node_id = args.node_id.clone();
        }
        if args.jwt_secret.is_some() {
            cfg.jwt_secret = args.jwt_secret.clone();
        }
        if args.api_key.is_some() {
            cfg.api_key = args.api_key.clone();
        }
        if args.turn_secret.is_some() {
            cfg.turn_secret = args.turn_secret.clone();
        }
        cfg.stun_urls.retain(|u| !u.trim().is_empty());
        cfg.turn_urls.retain(|u| !u.trim().is_empty());
        if args.nats_url.is_some() {
            cfg.nats_url = args.nats_url.clone();
        }
        cfg.dev |= args.dev;
        cfg.allowed_origins.retain(|o| !o.trim().is_empty());
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn positive(name: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    why: "must be at least 1".into(),
                });
            }
            Ok(())
        }
        positive("max_frame_bytes", self.max_frame_bytes as u64)?;
        positive("outbox_frames", self.outbox_frames as u64)?;
        positive("write_batch_frames", self.write_batch_frames as u64)?;
        positive("heartbeat_s", self.heartbeat_s)?;
        positive("hello_timeout_ms", self.hello_timeout_ms)?;
        positive("abuse_strikes", u64::from(self.abuse_strikes))?;
        positive("max_rooms_per_session", self.max_rooms_per_session as u64)?;
        positive("max_sessions_per_user", self.max_sessions_per_user as u64)?;
        positive("max_room_sessions", self.max_room_sessions as u64)?;
        positive("presence_limit", self.presence_limit as u64)?;
        positive("online_count_ms", self.online_count_ms)?;
        positive("presence_interval_ms", self.presence_interval_ms)?;
        positive(
            "max_inflight_per_session",
            self.max_inflight_per_session as u64,
        )?;
        positive("replay_limit", u64::from(self.replay_limit))?;
        positive("max_text_chars", self.max_text_chars as u64)?;
        positive("max_question_chars", self.max_question_chars as u64)?;
        positive("max_emoji_chars", self.max_emoji_chars as u64)?;
        positive(
            "max_client_msg_id_chars",
            self.max_client_msg_id_chars as u64,
        )?;
        positive(
            "max_reactions_per_message",
            u64::from(self.max_reactions_per_message),
        )?;
        positive("max_on_stage", self.max_on_stage as u64)?;
        positive("sla_check_interval_ms", self.sla_check_interval_ms)?;
        positive("ring_timeout_s", self.ring_timeout_s)?;
        positive("av_mesh_max", self.av_mesh_max as u64)?;
        positive("turn_ttl_s", self.turn_ttl_s)?;
        positive("call_tick_ms", self.call_tick_ms)?;
        for url in self.stun_urls.iter().chain(&self.turn_urls) {
            if !(url.starts_with("stun:")
                || url.starts_with("stuns:")
                || url.starts_with("turn:")
                || url.starts_with("turns:"))
            {
                return Err(ConfigError::Invalid {
                    name: "stun_urls/turn_urls",
                    why: format!("{url:?} is not a stun:/turn: URL"),
                });
            }
        }
        if !self.turn_urls.is_empty() && self.turn_secret.is_none() {
            return Err(ConfigError::Invalid {
                name: "turn_secret",
                why: "turn_urls need turn_secret".into(),
            });
        }
        positive("store_batch_max", self.store_batch_max as u64)?;
        positive("store_queue", self.store_queue as u64)?;
        positive("db_pool_size", u64::from(self.db_pool_size))?;
        if self.replay_limit as usize >= self.outbox_frames {
            // A replay shares the session's outbox with live traffic: it must fit with room.
            return Err(ConfigError::Invalid {
                name: "replay_limit",
                why: format!("must be below outbox_frames ({})", self.outbox_frames),
            });
        }
        if !(self.rate_per_s > 0.0 && self.rate_burst >= 1.0) {
            return Err(ConfigError::Invalid {
                name: "rate_per_s/rate_burst",
                why: "rate must be > 0 and burst >= 1".into(),
            });
        }
        if !matches!(
            self.sqlite_synchronous.as_str(),
            "full" | "normal" | "extra"
        ) {
            return Err(ConfigError::Invalid {
                name: "sqlite_synchronous",
                why: "must be full, normal or extra".into(),
            });
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                name: "database_url",
                why: "must start with sqlite:// or postgres://".into(),
            });
        }
        if matches!(&self.jwt_secret, Some(s) if s.len() < 16) {
            return Err(ConfigError::Invalid {
                name: "jwt_secret",
                why: "must be at least 16 bytes".into(),
            });
        }
        // -- engagement (issue 7) --
        self.engagement
            .check()
            .map_err(|why| ConfigError::Invalid {
                name: "engagement",
                why,
            })?;
        if !(0.0..=1.0).contains(&self.health_band_low)
            || !(0.0..=1.0).contains(&self.health_band_high)
            || self.health_band_low > self.health_band_high
        {
            return Err(ConfigError::Invalid {
                name: "health_band_low/health_band_high",
                why: "must be within 0..=1 and low <= high".into(),
            });
        }
        positive("churn_inactive_days", u64::from(self.churn_inactive_days))?;
        positive("stats_max_buckets", self.stats_max_buckets as u64)?;
        self.validate_cluster()
    }

    /// Cluster settings: PostgreSQL is the one source of truth the nodes share, so a NATS URL
    /// with SQLite is refused (each node would have its own database and its own seqs).
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.nats_url {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                return Err(ConfigError::Invalid {
                    name: "nats_url",
                    why: format!("{url:?} is not a nats:// or tls:// URL"),
                });
            }
            if !self.is_postgres() {
                return Err(ConfigError::Invalid {
                    name: "nats_url",
                    why: "cluster mode needs PostgreSQL as the shared source of truth: set \
                          database_url to postgres://... on every node (SQLite is single-node \
                          only), or unset nats_url to run one node"
                        .into(),
                });
            }
        }
        if let Some(id) = &self.node_id
            && !crate::protocol::valid_node_id(id)
        {
            return Err(ConfigError::Invalid {
                name: "node_id",
                why: "must be 1..=32 characters of A-Z a-z 0-9 _ -".into(),
            });
        }
        for (name, v) in [
            ("bus_gap_ms", self.bus_gap_ms),
            ("bus_sweep_ms", self.bus_sweep_ms),
            ("presence_heartbeat_ms", self.presence_heartbeat_ms),
            ("drain_batch", self.drain_batch as u64),
            ("drain_interval_ms", self.drain_interval_ms),
            ("bus_request_timeout_ms", self.bus_request_timeout_ms),
            ("bus_queue_max", self.bus_queue_max as u64),
            ("bus_queue_bytes", self.bus_queue_bytes as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    why: "must be at least 1".into(),
                });
            }
        }
        if self.presence_ttl_ms <= self.presence_heartbeat_ms {
            return Err(ConfigError::Invalid {
                name: "presence_ttl_ms",
                why: "must be above presence_heartbeat_ms".into(),
            });
        }
        Ok(())
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_s)
    }
}

/// A URL without its credentials (`scheme://***@host...`), for logs and messages: database
/// and NATS URLs may carry a user and password.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "addr = \"127.0.0.1:9000\"\nreplay_limit = 5\nheartbeat_s = 7"
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            replay_limit: Some(9),
            ..Default::default()
        };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.addr.port(), 9000, "file value used");
        assert_eq!(cfg.replay_limit, 9, "flag beats file");
        assert_eq!(cfg.heartbeat_s, 7);
        assert_eq!(cfg.max_frame_bytes, 64 * 1024, "default kept");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "no_such_key = 1").unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&args),
            Err(ConfigError::Parse { .. })
        ));

        let args = ServeArgs {
            outbox_frames: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&args),
            Err(ConfigError::Invalid { .. })
        ));
        let args = ServeArgs {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err());
        let args = ServeArgs {
            replay_limit: Some(5000),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err(), "a replay must fit the outbox");
        let args = ServeArgs {
            jwt_secret: Some("short".into()),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err());
    }

    #[test]
    fn engagement_table_and_stats_knobs() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "churn_inactive_days = 21\n[engagement]\nlevels = [0, 10]\n\
             [engagement.daily_caps]\nmessage = 5\n\
             [[engagement.badges]]\nid = \"chatty\"\nname = \"Chatty\"\n\
             metric = \"messages\"\nthreshold = 3"
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            health_band_high: Some(0.4),
            ..Default::default()
        };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.churn_inactive_days, 21);
        assert_eq!(cfg.health_band_high, 0.4, "flag");
        assert_eq!(cfg.health_band_low, 0.15, "default");
        assert_eq!(cfg.engagement.levels, vec![0, 10]);
        assert_eq!(cfg.engagement.daily_caps.message, 5);
        assert_eq!(cfg.engagement.daily_caps.checkin, 1);
        assert_eq!(
            cfg.engagement.badges.len(),
            1,
            "a listed table replaces the defaults"
        );
        let args = ServeArgs {
            health_band_low: Some(0.5),
            health_band_high: Some(0.2),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err(), "low above high");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[engagement]\nlevels = [5, 10]").unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err(), "levels must start at 0");
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redact_url("nats://user:secret@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("sqlite://studyhall.db"), "sqlite://studyhall.db");
    }

    #[test]
    fn cluster_mode_needs_postgres_and_a_sane_node_id() {
        let args = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..Default::default()
        };
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(err.contains("PostgreSQL"), "{err}");
        let args = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            database_url: Some("postgres://u@127.0.0.1/db".into()),
            node_id: Some("node-1".into()),
            ..Default::default()
        };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.node_id.as_deref(), Some("node-1"));
        let args = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            database_url: Some("postgres://u@127.0.0.1/db".into()),
            node_id: Some("a.b".into()),
            ..Default::default()
        };
        assert!(Config::load(&args).is_err(), "a dot would split subjects");
    }
}
