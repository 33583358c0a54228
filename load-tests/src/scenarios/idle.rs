//! `idle`: N clients connect, sign in and join rooms, then sit idle. Measures the server's
//! resident memory per connection (VmRSS from /proc/PID/status before the clients and after
//! they settle; user-space memory only, kernel socket buffers are not in it) and handshakes
//! per second (TCP connect + WebSocket upgrade + hello/welcome + join/ok), for studyhall and
//! for each peer holding the same number of subscribed WebSocket clients.

use super::{Common, Sut};
use crate::coord::{Plan, Workers, worker_count};
use crate::report::{Report, Table, human, mib, ms, ratio};
use crate::sys::rss_kib;
use crate::worker::{ConnSpec, Proto};
use anyhow::Result;
use serde_json::json;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Idle clients (the server process itself may hold at most ~19,900 sockets here).
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Rooms the clients are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Seconds to let the server settle before reading its RSS.
    #[arg(long, default_value_t = 3)]
    pub settle_s: u64,
    /// Then, on a fresh studyhall server: this many clients join one `live` room at once and
    /// keep reading (0: skip). Reports RSS per connection after the storm and the presence
    /// and count frames each member got.
    #[arg(long, default_value_t = 5000)]
    pub storm: usize,
}

/// Goal: at most 8 KB of user-space RSS per idle connection.
const GOAL_BYTES: f64 = 8_000.0;

pub async fn run(common: Common, args: Args) -> Result<bool> {
    let mut report = Report::new("idle", json!({"conns": args.conns, "rooms": args.rooms}));
    let mut table = Table::new(
        "idle connections",
        &[
            "target",
            "clients ok",
            "failed",
            "RSS before MiB",
            "RSS after MiB",
            "bytes/conn",
            "handshakes/s",
            "handshake p50 ms",
            "handshake p99 ms",
        ],
    );
    let mut per_conn = Vec::new();
    let mut hs = Vec::new();
    let mut results = Vec::new();
    for proto in common.targets() {
        let name = proto.name();
        let sut = match Sut::start(&common, proto, &format!("idle-{name}")).await {
            Ok(s) => s,
            Err(e) => {
                report.note(format!("{name}: could not start: {e:#}"));
                continue;
            }
        };
        let (bytes, rate, result) =
            idle_target(&common, &args, proto, &sut, &mut report, &mut table).await?;
        per_conn.push((name, bytes));
        hs.push((name, rate));
        results.push(result);
        sut.stop().await?;
    }
    report.tables.push(table);
    // No growth at all means the RSS read was not the server's (a `--server-bin` wrapper that
    // forks it, as heaptrack does): no verdict then, rather than a goal "met" at 0 bytes.
    let sh_b = per_conn
        .iter()
        .find(|p| p.0 == "studyhall")
        .map(|p| p.1)
        .filter(|b| *b > 0.0);
    report.tables.push(comparison_table(&per_conn, &hs));
    let pass = sh_b.is_some_and(|b| b <= GOAL_BYTES);
    report.note(format!(
        "goal <= {GOAL_BYTES:.0} bytes user-space RSS per connection: studyhall {} ({})",
        sh_b.map_or("n/a".into(), |b| format!("{b:.0} bytes")),
        match sh_b {
            None => "not measured: the server's RSS did not grow; --server-bin must exec the server, not fork it",
            Some(_) if pass => "met",
            Some(_) => "NOT met",
        }
    ));
    let storm = if args.storm > 0 {
        Some(join_storm(&common, &args, &mut report).await?)
    } else {
        None
    };
    report.results = json!({"idle": results, "storm": storm});
    report.write(&common.out)?;
    Ok(true)
}

/// One target's idle run on its started server: RSS before, `--conns` clients over
/// `--rooms` rooms, RSS after settling. Adds its table row and notes; returns bytes per
/// connection, handshakes/s and its results entry.
async fn idle_target(
    common: &Common,
    args: &Args,
    proto: Proto,
    sut: &Sut,
    report: &mut Report,
    table: &mut Table,
) -> Result<(f64, f64, serde_json::Value)> {
    let name = proto.name();
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("idle-{r}")).collect();
    sut.rooms(&rooms, "group").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(sut.pid()).unwrap_or(0);
    let conns = (0..args.conns as u32)
        .map(|i| ConnSpec {
            id: i,
            user: i,
            room: rooms[i as usize % rooms.len()].clone(),
            every_ms: 0,
            count: 0,
            class: 0,
        })
        .collect();
    let plan = Plan {
        proto,
        target: sut.addr(),
        targets: Vec::new(),
        conns,
        workers: worker_count(args.conns, common.workers, common.per_worker),
        concurrency: common.concurrency,
        pad: 0,
        track_ids: false,
        reconnect: None,
    };
    let (workers, ready) = Workers::start(plan, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let after = rss_kib(sut.pid()).unwrap_or(0);
    let bytes = (after.saturating_sub(before) as f64 * 1024.0) / ready.ok.max(1) as f64;
    let rate = ready.ok as f64 / ready.window_s.max(1e-6);
    let c = ready.connect.summary();
    table.row(vec![
        name.into(),
        ready.ok.to_string(),
        ready.failed.to_string(),
        mib(before),
        mib(after),
        format!("{bytes:.0}"),
        human(rate),
        ms(c.p50_ms),
        ms(c.p99_ms),
    ]);
    if !ready.errors.is_empty() {
        report.note(format!("{name}: connect errors {:?}", ready.errors));
    }
    let result = json!({"target": name, "ok": ready.ok, "failed": ready.failed,
        "rss_before_kib": before, "rss_after_kib": after, "bytes_per_conn": bytes,
        "handshakes_per_s": rate, "window_s": ready.window_s, "handshake": c});
    let total = workers.stop().await?;
    if !total.f.closes.is_empty() {
        report.note(format!(
            "{name}: clients lost while idle: {:?}",
            total.f.closes
        ));
    }
    Ok((bytes, rate, result))
}

/// studyhall against each peer: bytes per connection and handshakes/s, with the ratios.
fn comparison_table(per_conn: &[(&str, f64)], hs: &[(&str, f64)]) -> Table {
    let mut cmp = Table::new(
        "studyhall vs peers",
        &[
            "metric",
            "peer",
            "studyhall",
            "peer value",
            "ratio studyhall/peer",
        ],
    );
    let sh_b = per_conn.iter().find(|p| p.0 == "studyhall").map(|p| p.1);
    let sh_h = hs.iter().find(|p| p.0 == "studyhall").map(|p| p.1);
    for ((peer, b), (_, h)) in per_conn.iter().zip(hs).filter(|p| p.0.0 != "studyhall") {
        cmp.row(vec![
            "bytes/conn".into(),
            (*peer).into(),
            format!("{:.0}", sh_b.unwrap_or(0.0)),
            format!("{b:.0}"),
            ratio(sh_b, Some(*b)),
        ]);
        cmp.row(vec![
            "handshakes/s".into(),
            (*peer).into(),
            human(sh_h.unwrap_or(0.0)),
            human(*h),
            ratio(sh_h, Some(*h)),
        ]);
    }
    cmp
}

/// The big-live-room join storm: `args.storm` clients join one live room at once.
async fn join_storm(
    common: &Common,
    args: &Args,
    report: &mut Report,
) -> Result<serde_json::Value> {
    let sut = Sut::start(common, crate::worker::Proto::Studyhall, "idle-storm").await?;
    sut.rooms(&["lecture".to_owned()], "live").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(sut.pid()).unwrap_or(0);
    let conns = (0..args.storm as u32)
        .map(|i| ConnSpec {
            id: i,
            user: i,
            room: "lecture".into(),
            every_ms: 0,
            count: 0,
            class: 0,
        })
        .collect();
    let plan = Plan {
        proto: crate::worker::Proto::Studyhall,
        target: sut.addr(),
        targets: Vec::new(),
        conns,
        workers: worker_count(args.storm, common.workers, common.per_worker),
        concurrency: common.concurrency,
        pad: 0,
        track_ids: false,
        reconnect: None,
    };
    let (workers, ready) = Workers::start(plan, Duration::from_secs(120)).await?;
    // Two presence rounds and an online-count round pass while the clients keep reading.
    tokio::time::sleep(Duration::from_secs(args.settle_s.max(3))).await;
    let after = rss_kib(sut.pid()).unwrap_or(0);
    let total = workers.stop().await?;
    sut.stop().await?;
    let n = ready.ok.max(1) as f64;
    let bytes = (after.saturating_sub(before) as f64 * 1024.0) / n;
    let per_member = |ty: &str| total.f.other_frames.get(ty).copied().unwrap_or(0) as f64 / n;
    let t = Table::one_row(
        "join storm: one live room",
        vec![
            ("clients ok", ready.ok.to_string()),
            ("failed", ready.failed.to_string()),
            ("joined in s", format!("{:.1}", ready.window_s)),
            ("RSS before MiB", mib(before)),
            ("RSS after MiB", mib(after)),
            ("bytes/conn", format!("{bytes:.0}")),
            (
                "presence frames per member",
                format!("{:.1}", per_member("presence")),
            ),
            (
                "online_count frames per member",
                format!("{:.1}", per_member("online_count")),
            ),
        ],
    );
    report.tables.push(t);
    if !total.f.closes.is_empty() {
        report.note(format!("storm: clients lost: {:?}", total.f.closes));
    }
    Ok(
        json!({"ok": ready.ok, "failed": ready.failed, "window_s": ready.window_s,
        "rss_before_kib": before, "rss_after_kib": after, "bytes_per_conn": bytes,
        "frames": total.f.other_frames}),
    )
}
