//! The processes a run starts and talks to: the studyhall server binary (its address from
//! the `studyhall listening on` line, its pid for /proc), a throw-away PostgreSQL database,
//! the nats-server and Socket.IO peers, and requests to the server's API (room
//! creation, over `http1`). Every child is killed when its handle drops; every wait is bounded.
//! Nothing here ever targets a non-loopback address.

use crate::http1;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub const JWT_SECRET: &str = "load-test-secret-0123456789abcdef";
pub const API_KEY: &str = "load-test-api-key";

/// Refuses any target outside 127.0.0.0/8 (load traffic stays on loopback).
pub fn ensure_loopback(addr: SocketAddr) -> Result<()> {
    ensure!(
        addr.ip().is_loopback(),
        "refusing to send load to {addr}: only 127.0.0.0/8 targets are allowed"
    );
    Ok(())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Path of the `studyhall` server binary: `--server-bin`, else `STUDYHALL_BIN`, else next
/// to this executable (both land in the same cargo target directory).
pub fn server_bin(flag: Option<PathBuf>) -> Result<PathBuf> {
    let p = match flag.or_else(|| std::env::var_os("STUDYHALL_BIN").map(PathBuf::from)) {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("studyhall"),
    };
    ensure!(
        p.exists(),
        "server binary {} not found: build it with `cargo build --release -p studyhall` or pass --server-bin",
        p.display()
    );
    Ok(p)
}

async fn wait_line(child: &mut Child, prefix: &str, what: &str) -> Result<String> {
    let out = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(out).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await? {
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok::<_, anyhow::Error>(Some(rest.trim().to_owned()));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("{what} did not start within 60 s"))??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found.with_context(|| format!("{what} exited before printing its address"))
}

/// Database for a server under test.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(PathBuf),
    Postgres(String),
    /// An existing database that others share (a cluster's nodes); not dropped by the server.
    Shared(String),
}

/// A running studyhall server (killed on drop).
pub struct Server {
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    pg: Option<PgDb>,
}

/// Server settings a load run needs: rate limits far above the load, many sessions per user,
/// quiet logs. `extra` overrides any of them.
pub fn load_env() -> Vec<(String, String)> {
    [
        ("STUDYHALL_RATE_PER_S", "1000000"),
        ("STUDYHALL_RATE_BURST", "1000000"),
        ("STUDYHALL_USER_WRITE_PER_S", "1000000"),
        ("STUDYHALL_USER_WRITE_BURST", "1000000"),
        ("STUDYHALL_USER_JOIN_PER_S", "1000000"),
        ("STUDYHALL_USER_JOIN_BURST", "1000000"),
        ("STUDYHALL_USER_HAND_PER_S", "1000000"),
        ("STUDYHALL_USER_HAND_BURST", "1000000"),
        ("STUDYHALL_USER_CALL_PER_S", "1000000"),
        ("STUDYHALL_USER_CALL_BURST", "1000000"),
        ("STUDYHALL_MAX_SESSIONS_PER_USER", "100000"),
        ("STUDYHALL_HEARTBEAT_S", "60"),
        ("STUDYHALL_LOG", "warn"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

impl Server {
    pub async fn start(
        bin: &Path,
        db: Db,
        extra: &[(String, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let (url, pg) = match db {
            Db::Sqlite(p) => (format!("sqlite://{}", p.display()), None),
            Db::Postgres(base) => {
                let pg = PgDb::create(&base).await?;
                (pg.url.clone(), Some(pg))
            }
            Db::Shared(url) => (url, None),
        };
        let log = std::fs::File::create(log_dir.join("server.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("STUDYHALL_ADDR", "127.0.0.1:0")
            .env("STUDYHALL_DATABASE_URL", &url)
            .env("STUDYHALL_JWT_SECRET", JWT_SECRET)
            .env("STUDYHALL_API_KEY", API_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in load_env().iter().chain(extra) {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id().context("server pid")?;
        pin_server(pid)?;
        let addr = wait_line(&mut child, "studyhall listening on http://", "studyhall").await?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?;
        ensure_loopback(addr)?;
        Ok(Self {
            addr,
            pid,
            child,
            pg,
        })
    }

    pub async fn create_room(&self, id: &str, kind: &str) -> Result<()> {
        let (status, body) = http(
            self.addr,
            API_WAIT,
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id": id, "kind": kind, "title": id, "visibility": "open"})),
        )
        .await?;
        ensure!(
            status == 201 || status == 409,
            "create room {id}: {status} {body}"
        );
        Ok(())
    }

    /// SIGTERM, then wait (bounded), then drop the PostgreSQL database if we made one.
    pub async fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
        Ok(())
    }
}

/// Several studyhall nodes (cluster mode) on one throw-away PostgreSQL database and a NATS.
pub struct Cluster {
    pub nodes: Vec<Server>,
    pg: Option<PgDb>,
}

impl Cluster {
    pub async fn start(
        bin: &Path,
        pg_base: &str,
        bus_url: &str,
        n: usize,
        extra: &[(String, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        ensure!(
            bus_url.starts_with("nats://127.") || bus_url.starts_with("nats://localhost"),
            "the bus must be on loopback: {bus_url}"
        );
        let pg = PgDb::create(pg_base).await?;
        let mut nodes = Vec::new();
        for i in 0..n.max(1) {
            let mut env: Vec<(String, String)> = vec![
                ("STUDYHALL_NATS_URL".into(), bus_url.into()),
                ("STUDYHALL_NODE_ID".into(), format!("n{i}")),
            ];
            env.extend(extra.iter().cloned());
            // The first node migrates; the others find the schema in place.
            nodes.push(
                Server::start(
                    bin,
                    Db::Shared(pg.url.clone()),
                    &env,
                    &log_dir.join(format!("n{i}")),
                )
                .await?,
            );
        }
        Ok(Self {
            nodes,
            pg: Some(pg),
        })
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|s| s.addr).collect()
    }

    pub async fn stop(mut self) -> Result<()> {
        for s in self.nodes.drain(..) {
            s.stop().await?;
        }
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
        Ok(())
    }
}

/// `GET /metrics` of a node, as text.
pub async fn metrics_text(addr: SocketAddr) -> Result<String> {
    ensure_loopback(addr)?;
    let get = http1::request(addr, "GET", "/metrics", "", "");
    let (_, _, body) = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .context("metrics timed out")??;
    Ok(body)
}

/// `GET /metrics` of a node: the cross-node latency histogram's (upper bound s, cumulative
/// count) buckets.
pub async fn bus_latency_buckets(addr: SocketAddr) -> Result<Vec<(f64, u64)>> {
    let text = metrics_text(addr).await?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("studyhall_bus_latency_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, n)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        out.push((le, n.trim().parse().unwrap_or(0)));
    }
    Ok(out)
}

/// `NAME_sum` and `NAME_count` of a histogram in Prometheus text (0 when absent).
pub fn sum_count(text: &str, name: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        let key = format!("{name}_{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

/// The server's group commits from its metrics: (commits, mean writes per commit, mean ms).
pub fn commit_summary(text: &str) -> (f64, f64, f64) {
    let (rows, commits) = sum_count(text, "studyhall_store_batch_rows");
    let (secs, _) = sum_count(text, "studyhall_store_commit_seconds");
    (
        commits,
        rows / commits.max(1.0),
        secs * 1000.0 / commits.max(1.0),
    )
}

/// A report line for [`commit_summary`].
pub async fn commit_note(addr: SocketAddr) -> String {
    match metrics_text(addr).await {
        Ok(text) => {
            let (n, rows, ms) = commit_summary(&text);
            format!(
                "server group commits: {n:.0}, {rows:.1} writes and {ms:.2} ms per commit (mean)"
            )
        }
        Err(e) => format!("server metrics unavailable: {e:#}"),
    }
}

/// The bucket bound (ms) under which `q` of the observations fall, summed over nodes.
pub fn bucket_quantile_ms(nodes: &[Vec<(f64, u64)>], q: f64) -> Option<f64> {
    let mut sum: Vec<(f64, u64)> = Vec::new();
    for buckets in nodes {
        for (i, (le, n)) in buckets.iter().enumerate() {
            if sum.len() <= i {
                sum.push((*le, 0));
            }
            sum[i].1 += n;
        }
    }
    let total = sum.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    sum.iter()
        .find(|(_, n)| *n >= want)
        .map(|(le, _)| le * 1000.0)
}

/// How long an API request of a run may take.
pub const API_WAIT: Duration = Duration::from_secs(15);

/// One HTTP/1.1 request to a loopback server within `limit`, with a JSON body and the bearer
/// `key` if given; the status and the JSON answer (`Null` when the answer is not JSON).
pub async fn http(
    addr: SocketAddr,
    limit: Duration,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    ensure_loopback(addr)?;
    let mut headers = String::from("Content-Type: application/json\r\n");
    if let Some(k) = key {
        headers.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, _, body) =
        tokio::time::timeout(limit, http1::request(addr, method, path, &headers, &body))
            .await
            .context("HTTP request timed out")??;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// CPU sets of a pinned run: the system under test and the load generator.
#[derive(Clone, Debug, Default)]
pub struct Pins {
    pub server: String,
    pub load: String,
}

static PINS: std::sync::OnceLock<Pins> = std::sync::OnceLock::new();

/// Sets the run's CPU sets (once, from the command line) and pins this process to the load
/// set.
pub fn set_pins(pins: Pins) -> Result<()> {
    let load = pins.load.clone();
    let _ = PINS.set(pins);
    pin(std::process::id(), &load)
}

/// Pins a process of the system under test (server, peer, or their database).
pub fn pin_server(pid: u32) -> Result<()> {
    pin(
        pid,
        &PINS.get().map(|p| p.server.clone()).unwrap_or_default(),
    )
}

/// Pins a process of the load generator.
pub fn pin_load(pid: u32) -> Result<()> {
    pin(pid, &PINS.get().map(|p| p.load.clone()).unwrap_or_default())
}

/// A one-line description of the pinning, for reports.
pub fn pins_line() -> Option<String> {
    let p = PINS.get()?;
    (!p.server.is_empty() || !p.load.is_empty()).then(|| {
        format!(
            "pinned: server (and peers, database) on CPUs `{}`, load generator on CPUs `{}` (taskset)",
            if p.server.is_empty() { "any" } else { &p.server },
            if p.load.is_empty() { "any" } else { &p.load },
        )
    })
}

/// `taskset -a -p -c CPUS PID`: every thread of the process, and those it starts later.
fn pin(pid: u32, cpus: &str) -> Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("run taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A fresh database on the local PostgreSQL (trust auth), made and dropped with `psql`.
pub struct PgDb {
    pub url: String,
    name: String,
    base: String,
}

fn psql(base: &str, sql: &str) -> Result<()> {
    let out = std::process::Command::new("psql")
        .args([base, "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl PgDb {
    /// `base` is a URL of an existing database, e.g. postgres://postgres@127.0.0.1:5432/postgres.
    pub async fn create(base: &str) -> Result<Self> {
        let name = format!("studyhall_load_{:08x}", rand::random::<u32>());
        psql(base, &format!("CREATE DATABASE {name}"))?;
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => bail!("bad PostgreSQL URL {base}"),
        };
        Ok(Self {
            url,
            name,
            base: base.to_owned(),
        })
    }

    pub async fn drop_db(self) {
        let _ = psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A peer server process (killed on drop).
pub struct Peer {
    pub addr: SocketAddr,
    pub pid: u32,
    _child: Child,
    _dir: Option<PathBuf>,
}

/// Starts a peer server (`what`, for errors) with stdin closed and its output into `log`,
/// killed when the handle drops, pinned like the server under test; waits until it listens at
/// `addr`. Returns the child and its pid.
pub async fn spawn_listening(
    mut cmd: Command,
    log: std::fs::File,
    what: &str,
    addr: SocketAddr,
) -> Result<(Child, u32)> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let pid = child.id().with_context(|| format!("{what} pid"))?;
    pin_server(pid)?;
    wait_port(addr).await?;
    Ok((child, pid))
}

pub async fn wait_port(addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listening on {addr} after 10 s")
}

impl Peer {
    /// nats-server with a plain (no TLS) WebSocket listener on a free loopback port.
    pub async fn nats(bin: &str, work: &Path) -> Result<Self> {
        std::fs::create_dir_all(work)?;
        let ws_port = free_port()?;
        let conf = work.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:-1\nhttp: -1\nmax_payload: 65536\nmax_pending: 268435456\nwrite_deadline: \"10s\"\nwebsocket {{\n  host: 127.0.0.1\n  port: {ws_port}\n  no_tls: true\n  compression: false\n}}\n"
            ),
        )?;
        let log = std::fs::File::create(work.join("nats.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let addr = SocketAddr::from(([127, 0, 0, 1], ws_port));
        let (child, pid) = spawn_listening(cmd, log, bin, addr).await?;
        Ok(Self {
            addr,
            pid,
            _child: child,
            _dir: Some(work.to_owned()),
        })
    }

    /// The Socket.IO 4.x room-broadcast server in `peers/socketio` (npm install on first use).
    pub async fn socketio(work: &Path) -> Result<Self> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/socketio");
        ensure!(dir.join("server.js").exists(), "{} missing", dir.display());
        if !dir.join("node_modules/socket.io").exists() {
            eprintln!("peers/socketio: npm install (first use)");
            let st = std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .context("run npm install")?;
            ensure!(st.success(), "npm install failed in {}", dir.display());
        }
        std::fs::create_dir_all(work)?;
        let log = std::fs::File::create(work.join("socketio.log"))?;
        let mut child = Command::new("node")
            .arg(dir.join("server.js"))
            .env("PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawn node")?;
        let pid = child.id().context("node pid")?;
        pin_server(pid)?;
        let port = wait_line(&mut child, "socketio listening on ", "socket.io server").await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>()?));
        Ok(Self {
            addr,
            pid,
            _child: child,
            _dir: None,
        })
    }
}
