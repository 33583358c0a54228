//! `sfu`: a load benchmark of the server's SFU. A `class` room in `av.mode` `sfu`, P
//! publishers that each send one Opus and one VP8 track (pre-generated frames, no encoding;
//! VP8 as simulcast layers `l`, `m`, `h` unless `--simulcast false`), and viewers that join
//! watching only, stepped up until the viewers lose over `--loss-limit-pct` of the packets,
//! the server's CPU passes `--cpu-limit-pct` of its cores, or `--subs-max`. Each step reports
//! the RTP packets/s the viewers receive (and per busy server core), Mbit/s, loss, the time
//! from a video track opening to its first keyframe, server RSS per viewer, and the NACKs and
//! PLIs the viewers sent. With `--peers janus` the same media and counting run against Janus
//! 1.1's VideoRoom (`crate::janus`). [`check`] is the small correctness run of `smoke`.

use super::Common;
use crate::janus::Janus;
use crate::procs::{API_KEY, API_WAIT, Server, http};
use crate::report::{Report, Table, human, per_core};
use crate::rtc::{self, Counters, MediaPlan, PeerHandle, Sdp, Start};
use crate::sys::CpuMeter;
use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;

/// The benchmark room.
const ROOM: &str = "sfu-bench";
/// Viewers joining at once.
const JOIN_CONCURRENCY: usize = 16;
/// How often readiness is looked at while viewers join.
const POLL: Duration = Duration::from_millis(100);
/// How long a publisher's, or the correctness run's viewer's, ICE and DTLS may take to come up
/// before that peer is replaced.
const DTLS_UP: Duration = Duration::from_secs(5);
/// Upper bounds of the stepping flags.
const SUBS_MAX_LIMIT: usize = 2000;
const STEP_S_LIMIT: u64 = 120;
const PUBLISHERS_LIMIT: usize = 16;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Publishers, each sending one Opus and one VP8 track (at most 16).
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Video bitrate of each publisher's widest layer, kbit/s.
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u64,
    /// Send the video as three simulcast layers l, m, h (1/16, 1/4 and all of the bitrate).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub simulcast: bool,
    /// Seconds between two unrequested keyframes.
    #[arg(long, default_value_t = 3)]
    pub keyframe_s: u64,
    /// Viewers in the first step.
    #[arg(long, default_value_t = 10)]
    pub subs_start: usize,
    /// Viewers added per step.
    #[arg(long, default_value_t = 25)]
    pub subs_step: usize,
    /// Most viewers (at most 2000).
    #[arg(long, default_value_t = 300)]
    pub subs_max: usize,
    /// Seconds measured per step (at most 120).
    #[arg(long, default_value_t = 5)]
    pub step_s: u64,
    /// Seconds a step's new viewers may take to join and get a keyframe of every video track.
    #[arg(long, default_value_t = 30)]
    pub join_timeout_s: u64,
    /// Stop once the viewers lose more than this share of the packets, %.
    #[arg(long, default_value_t = 1.0)]
    pub loss_limit_pct: f64,
    /// Stop once the server's CPU passes this share of its cores, %.
    #[arg(long, default_value_t = 90.0)]
    pub cpu_limit_pct: f64,
    /// The Janus binary (`--peers janus`).
    #[arg(long, default_value = "/usr/bin/janus")]
    pub janus_bin: String,
}

impl Args {
    fn check(&self) -> Result<()> {
        ensure!(
            (1..=PUBLISHERS_LIMIT).contains(&self.publishers),
            "--publishers must be 1 to {PUBLISHERS_LIMIT}"
        );
        ensure!(
            self.subs_max <= SUBS_MAX_LIMIT && self.subs_start <= self.subs_max,
            "--subs-start <= --subs-max <= {SUBS_MAX_LIMIT}"
        );
        ensure!(self.subs_step >= 1, "--subs-step must be at least 1");
        ensure!(
            (1..=STEP_S_LIMIT).contains(&self.step_s),
            "--step-s must be 1 to {STEP_S_LIMIT}"
        );
        ensure!(self.video_kbps >= 16, "--video-kbps must be at least 16");
        Ok(())
    }

    fn plan(&self) -> Arc<MediaPlan> {
        Arc::new(MediaPlan::new(
            self.video_kbps,
            self.simulcast,
            Duration::from_secs(self.keyframe_s.max(1)),
        ))
    }
}

/// One participant: its media peer and the task carrying its signalling.
pub struct Member {
    pub peer: PeerHandle,
    bridge: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.bridge.abort();
    }
}

impl Member {
    pub fn new(peer: PeerHandle, bridge: tokio::task::JoinHandle<()>) -> Self {
        Self { peer, bridge }
    }

    fn c(&self) -> &Counters {
        &self.peer.counters
    }
}

/// The system under test: a studyhall server, or Janus.
enum Target {
    Studyhall(Server),
    Janus(Janus),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Studyhall(_) => "studyhall",
            Target::Janus(_) => "janus",
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Target::Studyhall(s) => s.pid,
            Target::Janus(j) => j.pid,
        }
    }

    async fn publisher(&self, n: u32, plan: Arc<MediaPlan>) -> Result<Member> {
        match self {
            Target::Studyhall(s) => sh_member(s, n, Start::Publish, Some(plan)).await,
            Target::Janus(j) => j.publisher(n, plan).await,
        }
    }

    async fn viewer(&self, n: u32) -> Result<Member> {
        match self {
            Target::Studyhall(s) => sh_member(s, n, Start::Watch, None).await,
            Target::Janus(j) => j.viewer(n).await,
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Target::Studyhall(s) => s.stop().await,
            Target::Janus(j) => {
                drop(j);
                Ok(())
            }
        }
    }
}

/// A studyhall server for the benchmark, with room for the run's sessions in one SFU room.
async fn studyhall(common: &Common, tag: &str, sessions: usize) -> Result<Server> {
    let mut c = common.clone();
    for k in ["STUDYHALL_SFU_ROOM_MAX", "STUDYHALL_SFU_SESSIONS_MAX"] {
        c.server_env.push(format!("{k}={}", sessions + 8));
    }
    let s = c.server(tag, false).await?;
    let (st, body) = http(
        s.addr,
        API_WAIT,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(
            json!({"id": ROOM, "kind": "class", "title": ROOM, "visibility": "open",
            "av": {"mode": "sfu"}}),
        ),
    )
    .await?;
    ensure!(st == 201, "create the SFU room: {st} {body}");
    Ok(s)
}

/// A studyhall session in the room's SFU: signed in as `u{n}`, joined, `av_join`ed, its
/// peer connection signalled through `signal {to:"sfu"}`.
async fn sh_member(s: &Server, n: u32, how: Start, plan: Option<Arc<MediaPlan>>) -> Result<Member> {
    let token = studyhall::auth::Tokens::new(crate::procs::JWT_SECRET.as_bytes()).sign(
        &format!("u{n}"),
        &format!("U{n}"),
        studyhall::protocol::PlatformRole::Student,
        HashMap::new(),
        Duration::from_secs(3600),
    )?;
    let src = std::net::Ipv4Addr::LOCALHOST;
    let (mut ws, _) = crate::client::studyhall_session(s.addr, src, &token, ROOM, None, |_| {})
        .await
        .context("join the room")?;
    ws.send(Message::text(
        json!({"type": "av_join", "room": ROOM, "rid": 1}).to_string(),
    ))
    .await?;
    loop {
        let t = crate::client::next_text(&mut ws).await?;
        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
        if v["rid"] == 1 {
            ensure!(
                v["type"] == "ok" && v["mode"] == "sfu",
                "av_join answered {t}"
            );
            break;
        }
    }
    let (out_tx, out_rx) = unbounded_channel();
    let (in_tx, in_rx) = unbounded_channel();
    let peer = rtc::start(how, plan, out_tx, in_rx).await?;
    let bridge = tokio::spawn(sh_bridge(ws, out_rx, in_tx));
    Ok(Member::new(peer, bridge))
}

/// Carries a peer's SDP over its studyhall WebSocket: ours as `signal {to:"sfu"}`, the
/// SFU's `signal`s back; every other frame is read and dropped.
async fn sh_bridge(
    ws: crate::client::Ws,
    mut out: UnboundedReceiver<Sdp>,
    into: UnboundedSender<Sdp>,
) {
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            sdp = out.recv() => {
                let Some(sdp) = sdp else { return };
                let (ty, body) = match sdp {
                    Sdp::Offer(s) => ("offer", s),
                    Sdp::Answer(s) => ("answer", s),
                };
                let frame = json!({"type": "signal", "room": ROOM, "to": "sfu",
                    "data": {"sdp": {"type": ty, "sdp": body}}});
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    return;
                }
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { return };
                let Message::Text(t) = msg else { continue };
                if !t.contains("\"sfu\"") {
                    continue;
                }
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                if v["type"] != "signal" || v["from"]["session"] != "sfu" {
                    continue;
                }
                let sdp = &v["data"]["sdp"];
                let body = sdp["sdp"].as_str().unwrap_or_default().to_owned();
                let sdp = match sdp["type"].as_str() {
                    Some("offer") => Sdp::Offer(body),
                    Some("answer") => Sdp::Answer(body),
                    _ => continue,
                };
                if into.send(sdp).is_err() {
                    return;
                }
            }
        }
    }
}

/// Counters summed over members.
#[derive(Debug, Default, Clone, Copy)]
struct Snap {
    packets: u64,
    expected: u64,
    bytes: u64,
    nacks: u64,
    plis: u64,
    at: Option<Instant>,
}

fn snap(members: &[Member]) -> Snap {
    let mut s = Snap {
        at: Some(Instant::now()),
        ..Snap::default()
    };
    for m in members {
        let c = m.c();
        s.packets += Counters::get(&c.packets);
        s.expected += Counters::get(&c.expected);
        s.bytes += Counters::get(&c.bytes);
        s.nacks += Counters::get(&c.nacks);
        s.plis += Counters::get(&c.plis);
    }
    s
}

/// A viewer is ready once every publisher's video track gave it a keyframe and audio flows.
fn ready(m: &Member, publishers: usize) -> bool {
    let c = m.c();
    Counters::get(&c.keyed_tracks) >= publishers as u64 && Counters::get(&c.audio_packets) > 0
}

/// Waits (bounded) until `pick` holds for every member; returns how many it holds for.
async fn wait_for(members: &[Member], within: Duration, pick: impl Fn(&Member) -> bool) -> usize {
    let end = Instant::now() + within;
    loop {
        let n = members.iter().filter(|m| pick(m)).count();
        let dead = members
            .iter()
            .any(|m| m.c().dead.load(std::sync::atomic::Ordering::Acquire));
        if n == members.len() || dead || Instant::now() >= end {
            return n;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One measured step.
#[derive(Debug, Clone)]
struct Row {
    target: &'static str,
    viewers: usize,
    ready: usize,
    pps: f64,
    cpu_pct: f64,
    mbps: f64,
    loss_pct: f64,
    /// Packets received, as a share of what every viewer would get at the publishers' full
    /// rate (audio and the widest layer): below 100 % the server sent less (a narrower layer,
    /// paused video, or its pacer held packets back).
    full_pct: f64,
    key_p50: f64,
    key_p99: f64,
    rss_per_viewer_kib: f64,
    /// Frames the publishers skipped (the generator fell behind).
    skipped: u64,
    nacks: u64,
    plis: u64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// CPUs the server may use: those of `--server-cpus`, else all of this machine's.
fn server_cores(cpus: &str) -> usize {
    let mut n = 0;
    for part in cpus.split(',').filter(|p| !p.trim().is_empty()) {
        n += match part.trim().split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        };
    }
    if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    }
}

pub async fn run(common: Common, args: Args) -> Result<bool> {
    args.check()?;
    let mut report = Report::new(
        "sfu",
        json!({"publishers": args.publishers, "video_kbps": args.video_kbps,
            "simulcast": args.simulcast, "keyframe_s": args.keyframe_s,
            "subs_start": args.subs_start, "subs_step": args.subs_step, "subs_max": args.subs_max,
            "step_s": args.step_s, "loss_limit_pct": args.loss_limit_pct,
            "cpu_limit_pct": args.cpu_limit_pct, "peers": common.peers}),
    );
    let mut names = vec!["studyhall"];
    if common.peers.iter().any(|p| p.trim() == "janus") {
        names.push("janus");
    }
    let mut rows = Vec::new();
    for name in names {
        match one(&common, &args, name, &mut rows).await {
            Ok(notes) => notes.into_iter().for_each(|n| report.note(n)),
            Err(e) => report.note(format!("{name}: aborted: {e:#}")),
        }
    }
    let cores = server_cores(&common.server_cpus);
    report.tables.push(best_table(&rows, &args, cores));
    report.tables.push(steps_table(&rows));
    report.results =
        json!(rows.iter().map(|r| json!({
        "target": r.target, "viewers": r.viewers, "ready": r.ready, "packets_per_s": r.pps,
        "server_cpu_pct": r.cpu_pct, "mbit_per_s": r.mbps, "loss_pct": r.loss_pct,
        "full_rate_pct": r.full_pct,
        "first_keyframe_ms_p50": r.key_p50, "first_keyframe_ms_p99": r.key_p99,
        "server_rss_kib_per_viewer": r.rss_per_viewer_kib, "nacks": r.nacks, "plis": r.plis,
        "publisher_frames_skipped": r.skipped,
    })).collect::<Vec<_>>());
    report.write(&common.out)?;
    Ok(true)
}

/// The best step of each target within the limits, with studyhall's ratio to the peer.
fn best_table(rows: &[Row], args: &Args, cores: usize) -> Table {
    let mut t = Table::new(
        "most packets/s forwarded within the limits",
        &[
            "target",
            "viewers",
            "packets/s",
            "server CPU %",
            "packets/s per server core",
            "loss %",
            "studyhall/peer (per core)",
        ],
    );
    let within = |r: &&Row| {
        r.loss_pct <= args.loss_limit_pct && r.cpu_pct <= args.cpu_limit_pct * cores as f64
    };
    let best = |name: &str| {
        rows.iter()
            .filter(|r| r.target == name)
            .filter(within)
            .max_by(|a, b| a.pps.total_cmp(&b.pps))
    };
    let per = |r: &Row| r.pps / (r.cpu_pct / 100.0).max(1e-9);
    let sh = best("studyhall").map(per);
    for name in ["studyhall", "janus"] {
        let Some(r) = best(name) else { continue };
        t.row(vec![
            name.into(),
            r.viewers.to_string(),
            human(r.pps),
            format!("{:.0}", r.cpu_pct),
            per_core(r.pps, r.cpu_pct),
            format!("{:.2}", r.loss_pct),
            if name == "studyhall" {
                "-".into()
            } else {
                crate::report::ratio(sh, Some(per(r)))
            },
        ]);
    }
    t
}

/// Milliseconds, or `-` where no sample was taken (no new viewer got a keyframe).
fn ms_or_dash(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

fn steps_table(rows: &[Row]) -> Table {
    let mut t = Table::new(
        "every step",
        &[
            "target",
            "viewers",
            "ready",
            "packets/s",
            "server CPU %",
            "packets/s per server core",
            "Mbit/s",
            "loss %",
            "% of full rate",
            "first keyframe p50 ms",
            "first keyframe p99 ms",
            "server RSS KiB/viewer",
            "NACKs",
            "PLIs",
            "frames skipped by publishers",
        ],
    );
    for r in rows {
        t.row(vec![
            r.target.into(),
            r.viewers.to_string(),
            r.ready.to_string(),
            human(r.pps),
            format!("{:.0}", r.cpu_pct),
            per_core(r.pps, r.cpu_pct),
            format!("{:.1}", r.mbps),
            format!("{:.2}", r.loss_pct),
            ms_or_dash(r.full_pct),
            ms_or_dash(r.key_p50),
            ms_or_dash(r.key_p99),
            format!("{:.0}", r.rss_per_viewer_kib),
            r.nacks.to_string(),
            r.plis.to_string(),
            r.skipped.to_string(),
        ]);
    }
    t
}

async fn start_target(common: &Common, args: &Args, name: &str) -> Result<Target> {
    let sessions = args.subs_max + args.publishers;
    Ok(match name {
        "studyhall" => Target::Studyhall(studyhall(common, "sfu-studyhall", sessions).await?),
        _ => {
            let work = common.out.join("run").join("sfu-janus");
            Target::Janus(Janus::start(&args.janus_bin, &work, sessions).await?)
        }
    })
}

/// Starts the publishers and waits (bounded) until each is connected and sending. A publisher
/// whose DTLS is not up within `DTLS_UP` is replaced once by a fresh session (users `u500`
/// on), as a stuck viewer is in `check`: a str0m peer does not resend an unanswered first
/// DTLS flight.
async fn publishers(t: &Target, args: &Args) -> Result<Vec<Member>> {
    let plan = args.plan();
    let mut pubs = Vec::new();
    for i in 0..args.publishers {
        pubs.push(t.publisher(i as u32, plan.clone()).await?);
    }
    let is_up = |m: &Member| m.c().connected.load(std::sync::atomic::Ordering::Acquire);
    wait_for(&pubs, DTLS_UP, is_up).await;
    let stuck: Vec<usize> = (0..pubs.len()).filter(|&i| !is_up(&pubs[i])).collect();
    if !stuck.is_empty() {
        eprintln!(
            "sfu: {} publisher(s) never got DTLS up and were replaced",
            stuck.len()
        );
        for i in stuck {
            pubs[i] = t.publisher(500 + i as u32, plan.clone()).await?;
        }
    }
    let up = wait_for(&pubs, Duration::from_secs(args.join_timeout_s), is_up).await;
    if up < pubs.len() {
        let why: Vec<String> = pubs.iter().filter_map(|m| m.c().why()).collect();
        bail!("{up} of {} publishers connected {why:?}", pubs.len());
    }
    Ok(pubs)
}

/// Joins viewers numbered `from..to`, a few at a time.
async fn join_viewers(t: &Target, from: usize, to: usize) -> (Vec<Member>, Vec<String>) {
    let results: Vec<Result<Member>> = futures_util::stream::iter(from..to)
        .map(|i| t.viewer(1000 + i as u32))
        .buffer_unordered(JOIN_CONCURRENCY)
        .collect()
        .await;
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for r in results {
        match r {
            Ok(m) => ok.push(m),
            Err(e) => errs.push(format!("{e:#}")),
        }
    }
    (ok, errs)
}

/// One target: publishers, then viewers in steps until a limit; appends a row per step.
async fn one(common: &Common, args: &Args, name: &str, rows: &mut Vec<Row>) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let t = start_target(common, args, name).await?;
    let pubs = publishers(&t, args).await?;
    let rss0 = crate::sys::rss_kib(t.pid()).unwrap_or(0);
    let cores = server_cores(&common.server_cpus);
    let mut viewers: Vec<Member> = Vec::new();
    let mut want = args.subs_start.max(1).min(args.subs_max.max(1));
    loop {
        let from = viewers.len();
        let (joined, errs) = join_viewers(&t, from, want).await;
        if !errs.is_empty() {
            notes.push(format!(
                "{name}: {} viewers failed to join: {}",
                errs.len(),
                errs[0]
            ));
        }
        viewers.extend(joined);
        let limit = Duration::from_secs(args.join_timeout_s);
        wait_for(&viewers[from..], limit, |m| ready(m, args.publishers)).await;
        let row = measure(&t, args, &pubs, &viewers, from, rss0).await;
        eprintln!(
            "{name}: {} viewers ({} ready): {:.0} packets/s, cpu {:.0}%, {:.1} Mbit/s, loss {:.2}%, {:.0}% of full rate, first keyframe p50 {:.0} ms",
            row.viewers,
            row.ready,
            row.pps,
            row.cpu_pct,
            row.mbps,
            row.loss_pct,
            row.full_pct,
            row.key_p50
        );
        let stop = row.loss_pct > args.loss_limit_pct
            || row.cpu_pct > args.cpu_limit_pct * cores as f64
            || !errs.is_empty()
            || want >= args.subs_max;
        rows.push(row);
        if stop {
            break;
        }
        want = (want + args.subs_step).min(args.subs_max);
    }
    let dead: Vec<String> = viewers
        .iter()
        .chain(&pubs)
        .filter_map(|m| m.c().why())
        .collect();
    if !dead.is_empty() {
        notes.push(format!("{name}: {} peers ended: {}", dead.len(), dead[0]));
    }
    let sent: u64 = pubs
        .iter()
        .map(|p| Counters::get(&p.c().keyframes_out))
        .sum();
    let asked: u64 = pubs.iter().map(|p| Counters::get(&p.c().requests_in)).sum();
    notes.push(format!(
        "{name}: publishers got {asked} keyframe requests and sent {sent} keyframes"
    ));
    drop(viewers);
    drop(pubs);
    t.stop().await?;
    Ok(notes)
}

/// Measures one step over `--step-s`: the viewers' counters and the server's CPU and RSS.
async fn measure(
    t: &Target,
    args: &Args,
    pubs: &[Member],
    viewers: &[Member],
    new_from: usize,
    rss0: u64,
) -> Row {
    let sum = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| -> u64 {
        pubs.iter().map(|p| Counters::get(f(p.c()))).sum()
    };
    let cpu = CpuMeter::start(t.pid());
    let a = snap(viewers);
    let (out0, skipped0) = (sum(|c| &c.full_out), sum(|c| &c.skipped));
    tokio::time::sleep(Duration::from_secs(args.step_s)).await;
    let b = snap(viewers);
    let full = (sum(|c| &c.full_out) - out0) * viewers.len() as u64;
    let skipped = sum(|c| &c.skipped) - skipped0;
    let cpu_pct = cpu.percent();
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64().max(1e-3),
        _ => args.step_s as f64,
    };
    let packets = b.packets - a.packets;
    let expected = (b.expected - a.expected).max(packets);
    let mut keys: Vec<f64> = viewers[new_from..]
        .iter()
        .flat_map(|m| {
            m.c()
                .first_keyframe_ms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
        .collect();
    keys.sort_by(f64::total_cmp);
    let rss = crate::sys::rss_kib(t.pid()).unwrap_or(0);
    Row {
        target: t.name(),
        viewers: viewers.len(),
        ready: viewers.iter().filter(|m| ready(m, args.publishers)).count(),
        pps: packets as f64 / secs,
        cpu_pct,
        mbps: (b.bytes - a.bytes) as f64 * 8.0 / secs / 1e6,
        loss_pct: if expected == 0 {
            100.0
        } else {
            100.0 * (expected - packets) as f64 / expected as f64
        },
        full_pct: if full == 0 {
            f64::NAN
        } else {
            100.0 * packets as f64 / full as f64
        },
        key_p50: percentile(&keys, 0.5),
        key_p99: percentile(&keys, 0.99),
        rss_per_viewer_kib: rss.saturating_sub(rss0) as f64 / viewers.len().max(1) as f64,
        skipped,
        nacks: b.nacks - a.nacks,
        plis: b.plis - a.plis,
    }
}

/// The correctness run inside `smoke`: one publisher and two viewers on a studyhall SFU for a
/// short step; every viewer must get a keyframe of the video and packets of both tracks.
/// Returns the failures (none: passed) and how many viewers were replaced because their
/// DTLS never came up.
pub async fn check(common: &Common) -> Result<(Vec<String>, usize)> {
    let args = Args {
        publishers: 1,
        video_kbps: 200,
        simulcast: true,
        keyframe_s: 1,
        subs_start: 2,
        subs_step: 1,
        subs_max: 2,
        step_s: 2,
        join_timeout_s: 20,
        loss_limit_pct: 100.0,
        cpu_limit_pct: 100.0,
        janus_bin: String::new(),
    };
    let t = Target::Studyhall(studyhall(common, "smoke-sfu", 6).await?);
    let pubs = publishers(&t, &args).await?;
    let (mut viewers, mut errs) = join_viewers(&t, 0, 2).await;
    // A str0m viewer whose first DTLS ClientHello goes unanswered does not send it again
    // (a browser would): such a viewer is replaced once by a fresh session, and counted.
    let up = |m: &Member| m.c().connected.load(std::sync::atomic::Ordering::Acquire);
    wait_for(&viewers, DTLS_UP, up).await;
    let stuck = viewers.iter().filter(|m| !up(m)).count();
    if stuck > 0 {
        viewers.retain(up);
        let (again, e) = join_viewers(&t, 2, 2 + stuck).await;
        viewers.extend(again);
        errs.extend(e);
        eprintln!("sfu: {stuck} viewer(s) never got DTLS up and were replaced");
    }
    let mut failures: Vec<String> = errs
        .iter()
        .map(|e| format!("sfu: a viewer failed: {e}"))
        .collect();
    wait_for(&viewers, Duration::from_secs(args.join_timeout_s), |m| {
        ready(m, 1)
    })
    .await;
    let a = snap(&viewers);
    // The measured window.
    tokio::time::sleep(Duration::from_secs(args.step_s)).await;
    let b = snap(&viewers);
    if b.packets <= a.packets {
        failures.push("sfu: no packets reached the viewers during the step".into());
    }
    for (i, v) in viewers.iter().enumerate() {
        let c = v.c();
        let (audio, video) = (
            Counters::get(&c.audio_packets),
            Counters::get(&c.video_packets),
        );
        if Counters::get(&c.keyed_tracks) < 1 {
            failures.push(format!("sfu: viewer {i} got no keyframe"));
        }
        if audio == 0 || video == 0 {
            let connected = c.connected.load(std::sync::atomic::Ordering::Acquire);
            failures.push(format!(
                "sfu: viewer {i} got {audio} audio and {video} video packets ({} UDP bytes, \
                 ICE and DTLS up: {connected})",
                Counters::get(&c.bytes)
            ));
        }
        if let Some(why) = c.why() {
            failures.push(format!("sfu: viewer {i} ended: {why}"));
        }
    }
    drop(viewers);
    drop(pubs);
    t.stop().await?;
    Ok((failures, stuck))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cores_from_taskset_lists() {
        assert_eq!(server_cores("0"), 1);
        assert_eq!(server_cores("0-1"), 2);
        assert_eq!(server_cores("0,2-4"), 4);
        assert!(server_cores("") >= 1);
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.99), 4.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
