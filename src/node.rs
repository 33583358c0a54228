//! The broker: how this node's sessions reach what other nodes hold, and how the other nodes'
//! news gets here. A single node uses [`LocalBroker`] (everything is local, nothing crosses);
//! cluster mode uses the NATS broker in `cluster/`. Rooms, sessions and the call code talk to
//! a `dyn Broker` and never know which one it is. What other nodes send that concerns more than
//! the hub (policy invalidations, forwarded call and SFU commands, A/V changes) arrives as
//! [`Inbound`] events on a channel that the app applies. This file knows nothing of NATS.

use crate::error::Error;
use crate::hub::{Frame, Hub};
use crate::protocol::{RoomId, UserId};
use crate::store::{CommittedEvent, Store, StoreError};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::oneshot;

/// A call command forwarded to the node that owns the call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallCommand {
    pub action: CallAction,
    pub call_id: String,
    pub user: String,
    pub session: String,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
}

/// What a call command asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallAction {
    Accept,
    Reject,
    Hangup,
    Resume,
    Signal,
}

/// A command for a room's SFU that runs on another node, on behalf of a session of the
/// sending node (which checked the session's rights in the room: the owner runs it as asked).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SfuCommand {
    pub room: String,
    /// The session's user and id (the muting host's, for `Mute`).
    pub user: String,
    pub session: String,
    pub action: SfuAction,
}

/// What an [`SfuCommand`] asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SfuAction {
    /// `av_join`: admit the session (as a publisher or not).
    Join { can_publish: bool },
    /// `signal {room, to:"sfu", data}` (data validated by the sending node).
    Signal { data: serde_json::Value },
    /// `av_leave`, or the session left the room: close its peer connection.
    Leave,
    /// `av_mute`: stop forwarding `user`'s tracks of one kind.
    Mute { user: String, video: bool },
    /// `av_unmute`: forward them again.
    Unmute { user: String, video: bool },
    /// A stage change: `user` may publish or not.
    SetPublisher { user: String, on: bool },
}

/// The owner's answer to an [`SfuCommand`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfuReply {
    /// `Join`: the others in the room's SFU, (session, user).
    #[serde(default)]
    pub peers: Vec<(String, String)>,
    /// `Mute`, `Unmute`: whether the user is in the room's SFU.
    #[serde(default)]
    pub found: bool,
}

/// A membership change of a room's A/V on some node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvChange {
    pub session: String,
    pub user: String,
    /// The membership's generation (the room's join count when it was admitted).
    pub generation: u64,
    /// The run (epoch) of the node that holds the session.
    pub run: u64,
    pub joined: bool,
}

/// What another node said that concerns more than the hub; applied by the app in arrival
/// order.
#[derive(Debug)]
pub enum Inbound {
    /// A room's settings, memberships, bans or mutes changed: drop the cached policy.
    PolicyChanged(RoomId),
    /// Invalidations may have been lost (a reconnect, a slow consumer): drop every policy.
    PoliciesStale,
    /// A room event committed on another node (slow-mode clocks follow its sender).
    RemoteEvent { room: RoomId, json: String },
    /// Answered once everything sent before it has been applied.
    Barrier(oneshot::Sender<()>),
    /// A session on another node ended: calls here give it the grace period.
    SessionClosed { user: UserId, session: String },
    /// A command for a call this node owns; the answer goes back to the asking node.
    Call {
        command: CallCommand,
        answer: oneshot::Sender<Result<(), Error>>,
    },
    /// A command for a room's SFU that runs on this node; the answer goes back to the asking
    /// node.
    Sfu {
        command: SfuCommand,
        answer: oneshot::Sender<Result<SfuReply, Error>>,
    },
    /// A session on another node joined or left a room's A/V.
    Av { room: RoomId, change: AvChange },
    /// A user on another node went on or off a room's stage.
    Stage {
        room: RoomId,
        user: UserId,
        on: bool,
    },
    /// A node's run went silent or left: its A/V members are gone.
    NodeGone { node: String, run: u64 },
    /// Another node merged a whiteboard update, or asks for what its copy lacks.
    Board {
        room: RoomId,
        board: String,
        relay: BoardRelay,
    },
}

/// What nodes tell each other about a whiteboard (a Yjs document each node holding it keeps a
/// copy of).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoardRelay {
    /// An update merged on the sending node (v1 encoding): merge it, pass it to local sessions.
    Update(Vec<u8>),
    /// The sending node just loaded the board with this state vector (v1): answer with an
    /// `Update` holding what it lacks.
    Sync(Vec<u8>),
}

/// How this node reaches the others. Every method has the single-node meaning in
/// [`LocalBroker`].
pub trait Broker: Send + Sync {
    /// This node's id when other nodes exist (session and call ids then end in `.NODE`).
    fn node_id(&self) -> Option<&str>;

    /// This node's run (random at each start; 0 on a single node).
    fn run(&self) -> u64;

    /// The commit hook: each committed room event, in commit order. Reaches this node's
    /// sessions (through the hub, in seq order) and the other nodes'.
    fn committed(&self, ev: CommittedEvent);

    /// A local session is about to join `room`: from now on the room's events reach this
    /// node's hub in seq order. Balanced by [`Broker::leave_room`], also when this fails.
    fn enter_room<'a>(
        &'a self,
        room: &'a RoomId,
        store: &'a Store,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// A local session left `room` (or failed to join it).
    fn leave_room(&self, room: &RoomId);

    /// Queues a frame to a session wherever it is connected. False if it is a local session
    /// that is gone (a session on another node is assumed there).
    fn send_to_session(&self, session: &str, frame: &Frame) -> bool;

    /// A local session ended.
    fn session_closed(&self, user: &UserId, session: &str);

    /// The node that owns a call, when it is not this one.
    fn call_owner(&self, call_id: &str) -> Option<String>;

    /// Forwards a call command to the node that owns the call and waits for its answer.
    fn forward_call(&self, node: String, cmd: CallCommand)
    -> BoxFuture<'static, Result<(), Error>>;

    /// Sends a command to the room's SFU on `node` and waits (bounded by
    /// `bus_request_timeout_ms`) for its answer; `unavailable` if the node does not answer.
    fn forward_sfu(
        &self,
        node: String,
        cmd: SfuCommand,
    ) -> BoxFuture<'static, Result<SfuReply, Error>>;

    /// A local session joined or left a room's A/V (the other nodes with members tell theirs).
    fn av_changed(&self, room: &RoomId, change: AvChange);

    /// The live nodes, once this node has heard from all of them (cluster A/V admission).
    fn live_nodes(&self) -> Option<Vec<String>>;

    /// Asks the other nodes, now, which sessions `user` has there: (session id, call
    /// waiting). For a user the heartbeat directory does not list yet (they connected
    /// elsewhere a moment ago). Bounded by a short timeout; empty on a single node.
    fn ask_sessions(&self, user: &UserId) -> BoxFuture<'static, Vec<(String, bool)>>;

    /// Tells the other nodes with sessions in `room` about a whiteboard (nothing on a single
    /// node).
    fn board(&self, room: &RoomId, board: &str, relay: BoardRelay);
}

pub use crate::protocol::node_of;

/// A single node: everything is here.
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Broker for LocalBroker {
    fn node_id(&self) -> Option<&str> {
        None
    }

    fn run(&self) -> u64 {
        0
    }

    fn committed(&self, ev: CommittedEvent) {
        self.hub.publish(ev);
    }

    fn enter_room<'a>(
        &'a self,
        _room: &'a RoomId,
        _store: &'a Store,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn leave_room(&self, _room: &RoomId) {}

    fn send_to_session(&self, session: &str, frame: &Frame) -> bool {
        self.hub.send_to_session(session, frame)
    }

    fn session_closed(&self, _user: &UserId, _session: &str) {}

    fn call_owner(&self, _call_id: &str) -> Option<String> {
        None
    }

    fn forward_call(
        &self,
        _node: String,
        _cmd: CallCommand,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async { Err(Error::NotFound("no such call".into())) })
    }

    fn forward_sfu(
        &self,
        _node: String,
        _cmd: SfuCommand,
    ) -> BoxFuture<'static, Result<SfuReply, Error>> {
        Box::pin(async { Err(Error::Unavailable("no other node runs an SFU".into())) })
    }

    fn av_changed(&self, _room: &RoomId, _change: AvChange) {}

    fn live_nodes(&self) -> Option<Vec<String>> {
        None
    }

    fn ask_sessions(&self, _user: &UserId) -> BoxFuture<'static, Vec<(String, bool)>> {
        Box::pin(async { Vec::new() })
    }

    fn board(&self, _room: &RoomId, _board: &str, _relay: BoardRelay) {}
}
