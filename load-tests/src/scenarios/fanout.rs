//! `fanout`: one room of M members (spread over worker processes) and a publisher in the
//! coordinator. The publish rate steps up (each step a fixed number of seconds) until the
//! step's p99 end-to-end latency passes the limit (or deliveries go missing); each step
//! reports deliveries/s and p50/p99/p99.9 from the send timestamp inside the message text to
//! its receipt. Same room shape for studyhall, NATS (subject = room) and Socket.IO (room).

use super::{Common, Sut, pub_src};
use crate::coord::{Plan, Publisher, Workers, pace, worker_count};
use crate::hist::Histogram;
use crate::report::{Report, Table, histogram_svg, human, line_svg, ms, ratio};
use crate::sys::CpuMeter;
use crate::worker::{ConnSpec, Proto};
use anyhow::Result;
use serde_json::json;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Room sizes to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub members: Vec<usize>,
    /// Publish rates to step through, messages/s.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,50,100,200,500,1000,2000,5000"
    )]
    pub rates: Vec<f64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 3)]
    pub step_s: u64,
    /// Stop stepping once p99 passes this many ms.
    #[arg(long, default_value_t = 50.0)]
    pub p99_limit_ms: f64,
    /// Message text length in bytes.
    #[arg(long, default_value_t = 64)]
    pub pad: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Sessions per user in the room (studyhall only; 1 = every member a distinct user).
    /// Presence and the join reply's `online` list grow with distinct users, so very large
    /// rooms may share users to keep joining tractable; the report says so.
    #[arg(long, default_value_t = 1)]
    pub sessions_per_user: u32,
}

struct StepRow {
    target: &'static str,
    members: usize,
    rate: f64,
    achieved: f64,
    delivered: u64,
    expected: u64,
    del_per_s: f64,
    cpu: f64,
    hist: Histogram,
    /// Cluster runs: deliveries to members on other nodes than the publisher's.
    cross: Option<Histogram>,
    /// studyhall: the publishers' send-to-`ok` latency in this step (the commit's share of
    /// the delivery latency, and the publisher's own read and write).
    ack: Option<Histogram>,
}

pub async fn run(common: Common, args: Args) -> Result<bool> {
    let mut report = Report::new(
        "fanout",
        json!({"members": args.members, "rates": args.rates, "step_s": args.step_s,
            "p99_limit_ms": args.p99_limit_ms, "pad": args.pad, "publishers": args.publishers,
            "sessions_per_user": args.sessions_per_user, "nodes": common.nodes}),
    );
    let mut rows: Vec<StepRow> = Vec::new();
    let mut notes = Vec::new();
    for &m in &args.members {
        for proto in common.targets() {
            let name = proto.name();
            match one(&common, &args, proto, m, &mut rows).await {
                Ok(n) => notes.extend(n),
                Err(e) => notes.push(format!("{name} M={m}: aborted: {e:#}")),
            }
        }
    }
    let steps = steps_table(&rows);
    let mut best = Table::new(
        &format!("max sustained fan-out with p99 <= {} ms", args.p99_limit_ms),
        &[
            "members",
            "target",
            "deliveries/s",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "studyhall/peer",
        ],
    );
    let targets = common.targets();
    for &m in &args.members {
        best_rows(&mut best, &rows, &targets, m, args.p99_limit_ms);
        size_charts(&mut report, &rows, &targets, m, args.p99_limit_ms);
    }
    report.tables.push(best);
    report.tables.push(steps);
    for n in notes {
        report.note(n);
    }
    report.results =
        json!(rows.iter().map(|r| json!({
        "target": r.target, "members": r.members, "rate": r.rate, "achieved": r.achieved,
        "delivered": r.delivered, "expected": r.expected, "deliveries_per_s": r.del_per_s,
        "server_cpu_pct": r.cpu, "latency": r.hist.summary(),
        "cross_node_latency": r.cross.as_ref().map(|h| h.summary()),
        "ack_latency": r.ack.as_ref().map(|h| h.summary()),
    })).collect::<Vec<_>>());
    report.write(&common.out)?;
    Ok(true)
}

/// The table of every step run, in the order they ran.
fn steps_table(rows: &[StepRow]) -> Table {
    let mut steps = Table::new(
        "every step",
        &[
            "target",
            "members",
            "rate asked",
            "rate sent",
            "deliveries/s",
            "delivered",
            "lost",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "ack p50 ms",
            "ack p99 ms",
            "cross-node p50 ms",
            "cross-node p99 ms",
            "server CPU %",
            "deliveries/s per server core",
        ],
    );
    for r in rows {
        let s = r.hist.summary();
        let cross = r.cross.as_ref().map(|h| h.summary());
        let ack = r.ack.as_ref().map(|h| h.summary());
        steps.row(vec![
            r.target.into(),
            r.members.to_string(),
            human(r.rate),
            human(r.achieved),
            human(r.del_per_s),
            r.delivered.to_string(),
            r.expected.saturating_sub(r.delivered).to_string(),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            ack.as_ref().map_or("-".into(), |a| ms(a.p50_ms)),
            ack.as_ref().map_or("-".into(), |a| ms(a.p99_ms)),
            cross.as_ref().map_or("-".into(), |c| ms(c.p50_ms)),
            cross.as_ref().map_or("-".into(), |c| ms(c.p99_ms)),
            format!("{:.0}", r.cpu),
            crate::report::per_core(r.del_per_s, r.cpu),
        ]);
    }
    steps
}

/// The step of `target` at room size `m` with the most deliveries/s among those within the
/// p99 limit that lost under 1 % of deliveries.
fn best_step<'a>(
    rows: &'a [StepRow],
    m: usize,
    target: &str,
    p99_limit_ms: f64,
) -> Option<&'a StepRow> {
    rows.iter()
        .filter(|r| r.members == m && r.target == target)
        .filter(|r| r.hist.summary().p99_ms <= p99_limit_ms && r.delivered >= r.expected * 99 / 100)
        .max_by(|a, b| a.del_per_s.total_cmp(&b.del_per_s))
}

/// The best-step table's rows for room size `m`: one per target, with its ratio to studyhall.
fn best_rows(best: &mut Table, rows: &[StepRow], targets: &[Proto], m: usize, limit: f64) {
    let sh = best_step(rows, m, "studyhall", limit).map(|r| r.del_per_s);
    for proto in targets {
        let Some(r) = best_step(rows, m, proto.name(), limit) else {
            best.row(vec![
                m.to_string(),
                proto.name().into(),
                "none within limit".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
            continue;
        };
        let s = r.hist.summary();
        best.row(vec![
            m.to_string(),
            r.target.into(),
            human(r.del_per_s),
            human(r.achieved),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            if r.target == "studyhall" {
                "-".into()
            } else {
                ratio(sh, Some(r.del_per_s))
            },
        ]);
    }
}

/// Plots per size: p99 against publish rate, and the best steps' histograms.
fn size_charts(report: &mut Report, rows: &[StepRow], targets: &[Proto], m: usize, limit: f64) {
    let series: Vec<(String, Vec<(f64, f64)>)> = targets
        .iter()
        .map(|p| {
            (
                format!("{} p99", p.name()),
                rows.iter()
                    .filter(|r| r.members == m && r.target == p.name())
                    .map(|r| (r.achieved.max(0.1), r.hist.summary().p99_ms.max(0.001)))
                    .collect(),
            )
        })
        .collect();
    report.svg(
        &format!("p99-m{m}"),
        line_svg(
            &format!("fan-out to {m} members: p99 latency per publish-rate step"),
            "messages/s published (log)",
            "p99 ms (log)",
            true,
            true,
            &series,
        ),
    );
    let bests: Vec<(&str, &Histogram)> = targets
        .iter()
        .filter_map(|p| best_step(rows, m, p.name(), limit).map(|r| (p.name(), &r.hist)))
        .collect();
    report.svg(
        &format!("hist-m{m}"),
        histogram_svg(
            &format!("fan-out to {m} members: latency at the best step within limit"),
            &bests,
        ),
    );
}

/// One target at one room size: returns notes.
async fn one(
    common: &Common,
    args: &Args,
    proto: Proto,
    m: usize,
    rows: &mut Vec<StepRow>,
) -> Result<Vec<String>> {
    let name = proto.name();
    let mut notes = Vec::new();
    let sut = Sut::start(common, proto, &format!("fanout-{name}-{m}")).await?;
    let room = "fanout".to_owned();
    sut.rooms(std::slice::from_ref(&room), "live").await?;
    let spu = if proto == Proto::Studyhall {
        args.sessions_per_user.max(1)
    } else {
        1
    };
    let targets = sut.addrs();
    let nodes = targets.len().max(1);
    let plan = Plan {
        proto,
        target: sut.addr(),
        targets,
        conns: member_specs(m, spu, &room),
        workers: worker_count(m, common.workers, common.per_worker).max(nodes),
        concurrency: common.concurrency,
        pad: args.pad,
        track_ids: false,
        reconnect: None,
    };
    let t = std::time::Instant::now();
    let (mut workers, ready) = Workers::start(plan, Duration::from_secs(120)).await?;
    notes.push(format!(
        "{name} M={m}: {} members joined in {:.1} s ({} failed){}",
        ready.ok,
        t.elapsed().as_secs_f64(),
        ready.failed,
        if spu > 1 {
            format!(", {spu} sessions per user")
        } else {
            String::new()
        }
    ));
    let mut pubs = publishers(proto, &sut, args.publishers, &room).await?;
    // Let join-time traffic (presence) drain before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut run = StepRun {
        sut: &sut,
        workers: &mut workers,
        pubs: &mut pubs,
        room: &room,
        name,
        m,
        nodes,
        members: ready.ok,
        counter: 0,
    };
    for (k, &rate) in args.rates.iter().enumerate() {
        let row = run.step(args, k as u32 + 1, rate).await?;
        let over = row.hist.summary().p99_ms > args.p99_limit_ms
            || row.delivered < row.expected * 99 / 100;
        rows.push(row);
        if over {
            break;
        }
    }
    drop(pubs);
    let total = workers.stop().await?;
    if total.f.seq_dups + total.f.seq_gaps > 0 {
        notes.push(format!(
            "{name} M={m}: seq check: {} duplicates, {} gaps",
            total.f.seq_dups, total.f.seq_gaps
        ));
    }
    if !total.f.closes.is_empty() {
        notes.push(format!("{name} M={m}: members lost: {:?}", total.f.closes));
    }
    sut.stop().await?;
    Ok(notes)
}

/// The coordinator's publishing connections (at least one), each from its own source address.
async fn publishers(proto: Proto, sut: &Sut, n: usize, room: &str) -> Result<Vec<Publisher>> {
    let mut pubs = Vec::new();
    for i in 0..n.max(1) {
        pubs.push(
            Publisher::connect(proto, sut.addr(), pub_src(i), 900_000 + i as u32, room).await?,
        );
    }
    Ok(pubs)
}

/// The room's members: `m` clients, `spu` consecutive sessions sharing each user.
fn member_specs(m: usize, spu: u32, room: &str) -> Vec<ConnSpec> {
    (0..m as u32)
        .map(|i| ConnSpec {
            id: i,
            user: i / spu,
            room: room.to_owned(),
            every_ms: 0,
            count: 0,
            class: 0,
        })
        .collect()
}

/// What the rate steps of one target and room size share.
struct StepRun<'a> {
    sut: &'a Sut,
    workers: &'a mut Workers,
    pubs: &'a mut [Publisher],
    room: &'a str,
    name: &'static str,
    m: usize,
    nodes: usize,
    /// Members that joined: the expected deliveries per message.
    members: u64,
    /// Messages published so far, over all steps.
    counter: u32,
}

impl StepRun<'_> {
    /// One rate step: publish at `rate` for `--step-s` while metering server CPU, wait for
    /// the deliveries, and collect the step's latency (all members, and cross-node ones).
    async fn step(&mut self, args: &Args, step: u32, rate: f64) -> Result<StepRow> {
        let (name, m) = (self.name, self.m);
        let cpus: Vec<CpuMeter> = self.sut.pids().into_iter().map(CpuMeter::start).collect();
        // Acks of earlier steps (and of the warm-up) are not this step's.
        take_acks(self.pubs);
        let dur = Duration::from_secs(args.step_s);
        let (sent, achieved) = pace(
            self.pubs,
            self.room,
            rate,
            dur,
            step,
            args.pad,
            &mut self.counter,
        )
        .await?;
        let cpu_pct: f64 = cpus.iter().map(CpuMeter::percent).sum();
        let expected = sent * self.members;
        let delivered = self
            .workers
            .drain(step, expected, Duration::from_secs(3))
            .await?;
        let (hist, cross) = by_node(&self.workers.collect_each(step).await?, self.nodes);
        let ack = take_acks(self.pubs);
        let s = hist.summary();
        if let Some(c) = &cross {
            let c = c.summary();
            eprintln!(
                "{name} M={m} rate {rate}: cross-node p50 {:.2} p99 {:.2} ms",
                c.p50_ms, c.p99_ms
            );
        }
        eprintln!(
            "{name} M={m} rate {rate}: sent {sent} ({achieved:.0}/s) delivered {delivered}/{expected} p50 {:.2} p99 {:.2} p99.9 {:.2} ms cpu {cpu_pct:.0}%",
            s.p50_ms, s.p99_ms, s.p999_ms
        );
        Ok(StepRow {
            target: name,
            members: m,
            rate,
            achieved,
            delivered,
            expected,
            del_per_s: delivered as f64 / dur.as_secs_f64(),
            cpu: cpu_pct,
            hist,
            cross,
            ack: (ack.count() > 0).then_some(ack),
        })
    }
}

/// The publishers' ack latencies since the last call, merged (and theirs emptied).
fn take_acks(pubs: &[Publisher]) -> Histogram {
    let mut all = Histogram::new();
    for p in pubs {
        let mut h = p.replies.ack.lock().unwrap_or_else(|e| e.into_inner());
        all.merge(&h);
        *h = Histogram::new();
    }
    all
}

/// Merges the workers' step histograms: all of them, and (cluster runs) those of members on
/// another node than the publishers, who are on node 0 while worker w's members are on node
/// w % nodes.
fn by_node(each: &[Histogram], nodes: usize) -> (Histogram, Option<Histogram>) {
    let mut hist = Histogram::new();
    let mut cross = Histogram::new();
    for (w, h) in each.iter().enumerate() {
        hist.merge(h);
        if w % nodes != 0 {
            cross.merge(h);
        }
    }
    (hist, (nodes > 1).then_some(cross))
}
