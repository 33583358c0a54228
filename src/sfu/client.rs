//! One SFU session: its str0m `Rtc`, the tracks it publishes (`tracks_in`), the tracks of
//! others it receives (`tracks_out`) and their negotiation (the server offers sendonly m-lines
//! for other publishers' tracks, and stops them when those go). It knows nothing of other
//! sessions beyond the keys of their tracks; the driver moves media between clients. Which
//! simulcast layer a viewer gets follows its egress bandwidth estimate (`layers.rs`).

use super::layers::{DOWN_HOLD, Meter, Switch, UP_HOLD, choose};
use super::{SfuError, SfuStats, TrackKind};
use crate::protocol::{SdpKind, sdp_signal};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::CodecExtra;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::Protocol;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

/// The rate set aside for each audio track a viewer receives when its estimate is shared out
/// among its video tracks, bit/s (Opus voice as browsers send it, with packet overhead).
const AUDIO_BPS: u64 = 40_000;

/// A published track, named across the SFU by its publisher's session and its mid there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct TrackKey {
    pub session: String,
    pub mid: Mid,
}

#[derive(Debug)]
pub(super) struct TrackIn {
    pub mid: Mid,
    pub kind: MediaKind,
    /// Muted by host/ta (`av_mute`): not forwarded.
    pub muted: bool,
    /// When a keyframe was last asked for, per layer (`None`: an unlayered track).
    keyframe_asked: Vec<(Option<Rid>, Instant)>,
    /// The rates of its simulcast layers (empty for an unlayered track).
    pub meter: Meter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutState {
    ToOpen,
    Negotiating(Mid),
    Open(Mid),
    ToStop(Mid),
    NegotiatingStop(Mid),
}

#[derive(Debug)]
pub(super) struct TrackOut {
    pub source: TrackKey,
    /// The publisher's user (the stream id the viewer sees).
    pub user: String,
    pub kind: MediaKind,
    state: OutState,
    /// Video: the layer forwarded to this viewer and the one it moves to.
    switch: Switch,
}

impl TrackOut {
    fn mid(&self) -> Option<Mid> {
        match self.state {
            OutState::ToOpen => None,
            OutState::Negotiating(m)
            | OutState::Open(m)
            | OutState::ToStop(m)
            | OutState::NegotiatingStop(m) => Some(m),
        }
    }
}

/// What a client's output asks the driver to do with other clients.
#[derive(Debug)]
pub(super) enum Propagate {
    /// A new published track.
    TrackOpen(TrackKey, MediaKind),
    Media(TrackKey, Box<MediaData>),
    /// A viewer asked for a keyframe of this source track (of the layer it gets).
    Keyframe(TrackKey, Option<Rid>),
    /// This client's media path is up (DTLS done): the keyframes it waits for can reach it.
    Connected(String),
}

pub(super) struct Client {
    pub user: String,
    pub session: String,
    pub room: String,
    pub rtc: Rtc,
    pub can_publish: bool,
    /// The session's first offer was accepted: the server may offer from now on.
    negotiated: bool,
    /// Media can reach the peer (str0m's `Connected`): until then a keyframe asked for it
    /// would be lost, and would hold back (by the request limit) the one that reaches it.
    connected: bool,
    /// When the session joined the room's SFU.
    joined: Instant,
    pending: Option<SdpPendingOffer>,
    pub tracks_in: Vec<TrackIn>,
    pub tracks_out: Vec<TrackOut>,
    /// When ICE connectivity was lost (ICE `Disconnected`), until it comes back.
    ice_lost_since: Option<Instant>,
    /// The egress bandwidth estimate (TWCC, else the viewer's REMB), bit/s.
    estimate: Option<u64>,
    /// The `Rtc` was touched since its output was last drained: drive it.
    pub dirty: bool,
    /// When the `Rtc` next wants time (`Input::Timeout`).
    pub due: Instant,
    /// The SFU's counters (its own until the driver hands it the shared ones).
    pub stats: Arc<SfuStats>,
}

fn bad(m: impl Into<String>) -> SfuError {
    SfuError::BadRequest(m.into())
}

pub(super) fn media_kind(k: TrackKind) -> MediaKind {
    match k {
        TrackKind::Audio => MediaKind::Audio,
        TrackKind::Video => MediaKind::Video,
    }
}

impl Client {
    pub fn new(room: String, user: String, session: String, can_publish: bool, rtc: Rtc) -> Self {
        Self {
            user,
            session,
            room,
            rtc,
            can_publish,
            negotiated: false,
            connected: false,
            joined: Instant::now(),
            pending: None,
            tracks_in: Vec::new(),
            tracks_out: Vec::new(),
            ice_lost_since: None,
            estimate: None,
            dirty: true,
            due: Instant::now(),
            stats: Arc::default(),
        }
    }

    /// Hands the `Rtc` a datagram or the time; a fatal error ends the peer connection.
    pub fn input(&mut self, input: Input) {
        self.dirty = true;
        if self.rtc.handle_input(input).is_err() {
            self.rtc.disconnect();
        }
    }

    /// Ends the peer connection (the driver reaps it).
    pub fn close(&mut self) {
        self.dirty = true;
        self.rtc.disconnect();
    }

    /// Whether the media path has still not come up (no offer, or ICE or DTLS never
    /// completing) `wait` or longer after the session joined, by `now`.
    pub fn connect_overdue(&self, now: Instant, wait: Duration) -> bool {
        !self.connected && now.saturating_duration_since(self.joined) >= wait
    }

    /// Whether ICE connectivity has been lost for `grace` or longer by `now` (the client did
    /// not come back, nor restart ICE, in time).
    pub fn ice_lost_past(&self, now: Instant, grace: Duration) -> bool {
        self.ice_lost_since
            .is_some_and(|t| now.saturating_duration_since(t) >= grace)
    }

    /// Applies a validated `signal` payload; returns the `data` to send back (an answer).
    pub fn signal(&mut self, data: &Value, sends_media: bool) -> Result<Option<Value>, SfuError> {
        self.dirty = true;
        if let Some(sdp) = data.get("sdp") {
            let body = sdp.get("sdp").and_then(Value::as_str).unwrap_or_default();
            return match sdp.get("type").and_then(Value::as_str) {
                Some("offer") => self.offer(body, sends_media).map(Some),
                Some("answer") => self.answer(body).map(|()| None),
                _ => Err(bad("sdp.type must be offer or answer")),
            };
        }
        let line = data
            .get("candidate")
            .and_then(|c| c.get("candidate"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !line.is_empty() {
            let c = Candidate::from_sdp_string(line).map_err(|e| bad(format!("candidate: {e}")))?;
            self.rtc.add_remote_candidate(c);
        }
        Ok(None)
    }

    fn offer(&mut self, body: &str, sends_media: bool) -> Result<Value, SfuError> {
        if sends_media && !self.can_publish {
            return Err(SfuError::Forbidden(
                "only the host and people on stage may publish in a live room: send recvonly"
                    .into(),
            ));
        }
        let offer = SdpOffer::from_sdp_string(body).map_err(|e| bad(format!("offer: {e}")))?;
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| bad(format!("offer refused: {e}")))?;
        // An offer of ours in flight is void now: negotiate those tracks again.
        self.pending = None;
        for t in &mut self.tracks_out {
            match t.state {
                OutState::Negotiating(_) => t.state = OutState::ToOpen,
                OutState::NegotiatingStop(m) => t.state = OutState::ToStop(m),
                _ => {}
            }
        }
        self.negotiated = true;
        Ok(sdp_signal(SdpKind::Answer, &answer.to_sdp_string()))
    }

    fn answer(&mut self, body: &str) -> Result<(), SfuError> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| bad("no offer from the SFU is waiting for an answer"))?;
        let answer = SdpAnswer::from_sdp_string(body).map_err(|e| bad(format!("answer: {e}")))?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| bad(format!("answer refused: {e}")))?;
        for t in &mut self.tracks_out {
            if let OutState::Negotiating(m) = t.state {
                t.state = OutState::Open(m);
            }
        }
        self.tracks_out
            .retain(|t| !matches!(t.state, OutState::NegotiatingStop(_)));
        Ok(())
    }

    /// Starts receiving another publisher's track (negotiated on the next drive). A section
    /// of the same key that is still being stopped does not count: a publisher that leaves and
    /// comes back at once (a new peer connection of the same session) reuses its mids, so its
    /// new track has the key of the old one.
    pub fn add_out(&mut self, source: TrackKey, user: String, kind: MediaKind) {
        let stopping =
            |t: &TrackOut| matches!(t.state, OutState::ToStop(_) | OutState::NegotiatingStop(_));
        if !self
            .tracks_out
            .iter()
            .any(|t| t.source == source && !stopping(t))
        {
            self.tracks_out.push(TrackOut {
                source,
                user,
                kind,
                state: OutState::ToOpen,
                switch: Switch::default(),
            });
            self.dirty = true;
        }
    }

    /// Stops receiving the tracks that `gone` picks (their publisher left).
    pub fn drop_out(&mut self, gone: impl Fn(&TrackKey) -> bool) {
        self.dirty = true;
        self.tracks_out.retain_mut(|t| {
            if !gone(&t.source) {
                return true;
            }
            match t.state {
                OutState::ToOpen => false,
                OutState::Negotiating(m) | OutState::Open(m) => {
                    t.state = OutState::ToStop(m);
                    true
                }
                _ => true,
            }
        });
    }

    /// When nothing else is in flight, offers the m-lines to add and to stop; returns the
    /// offer's `data`.
    fn negotiate(&mut self) -> Option<Value> {
        if !self.negotiated || self.pending.is_some() {
            return None;
        }
        let mut change = self.rtc.sdp_api();
        for t in &mut self.tracks_out {
            match t.state {
                OutState::ToOpen => {
                    let mid = change.add_media(
                        t.kind,
                        Direction::SendOnly,
                        Some(t.user.clone()),
                        None,
                        None,
                    );
                    t.state = OutState::Negotiating(mid);
                }
                OutState::ToStop(mid) => {
                    change.stop_media(mid);
                    t.state = OutState::NegotiatingStop(mid);
                }
                _ => {}
            }
        }
        if !change.has_changes() {
            return None;
        }
        let (offer, pending) = change.apply()?;
        self.pending = Some(pending);
        Some(sdp_signal(SdpKind::Offer, &offer.to_sdp_string()))
    }

    /// Runs the client's output until it asks for time: sends datagrams, collects what other
    /// clients must hear, and returns an offer to send if one was made and the next deadline.
    pub fn drive(
        &mut self,
        socket: &tokio::net::UdpSocket,
        out: &mut Vec<Propagate>,
        offers: &mut Vec<Value>,
    ) -> Instant {
        loop {
            if !self.rtc.is_alive() {
                return Instant::now();
            }
            if let Some(offer) = self.negotiate() {
                offers.push(offer);
            }
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.dirty = false;
                    self.due = t;
                    return t;
                }
                Ok(Output::Transmit(t)) => {
                    // UDP: a datagram the kernel cannot take now is lost, as on the wire.
                    let _ = socket.try_send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => self.event(e, out),
                Err(e) => {
                    tracing::debug!(error = %e, "SFU peer failed");
                    self.rtc.disconnect();
                }
            }
        }
    }

    fn event(&mut self, e: Event, out: &mut Vec<Propagate>) {
        match e {
            // Lost: kept for the grace (the driver closes it after), so that a client whose
            // network blipped, or that restarts ICE, keeps its session and tracks.
            Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                if self.ice_lost_since.is_none() =>
            {
                self.stats.ice_lost.fetch_add(1, Relaxed);
                self.ice_lost_since = Some(Instant::now());
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {}
            Event::IceConnectionStateChange(_) if self.ice_lost_since.is_some() => {
                self.stats.ice_recovered.fetch_add(1, Relaxed);
                self.ice_lost_since = None;
            }
            Event::Connected => {
                self.connected = true;
                out.push(Propagate::Connected(self.session.clone()));
            }
            Event::MediaAdded(m)
                if matches!(m.direction, Direction::RecvOnly | Direction::SendRecv) =>
            {
                self.tracks_in.push(TrackIn {
                    mid: m.mid,
                    kind: m.kind,
                    muted: false,
                    keyframe_asked: Vec::new(),
                    meter: Meter::new(Instant::now()),
                });
                out.push(Propagate::TrackOpen(self.key(m.mid), m.kind));
            }
            Event::EgressBitrateEstimate(
                BweKind::Twcc { estimate, .. } | BweKind::Remb { estimate, .. },
            ) => {
                self.estimate = Some(estimate.as_u64());
            }
            Event::MediaData(d) => {
                if !d.contiguous {
                    self.request_keyframe(d.mid, d.rid, Duration::ZERO);
                }
                out.push(Propagate::Media(self.key(d.mid), Box::new(d)));
            }
            Event::KeyframeRequest(req) => {
                if let Some(t) = self.tracks_out.iter().find(|t| t.mid() == Some(req.mid)) {
                    out.push(Propagate::Keyframe(t.source.clone(), t.switch.layer()));
                }
            }
            _ => {}
        }
    }

    fn key(&self, mid: Mid) -> TrackKey {
        TrackKey {
            session: self.session.clone(),
            mid,
        }
    }

    /// Asks this publisher for a keyframe of `mid` (of its layer `rid`, if layered), at most
    /// once per `every` for each layer. Held back by that limit, returns when it may ask.
    pub fn request_keyframe(
        &mut self,
        mid: Mid,
        rid: Option<Rid>,
        every: Duration,
    ) -> Option<Instant> {
        let t = self.tracks_in.iter_mut().find(|t| t.mid == mid)?;
        if t.kind != MediaKind::Video {
            return None;
        }
        let asked = t.keyframe_asked.iter().position(|(r, _)| *r == rid);
        if let Some(i) = asked
            && t.keyframe_asked[i].1.elapsed() < every
        {
            return Some(t.keyframe_asked[i].1 + every);
        }
        self.dirty = true;
        if let Some(mut w) = self.rtc.writer(mid)
            && w.request_keyframe(rid, KeyframeRequestKind::Pli).is_ok()
        {
            self.stats.keyframe_requests.fetch_add(1, Relaxed);
            match asked {
                Some(i) => t.keyframe_asked[i].1 = Instant::now(),
                None => t.keyframe_asked.push((rid, Instant::now())),
            }
        }
        None
    }

    /// This viewer's copy of `source` starts again from a keyframe (its forwarding stopped
    /// meanwhile: what comes next cannot be decoded without one).
    pub fn restart_from(&mut self, source: &TrackKey) {
        for t in self.tracks_out.iter_mut().filter(|t| &t.source == source) {
            t.switch.restart();
        }
    }

    /// Whether this publisher's track `mid` may be forwarded now.
    pub fn forwards(&self, mid: Mid) -> bool {
        self.can_publish && self.tracks_in.iter().any(|t| t.mid == mid && !t.muted)
    }

    /// Writes another publisher's media on the matching open track: audio as it comes, video
    /// from a keyframe on and only the layer this viewer gets (`layers.rs`).
    pub fn write(&mut self, source: &TrackKey, d: &MediaData) {
        // Before the media path is up a frame would only queue and reach the peer late; above
        // all a keyframe must not start the stream there (the peer would get what follows it,
        // undecodable, and wait on the keyframe request limit for another).
        if !self.connected {
            return;
        }
        let Some(t) = self
            .tracks_out
            .iter_mut()
            .find(|t| &t.source == source && matches!(t.state, OutState::Open(_)))
        else {
            return;
        };
        let Some(mid) = t.mid() else {
            return;
        };
        let time = if t.kind == MediaKind::Video {
            let keyframe = (!matches!(d.codec_extra, CodecExtra::None)).then(|| d.is_keyframe());
            let before = t.switch.current();
            let admitted = t.switch.admit(d.rid, keyframe, d.time, d.network_time);
            if t.switch.current() != before && t.switch.current().is_some() {
                self.stats.layer_switches.fetch_add(1, Relaxed);
            }
            match admitted {
                Some(time) => time,
                None => return,
            }
        } else {
            d.time
        };
        self.dirty = true;
        let Some(w) = self.rtc.writer(mid) else {
            return;
        };
        let Some(pt) = w.match_params(d.params) else {
            return;
        };
        match w.write(pt, d.network_time, time, d.data.clone()) {
            Ok(()) => {
                self.stats.frames_forwarded.fetch_add(1, Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "SFU write failed");
                self.rtc.disconnect();
            }
        }
    }

    /// Chooses the layer of each video track this viewer receives from its bandwidth estimate
    /// capped at `cap` bit/s (shared out evenly, after the audio), given the active layers of each source (`layers`;
    /// empty for an unlayered one), and tells the estimator what would carry the fastest of
    /// all. Returns the keyframes the viewer waits for: (source, layer), none before its media
    /// path is up.
    pub fn select(
        &mut self,
        cap: Option<u64>,
        layers: impl Fn(&TrackKey) -> Vec<(Rid, u64)>,
    ) -> Vec<(TrackKey, Option<Rid>)> {
        let open = |t: &&mut TrackOut| matches!(t.state, OutState::Open(_));
        let audio = self
            .tracks_out
            .iter_mut()
            .filter(open)
            .filter(|t| t.kind == MediaKind::Audio)
            .count() as u64;
        let video: Vec<&mut TrackOut> = self
            .tracks_out
            .iter_mut()
            .filter(open)
            .filter(|t| t.kind == MediaKind::Video)
            .collect();
        let budget = match (self.estimate, cap) {
            (Some(e), Some(c)) => Some(e.min(c)),
            (e, c) => e.or(c),
        };
        let budget =
            budget.map(|e| e.saturating_sub(audio * AUDIO_BPS) / (video.len().max(1) as u64));
        let mut desired = audio * AUDIO_BPS;
        let mut wants = Vec::new();
        let now = Instant::now();
        for t in video {
            let l = layers(&t.source);
            desired += l.last().map_or(0, |&(_, bps)| bps);
            if !l.is_empty() {
                let want = choose(&l, budget, t.switch.current());
                let rank = |r: Option<Rid>| r.and_then(|r| l.iter().position(|x| x.0 == r));
                let hold = if rank(want) > rank(t.switch.layer()) {
                    UP_HOLD
                } else {
                    DOWN_HOLD
                };
                let before = t.switch.layer();
                t.switch.propose(want, now, hold);
                if t.switch.layer() != before {
                    tracing::debug!(estimate = ?self.estimate, layers = ?l, from = ?before, to = ?t.switch.layer(), "SFU layer switch");
                }
            }
            if !self.connected {
                continue;
            }
            if let Some(rid) = t.switch.waits_for(!l.is_empty()) {
                wants.push((t.source.clone(), rid));
            }
        }
        if desired > 0 {
            self.dirty = true;
            self.rtc.bwe().set_desired_bitrate(Bitrate::bps(desired));
        }
        wants
    }
}

/// The SFU's own host candidate.
pub(super) fn host_candidate(addr: SocketAddr) -> Option<Candidate> {
    Candidate::host(addr, Protocol::Udp).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(session: &str) -> Client {
        Client::new(
            "r".into(),
            "u".into(),
            session.into(),
            true,
            Rtc::new(Instant::now()),
        )
    }

    fn key() -> TrackKey {
        TrackKey {
            session: "s1".into(),
            mid: Mid::from("0"),
        }
    }

    #[test]
    fn a_track_back_under_the_key_of_one_being_stopped_is_opened_again() {
        let mut c = client("s2");
        c.add_out(key(), "pub".into(), MediaKind::Video);
        c.add_out(key(), "pub".into(), MediaKind::Video);
        assert_eq!(c.tracks_out.len(), 1, "the same track is added once");
        // Its publisher left: the section is to be stopped...
        c.tracks_out[0].state = OutState::Open(Mid::from("a1"));
        c.drop_out(|k| k == &key());
        assert_eq!(c.tracks_out[0].state, OutState::ToStop(Mid::from("a1")));
        // ...and came back with the same session and mid before that was negotiated.
        c.add_out(key(), "pub".into(), MediaKind::Video);
        assert_eq!(c.tracks_out.len(), 2);
        assert_eq!(c.tracks_out[1].state, OutState::ToOpen);
        // The same while the stop is in flight.
        c.tracks_out.truncate(1);
        c.tracks_out[0].state = OutState::NegotiatingStop(Mid::from("a1"));
        c.add_out(key(), "pub".into(), MediaKind::Video);
        assert_eq!(c.tracks_out.len(), 2);
    }

    #[test]
    fn a_viewer_waits_for_no_keyframe_before_its_media_path_is_up() {
        let mut c = client("s2");
        c.add_out(key(), "pub".into(), MediaKind::Video);
        c.tracks_out[0].state = OutState::Open(Mid::from("a1"));
        assert!(
            c.select(None, |_| Vec::new()).is_empty(),
            "a keyframe asked before DTLS is up would be lost"
        );
        let mut out = Vec::new();
        c.event(Event::Connected, &mut out);
        assert!(matches!(&out[..], [Propagate::Connected(s)] if s == "s2"));
        assert_eq!(c.select(None, |_| Vec::new()), vec![(key(), None)]);
    }

    #[test]
    fn a_keyframe_request_held_back_by_the_limit_says_when_it_may_go() {
        let mut c = client("s1");
        let asked = Instant::now();
        c.tracks_in.push(TrackIn {
            mid: Mid::from("0"),
            kind: MediaKind::Video,
            muted: false,
            keyframe_asked: vec![(None, asked)],
            meter: Meter::new(asked),
        });
        let every = Duration::from_secs(60);
        assert_eq!(
            c.request_keyframe(Mid::from("0"), None, every),
            Some(asked + every)
        );
        // Another layer has not been asked for: nothing holds it back.
        assert_eq!(
            c.request_keyframe(Mid::from("0"), Some(Rid::from("h")), every),
            None
        );
    }

    #[test]
    fn a_session_whose_media_path_never_comes_up_is_overdue_after_the_wait() {
        let mut c = client("s1");
        let wait = Duration::from_secs(30);
        let joined = c.joined;
        assert!(!c.connect_overdue(joined + wait / 2, wait));
        assert!(c.connect_overdue(joined + wait, wait));
        c.event(Event::Connected, &mut Vec::new());
        assert!(
            !c.connect_overdue(joined + wait * 2, wait),
            "connected: never overdue"
        );
    }

    #[test]
    fn lost_ice_is_kept_for_the_grace_and_forgotten_when_it_comes_back() {
        let mut c = client("s1");
        let grace = Duration::from_millis(300);
        let mut out = Vec::new();
        assert!(!c.ice_lost_past(Instant::now() + grace, grace));
        c.event(
            Event::IceConnectionStateChange(IceConnectionState::Disconnected),
            &mut out,
        );
        let lost = Instant::now();
        assert!(c.rtc.is_alive(), "not closed at once");
        assert!(!c.ice_lost_past(lost, grace), "within the grace");
        assert!(c.ice_lost_past(lost + grace * 2, grace), "past the grace");
        // A second `Disconnected` does not restart the clock.
        c.event(
            Event::IceConnectionStateChange(IceConnectionState::Disconnected),
            &mut out,
        );
        assert!(c.ice_lost_past(lost + grace * 2, grace));
        // Back (or restarted): the loss is forgotten.
        c.event(
            Event::IceConnectionStateChange(IceConnectionState::Checking),
            &mut out,
        );
        assert!(!c.ice_lost_past(lost + grace * 2, grace));
        assert!(out.is_empty());
        let counted = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        assert_eq!(counted(&c.stats.ice_lost), 1);
        assert_eq!(counted(&c.stats.ice_recovered), 1);
    }
}
