//! A/V rooms for `class` and `live` rooms: who is connected, the mesh size limit, and who may
//! publish. Every peer connects to every other (mesh); the server only relays signals between
//! two sessions that are both in the room. In `live` rooms only publishers (the host and people
//! on stage) may send audio/video: an SDP from anyone else that would send media is refused.

use crate::sdp::{self, Payload};
use crate::{Msg, Out, Peer, SignalError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AvKind {
    /// Everyone may publish.
    Class,
    /// Only publishers may send audio/video; the rest receive.
    Live,
}

/// Most departures a room remembers (see `AvRoom::left`); past that the memory starts over.
const LEFT_MAX: usize = 1024;

/// A membership of a room's A/V held by another cluster node, as the store or the bus tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub peer: Peer,
    /// Its place in the room's join order.
    pub generation: u64,
    /// The run (epoch) of the node that holds the session.
    pub run: u64,
}

#[derive(Debug)]
struct Member {
    peer: Peer,
    /// May send audio/video (checked on this node's own sessions only).
    can_publish: bool,
    /// A session of this node; the others are on other cluster nodes, known so that signals
    /// can reach them. Notices go only to local members: each node tells its own.
    local: bool,
    /// The membership's generation: its place in the room's join order (cluster mode; 0 on
    /// one node). A leave or a re-join names it, so old news never undoes newer.
    generation: u64,
    /// The run (epoch) of the node holding a remote member (0 for local ones).
    run: u64,
}

impl Member {
    /// A session of this node, admitted as membership `generation`.
    fn local(peer: Peer, can_publish: bool, generation: u64) -> Self {
        Self {
            peer,
            can_publish,
            local: true,
            generation,
            run: 0,
        }
    }
}

#[derive(Debug)]
struct AvRoom {
    kind: AvKind,
    /// session -> member
    peers: BTreeMap<String, Member>,
    /// Local sessions whose cluster-wide admission is in flight: the room is kept, and peers
    /// joining on other nodes meanwhile are remembered (see [`AvRooms::begin_join`]).
    joining: HashSet<String>,
    /// Sessions that left, with the generation they left: a store listing or a bus notice
    /// that still names that membership (or an older one) does not bring it back.
    left: HashMap<String, u64>,
}

impl AvRoom {
    fn local_count(&self) -> usize {
        self.peers.values().filter(|m| m.local).count()
    }

    /// `av_peer` notices about `peer` for the local members `to` picks, but `peer` itself.
    fn notices(
        &self,
        room: &str,
        peer: &Peer,
        joined: bool,
        to: impl Fn(&Member) -> bool,
    ) -> Vec<Out> {
        self.peers
            .values()
            .filter(|m| m.local && m.peer.session != peer.session && to(m))
            .map(|m| Out {
                to: m.peer.session.clone(),
                msg: Msg::AvPeer {
                    room: room.to_owned(),
                    peer: peer.clone(),
                    joined,
                },
            })
            .collect()
    }

    /// Whether the membership `generation` of `session` has already left.
    fn has_left(&self, session: &str, generation: u64) -> bool {
        self.left.get(session).is_some_and(|g| *g >= generation)
    }

    fn remember_left(&mut self, session: &str, generation: u64) {
        if self.left.len() >= LEFT_MAX {
            self.left.clear();
        }
        let g = self.left.entry(session.to_owned()).or_insert(generation);
        *g = (*g).max(generation);
    }

    /// Learns of a remote membership (unless it already left, or is a local session); every
    /// local member hears of it, whichever way this node first learned it (a bus notice, a
    /// join's list, the store), and only then: a later notice of the same membership finds it
    /// known. (A local member admitted after it listed it, so already knows it.) A newer
    /// generation of a known member replaces the older one quietly.
    fn learn(&mut self, room: &str, m: &Membership) -> Vec<Out> {
        if self.has_left(&m.peer.session, m.generation) || self.joining.contains(&m.peer.session) {
            return Vec::new();
        }
        if let Some(known) = self.peers.get_mut(&m.peer.session) {
            if !known.local && m.generation >= known.generation {
                known.generation = m.generation;
                known.run = m.run;
            }
            return Vec::new();
        }
        let outs = self.notices(room, &m.peer, true, |_| true);
        self.peers.insert(
            m.peer.session.clone(),
            Member {
                peer: m.peer.clone(),
                can_publish: false,
                local: false,
                generation: m.generation,
                run: m.run,
            },
        );
        outs
    }
}

/// Every A/V room of a node. On a single node every member is local. In a cluster each node
/// also knows the members on other nodes (from the store when one of its sessions joins, and
/// from the bus as others join and leave), and a room is kept while it has local members.
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

    fn room_mut(&mut self, room: &str, kind: AvKind) -> &mut AvRoom {
        self.rooms.entry(room.to_owned()).or_insert_with(|| AvRoom {
            kind,
            peers: BTreeMap::new(),
            joining: HashSet::new(),
            left: HashMap::new(),
        })
    }

    /// Drops a room that has neither local members nor a join in flight.
    fn tidy(&mut self, room: &str) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.joining.is_empty() && r.local_count() == 0)
        {
            self.rooms.remove(room);
        }
    }

    /// Joins `peer` to the room's A/V; returns the peers already there and the `av_peer`
    /// notices for them. Joining again is harmless. The mesh limit is checked here (one node).
    pub fn join(
        &mut self,
        room: &str,
        kind: AvKind,
        peer: Peer,
        can_publish: bool,
    ) -> Result<(Vec<Peer>, Vec<Out>), SignalError> {
        let mesh_max = self.mesh_max;
        let state = self.room_mut(room, kind);
        if !state.peers.contains_key(&peer.session) && state.peers.len() >= mesh_max {
            let err =
                SignalError::Conflict(format!("A/V is full: a mesh holds {mesh_max} participants"));
            self.tidy(room);
            return Err(err);
        }
        Ok(self.insert_local(room, kind, Member::local(peer, can_publish, 0)))
    }

    /// Adds a local member; the local members that joined before it (every one on a single
    /// node, where all generations are 0) hear of it.
    fn insert_local(&mut self, room: &str, kind: AvKind, new: Member) -> (Vec<Peer>, Vec<Out>) {
        let (peer, generation) = (&new.peer, new.generation);
        let state = self.room_mut(room, kind);
        let others: Vec<Peer> = state
            .peers
            .values()
            .filter(|m| m.peer.session != peer.session)
            .map(|m| m.peer.clone())
            .collect();
        if let Some(m) = state.peers.get_mut(&peer.session)
            && m.local
        {
            m.generation = m.generation.max(generation);
            return (others, Vec::new());
        }
        let outs = state.notices(room, peer, true, |m| {
            generation == 0 || m.generation < generation
        });
        state.peers.insert(peer.session.clone(), new);
        (others, outs)
    }

    /// Cluster mode: the local session `session` is being admitted to the room's A/V by the
    /// store (which checks the mesh limit and puts joins in one order). Until
    /// [`AvRooms::finish_join`] or [`AvRooms::abort_join`], peers that join on other nodes
    /// are remembered here.
    pub fn begin_join(&mut self, room: &str, kind: AvKind, session: &str) {
        self.room_mut(room, kind).joining.insert(session.to_owned());
    }

    /// The store admitted `peer` as membership `generation`; `before` are the memberships
    /// admitted before it. They are what its `av_join` reply lists: the newcomer offers to
    /// them (one known to have left is left out). Peers admitted after it that this node
    /// already knows reach the newcomer as `av_peer` instead (they offer to it), and the local
    /// members admitted before it hear of the newcomer. A re-join replies with every member
    /// known.
    pub fn finish_join(
        &mut self,
        room: &str,
        kind: AvKind,
        peer: Peer,
        can_publish: bool,
        generation: u64,
        before: Vec<Membership>,
    ) -> (Vec<Peer>, Vec<Out>) {
        let state = self.room_mut(room, kind);
        state.joining.remove(&peer.session);
        let mut before = before;
        before.retain(|m| !state.has_left(&m.peer.session, m.generation));
        let mut learned = Vec::new();
        for m in &before {
            // A local session still being admitted is added by its own `finish_join`; a local
            // member is already here; a remote one new to this node is news to its members.
            learned.extend(state.learn(room, m));
        }
        let rejoin = state.peers.get(&peer.session).is_some_and(|m| m.local);
        // A remote member admitted before this join but missing from its list has left (the
        // store's list is complete up to this generation): its leave notice is still on the way.
        let departed: Vec<(String, u64)> = state
            .peers
            .values()
            .filter(|m| {
                !m.local
                    && m.generation < generation
                    && !before.iter().any(|b| b.peer.session == m.peer.session)
            })
            .map(|m| (m.peer.session.clone(), m.generation))
            .collect();
        let mut outs = learned;
        for (session, g) in departed {
            outs.extend(self.remote_left(room, &session, g));
        }
        let state = self.room_mut(room, kind);
        let later: Vec<Out> = if rejoin {
            Vec::new()
        } else {
            state
                .peers
                .values()
                .filter(|m| {
                    m.peer.session != peer.session
                        && !before.iter().any(|b| b.peer.session == m.peer.session)
                })
                .map(|m| Out {
                    to: peer.session.clone(),
                    msg: Msg::AvPeer {
                        room: room.to_owned(),
                        peer: m.peer.clone(),
                        joined: true,
                    },
                })
                .collect()
        };
        let joiner = Member::local(peer, can_publish, generation);
        let (known, joined) = self.insert_local(room, kind, joiner);
        outs.extend(joined);
        outs.extend(later);
        let listed = if rejoin {
            known
        } else {
            before.into_iter().map(|m| m.peer).collect()
        };
        (listed, outs)
    }

    /// Cluster mode: the admission of `session` failed; forget it.
    pub fn abort_join(&mut self, room: &str, session: &str) {
        if let Some(state) = self.rooms.get_mut(room) {
            state.joining.remove(session);
        }
        self.tidy(room);
    }

    /// Cluster mode: a membership on another node joined the room's A/V. Known only where
    /// this node has local members (or a join in flight); they get `av_peer`. Repeats, and
    /// news of a membership that has left, change nothing.
    pub fn remote_joined(&mut self, room: &str, m: &Membership) -> Vec<Out> {
        match self.rooms.get_mut(room) {
            Some(state) => state.learn(room, m),
            None => Vec::new(),
        }
    }

    /// Cluster mode: membership `generation` of a session on another node left (a later
    /// membership of the same session stays).
    pub fn remote_left(&mut self, room: &str, session: &str, generation: u64) -> Vec<Out> {
        let Some(state) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        state.remember_left(session, generation);
        match state.peers.get(session) {
            Some(m) if !m.local && m.generation <= generation => self.leave(room, session),
            _ => Vec::new(),
        }
    }

    /// Cluster mode: brings a room's members in line with the store's. `version` is the
    /// room's join count in the same read as `stored` (so every membership up to it that is
    /// not in `stored` has left); later ones are news the store read did not cover. Returns the
    /// notices, and the local members the store has lost (to be admitted again).
    pub fn reconcile(
        &mut self,
        room: &str,
        version: u64,
        stored: &[Membership],
    ) -> (Vec<Out>, Vec<Peer>) {
        let Some(state) = self.rooms.get_mut(room) else {
            return (Vec::new(), Vec::new());
        };
        let mut outs = Vec::new();
        for m in stored {
            outs.extend(state.learn(room, m));
        }
        let mut gone = Vec::new();
        let mut lost = Vec::new();
        for m in state.peers.values() {
            if m.generation == 0 || m.generation > version {
                continue;
            }
            let kept = stored
                .iter()
                .any(|s| s.peer.session == m.peer.session && s.generation >= m.generation);
            if !kept {
                if m.local {
                    lost.push(m.peer.clone());
                } else {
                    gone.push((m.peer.session.clone(), m.generation));
                }
            }
        }
        for (session, generation) in gone {
            outs.extend(self.remote_left(room, &session, generation));
        }
        (outs, lost)
    }

    /// Cluster mode: a local member was admitted again (the store had lost it).
    pub fn readmitted(&mut self, room: &str, session: &str, generation: u64) {
        if let Some(m) = self
            .rooms
            .get_mut(room)
            .and_then(|r| r.peers.get_mut(session))
            .filter(|m| m.local)
        {
            m.generation = m.generation.max(generation);
        }
    }

    /// Whether the local session `session` is being admitted to the room's A/V.
    pub fn is_joining(&self, room: &str, session: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.joining.contains(session))
    }

    /// Whether `session` is known as a member of the room's A/V here.
    pub fn knows(&self, room: &str, session: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.peers.contains_key(session))
    }

    /// The membership generation of a local member.
    pub fn local_generation(&self, room: &str, session: &str) -> Option<u64> {
        self.rooms
            .get(room)
            .and_then(|r| r.peers.get(session))
            .filter(|m| m.local)
            .map(|m| m.generation)
    }

    /// Removes a session from a room's A/V and tells the local members.
    pub fn leave(&mut self, room: &str, session: &str) -> Vec<Out> {
        self.leave_local(room, session).1
    }

    /// [`AvRooms::leave`], also saying which membership of a local session ended (its
    /// generation), so that a cluster node can forget it in the store.
    pub fn leave_local(&mut self, room: &str, session: &str) -> (Option<u64>, Vec<Out>) {
        let Some(state) = self.rooms.get_mut(room) else {
            return (None, Vec::new());
        };
        let Some(gone) = state.peers.remove(session) else {
            return (None, Vec::new());
        };
        state.remember_left(session, gone.generation);
        let outs = state.notices(room, &gone.peer, false, |_| true);
        self.tidy(room);
        (gone.local.then_some(gone.generation), outs)
    }

    /// A session is gone: leave every room it was in. Returns the local memberships that
    /// ended (room, generation) and the notices.
    pub fn session_closed(&mut self, session: &str) -> (Vec<(String, u64)>, Vec<Out>) {
        let mut ended = Vec::new();
        let mut outs = Vec::new();
        for room in self.rooms_of(session) {
            let (generation, o) = self.leave_local(&room, session);
            outs.extend(o);
            if let Some(g) = generation {
                ended.push((room, g));
            }
        }
        (ended, outs)
    }

    /// Cluster mode: removes every remote member that `gone` picks by session and node run
    /// (a node run that died or left); local members hear they left.
    pub fn remote_gone(&mut self, gone: impl Fn(&str, u64) -> bool) -> Vec<Out> {
        let doomed: Vec<(String, String)> = self
            .rooms
            .iter()
            .flat_map(|(id, r)| {
                r.peers
                    .values()
                    .filter(|m| !m.local && gone(&m.peer.session, m.run))
                    .map(move |m| (id.clone(), m.peer.session.clone()))
            })
            .collect();
        doomed
            .into_iter()
            .flat_map(|(room, session)| self.leave(&room, &session))
            .collect()
    }

    /// The rooms whose A/V `session` is in.
    pub fn rooms_of(&self, session: &str) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.peers.contains_key(session))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The local members of a room's A/V (those this node's sessions are), in session order.
    pub fn local_members(&self, room: &str) -> Vec<Peer> {
        self.rooms.get(room).map_or_else(Vec::new, |r| {
            r.peers
                .values()
                .filter(|m| m.local)
                .map(|m| m.peer.clone())
                .collect()
        })
    }

    /// Rooms with local members (cluster mode's sweep checks them against the store).
    pub fn local_rooms(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.local_count() > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Grants or withdraws publishing for every session of `user` in the room (stage changes).
    pub fn set_publisher(&mut self, room: &str, user: &str, can_publish: bool) {
        if let Some(state) = self.rooms.get_mut(room) {
            for m in state.peers.values_mut() {
                if m.peer.user == user {
                    m.can_publish = can_publish;
                }
            }
        }
    }

    /// Rooms this node keeps A/V state for (with local members or a join in flight).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
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
        let can_publish = state
            .peers
            .get(&from.session)
            .filter(|m| m.local)
            .map(|m| m.can_publish)
            .ok_or_else(|| SignalError::Forbidden("join the room's A/V first".into()))?;
        // A local session whose admission is in flight may already be listed to others.
        if to == from.session || !(state.peers.contains_key(to) || state.joining.contains(to)) {
            return Err(SignalError::Forbidden(
                "that session is not a peer in this room".into(),
            ));
        }
        let payload = sdp::parse_payload(data)?;
        if let (AvKind::Live, false, Payload::Offer(info) | Payload::Answer(info)) =
            (state.kind, can_publish, &payload)
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
        let (ended, outs) = av.session_closed("b1");
        assert_eq!(ended, vec![("r".to_owned(), 0)]);
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

    /// Finishes the admission of `joiner`, a class-room member who may publish, at its
    /// generation, with the memberships listed `before` it.
    fn admitted(
        av: &mut AvRooms,
        room: &str,
        joiner: &Membership,
        before: &[&Membership],
    ) -> (Vec<Peer>, Vec<Out>) {
        let before = before.iter().map(|m| (*m).clone()).collect();
        let (peer, generation) = (joiner.peer.clone(), joiner.generation);
        av.finish_join(room, AvKind::Class, peer, true, generation, before)
    }

    fn mb(u: &str, s: &str, generation: u64) -> Membership {
        Membership {
            peer: p(u, s),
            generation,
            run: 7,
        }
    }

    #[test]
    fn cluster_join_order_remote_members_and_node_loss() {
        let mut av = AvRooms::new(6);
        // A remote join with no local member or join in flight is not kept.
        assert!(av.remote_joined("r", &mb("x", "x1.n2", 1)).is_empty());
        assert!(!av.knows("r", "x1.n2"));
        // a joins here (generation 2) after b (n1, 1); c (n2, 3) joins during its admission.
        av.begin_join("r", AvKind::Class, "a1.n0");
        assert!(
            av.remote_joined("r", &mb("c", "c1.n2", 3)).is_empty(),
            "no local member yet"
        );
        let (reply, outs) = admitted(&mut av, "r", &mb("a", "a1.n0", 2), &[&mb("b", "b1.n1", 1)]);
        // a offers to b (listed), and hears of c, which joined after it (c offers to a).
        assert_eq!(reply, vec![p("b", "b1.n1")]);
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].to, "a1.n0");
        assert!(
            matches!(&outs[0].msg, Msg::AvPeer { peer, joined: true, .. } if peer.session == "c1.n2")
        );
        assert_eq!(av.local_generation("r", "a1.n0"), Some(2));
        // Signals reach remote members; repeats of a remote join are silent.
        let cand = json!({"candidate": null});
        assert_eq!(
            av.relay("r", &p("a", "a1.n0"), "c1.n2", &cand).unwrap().to,
            "c1.n2"
        );
        assert!(av.remote_joined("r", &mb("c", "c1.n2", 3)).is_empty());
        // A remote member cannot be the sender of a relay here.
        assert!(matches!(
            av.relay("r", &p("b", "b1.n1"), "a1.n0", &cand),
            Err(SignalError::Forbidden(_))
        ));
        // A second local member: the local one and the remote join notices go to locals only.
        let (a, b, c) = (
            mb("a", "a1.n0", 2),
            mb("b", "b1.n1", 1),
            mb("c", "c1.n2", 3),
        );
        let (reply, outs) = admitted(&mut av, "r", &mb("d", "d1.n0", 4), &[&b, &a, &c]);
        assert_eq!(reply.len(), 3);
        assert_eq!(
            outs.iter().map(|o| o.to.as_str()).collect::<Vec<_>>(),
            vec!["a1.n0"]
        );
        let outs = av.remote_joined("r", &mb("e", "e1.n1", 5));
        let mut to: Vec<&str> = outs.iter().map(|o| o.to.as_str()).collect();
        to.sort();
        assert_eq!(to, vec!["a1.n0", "d1.n0"]);
        // Run 8 of node n1 is gone: nothing of run 7 goes. Run 7 is gone: b and e go.
        assert!(
            av.remote_gone(|s, run| s.ends_with(".n1") && run == 8)
                .is_empty()
        );
        let outs = av.remote_gone(|s, run| s.ends_with(".n1") && run == 7);
        assert_eq!(outs.len(), 4, "b and e, told to a and d");
        assert!(!av.knows("r", "b1.n1") && !av.knows("r", "e1.n1"));
        // The last local member leaves: the room goes, remote members with it.
        av.leave("r", "a1.n0");
        av.session_closed("d1.n0");
        assert!(!av.knows("r", "c1.n2"));
        assert_eq!(av.peers("r"), 0);
        // A failed admission leaves nothing behind.
        av.begin_join("q", AvKind::Live, "q1.n0");
        av.abort_join("q", "q1.n0");
        assert!(av.rooms.is_empty());
    }

    #[test]
    fn cluster_generations_keep_old_news_from_undoing_newer() {
        let mut av = AvRooms::new(6);
        av.begin_join("s", AvKind::Class, "a1.n0");
        let a = mb("a", "a1.n0", 1);
        admitted(&mut av, "s", &a, &[]);
        // b joins (2); its leave (2) is overtaken by its re-join (3): b stays.
        av.remote_joined("s", &mb("b", "b1.n1", 2));
        av.remote_joined("s", &mb("b", "b1.n1", 3));
        assert!(av.remote_left("s", "b1.n1", 2).is_empty());
        assert!(av.knows("s", "b1.n1"));
        // c's leave (4) comes before the news of its join (4): c never appears.
        av.remote_left("s", "c1.n2", 4);
        assert!(av.remote_joined("s", &mb("c", "c1.n2", 4)).is_empty());
        assert!(!av.knows("s", "c1.n2"));
        // A store listing read before b left (3) does not bring b back.
        assert_eq!(av.remote_left("s", "b1.n1", 3).len(), 1, "a hears b left");
        av.begin_join("s", AvKind::Class, "d1.n0");
        let (b, c, d) = (
            mb("b", "b1.n1", 3),
            mb("c", "c1.n2", 4),
            mb("d", "d1.n0", 5),
        );
        let (reply, _) = admitted(&mut av, "s", &d, &[&a, &b, &c]);
        assert_eq!(reply, vec![p("a", "a1.n0")]);
        assert!(!av.knows("s", "b1.n1") && !av.knows("s", "c1.n2"));
        // Two local joins admitted in one order (e 6, f 7), finished in the other.
        av.begin_join("s", AvKind::Class, "e1.n0");
        av.begin_join("s", AvKind::Class, "f1.n0");
        let (e, f) = (mb("e", "e1.n0", 6), mb("f", "f1.n0", 7));
        let (reply_f, outs_f) = admitted(&mut av, "s", &f, &[&a, &d, &e]);
        assert_eq!(reply_f.len(), 3, "f lists e and offers to it");
        assert!(
            outs_f.iter().all(|o| o.to != "e1.n0"),
            "e is not a member yet"
        );
        // f's offer reaches e, whose admission is still in flight.
        let cand = json!({"candidate": null});
        assert_eq!(
            av.relay("s", &p("f", "f1.n0"), "e1.n0", &cand).unwrap().to,
            "e1.n0"
        );
        let (reply_e, outs_e) = admitted(&mut av, "s", &e, &[&a, &d]);
        assert_eq!(reply_e.len(), 2, "e does not list f");
        assert!(
            outs_e.iter().any(|o| o.to == "e1.n0"
                && matches!(&o.msg, Msg::AvPeer { peer, .. } if peer.session == "f1.n0")),
            "e hears of f"
        );
        assert!(
            outs_e.iter().all(|o| o.to != "f1.n0"),
            "f listed e already: no av_peer about e for f"
        );
        assert_eq!(av.local_generation("s", "e1.n0"), Some(6));
        // A remote member admitted before a join but missing from its list has left.
        av.remote_joined("s", &mb("g", "g1.n1", 8));
        av.begin_join("s", AvKind::Class, "h1.n0");
        let h = mb("h", "h1.n0", 9);
        let (reply_h, outs_h) = admitted(&mut av, "s", &h, &[&a, &d, &e, &f]);
        assert_eq!(reply_h.len(), 4);
        assert!(!av.knows("s", "g1.n1"));
        assert!(
            outs_h
                .iter()
                .all(|o| !matches!(&o.msg, Msg::AvPeer { peer, joined: true, .. } if peer.session == "g1.n1")),
            "h is not told of g"
        );
        assert!(av.relay("s", &p("e", "e1.n0"), "f1.n0", &cand).is_ok());
    }

    #[test]
    fn a_remote_member_first_known_from_a_join_list_is_news_to_earlier_locals() {
        let mut av = AvRooms::new(6);
        // o (n1, 1) and a (here, 2) are in; b (n2, 3) is admitted, but its notice is still on
        // the bus when c (here, 4) is admitted with [o, a, b] before it.
        let (o, a, b, c) = (
            mb("o", "o1.n1", 1),
            mb("a", "a1.n0", 2),
            mb("b", "b1.n2", 3),
            mb("c", "c1.n0", 4),
        );
        av.begin_join("r", AvKind::Class, "a1.n0");
        admitted(&mut av, "r", &a, &[&o]);
        av.begin_join("r", AvKind::Class, "c1.n0");
        let (reply, outs) = admitted(&mut av, "r", &c, &[&o, &a, &b]);
        assert_eq!(reply.len(), 3, "c lists o, a and b");
        // a hears of b (admitted after it) and of c; nobody hears of o (admitted before both).
        let mut news: Vec<(&str, &str)> = outs
            .iter()
            .map(|m| match &m.msg {
                Msg::AvPeer {
                    peer, joined: true, ..
                } => (m.to.as_str(), peer.session.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        news.sort();
        assert_eq!(news, vec![("a1.n0", "b1.n2"), ("a1.n0", "c1.n0")]);
        // b's own notice arrives: nobody hears of it twice.
        assert!(av.remote_joined("r", &b).is_empty());
    }

    #[test]
    fn cluster_reconcile_with_the_store() {
        let mut av = AvRooms::new(6);
        av.begin_join("r", AvKind::Class, "a1.n0");
        admitted(&mut av, "r", &mb("a", "a1.n0", 2), &[&mb("b", "b1.n1", 1)]);
        av.remote_joined("r", &mb("c", "c1.n2", 3));
        av.remote_joined("r", &mb("late", "l1.n2", 9));
        // The store (read at version 8) lists a and c and d: b's leave notice was lost, d's
        // join notice too, and "late" joined after the read.
        let stored = [
            mb("a", "a1.n0", 2),
            mb("c", "c1.n2", 3),
            mb("d", "d1.n1", 6),
        ];
        let (outs, lost) = av.reconcile("r", 8, &stored);
        assert!(lost.is_empty());
        let mut news: Vec<(String, bool)> = outs
            .iter()
            .map(|o| match &o.msg {
                Msg::AvPeer { peer, joined, .. } => (peer.session.clone(), *joined),
                m => panic!("{m:?}"),
            })
            .collect();
        news.sort();
        assert_eq!(
            news,
            vec![("b1.n1".to_owned(), false), ("d1.n1".to_owned(), true)]
        );
        assert!(av.knows("r", "l1.n2"), "newer than the read: kept");
        // The store lost a (its node was taken for dead): a is to be admitted again.
        let (_, lost) = av.reconcile("r", 9, &[mb("c", "c1.n2", 3), mb("d", "d1.n1", 6)]);
        assert_eq!(lost, vec![p("a", "a1.n0")]);
        av.readmitted("r", "a1.n0", 10);
        assert_eq!(av.local_generation("r", "a1.n0"), Some(10));
        assert_eq!(av.local_rooms(), vec!["r".to_owned()]);
    }
}
