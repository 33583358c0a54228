//! Cluster presence heartbeats in parts: a node's full presence snapshot (its online users per
//! room and its sessions per user) is split into parts that each fit well inside one NATS
//! message, and the receiving node puts the parts of one heartbeat back together. It owns the
//! part format (serde JSON between nodes, never seen by clients), the packing under a byte
//! budget, and the per-node assembly state (at most one heartbeat in progress per node). It is
//! pure: it knows nothing of NATS, the hub or liveness, only the `Instant`s it is handed.

use crate::protocol::{RoomId, UserId, UserRef};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::time::Instant;

/// Online users per room.
pub type Rooms = Vec<(RoomId, Vec<UserRef>)>;
/// Sessions per user: (session id, call waiting).
pub type Sessions = Vec<(UserId, Vec<(String, bool)>)>;

/// The smallest part budget used, whatever the caller asks: room for the header and entries.
pub const MIN_BUDGET: usize = 1024;
/// The most parts a receiver accepts for one heartbeat (a bound on what a bad part can make it
/// allocate; 65,536 parts of half a MiB is far beyond any node).
pub const MAX_PARTS: u32 = 1 << 16;

/// One node's full presence at one version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub node: String,
    /// Random per process start: a restarted node with the same name starts afresh.
    pub epoch: u64,
    /// Counts the node's heartbeats; every part of one heartbeat has the same.
    pub version: u64,
    /// The node is going away: drop it now rather than at expiry.
    pub leaving: bool,
    pub rooms: Rooms,
    pub sessions: Sessions,
}

/// One part of a heartbeat as it travels on `studyhall.presence`. A room's users, or a user's
/// sessions, may be spread over several parts; the receiver concatenates them. A heartbeat
/// from a node that predates parts has neither `part` nor `parts` and reads as the only part.
#[derive(Debug, Serialize, Deserialize)]
pub struct Part {
    pub node: String,
    pub epoch: u64,
    pub version: u64,
    pub leaving: bool,
    #[serde(default)]
    pub part: u32,
    #[serde(default = "one")]
    pub parts: u32,
    pub rooms: Rooms,
    pub sessions: Sessions,
}

fn one() -> u32 {
    1
}

/// Where a part's JSON starts, up to the opening of its `rooms` array.
fn header(s: &Snapshot, part: u32, parts: u32) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = b"{\"node\":".to_vec();
    serde_json::to_writer(&mut out, &s.node)?;
    out.extend_from_slice(
        format!(
            ",\"epoch\":{},\"version\":{},\"leaving\":{},\"part\":{part},\"parts\":{parts},\"rooms\":[",
            s.epoch, s.version, s.leaving
        )
        .as_bytes(),
    );
    Ok(out)
}

const MIDDLE: &[u8] = b"],\"sessions\":[";
const END: &[u8] = b"]}";

/// Splits a snapshot into the JSON of its parts (a [`Part`] each), every one at most `budget`
/// bytes (at least [`MIN_BUDGET`]), except a part holding one user or session whose own JSON is
/// bigger than that. An empty snapshot is one part.
pub fn split(s: &Snapshot, budget: usize) -> Result<Vec<Vec<u8>>, serde_json::Error> {
    let fixed = header(s, u32::MAX, u32::MAX)?.len() + MIDDLE.len() + END.len();
    let mut packer = Packer {
        room: budget.max(MIN_BUDGET).saturating_sub(fixed),
        done: Vec::new(),
        cur: [Vec::new(), Vec::new()],
        open: None,
        item: Vec::new(),
    };
    packer.section(0, &s.rooms)?;
    packer.section(1, &s.sessions)?;
    let bodies = packer.finish();
    let n = bodies.len() as u32;
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, [rooms, sessions])| {
            let mut out = header(s, i as u32, n)?;
            out.reserve(rooms.len() + sessions.len() + MIDDLE.len() + END.len());
            out.extend_from_slice(&rooms);
            out.extend_from_slice(MIDDLE);
            out.extend_from_slice(&sessions);
            out.extend_from_slice(END);
            Ok(out)
        })
        .collect()
}

/// Fills the bodies of parts (the inside of their `rooms` and `sessions` arrays) group by
/// group, `[key,[value,…]]`, starting a new part when the next value would not fit and
/// continuing the group there under the same key.
struct Packer {
    /// Bytes of body a part may hold.
    room: usize,
    done: Vec<[Vec<u8>; 2]>,
    cur: [Vec<u8>; 2],
    /// The section of the group open in `cur` (its `]]` not yet written).
    open: Option<usize>,
    item: Vec<u8>,
}

impl Packer {
    fn used(&self) -> usize {
        self.cur[0].len() + self.cur[1].len() + if self.open.is_some() { 2 } else { 0 }
    }

    fn close(&mut self) {
        if let Some(section) = self.open.take() {
            self.cur[section].extend_from_slice(b"]]");
        }
    }

    fn flush(&mut self) {
        self.close();
        self.done.push(std::mem::take(&mut self.cur));
    }

    /// Opens the group `key` in `section` of the current part.
    fn open(&mut self, section: usize, key: &[u8]) {
        let body = &mut self.cur[section];
        if !body.is_empty() {
            body.push(b',');
        }
        body.push(b'[');
        body.extend_from_slice(key);
        body.extend_from_slice(b",[");
        self.open = Some(section);
    }

    /// What opening `key` in `section` of the current part costs, its `]]` included.
    fn open_cost(&self, section: usize, key: &[u8]) -> usize {
        usize::from(!self.cur[section].is_empty()) + key.len() + 5
    }

    fn section<K: Serialize, V: Serialize>(
        &mut self,
        section: usize,
        groups: &[(K, Vec<V>)],
    ) -> Result<(), serde_json::Error> {
        for (key, values) in groups {
            let key = serde_json::to_vec(key)?;
            if values.is_empty() {
                if self.used() + self.open_cost(section, &key) > self.room && self.used() > 0 {
                    self.flush();
                }
                self.open(section, &key);
                self.close();
                continue;
            }
            for value in values {
                self.item.clear();
                serde_json::to_writer(&mut self.item, value)?;
                let fits = |p: &Self| {
                    let extra = if p.open.is_some() {
                        1
                    } else {
                        p.open_cost(section, &key)
                    };
                    p.used() + extra + p.item.len() <= p.room
                };
                if !fits(self) && self.used() > 0 {
                    self.flush();
                }
                // Groups are closed before the next one: an open group is this one.
                if self.open.is_none() {
                    self.open(section, &key);
                } else {
                    self.cur[section].push(b',');
                }
                self.cur[section].extend_from_slice(&self.item);
            }
            self.close();
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<[Vec<u8>; 2]> {
        if self.used() > 0 || self.done.is_empty() {
            self.flush();
        }
        self.done
    }
}

/// What offering a part did.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// The last missing part of a heartbeat: here is the whole of it.
    Complete(Snapshot),
    /// Kept (or a duplicate of one kept); parts of the heartbeat are still missing.
    Partial,
    /// Older than what this node has applied or is assembling: ignored.
    Stale,
    /// Not a well-formed part (no part count, index out of range, too many parts, or a part
    /// count that disagrees with the other parts of the same heartbeat).
    Invalid,
}

struct Pending {
    epoch: u64,
    version: u64,
    leaving: bool,
    got: Vec<Option<(Rooms, Sessions)>>,
    missing: usize,
    since: Instant,
}

/// The heartbeats being put together, at most one per node: a part of a newer heartbeat (or
/// of a new epoch) replaces an unfinished older one, so memory is bounded by one heartbeat
/// per node.
#[derive(Default)]
pub struct Assembler {
    pending: HashMap<String, Pending>,
}

impl Assembler {
    /// Offers a part from another node. `applied` is the epoch and version of the node's
    /// snapshot in use, if any: parts of that version or older are stale.
    pub fn offer(&mut self, p: Part, applied: Option<(u64, u64)>, now: Instant) -> Assembled {
        if p.parts == 0 || p.part >= p.parts || p.parts > MAX_PARTS {
            return Assembled::Invalid;
        }
        if applied.is_some_and(|(epoch, version)| epoch == p.epoch && p.version <= version) {
            return Assembled::Stale;
        }
        let pending = match self.pending.entry(p.node.clone()) {
            Entry::Occupied(e) => {
                let cur = e.into_mut();
                if cur.epoch == p.epoch && cur.version > p.version {
                    return Assembled::Stale;
                }
                if cur.epoch == p.epoch && cur.version == p.version {
                    if cur.got.len() != p.parts as usize {
                        return Assembled::Invalid;
                    }
                } else {
                    *cur = Pending::new(&p, now);
                }
                cur
            }
            Entry::Vacant(e) => e.insert(Pending::new(&p, now)),
        };
        let slot = &mut pending.got[p.part as usize];
        if slot.is_none() {
            *slot = Some((p.rooms, p.sessions));
            pending.missing -= 1;
        }
        if pending.missing > 0 {
            return Assembled::Partial;
        }
        let Some(done) = self.pending.remove(&p.node) else {
            return Assembled::Partial;
        };
        let mut rooms = Vec::with_capacity(done.got.len());
        let mut sessions = Vec::with_capacity(done.got.len());
        for (r, s) in done.got.into_iter().flatten() {
            rooms.push(r);
            sessions.push(s);
        }
        Assembled::Complete(Snapshot {
            node: p.node,
            epoch: done.epoch,
            version: done.version,
            leaving: done.leaving,
            rooms: merge(rooms),
            sessions: merge(sessions),
        })
    }

    /// Drops the node's unfinished heartbeat (the node expired or left).
    pub fn forget(&mut self, node: &str) {
        self.pending.remove(node);
    }

    /// Drops unfinished heartbeats whose first part came before `cutoff` (a node that died
    /// mid-heartbeat, or whose parts NATS lost).
    pub fn discard_before(&mut self, cutoff: Instant) {
        self.pending.retain(|_, p| p.since >= cutoff);
    }

    /// Heartbeats in progress.
    pub fn in_progress(&self) -> usize {
        self.pending.len()
    }
}

impl Pending {
    fn new(p: &Part, now: Instant) -> Self {
        Self {
            epoch: p.epoch,
            version: p.version,
            leaving: p.leaving,
            got: (0..p.parts).map(|_| None).collect(),
            missing: p.parts as usize,
            since: now,
        }
    }
}

/// Concatenates the parts' groups in part order, joining the values of a key spread over
/// several parts.
fn merge<K: Eq + Hash + Clone, V>(chunks: Vec<Vec<(K, Vec<V>)>>) -> Vec<(K, Vec<V>)> {
    if chunks.len() == 1 {
        return chunks.into_iter().flatten().collect();
    }
    let mut out: Vec<(K, Vec<V>)> = Vec::new();
    let mut at: HashMap<K, usize> = HashMap::new();
    for (key, values) in chunks.into_iter().flatten() {
        match at.get(&key) {
            Some(&i) => out[i].1.extend(values),
            None => {
                at.insert(key.clone(), out.len());
                out.push((key, values));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(i: usize) -> UserRef {
        UserRef {
            id: UserId::from(format!("user-{i}").as_str()),
            name: format!("User number {i}"),
            role: crate::protocol::ShownRole::Member,
        }
    }

    /// `rooms` rooms of `per_room` users each, and every user's two sessions.
    fn snapshot(version: u64, rooms: usize, per_room: usize) -> Snapshot {
        let mut s = Snapshot {
            node: "n0".into(),
            epoch: 7,
            version,
            ..Default::default()
        };
        for r in 0..rooms {
            let users = (0..per_room).map(|k| user(r * per_room + k)).collect();
            s.rooms
                .push((RoomId::from(format!("room.{r}").as_str()), users));
        }
        for i in 0..rooms * per_room {
            let sessions = vec![(format!("s{i:016x}.n0"), false), (format!("t{i}.n0"), true)];
            s.sessions.push((user(i).id, sessions));
        }
        s.rooms.push((RoomId::from("empty"), Vec::new()));
        s
    }

    fn parts(s: &Snapshot, budget: usize) -> Vec<Part> {
        let raw = split(s, budget).unwrap();
        for p in &raw {
            assert!(p.len() <= budget.max(MIN_BUDGET), "{} > {budget}", p.len());
        }
        raw.iter()
            .map(|p| serde_json::from_slice(p).unwrap())
            .collect()
    }

    fn complete(a: Assembled) -> Snapshot {
        match a {
            Assembled::Complete(s) => s,
            other => panic!("not complete: {other:?}"),
        }
    }

    #[test]
    fn a_small_snapshot_is_one_part_and_completes_at_once() {
        let s = snapshot(1, 2, 3);
        let ps = parts(&s, 512 * 1024);
        assert_eq!(ps.len(), 1);
        assert_eq!((ps[0].part, ps[0].parts), (0, 1));
        let mut a = Assembler::default();
        let now = Instant::now();
        let got = complete(a.offer(ps.into_iter().next().unwrap(), None, now));
        assert_eq!(got, s);
        assert_eq!(a.in_progress(), 0);
        // An empty (leaving) snapshot is one part too.
        let leaving = Snapshot {
            leaving: true,
            version: 2,
            ..snapshot(2, 0, 0)
        };
        let ps = parts(&leaving, MIN_BUDGET);
        assert_eq!(ps.len(), 1);
        assert!(complete(a.offer(ps.into_iter().next().unwrap(), None, now)).leaving);
    }

    #[test]
    fn a_big_snapshot_splits_under_the_budget_and_reassembles_in_any_order() {
        // One room bigger than a part: its users continue in the next parts.
        let s = snapshot(3, 3, 60);
        let mut ps = parts(&s, 2048);
        assert!(ps.len() > 5, "{} parts", ps.len());
        assert!(ps.iter().all(|p| p.parts == ps.len() as u32));
        ps.reverse();
        ps.swap(1, 3);
        let mut a = Assembler::default();
        let now = Instant::now();
        let n = ps.len();
        let mut got = None;
        for (i, p) in ps.into_iter().enumerate() {
            match a.offer(p, None, now) {
                Assembled::Partial => assert!(i < n - 1),
                Assembled::Complete(snap) => {
                    assert_eq!(i, n - 1);
                    got = Some(snap);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got.unwrap(), s, "the same rooms, users, sessions, in order");
    }

    #[test]
    fn duplicates_count_once_and_a_lost_part_never_completes() {
        let s = snapshot(1, 2, 40);
        let raw = split(&s, 1500).unwrap();
        assert!(raw.len() >= 3);
        let part = |i: usize| serde_json::from_slice::<Part>(&raw[i]).unwrap();
        let mut a = Assembler::default();
        let now = Instant::now();
        // Part 1 is lost: every other part, twice, leaves the heartbeat incomplete.
        for _ in 0..2 {
            for i in (0..raw.len()).filter(|&i| i != 1) {
                assert_eq!(a.offer(part(i), None, now), Assembled::Partial);
            }
        }
        assert_eq!(a.in_progress(), 1);
        // It arrives late after all: complete, once.
        assert_eq!(complete(a.offer(part(1), None, now)), s);
        // A duplicate after that is stale for a receiver that applied it.
        assert_eq!(a.offer(part(0), Some((7, 1)), now), Assembled::Stale);
        assert_eq!(a.in_progress(), 0);
    }

    #[test]
    fn a_newer_version_supersedes_an_unfinished_older_one() {
        let old = snapshot(1, 2, 40);
        let new = snapshot(2, 1, 10);
        let old_raw = split(&old, 1500).unwrap();
        let new_parts = parts(&new, 1500);
        assert!(old_raw.len() >= 2 && new_parts.len() == 1);
        let old_part = |i: usize| serde_json::from_slice::<Part>(&old_raw[i]).unwrap();
        let mut a = Assembler::default();
        let now = Instant::now();
        assert_eq!(a.offer(old_part(0), None, now), Assembled::Partial);
        // Version 2 (one part) completes and replaces the unfinished version 1.
        let got = complete(a.offer(new_parts.into_iter().next().unwrap(), None, now));
        assert_eq!(got, new);
        assert_eq!(a.in_progress(), 0);
        // Version 1's remaining parts, late, are stale once version 2 is applied.
        assert_eq!(a.offer(old_part(1), Some((7, 2)), now), Assembled::Stale);
        // An older part while a newer version is being assembled is stale too.
        let v3 = split(&snapshot(3, 2, 40), 1500).unwrap();
        let v3p = |i: usize| serde_json::from_slice::<Part>(&v3[i]).unwrap();
        assert_eq!(a.offer(v3p(0), Some((7, 2)), now), Assembled::Partial);
        assert_eq!(a.offer(old_part(1), None, now), Assembled::Stale);
        // A new epoch (the node restarted) replaces the unfinished heartbeat whatever its
        // version.
        let restarted = Snapshot {
            epoch: 8,
            ..snapshot(1, 1, 1)
        };
        let r = parts(&restarted, 1500).into_iter().next().unwrap();
        assert_eq!(complete(a.offer(r, Some((7, 2)), now)), restarted);
        assert_eq!(a.in_progress(), 0);
    }

    #[test]
    fn bad_parts_are_refused_and_stale_assemblies_discarded() {
        let s = snapshot(1, 2, 40);
        let raw = split(&s, 1500).unwrap();
        let part = |i: usize| serde_json::from_slice::<Part>(&raw[i]).unwrap();
        let mut a = Assembler::default();
        let t0 = Instant::now();
        let mut bad = part(0);
        bad.part = bad.parts;
        assert_eq!(a.offer(bad, None, t0), Assembled::Invalid);
        let mut bad = part(0);
        bad.parts = MAX_PARTS + 1;
        assert_eq!(a.offer(bad, None, t0), Assembled::Invalid);
        assert_eq!(a.offer(part(0), None, t0), Assembled::Partial);
        let mut other_count = part(1);
        other_count.parts += 1;
        assert_eq!(a.offer(other_count, None, t0), Assembled::Invalid);
        a.discard_before(t0 + std::time::Duration::from_millis(1));
        assert_eq!(a.in_progress(), 0);
        assert_eq!(a.offer(part(0), None, t0), Assembled::Partial);
        a.forget("n0");
        assert_eq!(a.in_progress(), 0);
    }

    #[test]
    fn a_heartbeat_without_part_fields_reads_as_one_part() {
        let old = br#"{"node":"n9","epoch":1,"version":4,"leaving":false,"rooms":[["r",[{"id":"a","name":"A","role":"member"}]]],"sessions":[["a",[["s1.n9",false]]]]}"#;
        let p: Part = serde_json::from_slice(old).unwrap();
        assert_eq!((p.part, p.parts), (0, 1));
        let got = complete(Assembler::default().offer(p, None, Instant::now()));
        assert_eq!(got.rooms[0].1[0].name, "A");
        assert_eq!(got.sessions[0].1, vec![("s1.n9".to_owned(), false)]);
    }
}
