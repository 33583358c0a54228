//! `smoke`: the CI correctness run. Small sizes, no peers, about 10 s: rooms of members
//! that each send a few messages (every member must receive every message of its room exactly
//! once, in seq order, and every send must be acked), then a short resume phase (clients drop
//! and rejoin with after_seq while messages flow: 0 lost, 0 duplicated), then the SFU's
//! correctness run (`sfu::check`: one publisher, two viewers that must each decode a keyframe
//! and get packets of both tracks; a viewer whose DTLS never comes up is replaced once, and
//! counted). Exits non-zero on any failure.

use super::Common;
use crate::coord::{Plan, Total, Workers};
use crate::report::{Report, Table};
use crate::worker::{ConnSpec, Final, Proto};
use anyhow::Result;
use serde_json::json;
use std::time::Duration;

const ROOMS: u32 = 4;
const MEMBERS: u32 = 25;
const MSGS: u32 = 3;

pub async fn run(common: Common) -> Result<bool> {
    let t0 = std::time::Instant::now();
    let mut report = Report::new(
        "smoke",
        json!({"rooms": ROOMS, "members": MEMBERS, "messages_per_member": MSGS}),
    );
    let server = common.server("smoke", false).await?;
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("smoke-{r}")).collect();
    for r in &rooms {
        server.create_room(r, "group").await?;
    }
    let total = u64::from(ROOMS * MEMBERS);
    let plan = Plan {
        proto: Proto::Studyhall,
        target: server.addr,
        targets: Vec::new(),
        conns: conn_specs(&rooms),
        workers: 2,
        concurrency: common.concurrency,
        pad: 48,
        track_ids: true,
        reconnect: None,
    };
    let mut failures = Vec::new();
    let (mut workers, ready) = Workers::start(plan, Duration::from_secs(20)).await?;
    if ready.failed > 0 {
        failures.push(format!(
            "{} clients failed to join: {:?}",
            ready.failed, ready.errors
        ));
    }
    workers.send_all(&crate::worker::Down::Go).await?;
    let per_room = u64::from(MEMBERS * MSGS);
    let expected = total * per_room;
    let got = workers.drain(0, expected, Duration::from_secs(5)).await?;
    let t = workers.stop().await?;
    check_fanout(&mut failures, &t.f, &rooms, got, expected);
    report
        .tables
        .push(correctness_table(&t, total, got, expected));

    // Resume phase on the same server.
    let out = super::reconnect::phase(&common, &server, &resume_params()).await?;
    failures.extend(out.failures.iter().cloned());
    report.tables.push(out.table());
    server.stop().await?;

    // The SFU, on a server of its own.
    let (sfu, replaced) = super::sfu::check(&common).await?;
    let mut t = Table::new(
        "SFU: 1 publisher, 2 viewers",
        &["check", "failures", "viewers replaced (DTLS never up)"],
    );
    t.row(vec![
        "keyframe and both tracks at every viewer".into(),
        sfu.len().to_string(),
        replaced.to_string(),
    ]);
    report.tables.push(t);
    failures.extend(sfu);

    report.passed = Some(failures.is_empty());
    for f in &failures {
        report.note(format!("FAIL: {f}"));
    }
    report.note(format!("took {:.1} s", t0.elapsed().as_secs_f64()));
    report.results = json!({"failures": failures});
    report.write(&common.out)?;
    Ok(failures.is_empty())
}

/// Every member of every room, each sending `MSGS` messages 100 ms apart.
fn conn_specs(rooms: &[String]) -> Vec<ConnSpec> {
    let mut conns = Vec::new();
    for r in 0..ROOMS {
        for m in 0..MEMBERS {
            let id = r * MEMBERS + m;
            conns.push(ConnSpec {
                id,
                user: id,
                room: rooms[r as usize].clone(),
                every_ms: 100,
                count: MSGS,
                class: 0,
            });
        }
    }
    conns
}

/// The fan-out phase's correctness checks: every send acked, every message delivered
/// exactly once and in seq order to every member, every client still there. Appends one
/// line per failed check.
fn check_fanout(failures: &mut Vec<String>, f: &Final, rooms: &[String], got: u64, expected: u64) {
    let total = u64::from(ROOMS * MEMBERS);
    let per_room = u64::from(MEMBERS * MSGS);
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        f.sent == total * u64::from(MSGS),
        format!("sent {} of {}", f.sent, total * u64::from(MSGS)),
    );
    check(
        f.acked == f.sent,
        format!("acked {} of {} sent", f.acked, f.sent),
    );
    check(f.send_errors == 0, format!("{} send errors", f.send_errors));
    check(got == expected, format!("delivered {got} of {expected}"));
    check(f.seq_dups == 0, format!("{} duplicate seqs", f.seq_dups));
    check(f.seq_gaps == 0, format!("{} missing seqs", f.seq_gaps));
    check(
        f.stamp_dups == 0,
        format!("{} duplicate messages", f.stamp_dups),
    );
    check(
        f.alive == total,
        format!("{} of {total} clients alive", f.alive),
    );
    check(f.closes.is_empty(), format!("clients lost: {:?}", f.closes));
    for r in rooms {
        let unique = f.unique_by_room.get(r).copied().unwrap_or(0);
        check(
            unique == u64::from(MEMBERS) * per_room,
            format!(
                "room {r}: {unique} distinct deliveries, want {}",
                u64::from(MEMBERS) * per_room
            ),
        );
        let seqs = f.final_seq_by_room.get(r).copied().unwrap_or((0, 0));
        check(
            seqs == (per_room as i64, per_room as i64),
            format!("room {r}: members ended at seq {seqs:?}, want {per_room}"),
        );
    }
}

/// The fan-out phase's summary table.
fn correctness_table(t: &Total, total: u64, got: u64, expected: u64) -> Table {
    let f = &t.f;
    let lat = t.classes.get(&0).cloned().unwrap_or_default().summary();
    let mut table = Table::new(
        "fan-out correctness",
        &[
            "clients",
            "messages",
            "deliveries",
            "expected",
            "dup",
            "lost",
            "p50 ms",
            "p99 ms",
        ],
    );
    table.row(vec![
        total.to_string(),
        f.sent.to_string(),
        got.to_string(),
        expected.to_string(),
        (f.seq_dups + f.stamp_dups).to_string(),
        expected.saturating_sub(got).to_string(),
        format!("{:.2}", lat.p50_ms),
        format!("{:.2}", lat.p99_ms),
    ]);
    table
}

/// The resume phase: 40 clients dropping and rejoining for 3 s while messages flow.
fn resume_params() -> super::reconnect::Params {
    super::reconnect::Params {
        clients: 40,
        rate: 100.0,
        duration: Duration::from_secs(3),
        up_ms: (300, 800),
        down_ms: (100, 400),
        room: "smoke-resume".into(),
        kind: "group".into(),
        workers: 2,
    }
}
