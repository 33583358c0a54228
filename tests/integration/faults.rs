//! Faults: the real binary killed with SIGKILL while sends are in flight (SQLite and
//! PostgreSQL), PostgreSQL stopped and started under a serving process, a cluster node paused
//! past the presence TTL, NATS cut from one node only, a rolling restart that reuses node ids,
//! and a soak that watches the server's memory and file descriptors.
//!
//! Every wait polls a condition under a generous bound ([`eventually`]); nothing sleeps to
//! synchronise. The soak runs 60 s by default; `STUDYHALL_SOAK_SECS=1800` makes it the 30-minute
//! run described in docs/benchmarks.md.

use crate::cluster::{Member, Nats, Node, eventually, send_all, student};
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;

// -- helpers --------------------------------------------------------------------------------

/// The binary on `db_url` with the tests' secret.
async fn spawn_server(db_url: &str, extra: &[(&str, &str)]) -> (Child, SocketAddr) {
    let mut cmd = studyhall_serve(db_url);
    cmd.env("STUDYHALL_JWT_SECRET", SECRET)
        .envs(extra.iter().copied());
    spawn_listening(cmd, "studyhall listening").await
}

async fn create_room(addr: SocketAddr, id: &str) {
    let (st, body) = http(
        addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id": id, "kind": "group", "title": id})),
    )
    .await;
    assert_eq!(st, 201, "create room: {body}");
}

/// Every stored message of `room` through the HTTP API: (id, seq, text), in seq order.
async fn stored_messages(addr: SocketAddr, room: &str) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (st, page) = http(
            addr,
            "GET",
            &format!("/api/rooms/{room}/messages?after_seq={after}&limit=1000"),
            Some(API_KEY),
            None,
        )
        .await;
        assert_eq!(st, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        for e in events {
            after = e["seq"].as_i64().unwrap();
            if e["type"] == "message" {
                out.push((
                    e["id"].as_str().unwrap().to_owned(),
                    after,
                    e["text"].as_str().unwrap().to_owned(),
                ));
            }
        }
        if page["has_more"] != true || events.is_empty() {
            return out;
        }
    }
}

/// Asserts the log of `room` holds each of `cmids` (sent as their own text) exactly once, in
/// a gap-free order, and that every `acked` (client_msg_id → id, seq) is stored as acked.
fn assert_once_and_kept(
    stored: &[(String, i64, String)],
    cmids: &[String],
    acked: &HashMap<String, (String, i64)>,
) {
    let seqs: Vec<i64> = stored.iter().map(|s| s.1).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "gap-free log"
    );
    let mut count: HashMap<&str, usize> = HashMap::new();
    for s in stored {
        *count.entry(s.2.as_str()).or_default() += 1;
    }
    for c in cmids {
        assert_eq!(count.get(c.as_str()), Some(&1), "{c} stored exactly once");
    }
    assert_eq!(
        stored.len(),
        cmids.len(),
        "nothing stored but what was sent"
    );
    let by_text: HashMap<&str, (&str, i64)> = stored
        .iter()
        .map(|(id, seq, t)| (t.as_str(), (id.as_str(), *seq)))
        .collect();
    for (cmid, (id, seq)) in acked {
        assert_eq!(
            by_text.get(cmid.as_str()),
            Some(&(id.as_str(), *seq)),
            "acked {cmid} kept with its acked id and seq"
        );
    }
}

fn send_frame(room: &str, cmid: &str, rid: i64) -> Value {
    json!({"type":"send","room":room,"text":cmid,"client_msg_id":cmid,"rid":rid})
}

/// Sends each of `cmids` (again) on `c`, `window` at a time, and returns every reply's
/// (id, seq); any reply but `ok` fails.
async fn resend(c: &mut Client, room: &str, cmids: &[String]) -> Vec<(String, i64)> {
    let mut out = Vec::with_capacity(cmids.len());
    for chunk in cmids.chunks(100) {
        let mut rids = Vec::new();
        for cmid in chunk {
            rids.push(
                c.fire(json!({"type":"send","room":room,"text":cmid,"client_msg_id":cmid}))
                    .await,
            );
        }
        for (rid, cmid) in rids.into_iter().zip(chunk) {
            let ok = c.reply(rid).await;
            assert_eq!(ok["type"], "ok", "resend of {cmid}: {ok}");
            out.push((
                ok["id"].as_str().unwrap().to_owned(),
                ok["seq"].as_i64().unwrap(),
            ));
        }
        // Drop the room's events read meanwhile: only replies matter here.
        c.pending.retain(|f| f.get("rid").is_some());
    }
    out
}

fn pid(child: &Child) -> u32 {
    child.id().expect("child running")
}

async fn signal(child: &Child, sig: &str) {
    let ok = tokio::process::Command::new("kill")
        .args([sig, &pid(child).to_string()])
        .status()
        .await
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}

// -- SIGKILL with sends in flight -------------------------------------------------------------

/// Clients keep sending with client_msg_ids; the server is SIGKILLed while sends are in
/// flight; it restarts on the same database; every client resends every client_msg_id.
/// Nothing acked is lost, nothing is stored twice, and resends of committed writes answer
/// the original id and seq.
async fn sigkill_with_sends_in_flight(db_url: &str) {
    const CLIENTS: usize = 3;
    const PER: usize = 1500;
    const KILL_AFTER: usize = 150;
    let (mut child, addr) = spawn_server(db_url, &[]).await;
    create_room(addr, "r").await;
    let acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let mut c = Client::connect(addr, &student(&format!("u{k}"))).await;
        c.join("r").await;
        let acks = acks.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = c.ws.split();
            let writer = async move {
                for i in 0..PER {
                    let f = send_frame("r", &format!("u{k}-{i}"), i as i64 + 1);
                    if tx.send(Message::text(f.to_string())).await.is_err() {
                        break;
                    }
                }
                // Keep the sink (so the socket stays open) until the reader is done.
                tx
            };
            let reader = async move {
                let mut acked = HashMap::new();
                let mut errors = Vec::new();
                while let Some(Ok(m)) = rx.next().await {
                    let Message::Text(t) = m else { continue };
                    let f: Value = serde_json::from_str(&t).unwrap();
                    let Some(rid) = f["rid"].as_i64() else {
                        continue;
                    };
                    if f["type"] == "ok" {
                        let cmid = format!("u{k}-{}", rid - 1);
                        let got = (
                            f["id"].as_str().unwrap().to_owned(),
                            f["seq"].as_i64().unwrap(),
                        );
                        acked.insert(cmid, got);
                        acks.fetch_add(1, SeqCst);
                    } else {
                        errors.push(f);
                    }
                }
                (acked, errors)
            };
            let (_tx, (acked, errors)) = tokio::join!(writer, reader);
            (acked, errors)
        }));
    }
    eventually("some sends acked", async {
        while acks.load(SeqCst) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // Kill at once: no shutdown path runs, batches are mid-way.
    child.start_kill().unwrap();
    within("killed", child.wait()).await.unwrap();
    let mut acked = HashMap::new();
    for t in tasks {
        let (a, errors) = eventually("client sees the socket end", t).await.unwrap();
        assert!(errors.is_empty(), "no send was refused: {errors:?}");
        acked.extend(a);
    }
    assert!(
        acked.len() < CLIENTS * PER,
        "the kill came while sends were in flight ({} of {} acked)",
        acked.len(),
        CLIENTS * PER
    );

    let (child, addr) = spawn_server(db_url, &[]).await;
    let mut all = Vec::new();
    for k in 0..CLIENTS {
        let cmids: Vec<String> = (0..PER).map(|i| format!("u{k}-{i}")).collect();
        let mut c = Client::connect(addr, &student(&format!("u{k}"))).await;
        c.join("r").await;
        let replies = resend(&mut c, "r", &cmids).await;
        for (cmid, got) in cmids.iter().zip(&replies) {
            if let Some(first) = acked.get(cmid) {
                assert_eq!(
                    got, first,
                    "a resend of acked {cmid} answers its id and seq"
                );
            }
        }
        all.extend(cmids);
    }
    let stored = stored_messages(addr, "r").await;
    assert_once_and_kept(&stored, &all, &acked);
    drop(child);
}

#[tokio::test]
async fn sigkill_with_sends_in_flight_sqlite_loses_and_doubles_nothing() {
    with_sqlite_url(sigkill_with_sends_in_flight).await;
}

#[tokio::test]
async fn sigkill_with_sends_in_flight_postgres_loses_and_doubles_nothing() {
    with_postgres_url(sigkill_with_sends_in_flight).await;
}

// -- PostgreSQL restarted under a serving process ---------------------------------------------

/// A PostgreSQL server of the test's own (initdb into a temporary directory, on a free
/// loopback port), so stopping it disturbs nothing else. Run as the `postgres` user when the
/// test runs as root (PostgreSQL refuses root). Cannot be had: the test fails, saying why.
struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePg {
    fn bin_dir() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin are needed")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .collect();
        found.sort();
        found
            .pop()
            .expect("no initdb/pg_ctl under /usr/lib/postgresql/*/bin")
    }

    fn is_root() -> bool {
        let out = std::process::Command::new("id").arg("-u").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    }

    /// Runs one of the PostgreSQL tools (as `postgres` when root); panics with its output on
    /// failure.
    async fn tool(&self, name: &str, args: &[&str]) {
        let exe = self.bin.join(name);
        let mut cmd = if Self::is_root() {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            tokio::process::Command::new(&exe)
        };
        let out = eventually(
            name,
            cmd.args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    async fn create() -> Self {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self {
            dir,
            bin: Self::bin_dir(),
            port,
        };
        pg.tool(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )
        .await;
        pg.start().await;
        pg
    }

    async fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "120",
                "start",
            ],
        )
        .await;
    }

    async fn stop(&self) {
        self.tool(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "120", "stop"],
        )
        .await;
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if Self::is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&exe).args(args).output()
        };
    }
}

#[tokio::test]
async fn postgres_restarted_while_serving_then_the_same_process_serves_again() {
    eventually("postgres restart", async {
        let pg = PrivatePg::create().await;
        let (mut child, addr) = spawn_server(&pg.url(), &[]).await;
        create_room(addr, "r").await;
        let mut c = Client::connect(addr, &student("alice")).await;
        c.join("r").await;
        let before = c
            .ok(json!({"type":"send","room":"r","text":"before","client_msg_id":"before"}))
            .await;

        pg.stop().await;
        // During the outage a send is refused with a clear error, within the bound.
        let refused = c
            .request(json!({"type":"send","room":"r","text":"during","client_msg_id":"during"}))
            .await;
        assert_eq!(
            refused["type"], "error",
            "no ack without the database: {refused}"
        );
        let code = refused["code"].as_str().unwrap();
        assert!(
            code == "unavailable" || code == "internal",
            "a clear error: {refused}"
        );

        pg.start().await;
        // The same process, on the same session, writes again once PostgreSQL is back.
        let during = loop {
            let r = c
                .request(json!({"type":"send","room":"r","text":"during","client_msg_id":"during"}))
                .await;
            if r["type"] == "ok" {
                break r;
            }
            let code = r["code"].as_str().unwrap_or_default().to_owned();
            assert!(code == "unavailable" || code == "internal", "{r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let after = c
            .ok(json!({"type":"send","room":"r","text":"after","client_msg_id":"after"}))
            .await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server process kept running"
        );
        let stored = stored_messages(addr, "r").await;
        let cmids: Vec<String> = ["before", "during", "after"].map(String::from).to_vec();
        let acked: HashMap<String, (String, i64)> =
            [("before", before), ("during", during), ("after", after)]
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        (
                            v["id"].as_str().unwrap().to_owned(),
                            v["seq"].as_i64().unwrap(),
                        ),
                    )
                })
                .collect();
        assert_once_and_kept(&stored, &cmids, &acked);
        // New sessions and joins (which read through the pool) work too.
        let mut b = Client::connect(addr, &student("bob")).await;
        let joined = b.join("r").await;
        assert_eq!(joined["last_seq"], 3);
        drop(child);
    })
    .await;
}

// -- cluster faults ---------------------------------------------------------------------------

/// Reads `m`'s frames until `user` goes `state`; the room events read meanwhile are recorded
/// (so their gap-free check still holds).
async fn presence_of(m: &mut Member, user: &str, state: &str) {
    eventually(&format!("{user} {state}"), async {
        loop {
            let f = m.client.next().await;
            if f["type"] == "presence" {
                if f["user"]["id"] == user && f["state"] == state {
                    return;
                }
                continue;
            }
            m.record(f);
        }
    })
    .await;
}

/// Two nodes on a fresh database and a NATS server of the test's own; node `i` reaches NATS
/// at `nats_urls[i]`.
async fn two_nodes(nats_urls: [&str; 2], db: &PgDb) -> Vec<Node> {
    let n0 = Node::spawn(&db.url, nats_urls[0], "n0", &[]).await;
    let n1 = Node::spawn(&db.url, nats_urls[1], "n1", &[]).await;
    vec![n0, n1]
}

#[tokio::test]
async fn a_node_paused_past_the_presence_ttl_is_marked_gone_then_converges() {
    eventually("paused node", async {
        let nats = Nats::start().await;
        let db = PgDb::create().await;
        let mut nodes = two_nodes([&nats.url(), &nats.url()], &db).await;
        create_room(nodes[0].addr, "r").await;
        let mut alice = Member::join(nodes[0].addr, "alice", "r").await;
        let mut bob = Member::join(nodes[1].addr, "bob", "r").await;
        presence_of(&mut alice, "bob", "online").await;

        // Paused: no heartbeats. Node 0 takes node 1 for gone (TTL 1 s in these tests).
        signal(&nodes[1].child, "-STOP").await;
        presence_of(&mut alice, "bob", "offline").await;
        // Writes on node 0 go on meanwhile.
        let acked_a = send_all(&mut alice.client, "r", "a", 10).await;
        signal(&nodes[1].child, "-CONT").await;

        // Back: its heartbeats make bob online again, and bob gets what he missed, in order.
        presence_of(&mut alice, "bob", "online").await;
        let fallback = [nodes[1].addr, nodes[0].addr];
        bob.collect(10, &fallback).await;
        let acked_b = send_all(&mut bob.client, "r", "b", 10).await;
        let want: Vec<i64> = acked_a.iter().chain(&acked_b).copied().collect();
        for m in [&mut alice, &mut bob] {
            // Member::record fails on any gap or duplicate.
            m.collect(20, &fallback).await;
            let seqs: Vec<i64> = m.seen.iter().map(|s| s.0).collect();
            assert_eq!(seqs, want, "{} saw every message once, in order", m.user);
        }
        for n in &mut nodes {
            let _ = n.child.kill().await;
        }
        db.drop_db().await;
    })
    .await;
}

/// A TCP proxy between one node and NATS that the test can cut (every connection closed,
/// new ones refused) and restore.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped on each cut: connection tasks of an older generation end.
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (c, g) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if c.load(SeqCst) {
                    drop(down);
                    continue;
                }
                let mut gen_rx = g.subscribe();
                let born = *gen_rx.borrow();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = gen_rx.wait_for(|g| *g != born) => {}
                    }
                });
            }
        });
        Self {
            port,
            cut,
            generation,
            task,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.cut.store(false, SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

#[tokio::test]
async fn nats_cut_from_one_node_loses_nothing_acked_and_converges_after() {
    eventually("nats cut", async {
        let nats = Nats::start().await;
        let proxy = Proxy::start(nats.port).await;
        let db = PgDb::create().await;
        let mut nodes = two_nodes([&nats.url(), &proxy.url()], &db).await;
        create_room(nodes[0].addr, "r").await;
        let mut alice = Member::join(nodes[0].addr, "alice", "r").await;
        let mut bob = Member::join(nodes[1].addr, "bob", "r").await;
        presence_of(&mut alice, "bob", "online").await;

        proxy.cut();
        // Node 0 stops hearing node 1: bob goes offline there.
        presence_of(&mut alice, "bob", "offline").await;
        // Both sides keep writing: the store, not the bus, acknowledges.
        let a = send_all(&mut alice.client, "r", "a", 20).await;
        let b = send_all(&mut bob.client, "r", "b", 20).await;
        proxy.restore();

        presence_of(&mut alice, "bob", "online").await;
        let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
        all.sort();
        let fallback = [nodes[0].addr, nodes[1].addr];
        for m in [&mut alice, &mut bob] {
            // Member::record fails on any gap or duplicate.
            m.collect(40, &fallback).await;
            let seqs: Vec<i64> = m.seen.iter().map(|s| s.0).collect();
            assert_eq!(seqs, all, "{} saw every acked message once", m.user);
        }
        // Events converge both ways after the reconnect: one more message each way.
        let a2 = send_all(&mut alice.client, "r", "a2", 1).await;
        let b2 = send_all(&mut bob.client, "r", "b2", 1).await;
        all.extend(a2);
        all.extend(b2);
        for m in [&mut alice, &mut bob] {
            m.collect(42, &fallback).await;
            let seqs: Vec<i64> = m.seen.iter().map(|s| s.0).collect();
            assert_eq!(seqs, all, "{} after the reconnect", m.user);
        }
        for n in &mut nodes {
            let _ = n.child.kill().await;
        }
        db.drop_db().await;
    })
    .await;
}

/// Fires `n` sends tagged `tag` on `c` without waiting, then reads until the socket closes
/// (the node drains it); the acked (client_msg_id → id, seq).
async fn send_through_close(c: Client, tag: &str, n: usize) -> HashMap<String, (String, i64)> {
    let (mut tx, mut rx) = c.ws.split();
    let cmids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let writer = async {
        for (i, cmid) in cmids.iter().enumerate() {
            let f = send_frame("r", cmid, i as i64 + 1);
            if tx.send(Message::text(f.to_string())).await.is_err() {
                break;
            }
        }
        tx
    };
    let reader = async {
        let mut acked = HashMap::new();
        while let Some(Ok(m)) = rx.next().await {
            let Message::Text(t) = m else { continue };
            let f: Value = serde_json::from_str(&t).unwrap();
            if let (Some(rid), "ok") = (f["rid"].as_i64(), f["type"].as_str().unwrap_or("")) {
                acked.insert(
                    cmids[rid as usize - 1].clone(),
                    (
                        f["id"].as_str().unwrap().to_owned(),
                        f["seq"].as_i64().unwrap(),
                    ),
                );
            }
        }
        acked
    };
    let (_tx, acked) = tokio::join!(writer, reader);
    acked
}

#[tokio::test]
async fn a_rolling_restart_reusing_node_ids_loses_and_doubles_nothing() {
    eventually("rolling restart", async {
        let nats = Nats::start().await;
        let db = PgDb::create().await;
        let mut nodes = two_nodes([&nats.url(), &nats.url()], &db).await;
        create_room(nodes[0].addr, "r").await;
        let mut acked: HashMap<String, (String, i64)> = HashMap::new();
        let mut cmids: Vec<String> = Vec::new();
        let mut watcher = Member::join(nodes[1].addr, "watcher", "r").await;
        for (round, i) in [0usize, 1, 0].into_iter().enumerate() {
            let other = 1 - i;
            // A sender on the node about to restart, with sends in flight when SIGTERM comes.
            let tag = format!("s{round}");
            let mut s = Client::connect(nodes[i].addr, &student(&tag)).await;
            s.join("r").await;
            let sender = tokio::spawn({
                let tag = tag.clone();
                async move { send_through_close(s, &tag, 200).await }
            });
            nodes[i].signal("-TERM").await;
            let got = eventually("sender drained", sender).await.unwrap();
            let status = eventually("node exits", nodes[i].child.wait())
                .await
                .unwrap();
            assert!(status.success(), "node n{i} exits cleanly: {status:?}");
            // Same node id, new process.
            nodes[i] = Node::spawn(&db.url, &nats.url(), &format!("n{i}"), &[]).await;
            // The sender resends everything on the other node: committed ones answer the
            // original id and seq.
            let mine: Vec<String> = (0..200).map(|k| format!("{tag}-{k}")).collect();
            let mut c = Client::connect(nodes[other].addr, &student(&tag)).await;
            c.join("r").await;
            let replies = resend(&mut c, "r", &mine).await;
            for (cmid, r) in mine.iter().zip(&replies) {
                if let Some(first) = got.get(cmid) {
                    assert_eq!(r, first, "resend of acked {cmid}");
                }
            }
            acked.extend(got);
            cmids.extend(mine);
            // The watcher (moved off a draining node if need be) has seen every message once.
            let fallback = [nodes[1].addr, nodes[0].addr];
            watcher.collect(cmids.len(), &fallback).await;
        }
        let stored = stored_messages(nodes[0].addr, "r").await;
        assert_once_and_kept(&stored, &cmids, &acked);
        let seen: Vec<i64> = watcher.seen.iter().map(|s| s.0).collect();
        let want: Vec<i64> = stored.iter().map(|s| s.1).collect();
        assert_eq!(seen, want, "the watcher saw the whole log once, in order");
        for n in &mut nodes {
            let _ = n.child.kill().await;
        }
        db.drop_db().await;
    })
    .await;
}

// -- soak -------------------------------------------------------------------------------------

/// The server's resident memory in KiB, from `/proc/<pid>/status`: `(anonymous, file)`.
/// Anonymous memory (`RssAnon`: heap, stacks, SQLite's page caches) is the process's own;
/// file-backed memory (`RssFile`) is mostly the SQLite database mapped with `mmap_size`, which
/// grows with the file as pages are read, is bounded by the file's size and is reclaimable
/// page cache, not a leak.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/<pid>/status"))
    };
    (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// One round of bounded load: `clients` users connect, join a room, send, read their
/// messages, leave, and disconnect.
async fn soak_round(addr: SocketAddr, round: usize, clients: usize) {
    let room = format!("soak{}", round % 4);
    let mut joined = Vec::new();
    for k in 0..clients {
        let mut c = Client::connect(addr, &student(&format!("soak{k}"))).await;
        c.join(&room).await;
        joined.push(c);
    }
    for (k, c) in joined.iter_mut().enumerate() {
        for i in 0..5 {
            c.ok(
                json!({"type":"send","room":room,"text":format!("r{round} k{k} {i}"),
                        "client_msg_id":format!("r{round}-k{k}-{i}")}),
            )
            .await;
        }
    }
    for c in &mut joined {
        c.ok(json!({"type":"leave","room":room})).await;
    }
}

#[tokio::test]
async fn soak_keeps_memory_and_file_descriptors_flat() {
    let secs: u64 = std::env::var("STUDYHALL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let total = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("soak.db").display());
    // SQLite's page caches fill up as the database grows, by design up to `sqlite_cache_kib`
    // per connection (32 MiB by default): a small cache here, so what grows is a leak and not
    // a cache filling up.
    let (child, addr) = spawn_server(&url, &[("STUDYHALL_SQLITE_CACHE_KIB", "1024")]).await;
    for r in 0..4 {
        create_room(addr, &format!("soak{r}")).await;
    }
    let pid = pid(&child);
    let started = Instant::now();
    let warm_up = total / 4;
    let mut baseline: Option<((u64, u64), usize)> = None;
    let mut round = 0;
    let mut peak_anon = 0;
    while started.elapsed() < total {
        // The round is bounded; the whole soak is bounded by its duration plus one round.
        tokio::time::timeout(Duration::from_secs(60), soak_round(addr, round, 4))
            .await
            .expect("a soak round finishes");
        round += 1;
        let settled = settled_fds(pid, baseline.map(|b| b.1)).await;
        let rss = rss_kib(pid);
        peak_anon = peak_anon.max(rss.0);
        if baseline.is_none() && started.elapsed() >= warm_up {
            baseline = Some((rss, settled));
        }
    }
    let ((anon0, file0), fd0) = baseline.expect("the soak ran past its warm-up");
    let ((anon1, file1), fd1) = (rss_kib(pid), settled_fds(pid, Some(fd0)).await);
    let db_kib = std::fs::metadata(dir.path().join("soak.db"))
        .map(|m| m.len() / 1024)
        .unwrap_or(0);
    eprintln!(
        "soak: {round} rounds in {:?}; anonymous RSS {anon0} -> {anon1} KiB (peak {peak_anon}); \
         file-backed RSS {file0} -> {file1} KiB (database file {db_kib} KiB); fds {fd0} -> {fd1}",
        started.elapsed()
    );
    // Memory: the process's own (anonymous) memory is flat after warm-up, within allocator
    // slack (8 MiB or 25 %, whichever is more). File-backed pages follow the database file.
    let margin = (anon0 / 4).max(8 * 1024);
    assert!(
        anon1 <= anon0 + margin,
        "anonymous RSS grew from {anon0} KiB to {anon1} KiB over {round} rounds"
    );
    assert!(fd1 <= fd0 + 2, "fds grew from {fd0} to {fd1}");
    drop(child);
}

/// The server's fd count once the closed clients' sockets are gone: polls until it is at or
/// below `target` (when given) or stops changing, bounded.
async fn settled_fds(pid: u32, target: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = fds(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fds(pid);
        let done = match target {
            Some(t) => now <= t,
            None => now == last,
        };
        if done || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}
