//! The coordinator's side of a run: spawning worker processes (this binary re-executed as
//! `worker`), splitting clients among them, the line protocol to drive and collect them, and
//! the publishers that run inside the coordinator (paced senders for studyhall, NATS and
//! Socket.IO, with ack tracking for studyhall).

use crate::client::{Ws, ws_connect};
use crate::frames::{Stamp, nats_connect, nats_pub, now_us, parse_sh, sio_event, stamp_text};
use crate::hist::Histogram;
use crate::worker::{ConnSpec, Down, Final, Job, Proto, Reconnect, Up, socketio_connect};
use anyhow::{Context, Result, bail};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;

/// Most clients one worker process holds (the per-process descriptor limit is 20,000).
pub const MAX_PER_WORKER: usize = 15_000;

/// Deals clients out round-robin to `workers` slices (so each room spreads over workers).
pub fn split(conns: Vec<ConnSpec>, workers: usize) -> Vec<Vec<ConnSpec>> {
    let workers = workers.max(1);
    let mut out = vec![Vec::new(); workers];
    for (i, c) in conns.into_iter().enumerate() {
        out[i % workers].push(c);
    }
    out
}

/// Worker count: `requested`, or enough for `per_worker` clients each (at least 2).
pub fn worker_count(clients: usize, requested: usize, per_worker: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    let per = per_worker.clamp(1, MAX_PER_WORKER);
    clients.div_ceil(per).max(2)
}

/// What a scenario wants from its workers.
pub struct Plan {
    pub proto: Proto,
    pub target: SocketAddr,
    /// Cluster runs: the nodes; worker `w` connects all its clients to node `w % len`
    /// (empty: every worker uses `target`).
    pub targets: Vec<SocketAddr>,
    pub conns: Vec<ConnSpec>,
    pub workers: usize,
    pub concurrency: usize,
    pub pad: usize,
    pub track_ids: bool,
    pub reconnect: Option<Reconnect>,
}

struct WorkerProc {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

pub struct Workers {
    procs: Vec<WorkerProc>,
}

/// Summed `ready` reports.
#[derive(Debug, Default)]
pub struct Ready {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub connect: Histogram,
    /// First handshake start to last join, over all workers.
    pub window_s: f64,
}

impl Workers {
    /// Starts the workers and waits until every client is connected (or failed).
    pub async fn start(plan: Plan, timeout: Duration) -> Result<(Self, Ready)> {
        let exe = std::env::current_exe()?;
        let slices = split(plan.conns, plan.workers);
        let mut procs = Vec::new();
        for (w, conns) in slices.into_iter().enumerate() {
            let job = Job {
                worker: w,
                proto: plan.proto,
                target: if plan.targets.is_empty() {
                    plan.target
                } else {
                    plan.targets[w % plan.targets.len()]
                },
                secret: crate::procs::JWT_SECRET.into(),
                // Worker w uses 127.0.0.(10 + 8w) .. +8.
                src_base: 10u8.wrapping_add((8 * w) as u8),
                src_count: 8,
                conns,
                concurrency: plan.concurrency,
                pad: plan.pad,
                track_ids: plan.track_ids,
                reconnect: plan.reconnect,
            };
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("spawn worker")?;
            if let Some(pid) = child.id() {
                crate::procs::pin_load(pid)?;
            }
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut line = serde_json::to_string(&job)?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
            procs.push(WorkerProc {
                _child: child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        let mut me = Self { procs };
        let ups = me
            .recv_all(timeout)
            .await
            .context("waiting for workers to connect")?;
        let mut ready = Ready::default();
        let (mut start, mut end) = (u64::MAX, 0);
        for up in ups {
            let Up::Ready {
                ok,
                failed,
                errors,
                connect,
                start_us,
                end_us,
            } = up
            else {
                bail!("worker sent {up:?} instead of ready");
            };
            ready.ok += ok;
            ready.failed += failed;
            for (k, v) in errors {
                *ready.errors.entry(k).or_default() += v;
            }
            ready.connect.merge(&Histogram::from_sparse(&connect));
            start = start.min(start_us);
            end = end.max(end_us);
        }
        ready.window_s = end.saturating_sub(start) as f64 / 1e6;
        Ok((me, ready))
    }

    pub async fn send_all(&mut self, cmd: &Down) -> Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        for p in &mut self.procs {
            p.stdin.write_all(line.as_bytes()).await?;
            p.stdin.flush().await?;
        }
        Ok(())
    }

    async fn recv_all(&mut self, timeout: Duration) -> Result<Vec<Up>> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        for (w, p) in self.procs.iter_mut().enumerate() {
            let line = tokio::time::timeout_at(deadline, p.lines.next_line())
                .await
                .with_context(|| format!("worker {w} did not answer in time"))??
                .with_context(|| format!("worker {w} exited"))?;
            out.push(serde_json::from_str(&line).with_context(|| format!("worker {w}: {line}"))?);
        }
        Ok(out)
    }

    /// Deliveries of stamp tag `step` so far, over all workers.
    pub async fn count(&mut self, step: u32) -> Result<u64> {
        self.send_all(&Down::Count { step }).await?;
        let mut n = 0;
        for up in self.recv_all(Duration::from_secs(30)).await? {
            if let Up::Count { n: c } = up {
                n += c;
            }
        }
        Ok(n)
    }

    /// Waits until `expected` deliveries of `step` arrived or `max` passed; returns the count.
    pub async fn drain(&mut self, step: u32, expected: u64, max: Duration) -> Result<u64> {
        let t = Instant::now();
        loop {
            let n = self.count(step).await?;
            if n >= expected || t.elapsed() >= max {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The delivery histogram of tag `step`, one per worker (worker order).
    pub async fn collect_each(&mut self, step: u32) -> Result<Vec<Histogram>> {
        self.send_all(&Down::Collect { step }).await?;
        let mut out = Vec::new();
        for up in self.recv_all(Duration::from_secs(30)).await? {
            if let Up::Step { hist, .. } = up {
                out.push(Histogram::from_sparse(&hist));
            }
        }
        Ok(out)
    }

    /// Stops every worker and sums their final reports.
    pub async fn stop(mut self) -> Result<Total> {
        self.send_all(&Down::Stop).await?;
        let mut t = Total::default();
        for up in self.recv_all(Duration::from_secs(60)).await? {
            if let Up::Final(f) = up {
                t.add(&f);
            }
        }
        Ok(t)
    }
}

/// Final reports of all workers, merged.
#[derive(Debug, Default)]
pub struct Total {
    pub classes: BTreeMap<u32, Histogram>,
    pub ack: Histogram,
    pub rejoin: Histogram,
    pub f: Final,
}

impl Total {
    fn add(&mut self, f: &Final) {
        for (k, s) in &f.classes {
            self.classes
                .entry(*k)
                .or_default()
                .merge(&Histogram::from_sparse(s));
        }
        self.ack.merge(&Histogram::from_sparse(&f.ack));
        self.rejoin.merge(&Histogram::from_sparse(&f.rejoin));
        let a = &mut self.f;
        a.sent += f.sent;
        a.acked += f.acked;
        a.send_errors += f.send_errors;
        a.seq_dups += f.seq_dups;
        a.seq_gaps += f.seq_gaps;
        a.stamp_dups += f.stamp_dups;
        a.rejoins += f.rejoins;
        a.replayed += f.replayed;
        a.gap_flags += f.gap_flags;
        a.alive += f.alive;
        for (k, v) in &f.unique_by_room {
            *a.unique_by_room.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &f.other_frames {
            *a.other_frames.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &f.closes {
            *a.closes.entry(k.clone()).or_default() += v;
        }
        for (k, (lo, hi)) in &f.final_seq_by_room {
            let e = a.final_seq_by_room.entry(k.clone()).or_insert((*lo, *hi));
            e.0 = e.0.min(*lo);
            e.1 = e.1.max(*hi);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Publishers (in the coordinator process)

type Sink = Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>;

/// One publishing connection.
pub struct Publisher {
    proto: Proto,
    sink: Sink,
    rid: i64,
    /// What the replies said, shared with the reader task.
    pub replies: Replies,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Publisher {
    /// Connects as user `u{user}` (studyhall: joins `room`, reads and discards its own copies).
    pub async fn connect(
        proto: Proto,
        target: SocketAddr,
        src: Ipv4Addr,
        user: u32,
        room: &str,
    ) -> Result<Self> {
        let ws = publisher_ws(proto, target, src, user, room).await?;
        let (sink, stream) = ws.split();
        let sink: Sink = Arc::new(tokio::sync::Mutex::new(sink));
        let replies = Replies::default();
        let reader = tokio::spawn(read_replies(proto, stream, sink.clone(), replies.clone()));
        Ok(Self {
            proto,
            sink,
            rid: 0,
            replies,
            reader,
        })
    }

    pub async fn publish(&mut self, room: &str, stamp: Stamp, pad: usize) -> Result<()> {
        let text = stamp_text(stamp, pad);
        let msg = match self.proto {
            Proto::Studyhall => {
                self.rid += 1;
                self.replies
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(self.rid, stamp.t_us);
                Message::text(
                    serde_json::json!({"type": "send", "room": room, "text": text,
                        "client_msg_id": format!("p{}-{}", stamp.sender, stamp.n), "rid": self.rid})
                    .to_string(),
                )
            }
            Proto::Nats => Message::binary(nats_pub(room, &text).into_bytes()),
            Proto::Socketio => {
                Message::text(sio_event(None, &serde_json::json!(["pub", room, text])))
            }
        };
        self.sink.lock().await.send(msg).await.context("publish")?;
        Ok(())
    }

    /// Sends not yet acknowledged (always 0 for the fire-and-forget peers).
    pub fn unacked(&self) -> usize {
        self.replies
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Waits until fewer than `window` sends are unacknowledged (or `max` passes).
    pub async fn below(&self, window: usize, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let replied = self.replies.replied.notified();
            if self.unacked() < window {
                return;
            }
            if tokio::time::timeout_at(deadline, replied).await.is_err() {
                return;
            }
        }
    }

    pub async fn wait_acks(&self, max: Duration) {
        let t = Instant::now();
        while self.unacked() > 0 && t.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A publisher's connection, ready to send: studyhall signed in and joined to `room`, NATS
/// past its INFO/CONNECT exchange, Socket.IO past its handshake.
async fn publisher_ws(
    proto: Proto,
    target: SocketAddr,
    src: Ipv4Addr,
    user: u32,
    room: &str,
) -> Result<Ws> {
    Ok(match proto {
        Proto::Studyhall => {
            let token = studyhall::auth::Tokens::new(crate::procs::JWT_SECRET.as_bytes()).sign(
                &format!("u{user}"),
                &format!("U{user}"),
                studyhall::protocol::PlatformRole::Student,
                HashMap::new(),
                Duration::from_secs(3600),
            )?;
            crate::client::studyhall_session(target, src, &token, room, None, |_| {})
                .await?
                .0
        }
        Proto::Nats => {
            let mut ws = ws_connect(target, src, "/", None).await?;
            let _info = crate::client::next_text(&mut ws).await?;
            ws.send(Message::binary(nats_connect().into_bytes()))
                .await?;
            ws
        }
        Proto::Socketio => socketio_connect(target, src).await?,
    })
}

/// What a publisher's reply reader shares with it: sends awaiting their reply, the ack
/// latencies and counters, and the wake-up for a sender waiting at its window.
#[derive(Clone, Default)]
pub struct Replies {
    /// rid -> send time (studyhall only).
    pending: Arc<Mutex<HashMap<i64, u64>>>,
    pub ack: Arc<Mutex<Histogram>>,
    pub acked: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    /// Highest seq acknowledged (studyhall only).
    pub last_seq: Arc<AtomicU64>,
    /// Signalled on every reply, so a sender at its window waits without polling a timer.
    replied: Arc<tokio::sync::Notify>,
}

impl Replies {
    /// A studyhall frame: an `ok` or `error` for a pending send settles it (recording the
    /// ack latency, or counting the error); everything else is ignored.
    fn on_studyhall(&self, text: &str) {
        let Some(f) = parse_sh(text) else { return };
        if f.ty != "ok" && f.ty != "error" {
            return;
        }
        let Some(rid) = f.rid else { return };
        let sent = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&rid);
        self.replied.notify_one();
        if f.ty == "error" {
            self.errors.fetch_add(1, Relaxed);
            eprintln!("publisher: {text}");
        } else if let Some(t0) = sent {
            self.ack
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(now_us().saturating_sub(t0));
            self.acked.fetch_add(1, Relaxed);
            if let Some(s) = f.seq {
                self.last_seq.fetch_max(s as u64, Relaxed);
            }
        }
    }
}

/// The publisher's reader task: settles studyhall replies and answers the peers' keepalive
/// pings (NATS `PING`, Engine.IO `2`) until the socket ends.
async fn read_replies(
    proto: Proto,
    mut stream: futures_util::stream::SplitStream<Ws>,
    sink: Sink,
    replies: Replies,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let data: Vec<u8> = match msg {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            _ => continue,
        };
        match proto {
            Proto::Studyhall => {
                let Ok(text) = std::str::from_utf8(&data) else {
                    continue;
                };
                replies.on_studyhall(text);
            }
            Proto::Nats => {
                if data.windows(6).any(|w| w == b"PING\r\n") {
                    let _ = sink
                        .lock()
                        .await
                        .send(Message::binary(b"PONG\r\n".to_vec()))
                        .await;
                }
            }
            Proto::Socketio => {
                if data == b"2" {
                    let _ = sink.lock().await.send(Message::text("3")).await;
                }
            }
        }
    }
}

/// Sends `rate` messages per second for `dur` to `room`, spread over `pubs` round-robin,
/// stamped with `step` and sender `pubs index`. Returns how many were sent and the achieved
/// rate (lower than asked when the sockets push back).
pub async fn pace(
    pubs: &mut [Publisher],
    room: &str,
    rate: f64,
    dur: Duration,
    step: u32,
    pad: usize,
    counter: &mut u32,
) -> Result<(u64, f64)> {
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    let n = pubs.len().max(1);
    loop {
        let el = t0.elapsed();
        if el >= dur {
            break;
        }
        let due = (el.as_secs_f64() * rate) as u64 + 1;
        while sent < due {
            let i = (sent as usize) % n;
            *counter += 1;
            let stamp = Stamp {
                step,
                t_us: now_us(),
                sender: i as u32,
                n: *counter,
            };
            pubs[i].publish(room, stamp, pad).await?;
            sent += 1;
            if t0.elapsed() >= dur {
                break;
            }
        }
        let next = Duration::from_secs_f64(due as f64 / rate);
        let wait = next
            .saturating_sub(t0.elapsed())
            .max(Duration::from_micros(500));
        tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
    }
    Ok((sent, sent as f64 / t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: u32) -> ConnSpec {
        ConnSpec {
            id,
            user: id,
            room: "r".into(),
            every_ms: 0,
            count: 0,
            class: 0,
        }
    }

    #[test]
    fn split_deals_round_robin() {
        let s = split((0..7).map(spec).collect(), 3);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2, 2]);
        assert_eq!(s[1][0].id, 1);
        assert_eq!(s[1][1].id, 4);
    }

    #[test]
    fn worker_counts() {
        assert_eq!(worker_count(100, 0, 5000), 2);
        assert_eq!(worker_count(12_001, 0, 5000), 3);
        assert_eq!(worker_count(100, 5, 5000), 5);
        assert_eq!(worker_count(40_000, 0, 100_000), 3, "capped per worker");
    }

    #[test]
    fn totals_merge_seq_ranges_and_counts() {
        let mut t = Total::default();
        let mut a = Final {
            sent: 2,
            seq_gaps: 1,
            ..Default::default()
        };
        a.final_seq_by_room.insert("r".into(), (5, 9));
        a.unique_by_room.insert("r".into(), 10);
        let mut b = Final {
            sent: 3,
            ..Default::default()
        };
        b.final_seq_by_room.insert("r".into(), (3, 7));
        b.unique_by_room.insert("r".into(), 5);
        t.add(&a);
        t.add(&b);
        assert_eq!(t.f.sent, 5);
        assert_eq!(t.f.seq_gaps, 1);
        assert_eq!(t.f.final_seq_by_room["r"], (3, 9));
        assert_eq!(t.f.unique_by_room["r"], 15);
    }
}
