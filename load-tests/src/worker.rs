//! Worker processes: `studyhall-load worker` holds one slice of a run's client sockets (each
//! worker stays well under the 20,000 descriptors a process may open) on a single-threaded
//! runtime. It reads its [`Job`] as one JSON line on stdin, connects every client (studyhall,
//! NATS-over-WebSocket or Socket.IO), answers `ready`, then obeys line commands (`go`,
//! `count`, `collect`, `stop`) and reports histograms and correctness counters as JSON lines
//! on stdout. Also the per-client loops: latency recording from the stamped text, per-room
//! `seq` continuity (duplicates and gaps), exactly-once sets, timed sends with ack latency,
//! and drop-and-resume cycles with `join {after_seq}`.

use crate::client::{Ws, next_text, src_ip, studyhall_session, ws_connect};
use crate::frames::{
    Eio, NatsOp, NatsParser, Sio, Stamp, fast_message, nats_connect_and_sub, now_us, parse_eio,
    parse_sh, parse_stamp, sio_event, stamp_text,
};
use crate::hist::{Histogram, Sparse};
use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Studyhall,
    Nats,
    Socketio,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Studyhall => "studyhall",
            Proto::Nats => "nats",
            Proto::Socketio => "socketio",
        }
    }
}

/// One client of a worker.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ConnSpec {
    /// Run-wide client number (the `sender` in stamps).
    pub id: u32,
    /// User number: the token's `sub` is `u{user}`.
    pub user: u32,
    pub room: String,
    /// Send a message every this many ms after `go` (0 = never send).
    #[serde(default)]
    pub every_ms: u64,
    /// Stop after this many messages (0 = until `stop`).
    #[serde(default)]
    pub count: u32,
    /// Stamp tag of the messages it sends (traffic class).
    #[serde(default)]
    pub class: u32,
}

/// Drop-and-resume cycling (studyhall only): connected for `up_ms`, then gone for `down_ms`,
/// both drawn uniformly from the ranges, until `stop`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Reconnect {
    pub up_ms: (u64, u64),
    pub down_ms: (u64, u64),
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    pub worker: usize,
    pub proto: Proto,
    pub target: SocketAddr,
    pub secret: String,
    /// Source addresses 127.0.0.(src_base .. src_base + src_count).
    pub src_base: u8,
    pub src_count: u8,
    pub conns: Vec<ConnSpec>,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Message text length.
    pub pad: usize,
    /// Keep a per-client set of (sender, n) to prove exactly-once delivery.
    pub track_ids: bool,
    pub reconnect: Option<Reconnect>,
}

/// Coordinator to worker.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Down {
    /// Senders start.
    Go,
    /// How many deliveries of stamp tag `step` so far.
    Count { step: u32 },
    /// Hand over (and forget) the delivery histogram of tag `step`.
    Collect { step: u32 },
    /// Close every client and report.
    Stop,
}

/// Worker to coordinator.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Up {
    Ready {
        ok: u64,
        failed: u64,
        errors: BTreeMap<String, u64>,
        /// Connect + upgrade + hello + join, per client.
        connect: Sparse,
        start_us: u64,
        end_us: u64,
    },
    Count {
        n: u64,
    },
    Step {
        step: u32,
        hist: Sparse,
    },
    Final(Box<Final>),
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct Final {
    /// Delivery latency by stamp tag, for tags not collected earlier.
    pub classes: Vec<(u32, Sparse)>,
    /// Send-to-ok latency of this worker's senders.
    pub ack: Sparse,
    pub sent: u64,
    pub acked: u64,
    pub send_errors: u64,
    /// Room events whose seq was not the next one expected.
    pub seq_dups: u64,
    pub seq_gaps: u64,
    /// (sender, n) seen twice by one client.
    pub stamp_dups: u64,
    /// Sum over clients of distinct (sender, n) received, per room.
    pub unique_by_room: BTreeMap<String, u64>,
    /// Lowest and highest last seq a client of the room had seen at stop.
    pub final_seq_by_room: BTreeMap<String, (i64, i64)>,
    /// Clients lost before `stop`, by reason.
    pub closes: BTreeMap<String, u64>,
    pub rejoins: u64,
    pub replayed: u64,
    /// Resumes answered `gap: true` (more missed than the replay limit).
    pub gap_flags: u64,
    /// Reconnect to replay complete.
    pub rejoin: Sparse,
    /// Clients still connected at stop.
    pub alive: u64,
    /// Other frames received (presence, online counts, ...), by type.
    #[serde(default)]
    pub other_frames: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Stats {
    steps: BTreeMap<u32, Histogram>,
    ack: Histogram,
    rejoin: Histogram,
    fin: Final,
}

struct Shared {
    job: Job,
    stats: Mutex<Stats>,
    go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delivered(&self, s: Stamp, now: u64) {
        let lat = now.saturating_sub(s.t_us);
        self.stats().steps.entry(s.step).or_default().record(lat);
    }

    /// The worker's final report: the counters, with the histograms in sparse form.
    fn take_final(&self) -> Final {
        let mut st = self.stats();
        let mut fin = std::mem::take(&mut st.fin);
        fin.classes = st.steps.iter().map(|(k, h)| (*k, h.to_sparse())).collect();
        fin.ack = st.ack.to_sparse();
        fin.rejoin = st.rejoin.to_sparse();
        fin
    }

    fn closed(&self, why: String) {
        *self.stats().fin.closes.entry(why).or_default() += 1;
    }
}

fn emit(up: &Up) {
    use std::io::Write;
    let line = serde_json::to_string(up).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// First line of an error, for counting failures by kind.
fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    s.chars().take(120).collect()
}

/// Entry point of `studyhall-load worker`.
pub fn main() -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let line = stdin
        .next_line()
        .await?
        .context("worker: no job on stdin")?;
    let job: Job = serde_json::from_str(&line).context("worker: bad job")?;
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let minted = mint_tokens(&job)?;
    let n = job.conns.len();
    let concurrency = job.concurrency.max(1);
    let sh = Arc::new(Shared {
        job,
        stats: Mutex::default(),
        go,
        stop,
    });
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<u64, String>>();
    let sem = Arc::new(Semaphore::new(concurrency));
    let start_us = now_us();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in minted.into_iter().enumerate() {
        tasks.spawn(client(sh.clone(), i, token, ready_tx.clone(), sem.clone()));
    }
    drop(ready_tx);
    emit(&await_ready(&mut ready_rx, n, start_us).await);
    while let Some(line) = stdin.next_line().await? {
        match serde_json::from_str::<Down>(&line).context("worker: bad command")? {
            Down::Go => {
                let _ = go_tx.send(true);
            }
            Down::Count { step } => {
                let n = sh.stats().steps.get(&step).map_or(0, Histogram::count);
                emit(&Up::Count { n });
            }
            Down::Collect { step } => {
                let h = sh.stats().steps.remove(&step).unwrap_or_default();
                emit(&Up::Step {
                    step,
                    hist: h.to_sparse(),
                });
            }
            Down::Stop => {
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while tasks.join_next().await.is_some() {}
                })
                .await;
                emit(&Up::Final(Box::new(sh.take_final())));
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One sign-in token per client (studyhall only; the peers need none, so theirs are empty).
fn mint_tokens(job: &Job) -> Result<Vec<String>> {
    let tokens = studyhall::auth::Tokens::new(job.secret.as_bytes());
    let mut minted = Vec::with_capacity(job.conns.len());
    for c in &job.conns {
        minted.push(if job.proto == Proto::Studyhall {
            tokens.sign(
                &format!("u{}", c.user),
                &format!("U{}", c.user),
                studyhall::protocol::PlatformRole::Student,
                HashMap::new(),
                Duration::from_secs(3600),
            )?
        } else {
            String::new()
        });
    }
    Ok(minted)
}

/// Waits for all `n` clients to report joined or failed and sums that into the `ready`
/// report (failures counted by error, handshake times as a histogram).
async fn await_ready(
    rx: &mut mpsc::UnboundedReceiver<Result<u64, String>>,
    n: usize,
    start_us: u64,
) -> Up {
    let (mut ok, mut failed) = (0, 0);
    let mut errors = BTreeMap::new();
    let mut connect = Histogram::new();
    for _ in 0..n {
        match rx.recv().await {
            Some(Ok(us)) => {
                ok += 1;
                connect.record(us);
            }
            Some(Err(e)) => {
                failed += 1;
                *errors.entry(e).or_insert(0) += 1;
            }
            None => break,
        }
    }
    Up::Ready {
        ok,
        failed,
        errors,
        connect: connect.to_sparse(),
        start_us,
        end_us: now_us(),
    }
}

/// A client's handshake slot: holds one of the worker's concurrency permits until the client
/// reports itself joined (or failed), and times the handshake.
struct Gate {
    tx: mpsc::UnboundedSender<Result<u64, String>>,
    permit: Option<OwnedSemaphorePermit>,
    t0: Instant,
}

impl Gate {
    fn joined(&mut self) {
        let _ = self.tx.send(Ok(self.t0.elapsed().as_micros() as u64));
        self.permit = None;
    }

    fn failed(&mut self, e: &anyhow::Error) {
        let _ = self.tx.send(Err(short(e)));
        self.permit = None;
    }

    /// Reports a client's handshake: joined with its result, or failed (then `None`: the
    /// client is done).
    fn settle<T>(&mut self, handshake: Result<T>) -> Option<T> {
        match handshake {
            Ok(x) => {
                self.joined();
                Some(x)
            }
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }
}

/// One client: connect (bounded concurrency), report ready, then run until stop.
async fn client(
    sh: Arc<Shared>,
    i: usize,
    token: String,
    ready: mpsc::UnboundedSender<Result<u64, String>>,
    sem: Arc<Semaphore>,
) {
    let job = &sh.job;
    let spec = &job.conns[i];
    let src = src_ip(job.src_base, job.src_count, i);
    let permit = sem.acquire_owned().await.ok();
    let mut gate = Gate {
        tx: ready,
        permit,
        t0: Instant::now(),
    };
    let res = match job.proto {
        Proto::Studyhall => studyhall_client(&sh, spec, src, &token, &mut gate).await,
        Proto::Nats => nats_client(&sh, spec, src, &mut gate).await,
        Proto::Socketio => socketio_client(&sh, spec, src, &mut gate).await,
    };
    if let Err(e) = res {
        sh.closed(short(&e));
    }
}

/// Waits for the stop signal.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A peer client's next text or binary frame, or `None` once stop is signalled (checked
/// first). The server closing, a read error or the end of the socket is an error.
async fn next_data(ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> Result<Option<Message>> {
    loop {
        tokio::select! {
            biased;
            _ = stopped(stop) => return Ok(None),
            msg = ws.next() => match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(Some(m)),
                Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("read: {e}"),
                None => bail!("socket ended"),
            },
        }
    }
}

/// A peer client's end at stop: closes the socket (bounded) and counts the client alive.
async fn close_alive(sh: &Shared, mut ws: Ws) -> Result<()> {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    sh.stats().fin.alive += 1;
    Ok(())
}

/// Per-client delivery bookkeeping for studyhall rooms.
struct Tracker {
    /// The next seq this client must see.
    expect: i64,
    seen: HashSet<(u32, u32)>,
    track: bool,
}

impl Tracker {
    fn on_message(&mut self, sh: &Shared, seq: Option<i64>, text: Option<&str>) {
        let now = now_us();
        if let Some(seq) = seq {
            if seq < self.expect {
                sh.stats().fin.seq_dups += 1;
            } else {
                if seq > self.expect {
                    sh.stats().fin.seq_gaps += (seq - self.expect) as u64;
                }
                self.expect = seq + 1;
            }
        }
        if let Some(s) = text.and_then(parse_stamp) {
            if self.track && !self.seen.insert((s.sender, s.n)) {
                sh.stats().fin.stamp_dups += 1;
            }
            sh.delivered(s, now);
        }
    }
}

enum Exit {
    Stop,
    /// Time to drop the connection and resume later.
    Cycle,
}

/// One studyhall client: join, then alternate connected stretches (receiving, and sending
/// on its schedule) with drop-and-resume cycles when the job asks for them, until stop.
async fn studyhall_client(
    sh: &Shared,
    spec: &ConnSpec,
    src: std::net::Ipv4Addr,
    token: &str,
    gate: &mut Gate,
) -> Result<()> {
    let job = &sh.job;
    let first = studyhall_session(job.target, src, token, &spec.room, None, |_| {}).await;
    let Some((mut ws, joined)) = gate.settle(first) else {
        return Ok(());
    };
    let mut conn = ShConn {
        tr: Tracker {
            expect: joined.last_seq + 1,
            seen: HashSet::new(),
            track: job.track_ids,
        },
        sent_n: 0,
        pending: HashMap::new(),
        next_send: None,
    };
    let mut go = sh.go.clone();
    let mut stop = sh.stop.clone();
    loop {
        let up_for = job.reconnect.map(|r| {
            Duration::from_millis(rand::rng().random_range(r.up_ms.0..=r.up_ms.1.max(r.up_ms.0)))
        });
        let cycle_at = up_for.map(|d| tokio::time::Instant::now() + d);
        match conn
            .connected(sh, spec, &mut ws, &mut go, &mut stop, cycle_at)
            .await?
        {
            Exit::Stop => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                conn.on_stop(sh, spec);
                return Ok(());
            }
            Exit::Cycle => {
                // A network drop: no close handshake, the socket just goes away.
                drop(ws);
                ws = conn.resume(sh, spec, src, token, &mut stop).await?;
            }
        }
    }
}

/// A studyhall client's state that outlives one connection: delivery tracking, the send
/// counter, the sends awaiting their ack and the next scheduled send.
struct ShConn {
    tr: Tracker,
    sent_n: u32,
    /// rid -> send time in µs.
    pending: HashMap<i64, u64>,
    next_send: Option<tokio::time::Instant>,
}

impl ShConn {
    /// One connected stretch: receives frames and sends on schedule (once `go` is set) until
    /// stop or, with a reconnect spec, until `cycle_at`.
    async fn connected(
        &mut self,
        sh: &Shared,
        spec: &ConnSpec,
        ws: &mut Ws,
        go: &mut watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
        cycle_at: Option<tokio::time::Instant>,
    ) -> Result<Exit> {
        let job = &sh.job;
        let sender = spec.every_ms > 0;
        loop {
            let started = *go.borrow();
            if sender && started && self.next_send.is_none() && self.may_send(spec) {
                let off = rand::rng().random_range(0..spec.every_ms.max(1));
                self.next_send = Some(tokio::time::Instant::now() + Duration::from_millis(off));
            }
            tokio::select! {
                biased;
                _ = stopped(stop) => return Ok(Exit::Stop),
                _ = go.changed(), if !started => {}
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(f))) => {
                            let code = f.map(|f| u16::from(f.code)).unwrap_or(0);
                            bail!("closed by server with {code}");
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => bail!("read: {e}"),
                        None => bail!("socket ended"),
                    };
                    self.on_text(sh, spec, text.as_str());
                }
                _ = tokio::time::sleep_until(self.next_send.unwrap_or_else(tokio::time::Instant::now)), if self.next_send.is_some() => {
                    self.sent_n += 1;
                    let t_us = now_us();
                    let rid = i64::from(self.sent_n);
                    ws.send(send_frame(spec, job.pad, self.sent_n, t_us)).await.context("send")?;
                    self.sent(sh, spec, rid, t_us);
                }
                _ = tokio::time::sleep_until(cycle_at.unwrap_or_else(tokio::time::Instant::now)), if cycle_at.is_some() => return Ok(Exit::Cycle),
            }
        }
    }

    /// Whether the client's send quota (`count`, 0 = unlimited) leaves room for another send.
    fn may_send(&self, spec: &ConnSpec) -> bool {
        spec.count == 0 || self.sent_n < spec.count
    }

    /// Handles one received text frame: deliveries go to the tracker, `ok` and `error`
    /// settle a pending send, anything else is counted by type.
    fn on_text(&mut self, sh: &Shared, spec: &ConnSpec, text: &str) {
        if let Some((seq, stamp)) = fast_message(text) {
            self.tr.on_message(sh, Some(seq), Some(stamp));
            return;
        }
        let Some(f) = parse_sh(text) else { return };
        match f.ty.as_ref() {
            "message" => self.tr.on_message(sh, f.seq, f.text.as_deref()),
            "ok" => {
                if let Some(t) = f.rid.and_then(|r| self.pending.remove(&r)) {
                    let mut st = sh.stats();
                    st.ack.record(now_us().saturating_sub(t));
                    st.fin.acked += 1;
                }
            }
            "error" => {
                if f.rid.and_then(|r| self.pending.remove(&r)).is_some() {
                    sh.stats().fin.send_errors += 1;
                }
                eprintln!("worker {}: client {} got {}", sh.job.worker, spec.id, text);
            }
            other => {
                *sh.stats()
                    .fin
                    .other_frames
                    .entry(other.to_owned())
                    .or_default() += 1;
            }
        }
    }

    /// Books a send that went out at `t_us` and schedules the next one, if any is left.
    fn sent(&mut self, sh: &Shared, spec: &ConnSpec, rid: i64, t_us: u64) {
        self.pending.insert(rid, t_us);
        sh.stats().fin.sent += 1;
        self.next_send = if self.may_send(spec) {
            self.next_send
                .map(|t| t + Duration::from_millis(spec.every_ms))
        } else {
            None
        };
    }

    /// Final bookkeeping of a client still connected at stop: alive, distinct stamps seen,
    /// and the last seq it had reached in its room.
    fn on_stop(&self, sh: &Shared, spec: &ConnSpec) {
        let mut st = sh.stats();
        st.fin.alive += 1;
        *st.fin.unique_by_room.entry(spec.room.clone()).or_default() += self.tr.seen.len() as u64;
        let last = self.tr.expect - 1;
        let e = st
            .fin
            .final_seq_by_room
            .entry(spec.room.clone())
            .or_insert((last, last));
        e.0 = e.0.min(last);
        e.1 = e.1.max(last);
    }

    /// After a drop: stays away for a random down time (cut short by stop), rejoins with
    /// `after_seq`, consumes the replay and records reconnect-to-caught-up time.
    async fn resume(
        &mut self,
        sh: &Shared,
        spec: &ConnSpec,
        src: std::net::Ipv4Addr,
        token: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Ws> {
        let job = &sh.job;
        let r = job.reconnect.context("cycle without reconnect spec")?;
        let down = rand::rng().random_range(r.down_ms.0..=r.down_ms.1.max(r.down_ms.0));
        tokio::select! {
            _ = stopped(stop) => {
                // Come back once more so the final check sees a caught-up client.
            }
            _ = tokio::time::sleep(Duration::from_millis(down)) => {}
        }
        let t = Instant::now();
        let after = self.tr.expect - 1;
        let (mut ws, j) =
            studyhall_session(job.target, src, token, &spec.room, Some(after), |_| {})
                .await
                .context("resume")?;
        {
            let mut st = sh.stats();
            st.fin.rejoins += 1;
            st.fin.replayed += j.replayed;
            if j.gap {
                st.fin.gap_flags += 1;
            }
        }
        if j.gap {
            // More than the replay limit was missed: the client would page with
            // history; here it is counted and the continuity check restarts.
            self.tr.expect = j.last_seq + 1;
        }
        // Wait for the replay itself (it follows the ok) before timing the resume.
        self.replay(sh, &mut ws, j.last_seq).await?;
        sh.stats().rejoin.record(t.elapsed().as_micros() as u64);
        self.pending.clear();
        Ok(ws)
    }

    /// Reads until the tracker has caught up to `target`, still settling acks that arrive.
    async fn replay(&mut self, sh: &Shared, ws: &mut Ws, target: i64) -> Result<()> {
        while self.tr.expect - 1 < target {
            let text = next_text(ws).await.context("replay")?;
            if let Some(f) = parse_sh(&text) {
                if f.ty == "message" {
                    self.tr.on_message(sh, f.seq, f.text.as_deref());
                } else if let Some(t) = f
                    .rid
                    .filter(|_| f.ty == "ok")
                    .and_then(|r| self.pending.remove(&r))
                {
                    sh.stats().ack.record(now_us().saturating_sub(t));
                }
            }
        }
        Ok(())
    }
}

/// The `send` frame for a client's `n`-th message, stamped with its send time.
fn send_frame(spec: &ConnSpec, pad: usize, n: u32, t_us: u64) -> Message {
    let text = stamp_text(
        Stamp {
            step: spec.class,
            t_us,
            sender: spec.id,
            n,
        },
        pad,
    );
    let frame = serde_json::json!({"type": "send", "room": spec.room, "text": text,
        "client_msg_id": format!("c{}-{}", spec.id, n), "rid": i64::from(n)});
    Message::text(frame.to_string())
}

async fn nats_client(
    sh: &Shared,
    spec: &ConnSpec,
    src: std::net::Ipv4Addr,
    gate: &mut Gate,
) -> Result<()> {
    let mut parser = NatsParser::default();
    let setup = async {
        let mut ws = ws_connect(sh.job.target, src, "/", None).await?;
        let info = next_text(&mut ws).await?;
        let ops = parser.feed(info.as_bytes()).map_err(anyhow::Error::msg)?;
        if !matches!(ops.first(), Some(NatsOp::Info(_))) {
            bail!("expected INFO, got {info}");
        }
        ws.send(Message::binary(
            nats_connect_and_sub(&spec.room, 1).into_bytes(),
        ))
        .await?;
        // The PONG to our PING says the SUB is registered.
        loop {
            let t = next_text(&mut ws).await?;
            let ops = parser.feed(t.as_bytes()).map_err(anyhow::Error::msg)?;
            if let Some(NatsOp::Err(e)) = ops.iter().find(|o| matches!(o, NatsOp::Err(_))) {
                bail!("nats error {e}");
            }
            if ops.contains(&NatsOp::Pong) {
                return Ok::<_, anyhow::Error>(ws);
            }
        }
    };
    let Some(mut ws) = gate.settle(setup.await) else {
        return Ok(());
    };
    let mut stop = sh.stop.clone();
    while let Some(msg) = next_data(&mut ws, &mut stop).await? {
        let now = now_us();
        for op in parser.feed(&msg.into_data()).map_err(anyhow::Error::msg)? {
            match op {
                NatsOp::Msg { payload, .. } => {
                    if let Some(s) = std::str::from_utf8(&payload).ok().and_then(parse_stamp) {
                        sh.delivered(s, now);
                    }
                }
                NatsOp::Ping => ws.send(Message::binary(b"PONG\r\n".to_vec())).await?,
                NatsOp::Err(e) => eprintln!("worker {}: nats -ERR {e}", sh.job.worker),
                _ => {}
            }
        }
    }
    close_alive(sh, ws).await
}

async fn socketio_client(
    sh: &Shared,
    spec: &ConnSpec,
    src: std::net::Ipv4Addr,
    gate: &mut Gate,
) -> Result<()> {
    let setup = async {
        let mut ws = socketio_connect(sh.job.target, src).await?;
        ws.send(Message::text(sio_event(
            Some(0),
            &serde_json::json!(["join", spec.room]),
        )))
        .await?;
        loop {
            let t = next_text(&mut ws).await?;
            match parse_eio(&t).map_err(anyhow::Error::msg)? {
                Eio::Message(Sio::Ack { id: 0, .. }) => return Ok::<_, anyhow::Error>(ws),
                Eio::Ping => ws.send(Message::text("3")).await?,
                _ => {}
            }
        }
    };
    let Some(mut ws) = gate.settle(setup.await) else {
        return Ok(());
    };
    let mut stop = sh.stop.clone();
    while let Some(msg) = next_data(&mut ws, &mut stop).await? {
        let Message::Text(text) = msg else {
            continue;
        };
        let now = now_us();
        match parse_eio(text.as_str()) {
            Ok(Eio::Ping) => ws.send(Message::text("3")).await?,
            Ok(Eio::Message(Sio::Event { data, .. })) => {
                if let Some(s) = data.get(1).and_then(|v| v.as_str()).and_then(parse_stamp) {
                    sh.delivered(s, now);
                }
            }
            Ok(Eio::Close) => bail!("engine.io close"),
            _ => {}
        }
    }
    close_alive(sh, ws).await
}

/// Engine.IO open + Socket.IO connect to the default namespace.
pub async fn socketio_connect(target: SocketAddr, src: std::net::Ipv4Addr) -> Result<Ws> {
    let mut ws = ws_connect(target, src, "/socket.io/?EIO=4&transport=websocket", None).await?;
    let open = next_text(&mut ws).await?;
    if !matches!(parse_eio(&open), Ok(Eio::Open(_))) {
        bail!("expected engine.io open, got {open}");
    }
    ws.send(Message::text("40")).await?;
    loop {
        let t = next_text(&mut ws).await?;
        match parse_eio(&t).map_err(anyhow::Error::msg)? {
            Eio::Message(Sio::Connect(_)) => return Ok(ws),
            Eio::Message(Sio::ConnectError(e)) => bail!("socket.io connect error {e}"),
            Eio::Ping => ws.send(Message::text("3")).await?,
            _ => {}
        }
    }
}
