//! `commit-bench`: the commit path alone. Senders submit plain `send` writes straight to the
//! store's group-commit writer (no sockets, no hub), each keeping a window of writes in flight,
//! and the run counts acknowledged (committed) writes per second and the submit-to-ack latency
//! on SQLite and PostgreSQL. It separates what the store costs from what `durable` measures
//! end to end through WebSockets.

use super::{BenchDb, StoreLoad};
use crate::hist::Histogram;
use crate::report::{Report, Table, histogram_svg, human, ms};
use anyhow::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use studyhall::protocol::{RoomId, RoomKind, UserId, UserRef, Visibility};
use studyhall::store::{Room, SendOp, Store, StoreOptions, WriteOp};
use tokio::sync::Mutex;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Rooms written to (one sender per room).
    #[arg(long, default_value_t = 32)]
    pub rooms: usize,
    #[command(flatten)]
    pub load: StoreLoad,
    #[command(flatten)]
    pub db: BenchDb,
}

/// What one store did: acked writes/s, the latency histogram, acked writes, and the writer's
/// group commits (count, mean writes per commit, mean ms per commit) from its metrics.
struct Run {
    rate: f64,
    hist: Histogram,
    acked: u64,
    commits: f64,
    mean_batch: f64,
    mean_commit_ms: f64,
}

async fn bench_one(url: &str, a: &Args) -> Result<Run> {
    let metrics = Arc::new(studyhall::metrics::Metrics::default());
    let store = Store::open(&StoreOptions::new(url), metrics.clone(), None).await?;
    for i in 0..a.rooms {
        let id = format!("r{i}");
        let room = Room::new(RoomId(id.clone()), RoomKind::Group, id, Visibility::Open);
        store.create_room(&room).await?;
    }
    let t0 = Instant::now();
    let dur = Duration::from_secs(a.load.duration_s);
    let hist = Arc::new(Mutex::new(Histogram::new()));
    let mut tasks = Vec::new();
    for i in 0..a.rooms {
        let (store, hist, window) = (store.clone(), hist.clone(), a.load.window.max(1));
        tasks.push(tokio::spawn(async move {
            let user = UserRef {
                id: UserId(format!("u{i}")),
                name: format!("User {i}"),
                role: studyhall::protocol::ShownRole::Member,
            };
            let room = RoomId(format!("r{i}"));
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            let (mut n, mut acked, mut local) = (0u64, 0u64, Histogram::new());
            loop {
                while inflight.len() < window && t0.elapsed() < dur {
                    n += 1;
                    let op = WriteOp::Send(SendOp {
                        room: room.clone(),
                        from: user.clone(),
                        text: format!("message {n} from {i}: some ordinary chat text"),
                        client_msg_id: Some(format!("c{n}")),
                        reply_to: None,
                    });
                    let sent = Instant::now();
                    let rx = store.submit(op).await?;
                    inflight.push(async move { (rx.await, sent) });
                }
                use futures_util::StreamExt;
                match inflight.next().await {
                    Some((Ok(Ok(_)), sent)) => {
                        acked += 1;
                        local.record(sent.elapsed().as_micros() as u64);
                    }
                    Some((r, _)) => anyhow::bail!("write failed: {r:?}"),
                    None => break,
                }
            }
            hist.lock().await.merge(&local);
            Ok::<u64, anyhow::Error>(acked)
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    let wall = t0.elapsed().as_secs_f64();
    store.close().await;
    let hist = hist.lock().await.clone();
    let (commits, mean_batch, mean_commit_ms) =
        crate::procs::commit_summary(&metrics.render(0, 0, &[]));
    Ok(Run {
        rate: acked as f64 / wall,
        hist,
        acked,
        commits,
        mean_batch,
        mean_commit_ms,
    })
}

pub async fn run(a: Args) -> Result<bool> {
    let mut report = Report::new(
        "commit-bench",
        json!({"rooms": a.rooms, "window": a.load.window, "duration_s": a.load.duration_s}),
    );
    let mut table = Table::new(
        "store writer alone: plain sends, submit -> committed",
        &[
            "store",
            "acked writes/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "commits",
            "writes/commit",
            "ms/commit",
        ],
    );
    let mut results = Vec::new();
    let mut hists = Vec::new();
    for store in &a.load.stores {
        let dir = super::fresh_dir(&a.db.out.join("run").join(format!("commit-{store}")))?;
        let run = match store.as_str() {
            "postgres" => {
                a.db.on_postgres(async |url| bench_one(url, &a).await)
                    .await?
            }
            _ => bench_one(&format!("sqlite://{}", dir.join("bench.db").display()), &a).await?,
        };
        let s = run.hist.summary();
        table.row(vec![
            store.clone(),
            human(run.rate),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            format!("{:.0}", run.commits),
            format!("{:.1}", run.mean_batch),
            format!("{:.2}", run.mean_commit_ms),
        ]);
        results.push(
            json!({"store": store, "acked": run.acked, "acked_per_s": run.rate,
            "ack": s, "commits": run.commits, "writes_per_commit": run.mean_batch,
            "ms_per_commit": run.mean_commit_ms}),
        );
        hists.push((store.clone(), run.hist));
    }
    report.tables.push(table);
    let series: Vec<(&str, &Histogram)> = hists.iter().map(|(n, h)| (n.as_str(), h)).collect();
    report.svg("ack-latency", histogram_svg("submit -> committed", &series));
    report.results = json!(results);
    report.write(&a.db.out)?;
    Ok(true)
}
