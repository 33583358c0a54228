//! `reconnect`: K clients in one room repeatedly drop their connection (no close handshake)
//! and come back with `join {after_seq}` while a publisher keeps sending. Measures resumes/s,
//! replayed events/s and resume latency (reconnect to replay complete), and verifies that
//! every client saw every seq exactly once (0 lost, 0 duplicated) and ended at the room's
//! last seq. The phase is shared with `smoke`.

use super::{Common, pub_src};
use crate::coord::{Plan, Publisher, Workers, pace};
use crate::procs::Server;
use crate::report::{Report, Table, human, ms};
use crate::worker::{ConnSpec, Down, Final, Proto, Reconnect};
use anyhow::Result;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Clients that keep dropping and resuming.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages per second published to the room throughout.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Connected time before each drop, ms (min,max).
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    pub up_ms: Vec<u64>,
    /// Time away, ms (min,max).
    #[arg(long, value_delimiter = ',', default_value = "200,1000")]
    pub down_ms: Vec<u64>,
    /// Kind of the room: `group` (everyone hears each arrival and departure) or `live` (the
    /// audience follows presence by count).
    #[arg(long, default_value = "group")]
    pub kind: String,
}

pub struct Params {
    pub clients: usize,
    pub rate: f64,
    pub duration: Duration,
    pub up_ms: (u64, u64),
    pub down_ms: (u64, u64),
    pub room: String,
    /// The room's kind (`group`, `live`, ...).
    pub kind: String,
    pub workers: usize,
}

pub struct Outcome {
    pub failures: Vec<String>,
    pub rows: Vec<String>,
    pub results: serde_json::Value,
    pub rejoin: crate::hist::Histogram,
}

impl Outcome {
    pub fn table(&self) -> Table {
        let mut t = Table::new(
            "resume with after_seq",
            &[
                "clients",
                "published",
                "resumes",
                "resumes/s",
                "replayed events",
                "replayed/s",
                "resume p50 ms",
                "resume p99 ms",
                "lost",
                "dup",
                "gap:true",
                "verdict",
            ],
        );
        t.row(self.rows.clone());
        t
    }
}

fn pair(v: &[u64], default: (u64, u64)) -> (u64, u64) {
    match v {
        [a, b] => (*a.min(b), *a.max(b)),
        [a] => (*a, *a),
        _ => default,
    }
}

/// Runs one resume phase against a running server.
pub async fn phase(common: &Common, server: &Server, p: &Params) -> Result<Outcome> {
    server.create_room(&p.room, &p.kind).await?;
    let plan = resume_plan(common, server, p);
    let mut failures = Vec::new();
    let mut publisher =
        [Publisher::connect(Proto::Studyhall, server.addr, pub_src(0), 999_999, &p.room).await?];
    let (mut workers, ready) = Workers::start(plan, Duration::from_secs(60)).await?;
    if ready.failed > 0 {
        failures.push(format!(
            "{} clients failed to join: {:?}",
            ready.failed, ready.errors
        ));
    }
    workers.send_all(&Down::Go).await?;
    let mut counter = 0;
    let t = std::time::Instant::now();
    let (sent, _) = pace(
        &mut publisher,
        &p.room,
        p.rate,
        p.duration,
        0,
        48,
        &mut counter,
    )
    .await?;
    publisher[0].wait_acks(Duration::from_secs(10)).await;
    let wall = t.elapsed().as_secs_f64();
    let last = publisher[0].replies.last_seq.load(Relaxed) as i64;
    // Let the clients that are away come back and catch up, then stop.
    tokio::time::sleep(Duration::from_millis(p.down_ms.1 + 500)).await;
    let total = workers.stop().await?;
    let f = &total.f;
    let acked = publisher[0].replies.acked.load(Relaxed);
    let published = Published { sent, acked, last };
    let (seqs, unique) = check_resumes(&mut failures, f, p, &published);
    let s = total.rejoin.summary();
    let rows = vec![
        p.clients.to_string(),
        sent.to_string(),
        f.rejoins.to_string(),
        human(f.rejoins as f64 / wall),
        f.replayed.to_string(),
        human(f.replayed as f64 / wall),
        ms(s.p50_ms),
        ms(s.p99_ms),
        f.seq_gaps.to_string(),
        (f.seq_dups + f.stamp_dups).to_string(),
        f.gap_flags.to_string(),
        if failures.is_empty() { "PASS" } else { "FAIL" }.into(),
    ];
    Ok(Outcome {
        failures,
        rows,
        results: json!({
            "published": sent, "acked": acked, "room_last_seq": last, "final_seq_range": seqs,
            "resumes": f.rejoins, "replayed": f.replayed, "wall_s": wall,
            "resume_latency": s, "seq_gaps": f.seq_gaps, "seq_dups": f.seq_dups,
            "stamp_dups": f.stamp_dups, "gap_flags": f.gap_flags, "closes": f.closes,
            "distinct_deliveries": unique,
        }),
        rejoin: total.rejoin,
    })
}

/// The phase's clients: `p.clients` listeners in the room that drop and resume on the
/// `p.up_ms` / `p.down_ms` schedule, tracking every stamp they see.
fn resume_plan(common: &Common, server: &Server, p: &Params) -> Plan {
    let conns: Vec<ConnSpec> = (0..p.clients as u32)
        .map(|i| ConnSpec {
            id: i,
            user: 100_000 + i,
            room: p.room.clone(),
            every_ms: 0,
            count: 0,
            class: 0,
        })
        .collect();
    Plan {
        proto: Proto::Studyhall,
        target: server.addr,
        targets: Vec::new(),
        conns,
        workers: p.workers,
        concurrency: common.concurrency,
        pad: 48,
        track_ids: true,
        reconnect: Some(Reconnect {
            up_ms: p.up_ms,
            down_ms: p.down_ms,
        }),
    }
}

/// What the publisher did: messages sent, acks received, and the room's last seq.
struct Published {
    sent: u64,
    acked: u64,
    last: i64,
}

/// The phase's verdict: every send acked, every client ended at the room's last seq having
/// seen every message exactly once, no `gap: true`, nobody lost, and resumes did happen.
/// Appends one line per failed check; returns the clients' final seq range and their
/// distinct deliveries for the results.
fn check_resumes(
    failures: &mut Vec<String>,
    f: &Final,
    p: &Params,
    published: &Published,
) -> ((i64, i64), u64) {
    let Published { sent, acked, last } = *published;
    if acked != sent {
        failures.push(format!("publisher: {acked} of {sent} acked"));
    }
    let seqs = f
        .final_seq_by_room
        .get(&p.room)
        .copied()
        .unwrap_or((-1, -1));
    if seqs != (last, last) {
        failures.push(format!(
            "clients ended between seq {} and {}, room is at {last}",
            seqs.0, seqs.1
        ));
    }
    if f.seq_gaps > 0 {
        failures.push(format!("{} messages lost (seq gaps)", f.seq_gaps));
    }
    if f.seq_dups + f.stamp_dups > 0 {
        failures.push(format!("{} duplicates", f.seq_dups + f.stamp_dups));
    }
    if f.gap_flags > 0 {
        failures.push(format!("{} resumes answered gap:true", f.gap_flags));
    }
    if f.alive != p.clients as u64 {
        failures.push(format!(
            "{} of {} clients alive at the end",
            f.alive, p.clients
        ));
    }
    if !f.closes.is_empty() {
        failures.push(format!("clients lost: {:?}", f.closes));
    }
    let unique = f.unique_by_room.get(&p.room).copied().unwrap_or(0);
    if unique != sent * p.clients as u64 {
        failures.push(format!(
            "{unique} distinct deliveries, want {} ({} clients x {sent})",
            sent * p.clients as u64,
            p.clients
        ));
    }
    if f.rejoins == 0 {
        failures.push("no client resumed".into());
    }
    (seqs, unique)
}

pub async fn run(common: Common, args: Args) -> Result<bool> {
    let p = Params {
        clients: args.clients,
        rate: args.rate,
        duration: Duration::from_secs(args.duration_s),
        up_ms: pair(&args.up_ms, (500, 2000)),
        down_ms: pair(&args.down_ms, (200, 1000)),
        room: "resume".into(),
        kind: args.kind.clone(),
        workers: crate::coord::worker_count(args.clients, common.workers, common.per_worker),
    };
    let mut report = Report::new(
        "reconnect",
        json!({
            "clients": p.clients, "rate": p.rate, "duration_s": args.duration_s,
            "up_ms": p.up_ms, "down_ms": p.down_ms, "kind": p.kind,
        }),
    );
    let server = common
        .server("reconnect", common.store == "postgres")
        .await?;
    let out = phase(&common, &server, &p).await?;
    server.stop().await?;
    report.tables.push(out.table());
    report.passed = Some(out.failures.is_empty());
    for f in &out.failures {
        report.note(format!("FAIL: {f}"));
    }
    report.svg(
        "resume-latency",
        crate::report::histogram_svg(
            "resume latency (reconnect to replay complete)",
            &[("studyhall", &out.rejoin)],
        ),
    );
    report.results = out.results;
    report.write(&common.out)?;
    Ok(out.failures.is_empty())
}
