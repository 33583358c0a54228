//! `classroom`: the realistic mix. R rooms of M members where every member sends a message
//! every P seconds (course chats), plus one live room of L members whose host sends at a
//! fixed rate (a lecture's Q&A stream). Reports delivery latency per traffic class, send-to-ack
//! latency, deliveries/s and the server's CPU (from /proc/PID/stat) and RSS. studyhall only:
//! the peers have no acknowledged, persisted sends to compare.

use super::Common;
use crate::coord::{Plan, Ready, Total, Workers, worker_count};
use crate::hist::Histogram;
use crate::report::{Report, Table, histogram_svg, human, mib, ms};
use crate::sys::{CpuMeter, rss_kib};
use crate::worker::{ConnSpec, Down, Final, Proto};
use anyhow::Result;
use serde_json::json;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Course-chat rooms.
    #[arg(long, default_value_t = 200)]
    pub rooms: u32,
    /// Members per course-chat room.
    #[arg(long, default_value_t = 50)]
    pub members: u32,
    /// Seconds between one member's messages.
    #[arg(long, default_value_t = 10.0)]
    pub every_s: f64,
    /// Members of the live room (0 = no live room).
    #[arg(long, default_value_t = 2000)]
    pub live_members: u32,
    /// Messages per second in the live room.
    #[arg(long, default_value_t = 5.0)]
    pub live_rate: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
}

pub async fn run(common: Common, args: Args) -> Result<bool> {
    let mut report = Report::new(
        "classroom",
        json!({
            "rooms": args.rooms, "members": args.members, "every_s": args.every_s,
            "live_members": args.live_members, "live_rate": args.live_rate,
            "duration_s": args.duration_s, "nodes": common.nodes,
        }),
    );
    let sut = super::Sut::start(&common, Proto::Studyhall, "classroom").await?;
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("course-{r}")).collect();
    sut.rooms(&rooms, "group").await?;
    sut.rooms(&["lecture".to_owned()], "live").await?;
    let pids = sut.pids();
    let conns = conn_specs(&args, &rooms);
    let n = conns.len();
    let rss0 = rss_all(&pids);
    let targets = sut.addrs();
    let nodes = targets.len().max(1);
    let plan = Plan {
        proto: Proto::Studyhall,
        target: sut.addr(),
        targets: targets.clone(),
        conns,
        workers: worker_count(n, common.workers, common.per_worker).max(nodes),
        concurrency: common.concurrency,
        pad: 80,
        track_ids: false,
        reconnect: None,
    };
    let mut traffic = drive(&mut report, plan, &pids, args.duration_s).await?;
    traffic.rss[0] = rss0;
    let nodes_addrs = if targets.is_empty() {
        vec![sut.addr()]
    } else {
        targets.clone()
    };
    for a in &nodes_addrs {
        report.note(crate::procs::commit_note(*a).await);
    }
    let bus = bus_hop_ms(&targets).await;
    sut.stop().await?;
    if nodes > 1 {
        report.note(format!(
            "{nodes} nodes; cross-node bus hop (from /metrics buckets): p50 <= {} ms, p99 <= {} ms",
            bus.0.map_or("-".into(), |v| format!("{v}")),
            bus.1.map_or("-".into(), |v| format!("{v}")),
        ));
    }
    summarize(&mut report, &args, &traffic, nodes, bus);
    report.write(&common.out)?;
    Ok(true)
}

/// What the traffic phase measured.
struct Traffic {
    ready: Ready,
    total: Total,
    /// Summed server CPU over the traffic window (100 = one core).
    cpu_pct: f64,
    /// Server RSS in KiB: before the clients joined, after they joined, at the end.
    rss: [u64; 3],
}

/// Starts the workers, lets the server settle for a second, then sends `Go` and lets the
/// traffic run for `duration_s`, metering server CPU over exactly that window. The idle RSS
/// (`rss[0]`) is left for the caller, who takes it before the workers exist.
async fn drive(report: &mut Report, plan: Plan, pids: &[u32], duration_s: u64) -> Result<Traffic> {
    let t = std::time::Instant::now();
    let (mut workers, ready) = Workers::start(plan, Duration::from_secs(180)).await?;
    report.note(format!(
        "{} clients joined in {:.1} s ({} failed)",
        ready.ok,
        t.elapsed().as_secs_f64(),
        ready.failed
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_all(pids);
    let cpus: Vec<CpuMeter> = pids.iter().copied().map(CpuMeter::start).collect();
    workers.send_all(&Down::Go).await?;
    tokio::time::sleep(Duration::from_secs(duration_s)).await;
    let cpu_pct: f64 = cpus.iter().map(CpuMeter::percent).sum();
    let rss2 = rss_all(pids);
    let total = workers.stop().await?;
    Ok(Traffic {
        ready,
        total,
        cpu_pct,
        rss: [0, rss1, rss2],
    })
}

/// Fills the report from the measurements: the two tables, the per-core and correctness
/// notes, the latency chart and the results JSON.
fn summarize(
    report: &mut Report,
    args: &Args,
    traffic: &Traffic,
    nodes: usize,
    (bus_p50, bus_p99): (Option<f64>, Option<f64>),
) {
    let Traffic {
        ready,
        total,
        cpu_pct,
        rss,
    } = traffic;
    let f = &total.f;
    let group = total.classes.get(&0).cloned().unwrap_or_default();
    let live = total.classes.get(&1).cloned().unwrap_or_default();
    let dur = args.duration_s as f64;
    report
        .tables
        .push(latency_table(args, &group, &live, &total.ack));
    report.tables.push(server_table(ready, f, *cpu_pct, *rss));
    let per_s = (group.count() + live.count()) as f64 / dur;
    report.note(format!(
        "deliveries/s per server core: {} ({} deliveries/s at {cpu_pct:.0} % CPU)",
        crate::report::per_core(per_s, *cpu_pct),
        crate::report::human(per_s)
    ));
    if f.seq_dups + f.seq_gaps > 0 || !f.closes.is_empty() {
        report.note(format!(
            "correctness: {} duplicate seqs, {} seq gaps, clients lost {:?}",
            f.seq_dups, f.seq_gaps, f.closes
        ));
    }
    report.svg(
        "latency",
        histogram_svg(
            "classroom: end-to-end delivery latency",
            &[
                ("course rooms", &group),
                ("live room", &live),
                ("ack", &total.ack),
            ],
        ),
    );
    report.results = json!({
        "clients": ready.ok, "failed": ready.failed, "sent": f.sent, "acked": f.acked,
        "send_errors": f.send_errors, "server_cpu_pct": cpu_pct,
        "rss_kib": rss, "group": group.summary(), "live": live.summary(),
        "ack": total.ack.summary(), "seq_dups": f.seq_dups, "seq_gaps": f.seq_gaps,
        "closes": f.closes, "nodes": nodes,
        "bus_hop_p50_ms_bucket": bus_p50, "bus_hop_p99_ms_bucket": bus_p99,
    });
}

/// Summed resident memory of the server processes, in KiB (a vanished process counts 0).
fn rss_all(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).sum::<u64>()
}

/// The clients: every member of every course room (class 0, each sending every
/// `--every-s`), then the live room (class 1) whose first member is the host that sends at
/// `--live-rate` while the rest only listen.
fn conn_specs(args: &Args, rooms: &[String]) -> Vec<ConnSpec> {
    let mut conns = Vec::new();
    let every_ms = (args.every_s * 1000.0).round().max(1.0) as u64;
    for (r, room) in rooms.iter().enumerate() {
        for m in 0..args.members {
            let id = r as u32 * args.members + m;
            conns.push(ConnSpec {
                id,
                user: id,
                room: room.clone(),
                every_ms,
                count: 0,
                class: 0,
            });
        }
    }
    let base = args.rooms * args.members;
    for i in 0..args.live_members {
        let host = i == 0 && args.live_rate > 0.0;
        conns.push(ConnSpec {
            id: base + i,
            user: base + i,
            room: "lecture".into(),
            every_ms: if host {
                (1000.0 / args.live_rate).round().max(1.0) as u64
            } else {
                0
            },
            count: 0,
            class: 1,
        });
    }
    conns
}

/// Cluster runs: the bus hop (commit-side publish to receipt on another node) at p50 and p99,
/// from each node's /metrics histogram (bucket bounds, so coarse). A node whose metrics can't
/// be read contributes nothing.
async fn bus_hop_ms(targets: &[std::net::SocketAddr]) -> (Option<f64>, Option<f64>) {
    let mut bus = Vec::new();
    for a in targets {
        bus.push(
            crate::procs::bus_latency_buckets(*a)
                .await
                .unwrap_or_default(),
        );
    }
    (
        crate::procs::bucket_quantile_ms(&bus, 0.5),
        crate::procs::bucket_quantile_ms(&bus, 0.99),
    )
}

/// The delivery-latency table: one row per traffic class plus the send-to-ack row.
fn latency_table(args: &Args, group: &Histogram, live: &Histogram, ack: &Histogram) -> Table {
    let dur = args.duration_s as f64;
    let mut table = Table::new(
        "classroom mix",
        &[
            "traffic",
            "deliveries",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ],
    );
    let row = |name: &str, h: &Histogram| {
        let s = h.summary();
        vec![
            name.to_owned(),
            s.count.to_string(),
            human(s.count as f64 / dur),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            ms(s.max_ms),
        ]
    };
    table.row(row(
        &format!(
            "{} rooms x {} (every {} s)",
            args.rooms, args.members, args.every_s
        ),
        group,
    ));
    table.row(row(
        &format!("live room x {} ({}/s)", args.live_members, args.live_rate),
        live,
    ));
    table.row(row("send -> ok (ack)", ack));
    table
}

/// The server table: clients, send counters, CPU and RSS idle / joined / at the end.
fn server_table(ready: &Ready, f: &Final, cpu_pct: f64, rss: [u64; 3]) -> Table {
    Table::one_row(
        "server",
        vec![
            ("clients", ready.ok.to_string()),
            ("msgs sent", f.sent.to_string()),
            ("acked", f.acked.to_string()),
            ("errors", f.send_errors.to_string()),
            ("CPU % (100 = 1 core)", format!("{cpu_pct:.0}")),
            ("RSS idle MiB", mib(rss[0])),
            ("RSS joined MiB", mib(rss[1])),
            ("RSS end MiB", mib(rss[2])),
        ],
    )
}
