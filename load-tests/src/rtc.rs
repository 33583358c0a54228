//! A WebRTC media peer for the SFU benchmark: one str0m `Rtc` driven by its own tokio UDP
//! socket on loopback, publishing (pre-generated Opus and VP8 frames, no encoding; the VP8 as
//! simulcast layers `l`, `m`, `h` when asked) and receiving. It answers the remote side's
//! offers, asks for a keyframe (PLI) of every video track it receives until that track's first
//! keyframe arrives, answers keyframe requests with a keyframe, and adds what it receives to
//! its [`Counters`]. It knows nothing of the signalling transport (studyhall's WebSocket or
//! Janus's HTTP API): SDP comes and goes on channels as [`Sdp`].

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Mid, Rid,
    Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Largest datagram read.
const DATAGRAM_MAX: usize = 2000;
/// Datagrams read in one turn before the output is drained again.
const READ_BURST: usize = 32;
/// Least time between two keyframe requests for a video track still waiting for its first.
const PLI_EVERY: Duration = Duration::from_millis(500);
/// Audio frame duration (Opus, 48 kHz clock).
const AUDIO_FRAME: Duration = Duration::from_millis(20);
/// Video frame interval (30 fps, 90 kHz clock).
const VIDEO_FRAME: Duration = Duration::from_nanos(33_333_333);
/// A publisher this far behind its media clock skips ahead instead of bursting.
const MAX_LAG: Duration = Duration::from_millis(200);
/// How often str0m reports its receive statistics (NACKs and PLIs sent).
const STATS_EVERY: Duration = Duration::from_millis(500);
/// Simulcast layers: rid and the divisor of the full bitrate (1/1, 1/4, 1/16). Listed from
/// the widest down, the order Janus reads as its substreams 2, 1, 0 (studyhall measures each
/// layer's rate and ignores the order).
pub const LAYERS: [(&str, u64); 3] = [("h", 1), ("m", 4), ("l", 16)];

/// An SDP on its way to or from the remote side.
#[derive(Debug, Clone)]
pub enum Sdp {
    Offer(String),
    Answer(String),
}

/// What one peer received and did, summed by the scenario over its viewers.
#[derive(Debug, Default)]
pub struct Counters {
    /// RTP packets of the frames received (from str0m's sequence ranges).
    pub packets: AtomicU64,
    /// Packets the sequence numbers say were sent (first to highest, per track).
    pub expected: AtomicU64,
    pub audio_packets: AtomicU64,
    pub video_packets: AtomicU64,
    /// UDP bytes received.
    pub bytes: AtomicU64,
    /// NACKs and PLIs this peer sent (str0m's receive statistics).
    pub nacks: AtomicU64,
    pub plis: AtomicU64,
    /// Video tracks received, and those of them that got a keyframe.
    pub video_tracks: AtomicU64,
    pub keyed_tracks: AtomicU64,
    /// Audio tracks received.
    pub audio_tracks: AtomicU64,
    /// Packets this peer sent as a publisher on its audio and its widest video layer: what
    /// a viewer that gets the full stream of this publisher receives.
    pub full_out: AtomicU64,
    /// Media frames a publisher skipped because it fell behind its clock (a busy generator).
    pub skipped: AtomicU64,
    /// Keyframe requests this peer got as a publisher, and keyframes it sent.
    pub requests_in: AtomicU64,
    pub keyframes_out: AtomicU64,
    /// ICE and DTLS are up.
    pub connected: AtomicBool,
    /// The peer connection ended (an error or ICE gone); `error` says why.
    pub dead: AtomicBool,
    pub error: Mutex<Option<String>>,
    /// Milliseconds from a video track opening to its first keyframe.
    pub first_keyframe_ms: Mutex<Vec<f64>>,
}

impl Counters {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    fn add(v: &AtomicU64, n: u64) {
        v.fetch_add(n, Ordering::Relaxed);
    }

    pub fn fail(&self, why: String) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.dead.store(true, Ordering::Release);
    }

    pub fn why(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A video layer's frames: a keyframe and a delta frame, sent in turn.
#[derive(Debug)]
struct Layer {
    rid: Option<Rid>,
    key: Arc<[u8]>,
    delta: Arc<[u8]>,
}

/// What a publisher sends: pre-generated frames, shared by every publisher of a run.
#[derive(Debug)]
pub struct MediaPlan {
    /// Opus frames of 80 to 120 bytes, sent in turn.
    audio: Vec<Arc<[u8]>>,
    /// One per simulcast layer, or one without a rid.
    video: Vec<Layer>,
    keyframe_every: Duration,
}

impl MediaPlan {
    /// Frames for a VP8 track of `kbps` (its widest layer), three layers when `simulcast`.
    pub fn new(kbps: u64, simulcast: bool, keyframe_every: Duration) -> Self {
        let audio = (0..16u8)
            .map(|i| opus_frame(80 + usize::from(i) * 40 / 15, i))
            .collect();
        let layers: Vec<(Option<Rid>, u64)> = if simulcast {
            LAYERS
                .iter()
                .map(|(rid, div)| (Some(Rid::from(*rid)), *div))
                .collect()
        } else {
            vec![(None, 1)]
        };
        let video = layers
            .into_iter()
            .map(|(rid, div)| {
                // Bytes per frame at 30 fps; a keyframe is four frames' worth.
                let per_frame = (kbps * 1000 / div / 8 / 30).max(40) as usize;
                let (w, h) = (1280 / div as u16, 720 / div as u16);
                Layer {
                    rid,
                    key: vp8_frame(true, per_frame * 4, w, h),
                    delta: vp8_frame(false, per_frame, w, h),
                }
            })
            .collect();
        Self {
            audio,
            video,
            keyframe_every,
        }
    }

    pub fn simulcast(&self) -> bool {
        self.video.len() > 1
    }
}

/// An Opus packet: a TOC byte (CELT fullband, 20 ms, one frame) and filler.
fn opus_frame(len: usize, seed: u8) -> Arc<[u8]> {
    let mut f = vec![seed; len.max(2)];
    f[0] = 0xfc;
    f.into()
}

/// A VP8 frame of `len` bytes: the 3-byte frame tag (bit 0 clear on keyframes, version 0,
/// shown, first partition size) and, on keyframes, the start code 0x9d 0x01 0x2a and the
/// dimensions, then filler. Enough for a depacketizer to tell keyframes from delta frames.
pub fn vp8_frame(key: bool, len: usize, width: u16, height: u16) -> Arc<[u8]> {
    let len = len.max(16);
    let first_part = (len as u32 - 3).min((1 << 19) - 1);
    let tag = u32::from(!key) | (1 << 4) | (first_part << 5);
    let mut f = vec![0x5a; len];
    f[..3].copy_from_slice(&tag.to_le_bytes()[..3]);
    if key {
        f[3..6].copy_from_slice(&[0x9d, 0x01, 0x2a]);
        f[6..8].copy_from_slice(&(width & 0x3fff).to_le_bytes());
        f[8..10].copy_from_slice(&(height & 0x3fff).to_le_bytes());
    }
    f.into()
}

/// How a peer starts: it offers its sections first (studyhall, a Janus publisher), or waits
/// for the remote side's offer (a Janus subscriber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Offer sendonly audio and video (a publisher; needs a [`MediaPlan`]).
    Publish,
    /// Offer recvonly audio and video (a viewer that speaks first).
    Watch,
    /// Offer nothing: answer the remote side's offer.
    Answer,
}

/// A running peer: its task ends when the handle drops.
pub struct PeerHandle {
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn crypto() -> Arc<str0m::crypto::CryptoProvider> {
    static CRYPTO: OnceLock<Arc<str0m::crypto::CryptoProvider>> = OnceLock::new();
    CRYPTO
        .get_or_init(|| Arc::new(str0m::crypto::from_feature_flags()))
        .clone()
}

/// Starts a peer on a fresh UDP socket on 127.0.0.1: its first offer (unless `Answer`) goes
/// out on `out`, remote SDP comes in on `sdp_in`.
pub async fn start(
    how: Start,
    plan: Option<Arc<MediaPlan>>,
    out: UnboundedSender<Sdp>,
    sdp_in: UnboundedReceiver<Sdp>,
) -> Result<PeerHandle> {
    let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = socket.local_addr()?;
    let mut rtc = Rtc::builder()
        .set_crypto_provider(crypto())
        .set_stats_interval(Some(STATS_EVERY))
        .build(Instant::now());
    let cand = Candidate::host(addr, Protocol::Udp).context("host candidate")?;
    rtc.add_local_candidate(cand);
    let mut peer = Peer {
        rtc,
        socket,
        addr,
        out,
        plan,
        pending: None,
        tracks: HashMap::new(),
        sending: Vec::new(),
        stats: HashMap::new(),
        egress: HashMap::new(),
        c: Arc::new(Counters::default()),
        media: None,
    };
    match how {
        Start::Publish => {
            let Some(plan) = peer.plan.clone() else {
                bail!("a publisher needs media");
            };
            peer.offer(|c| {
                let audio = c.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
                let sim = plan.simulcast().then(|| {
                    let mut s = Simulcast::new();
                    for (rid, _) in LAYERS {
                        s.add_send_layer(SimulcastLayer::new(rid));
                    }
                    s
                });
                let video = c.add_media(MediaKind::Video, Direction::SendOnly, None, None, sim);
                vec![audio, video]
            })?;
        }
        Start::Watch => {
            peer.offer(|c| {
                for kind in [MediaKind::Audio, MediaKind::Video] {
                    c.add_media(kind, Direction::RecvOnly, None, None, None);
                }
                Vec::new()
            })?;
        }
        Start::Answer => {}
    }
    let counters = peer.c.clone();
    let task = tokio::spawn(peer.run(sdp_in));
    Ok(PeerHandle { counters, task })
}

/// A track this peer receives.
struct TrackRx {
    kind: MediaKind,
    opened: Instant,
    keyed: bool,
    last_pli: Option<Instant>,
    /// Sequence numbers: the first seen and the highest so far.
    first_seq: Option<u64>,
    max_seq: u64,
}

/// Per-(mid, rid) cumulative str0m receive statistics last seen: (nacks, plis).
type StatsKey = (Mid, Option<Rid>);

/// The publisher's media clock.
struct Clock {
    start: Instant,
    audio_n: u64,
    video_n: u64,
    last_key: Vec<Instant>,
    /// Layers owed a keyframe (asked for by the remote side).
    want_key: Vec<bool>,
}

struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
    out: UnboundedSender<Sdp>,
    plan: Option<Arc<MediaPlan>>,
    pending: Option<SdpPendingOffer>,
    tracks: HashMap<Mid, TrackRx>,
    /// Our own sending mids (audio, video), once negotiated.
    sending: Vec<Mid>,
    stats: HashMap<StatsKey, (u64, u64)>,
    /// Per-(mid, rid) packets sent, as str0m last reported them.
    egress: HashMap<StatsKey, u64>,
    c: Arc<Counters>,
    media: Option<Clock>,
}

impl Peer {
    fn offer(
        &mut self,
        add: impl FnOnce(&mut str0m::change::SdpApi<'_>) -> Vec<Mid>,
    ) -> Result<()> {
        let mut change = self.rtc.sdp_api();
        let mids = add(&mut change);
        let (offer, pending) = change.apply().context("nothing to offer")?;
        self.pending = Some(pending);
        self.sending = mids;
        self.out
            .send(Sdp::Offer(offer.to_sdp_string()))
            .context("signalling gone")?;
        Ok(())
    }

    async fn run(mut self, mut sdp_in: UnboundedReceiver<Sdp>) {
        if let Err(e) = self.turns(&mut sdp_in).await {
            self.c.fail(format!("{e:#}"));
        }
        self.rtc.disconnect();
    }

    async fn turns(&mut self, sdp_in: &mut UnboundedReceiver<Sdp>) -> Result<()> {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let due = self.drain()?;
            let next = self.next_media().map_or(due, |m| m.min(due));
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
            tokio::select! {
                got = self.socket.recv_from(&mut buf) => {
                    let (n, from) = got?;
                    self.input(&buf[..n], from)?;
                    for _ in 0..READ_BURST {
                        match self.socket.try_recv_from(&mut buf) {
                            Ok((n, from)) => self.input(&buf[..n], from)?,
                            Err(_) => break,
                        }
                    }
                }
                sdp = sdp_in.recv() => match sdp {
                    Some(sdp) => self.remote(sdp)?,
                    None => return Ok(()),
                },
                _ = sleep => {}
            }
            let now = Instant::now();
            self.rtc.handle_input(Input::Timeout(now))?;
            self.send_media(now)?;
            self.ask_keyframes(now);
        }
    }

    fn input(&mut self, data: &[u8], source: SocketAddr) -> Result<()> {
        Counters::add(&self.c.bytes, data.len() as u64);
        let Ok(datagram) = Receive::new(Protocol::Udp, source, self.addr, data) else {
            return Ok(());
        };
        let input = Input::Receive(Instant::now(), datagram);
        if self.rtc.accepts(&input) {
            self.rtc.handle_input(input)?;
        }
        Ok(())
    }

    fn remote(&mut self, sdp: Sdp) -> Result<()> {
        match sdp {
            Sdp::Offer(s) => {
                // Impolite: an offer that meets ours is dropped (the remote side offers
                // again once it has answered ours).
                if self.pending.is_some() {
                    return Ok(());
                }
                let offer = SdpOffer::from_sdp_string(&s).context("remote offer")?;
                let answer = self.rtc.sdp_api().accept_offer(offer)?;
                self.out
                    .send(Sdp::Answer(answer.to_sdp_string()))
                    .context("signalling gone")?;
            }
            Sdp::Answer(s) => {
                let Some(pending) = self.pending.take() else {
                    return Ok(());
                };
                let answer = SdpAnswer::from_sdp_string(&s).context("remote answer")?;
                self.rtc.sdp_api().accept_answer(pending, answer)?;
            }
        }
        Ok(())
    }

    /// Runs the output until str0m wants time: sends datagrams, handles events; returns when
    /// it next wants time.
    fn drain(&mut self) -> Result<Instant> {
        loop {
            if !self.rtc.is_alive() {
                bail!("peer connection closed");
            }
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(e) => self.event(e)?,
            }
        }
    }

    fn event(&mut self, e: Event) -> Result<()> {
        match e {
            Event::Connected => {
                self.c.connected.store(true, Ordering::Release);
                if let Some(plan) = &self.plan {
                    let now = Instant::now();
                    let layers = plan.video.len();
                    self.media = Some(Clock {
                        start: now,
                        audio_n: 0,
                        video_n: 0,
                        last_key: vec![now; layers],
                        want_key: vec![true; layers],
                    });
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                bail!("ICE disconnected");
            }
            Event::MediaAdded(m)
                if matches!(m.direction, Direction::RecvOnly | Direction::SendRecv) =>
            {
                self.tracks.insert(
                    m.mid,
                    TrackRx {
                        kind: m.kind,
                        opened: Instant::now(),
                        keyed: false,
                        last_pli: None,
                        first_seq: None,
                        max_seq: 0,
                    },
                );
                match m.kind {
                    MediaKind::Video => Counters::add(&self.c.video_tracks, 1),
                    MediaKind::Audio => Counters::add(&self.c.audio_tracks, 1),
                }
            }
            Event::MediaData(d) => self.received(&d),
            Event::KeyframeRequest(req) => {
                Counters::add(&self.c.requests_in, 1);
                if let (Some(plan), Some(clock)) = (&self.plan, &mut self.media) {
                    for (i, layer) in plan.video.iter().enumerate() {
                        if req.rid.is_none() || layer.rid == req.rid {
                            clock.want_key[i] = true;
                        }
                    }
                }
            }
            Event::MediaEgressStats(s) => {
                let widest = s.rid.is_none() || s.rid == Some(Rid::from(LAYERS[0].0));
                if widest && self.sending.contains(&s.mid) {
                    let last = self.egress.entry((s.mid, s.rid)).or_default();
                    Counters::add(&self.c.full_out, s.packets.saturating_sub(*last));
                    *last = s.packets.max(*last);
                }
            }
            Event::MediaIngressStats(s) => {
                let last = self.stats.entry((s.mid, s.rid)).or_default();
                Counters::add(&self.c.nacks, s.nacks.saturating_sub(last.0));
                Counters::add(&self.c.plis, s.plis.saturating_sub(last.1));
                *last = (s.nacks.max(last.0), s.plis.max(last.1));
            }
            _ => {}
        }
        Ok(())
    }

    fn received(&mut self, d: &MediaData) {
        let Some(t) = self.tracks.get_mut(&d.mid) else {
            return;
        };
        let (lo, hi) = (**d.seq_range.start(), **d.seq_range.end());
        let n = hi.saturating_sub(lo) + 1;
        match t.first_seq {
            None => {
                t.first_seq = Some(lo);
                t.max_seq = hi;
                Counters::add(&self.c.expected, n);
            }
            Some(_) if hi > t.max_seq => {
                Counters::add(&self.c.expected, hi - t.max_seq);
                t.max_seq = hi;
            }
            Some(_) => {}
        }
        Counters::add(&self.c.packets, n);
        match t.kind {
            MediaKind::Audio => Counters::add(&self.c.audio_packets, n),
            MediaKind::Video => {
                Counters::add(&self.c.video_packets, n);
                if !t.keyed && d.is_keyframe() {
                    t.keyed = true;
                    Counters::add(&self.c.keyed_tracks, 1);
                    let ms = t.opened.elapsed().as_secs_f64() * 1000.0;
                    self.c
                        .first_keyframe_ms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ms);
                }
            }
        }
    }

    /// Video tracks still waiting for their first keyframe ask for one (PLI) now and then.
    fn ask_keyframes(&mut self, now: Instant) {
        for (mid, t) in &mut self.tracks {
            if t.kind != MediaKind::Video || t.keyed {
                continue;
            }
            if t.last_pli
                .is_some_and(|l| now.duration_since(l) < PLI_EVERY)
            {
                continue;
            }
            if let Some(mut w) = self.rtc.writer(*mid)
                && w.request_keyframe(None, KeyframeRequestKind::Pli).is_ok()
            {
                t.last_pli = Some(now);
            }
        }
    }

    /// When the publisher's next frame is due.
    fn next_media(&self) -> Option<Instant> {
        let m = self.media.as_ref()?;
        let a = m.start + AUDIO_FRAME * m.audio_n as u32;
        let v = m.start + VIDEO_FRAME * m.video_n as u32;
        Some(a.min(v))
    }

    /// Writes every audio and video frame that is due.
    fn send_media(&mut self, now: Instant) -> Result<()> {
        let (Some(plan), Some(m)) = (self.plan.clone(), self.media.as_mut()) else {
            return Ok(());
        };
        let [audio_mid, video_mid] = self.sending[..] else {
            return Ok(());
        };
        if now.duration_since(m.start + AUDIO_FRAME * m.audio_n as u32) > MAX_LAG {
            let since = now.duration_since(m.start).as_nanos();
            let (audio_n, video_n) = (
                (since / AUDIO_FRAME.as_nanos()) as u64,
                (since / VIDEO_FRAME.as_nanos()) as u64,
            );
            let skipped = audio_n.saturating_sub(m.audio_n) + video_n.saturating_sub(m.video_n);
            Counters::add(&self.c.skipped, skipped);
            (m.audio_n, m.video_n) = (audio_n, video_n);
        }
        while m.start + AUDIO_FRAME * m.audio_n as u32 <= now {
            let frame = plan.audio[(m.audio_n % plan.audio.len() as u64) as usize].clone();
            let time = MediaTime::new(m.audio_n * 960, Frequency::FORTY_EIGHT_KHZ);
            if let Some(w) = self.rtc.writer(audio_mid)
                && let Some(pt) = pt_of(&w, Codec::Opus)
            {
                w.write(pt, now, time, frame)?;
            }
            m.audio_n += 1;
        }
        while m.start + VIDEO_FRAME * m.video_n as u32 <= now {
            let time = MediaTime::new(m.video_n * 3000, Frequency::NINETY_KHZ);
            for (i, layer) in plan.video.iter().enumerate() {
                let periodic = now.duration_since(m.last_key[i]) >= plan.keyframe_every;
                let is_key = m.want_key[i] || periodic;
                if is_key {
                    m.want_key[i] = false;
                    m.last_key[i] = now;
                    Counters::add(&self.c.keyframes_out, 1);
                }
                let frame = if is_key {
                    layer.key.clone()
                } else {
                    layer.delta.clone()
                };
                let Some(mut w) = self.rtc.writer(video_mid) else {
                    continue;
                };
                let Some(pt) = pt_of(&w, Codec::Vp8) else {
                    continue;
                };
                if let Some(rid) = layer.rid {
                    w = w.rid(rid);
                }
                w.write(pt, now, time, frame)?;
            }
            m.video_n += 1;
        }
        Ok(())
    }
}

/// The negotiated payload type of `codec` on a writer's media.
fn pt_of(w: &str0m::media::Writer<'_>, codec: Codec) -> Option<str0m::media::Pt> {
    w.payload_params()
        .find(|p| p.spec().codec == codec)
        .map(|p| p.pt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_frames_carry_the_keyframe_bit_and_start_code() {
        let k = vp8_frame(true, 100, 320, 180);
        assert_eq!(k.len(), 100);
        assert_eq!(k[0] & 1, 0, "P bit clear on a keyframe");
        assert_eq!(&k[3..6], &[0x9d, 0x01, 0x2a]);
        assert_eq!(u16::from_le_bytes([k[6], k[7]]), 320);
        assert_eq!(u16::from_le_bytes([k[8], k[9]]), 180);
        let d = vp8_frame(false, 50, 320, 180);
        assert_eq!(d[0] & 1, 1, "P bit set on a delta frame");
        assert_ne!(&d[3..6], &[0x9d, 0x01, 0x2a]);
        // Wrapped in a one-byte RTP payload descriptor (S=1, PID=0), str0m sees a keyframe.
        let mut rtp = vec![0x10];
        rtp.extend_from_slice(&k);
        assert!(str0m::format::detect_vp8_keyframe(&rtp));
        let mut rtp = vec![0x10];
        rtp.extend_from_slice(&d);
        assert!(!str0m::format::detect_vp8_keyframe(&rtp));
    }

    #[test]
    fn simulcast_layers_scale_the_bitrate() {
        let plan = MediaPlan::new(480, true, Duration::from_secs(3));
        assert!(plan.simulcast());
        let sizes: Vec<usize> = plan.video.iter().map(|l| l.delta.len()).collect();
        assert_eq!(sizes, vec![2000, 500, 125]);
        let single = MediaPlan::new(480, false, Duration::from_secs(3));
        assert_eq!(single.video.len(), 1);
        assert!(plan.audio.iter().all(|a| (80..=120).contains(&a.len())));
    }
}
