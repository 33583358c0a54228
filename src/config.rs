//! Server configuration: every setting and every limit as a named value with a default, read
//! from an optional TOML file, then `STUDYHALL_*` environment variables, then `serve` flags
//! (flags beat env, env beats file). Tests build a [`Config`] directly. This module knows
//! nothing of sockets or SQL; it only validates values.
//!
//! Each setting is written once, in the `settings!` list below: the [`Config`] field, its
//! default, its `serve` flag and variable, the help text, and the row of [`SETTINGS`] (from
//! which the README's configuration table is checked) all come from that one entry.

use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The variable naming the TOML file (`--config`); not a setting itself.
pub const CONFIG_ENV: &str = "STUDYHALL_CONFIG";

/// One setting as documented: what `serve --help` and the README's configuration table say.
#[derive(Clone, Copy, Debug)]
pub struct SettingDoc {
    /// The file key and the [`Config`] field.
    pub name: &'static str,
    /// `STUDYHALL_` and the name in upper case; `None` for a flag-only or file-only setting.
    pub env: Option<&'static str>,
    /// `--` and the name in kebab case; `None` for a file-only setting.
    pub flag: Option<&'static str>,
    /// The setting's value in a config, as the README table shows it (`unset`, `empty`, or
    /// the value in backticks).
    pub shown: fn(&Config) -> String,
    /// What it is for: the field's doc comment on one line (also the flag's help).
    pub doc: &'static str,
}

/// The documented setting called `name`. Panics on a name that is not a setting: clap
/// attributes outside this module use it, so a misspelt name fails when the CLI is built.
pub fn setting(name: &str) -> &'static SettingDoc {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no setting {name:?}"))
}

/// `prefix` then `name`, upper-cased (env) or with `_` as `-` (flags); `N` is the length of
/// the result. Used in constants, so a setting's variable and flag are known at compile time.
const fn spell<const N: usize>(prefix: &str, name: &str, upper: bool) -> [u8; N] {
    let (prefix, name) = (prefix.as_bytes(), name.as_bytes());
    assert!(prefix.len() + name.len() == N);
    let mut out = [0u8; N];
    let mut i = 0;
    while i < prefix.len() {
        out[i] = prefix[i];
        i += 1;
    }
    let mut j = 0;
    while j < name.len() {
        out[i + j] = match (upper, name[j]) {
            (true, c) => c.to_ascii_uppercase(),
            (false, b'_') => b'-',
            (false, c) => c,
        };
        j += 1;
    }
    out
}

const fn utf8(bytes: &'static [u8]) -> &'static str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => panic!("a setting's name is not UTF-8"),
    }
}

/// `spelled!(env name)` is `"STUDYHALL_NAME"`, `spelled!(flag name)` is `"--name"`.
macro_rules! spelled {
    (env $name:ident) => {
        spelled!(@ "STUDYHALL_", $name, true)
    };
    (flag $name:ident) => {
        spelled!(@ "--", $name, false)
    };
    (@ $prefix:literal, $name:ident, $upper:literal) => {{
        const NAME: &str = stringify!($name);
        const BYTES: [u8; $prefix.len() + NAME.len()] = spell($prefix, NAME, $upper);
        const TEXT: &str = utf8(&BYTES);
        TEXT
    }};
}

/// A doc comment's lines as one line of text.
macro_rules! doc_line {
    ($($doc:literal)*) => {
        concat!($($doc),*).trim_ascii_start()
    };
}

/// The one list of settings. Each entry is
///
/// ```text
/// /// What it is for: the `Config` field's doc, the flag's help and the README table's
/// /// meaning (one or more lines; no blank line, no `|`).
/// name: Type = default,
/// ```
///
/// and it gives the [`Config`] field with its default, the [`ServeArgs`] flag
/// `--name-with-dashes` reading `STUDYHALL_NAME_IN_CAPITALS`, the step of [`Config::load`]
/// that lays a given flag or variable over the file, and the row of [`SETTINGS`]. Shapes:
///
/// - `name: Type = default`: file key, variable and flag; the flag takes a `Type`.
/// - `name: Option<T> = None`: unset unless given; the flag takes a `T`.
/// - `name: Vec<String> = Vec::new()`: a TOML array in the file, comma-separated in the
///   variable and the flag; blank entries are dropped.
/// - `#[secret] name: Option<T> = None`: as `Option`, and `--help` hides the variable's value.
/// - `#[flag_only] name: bool = false`: only `--name` sets it (no file key, no variable).
/// - `#[file_only] name: Type = default`: only the file sets it (nested tables have no sensible
///   flag form).
macro_rules! settings {
    // Each shape becomes one record:
    // { kind name [docs] [Config type] [default] [Config field attributes] [ServeArgs field] }
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ #[secret] $name:ident : Option<$t:ty> = None, $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            optional $name [$($doc)*] [Option<$t>] [None] [] [
                #[arg(long, env = spelled!(env $name), hide_env_values = true,
                      help = doc_line!($($doc)*))]
                pub $name: Option<$t>,
            ]
        }] $($rest)*);
    };
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ #[flag_only] $name:ident : bool = false, $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            flag_only $name [$($doc)*] [bool] [false] [#[serde(skip)]] [
                #[arg(long, help = doc_line!($($doc)*))]
                pub $name: bool,
            ]
        }] $($rest)*);
    };
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ #[file_only] $name:ident : $t:ty = $default:expr, $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            file_only $name [$($doc)*] [$t] [$default] [] []
        }] $($rest)*);
    };
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ $name:ident : Option<$t:ty> = None, $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            optional $name [$($doc)*] [Option<$t>] [None] [] [
                #[arg(long, env = spelled!(env $name), help = doc_line!($($doc)*))]
                pub $name: Option<$t>,
            ]
        }] $($rest)*);
    };
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ $name:ident : Vec<String> = Vec::new(), $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            list $name [$($doc)*] [Vec<String>] [Vec::new()] [] [
                #[arg(long, env = spelled!(env $name), value_delimiter = ',',
                      help = doc_line!($($doc)*))]
                pub $name: Option<Vec<String>>,
            ]
        }] $($rest)*);
    };
    (@munch [$($done:tt)*]
        $(#[doc = $doc:literal])+ $name:ident : $t:ty = $default:expr, $($rest:tt)*
    ) => {
        settings!(@munch [$($done)* {
            plain $name [$($doc)*] [$t] [$default] [] [
                #[arg(long, env = spelled!(env $name), help = doc_line!($($doc)*))]
                pub $name: Option<$t>,
            ]
        }] $($rest)*);
    };
    // All entries read: write everything out.
    (@munch [$({
        $kind:ident $name:ident [$($doc:literal)*] [$ty:ty] [$default:expr]
        [$(#[$cfg_attr:meta])*] [$($arg:tt)*]
    })*]) => {
        /// Everything `serve` needs. Field docs say why each limit exists; they are also the
        /// flags' help and the meanings in the README's configuration table.
        #[derive(Clone, Debug, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                $(#[$cfg_attr])*
                pub $name: $ty,
            )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $($name: $default,)* }
            }
        }

        /// `serve` flags. Each also reads its `STUDYHALL_*` variable (clap's `env`), so one
        /// struct carries "env, then flags"; the file is layered underneath in
        /// [`Config::load`].
        #[derive(Args, Debug, Default, Clone)]
        pub struct ServeArgs {
            /// TOML file with any of the settings below (snake_case keys).
            #[arg(long, env = CONFIG_ENV)]
            pub config: Option<std::path::PathBuf>,
            $($($arg)*)*
        }

        /// Lays every setting given in env or flags over `cfg`.
        fn overlay(cfg: &mut Config, args: &ServeArgs) {
            $(settings!(@overlay $kind cfg args $name);)*
        }

        /// Every setting, in the order of the README's configuration table.
        pub static SETTINGS: &[SettingDoc] = &[$(
            SettingDoc {
                name: stringify!($name),
                env: settings!(@env $kind $name),
                flag: settings!(@flag $kind $name),
                shown: |cfg| Shown::shown(&cfg.$name),
                doc: doc_line!($($doc)*),
            },
        )*];
    };

    (@munch [$($done:tt)*] $($bad:tt)*) => {
        compile_error!(concat!("settings!: not a setting entry: ", stringify!($($bad)*)));
    };

    (@overlay plain $cfg:ident $args:ident $name:ident) => {
        if let Some(v) = $args.$name.clone() {
            $cfg.$name = v;
        }
    };
    (@overlay optional $cfg:ident $args:ident $name:ident) => {
        if $args.$name.is_some() {
            $cfg.$name = $args.$name.clone();
        }
    };
    (@overlay list $cfg:ident $args:ident $name:ident) => {
        if let Some(v) = $args.$name.clone() {
            $cfg.$name = v;
        }
        $cfg.$name.retain(|s| !s.trim().is_empty());
    };
    (@overlay flag_only $cfg:ident $args:ident $name:ident) => {
        $cfg.$name |= $args.$name;
    };
    (@overlay file_only $cfg:ident $args:ident $name:ident) => {};

    (@env flag_only $name:ident) => { None };
    (@env file_only $name:ident) => { None };
    (@env $kind:ident $name:ident) => { Some(spelled!(env $name)) };
    (@flag file_only $name:ident) => { None };
    (@flag $kind:ident $name:ident) => { Some(spelled!(flag $name)) };

    ($($entries:tt)*) => {
        settings!(@munch [] $($entries)*);
    };
}

settings! {
    /// Listen address.
    addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
    /// `sqlite://PATH` (file created on first start) or `postgres://...` /
    /// `postgresql://...`.
    database_url: String = "sqlite://studyhall.db".into(),
    /// HS256 secret for client tokens, at least 16 bytes. Unset: a random secret is generated
    /// on first start and kept in the database, so `studyhall token` on the same database
    /// signs valid tokens. Set it explicitly in production.
    #[secret]
    jwt_secret: Option<String> = None,
    /// Bearer key of the `/api` HTTP API. Unset: `/api` answers 503. Only
    /// `/api/openapi.json` is served without the key.
    #[secret]
    api_key: Option<String> = None,
    /// Flag only, not a file key. Enables `POST /dev/token`, which the web client's sign-in
    /// form uses (body `{user, name?, role?, rooms?, ttl?}` → `{token}`; `sub`, `id` and
    /// `user_id` are aliases of `user`). Also creates, at start and if missing, the open
    /// `group` room `lobby` ("Lobby", Q&A enabled, peer answers allowed). For development
    /// only.
    #[flag_only]
    dev: bool = false,
    /// Exact `Origin` values allowed to open `/ws`, checked before the WebSocket upgrade:
    /// comma-separated (env/flag) or a TOML array (file). Empty: any origin. Requests without
    /// an `Origin` header are not checked.
    allowed_origins: Vec<String> = Vec::new(),
    /// Cluster mode: `nats://host:port` (or `tls://...`) of the NATS every node shares (see
    /// "Running a cluster"). Refused at start with an SQLite `database_url`: cluster mode needs
    /// PostgreSQL. Unset: one node.
    nats_url: Option<String> = None,
    /// Largest WebSocket frame/message a client may send, in bytes; beyond it, close 1009.
    max_frame_bytes: usize = 64 * 1024,
    /// Frames queued for one session before it counts as a slow consumer (close 4008); also
    /// the size of the join gate buffer.
    outbox_frames: usize = 1024,
    /// Frames the write loop coalesces into one flush.
    write_batch_frames: usize = 64,
    /// Milliseconds a session's write loop waits with nothing to write before it parks: its
    /// task ends, and the next frame, ping or close starts a new one, so an idle connection
    /// holds no write task (about 1.2 KB). 0: it never parks.
    write_idle_ms: u64 = 1_000,
    /// Write loops parked since the last trim after which the server gives freed heap pages
    /// back to the system (glibc's `malloc_trim`; looked at every `write_idle_ms`): the parked
    /// loops' memory lies between live blocks, and stays in the resident size until then.
    /// 0: never.
    heap_trim_parks: u64 = 1_000,
    /// Seconds between two such trims at least: where connections keep waking and parking
    /// (a big room with a message every few seconds) the pages would only be taken again.
    heap_trim_interval_s: u64 = 60,
    /// Bytes of a session's coalesced frames held back before they are written to the socket
    /// (also at the end of each write batch); the buffer is given back once written, so an
    /// idle connection keeps none. A smaller value means more writes per burst. 0: every frame
    /// is written at once.
    ws_write_buffer_bytes: usize = 16 * 1024,
    /// Longest WebSocket frame the server sends, in bytes of payload: a longer text message
    /// goes as fragments of at most this size (RFC 6455 §5.4; clients reassemble them). No
    /// buffer is kept per connection either way (a frame's payload is written from the shared
    /// message); fragments only cut a long message into several writes. 0: never fragment.
    ws_fragment_bytes: usize = 0,
    /// The most bytes read from a WebSocket at once, into a buffer shared by the connections
    /// of a worker thread; a connection keeps only what it could not hand out yet (an
    /// unfinished frame), nothing between messages.
    ws_read_buffer_bytes: usize = 4096,
    /// Seconds between server pings; a client silent for twice this is closed (1000). Each
    /// completed write of the session also restarts that clock. Also the time limit of each
    /// socket write (frame, flush, ping): a client that stops reading is dropped after it, even
    /// before its outbox is full.
    heartbeat_s: u64 = 25,
    /// Milliseconds a new connection has to send `hello` (else close 4001).
    hello_timeout_ms: u64 = 10_000,
    /// Most connections open at once, WebSockets included. At the cap a new connection takes
    /// the place of the oldest one that has not sent a complete request yet, or is answered
    /// 503 and closed. 0: a tenth of the process's open-file limit plus 32 below it (kept for
    /// the database, the bus and files).
    max_connections: usize = 0,
    /// Most connections open at once from one client address, with the same eviction as
    /// `max_connections`. 0: no per-address cap (behind a reverse proxy every client shares
    /// its address).
    max_connections_per_ip: usize = 0,
    /// Connections (at least 1) the kernel queues for the server to accept (the `listen`
    /// backlog, capped by the kernel's `net.core.somaxconn`). A connection that finds the
    /// queue full is dropped and its client's TCP tries again a second later, so a storm of
    /// joins or reconnects wants room here.
    listen_backlog: u32 = 4096,
    /// Milliseconds for an HTTP request head to arrive, from the connection's first read or
    /// the end of its previous response; slower connections (idle or slowloris) are closed.
    http_header_timeout_ms: u64 = 10_000,
    /// Milliseconds an HTTP request may take, its body read included; slower ones are
    /// answered 408 and closed. WebSocket upgrades answer at once and are not affected.
    http_request_timeout_ms: u64 = 30_000,
    /// Sustained commands per second per connection (token-bucket refill rate; must be > 0).
    rate_per_s: f64 = 50.0,
    /// Burst size of the per-connection token bucket (must be ≥ 1).
    rate_burst: f64 = 100.0,
    /// Refused frames (rate-limited, malformed, binary) within 10 s after which the connection
    /// is closed 4029.
    abuse_strikes: u32 = 50,
    /// Per user, across their sessions (in a cluster a user on `n` nodes gets `1/n` of each
    /// per-user rate and burst on each): messages, edits, reactions, questions, answers and
    /// reports per second (sustained); beyond it `rate_limited`.
    user_write_per_s: f64 = 5.0,
    /// Per user: burst of the write limit.
    user_write_burst: f64 = 30.0,
    /// Per user: room joins and leaves per second (sustained).
    user_join_per_s: f64 = 2.0,
    /// Per user: burst of the join limit.
    user_join_burst: f64 = 30.0,
    /// Per user: raised and lowered hands per second (sustained).
    user_hand_per_s: f64 = 0.5,
    /// Per user: burst of the hand limit.
    user_hand_burst: f64 = 6.0,
    /// Per user: calls placed per second (sustained).
    user_call_per_s: f64 = 0.2,
    /// Per user: burst of the call limit.
    user_call_burst: f64 = 5.0,
    /// Rooms one session may have joined at once.
    max_rooms_per_session: usize = 100,
    /// Concurrent WebSocket sessions one user may hold (more: close 4029).
    max_sessions_per_user: usize = 10,
    /// Sessions one room may have joined at once.
    max_room_sessions: usize = 50_000,
    /// Online users above which a room sends no per-user presence or typing events; its
    /// sessions get `online_count` instead (the join reply still has `online_count` and the
    /// first this-many users).
    presence_limit: usize = 1000,
    /// Milliseconds a presence, typing or `online_count` frame may wait to leave in one write
    /// with what follows (0 = at once).
    presence_flush_ms: u64 = 50,
    /// Milliseconds over which presence changes are gathered: each room announces the net
    /// change once per period, so someone who drops and resumes within it is never announced
    /// gone, and a reconnect storm costs each session one frame per changed user per period.
    presence_interval_ms: u64 = 1000,
    /// Most users whose presence change a room announces in one presence round, oldest change
    /// first; the others wait for the next round, so a round never sends one session more than
    /// this many `presence` frames. At most half of `outbox_frames`.
    presence_round_max: usize = 256,
    /// Milliseconds between `online_count` events to rooms whose count changed (a `live`
    /// room's audience and rooms past `presence_limit` follow presence by count).
    online_count_ms: u64 = 1000,
    /// Writes one session may have waiting for commit; it stops reading beyond this.
    max_inflight_per_session: usize = 256,
    /// Most events `join {after_seq}` replays; beyond it the reply says `gap: true` and
    /// replays nothing. Must be below `outbox_frames`.
    replay_limit: u32 = 1000,
    /// Bytes of its latest events each room with sessions on this node keeps in memory, so
    /// that a resume replays from there instead of reading the store (a resume from further
    /// back reads the store). 0 keeps none; in cluster mode (`nats_url`) none is kept. At most
    /// 16 MiB.
    replay_cache_bytes: usize = 65536,
    /// Longest message or answer text, in characters (also for announcements: 413 beyond it).
    max_text_chars: usize = 4000,
    /// Longest question, in characters.
    max_question_chars: usize = 1000,
    /// People on stage at once in one room.
    max_on_stage: usize = 10,
    /// Milliseconds between looks for questions past their room's answer SLA (to send
    /// `question_overdue` to host/ta).
    sla_check_interval_ms: u64 = 10_000,
    /// Seconds a call rings before it ends as `missed`.
    ring_timeout_s: u64 = 30,
    /// Seconds a call party whose connection dropped has to send `call_resume` before the call
    /// ends as `failed` (may be 0).
    call_grace_s: u64 = 15,
    /// Milliseconds between checks of the call timers (ring timeout, grace period).
    call_tick_ms: u64 = 250,
    /// Sessions one room's A/V mesh may hold (`class` and `live` rooms); one more `av_join`
    /// gets `conflict`.
    av_mesh_max: usize = 6,
    /// The SFU's one UDP socket (every SFU session's media, demultiplexed by ICE): a concrete
    /// address clients can reach, port 0 for any free port. It is also the address the SFU
    /// advertises (its one host candidate), so in cluster mode each node needs its own.
    sfu_udp_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0)),
    /// Sessions one room's SFU may hold; one more `av_join` gets `conflict`.
    sfu_room_max: usize = 50,
    /// SFU sessions this node may hold across rooms; one more `av_join` gets `unavailable`.
    sfu_sessions_max: usize = 500,
    /// Least time between two `active_speakers` events of a room, in milliseconds (500 or more).
    sfu_speakers_ms: u64 = 500,
    /// Least time between two keyframe requests (PLI) the SFU sends for one track, in
    /// milliseconds.
    sfu_keyframe_ms: u64 = 500,
    /// How long the SFU keeps a peer connection whose ICE connectivity was lost, in
    /// milliseconds, for the client to come back or restart ICE; then it closes it and tells
    /// the session `av_closed {reason:"connection_lost"}`.
    sfu_ice_grace_ms: u64 = 5_000,
    /// How long a session that joined the SFU (`av_join`) may take to bring its media path up
    /// (its offer, ICE and DTLS), in milliseconds; past it the SFU closes it and tells the
    /// session `av_closed {reason:"connection_lost"}`, so a peer that never connects holds no
    /// SFU place.
    sfu_connect_wait_ms: u64 = 30_000,
    /// How long the SFU's connectivity checks to a peer go unanswered before its ICE counts as
    /// lost (and the grace starts), in milliseconds (about; 1000 or more). Never less than 15 s
    /// after the peer's own last check: the ICE agent keeps a pair the peer checked lately.
    sfu_ice_lost_ms: u64 = 10_000,
    /// Where the SFU's estimate of each viewer's downlink starts, in kbit/s, before bandwidth
    /// estimation (TWCC, else the viewer's REMB) has measured it. Each viewer gets, per video
    /// track, the fastest simulcast layer its estimate (shared out among its tracks) carries.
    /// 0 turns estimation off (no probing, no pacing): each viewer then gets the fastest layer
    /// within `sfu_viewer_max_kbps`.
    sfu_bwe_start_kbps: u64 = 2_500,
    /// The most media the SFU sends one viewer, in kbit/s, whatever its estimate says (0: no
    /// cap): bounds each viewer's egress, and with it the simulcast layers it gets.
    sfu_viewer_max_kbps: u64 = 0,
    /// STUN URLs (`stun:host:3478`) handed to clients in `ice_servers`: comma-separated
    /// (env/flag) or a TOML array (file).
    stun_urls: Vec<String> = Vec::new(),
    /// TURN URLs (`turn:host:3478`, `turns:host:5349`) handed to clients with time-limited
    /// credentials: comma-separated (env/flag) or a TOML array (file). Refused at start without
    /// `turn_secret`.
    turn_urls: Vec<String> = Vec::new(),
    /// The TURN server's shared secret (coturn `static-auth-secret`) that signs TURN
    /// credentials. Unset: no TURN entry is handed out.
    #[secret]
    turn_secret: Option<String> = None,
    /// Lifetime of a TURN credential, in seconds.
    turn_ttl_s: u64 = 3600,
    /// Longest reaction emoji, in characters.
    max_emoji_chars: usize = 16,
    /// Longest `client_msg_id` (of `send` and of announcements), in characters.
    max_client_msg_id_chars: usize = 64,
    /// Distinct emoji reactions one message may carry.
    max_reactions_per_message: u32 = 64,
    /// Most writes one group commit carries.
    store_batch_max: usize = 512,
    /// Microseconds the writer waits for more writes when its queue runs dry; 0 = commit at
    /// once (batches still form while the previous commit is in flight).
    store_batch_linger_us: u64 = 0,
    /// Milliseconds the writer waits for more writes while every write it holds is one nobody
    /// waits for (the attendance and stage log), so that a reconnect storm's log rows share
    /// a commit; a write someone waits for ends the wait at once. 0 = commit at once. At most
    /// 1000.
    store_detached_linger_ms: u64 = 20,
    /// Writes queued for the group-commit writer before submitters wait.
    store_queue: usize = 8192,
    /// Database connections in the pool (at least 2 are used).
    db_pool_size: u32 = 8,
    /// Searches (`search` command, search API) run at once on this node; each holds a pool
    /// connection, so the others stay free for history, joins and the API.
    search_concurrency: usize = 2,
    /// Milliseconds a search waits for a free slot before it is answered `unavailable`.
    search_wait_ms: u64 = 2_000,
    /// Milliseconds after which a running search's caller is answered `unavailable` (the
    /// query keeps its slot until it ends).
    search_timeout_ms: u64 = 5_000,
    /// SQLite `synchronous` pragma: `full` (an ack survives power loss), `normal` (survives a
    /// process crash, not power loss) or `extra`.
    sqlite_synchronous: String = "full".into(),
    /// With `sqlite_synchronous = "full"`: `true` (the default) makes each group commit wait
    /// for the disk inside its `COMMIT` (SQLite's own way). `false` lets the writer go on to
    /// the next batch while another thread syncs the log, and answers and publishes the batch
    /// only once that sync is done: an `ok` still survives power loss, but a store read on
    /// another connection (a resume's replay) may see up to one batch before it is synced,
    /// and the database must be a plain file path (no symlinked file, no `file:` URI).
    sqlite_commit_syncs: bool = true,
    /// SQLite page cache per connection, in KiB (`cache_size`): it fills up to this as the
    /// database grows, so the process's memory grows by up to this times the connections
    /// (`db_pool_size` plus the writer's) before it levels off.
    sqlite_cache_kib: u32 = 32_768,
    /// Milliseconds a session waits, at shutdown, for its accepted writes to be answered. The
    /// wait for all sessions to go is bounded by this plus 2 s; then the store is flushed.
    shutdown_grace_ms: u64 = 5_000,

    // Engagement and room health.
    /// The `[engagement]` table: point table, daily caps, levels, badge rules.
    #[file_only]
    engagement: crate::engagement::EngagementConfig = Default::default(),
    /// Weekly active ratio below this is flagged `low` in room statistics (0..=1).
    health_band_low: f64 = 0.15,
    /// Weekly active ratio above this is flagged `high` (0..=1, at least `health_band_low`).
    health_band_high: f64 = 0.30,
    /// Members with no contribution for this many days before `to` are a churn risk.
    churn_inactive_days: u32 = 14,
    /// Most churn-risk users one statistics answer lists (the count stays exact); may be 0.
    churn_list_max: usize = 50,
    /// Most buckets one statistics query may span (`bad_request` beyond).
    stats_max_buckets: usize = 366,

    // Webhooks (`/api/webhooks`).
    /// Allow webhook endpoints on loopback, private, link-local and other non-public
    /// addresses (checked at creation and again, after DNS resolution, before each delivery).
    /// For tests and same-host receivers only.
    webhook_allow_private: bool = false,
    /// Milliseconds one webhook delivery may take (connect, send, response head); past it the
    /// attempt counts as failed and is retried.
    webhook_timeout_ms: u64 = 10_000,
    /// Waits between webhook delivery attempts after a failure, comma-separated, each a number
    /// with `ms`, `s`, `m` or `h` (jittered by up to 10 %; a longer `Retry-After` wins). The
    /// first attempt is immediate; after the last wait's attempt fails the delivery is given up.
    webhook_retry_schedule: String = "5s,5m,30m,2h,5h,10h".into(),
    /// Seconds a rotated-out webhook secret keeps signing beside the new one (a second
    /// `v1,` entry in `webhook-signature`), so receivers can switch without losing events.
    webhook_secret_grace_s: u64 = 86_400,
    /// Milliseconds between the webhook sender's looks for due deliveries (new events wake it
    /// at once; retries are found by this look).
    webhook_poll_ms: u64 = 1_000,
    /// Webhook deliveries in flight at once (each to a different endpoint and room).
    webhook_concurrency: usize = 16,
    /// Webhook endpoints that may be registered.
    webhook_max_endpoints: usize = 100,
    /// Most deliveries `GET /api/webhooks/{id}/deliveries` lists (newest first).
    webhook_log_page: usize = 100,
    /// A PEM file of extra root certificates that `https://` webhook endpoints may chain to,
    /// besides the system's (for a private CA). Unset: the system's roots only.
    webhook_ca_file: Option<String> = None,
    /// Seconds finished webhook deliveries (delivered, given up, or of a disabled or deleted
    /// endpoint), their attempts, and outbox events no delivery refers to any more are kept
    /// before the sender prunes them; 0 keeps them forever. Pending deliveries are never pruned.
    webhook_retention_s: u64 = 604_800,
    /// Seconds between the webhook sender's pruning passes (each deletes in batches of
    /// `webhook_prune_batch` rows, one short transaction per batch).
    webhook_prune_every_s: u64 = 60,
    /// Most rows one pruning transaction deletes.
    webhook_prune_batch: usize = 500,
    // Polls, quizzes and the class lifecycle.
    /// Most options one poll or quiz may have (at least 2 are needed).
    poll_max_options: usize = 10,
    /// Longest poll option, in characters.
    poll_max_option_chars: usize = 200,
    /// Longest word-cloud answer, in characters.
    poll_max_text_chars: usize = 100,
    /// Longest `duration_s` a poll may run before it closes by itself.
    poll_max_duration_s: u32 = 86_400,
    /// Most words a word cloud's results list (the most frequent ones).
    poll_word_cloud_top: usize = 50,
    /// Milliseconds between results updates of one open poll: answers arriving meanwhile are
    /// coalesced into one `poll` event, so a burst of 500 answers costs a handful of events.
    poll_results_interval_ms: u64 = 1_000,
    /// Most answers one `poll_answers` page carries (also the default `limit`).
    poll_answers_page: usize = 200,
    /// Milliseconds between looks for polls past `closes_at` and classes past `starts_at` or
    /// `ends_at` (the clock that closes and starts/ends them).
    class_clock_ms: u64 = 1_000,
    // Breakout groups and whiteboards.
    /// Most groups one `breakout_open` may create.
    breakout_max_groups: usize = 50,
    /// Longest breakout group title, in characters.
    breakout_max_title_chars: usize = 100,
    /// Longest `duration_s` breakout groups may run before they close by themselves.
    breakout_max_duration_s: u32 = 86_400,
    /// Seconds before a breakout's `closes_at` that its parent and group rooms hear
    /// `breakout_warning` (once per breakout).
    breakout_warning_s: u32 = 60,
    /// Largest `stage.talk_cap_s` a room may set: the longest continuous time on stage the
    /// server may be asked to enforce.
    stage_talk_cap_max_s: u32 = 86_400,
    /// Milliseconds between looks for speakers past their room's `stage.talk_cap_s`.
    stage_clock_ms: u64 = 1_000,
    /// Largest y-protocols message one `board` frame may carry, in bytes after base64
    /// decoding.
    board_max_message_bytes: usize = 32_768,
    /// Most boards one room may hold.
    board_max_per_room: usize = 20,
    /// Largest a board's document may grow, in bytes of its encoded state; updates past it are
    /// refused.
    board_max_doc_bytes: usize = 1_048_576,
    /// Milliseconds between the board saver's looks: it compacts the boards whose logs are
    /// long enough (`board_compact_every`) and saves whole the state of a board whose update
    /// could not be logged (also at shutdown, when it compacts every board with a log).
    board_save_ms: u64 = 2_000,
    /// Updates logged for a board before the saver folds them into its snapshot.
    board_compact_every: usize = 200,
    /// Most logged updates one compaction folds (the rest wait for the next look).
    board_compact_batch: usize = 5_000,

    // Cluster mode (several nodes on NATS); used only with `nats_url`.
    /// Cluster mode: this node's name, 1..=32 of `[A-Za-z0-9_-]`, unique in the cluster.
    /// Session and call ids end in `.NODE_ID`. Unset: a random `n` + 8 hex digits at each
    /// start.
    node_id: Option<String> = None,
    /// Cluster mode: milliseconds a node holds back a room event whose predecessor has not
    /// arrived over NATS before it refills the missing seqs from PostgreSQL.
    bus_gap_ms: u64 = 100,
    /// Cluster mode: milliseconds between a node's comparisons of each subscribed room's
    /// `last_seq` in PostgreSQL with what it delivered (finds an event lost at the end of a
    /// burst); also run at once after a NATS reconnect or slow-consumer event. One query per
    /// 500 subscribed rooms; after a reconnect or slow-consumer event it also drops every
    /// cached room policy. The A/V sweep runs at the same interval: for the rooms whose A/V
    /// has members on this node, one read per 500 rooms, and a write only where it finds
    /// something to repair; and for each room this node's SFU runs, one read of its claim
    /// (see "Running a cluster").
    bus_sweep_ms: u64 = 1_000,
    /// Cluster mode: milliseconds between a node's announcements of its online users and
    /// sessions (and a quarter of this, at least 50 ms, after a local change). A heartbeat of
    /// any size is sent in parts of at most half the NATS server's `max_payload` each (see
    /// "Running a cluster"), so node size is not limited by it.
    presence_heartbeat_ms: u64 = 1_000,
    /// Cluster mode: milliseconds after which a silent node is dropped: its users go offline
    /// elsewhere. Must be above `presence_heartbeat_ms`.
    presence_ttl_ms: u64 = 3_500,
    /// Cluster mode: sessions closed with 1001 per batch when the node drains (SIGTERM).
    drain_batch: usize = 100,
    /// Cluster mode: milliseconds between two drain batches.
    drain_interval_ms: u64 = 100,
    /// Cluster mode: milliseconds a node waits for the node that owns a call, or runs a room's
    /// SFU, to answer a forwarded call or SFU command (else `unavailable`), and for the nodes
    /// not heard from yet to say whether a called user is online there; also bounds NATS
    /// flushes.
    bus_request_timeout_ms: u64 = 2_000,
    /// Cluster mode: messages waiting for the NATS publisher at most; past it a publish is
    /// dropped (room events are then refilled from PostgreSQL by the receivers, like any NATS
    /// loss).
    bus_queue_max: usize = 65_536,
    /// Cluster mode: the same bound in payload bytes, so a NATS stall cannot pile up
    /// gigabytes of large events.
    bus_queue_bytes: usize = 64 << 20,
}

/// The most `replay_cache_bytes` may be: every room with a session here may hold that much.
const MAX_REPLAY_CACHE_BYTES: usize = 16 << 20;

/// The most `store_detached_linger_ms` may be: a class summary may lag by that much.
const MAX_DETACHED_LINGER_MS: u64 = 1000;

/// How a value looks in the README's configuration table.
trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_in_backticks {
    ($($t:ty),*) => {
        $(impl Shown for $t {
            fn shown(&self) -> String {
                format!("`{self}`")
            }
        })*
    };
}

shown_in_backticks!(bool, u32, u64, usize, f64, String, SocketAddr);

impl Shown for Option<String> {
    fn shown(&self) -> String {
        self.as_ref().map_or_else(|| "unset".into(), Shown::shown)
    }
}

impl Shown for Vec<String> {
    fn shown(&self) -> String {
        if self.is_empty() {
            "empty".into()
        } else {
            format!("`{}`", self.join(","))
        }
    }
}

impl Shown for crate::engagement::EngagementConfig {
    fn shown(&self) -> String {
        "see [Engagement and statistics](#engagement-and-statistics)".into()
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

impl Config {
    /// File (if any) < env < flags, then validation.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut cfg = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        overlay(&mut cfg, args);
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
        self.validate_sessions()?;
        self.validate_calls()?;
        self.validate_store()?;
        self.validate_rates()?;
        self.validate_backend()?;
        self.validate_engagement()?;
        self.validate_classroom()?;
        self.validate_cluster()
    }

    /// Session, room and message limits.
    fn validate_sessions(&self) -> Result<(), ConfigError> {
        positive("max_frame_bytes", self.max_frame_bytes as u64)?;
        positive("outbox_frames", self.outbox_frames as u64)?;
        positive("write_batch_frames", self.write_batch_frames as u64)?;
        positive("ws_read_buffer_bytes", self.ws_read_buffer_bytes as u64)?;
        positive("heartbeat_s", self.heartbeat_s)?;
        positive("hello_timeout_ms", self.hello_timeout_ms)?;
        positive("listen_backlog", u64::from(self.listen_backlog))?;
        positive("http_header_timeout_ms", self.http_header_timeout_ms)?;
        positive("http_request_timeout_ms", self.http_request_timeout_ms)?;
        positive("abuse_strikes", u64::from(self.abuse_strikes))?;
        positive("max_rooms_per_session", self.max_rooms_per_session as u64)?;
        positive("max_sessions_per_user", self.max_sessions_per_user as u64)?;
        positive("max_room_sessions", self.max_room_sessions as u64)?;
        positive("presence_limit", self.presence_limit as u64)?;
        positive("online_count_ms", self.online_count_ms)?;
        positive("presence_interval_ms", self.presence_interval_ms)?;
        positive("presence_round_max", self.presence_round_max as u64)?;
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
        Ok(())
    }

    /// Calls, A/V, the SFU and ICE servers.
    fn validate_calls(&self) -> Result<(), ConfigError> {
        positive("ring_timeout_s", self.ring_timeout_s)?;
        positive("av_mesh_max", self.av_mesh_max as u64)?;
        positive("sfu_room_max", self.sfu_room_max as u64)?;
        positive("sfu_sessions_max", self.sfu_sessions_max as u64)?;
        positive("sfu_keyframe_ms", self.sfu_keyframe_ms)?;
        positive("sfu_ice_grace_ms", self.sfu_ice_grace_ms)?;
        positive("sfu_connect_wait_ms", self.sfu_connect_wait_ms)?;
        if self.sfu_ice_lost_ms < 1_000 {
            return Err(ConfigError::Invalid {
                name: "sfu_ice_lost_ms",
                why: "must be at least 1000".into(),
            });
        }
        if self.sfu_speakers_ms < 500 {
            return Err(ConfigError::Invalid {
                name: "sfu_speakers_ms",
                why: "must be at least 500 (the protocol's bound)".into(),
            });
        }
        if self.sfu_udp_addr.ip().is_unspecified() {
            return Err(ConfigError::Invalid {
                name: "sfu_udp_addr",
                why: "must be a concrete address: it is the SFU's ICE candidate".into(),
            });
        }
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
        Ok(())
    }

    /// The store writer, its pool and search.
    fn validate_store(&self) -> Result<(), ConfigError> {
        positive("store_batch_max", self.store_batch_max as u64)?;
        positive("store_queue", self.store_queue as u64)?;
        positive("db_pool_size", u64::from(self.db_pool_size))?;
        positive("search_concurrency", self.search_concurrency as u64)?;
        positive("search_timeout_ms", self.search_timeout_ms)?;
        Ok(())
    }

    /// The replay bound and the rate limits.
    fn validate_rates(&self) -> Result<(), ConfigError> {
        if self.replay_limit as usize >= self.outbox_frames {
            // A replay shares the session's outbox with live traffic: it must fit with room.
            return Err(ConfigError::Invalid {
                name: "replay_limit",
                why: format!("must be below outbox_frames ({})", self.outbox_frames),
            });
        }
        if self.store_detached_linger_ms > MAX_DETACHED_LINGER_MS {
            return Err(ConfigError::Invalid {
                name: "store_detached_linger_ms",
                why: format!("must be at most {MAX_DETACHED_LINGER_MS}"),
            });
        }
        if self.replay_cache_bytes > MAX_REPLAY_CACHE_BYTES {
            return Err(ConfigError::Invalid {
                name: "replay_cache_bytes",
                why: format!("must be at most {MAX_REPLAY_CACHE_BYTES} (16 MiB)"),
            });
        }
        if self.presence_round_max.saturating_mul(2) > self.outbox_frames {
            // A presence round shares the outbox with live traffic too.
            return Err(ConfigError::Invalid {
                name: "presence_round_max",
                why: format!(
                    "must be at most half of outbox_frames ({})",
                    self.outbox_frames
                ),
            });
        }
        for (name, rate, burst) in [
            (
                "user_write_per_s/user_write_burst",
                self.user_write_per_s,
                self.user_write_burst,
            ),
            (
                "user_join_per_s/user_join_burst",
                self.user_join_per_s,
                self.user_join_burst,
            ),
            (
                "user_hand_per_s/user_hand_burst",
                self.user_hand_per_s,
                self.user_hand_burst,
            ),
            (
                "user_call_per_s/user_call_burst",
                self.user_call_per_s,
                self.user_call_burst,
            ),
        ] {
            if !(rate > 0.0 && burst >= 1.0) {
                return Err(ConfigError::Invalid {
                    name,
                    why: "the rate must be > 0 and the burst >= 1".into(),
                });
            }
        }
        if !(self.rate_per_s > 0.0 && self.rate_burst >= 1.0) {
            return Err(ConfigError::Invalid {
                name: "rate_per_s/rate_burst",
                why: "rate must be > 0 and burst >= 1".into(),
            });
        }
        Ok(())
    }

    /// The database backend and the token secret.
    fn validate_backend(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Engagement, room health, webhooks and statistics.
    fn validate_engagement(&self) -> Result<(), ConfigError> {
        // -- engagement --
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
        positive("webhook_timeout_ms", self.webhook_timeout_ms)?;
        positive("webhook_poll_ms", self.webhook_poll_ms)?;
        positive("webhook_concurrency", self.webhook_concurrency as u64)?;
        positive("webhook_max_endpoints", self.webhook_max_endpoints as u64)?;
        positive("webhook_log_page", self.webhook_log_page as u64)?;
        positive("webhook_prune_every_s", self.webhook_prune_every_s)?;
        positive("webhook_prune_batch", self.webhook_prune_batch as u64)?;
        self.webhook_schedule()
            .map_err(|why| ConfigError::Invalid {
                name: "webhook_retry_schedule",
                why,
            })?;
        positive("stats_max_buckets", self.stats_max_buckets as u64)?;
        Ok(())
    }

    /// Polls, the class clock, breakouts and whiteboards.
    fn validate_classroom(&self) -> Result<(), ConfigError> {
        if self.poll_max_options < 2 {
            return Err(ConfigError::Invalid {
                name: "poll_max_options",
                why: "must be at least 2".into(),
            });
        }
        positive("poll_max_option_chars", self.poll_max_option_chars as u64)?;
        positive("poll_max_text_chars", self.poll_max_text_chars as u64)?;
        positive("poll_max_duration_s", u64::from(self.poll_max_duration_s))?;
        positive("poll_word_cloud_top", self.poll_word_cloud_top as u64)?;
        positive("poll_results_interval_ms", self.poll_results_interval_ms)?;
        positive("poll_answers_page", self.poll_answers_page as u64)?;
        positive("class_clock_ms", self.class_clock_ms)?;
        positive("breakout_max_groups", self.breakout_max_groups as u64)?;
        positive(
            "breakout_max_title_chars",
            self.breakout_max_title_chars as u64,
        )?;
        positive(
            "breakout_max_duration_s",
            u64::from(self.breakout_max_duration_s),
        )?;
        positive("breakout_warning_s", u64::from(self.breakout_warning_s))?;
        positive("stage_talk_cap_max_s", u64::from(self.stage_talk_cap_max_s))?;
        positive("stage_clock_ms", self.stage_clock_ms)?;
        positive(
            "board_max_message_bytes",
            self.board_max_message_bytes as u64,
        )?;
        positive("board_max_per_room", self.board_max_per_room as u64)?;
        positive("board_max_doc_bytes", self.board_max_doc_bytes as u64)?;
        positive("board_save_ms", self.board_save_ms)?;
        positive("board_compact_every", self.board_compact_every as u64)?;
        positive("board_compact_batch", self.board_compact_batch as u64)?;
        Ok(())
    }

    /// `webhook_retry_schedule` as durations: the waits before the second, third, ...
    /// attempt. Empty means a single attempt.
    pub fn webhook_schedule(&self) -> Result<Vec<Duration>, String> {
        self.webhook_retry_schedule
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|step| {
                let split = step
                    .find(|c: char| !c.is_ascii_digit())
                    .ok_or_else(|| format!("{step:?} has no unit (ms, s, m or h)"))?;
                let (n, unit) = step.split_at(split);
                let n: u64 = n
                    .parse()
                    .map_err(|_| format!("{step:?} does not start with a number"))?;
                let ms = match unit {
                    "ms" => Some(n),
                    "s" => n.checked_mul(1_000),
                    "m" => n.checked_mul(60_000),
                    "h" => n.checked_mul(3_600_000),
                    _ => return Err(format!("{step:?}: the unit must be ms, s, m or h")),
                };
                ms.filter(|ms| *ms <= 7 * 86_400_000)
                    .map(Duration::from_millis)
                    .ok_or_else(|| format!("{step:?} is longer than 7 days"))
            })
            .collect()
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

/// Refuses a zero for the setting `name`.
fn positive(name: &'static str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            name,
            why: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// The file an `sqlite:` database URL names (`sqlite://PATH` or `sqlite:PATH`, query
/// dropped); `None` for other URLs and in-memory databases.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| path.into())
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

    /// The README's configuration table as [`SETTINGS`] has it.
    fn readme_table() -> String {
        let defaults = Config::default();
        let code = |v: &str| format!("`{v}`");
        let mut table = String::from(
            "| setting | env var | flag | default | meaning |\n|---|---|---|---|---|\n",
        );
        for s in SETTINGS {
            let env = match (s.env, s.flag) {
                (Some(env), _) => code(env),
                (None, Some(_)) => "(none)".into(),
                (None, None) => "(file only)".into(),
            };
            let flag = s.flag.map_or_else(|| "(file only)".into(), code);
            let default = (s.shown)(&defaults);
            table += &format!(
                "| `{}` | {env} | {flag} | {default} | {} |\n",
                s.name, s.doc
            );
        }
        table
    }

    #[test]
    fn the_readme_configuration_table_is_the_settings_list() {
        for s in SETTINGS {
            assert!(
                !s.doc.is_empty() && !s.doc.contains(['|', '\n']),
                "{}: the doc must be one table cell",
                s.name
            );
        }
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let start = readme
            .find("| setting | env var |")
            .expect("README.md has the configuration table");
        let table: String = readme[start..]
            .lines()
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect();
        let expected = readme_table();
        assert!(
            table == expected,
            "README.md's configuration table is not what the settings in src/config.rs say; \
             replace it with:\n\n{expected}"
        );
    }

    #[test]
    fn every_serve_flag_has_help_and_the_documented_names() {
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(!help.trim().is_empty(), "--{} has no help", arg.get_id());
        }
        let flags = cmd.get_arguments().filter(|a| a.get_id() != "config");
        assert_eq!(
            flags.count(),
            SETTINGS.iter().filter(|s| s.flag.is_some()).count()
        );
        for s in SETTINGS {
            let arg = cmd.get_arguments().find(|a| a.get_id() == s.name);
            let Some(flag) = s.flag else {
                assert!(arg.is_none(), "{} is file only", s.name);
                continue;
            };
            let arg = arg.unwrap_or_else(|| panic!("{} has no flag", s.name));
            assert_eq!(
                arg.get_long().map(|l| format!("--{l}")).as_deref(),
                Some(flag)
            );
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), s.env);
            assert_eq!(arg.get_help().unwrap().to_string(), s.doc);
        }
        let hidden: Vec<_> = cmd
            .get_arguments()
            .filter(|a| a.is_hide_env_values_set())
            .map(|a| a.get_id().as_str())
            .collect();
        assert_eq!(hidden, ["jwt_secret", "api_key", "turn_secret"]);
        assert_eq!(
            setting("presence_limit").env,
            Some("STUDYHALL_PRESENCE_LIMIT")
        );
        assert_eq!(setting("dev").env, None);
        let help = cmd.clone().render_long_help().to_string();
        for s in SETTINGS.iter().filter_map(|s| s.flag) {
            assert!(help.contains(s), "{s} is missing from --help");
        }
    }

    #[test]
    fn comma_separated_lists_split_and_drop_blank_entries() {
        use clap::FromArgMatches;
        let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(true));
        let m = cmd
            .try_get_matches_from([
                "--allowed-origins",
                "https://a.example,,https://b.example",
                "--stun-urls",
                "stun:a.example:3478, ,stun:b.example:3478",
                "--turn-urls=turn:t.example:3478",
                "--turn-secret=s",
            ])
            .unwrap();
        let parsed = ServeArgs::from_arg_matches(&m).unwrap();
        // Only these flags: the test's own environment may hold other STUDYHALL_* variables.
        let args = ServeArgs {
            allowed_origins: parsed.allowed_origins,
            stun_urls: parsed.stun_urls,
            turn_urls: parsed.turn_urls,
            turn_secret: parsed.turn_secret,
            ..Default::default()
        };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(
            cfg.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(
            cfg.stun_urls,
            ["stun:a.example:3478", "stun:b.example:3478"]
        );
        assert_eq!(cfg.turn_urls, ["turn:t.example:3478"]);
        assert_eq!(cfg.turn_secret.as_deref(), Some("s"));
    }

    #[test]
    fn dev_is_a_flag_and_engagement_a_file_table_only() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "dev = true").unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&args),
            Err(ConfigError::Parse { .. })
        ));
        let args = ServeArgs {
            dev: true,
            ..Default::default()
        };
        assert!(Config::load(&args).unwrap().dev);
        assert!(!Config::load(&ServeArgs::default()).unwrap().dev);
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        assert!(cmd.get_arguments().all(|a| a.get_id() != "engagement"));
    }

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
            listen_backlog: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&args),
            Err(ConfigError::Invalid {
                name: "listen_backlog",
                ..
            })
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
            presence_round_max: Some(513),
            ..Default::default()
        };
        assert!(
            matches!(
                Config::load(&args),
                Err(ConfigError::Invalid {
                    name: "presence_round_max",
                    ..
                })
            ),
            "a presence round must fit half the outbox"
        );
        for (args, name) in [
            (
                ServeArgs {
                    replay_cache_bytes: Some(MAX_REPLAY_CACHE_BYTES + 1),
                    ..Default::default()
                },
                "replay_cache_bytes",
            ),
            (
                ServeArgs {
                    store_detached_linger_ms: Some(MAX_DETACHED_LINGER_MS + 1),
                    ..Default::default()
                },
                "store_detached_linger_ms",
            ),
        ] {
            assert!(
                matches!(Config::load(&args), Err(ConfigError::Invalid { name: n, .. }) if n == name),
                "{name} is bounded"
            );
        }
        let args = ServeArgs {
            replay_cache_bytes: Some(0),
            store_detached_linger_ms: Some(0),
            ..Default::default()
        };
        assert!(Config::load(&args).is_ok(), "0 turns either off");
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
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_path("sqlite://studyhall.db"),
            Some("studyhall.db".into())
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/a.db?mode=rwc"),
            Some("/tmp/a.db".into())
        );
        assert_eq!(sqlite_path("sqlite:b.db"), Some("b.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
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
