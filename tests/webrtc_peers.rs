//! Two real WebRTC stacks (webrtc-rs 0.21) call each other through the running server: the
//! tutor `call`s, the student `call_accept`s, the offer, answer and trickled ICE candidates go
//! only through `signal` relays, both peers reach `connected`, a data-channel message goes each
//! way and RTP packets of an Opus track flow in both directions. Then the SFU: three peers
//! whose only peer is the server (`signal {room, to:"sfu"}`) publish Opus and receive each
//! other's tracks through it; `av_mute` stops one track and `av_unmute` brings it back, and
//! leaving tears the peers down.

#[path = "integration/common.rs"]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use studyhall::protocol::{PlatformRole, RoomRole};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::Track;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::*;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug)]
enum Ev {
    Connected,
    /// An RTP packet; the byte after the first of its payload (the tests' sender mark).
    Rtp(u8),
    Msg(String),
}

/// Handler methods run on the connection's driver task: they only forward.
struct Handler {
    /// Outgoing `data` objects for `signal`.
    out: UnboundedSender<Value>,
    ev: UnboundedSender<Ev>,
    echo: Option<&'static str>,
}

fn pump(
    dc: Arc<dyn DataChannel>,
    ev: UnboundedSender<Ev>,
    greet: Option<&'static str>,
    echo: Option<&'static str>,
) {
    tokio::spawn(async move {
        while let Some(e) = dc.poll().await {
            match e {
                DataChannelEvent::OnOpen => {
                    if let Some(g) = greet {
                        let _ = dc.send_text(g).await;
                    }
                }
                DataChannelEvent::OnMessage(m) => {
                    let _ = ev.send(Ev::Msg(String::from_utf8_lossy(&m.data).into()));
                    if let Some(r) = echo {
                        let _ = dc.send_text(r).await;
                    }
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
    });
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, e: RTCPeerConnectionIceEvent) {
        if let Ok(c) = e.candidate.to_json() {
            let _ = self.out.send(json!({ "candidate": c }));
        }
    }
    async fn on_connection_state_change(&self, s: RTCPeerConnectionState) {
        if s == RTCPeerConnectionState::Connected {
            let _ = self.ev.send(Ev::Connected);
        }
    }
    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        pump(dc, self.ev.clone(), None, self.echo);
    }
    async fn on_track(&self, t: Arc<dyn TrackRemote>) {
        let ev = self.ev.clone();
        tokio::spawn(async move {
            while let Some(e) = t.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = e {
                    let _ = ev.send(Ev::Rtp(p.payload.get(1).copied().unwrap_or(0)));
                }
            }
        });
    }
}

async fn peer(h: Handler) -> Res<Arc<dyn PeerConnection>> {
    let mut media = MediaEngine::default();
    media.register_default_codecs()?;
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_ice_connection_attempts(Some(Duration::from_millis(20)), None)
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        // Keeps checking through a long blip (the SFU counts ICE lost only after 15 s or
        // more of silence), instead of failing after 25 s on a loaded machine.
        .with_ice_timeouts(None, Some(Duration::from_secs(120)), None)
        .build();
    Ok(Arc::new(
        PeerConnectionBuilder::new()
            .with_media_engine(media)
            .with_setting_engine(settings)
            .with_handler(Arc::new(h))
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
            .await?,
    ))
}

async fn opus_track(pc: &Arc<dyn PeerConnection>, ssrc: u32) -> Res<Arc<TrackLocalStaticSample>> {
    let codec = RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48000,
        channels: 2,
        ..Default::default()
    };
    let enc = RTCRtpEncodingParameters {
        codec,
        rtp_coding_parameters: RTCRtpCodingParameters {
            ssrc: Some(ssrc),
            ..Default::default()
        },
        ..Default::default()
    };
    let track = Arc::new(TrackLocalStaticSample::new(
        Instant::now(),
        MediaStreamTrack::new(
            format!("s{ssrc}"),
            "audio".into(),
            "audio".into(),
            RtpCodecKind::Audio,
            vec![enc],
        ),
    )?);
    // The payload type is known once negotiated: `send_samples` reads it from the sender.
    pc.add_track(track.clone() as Arc<dyn TrackLocal>).await?;
    Ok(track)
}

/// Applies relayed `data` objects to the peer connection, answering offers; candidates that
/// arrive before the remote description wait.
async fn apply_signals(
    pc: Arc<dyn PeerConnection>,
    mut rx: UnboundedReceiver<Value>,
    out: UnboundedSender<Value>,
) -> Res<()> {
    let mut early = Vec::new();
    while let Some(v) = rx.recv().await {
        if let Some(sdp) = v.get("sdp") {
            let d: RTCSessionDescription = serde_json::from_value(sdp.clone())?;
            let offer = d.sdp_type == RTCSdpType::Offer;
            pc.set_remote_description(d).await?;
            if offer {
                let answer = pc.create_answer(None).await?;
                pc.set_local_description(answer.clone()).await?;
                out.send(json!({ "sdp": answer }))?;
            }
            for c in early.drain(..) {
                pc.add_ice_candidate(c).await?;
            }
        } else if let Some(c) = v.get("candidate") {
            if c.is_null() {
                continue;
            }
            let c: RTCIceCandidateInit = serde_json::from_value(c.clone())?;
            if pc.remote_description().await.is_some() {
                pc.add_ice_candidate(c).await?
            } else {
                early.push(c)
            }
        }
    }
    Ok(())
}

/// Moves `signal` frames between a WebSocket and the peer: outgoing `data` from `out_rx`
/// becomes `signal {call_id, data}`; incoming `signal` frames go to `in_tx`.
fn bridge(
    ws: Ws,
    call_id: String,
    mut out_rx: UnboundedReceiver<Value>,
    in_tx: UnboundedSender<Value>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        loop {
            tokio::select! {
                data = out_rx.recv() => {
                    let Some(data) = data else { break };
                    let frame = json!({"type": "signal", "call_id": call_id, "data": data});
                    if sink.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                }
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    if let Message::Text(t) = msg {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        assert_ne!(v["type"], "error", "the server refused a signal: {v}");
                        if v["type"] == "signal" {
                            assert_eq!(v["call_id"].as_str(), Some(call_id.as_str()));
                            let _ = in_tx.send(v["data"].clone());
                        }
                    }
                }
            }
        }
    })
}

async fn next<T>(rx: &mut UnboundedReceiver<Ev>, f: impl Fn(Ev) -> Option<T>) -> T {
    within("peer event", async {
        loop {
            if let Some(t) = f(rx.recv().await.expect("event channel open")) {
                return t;
            }
        }
    })
    .await
}

async fn send_samples(
    track: &Arc<TrackLocalStaticSample>,
    pc: &Arc<dyn PeerConnection>,
) -> Res<()> {
    let senders = pc.get_senders().await;
    let sender = senders.first().ok_or("no sender")?;
    let pt = sender.get_parameters().await?.rtp_parameters.codecs[0].payload_type;
    let ssrc = track.ssrcs().await[0];
    for _ in 0..10 {
        let s = Sample {
            data: bytes::Bytes::from_static(&[0xf8, 0xff, 0xfe]),
            duration: Duration::from_millis(20),
            ..Sample::new(Instant::now())
        };
        track.sample_writer(ssrc, pt).write_sample(&s).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_webrtc_peers_connect_through_the_server_with_data_and_audio_both_ways() {
    let s = Server::sqlite(|_| {}).await;
    let mut tutor = s.client("tutor").await;
    let mut kid = s.client("kid").await;
    let call_id = tutor
        .ok(json!({"type":"call","to":"kid","media":{"audio":true,"video":false}}))
        .await["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    kid.until("call_incoming").await;
    kid.ok(json!({"type":"call_accept","call_id":call_id}))
        .await;
    assert_eq!(tutor.until("call_state").await["state"], "accepted");

    let (a_out, a_out_rx) = unbounded_channel();
    let (b_out, b_out_rx) = unbounded_channel();
    let (a_in, a_in_rx) = unbounded_channel();
    let (b_in, b_in_rx) = unbounded_channel();
    let (a_ev_tx, mut a_ev) = unbounded_channel();
    let (b_ev_tx, mut b_ev) = unbounded_channel();
    let a = peer(Handler {
        out: a_out.clone(),
        ev: a_ev_tx.clone(),
        echo: None,
    })
    .await
    .unwrap();
    let b = peer(Handler {
        out: b_out.clone(),
        ev: b_ev_tx.clone(),
        echo: Some("pong"),
    })
    .await
    .unwrap();
    let a_track = opus_track(&a, 1111).await.unwrap();
    let b_track = opus_track(&b, 2222).await.unwrap();
    let dc = a.create_data_channel("chat", None).await.unwrap();
    pump(dc.clone(), a_ev_tx.clone(), Some("ping"), None);

    let bridges = [
        bridge(tutor.ws, call_id.clone(), a_out_rx, a_in),
        bridge(kid.ws, call_id.clone(), b_out_rx, b_in),
    ];
    let appliers = [
        tokio::spawn(apply_signals(a.clone(), a_in_rx, a_out.clone())),
        tokio::spawn(apply_signals(b.clone(), b_in_rx, b_out.clone())),
    ];
    let offer = a.create_offer(None).await.unwrap();
    a.set_local_description(offer.clone()).await.unwrap();
    a_out.send(json!({ "sdp": offer })).unwrap();

    next(&mut a_ev, |e| matches!(e, Ev::Connected).then_some(())).await;
    next(&mut b_ev, |e| matches!(e, Ev::Connected).then_some(())).await;
    let at_b = next(
        &mut b_ev,
        |e| if let Ev::Msg(m) = e { Some(m) } else { None },
    )
    .await;
    let at_a = next(
        &mut a_ev,
        |e| if let Ev::Msg(m) = e { Some(m) } else { None },
    )
    .await;
    assert_eq!(
        (at_b.as_str(), at_a.as_str()),
        ("ping", "pong"),
        "data channel both ways"
    );

    send_samples(&a_track, &a).await.unwrap();
    for _ in 0..3 {
        next(&mut b_ev, |e| matches!(e, Ev::Rtp(_)).then_some(())).await;
    }
    send_samples(&b_track, &b).await.unwrap();
    for _ in 0..3 {
        next(&mut a_ev, |e| matches!(e, Ev::Rtp(_)).then_some(())).await;
    }

    a.close().await.unwrap();
    b.close().await.unwrap();
    // The bridges and appliers hold socket halves and peer clones: stop them.
    for t in bridges {
        t.abort();
    }
    for t in appliers {
        t.abort();
    }
    s.stop().await;
}

// -- the SFU ----------------------------------------------------------------------------------

/// One participant of an SFU room: its WebSocket runs in `bridge`, its peer connection is
/// driven by `applier`, and `sender` keeps publishing samples marked with `mark`.
struct SfuPeer {
    pc: Arc<dyn PeerConnection>,
    ev: UnboundedReceiver<Ev>,
    /// Frames from the server other than the SFU's `signal`s.
    frames: UnboundedReceiver<Value>,
    /// Frames to send on the WebSocket as they are.
    raw: UnboundedSender<Value>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Like `bridge`, for the SFU: outgoing `data` becomes `signal {room, to:"sfu", data}`,
/// `raw` frames go out unchanged, and incoming frames are split into the SFU's signals and the
/// rest.
/// `rewrite` (from, to) replaces text in the SDP the SFU sends (its candidate's address, to
/// route the media through a [`Relay`]); with it, the peer's own candidates are not sent,
/// trickled or in its SDP.
fn sfu_bridge(
    ws: Ws,
    room: &'static str,
    (mut out_rx, mut raw_rx): (UnboundedReceiver<Value>, UnboundedReceiver<Value>),
    in_tx: UnboundedSender<Value>,
    frames: UnboundedSender<Value>,
    rewrite: Option<(String, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        loop {
            let frame = tokio::select! {
                data = out_rx.recv() => match data {
                    // Relayed: the SFU must know the peer only at the relay, not at the
                    // candidates it gathered (a path around the relay).
                    Some(data) if rewrite.is_some() && data.get("candidate").is_some() => continue,
                    Some(mut data) => {
                        if rewrite.is_some()
                            && let Some(sdp) = data["sdp"]["sdp"].as_str()
                        {
                            let kept: Vec<&str> =
                                sdp.split("\r\n").filter(|l| !l.starts_with("a=candidate")).collect();
                            data["sdp"]["sdp"] = json!(kept.join("\r\n"));
                        }
                        json!({"type": "signal", "room": room, "to": "sfu", "data": data})
                    }
                    None => break,
                },
                raw = raw_rx.recv() => match raw {
                    Some(raw) => raw,
                    None => break,
                },
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    if let Message::Text(t) = msg {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        if v["type"] == "signal" && v["from"]["session"] == "sfu" {
                            let mut data = v["data"].clone();
                            if let (Some((from, to)), Some(sdp)) =
                                (&rewrite, data["sdp"]["sdp"].as_str())
                            {
                                data["sdp"]["sdp"] = json!(sdp.replace(from.as_str(), to));
                            }
                            let _ = in_tx.send(data);
                        } else {
                            let _ = frames.send(v);
                        }
                    }
                    continue;
                }
            };
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
        }
    })
}

/// Publishes an Opus sample marked `mark` every 20 ms until aborted (media pacing, not a wait).
fn keep_sending(
    track: Arc<TrackLocalStaticSample>,
    pc: Arc<dyn PeerConnection>,
    mark: u8,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let senders = pc.get_senders().await;
        let Some(sender) = senders.first() else {
            return;
        };
        let Ok(params) = sender.get_parameters().await else {
            return;
        };
        let pt = params.rtp_parameters.codecs[0].payload_type;
        let ssrc = track.ssrcs().await[0];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let s = Sample {
                data: bytes::Bytes::from(vec![0xf8, mark, 0xfe]),
                duration: Duration::from_millis(20),
                ..Sample::new(Instant::now())
            };
            let _ = track.sample_writer(ssrc, pt).write_sample(&s).await;
        }
    })
}

/// Creates a `class` room whose A/V is the SFU.
async fn sfu_room(s: &Server, id: &str) {
    let (st, room) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id": id, "kind": "class", "av": {"mode": "sfu"}})),
    )
    .await;
    assert_eq!((st, &room["av"]["mode"]), (201, &json!("sfu")), "{room}");
}

/// A UDP relay between a peer and the SFU that can drop everything for a while (a network
/// blip): the peer is told the relay's port in place of the SFU's, and the SFU sees the peer
/// at the relay's other socket.
struct Relay {
    /// The port the peer sends to.
    port: u16,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(sfu: std::net::SocketAddr) -> Relay {
        let near = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let far = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = near.local_addr().unwrap().port();
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drop_all = blocked.clone();
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
            let mut peer = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = near.recv_from(&mut a) => {
                        peer = Some(from);
                        if !drop_all.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = far.send_to(&a[..n], sfu).await;
                        }
                    }
                    Ok((n, _)) = far.recv_from(&mut b) => {
                        if let Some(p) = peer && !drop_all.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = near.send_to(&b[..n], p).await;
                        }
                    }
                }
            }
        });
        Relay {
            port,
            blocked,
            task,
        }
    }

    fn block(&self, on: bool) {
        self.blocked.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Joins the room's A/V (which must answer `mode:"sfu"`), offers one Opus track and starts
/// publishing it once connected.
async fn sfu_peer(c: Client, room: &'static str, mark: u8) -> SfuPeer {
    sfu_peer_via(c, room, mark, None).await
}

/// [`sfu_peer`], with the media through `relay` (for the SFU at `sfu`) if given.
async fn sfu_peer_via(
    mut c: Client,
    room: &'static str,
    mark: u8,
    relay: Option<(&Relay, std::net::SocketAddr)>,
) -> SfuPeer {
    let joined = c.ok(json!({"type": "av_join", "room": room})).await;
    assert_eq!(joined["mode"], "sfu", "{joined}");
    let (out, out_rx) = unbounded_channel();
    let (raw, raw_rx) = unbounded_channel();
    let (in_tx, in_rx) = unbounded_channel();
    let (frames_tx, frames) = unbounded_channel();
    let (ev_tx, mut ev) = unbounded_channel();
    let pc = peer(Handler {
        out: out.clone(),
        ev: ev_tx,
        echo: None,
    })
    .await
    .unwrap();
    let track = opus_track(&pc, 1000 + u32::from(mark)).await.unwrap();
    let mut tasks = vec![
        sfu_bridge(
            c.ws,
            room,
            (out_rx, raw_rx),
            in_tx,
            frames_tx,
            relay.map(|(r, sfu)| {
                (
                    format!(" {} typ host", sfu.port()),
                    format!(" {} typ host", r.port),
                )
            }),
        ),
        tokio::spawn({
            let (pc, out) = (pc.clone(), out.clone());
            async move {
                apply_signals(pc, in_rx, out).await.expect("signals apply");
            }
        }),
    ];
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    out.send(json!({ "sdp": offer })).unwrap();
    next(&mut ev, |e| matches!(e, Ev::Connected).then_some(())).await;
    tasks.push(keep_sending(track, pc.clone(), mark));
    SfuPeer {
        pc,
        ev,
        frames,
        raw,
        tasks,
    }
}

impl SfuPeer {
    /// Waits until RTP marked with each of `marks` has arrived.
    async fn hears(&mut self, marks: &[u8]) {
        let mut missing: std::collections::BTreeSet<u8> = marks.iter().copied().collect();
        within("RTP from every other publisher", async {
            while !missing.is_empty() {
                if let Some(Ev::Rtp(m)) = self.ev.recv().await {
                    missing.remove(&m);
                }
            }
        })
        .await;
    }

    /// The next frame `f` picks.
    async fn frame(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        within("a frame", async {
            loop {
                let v = self.frames.recv().await.expect("bridge running");
                if f(&v) {
                    return v;
                }
            }
        })
        .await
    }

    /// Sends a command and waits for its `ok`.
    async fn ok(&mut self, rid: i64, mut v: Value) -> Value {
        v["rid"] = json!(rid);
        self.raw.send(v).unwrap();
        let reply = self.frame(|f| f["rid"] == rid).await;
        assert_eq!(reply["type"], "ok", "{reply}");
        reply
    }

    /// Stops the signalling first (a late offer must not meet a closed peer connection), then
    /// closes the peer connection.
    async fn close(self) {
        for t in self.tasks {
            t.abort();
        }
        self.pc.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_hear_each_other_through_the_sfu_and_mute_and_leave_tear_down() {
    let s = Server::sqlite(|_| {}).await;
    sfu_room(&s, "sfu").await;
    let mut host = Client::connect(
        s.addr,
        &token("host", PlatformRole::Tutor, &[("sfu", RoomRole::Host)]),
    )
    .await;
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    for c in [&mut host, &mut a, &mut b] {
        c.join("sfu").await;
    }
    let (a_session, b_session) = (a.session.clone(), b.session.clone());
    let mut host = sfu_peer(host, "sfu", 1).await;
    let mut a = sfu_peer(a, "sfu", 2).await;
    let mut b = sfu_peer(b, "sfu", 3).await;
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 3);
    host.hears(&[2, 3]).await;
    a.hears(&[1, 3]).await;
    b.hears(&[1, 2]).await;
    let speakers = a
        .frame(|f| {
            f["type"] == "active_speakers"
                && f["users"]
                    .as_array()
                    .is_some_and(|u| u.contains(&json!("host")))
        })
        .await;
    assert_eq!(speakers["room"], "sfu");

    // host mutes a's audio: a is told, and b stops hearing a while host still comes through.
    host.ok(
        100,
        json!({"type": "av_mute", "room": "sfu", "user": "a", "kind": "audio"}),
    )
    .await;
    let muted = a.frame(|f| f["type"] == "av_muted").await;
    assert_eq!(
        (&muted["room"], &muted["kind"], &muted["by"]),
        (&json!("sfu"), &json!("audio"), &json!("host"))
    );
    while b.ev.try_recv().is_ok() {}
    let (mut from_host, mut from_a) = (0, 0);
    within("host's audio after the mute", async {
        while from_host < 25 {
            match b.ev.recv().await {
                Some(Ev::Rtp(1)) => from_host += 1,
                Some(Ev::Rtp(2)) => from_a += 1,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        from_a <= 5,
        "{from_a} packets of a's muted audio still reached b"
    );

    // host unmutes it: a is told, and b hears a again.
    host.ok(
        103,
        json!({"type": "av_unmute", "room": "sfu", "user": "a", "kind": "audio"}),
    )
    .await;
    let unmuted = a.frame(|f| f["type"] == "av_unmuted").await;
    assert_eq!(
        (&unmuted["room"], &unmuted["kind"], &unmuted["by"]),
        (&json!("sfu"), &json!("audio"), &json!("host"))
    );
    within("a's audio after the unmute", async {
        let mut from_a = 0;
        while from_a < 25 {
            if let Some(Ev::Rtp(2)) = b.ev.recv().await {
                from_a += 1;
            }
        }
    })
    .await;

    // a leaves the A/V: its peer connection is gone when the ok arrives, the others hear it.
    a.ok(101, json!({"type": "av_leave", "room": "sfu"})).await;
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 2);
    let left = host
        .frame(|f| {
            f["type"] == "av_peer" && f["session"] == a_session.as_str() && f["joined"] == false
        })
        .await;
    assert_eq!(left["joined"], false);
    // b's connection ends (its socket closes): the SFU drops its peer too.
    b.close().await;
    let left = host
        .frame(|f| {
            f["type"] == "av_peer" && f["session"] == b_session.as_str() && f["joined"] == false
        })
        .await;
    assert_eq!(left["joined"], false);
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 1);
    host.ok(102, json!({"type": "av_leave", "room": "sfu"}))
        .await;
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 0);
    a.close().await;
    host.close().await;
    s.stop().await;
}

/// A session whose peer connection goes away while its socket stays (a browser whose network
/// changed) is told `av_closed {reason:"connection_lost"}` once the SFU's ICE grace is over; the
/// others hear it left; it is still in the room's A/V and joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sfu_peer_whose_connectivity_is_lost_is_told_and_joins_again() {
    let s = Server::sqlite(|c| c.sfu_ice_grace_ms = 300).await;
    sfu_room(&s, "lost").await;
    let mut host = Client::connect(
        s.addr,
        &token("host", PlatformRole::Tutor, &[("lost", RoomRole::Host)]),
    )
    .await;
    let mut a = s.client("a").await;
    for c in [&mut host, &mut a] {
        c.join("lost").await;
    }
    let a_session = a.session.clone();
    let mut host = sfu_peer(host, "lost", 1).await;
    let mut a = sfu_peer(a, "lost", 2).await;
    host.hears(&[2]).await;

    // a's peer connection ends; its socket and the signalling bridge stay.
    a.pc.close().await.unwrap();
    let closed = within(
        "av_closed after the ICE grace",
        a.frame(|f| f["type"] == "av_closed"),
    )
    .await;
    assert_eq!(
        (&closed["room"], &closed["reason"]),
        (&json!("lost"), &json!("connection_lost"))
    );
    host.frame(|f| {
        f["type"] == "av_peer" && f["session"] == a_session.as_str() && f["joined"] == false
    })
    .await;
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 1);
    // Still in the room's A/V: a join again is a fresh SFU session.
    let again = a.ok(300, json!({"type": "av_join", "room": "lost"})).await;
    assert_eq!(again["mode"], "sfu", "{again}");
    host.close().await;
    a.close().await;
    s.stop().await;
}

/// A peer whose packets are all lost for a while, shorter than the SFU's ICE grace, keeps its
/// SFU session: the SFU sees its ICE lost and back (the counters `/metrics` shows), never says
/// `av_closed`, holds both sessions throughout, and media flows both ways again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sfu_peer_cut_off_for_less_than_the_grace_keeps_its_session() {
    let s = Server::sqlite(|c| {
        c.sfu_ice_grace_ms = 60_000;
        c.sfu_ice_lost_ms = 2_000;
    })
    .await;
    sfu_room(&s, "blip").await;
    let sfu = s.app.sfu.as_ref().unwrap();
    let sfu_addr = sfu.local_addr();
    let mut host = Client::connect(
        s.addr,
        &token("host", PlatformRole::Tutor, &[("blip", RoomRole::Host)]),
    )
    .await;
    let mut a = s.client("a").await;
    for c in [&mut host, &mut a] {
        c.join("blip").await;
    }
    let relay = Relay::start(sfu_addr).await;
    let mut host = sfu_peer(host, "blip", 1).await;
    let mut a = sfu_peer_via(a, "blip", 2, Some((&relay, sfu_addr))).await;
    host.hears(&[2]).await;
    a.hears(&[1]).await;

    let counter = |name: &str| {
        let c = sfu.stats().counters();
        c.iter().find(|x| x.0 == name).map_or(0, |x| x.2)
    };
    // The SFU's ICE keeps a pair the peer checked within the last 15 s, so loss shows after
    // that at the earliest: a longer bound than `within`'s.
    let until = |name: &'static str| async move {
        let counted = async {
            while counter(name) == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(45), counted)
            .await
            .unwrap_or_else(|_| panic!("timed out: {name}"));
    };
    relay.block(true);
    until("studyhall_sfu_ice_lost_total").await;
    relay.block(false);
    until("studyhall_sfu_ice_recovered_total").await;
    assert_eq!(sfu.sessions(), 2, "both kept through the blip");
    // Media again, both ways: what arrives from now on.
    while host.ev.try_recv().is_ok() {}
    while a.ev.try_recv().is_ok() {}
    host.hears(&[2]).await;
    a.hears(&[1]).await;
    let mut told = Vec::new();
    while let Ok(f) = a.frames.try_recv() {
        told.push(f);
    }
    assert!(
        !told.iter().any(|f| f["type"] == "av_closed"),
        "no av_closed within the grace: {told:?}"
    );
    host.close().await;
    a.close().await;
    drop(relay);
    s.stop().await;
}

/// Many rounds of two peers joining a room's SFU, hearing each other and leaving (one with
/// `av_leave`, one by closing its socket) leave nothing behind: no SFU session, no A/V room
/// state, and the process's file descriptors back near where they were. 200 rounds by default
/// (`STUDYHALL_SFU_LEAK_ROUNDS` to change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_join_leave_rounds_leave_nothing_behind() {
    let rounds: usize = std::env::var("STUDYHALL_SFU_LEAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = Server::sqlite(|_| {}).await;
    sfu_room(&s, "leak").await;
    let sfu = s.app.sfu.as_ref().unwrap();
    let mut baseline = None;
    for round in 0..rounds {
        let mut a = s.client(&format!("a{round}")).await;
        let mut b = s.client(&format!("b{round}")).await;
        a.join("leak").await;
        b.join("leak").await;
        let mut a = sfu_peer(a, "leak", 1).await;
        let mut b = sfu_peer(b, "leak", 2).await;
        a.hears(&[2]).await;
        b.hears(&[1]).await;
        a.ok(1, json!({"type": "av_leave", "room": "leak"})).await;
        a.close().await;
        b.close().await;
        within("the round's SFU sessions gone", async {
            while sfu.sessions() > 0 || s.app.rtc.av_rooms() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // The first round opens what stays open for the process (pools, the runtime's own).
        if round == 0 {
            baseline = Some(open_fds());
        }
    }
    let (before, after) = (baseline.unwrap_or_default(), open_fds());
    assert!(
        after <= before + 16,
        "{rounds} SFU rounds: {before} fds after the first, {after} at the end"
    );
    s.stop().await;
}

/// A nats-server and two `studyhall` nodes on one fresh PostgreSQL database (cluster mode, as
/// in `tests/integration/cluster.rs`), each node with its own SFU on its own UDP port.
struct TwoNodes {
    nats: tokio::process::Child,
    db: Option<PgDb>,
    nodes: Vec<(tokio::process::Child, std::net::SocketAddr)>,
}

impl TwoNodes {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nats = tokio::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        within("nats-server listening", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let db = PgDb::create().await;
        let mut nodes = Vec::new();
        // One after the other: the first migrates the database.
        for id in ["n0", "n1"] {
            let mut cmd = studyhall_serve(&db.url);
            cmd.env("STUDYHALL_JWT_SECRET", SECRET)
                .env("STUDYHALL_NATS_URL", format!("nats://127.0.0.1:{port}"))
                .env("STUDYHALL_NODE_ID", id)
                .env("STUDYHALL_BUS_GAP_MS", "50")
                .env("STUDYHALL_BUS_SWEEP_MS", "250")
                .env("STUDYHALL_PRESENCE_HEARTBEAT_MS", "200")
                // Long enough that a command right after a node is killed still finds the
                // node named as its room's SFU (and gets `unavailable`) on a busy machine.
                .env("STUDYHALL_PRESENCE_TTL_MS", "4000")
                .env("STUDYHALL_SHUTDOWN_GRACE_MS", "2000");
            nodes.push(spawn_listening(cmd, &format!("node {id} listening")).await);
        }
        Self {
            nats,
            db: Some(db),
            nodes,
        }
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        self.nodes[i].1
    }

    /// A counter from node `i`'s `/metrics`.
    async fn counter(&self, i: usize, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.addr(i);
        within("metrics", async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut body = Vec::new();
            s.read_to_end(&mut body).await.unwrap();
            String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0.0)
        })
        .await
    }

    async fn stop(mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill().await;
        }
        let _ = self.nats.kill().await;
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

/// Cluster mode: a room's SFU runs on the node where it was first needed. A publisher on node 0
/// and a host and a student on node 1 all end up on node 0's SFU (node 1's forwards nothing)
/// and hear each other; the host on node 1 mutes and unmutes the publisher on node 0; a session
/// closing on node 1 leaves node 0's SFU. When node 0 dies, a signal to the SFU gets `unavailable` at
/// once, node 1's sessions are told `av_closed {reason:"connection_lost"}`, and joining again
/// takes the room's SFU over on node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_sfu_runs_on_one_node_for_sessions_of_every_node() {
    let test = async {
        let mut c = TwoNodes::start().await;
        let room = "cluster.sfu";
        let (st, made) = http(
            c.addr(0),
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id": room, "kind": "class", "av": {"mode": "sfu"}})),
        )
        .await;
        assert_eq!((st, &made["av"]["mode"]), (201, &json!("sfu")), "{made}");
        let student = |u: &str| token(u, PlatformRole::Student, &[]);
        let mut publisher = Client::connect(c.addr(0), &student("pub")).await;
        let mut host = Client::connect(
            c.addr(1),
            &token("host", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
        )
        .await;
        let mut kid = Client::connect(c.addr(1), &student("kid")).await;
        for cl in [&mut publisher, &mut host, &mut kid] {
            cl.join(room).await;
        }
        let kid_session = kid.session.clone();
        // The publisher's node needs the room's SFU first: it runs it.
        let mut publisher = sfu_peer(publisher, room, 1).await;
        let mut host = sfu_peer(host, room, 2).await;
        let mut kid = sfu_peer(kid, room, 3).await;
        publisher.hears(&[2, 3]).await;
        host.hears(&[1, 3]).await;
        kid.hears(&[1, 2]).await;
        let forwarded = "studyhall_sfu_frames_forwarded_total";
        assert!(c.counter(0, forwarded).await > 0.0, "node 0's SFU forwards");
        assert_eq!(c.counter(1, forwarded).await, 0.0, "node 1's SFU is idle");

        // The host on node 1 mutes the publisher on node 0's SFU.
        host.ok(
            100,
            json!({"type": "av_mute", "room": room, "user": "pub", "kind": "audio"}),
        )
        .await;
        let muted = publisher.frame(|f| f["type"] == "av_muted").await;
        assert_eq!(
            (&muted["kind"], &muted["by"]),
            (&json!("audio"), &json!("host"))
        );
        while host.ev.try_recv().is_ok() {}
        let (mut from_kid, mut from_pub) = (0, 0);
        within("the kid's audio after the mute", async {
            while from_kid < 25 {
                match host.ev.recv().await {
                    Some(Ev::Rtp(3)) => from_kid += 1,
                    Some(Ev::Rtp(1)) => from_pub += 1,
                    _ => {}
                }
            }
        })
        .await;
        assert!(
            from_pub <= 5,
            "{from_pub} packets of muted audio still came"
        );
        // ... and unmutes it: the publisher is told, and the host hears it again.
        host.ok(
            103,
            json!({"type": "av_unmute", "room": room, "user": "pub", "kind": "audio"}),
        )
        .await;
        let unmuted = publisher.frame(|f| f["type"] == "av_unmuted").await;
        assert_eq!(unmuted["by"], "host", "{unmuted}");
        while host.ev.try_recv().is_ok() {}
        host.hears(&[1]).await;

        // The kid's connection to node 1 ends: node 0's SFU drops its peer.
        kid.close().await;
        publisher
            .frame(|f| {
                f["type"] == "av_peer"
                    && f["session"] == kid_session.as_str()
                    && f["joined"] == false
            })
            .await;

        // Node 0 dies: its SFU with it.
        let _ = c.nodes[0].0.kill().await;
        let candidate = json!({"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}});
        host.raw
            .send(
                json!({"type": "signal", "room": room, "to": "sfu", "data": candidate, "rid": 101}),
            )
            .unwrap();
        let refused = host.frame(|f| f["rid"] == 101).await;
        assert_eq!(refused["code"], "unavailable", "{refused}");
        let closed = host.frame(|f| f["type"] == "av_closed").await;
        assert_eq!(closed["reason"], "connection_lost", "{closed}");
        // Joining again claims the room's SFU on node 1 (node 0 is no longer live).
        let again = host.ok(102, json!({"type": "av_join", "room": room})).await;
        assert_eq!(again["mode"], "sfu", "{again}");
        assert_eq!(again["peers"], json!([]), "{again}");
        host.close().await;
        publisher.close().await;
        c.stop().await;
    };
    tokio::time::timeout(Duration::from_secs(240), test)
        .await
        .expect("the cluster SFU test finished in time");
}

/// Cluster mode, a `live` room: a stage change made on a node that is not the room's SFU owner
/// reaches the owner's SFU even when no session of the owner's node is in the room any more
/// (so the owner hears no stage relay of its own): the host on node 1 takes a student off
/// the stage and the owner (node 0) stops forwarding the student's media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_change_on_another_node_reaches_the_rooms_sfu() {
    let test = async {
        let c = TwoNodes::start().await;
        let room = "cluster.live";
        let (st, made) = http(
            c.addr(0),
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id": room, "kind": "live", "av": {"mode": "sfu"}})),
        )
        .await;
        assert_eq!(st, 201, "{made}");
        let host = |u: &str| token(u, PlatformRole::Tutor, &[(room, RoomRole::Host)]);
        let mut first = Client::connect(c.addr(0), &host("first")).await;
        let mut teacher = Client::connect(c.addr(1), &host("teacher")).await;
        let mut other = Client::connect(c.addr(1), &host("other")).await;
        let mut kid = Client::connect(c.addr(1), &token("kid", PlatformRole::Student, &[])).await;
        for cl in [&mut first, &mut teacher, &mut other, &mut kid] {
            cl.join(room).await;
        }
        teacher
            .ok(json!({"type": "stage", "room": room, "user": "kid", "on": true}))
            .await;
        // Node 0 runs the room's SFU; then its only session leaves the room.
        let mut first = sfu_peer(first, room, 1).await;
        let mut teacher = sfu_peer(teacher, room, 2).await;
        let other = sfu_peer(other, room, 3).await;
        let kid = sfu_peer(kid, room, 4).await;
        teacher.hears(&[1, 3, 4]).await;
        first.ok(100, json!({"type": "leave", "room": room})).await;
        // Off stage: node 0's SFU stops forwarding the kid's media to the teacher, while the
        // other host's goes on.
        teacher
            .ok(
                101,
                json!({"type": "stage", "room": room, "user": "kid", "on": false}),
            )
            .await;
        // (What was on its way when the stage changed may still come.)
        let (mut from_other, mut from_kid) = (0, 0);
        within("the other host's audio after the stage change", async {
            while from_other < 50 {
                match teacher.ev.recv().await {
                    Some(Ev::Rtp(3)) => from_other += 1,
                    Some(Ev::Rtp(4)) if from_other >= 25 => from_kid += 1,
                    _ => {}
                }
            }
        })
        .await;
        assert!(
            from_kid <= 5,
            "{from_kid} packets of the kid's media came off stage"
        );
        for p in [first, teacher, other, kid] {
            p.close().await;
        }
        c.stop().await;
    };
    tokio::time::timeout(Duration::from_secs(240), test)
        .await
        .expect("the cluster stage test finished in time");
}
