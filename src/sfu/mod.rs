//! The SFU: the server as the WebRTC peer of every session in a room's SFU-mode A/V. It owns
//! one UDP socket (`sfu_udp_addr`) shared by every session, a str0m `Rtc` per session, and the
//! driver task that runs them all (socket input, timeouts, output, forwarding). Commands come
//! from `rtc.rs` over a bounded channel; what the SFU has to tell sessions (SDP, speakers,
//! peers) leaves as [`Notice`]s through the callback it was started with. It must not know the
//! hub, the store, the wire encoding, room rights or roles: callers decide who may join and
//! publish, and say so.

mod client;
mod driver;
mod layers;

use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Why the SFU refused a command.
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Full(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The kind of a published track, as `av_mute` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackKind {
    Audio,
    Video,
}

/// Something the SFU says to sessions.
#[derive(Debug)]
pub enum Notice {
    /// `signal {room, from: the SFU, data}` to one session (an answer, or an offer to
    /// renegotiate).
    Signal {
        session: String,
        room: String,
        data: Value,
    },
    /// `active_speakers {room, users}` to each of `sessions`.
    Speakers {
        sessions: Vec<String>,
        room: String,
        users: Vec<String>,
    },
    /// `av_closed {room, reason}` to `session`: the SFU dropped its peer connection, because
    /// it died (ICE lost past the grace, a fatal error, never connected: `connection_lost`)
    /// or the room's class ended (`class_ended`).
    Closed {
        session: String,
        room: String,
        reason: &'static str,
    },
    /// The room's SFU holds no session any more (its last one left or was dropped).
    Emptied { room: String },
    /// `av_peer` to `to`: `session` of `user` joined or left the room's SFU.
    Peer {
        to: String,
        room: String,
        session: String,
        user: String,
        joined: bool,
    },
}

/// What the SFU has done since it started, for `/metrics`.
#[derive(Debug, Default)]
pub struct SfuStats {
    /// Peer connections whose ICE connectivity was lost (each time).
    pub ice_lost: AtomicU64,
    /// ... and came back within the grace (the client's network returned, or an ICE restart).
    pub ice_recovered: AtomicU64,
    /// Viewers moved from one simulcast layer to another (or started on one).
    pub layer_switches: AtomicU64,
    /// Keyframe requests (PLI) sent to publishers.
    pub keyframe_requests: AtomicU64,
    /// Media frames written to viewers.
    pub frames_forwarded: AtomicU64,
}

impl SfuStats {
    /// The counters as (Prometheus name, help, value).
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 5] {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "studyhall_sfu_ice_lost_total",
                "SFU peer connections whose ICE connectivity was lost.",
                v(&self.ice_lost),
            ),
            (
                "studyhall_sfu_ice_recovered_total",
                "SFU peer connections whose lost ICE connectivity came back within the grace.",
                v(&self.ice_recovered),
            ),
            (
                "studyhall_sfu_layer_switches_total",
                "SFU viewers moved onto a simulcast layer.",
                v(&self.layer_switches),
            ),
            (
                "studyhall_sfu_keyframe_requests_total",
                "Keyframe requests (PLI) the SFU sent to publishers.",
                v(&self.keyframe_requests),
            ),
            (
                "studyhall_sfu_frames_forwarded_total",
                "Media frames the SFU wrote to viewers.",
                v(&self.frames_forwarded),
            ),
        ]
    }
}

/// Where notices go.
pub type Notify = Arc<dyn Fn(Notice) + Send + Sync>;

/// The limits and the socket address (from the config).
#[derive(Clone, Debug)]
pub struct SfuConfig {
    pub udp_addr: SocketAddr,
    pub room_max: usize,
    pub sessions_max: usize,
    pub speakers_ms: u64,
    pub keyframe_ms: u64,
    /// How long a peer connection whose ICE was lost is kept before it is closed.
    pub ice_grace_ms: u64,
    /// How long a joined session's media path may take to come up before it is closed.
    pub connect_wait_ms: u64,
    /// How long unanswered connectivity checks take to count as ICE lost (about).
    pub ice_lost_ms: u64,
    /// Each viewer's egress bandwidth estimate before TWCC has measured it, kbit/s.
    pub bwe_start_kbps: u64,
    /// The most media one viewer is sent, kbit/s (0: no cap beyond its estimate).
    pub viewer_max_kbps: u64,
}

/// A session in a room's SFU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    pub session: String,
}

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

/// A command for the driver task.
enum Cmd {
    Join {
        room: String,
        who: Member,
        can_publish: bool,
        reply: Reply<Vec<Member>>,
    },
    Signal {
        room: String,
        session: String,
        data: Value,
        reply: Reply<()>,
    },
    Leave {
        room: String,
        session: String,
        /// Answered once the peer connection is gone (`av_leave` waits for it).
        done: Option<Reply<()>>,
    },
    SessionClosed {
        session: String,
    },
    /// Every session `which` picks ended (their node is gone).
    SessionsClosed {
        which: Box<dyn Fn(&str) -> bool + Send>,
    },
    /// The room's class ended: every session in the room's SFU is dropped and told so.
    ClassEnded {
        room: String,
    },
    Mute {
        room: String,
        user: String,
        kind: TrackKind,
        /// `false`: unmute.
        muted: bool,
        reply: Reply<bool>,
    },
    SetPublisher {
        room: String,
        user: String,
        on: bool,
    },
    RoomSize {
        room: String,
        reply: Reply<usize>,
    },
    Rooms {
        reply: Reply<Vec<(String, Vec<String>)>>,
    },
}

/// Most commands waiting for the driver.
const QUEUE: usize = 1024;

/// The SFU of this node: a handle on its driver task, which ends when this is dropped.
pub struct Sfu {
    tx: mpsc::Sender<Cmd>,
    addr: SocketAddr,
    sessions: Arc<AtomicUsize>,
    stats: Arc<SfuStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sfu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gone() -> SfuError {
    SfuError::Unavailable("the SFU is not running".into())
}

impl Sfu {
    /// Binds the UDP socket and starts the driver task.
    pub async fn start(cfg: SfuConfig, notify: Notify) -> std::io::Result<Self> {
        let socket = tokio::net::UdpSocket::bind(cfg.udp_addr).await?;
        let addr = socket.local_addr()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let sessions = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(SfuStats::default());
        let d = driver::Driver::new(socket, addr, cfg, notify, (sessions.clone(), stats.clone()));
        let task = tokio::spawn(d.run(rx));
        Ok(Self {
            tx,
            addr,
            sessions,
            stats,
            task,
        })
    }

    /// The UDP address every SFU session's media uses.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// SFU sessions (peer connections) held now, every room together.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// What the SFU has done since it started.
    pub fn stats(&self) -> &SfuStats {
        &self.stats
    }

    /// Stops the driver: every peer connection is dropped.
    pub fn stop(&self) {
        self.task.abort();
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, SfuError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// A fire-and-forget command; waits for room in the queue in the background if full.
    fn tell(&self, cmd: Cmd) {
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// Admits `who` to the room's SFU (joining again is harmless); returns the others there.
    pub async fn join(
        &self,
        room: &str,
        who: Member,
        can_publish: bool,
    ) -> Result<Vec<Member>, SfuError> {
        let room = room.to_owned();
        self.ask(|reply| Cmd::Join {
            room,
            who,
            can_publish,
            reply,
        })
        .await
    }

    /// A `signal {room, to:"sfu", data}` from `session` (data already validated).
    pub async fn signal(&self, room: &str, session: &str, data: Value) -> Result<(), SfuError> {
        let (room, session) = (room.to_owned(), session.to_owned());
        self.ask(|reply| Cmd::Signal {
            room,
            session,
            data,
            reply,
        })
        .await
    }

    /// `session` leaves the room's SFU (if it was in it): its peer connection is closed.
    pub fn leave(&self, room: &str, session: &str) {
        self.tell(Cmd::Leave {
            room: room.to_owned(),
            session: session.to_owned(),
            done: None,
        });
    }

    /// [`Sfu::leave`], returning once the peer connection is closed.
    pub async fn leave_now(&self, room: &str, session: &str) -> Result<(), SfuError> {
        let (room, session) = (room.to_owned(), session.to_owned());
        self.ask(|reply| Cmd::Leave {
            room,
            session,
            done: Some(reply),
        })
        .await
    }

    /// `session` ended: it leaves every room's SFU.
    pub fn session_closed(&self, session: &str) {
        self.tell(Cmd::SessionClosed {
            session: session.to_owned(),
        });
    }

    /// Every session that `which` picks ended: each leaves every room's SFU.
    pub fn sessions_closed_where(&self, which: impl Fn(&str) -> bool + Send + 'static) {
        self.tell(Cmd::SessionsClosed {
            which: Box::new(which),
        });
    }

    /// Stops forwarding `user`'s tracks of `kind` in the room; whether the user is there.
    pub async fn mute(&self, room: &str, user: &str, kind: TrackKind) -> Result<bool, SfuError> {
        self.set_muted(room, user, kind, true).await
    }

    /// Forwards `user`'s tracks of `kind` in the room again (video from its next keyframe,
    /// which is asked for); whether the user is there.
    pub async fn unmute(&self, room: &str, user: &str, kind: TrackKind) -> Result<bool, SfuError> {
        self.set_muted(room, user, kind, false).await
    }

    async fn set_muted(
        &self,
        room: &str,
        user: &str,
        kind: TrackKind,
        muted: bool,
    ) -> Result<bool, SfuError> {
        let (room, user) = (room.to_owned(), user.to_owned());
        self.ask(|reply| Cmd::Mute {
            room,
            user,
            kind,
            muted,
            reply,
        })
        .await
    }

    /// Grants or withdraws publishing for `user` in the room (stage changes).
    pub fn set_publisher(&self, room: &str, user: &str, on: bool) {
        self.tell(Cmd::SetPublisher {
            room: room.to_owned(),
            user: user.to_owned(),
            on,
        });
    }

    /// Every room the SFU holds now, with its sessions.
    pub async fn rooms(&self) -> Vec<(String, Vec<String>)> {
        self.ask(|reply| Cmd::Rooms { reply })
            .await
            .unwrap_or_default()
    }

    /// The room's class ended: closes every peer connection in the room's SFU (sessions of
    /// any node) and tells each session `av_closed {reason:"class_ended"}`.
    pub fn class_ended(&self, room: &str) {
        self.tell(Cmd::ClassEnded {
            room: room.to_owned(),
        });
    }

    /// Sessions in the room's SFU now.
    pub async fn room_size(&self, room: &str) -> usize {
        let room = room.to_owned();
        self.ask(|reply| Cmd::RoomSize { room, reply })
            .await
            .unwrap_or(0)
    }
}
