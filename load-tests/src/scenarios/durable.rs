//! `durable`: how many messages per second the server acknowledges (an ok is sent only after
//! the message is committed) and the send-to-ok latency, with C connections each keeping W
//! sends in flight in its own room, on SQLite (synchronous=full unless overridden) and on
//! PostgreSQL. The peers have no durable send, so this compares the two stores.

use super::{Common, pub_src};
use crate::coord::Publisher;
use crate::frames::{Stamp, now_us};
use crate::hist::Histogram;
use crate::procs::Server;
use crate::report::{Report, Table, histogram_svg, human, ms, ratio};
use crate::sys::CpuMeter;
use crate::worker::Proto;
use anyhow::Result;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Sending connections (each in its own room).
    #[arg(long, default_value_t = 32)]
    pub conns: usize,
    #[command(flatten)]
    pub load: super::StoreLoad,
}

pub async fn run(common: Common, args: Args) -> Result<bool> {
    let mut report = Report::new(
        "durable",
        json!({
            "conns": args.conns, "window": args.load.window, "duration_s": args.load.duration_s,
            "stores": args.load.stores,
        }),
    );
    let mut table = Table::new(
        "acknowledged (committed) sends",
        &[
            "store",
            "acked msgs/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
            "server CPU %",
            "acked/s per server core",
        ],
    );
    let mut hists = Vec::new();
    let mut results = Vec::new();
    let mut rates = Vec::new();
    for store in &args.load.stores {
        let pg = store == "postgres";
        let server = match common.server(&format!("durable-{store}"), pg).await {
            Ok(s) => s,
            Err(e) => {
                report.note(format!("{store}: could not start: {e:#}"));
                continue;
            }
        };
        let Measured {
            hist,
            acked,
            errors,
            cpu_pct,
            wall,
        } = measure(&server, &args).await?;
        let rate = acked as f64 / wall;
        let s = hist.summary();
        table.row(vec![
            store.clone(),
            human(rate),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            errors.to_string(),
            format!("{cpu_pct:.0}"),
            crate::report::per_core(rate, cpu_pct),
        ]);
        results.push(json!({"store": store, "acked": acked, "wall_s": wall,
            "acked_per_s": rate, "errors": errors, "ack": s, "server_cpu_pct": cpu_pct}));
        rates.push((store.clone(), rate));
        hists.push((store.clone(), hist));
        report.note(format!(
            "{store}: {}",
            crate::procs::commit_note(server.addr).await
        ));
        server.stop().await?;
    }
    report.tables.push(table);
    if rates.len() == 2 {
        report.note(format!(
            "{} / {} acked throughput: {}",
            rates[0].0,
            rates[1].0,
            ratio(Some(rates[0].1), Some(rates[1].1))
        ));
    }
    let series: Vec<(&str, &Histogram)> = hists.iter().map(|(n, h)| (n.as_str(), h)).collect();
    report.svg(
        "ack-latency",
        histogram_svg("send -> ok (committed) latency", &series),
    );
    report.results = json!(results);
    report.write(&common.out)?;
    Ok(true)
}

/// What one store's run measured.
struct Measured {
    /// Send-to-ok latency over all connections.
    hist: Histogram,
    acked: u64,
    errors: u64,
    /// Server CPU over the run (100 = one core).
    cpu_pct: f64,
    /// Seconds from the first send until every connection had its last ack (or gave up).
    wall: f64,
}

/// Opens `--conns` publishers, each in its own new room, keeps `--window` sends in flight
/// on each for `--duration-s`, and collects their acks, errors and latencies.
async fn measure(server: &Server, args: &Args) -> Result<Measured> {
    let pubs = room_publishers(server, args.conns).await?;
    let cpu = CpuMeter::start(server.pid);
    let t0 = Instant::now();
    let dur = Duration::from_secs(args.load.duration_s);
    let window = args.load.window.max(1);
    let mut tasks = Vec::new();
    for (i, (room, p)) in pubs.into_iter().enumerate() {
        tasks.push(tokio::spawn(send_windowed(
            i as u32, room, p, window, t0, dur,
        )));
    }
    let mut hist = Histogram::new();
    let (mut acked, mut errors) = (0, 0);
    for t in tasks {
        let p = t.await?;
        hist.merge(&p.replies.ack.lock().unwrap_or_else(|e| e.into_inner()));
        acked += p.replies.acked.load(Relaxed);
        errors += p.replies.errors.load(Relaxed);
    }
    let cpu_pct = cpu.percent();
    let wall = t0.elapsed().as_secs_f64();
    Ok(Measured {
        hist,
        acked,
        errors,
        cpu_pct,
        wall,
    })
}

/// One room per connection (`durable-<i>`) with a publisher joined to it.
async fn room_publishers(server: &Server, conns: usize) -> Result<Vec<(String, Publisher)>> {
    let mut pubs = Vec::new();
    for i in 0..conns {
        let room = format!("durable-{i}");
        server.create_room(&room, "group").await?;
        pubs.push((
            room.clone(),
            Publisher::connect(
                Proto::Studyhall,
                server.addr,
                pub_src(i),
                500_000 + i as u32,
                &room,
            )
            .await?,
        ));
    }
    Ok(pubs)
}

/// One connection's sender: publishes whenever fewer than `window` sends are unacked, until
/// `dur` after `t0` (or the first failed write), then waits for the remaining acks.
async fn send_windowed(
    sender: u32,
    room: String,
    mut p: Publisher,
    window: usize,
    t0: Instant,
    dur: Duration,
) -> Publisher {
    let mut n = 0;
    while t0.elapsed() < dur {
        if p.unacked() >= window {
            p.below(window, dur.saturating_sub(t0.elapsed())).await;
            continue;
        }
        n += 1;
        let stamp = Stamp {
            step: 0,
            t_us: now_us(),
            sender,
            n,
        };
        if p.publish(&room, stamp, 64).await.is_err() {
            break;
        }
    }
    p.wait_acks(Duration::from_secs(10)).await;
    p
}
