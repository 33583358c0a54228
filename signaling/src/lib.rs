//! studyhall-signaling: the negotiation side of 1v1 tutoring calls and small-class audio/video,
//! as sans-I/O state machines. Callers feed commands and timer ticks with the current time in
//! milliseconds and get back what to send to whom ([`Out`]); nothing here owns a socket, a
//! clock, a database or a task, so every rule is unit-tested on simulated time.
//!
//! - [`calls`]: the 1v1 call lifecycle (ringing, accept on one of several devices, reject,
//!   cancel, missed, busy, glare, a grace period for dropped connections) and signal relay.
//! - [`av`]: A/V rooms (`class`, `live`): the peer list, mesh size limit, who may publish.
//! - [`sdp`]: validation of SDP offers/answers and ICE candidates relayed between peers.
//! - [`turn`]: ICE server lists with time-limited TURN credentials (the TURN REST scheme).
//!
//! This crate knows nothing of axum, sqlx or sockets; the server maps [`Out`] to frames.

pub mod av;
pub mod calls;
pub mod sdp;
pub mod turn;

#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
#[cfg(test)]
mod props;

use serde::{Deserialize, Serialize};

/// One connected endpoint: a user and one of their sessions (devices).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Peer {
    pub user: String,
    pub session: String,
}

impl Peer {
    pub fn new(user: impl Into<String>, session: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            session: session.into(),
        }
    }
}

/// What the caller asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    #[serde(default)]
    pub audio: bool,
    #[serde(default)]
    pub video: bool,
}

/// Something to deliver: `msg` to one session.
#[derive(Clone, Debug, PartialEq)]
pub struct Out {
    pub to: String,
    pub msg: Msg,
}

/// Messages this crate asks the server to deliver (the server owns their wire encoding).
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// To each callee session: a call is ringing.
    CallIncoming {
        call_id: String,
        from: Peer,
        media: Media,
    },
    /// To the parties: the call changed state.
    CallState {
        call_id: String,
        state: calls::CallState,
    },
    /// To both parties once a call is over, with why and how long it was connected.
    CallEnded {
        call_id: String,
        reason: calls::EndReason,
        duration_ms: u64,
    },
    /// A relayed `signal` payload (already validated).
    Signal {
        call_id: Option<String>,
        room: Option<String>,
        from: Peer,
        data: serde_json::Value,
    },
    /// To the peers of an A/V room: someone joined or left.
    AvPeer {
        room: String,
        peer: Peer,
        joined: bool,
    },
}

/// Refusals, mapped by the server to protocol error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// Malformed input (`bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// Not allowed for this peer (`forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// No such call or room, or not visible to this peer (`not_found`).
    #[error("{0}")]
    NotFound(String),
    /// A state conflict: already in a call, answered elsewhere, room full (`conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The callee cannot be reached (`unavailable`).
    #[error("{0}")]
    Unavailable(String),
}
