//! Scenario plumbing shared by every subcommand: the common flags (report directory, server
//! binary, worker sizing, peers), starting a fresh studyhall server on a throw-away database,
//! and the list of targets (studyhall plus the requested peers) a comparison runs against.

pub mod classroom;
pub mod commit_bench;
pub mod durable;
pub mod fanout;
pub mod idle;
pub mod reconnect;
pub mod sfu;
pub mod smoke;
pub mod stats_bench;

use crate::procs::{Cluster, Db, Peer, PgDb, Server};
use crate::worker::Proto;
use anyhow::Result;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Report directory (JSON, Markdown and SVG files; logs under it).
    #[arg(long, default_value = "load-report")]
    pub out: PathBuf,
    /// The studyhall server binary (default: `studyhall` next to this executable).
    #[arg(long, env = "STUDYHALL_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Worker processes (0 = enough for --per-worker clients each, at least 2).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Clients per worker process when --workers is 0 (capped at 15,000).
    #[arg(long, default_value_t = 5000)]
    pub per_worker: usize,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Peers to compare against: nats, socketio (comma-separated; "none" for none).
    #[arg(long, value_delimiter = ',', default_value = "nats,socketio")]
    pub peers: Vec<String>,
    /// nats-server binary (2.9+, WebSocket support).
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_bin: String,
    /// An existing PostgreSQL database to create throw-away databases from (trust auth).
    #[arg(
        long,
        env = "STUDYHALL_LOAD_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub pg_url: String,
    /// Extra server settings, KEY=VALUE (e.g. STUDYHALL_OUTBOX_FRAMES=4096); repeatable.
    #[arg(long = "server-env")]
    pub server_env: Vec<String>,
    /// Cluster mode (fanout, classroom): start this many studyhall nodes on one PostgreSQL
    /// database and the NATS at --bus-url, and spread the clients over them (worker w on node
    /// w % N). Unset: one node on SQLite, as before.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// The NATS the nodes share (loopback only).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub bus_url: String,
    /// Pin the server (and each peer in its turn, and its database) to these CPUs, e.g. `0`
    /// (taskset list syntax). Unset: not pinned.
    #[arg(long, default_value = "")]
    pub server_cpus: String,
    /// Pin the load generator (this process and its workers) to these CPUs, e.g. `1`.
    #[arg(long, default_value = "")]
    pub load_cpus: String,
    /// Store of a single studyhall node (fanout, classroom, idle, reconnect): `sqlite` or
    /// `postgres` (a throw-away database under --pg-url).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
}

impl Common {
    pub fn extra_env(&self) -> Vec<(String, String)> {
        self.server_env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// A fresh server on a new SQLite file (under the report directory) or PostgreSQL db.
    pub async fn server(&self, tag: &str, postgres: bool) -> Result<Server> {
        let bin = crate::procs::server_bin(self.server_bin.clone())?;
        let dir = self.out.join("run").join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let db = if postgres {
            Db::Postgres(self.pg_url.clone())
        } else {
            Db::Sqlite(std::fs::canonicalize(&dir)?.join("load.db"))
        };
        Server::start(&bin, db, &self.extra_env(), &dir).await
    }

    /// `--nodes N`: a fresh cluster of N nodes on one new PostgreSQL database.
    pub async fn cluster(&self, tag: &str, n: usize) -> Result<Cluster> {
        let bin = crate::procs::server_bin(self.server_bin.clone())?;
        let dir = self.out.join("run").join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Cluster::start(
            &bin,
            &self.pg_url,
            &self.bus_url,
            n,
            &self.extra_env(),
            &dir,
        )
        .await
    }

    pub fn targets(&self) -> Vec<Proto> {
        let mut t = vec![Proto::Studyhall];
        for p in &self.peers {
            match p.trim() {
                "nats" => t.push(Proto::Nats),
                "socketio" | "socket.io" => t.push(Proto::Socketio),
                _ => {}
            }
        }
        t
    }
}

/// How hard a store scenario writes, and on which stores (`durable` through the server,
/// `commit-bench` straight to the store's writer): one run per store, in order.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreLoad {
    /// Writes in flight per sender (a connection, or a store-side sender).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Seconds per store.
    #[arg(long, default_value_t = 8)]
    pub duration_s: u64,
    /// Stores to run: sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub stores: Vec<String>,
}

/// Where the server-less store benchmarks (`commit-bench`, `stats-bench`) get their
/// PostgreSQL databases and write their reports.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchDb {
    /// An existing PostgreSQL database to create throw-away databases from (trust auth).
    #[arg(
        long,
        env = "STUDYHALL_LOAD_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub pg_url: String,
    /// Report directory.
    #[arg(long, default_value = "load-report")]
    pub out: PathBuf,
}

impl BenchDb {
    /// Runs `bench` on a throw-away PostgreSQL database (its URL is the argument), dropped
    /// afterwards whatever `bench` returned.
    pub async fn on_postgres<T>(&self, bench: impl AsyncFnOnce(&str) -> Result<T>) -> Result<T> {
        let db = PgDb::create(&self.pg_url).await?;
        let r = bench(&db.url).await;
        db.drop_db().await;
        r
    }
}

/// Empties (or makes) `dir` and returns its absolute path.
pub fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(std::fs::canonicalize(dir)?)
}

/// The system under test for one target: a studyhall server or a peer process.
pub enum Sut {
    Studyhall(Server),
    Cluster(Cluster),
    Peer(Peer),
}

impl Sut {
    pub async fn start(common: &Common, proto: Proto, tag: &str) -> Result<Self> {
        let work = common.out.join("run").join(tag);
        Ok(match proto {
            Proto::Studyhall => match common.nodes {
                Some(n) => Sut::Cluster(common.cluster(tag, n).await?),
                None => Sut::Studyhall(common.server(tag, common.store == "postgres").await?),
            },
            Proto::Nats => Sut::Peer(Peer::nats(&common.nats_bin, &work).await?),
            Proto::Socketio => Sut::Peer(Peer::socketio(&work).await?),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Sut::Studyhall(s) => s.addr,
            Sut::Cluster(c) => c.nodes[0].addr,
            Sut::Peer(p) => p.addr,
        }
    }

    /// Every node of a cluster (empty for one process: workers then use `addr`).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Sut::Cluster(c) => c.addrs(),
            _ => Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pids()[0]
    }

    /// The server processes (all nodes of a cluster).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Sut::Studyhall(s) => vec![s.pid],
            Sut::Cluster(c) => c.nodes.iter().map(|s| s.pid).collect(),
            Sut::Peer(p) => vec![p.pid],
        }
    }

    /// Rooms must exist before studyhall clients join them; peers make rooms on demand.
    pub async fn rooms(&self, ids: &[String], kind: &str) -> Result<()> {
        let first = match self {
            Sut::Studyhall(s) => s,
            Sut::Cluster(c) => &c.nodes[0],
            Sut::Peer(_) => return Ok(()),
        };
        for id in ids {
            first.create_room(id, kind).await?;
        }
        Ok(())
    }

    pub async fn stop(self) -> Result<()> {
        match self {
            Sut::Studyhall(s) => s.stop().await,
            Sut::Cluster(c) => c.stop().await,
            Sut::Peer(p) => {
                drop(p);
                Ok(())
            }
        }
    }
}

/// Source address for coordinator-side publishers: 127.0.0.2..
pub fn pub_src(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 6) as u8)
}
