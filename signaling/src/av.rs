//! A/V rooms for `class` and `live` rooms: who is connected, the mesh size limit, and who may
//! publish. Every peer connects to every other (mesh); the server only relays signals between
//! two sessions that are both in the room. In `live` rooms only publishers (the host and people
//! on stage) may send audio/video: an SDP from anyone else that would send media is refused.

use crate::sdp::{self, Payload};
use crate::{Msg, Out, Peer, SignalError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AvKind {
    /// Everyone may publish.
    Class,
    /// Only publishers may send audio/video; the rest receive.
    Live,
}

#[derive(Debug)]
struct AvRoom {
    kind: AvKind,
    /// session -> (peer, may publish)
    peers: BTreeMap<String, (Peer, bool)>,
}

/// Every A/V room of a node.
#[derive(Debug)]
pub struct AvRooms {
    mesh_max: usize,
    rooms: HashMap<String, AvRoom>,
}

impl AvRooms {
    /// `mesh_max`: most participants in one room's mesh.
    pub fn new(mesh_max: usize) -> Self {
        Self {
            mesh_max,
            rooms: HashMap::new(),
        }
    }

    /// Joins `peer` to the room's A/V; returns the peers already there and the `av_peer`
    /// notices for them. Joining again is harmless.
    pub fn join(
        &mut self,
        room: &str,
        kind: AvKind,
        peer: Peer,
        can_publish: bool,
    ) -> Result<(Vec<Peer>, Vec<Out>), SignalError> {
        let state = self.rooms.entry(room.to_owned()).or_insert_with(|| AvRoom {
            kind,
            peers: BTreeMap::new(),
        });
        let others: Vec<Peer> = state
            .peers
            .values()
            .filter(|(p, _)| p.session != peer.session)
            .map(|(p, _)| p.clone())
            .collect();
        if state.peers.contains_key(&peer.session) {
            return Ok((others, Vec::new()));
        }
        if state.peers.len() >= self.mesh_max {
            return Err(SignalError::Conflict(format!(
                "A/V is full: a mesh holds {} participants",
                self.mesh_max
            )));
        }
        let outs = others
            .iter()
            .map(|o| Out {
                to: o.session.clone(),
                msg: Msg::AvPeer {
                    room: room.to_owned(),
                    peer: peer.clone(),
                    joined: true,
                },
            })
            .collect();
        state
            .peers
            .insert(peer.session.clone(), (peer, can_publish));
        Ok((others, outs))
    }

    /// Removes a session from a room's A/V and tells the others.
    pub fn leave(&mut self, room: &str, session: &str) -> Vec<Out> {
        let Some(state) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        let Some((peer, _)) = state.peers.remove(session) else {
            return Vec::new();
        };
        let outs = state
            .peers
            .values()
            .map(|(o, _)| Out {
                to: o.session.clone(),
                msg: Msg::AvPeer {
                    room: room.to_owned(),
                    peer: peer.clone(),
                    joined: false,
                },
            })
            .collect();
        if state.peers.is_empty() {
            self.rooms.remove(room);
        }
        outs
    }

    /// A session is gone: leave every room it was in.
    pub fn session_closed(&mut self, session: &str) -> Vec<Out> {
        let rooms: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.peers.contains_key(session))
            .map(|(id, _)| id.clone())
            .collect();
        rooms.iter().flat_map(|r| self.leave(r, session)).collect()
    }

    /// Grants or withdraws publishing for every session of `user` in the room (stage changes).
    pub fn set_publisher(&mut self, room: &str, user: &str, can_publish: bool) {
        if let Some(state) = self.rooms.get_mut(room) {
            for (peer, can) in state.peers.values_mut() {
                if peer.user == user {
                    *can = can_publish;
                }
            }
        }
    }

    pub fn peers(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, |r| r.peers.len())
    }

    /// Relays a validated signal from `from` to session `to`, both in the room.
    pub fn relay(
        &self,
        room: &str,
        from: &Peer,
        to: &str,
        data: &Value,
    ) -> Result<Out, SignalError> {
        let state = self
            .rooms
            .get(room)
            .ok_or_else(|| SignalError::Forbidden("join the room's A/V first".into()))?;
        let (_, can_publish) = state
            .peers
            .get(&from.session)
            .ok_or_else(|| SignalError::Forbidden("join the room's A/V first".into()))?;
        if to == from.session || !state.peers.contains_key(to) {
            return Err(SignalError::Forbidden(
                "that session is not a peer in this room".into(),
            ));
        }
        let payload = sdp::parse_payload(data)?;
        if let (AvKind::Live, false, Payload::Offer(info) | Payload::Answer(info)) =
            (state.kind, *can_publish, &payload)
            && info.sends_media
        {
            return Err(SignalError::Forbidden(
                "only the host and people on stage may publish in a live room: send recvonly"
                    .into(),
            ));
        }
        Ok(Out {
            to: to.to_owned(),
            msg: Msg::Signal {
                call_id: None,
                room: Some(room.to_owned()),
                from: from.clone(),
                data: data.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::tests::sdp;
    use serde_json::json;

    fn p(u: &str, s: &str) -> Peer {
        Peer::new(u, s)
    }

    #[test]
    fn mesh_membership_notices_and_limit() {
        let mut av = AvRooms::new(3);
        let (peers, outs) = av.join("r", AvKind::Class, p("a", "a1"), true).unwrap();
        assert!(peers.is_empty() && outs.is_empty());
        let (peers, outs) = av.join("r", AvKind::Class, p("b", "b1"), true).unwrap();
        assert_eq!(peers, vec![p("a", "a1")]);
        assert_eq!(outs[0].to, "a1");
        av.join("r", AvKind::Class, p("c", "c1"), true).unwrap();
        assert!(matches!(
            av.join("r", AvKind::Class, p("d", "d1"), true),
            Err(SignalError::Conflict(_))
        ));
        assert_eq!(
            av.join("r", AvKind::Class, p("c", "c1"), true)
                .unwrap()
                .0
                .len(),
            2,
            "re-join is harmless"
        );
        let outs = av.session_closed("b1");
        assert_eq!(outs.len(), 2);
        assert!(
            outs.iter()
                .all(|o| matches!(o.msg, Msg::AvPeer { joined: false, .. }))
        );
        av.join("r", AvKind::Class, p("d", "d1"), true).unwrap();
    }

    #[test]
    fn relay_rules_and_live_publishing() {
        let mut av = AvRooms::new(6);
        av.join("live", AvKind::Live, p("host", "h1"), true)
            .unwrap();
        av.join("live", AvKind::Live, p("kid", "k1"), false)
            .unwrap();
        let send = json!({"sdp": {"type": "offer", "sdp": sdp("sendrecv")}});
        let recv = json!({"sdp": {"type": "answer", "sdp": sdp("recvonly")}});
        assert_eq!(
            av.relay("live", &p("host", "h1"), "k1", &send).unwrap().to,
            "k1"
        );
        assert!(matches!(
            av.relay("live", &p("kid", "k1"), "h1", &send),
            Err(SignalError::Forbidden(_))
        ));
        assert_eq!(
            av.relay("live", &p("kid", "k1"), "h1", &recv).unwrap().to,
            "h1"
        );
        av.set_publisher("live", "kid", true);
        assert!(
            av.relay("live", &p("kid", "k1"), "h1", &send).is_ok(),
            "on stage now"
        );
        assert!(matches!(
            av.relay("live", &p("eve", "e1"), "h1", &recv),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            av.relay("live", &p("host", "h1"), "x9", &recv),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            av.relay("nope", &p("host", "h1"), "k1", &recv),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            av.relay("live", &p("host", "h1"), "k1", &json!({"sdp": 1})),
            Err(SignalError::BadRequest(_))
        ));
    }
}
