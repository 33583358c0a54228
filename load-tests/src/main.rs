//! `studyhall-load`: the load generator for the studyhall server. This file owns
//! the command line: one subcommand per scenario (`smoke`, `idle`, `fanout`, `classroom`,
//! `durable`, `reconnect`, `sfu`, `stats-bench`, `commit-bench`), the shared flags, and the
//! hidden `worker` subcommand through which the binary re-executes itself to hold client
//! sockets in several processes. `sfu` holds its WebRTC peers (`rtc`) in this process, and
//! compares with Janus (`janus`).

mod client;
mod coord;
mod frames;
mod hist;
mod http1;
mod janus;
mod procs;
mod report;
mod rtc;
mod scenarios;
mod sys;
mod worker;

use clap::{Parser, Subcommand};
use scenarios::Common;

#[derive(Parser)]
#[command(
    name = "studyhall-load",
    version,
    about = "Load scenarios for studyhall (and NATS / Socket.IO peers), with reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Small correctness run (<= 10 s, no peers): every message delivered exactly once, and
    /// resumed clients get exactly what they missed. Exits non-zero on failure.
    Smoke {
        #[command(flatten)]
        common: Common,
    },
    /// N idle clients joined to rooms: server RSS per connection and handshakes/s.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::idle::Args,
    },
    /// One room of M members; publish rate stepped until p99 passes the limit.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::fanout::Args,
    },
    /// Realistic mix: many small rooms chatting plus one big live room.
    Classroom {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::classroom::Args,
    },
    /// Acknowledged (committed) messages/s and ack latency on SQLite and PostgreSQL.
    Durable {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::durable::Args,
    },
    /// Clients drop and resume with after_seq while messages flow; verifies 0 lost, 0 dup.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::reconnect::Args,
    },
    /// The SFU: publishers of Opus and VP8 (simulcast) and viewers stepped up until loss or
    /// server CPU passes its limit; packets/s forwarded per server core (`--peers janus`:
    /// also Janus 1.1's VideoRoom).
    Sfu {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::sfu::Args,
    },
    /// Room statistics and leaderboards on a room with a 1,000,000-event log (SQLite and
    /// PostgreSQL), timed through the store; fails if a median passes 1 s.
    StatsBench {
        #[command(flatten)]
        args: scenarios::stats_bench::Args,
    },
    /// The store's commit path alone: plain sends submitted straight to the group-commit
    /// writer (no sockets), acknowledged writes/s and latency on SQLite and PostgreSQL.
    CommitBench {
        #[command(flatten)]
        args: scenarios::commit_bench::Args,
    },
    /// Internal: hold a slice of a run's clients (driven over stdin/stdout).
    #[command(hide = true)]
    Worker,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Worker = cli.cmd {
        return worker::main();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let common = match &cli.cmd {
        Cmd::Smoke { common }
        | Cmd::Idle { common, .. }
        | Cmd::Fanout { common, .. }
        | Cmd::Classroom { common, .. }
        | Cmd::Durable { common, .. }
        | Cmd::Reconnect { common, .. }
        | Cmd::Sfu { common, .. } => Some(common.clone()),
        _ => None,
    };
    if let Some(c) = common {
        procs::set_pins(procs::Pins {
            server: c.server_cpus,
            load: c.load_cpus,
        })?;
    }
    let ok = rt.block_on(async move {
        match cli.cmd {
            Cmd::Smoke { common } => scenarios::smoke::run(common).await,
            Cmd::Idle { common, args } => scenarios::idle::run(common, args).await,
            Cmd::Fanout { common, args } => scenarios::fanout::run(common, args).await,
            Cmd::Classroom { common, args } => scenarios::classroom::run(common, args).await,
            Cmd::Durable { common, args } => scenarios::durable::run(common, args).await,
            Cmd::Reconnect { common, args } => scenarios::reconnect::run(common, args).await,
            Cmd::Sfu { common, args } => scenarios::sfu::run(common, args).await,
            Cmd::StatsBench { args } => scenarios::stats_bench::run(args).await,
            Cmd::CommitBench { args } => scenarios::commit_bench::run(args).await,
            Cmd::Worker => unreachable!(),
        }
    })?;
    if !ok {
        eprintln!("studyhall-load: FAILED");
        std::process::exit(1);
    }
    Ok(())
}
