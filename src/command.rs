//! What a command handler works with and hands back: the session's context (`Ctx`: the app,
//! who is signed in, the rooms joined, the session's own outbox), the `Outcome` of a command
//! (an `ok` now, a reply after a commit, or nothing more), and the checks every handler
//! shares. Used by `session` (which runs the handlers), `rooms/` and `rtc` (which are the
//! handlers); it knows nothing of sockets.

use crate::App;
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::hub::SessionHandle;
use crate::outbox::{Outbox, Outgoing, Refused};
use crate::protocol::{self, ClientMsg, RoomId, RoomRole, ServerMsg, valid_room_id};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// A command's answer once its write has committed: the encoded reply frame, if any.
pub(crate) type Deferred = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// A command's `ok`, not yet encoded: given the command's `rid`, it encodes the whole frame.
/// It runs only for a command that has a `rid` (one without gets no `ok`).
pub(crate) type Reply = Box<dyn FnOnce(i64) -> String + Send>;

/// What a command handler produced.
pub(crate) enum Outcome {
    /// Reply `ok` now.
    Ok(Reply),
    /// The reply comes later, after a commit.
    Deferred(Deferred),
    /// The handler queued its own frames (join, ping).
    Done,
}

impl Outcome {
    /// Reply `ok` with the fields of `result` (one of the `protocol` reply types).
    pub fn ok<T: Serialize + Send + 'static>(result: T) -> Self {
        Self::Ok(Box::new(move |rid| protocol::encode_ok_as(rid, &result)))
    }
}

/// Per-connection state shared by the command handlers.
pub(crate) struct Ctx {
    pub app: Arc<App>,
    pub me: Identity,
    pub handle: Arc<SessionHandle>,
    pub outbox: Outbox,
    /// Rooms this session has joined, with the user's role in each.
    pub joined: JoinedRooms,
    /// When this session last broadcast `typing`, per room (throttled).
    pub last_typing: HashMap<RoomId, Instant>,
}

/// The rooms a session joined, with its role in each: a few per session (at most
/// `max_rooms_per_session`), in a vector sized to them. Every session keeps one for its life,
/// where a hash map would take about 150 bytes for a single room; a lookup compares a few ids.
#[derive(Debug, Default)]
pub(crate) struct JoinedRooms(Vec<(RoomId, RoomRole)>);

impl JoinedRooms {
    pub fn get(&self, room: &RoomId) -> Option<&RoomRole> {
        self.0.iter().find(|(r, _)| r == room).map(|(_, role)| role)
    }

    pub fn contains_key(&self, room: &RoomId) -> bool {
        self.get(room).is_some()
    }

    /// Adds the room, or sets the role of a room already joined; the role it had, if any.
    pub fn insert(&mut self, room: RoomId, role: RoomRole) -> Option<RoomRole> {
        if let Some((_, had)) = self.0.iter_mut().find(|(r, _)| *r == room) {
            return Some(std::mem::replace(had, role));
        }
        self.0.reserve_exact(1);
        self.0.push((room, role));
        None
    }

    /// Leaves the room; the role it had, if it was joined. The vector shrinks with the rooms.
    pub fn remove(&mut self, room: &RoomId) -> Option<RoomRole> {
        let i = self.0.iter().position(|(r, _)| r == room)?;
        let (_, role) = self.0.swap_remove(i);
        if self.0.capacity() > 2 * self.0.len() + 1 {
            self.0.shrink_to_fit();
        }
        Some(role)
    }

    pub fn keys(&self) -> impl Iterator<Item = &RoomId> {
        self.0.iter().map(|(r, _)| r)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl IntoIterator for JoinedRooms {
    type Item = (RoomId, RoomRole);
    type IntoIter = std::vec::IntoIter<(RoomId, RoomRole)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Ctx {
    /// Queues a frame on this session's own outbox, waiting for room if needed (the write loop
    /// drains it as fast as the client reads). False once the session is closing.
    pub async fn push(&mut self, frame: impl Into<Outgoing>) -> bool {
        match self.outbox.try_send(frame) {
            Ok(()) => true,
            Err(Refused::Closed) => false,
            // Boxed: the waiting is rare, and its state would otherwise sit in every session's
            // read loop.
            Err(Refused::Full(frame)) => Box::pin(self.push_when_room(frame)).await,
        }
    }

    async fn push_when_room(&mut self, frame: Outgoing) -> bool {
        tokio::select! {
            r = self.outbox.send(frame) => r.is_ok(),
            () = self.handle.closed() => false,
        }
    }

    /// The role this session joined `room` with, or `not_member`.
    pub fn joined_role(&self, room: &RoomId) -> Result<RoomRole, Error> {
        self.joined
            .get(room)
            .copied()
            .ok_or_else(|| Error::NotMember(format!("join room {room} first")))
    }
}

/// An `error` frame for `err`, carrying `rid` when the command had one.
pub(crate) fn error_frame(rid: Option<i64>, err: &Error) -> String {
    let message = err.public_message();
    protocol::encode(&ServerMsg::Error {
        rid,
        code: err.code(),
        message: &message,
    })
}

/// Builds the deferred reply of a write: `ok` with the fields of `reply(outcome)` or an
/// `error`, both carrying `rid`; without `rid` only errors are sent.
pub(crate) fn deferred<T, R, F>(
    rid: Option<i64>,
    rx: tokio::sync::oneshot::Receiver<crate::store::Result<T>>,
    reply: F,
) -> Deferred
where
    T: Send + 'static,
    R: Serialize,
    F: FnOnce(T) -> R + Send + 'static,
{
    Box::pin(async move {
        let result = match rx.await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Unavailable("server is shutting down".into())),
        };
        match result {
            Ok(v) => rid.map(|rid| protocol::encode_ok_as(rid, &reply(v))),
            Err(e) => Some(error_frame(rid, &e)),
        }
    })
}

/// The error for a command handed to a feature that does not handle it: a bug in
/// `rooms::dispatch`'s routing, answered as an internal error rather than a panic.
pub(crate) fn misrouted(msg: &ClientMsg) -> Error {
    Error::Internal(format!("{:?} routed to the wrong feature", msg.kind()))
}

/// Refuses a room id that is not 1..=64 characters of `A-Z a-z 0-9 _ . -`.
pub(crate) fn check_room_id(room: &RoomId) -> Result<()> {
    if valid_room_id(room.as_str()) {
        Ok(())
    } else {
        Err(Error::bad_request(
            "room ids are 1..=64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_rooms_behave_as_a_map_and_shrink_with_their_rooms() {
        let mut joined = JoinedRooms::default();
        let (a, b, c) = (RoomId::from("a"), RoomId::from("b"), RoomId::from("c"));
        assert_eq!(joined.insert(a.clone(), RoomRole::Member), None);
        assert_eq!(joined.insert(b.clone(), RoomRole::Viewer), None);
        assert_eq!(joined.insert(c.clone(), RoomRole::Host), None);
        assert_eq!(joined.0.capacity(), 3, "sized to the rooms joined");
        assert_eq!(
            joined.insert(a.clone(), RoomRole::Ta),
            Some(RoomRole::Member),
            "a role changes in place"
        );
        assert_eq!((joined.len(), joined.get(&a)), (3, Some(&RoomRole::Ta)));
        assert_eq!(joined.remove(&b), Some(RoomRole::Viewer));
        assert_eq!(joined.remove(&b), None);
        assert!(!joined.contains_key(&b) && joined.contains_key(&c));
        assert_eq!(joined.remove(&c), Some(RoomRole::Host));
        assert!(joined.0.capacity() <= 3);
        let mut keys: Vec<_> = joined.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec![a.clone()]);
        let all: Vec<_> = joined.into_iter().collect();
        assert_eq!(all, vec![(a, RoomRole::Ta)]);
    }
}
