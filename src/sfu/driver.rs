//! The SFU's driver task: one loop over one UDP socket for every SFU session of the node. It
//! routes each datagram to the `Rtc` that accepts it (ICE ufrag / remote address), moves time
//! forward, drains each client's output, forwards media between the clients of a room, and
//! applies the commands of `Sfu`. It owns every `Client`; nothing else touches them. Only the
//! clients that got input, media or time are driven in a turn, and a datagram finds its client
//! by source address before any scan, so a turn's cost follows the traffic, not the sessions.

use super::client::{Client, Propagate, TrackKey, host_candidate, media_kind};
use super::{Cmd, Member, Notice, Notify, SfuConfig, SfuError, SfuStats, TrackKind};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use str0m::bwe::Bitrate;
use str0m::media::{MediaKind, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Input, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Largest datagram read.
const DATAGRAM_MAX: usize = 2000;
/// Longest the loop sleeps without a deadline.
const IDLE: Duration = Duration::from_millis(100);
/// Datagrams read in one turn before the clients' output is drained again.
const READ_BURST: usize = 64;
/// An audio packet at least this loud (RFC 6464 level, -dBov) counts as speech.
const SPEECH_DBOV: i8 = -50;
/// How often layer rates are measured and each viewer's simulcast layers chosen.
const SELECT_EVERY: Duration = Duration::from_millis(250);

/// The first wait between connectivity checks (str0m's, as browsers).
const STUN_RTO: Duration = Duration::from_millis(250);

/// The STUN timing (the longest wait between checks, the checks) under which unanswered checks
/// count as ICE lost after about `lost_after`: the waits double from 250 ms up to an eighth of
/// it (250 ms..3 s), and the agent gives up after its last wait, as str0m's ICE agent counts.
fn stun_timing(lost_after: Duration) -> (Duration, usize) {
    let max_rto = (lost_after / 8).clamp(STUN_RTO, Duration::from_secs(3));
    let delay = |n: usize| (STUN_RTO * (1u32 << (n - 1).min(16))).min(max_rto);
    let gives_up_after = |m: usize| (2..=m).map(delay).sum::<Duration>() + delay(m);
    let checks = (2..64)
        .find(|&m| gives_up_after(m) >= lost_after)
        .unwrap_or(64);
    (max_rto, checks)
}

/// A room's SFU: its sessions and who spoke lately.
#[derive(Default)]
struct Room {
    sessions: BTreeSet<String>,
    /// user -> last speech (audio level, or an audio packet when no level is sent).
    spoke: HashMap<String, Instant>,
    /// The users last announced in `active_speakers`.
    announced: Vec<String>,
    last_announce: Option<Instant>,
}

pub(super) struct Driver {
    socket: UdpSocket,
    addr: SocketAddr,
    cfg: SfuConfig,
    notify: Notify,
    sessions: Arc<AtomicUsize>,
    stats: Arc<SfuStats>,
    /// (room, session) -> client
    clients: HashMap<(String, String), Client>,
    rooms: BTreeMap<String, Room>,
    /// Remote address -> the client that last accepted a datagram from it.
    by_addr: HashMap<SocketAddr, (String, String)>,
    last_select: Instant,
    /// When a keyframe request held back by `sfu_keyframe_ms` may go (viewers wait for it).
    keyframe_due: Option<Instant>,
    crypto: Arc<str0m::crypto::CryptoProvider>,
}

impl Driver {
    pub fn new(
        socket: UdpSocket,
        addr: SocketAddr,
        cfg: SfuConfig,
        notify: Notify,
        (sessions, stats): (Arc<AtomicUsize>, Arc<SfuStats>),
    ) -> Self {
        Self {
            socket,
            addr,
            cfg,
            notify,
            sessions,
            stats,
            clients: HashMap::new(),
            rooms: BTreeMap::new(),
            by_addr: HashMap::new(),
            last_select: Instant::now(),
            keyframe_due: None,
            crypto: Arc::new(str0m::crypto::from_feature_flags()),
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let mut deadline = self.drain().min(self.last_select + SELECT_EVERY);
            if let Some(due) = self.keyframe_due {
                deadline = deadline.min(due);
            }
            self.reap();
            self.announce_speakers();
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                got = self.socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = got {
                        self.input(&buf[..n], from);
                        for _ in 0..READ_BURST {
                            match self.socket.try_recv_from(&mut buf) {
                                Ok((n, from)) => self.input(&buf[..n], from),
                                Err(_) => break,
                            }
                        }
                    }
                }
                _ = sleep => {}
            }
            let now = Instant::now();
            let grace = Duration::from_millis(self.cfg.ice_grace_ms);
            let wait = Duration::from_millis(self.cfg.connect_wait_ms);
            for c in self.clients.values_mut() {
                if c.rtc.is_alive() && c.due <= now {
                    c.input(Input::Timeout(now));
                }
                if c.rtc.is_alive() && c.ice_lost_past(now, grace) {
                    tracing::info!(room = %c.room, "an SFU peer's ICE stayed lost past the grace");
                    c.close();
                }
                if c.rtc.is_alive() && c.connect_overdue(now, wait) {
                    tracing::info!(room = %c.room, "an SFU peer's media path never came up");
                    c.close();
                }
            }
            if now >= self.last_select + SELECT_EVERY {
                self.last_select = now;
                self.keyframe_due = None;
                self.select_layers(now);
            } else if self.keyframe_due.is_some_and(|due| now >= due) {
                self.keyframe_due = None;
                self.select_where(|_| true);
            }
        }
        let left: Vec<_> = self.clients.keys().cloned().collect();
        for (room, session) in left {
            self.remove(&room, &session);
        }
    }

    /// Hands a datagram to the client whose `Rtc` accepts it.
    fn input(&mut self, data: &[u8], source: SocketAddr) {
        let Ok(contents) = data.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.addr,
                contents,
            },
        );
        let known = self
            .by_addr
            .get(&source)
            .filter(|k| self.clients.get(*k).is_some_and(|c| c.rtc.accepts(&input)))
            .cloned();
        let key = known.or_else(|| {
            let (k, _) = self.clients.iter().find(|(_, c)| c.rtc.accepts(&input))?;
            let k = k.clone();
            self.by_addr.insert(source, k.clone());
            Some(k)
        });
        if let Some(c) = key.and_then(|k| self.clients.get_mut(&k)) {
            c.input(input);
        }
    }

    /// Drains the output of every client that was touched or wants time, and forwards what
    /// it asks, until all wait for time; returns the earliest deadline.
    fn drain(&mut self) -> Instant {
        loop {
            let now = Instant::now();
            let mut deadline = now + IDLE;
            let mut props = Vec::new();
            let mut signals = Vec::new();
            for c in self.clients.values_mut() {
                if !c.dirty && c.due > now {
                    deadline = deadline.min(c.due);
                    continue;
                }
                let mut offers = Vec::new();
                let mut out = Vec::new();
                deadline = deadline.min(c.drive(&self.socket, &mut out, &mut offers));
                props.extend(out.into_iter().map(|p| (c.room.clone(), p)));
                for data in offers {
                    signals.push((c.session.clone(), c.room.clone(), data));
                }
            }
            for (session, room, data) in signals {
                (self.notify)(Notice::Signal {
                    session,
                    room,
                    data,
                });
            }
            if props.is_empty() {
                return deadline;
            }
            for (room, p) in props {
                self.propagate(&room, p);
            }
        }
    }

    /// What a client's output asks of the others in its `room`.
    fn propagate(&mut self, room: &str, p: Propagate) {
        match p {
            Propagate::TrackOpen(key, kind) => {
                let Some(user) = self
                    .clients
                    .get(&(room.to_owned(), key.session.clone()))
                    .map(|c| c.user.clone())
                else {
                    return;
                };
                for c in self.clients.values_mut() {
                    if c.room == room && c.session != key.session {
                        c.add_out(key.clone(), user.clone(), kind);
                    }
                }
            }
            Propagate::Media(key, data) => self.forward(room, &key, &data),
            Propagate::Keyframe(key, rid) => self.keyframe(room, &key, rid),
            Propagate::Connected(session) => {
                self.select_where(|k| k.0 == room && k.1 == session);
            }
        }
    }

    fn forward(&mut self, room: &str, key: &TrackKey, data: &str0m::media::MediaData) {
        let Some(src) = self
            .clients
            .get_mut(&(room.to_owned(), key.session.clone()))
        else {
            return;
        };
        if !src.forwards(key.mid) {
            return;
        }
        let Some(track) = src.tracks_in.iter_mut().find(|t| t.mid == key.mid) else {
            return;
        };
        if let Some(rid) = data.rid {
            track.meter.add(rid, data.data.len(), data.network_time);
        }
        let is_audio = track.kind == MediaKind::Audio;
        let user = src.user.clone();
        if is_audio
            && data.ext_vals.audio_level.is_none_or(|l| l >= SPEECH_DBOV)
            && let Some(r) = self.rooms.get_mut(room)
        {
            r.spoke.insert(user, Instant::now());
        }
        for c in self.clients.values_mut() {
            if c.room == room && c.session != key.session {
                c.write(key, data);
            }
        }
    }

    /// Asks a publisher for a keyframe; one held back by the request limit is asked again (for
    /// the viewers still waiting) as soon as the limit allows, not at the next selection.
    fn keyframe(&mut self, room: &str, key: &TrackKey, rid: Option<Rid>) {
        let every = Duration::from_millis(self.cfg.keyframe_ms);
        let Some(c) = self
            .clients
            .get_mut(&(room.to_owned(), key.session.clone()))
        else {
            return;
        };
        if let Some(at) = c.request_keyframe(key.mid, rid, every) {
            self.keyframe_due = Some(self.keyframe_due.map_or(at, |d| d.min(at)));
        }
    }

    /// Measures each published layer's rate, then chooses every viewer's layers.
    fn select_layers(&mut self, now: Instant) {
        for c in self.clients.values_mut() {
            for t in &mut c.tracks_in {
                t.meter.roll(now);
            }
        }
        self.select_where(|_| true);
    }

    /// Chooses the layers of the viewers `pick` takes, from the rates measured last, and asks
    /// the publishers for the keyframes those viewers wait for.
    fn select_where(&mut self, pick: impl Fn(&(String, String)) -> bool) {
        let mut rates: HashMap<(String, TrackKey), Vec<(Rid, u64)>> = HashMap::new();
        for c in self.clients.values() {
            for t in c.tracks_in.iter().filter(|t| t.kind == MediaKind::Video) {
                let key = TrackKey {
                    session: c.session.clone(),
                    mid: t.mid,
                };
                rates.insert((c.room.clone(), key), t.meter.active());
            }
        }
        let cap = (self.cfg.viewer_max_kbps > 0).then(|| self.cfg.viewer_max_kbps * 1000);
        let mut wants = Vec::new();
        for (k, c) in self.clients.iter_mut().filter(|(k, _)| pick(k)) {
            let room = &k.0;
            let layers = |src: &TrackKey| {
                rates
                    .get(&(room.clone(), src.clone()))
                    .cloned()
                    .unwrap_or_default()
            };
            for (src, rid) in c.select(cap, layers) {
                wants.push((room.clone(), src, rid));
            }
        }
        for (room, src, rid) in wants {
            self.keyframe(&room, &src, rid);
        }
    }

    /// Removes the clients whose peer connection died (ICE gone, a fatal error).
    fn reap(&mut self) {
        let dead: Vec<_> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.rtc.is_alive())
            .map(|(k, _)| k.clone())
            .collect();
        for (room, session) in dead {
            tracing::info!(room = %room, "an SFU peer connection ended");
            self.remove(&room, &session);
            (self.notify)(Notice::Closed {
                session,
                room,
                reason: "connection_lost",
            });
        }
    }

    /// Sends `active_speakers` to a room whose speakers changed, at most every `speakers_ms`.
    fn announce_speakers(&mut self) {
        let every = Duration::from_millis(self.cfg.speakers_ms);
        let now = Instant::now();
        for (id, room) in &mut self.rooms {
            if room
                .last_announce
                .is_some_and(|t| now.duration_since(t) < every)
            {
                continue;
            }
            room.spoke.retain(|_, at| now.duration_since(*at) < every);
            let users: Vec<String> = room
                .spoke
                .keys()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if users == room.announced {
                continue;
            }
            room.announced = users.clone();
            room.last_announce = Some(now);
            (self.notify)(Notice::Speakers {
                sessions: room.sessions.iter().cloned().collect(),
                room: id.clone(),
                users,
            });
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join {
                room,
                who,
                can_publish,
                reply,
            } => {
                let _ = reply.send(self.join(room, who, can_publish));
            }
            Cmd::Signal {
                room,
                session,
                data,
                reply,
            } => {
                let _ = reply.send(self.signal(&room, &session, &data));
            }
            Cmd::Leave {
                room,
                session,
                done,
            } => {
                self.remove(&room, &session);
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
            }
            Cmd::SessionClosed { session } => {
                self.remove_where(|_, s| *s == session);
            }
            Cmd::SessionsClosed { which } => {
                self.remove_where(|_, s| which(s));
            }
            Cmd::Mute {
                room,
                user,
                kind,
                muted,
                reply,
            } => {
                let _ = reply.send(Ok(self.mute(&room, &user, kind, muted)));
            }
            Cmd::SetPublisher { room, user, on } => {
                for c in self.clients.values_mut() {
                    if c.room == room && c.user == user {
                        c.can_publish = on;
                    }
                }
            }
            Cmd::Rooms { reply } => {
                let rooms = self
                    .rooms
                    .iter()
                    .map(|(id, r)| (id.clone(), r.sessions.iter().cloned().collect()))
                    .collect();
                let _ = reply.send(Ok(rooms));
            }
            Cmd::ClassEnded { room } => {
                for (_, session) in self.remove_where(|r, _| *r == room) {
                    (self.notify)(Notice::Closed {
                        session,
                        room: room.clone(),
                        reason: "class_ended",
                    });
                }
            }
            Cmd::RoomSize { room, reply } => {
                let n = self.rooms.get(&room).map_or(0, |r| r.sessions.len());
                let _ = reply.send(Ok(n));
            }
        }
    }

    /// Removes every client whose room and session match; the keys it removed.
    fn remove_where(&mut self, matches: impl Fn(&str, &str) -> bool) -> Vec<(String, String)> {
        let keys: Vec<(String, String)> = self
            .clients
            .keys()
            .filter(|(r, s)| matches(r, s))
            .cloned()
            .collect();
        for (room, session) in &keys {
            self.remove(room, session);
        }
        keys
    }

    /// A new peer connection with the codecs browsers publish, the ICE timing asked for and
    /// the SFU's host candidate.
    fn new_rtc(&self) -> Result<Rtc, SfuError> {
        // Opus, VP8 and H.264 constrained baseline (what browsers publish): every codec
        // offered costs about 400 bytes in each section of each viewer's SDP, and a viewer's
        // SDP has two sections per remote publisher.
        let mut config = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true);
        config
            .codec_config()
            .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
        let (max_rto, retransmits) = stun_timing(Duration::from_millis(self.cfg.ice_lost_ms));
        config.set_max_stun_rto(max_rto);
        config.set_max_stun_retransmits(retransmits);
        let mut rtc = config
            .set_crypto_provider(self.crypto.clone())
            .enable_bwe(
                (self.cfg.bwe_start_kbps > 0).then(|| Bitrate::kbps(self.cfg.bwe_start_kbps)),
            )
            .build(Instant::now());
        let cand = host_candidate(self.addr)
            .ok_or_else(|| SfuError::Unavailable("the SFU has no usable address".into()))?;
        rtc.add_local_candidate(cand);
        Ok(rtc)
    }

    fn join(
        &mut self,
        room: String,
        who: Member,
        can_publish: bool,
    ) -> Result<Vec<Member>, SfuError> {
        let others = |d: &Self| -> Vec<Member> {
            d.clients
                .values()
                .filter(|c| c.room == room && c.session != who.session)
                .map(|c| Member {
                    user: c.user.clone(),
                    session: c.session.clone(),
                })
                .collect()
        };
        let key = (room.clone(), who.session.clone());
        if let Some(c) = self.clients.get_mut(&key) {
            c.can_publish = can_publish;
            return Ok(others(self));
        }
        if self.clients.len() >= self.cfg.sessions_max {
            return Err(SfuError::Unavailable(format!(
                "the SFU holds {} sessions, its most",
                self.cfg.sessions_max
            )));
        }
        let size = self.rooms.get(&room).map_or(0, |r| r.sessions.len());
        if size >= self.cfg.room_max {
            return Err(SfuError::Full(format!(
                "A/V is full: the room's SFU holds {} sessions",
                self.cfg.room_max
            )));
        }
        let rtc = self.new_rtc()?;
        let mut client = Client::new(
            room.clone(),
            who.user.clone(),
            who.session.clone(),
            can_publish,
            rtc,
        );
        client.stats = self.stats.clone();
        // Tracks already published in the room reach the newcomer once it has offered.
        for c in self.clients.values().filter(|c| c.room == room) {
            for t in &c.tracks_in {
                let key = TrackKey {
                    session: c.session.clone(),
                    mid: t.mid,
                };
                client.add_out(key, c.user.clone(), t.kind);
            }
        }
        let before = others(self);
        for m in &before {
            (self.notify)(Notice::Peer {
                to: m.session.clone(),
                room: room.clone(),
                session: who.session.clone(),
                user: who.user.clone(),
                joined: true,
            });
        }
        self.rooms
            .entry(room)
            .or_default()
            .sessions
            .insert(who.session);
        self.clients.insert(key, client);
        self.sessions.store(self.clients.len(), Ordering::Release);
        Ok(before)
    }

    fn signal(
        &mut self,
        room: &str,
        session: &str,
        data: &serde_json::Value,
    ) -> Result<(), SfuError> {
        let sends_media = match studyhall_signaling::sdp::parse_payload(data) {
            Ok(studyhall_signaling::sdp::Payload::Offer(info)) => info.sends_media,
            Ok(_) => false,
            Err(e) => return Err(SfuError::BadRequest(e.to_string())),
        };
        let key = (room.to_owned(), session.to_owned());
        let c = self
            .clients
            .get_mut(&key)
            .ok_or_else(|| SfuError::Forbidden("join the room's A/V first (av_join)".into()))?;
        let reply = c.signal(data, sends_media)?;
        if let Some(data) = reply {
            (self.notify)(Notice::Signal {
                session: session.to_owned(),
                room: room.to_owned(),
                data,
            });
        }
        // Tracks that opened for this viewer want their first keyframe now, not at the next
        // round of layer selection.
        self.select_where(|k| *k == key);
        Ok(())
    }

    /// Mutes (or unmutes) `user`'s tracks of `kind` in the room; whether the user is there.
    /// Unmuted video restarts at each viewer from a keyframe, asked for at once.
    fn mute(&mut self, room: &str, user: &str, kind: TrackKind, muted: bool) -> bool {
        let kind = media_kind(kind);
        let mut found = false;
        let mut resumed = Vec::new();
        for c in self.clients.values_mut() {
            if c.room == room && c.user == user {
                found = true;
                for t in c.tracks_in.iter_mut().filter(|t| t.kind == kind) {
                    if t.muted && !muted && kind == MediaKind::Video {
                        resumed.push(TrackKey {
                            session: c.session.clone(),
                            mid: t.mid,
                        });
                    }
                    t.muted = muted;
                }
            }
        }
        if !resumed.is_empty() {
            for c in self.clients.values_mut().filter(|c| c.room == room) {
                for key in &resumed {
                    c.restart_from(key);
                }
            }
            self.select_where(|k| k.0 == room);
        }
        found
    }

    /// Closes a session's peer connection in a room: the others stop receiving its tracks
    /// (renegotiated) and hear it left.
    fn remove(&mut self, room: &str, session: &str) {
        let Some(mut gone) = self.clients.remove(&(room.to_owned(), session.to_owned())) else {
            return;
        };
        gone.rtc.disconnect();
        self.by_addr.retain(|_, k| k.0 != room || k.1 != session);
        self.sessions.store(self.clients.len(), Ordering::Release);
        for c in self.clients.values_mut().filter(|c| c.room == room) {
            c.drop_out(|k| k.session == session);
            (self.notify)(Notice::Peer {
                to: c.session.clone(),
                room: room.to_owned(),
                session: session.to_owned(),
                user: gone.user.clone(),
                joined: false,
            });
        }
        if let Some(r) = self.rooms.get_mut(room) {
            r.sessions.remove(session);
            if r.sessions.is_empty() {
                self.rooms.remove(room);
                (self.notify)(Notice::Emptied {
                    room: room.to_owned(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_counts_as_lost_after_about_the_time_asked() {
        assert_eq!(
            stun_timing(Duration::from_secs(2)),
            (Duration::from_millis(250), 8)
        );
        assert_eq!(
            stun_timing(Duration::from_secs(10)),
            (Duration::from_millis(1250), 9)
        );
        // (str0m's own default, 3 s and 9 checks, gives up after 21.5 s.)
        assert_eq!(
            stun_timing(Duration::from_secs(30)),
            (Duration::from_millis(3000), 12)
        );
    }
}
