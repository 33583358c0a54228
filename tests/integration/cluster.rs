//! Cluster mode with real processes: several `studyhall` binaries on one fresh PostgreSQL
//! database and a `nats-server` of the test's own (on a free loopback port, so restarting it
//! disturbs nothing else; a missing `nats-server` fails the test). Members of one room spread
//! over the nodes must all see one gap-free order; calls, kicks, mutes, slow mode, hands,
//! stage and presence cross nodes; the bus may lose messages (NATS killed and restarted), a
//! node may die (SIGKILL) or drain (SIGTERM), and still nothing acknowledged is lost or
//! doubled.

use crate::calls::OFFER;
use crate::common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use studyhall::protocol::{PlatformRole, RoomRole};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

/// The bound on each wait of a cluster test. Three nodes, NATS and PostgreSQL share what may be
/// a busy two-core machine, so every wait here polls a condition (a frame, a state, a metric)
/// under this one generous bound instead of racing a short clock; it only decides when a
/// stuck test gives up. `STUDYHALL_CLUSTER_BUDGET_S` changes it (default 120 s).
pub(crate) fn budget() -> Duration {
    let secs = std::env::var("STUDYHALL_CLUSTER_BUDGET_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

pub(crate) async fn eventually<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(budget(), f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {:?}: {what}", budget()))
}

/// A nats-server of the test's own on a free loopback port.
pub(crate) struct Nats {
    child: Child,
    pub(crate) port: u16,
}

impl Nats {
    pub(crate) async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    async fn start_on(port: u16) -> Self {
        Self::start_with(port, &[]).await
    }

    /// A server whose `max_payload` is `bytes` (set in a config file: nats-server has no
    /// flag for it).
    async fn start_with_max_payload(bytes: usize) -> (Self, tempfile::NamedTempFile) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, format!("max_payload: {bytes}\n").as_bytes()).unwrap();
        let path = file.path().to_str().unwrap().to_owned();
        (Self::start_with(port, &["-c", &path]).await, file)
    }

    async fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("nats-server")
            .args(extra)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        eventually("nats-server listening", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Self { child, port }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
        let _ = self.child.wait().await;
    }

    /// Starts a new server on the same port (after [`Nats::kill`]).
    async fn restart(&mut self) {
        self.kill().await;
        *self = Self::start_on(self.port).await;
    }
}

pub(crate) struct Node {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

impl Node {
    pub(crate) async fn spawn(
        db_url: &str,
        nats_url: &str,
        id: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut cmd = studyhall_serve(db_url);
        cmd.envs(extra.iter().copied())
            .env("STUDYHALL_JWT_SECRET", SECRET)
            .env("STUDYHALL_NATS_URL", nats_url)
            .env("STUDYHALL_NODE_ID", id)
            .env("STUDYHALL_BUS_GAP_MS", "50")
            .env("STUDYHALL_BUS_SWEEP_MS", "250")
            .env("STUDYHALL_PRESENCE_HEARTBEAT_MS", "200")
            .env("STUDYHALL_PRESENCE_TTL_MS", "1000")
            .env("STUDYHALL_DRAIN_BATCH", "2")
            .env("STUDYHALL_DRAIN_INTERVAL_MS", "50")
            .env("STUDYHALL_SHUTDOWN_GRACE_MS", "2000");
        let (child, addr) = spawn_listening(cmd, &format!("node {id} listening")).await;
        Self { child, addr }
    }

    pub(crate) async fn signal(&mut self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .await
            .unwrap();
        assert!(ok.success());
    }
}

struct Cluster {
    db: Option<PgDb>,
    nats: Nats,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        Self::start_with(n, &[]).await
    }

    /// `n` nodes, each with the settings `extra` on top of the tests' own.
    async fn start_with(n: usize, extra: &[(&str, &str)]) -> Self {
        Self::start_on(Nats::start().await, n, extra).await
    }

    /// `n` nodes on the given NATS server.
    async fn start_on(nats: Nats, n: usize, extra: &[(&str, &str)]) -> Self {
        let db = PgDb::create().await;
        // The first node migrates the database; the others start on it together.
        let mut nodes = vec![Node::spawn(&db.url, &nats.url(), "n0", extra).await];
        let (url, bus) = (db.url.clone(), nats.url());
        let rest = (1..n).map(|i| {
            let (url, bus) = (url.clone(), bus.clone());
            async move { Node::spawn(&url, &bus, &format!("n{i}"), extra).await }
        });
        nodes.extend(futures_util::future::join_all(rest).await);
        Self {
            db: Some(db),
            nats,
            nodes,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    async fn room(&self, id: &str, kind: &str) {
        let (status, body) = http(
            self.addr(0),
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id": id, "kind": kind, "title": id})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Sets the room's `av.mode`.
    async fn av_mode(&self, id: &str, mode: &str) {
        let (status, body) = http(
            self.addr(0),
            "PATCH",
            &format!("/api/rooms/{id}"),
            Some(API_KEY),
            Some(json!({"av": {"mode": mode}})),
        )
        .await;
        assert_eq!((status, &body["av"]["mode"]), (200, &json!(mode)), "{body}");
    }

    async fn stop(mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill().await;
        }
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

pub(crate) fn student(user: &str) -> String {
    token(user, PlatformRole::Student, &[])
}

/// The next text frame, or `None` once the socket closed (with its close code noted).
pub(crate) async fn next_frame(c: &mut Client, closed: &mut Option<u16>) -> Option<Value> {
    if let Some(f) = c.pending.pop_front() {
        return Some(f);
    }
    loop {
        match eventually("next frame", c.ws.next()).await {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                *closed = f.map(|f| u16::from(f.code));
                return None;
            }
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// A room member that records every sequenced event it gets, and on a lost connection
/// reconnects to another node and resumes with `join {after_seq}`.
pub(crate) struct Member {
    pub(crate) user: String,
    room: String,
    pub(crate) client: Client,
    /// (seq, message id) of every `message` event, in arrival order.
    pub(crate) seen: Vec<(i64, String)>,
    pub(crate) last_seq: i64,
    pub(crate) closes: Vec<Option<u16>>,
    /// Replies read while collecting events.
    oks: Vec<Value>,
}

impl Member {
    pub(crate) async fn join(addr: SocketAddr, user: &str, room: &str) -> Self {
        let mut client = Client::connect(addr, &student(user)).await;
        let ok = client.join(room).await;
        Self {
            user: user.into(),
            room: room.into(),
            client,
            seen: Vec::new(),
            last_seq: ok["last_seq"].as_i64().unwrap(),
            closes: Vec::new(),
            oks: Vec::new(),
        }
    }

    pub(crate) fn record(&mut self, f: Value) {
        if f.get("rid").is_some() {
            self.oks.push(f);
            return;
        }
        if let Some(seq) = f["seq"].as_i64() {
            assert!(
                seq > self.last_seq,
                "{}: seq {seq} after {} (duplicate or reordered): {f}",
                self.user,
                self.last_seq
            );
            assert_eq!(
                seq,
                self.last_seq + 1,
                "{}: gap before seq {seq}: {f}",
                self.user
            );
            self.last_seq = seq;
            if f["type"] == "message" {
                self.seen
                    .push((seq, f["id"].as_str().unwrap_or_default().to_owned()));
            }
        }
    }

    /// Reads until `n` messages have been seen; on a closed socket, resumes on `fallback`.
    pub(crate) async fn collect(&mut self, n: usize, fallback: &[SocketAddr]) {
        let mut next_node = 0;
        while self.seen.len() < n {
            let mut closed = None;
            match next_frame(&mut self.client, &mut closed).await {
                Some(f) => self.record(f),
                None => {
                    self.closes.push(closed);
                    let addr = fallback[next_node % fallback.len()];
                    next_node += 1;
                    self.resume(addr).await;
                }
            }
        }
    }

    /// Reconnects to `addr` and re-joins with `after_seq`; the replay is recorded.
    async fn resume(&mut self, addr: SocketAddr) {
        let mut client = Client::connect(addr, &student(&self.user)).await;
        let ok = client
            .ok(json!({"type": "join", "room": self.room, "after_seq": self.last_seq}))
            .await;
        assert_eq!(ok["gap"], false, "{ok}");
        self.client = client;
    }
}

/// Sends `n` messages on `c`, waits for every ok, returns the acked seqs.
pub(crate) async fn send_all(c: &mut Client, room: &str, tag: &str, n: usize) -> Vec<i64> {
    let mut rids = Vec::with_capacity(n);
    for i in 0..n {
        let rid = c
            .fire(json!({"type":"send","room":room,"text":format!("{tag} {i}"),"client_msg_id":format!("{tag}-{i}")}))
            .await;
        rids.push(rid);
    }
    let mut seqs = Vec::new();
    for rid in rids {
        let ok = c.reply(rid).await;
        assert_eq!(ok["type"], "ok", "{ok}");
        seqs.push(ok["seq"].as_i64().unwrap());
    }
    seqs
}

#[tokio::test]
async fn three_nodes_one_room_every_member_sees_the_same_gap_free_order() {
    eventually("three-node order", async {
        let c = Cluster::start(3).await;
        // A dot in the id: the subject encoding must keep it one token.
        let room = "algebra.101";
        c.room(room, "group").await;
        let mut members = Vec::new();
        for i in 0..6 {
            members.push(Member::join(c.addr(i % 3), &format!("u{i}"), room).await);
        }
        const EACH: usize = 40;
        let total = EACH * members.len();
        let mut tasks = Vec::new();
        for (i, mut m) in members.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                // Each member sends while the others do; its own oks are interleaved.
                let rids: Vec<i64> = {
                    let mut rids = Vec::new();
                    for k in 0..EACH {
                        rids.push(
                            m.client
                                .fire(json!({"type":"send","room":m.room,"text":format!("m{i}-{k}"),"client_msg_id":format!("{i}-{k}")}))
                                .await,
                        );
                    }
                    rids
                };
                m.collect(total, &[]).await;
                // Members that are done hang up meanwhile: their presence frames may come
                // between the last oks, and `record` keeps only replies and events.
                while m.oks.len() < rids.len() {
                    let mut closed = None;
                    let f = next_frame(&mut m.client, &mut closed).await;
                    m.record(f.unwrap_or_else(|| panic!("{}: closed {closed:?}", m.user)));
                }
                for ok in &m.oks {
                    assert_eq!(ok["type"], "ok", "{ok}");
                }
                m.seen
            }));
        }
        let mut orders = Vec::new();
        for t in tasks {
            orders.push(t.await.unwrap());
        }
        assert_eq!(orders[0].len(), total);
        let ids: HashSet<&String> = orders[0].iter().map(|(_, id)| id).collect();
        assert_eq!(ids.len(), total, "no duplicate message");
        for o in &orders[1..] {
            assert_eq!(o, &orders[0], "every member sees the same order");
        }
        // The bus carried them: every node counts publishes and receipts.
        for i in 0..3 {
            let (status, body) = http_text(c.addr(i), "/metrics").await;
            assert_eq!(status, 200);
            assert!(metric(&body, "studyhall_bus_published_total") > 0.0, "node {i}");
            assert!(metric(&body, "studyhall_bus_received_total") > 0.0, "node {i}");
            assert!(body.contains("studyhall_bus_latency_seconds_count"));
        }
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn nats_restarted_mid_stream_every_member_gets_every_message_exactly_once() {
    eventually("bus loss", async {
        let mut c = Cluster::start(2).await;
        let room = "bus-loss";
        c.room(room, "group").await;
        let mut sender = Client::connect(c.addr(0), &student("sender")).await;
        sender.join(room).await;
        let mut far = Member::join(c.addr(1), "far", room).await;
        let mut near = Member::join(c.addr(0), "near", room).await;
        // Messages flow the whole time, paced, from node 0; from the 50th on only once NATS
        // is down, so some surely commit during the outage.
        let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
        let sending = tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut killed = Some(killed_rx);
            for k in 0..30 {
                if k == 10
                    && let Some(rx) = killed.take()
                {
                    rx.await.unwrap();
                }
                seqs.extend(send_all(&mut sender, room, &format!("m{k}"), 5).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seqs
        });
        far.collect(30, &[]).await;
        // NATS dies mid-stream. What commits meanwhile can only reach the far node from the
        // store (its sweep sees last_seq move on, or a gap it holds times out).
        c.nats.kill().await;
        killed_tx.send(()).unwrap();
        far.collect(80, &[]).await;
        let (_, body) = http_text(c.addr(1), "/metrics").await;
        assert!(
            metric(&body, "studyhall_bus_refilled_events_total") >= 1.0,
            "the far node refilled from the store"
        );
        // NATS comes back (clients reconnect and resubscribe; publishes buffered meanwhile
        // arrive late and are dropped as duplicates) and carries the rest.
        c.nats.restart().await;
        let acked = sending.await.unwrap();
        assert_eq!(acked.len(), 150);
        far.collect(150, &[]).await;
        near.collect(150, &[]).await;
        for m in [&far, &near] {
            let seqs: Vec<i64> = m.seen.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                seqs, acked,
                "{} got every acked message once, in order",
                m.user
            );
        }
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_killed_node_loses_no_acked_message_and_its_users_go_offline() {
    eventually("node loss", async {
        let mut c = Cluster::start(3).await;
        let room = "node-loss";
        c.room(room, "group").await;
        let mut watcher = Client::connect(c.addr(0), &student("watcher")).await;
        watcher.join(room).await;
        // A user only on the doomed node, who will not come back.
        let mut gone = Client::connect(c.addr(2), &student("gone")).await;
        gone.join(room).await;
        eventually("gone online on node 0", async {
            loop {
                let f = watcher.until("presence").await;
                if f["user"]["id"] == "gone" && f["state"] == "online" {
                    break;
                }
            }
        })
        .await;
        let mut movers = Vec::new();
        for i in 0..3 {
            movers.push(Member::join(c.addr(2), &format!("mover{i}"), room).await);
        }
        let mut sender = Client::connect(c.addr(1), &student("sender")).await;
        sender.join(room).await;
        let first = send_all(&mut sender, room, "a", 30).await;
        c.nodes[2].signal("-KILL").await;
        let second = send_all(&mut sender, room, "b", 30).await;
        let acked: Vec<i64> = first.into_iter().chain(second).collect();
        let fallback = [c.addr(0), c.addr(1)];
        for m in &mut movers {
            m.collect(60, &fallback).await;
            let seqs: Vec<i64> = m.seen.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, acked, "{} lost nothing acked", m.user);
            assert!(!m.closes.is_empty(), "{} was moved", m.user);
        }
        // The dead node's user drops out of presence once its heartbeats stop.
        eventually("gone offline", async {
            loop {
                let f = watcher.until("presence").await;
                if f["user"]["id"] == "gone" && f["state"] == "offline" {
                    break;
                }
            }
        })
        .await;
        // Node 1 expires node 2 on its own clock: its join reply drops "gone" within the TTL.
        let mut late = Client::connect(c.addr(1), &student("late")).await;
        let online = eventually("gone out of node 1's online list", async {
            loop {
                let ok = late.join(room).await;
                let online: Vec<String> = ok["online"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|u| u["id"].as_str().map(str::to_owned))
                    .collect();
                if !online.iter().any(|u| u == "gone") {
                    return online;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        for u in ["watcher", "mover0", "sender"] {
            assert!(online.iter().any(|o| o == u), "{u} in {online:?}");
        }
        drop(gone);
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_a_node_onto_the_others_without_losing_a_message() {
    eventually("drain", async {
        let mut c = Cluster::start(2).await;
        let room = "drain";
        c.room(room, "group").await;
        let mut movers = Vec::new();
        for i in 0..5 {
            movers.push(Member::join(c.addr(1), &format!("d{i}"), room).await);
        }
        let mut sender = Client::connect(c.addr(0), &student("sender")).await;
        sender.join(room).await;
        let first = send_all(&mut sender, room, "a", 20).await;
        c.nodes[1].signal("-TERM").await;
        // Messages keep coming while the node drains its sessions in batches.
        let sending = tokio::spawn(async move {
            let mut seqs = Vec::new();
            for k in 0..10 {
                seqs.extend(send_all(&mut sender, room, &format!("b{k}"), 4).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seqs
        });
        let fallback = [c.addr(0)];
        for m in &mut movers {
            // Every mover is moved: read to the close, then resume on node 0.
            while m.closes.is_empty() {
                let mut closed = None;
                match next_frame(&mut m.client, &mut closed).await {
                    Some(f) => m.record(f),
                    None => {
                        m.closes.push(closed);
                        m.resume(c.addr(0)).await;
                    }
                }
            }
        }
        let second = sending.await.unwrap();
        let acked: Vec<i64> = first.into_iter().chain(second).collect();
        for m in &mut movers {
            m.collect(60, &fallback).await;
            let seqs: Vec<i64> = m.seen.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, acked, "{} lost nothing", m.user);
            assert_eq!(
                m.closes,
                vec![Some(1001)],
                "{} was drained with 1001",
                m.user
            );
        }
        let exit = eventually("drained node exits", c.nodes[1].child.wait())
            .await
            .unwrap();
        assert_eq!(exit.code(), Some(0));
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_call_between_nodes_rings_connects_relays_signals_and_ends() {
    eventually("cross-node call", async {
        let c = Cluster::start(3).await;
        let mut tutor = Client::connect(c.addr(0), &token("tutor", PlatformRole::Tutor, &[])).await;
        let mut kid_a = Client::connect(c.addr(1), &student("kid")).await;
        let mut kid_b = Client::connect(c.addr(2), &student("kid")).await;
        // The tutor's node learns of the kid's sessions from the other nodes' heartbeats,
        // each on its own clock: place the call until it rings on both devices.
        let media = json!({"audio": true, "video": false});
        let tutor_session = tutor.session.clone();
        // Each attempt waits longer for the rings (1 s, 2 s, 4 s, then 8 s): on a slow machine
        // a late ring gets a longer look next time instead of failing the test.
        let mut window = Duration::from_secs(1);
        let call_id = eventually("both devices ring", async {
            loop {
                let r = tutor
                    .request(json!({"type":"call","to":"kid","media":media}))
                    .await;
                if r["type"] != "ok" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let id = r["call_id"].as_str().unwrap().to_owned();
                let mut rang = 0;
                for k in [&mut kid_a, &mut kid_b] {
                    if let Ok(f) = tokio::time::timeout(window, ring(k, &id)).await {
                        assert_eq!(f["from"]["session"], tutor_session.as_str());
                        rang += 1;
                    }
                }
                if rang == 2 {
                    return id;
                }
                tutor.ok(json!({"type":"call_hangup","call_id":id})).await;
                window = (window * 2).min(Duration::from_secs(8));
            }
        })
        .await;
        assert!(call_id.ends_with(".n0"), "{call_id}");
        let acc = kid_a
            .ok(json!({"type":"call_accept","call_id":call_id}))
            .await;
        assert!(acc["ice_servers"].is_array());
        let st = of_call(&mut tutor, "call_state", &call_id).await;
        assert_eq!(st["state"], "accepted");
        let other = of_call(&mut kid_b, "call_state", &call_id).await;
        assert_eq!(other["state"], "answered_elsewhere");
        // Signals cross in both directions, only between the two answering sessions.
        let offer = json!({"sdp": {"type": "offer", "sdp": OFFER}});
        tutor
            .ok(json!({"type":"signal","call_id":call_id,"data":offer}))
            .await;
        let got = kid_a.until("signal").await;
        assert_eq!(got["data"], offer);
        assert_eq!(got["from"]["session"], tutor.session.as_str());
        let cand = json!({"candidate": null});
        kid_a
            .ok(json!({"type":"signal","call_id":call_id,"data":cand}))
            .await;
        let got = tutor.until("signal").await;
        assert_eq!(got["from"]["session"], kid_a.session.as_str());
        let refused = kid_b
            .request(json!({"type":"signal","call_id":call_id,"data":cand}))
            .await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        kid_a
            .ok(json!({"type":"call_hangup","call_id":call_id}))
            .await;
        for c in [&mut tutor, &mut kid_a] {
            of_call(c, "call_ended", &call_id).await;
        }
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_call_to_a_user_who_just_connected_elsewhere_rings_at_once() {
    eventually("call before any heartbeat", async {
        // Heartbeats so rare (and a TTL so long) that node 0's directory cannot learn of
        // bob's session during the test: only asking the other nodes can find it.
        // The question to the other nodes is answered well within its bound (every node
        // heard from answers at once); a generous bound keeps a starved CI machine from
        // turning a slow answer into a refusal.
        let slow = [
            ("STUDYHALL_PRESENCE_HEARTBEAT_MS", "120000"),
            ("STUDYHALL_PRESENCE_TTL_MS", "600000"),
            ("STUDYHALL_BUS_REQUEST_TIMEOUT_MS", "15000"),
        ];
        let c = Cluster::start_with(2, &slow).await;
        let mut alice = Client::connect(c.addr(0), &student("alice")).await;
        let mut bob = Client::connect(c.addr(1), &student("bob")).await;
        // No wait: bob's welcome is in, alice calls.
        let r = alice
            .request(json!({"type":"call","to":"bob","media":{"audio":true,"video":false}}))
            .await;
        assert_eq!(r["type"], "ok", "the call was refused: {r}");
        let id = r["call_id"].as_str().unwrap().to_owned();
        let rang = ring(&mut bob, &id).await;
        assert_eq!(rang["from"]["session"], alice.session.as_str());
        // It connects like any call: the accept goes to the owning node.
        bob.ok(json!({"type":"call_accept","call_id":id})).await;
        let st = of_call(&mut alice, "call_state", &id).await;
        assert_eq!(st["state"], "accepted");
        alice.ok(json!({"type":"call_hangup","call_id":id})).await;
        of_call(&mut bob, "call_ended", &id).await;
        // A user online nowhere is still refused, and soon: every node answered "none".
        let asked = std::time::Instant::now();
        let code = alice
            .err(json!({"type":"call","to":"nobody","media":{"audio":true,"video":false}}))
            .await;
        assert_eq!(code, "unavailable");
        assert!(asked.elapsed() < budget(), "bounded");
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn kicks_typing_and_mutes_reach_other_nodes() {
    eventually("cross-node moderation", async {
        let c = Cluster::start(2).await;
        let room = "mod.room";
        c.room(room, "group").await;
        let mut host = Client::connect(
            c.addr(0),
            &token("host", PlatformRole::Student, &[(room, RoomRole::Host)]),
        )
        .await;
        host.join(room).await;
        let mut kid = Client::connect(c.addr(1), &student("kid")).await;
        kid.join(room).await;
        // Hands and stage cross: a hand raised on node 1 is in node 0's queue, and the host
        // on node 0 can put the kid (online only on node 1) on stage.
        kid.ok(json!({"type":"raise_hand","room":room})).await;
        let hand = host.until("hand").await;
        assert_eq!((hand["user"]["id"].as_str(), hand["raised"].as_bool()), (Some("kid"), Some(true)));
        let hands = host.ok(json!({"type":"hands","room":room})).await;
        assert_eq!(hands["hands"][0]["user"]["id"], "kid", "{hands}");
        let st = eventually("kid online on node 0", async {
            loop {
                let r = host
                    .request(json!({"type":"stage","room":room,"user":"kid","on":true}))
                    .await;
                if r["type"] == "ok" {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(st["stage"][0]["id"], "kid", "{st}");
        // Going on stage lowers the hand first, as on one node.
        loop {
            // (The kid's own copy of the raise comes first.)
            if kid.until("hand").await["raised"] == false {
                break;
            }
        }
        let on = kid.until("stage").await;
        assert_eq!((on["user"]["id"].as_str(), on["on"].as_bool()), (Some("kid"), Some(true)));
        // Typing crosses (once the kid's node relays it).
        kid.send(json!({"type":"typing","room":room})).await;
        let t = host.until("typing").await;
        assert_eq!(t["user"]["id"], "kid");
        // A mute set on node 0 holds on node 1 (its cached policy is dropped).
        kid.ok(json!({"type":"send","room":room,"text":"hi","client_msg_id":"k1"}))
            .await;
        host.ok(json!({"type":"mute","room":room,"user":"kid","seconds":60}))
            .await;
        let muted = kid.until("muted").await;
        assert_eq!(muted["user"], "kid");
        // The cache drop travels on the control subject, beside the notice: poll briefly.
        eventually("mute holds on node 1", async {
            for k in 0.. {
                let r = kid
                    .request(json!({"type":"send","room":room,"text":"hi","client_msg_id":format!("k2-{k}")}))
                    .await;
                if r["code"] == "muted" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // Slow mode counts a user's messages on every node: a message sent on node 1 starts
        // the clock on node 0 too (once node 0 has it).
        host.ok(json!({"type":"slow_mode","room":room,"seconds":60}))
            .await;
        let mut other = Client::connect(c.addr(0), &student("pal")).await;
        other.join(room).await;
        let mut pal = Client::connect(c.addr(1), &student("pal")).await;
        pal.join(room).await;
        pal.ok(json!({"type":"send","room":room,"text":"one","client_msg_id":"p1"}))
            .await;
        let seen = other.until("message").await;
        assert_eq!(seen["client_msg_id"], "p1");
        let code = other
            .err(json!({"type":"send","room":room,"text":"two","client_msg_id":"p2"}))
            .await;
        assert_eq!(code, "rate_limited");
        host.ok(json!({"type":"kick","room":room,"user":"kid"})).await;
        let kicked = kid.until("kicked").await;
        assert_eq!(kicked["room"], room);
        assert_eq!(close_code(&mut kid.ws).await, Some(4003));
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_badge_earned_through_another_node_reaches_the_earner() {
    eventually("cross-node badge", async {
        // One badge rule, for the first reaction received: the reactor's node commits the
        // reaction, and the author, connected to the other node, earns the badge.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"[[engagement.badges]]\nid = \"liked\"\nname = \"Liked\"\n\
              description = \"A first reaction from someone else\"\n\
              metric = \"reactions_received\"\nthreshold = 1\n",
        )
        .unwrap();
        let path = file.path().to_str().unwrap().to_owned();
        let c = Cluster::start_with(2, &[("STUDYHALL_CONFIG", &path)]).await;
        let room = "badge.room";
        c.room(room, "group").await;
        let mut author = Client::connect(c.addr(1), &student("author")).await;
        author.join(room).await;
        let sent = author
            .ok(json!({"type":"send","room":room,"text":"a fine answer","client_msg_id":"m1"}))
            .await;
        let mut fan = Client::connect(c.addr(0), &student("fan")).await;
        let joined = fan.join(room).await;
        // Node 0 routes the badge by its directory of the author's sessions, which comes with
        // node 1's heartbeat, the same one that shows the author online there.
        seen_online(&mut fan, &joined, "author").await;
        fan.ok(json!({"type":"react","room":room,"id":sent["id"],"emoji":"👍"}))
            .await;
        let badge = author.until("badge").await;
        assert_eq!(badge["badge"]["id"], "liked", "{badge}");
        assert_eq!(badge["user"]["id"], "author", "{badge}");
        assert_eq!(badge["room"], room, "{badge}");
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_node_whose_presence_outgrows_one_nats_message_still_shows_its_users() {
    eventually("heartbeat in parts", async {
        // A 4 KiB max_payload: 150 users in three rooms on node 0 make a presence snapshot of
        // about 15 KB (users per room plus sessions), which no single message can carry.
        let (nats, _conf) = Nats::start_with_max_payload(4096).await;
        let c = Cluster::start_on(nats, 2, &[]).await;
        const ROOMS: usize = 3;
        const USERS: usize = 150;
        for r in 0..ROOMS {
            c.room(&format!("big.{r}"), "group").await;
        }
        let mut far = Vec::new();
        for i in 0..USERS {
            let mut u = Client::connect(c.addr(0), &student(&format!("pupil-{i:03}"))).await;
            u.join(&format!("big.{}", i % ROOMS)).await;
            far.push(u);
        }
        // Node 1 sees every one of them online: the join reply's list, then presence events
        // until the whole set is there.
        for r in 0..ROOMS {
            let room = format!("big.{r}");
            let want: HashSet<String> = (0..USERS)
                .filter(|i| i % ROOMS == r)
                .map(|i| format!("pupil-{i:03}"))
                .collect();
            let mut watcher = Client::connect(c.addr(1), &student(&format!("watch-{r}"))).await;
            let ok = watcher.join(&room).await;
            let mut seen: HashSet<String> = ok["online"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|u| u["id"].as_str().map(str::to_owned))
                .collect();
            eventually("every user of the room online on node 1", async {
                while !want.is_subset(&seen) {
                    let p = watcher.until("presence").await;
                    if p["state"] == "online" {
                        seen.insert(p["user"]["id"].as_str().unwrap().to_owned());
                    }
                }
            })
            .await;
        }
        // The snapshot did travel in parts.
        let (_, body) = http_text(c.addr(0), "/metrics").await;
        let (beats, parts) = (
            metric(&body, "studyhall_bus_heartbeats_total"),
            metric(&body, "studyhall_bus_heartbeat_parts_total"),
        );
        assert!(parts >= beats + 3.0, "{parts} parts for {beats} heartbeats");
        // Node 1 knows the sessions too: a call placed there rings a user on node 0.
        let mut tutor = Client::connect(c.addr(1), &token("tutor", PlatformRole::Tutor, &[])).await;
        let r = tutor
            .ok(json!({"type":"call","to":"pupil-077","media":{"audio":true,"video":false}}))
            .await;
        let id = r["call_id"].as_str().unwrap().to_owned();
        let rang = ring(&mut far[77], &id).await;
        assert_eq!(rang["from"]["session"], tutor.session.as_str());
        c.stop().await;
    })
    .await;
}

/// Waits until `user` is online for `c`, which joined with the reply `joined`: in its
/// `online` list, else by a later `presence` event (another node's heartbeat).
async fn seen_online(c: &mut Client, joined: &Value, user: &str) {
    let listed = joined["online"]
        .as_array()
        .is_some_and(|a| a.iter().any(|u| u["id"] == user));
    if listed {
        return;
    }
    loop {
        let p = c.until("presence").await;
        if p["user"]["id"] == user && p["state"] == "online" {
            return;
        }
    }
}

#[tokio::test]
async fn a_ta_cannot_moderate_a_host_connected_to_another_node() {
    eventually("host on another node", async {
        let c = Cluster::start(2).await;
        let room = "ta.room";
        c.room(room, "group").await;
        // The host's role is the token's grant (never stored): only node 1 saw it, and node 0
        // knows it from node 1's heartbeat.
        let mut host = Client::connect(
            c.addr(1),
            &token("boss", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
        )
        .await;
        host.join(room).await;
        let mut ta = Client::connect(
            c.addr(0),
            &token("helper", PlatformRole::Student, &[(room, RoomRole::Ta)]),
        )
        .await;
        let joined = ta.join(room).await;
        seen_online(&mut ta, &joined, "boss").await;
        for cmd in [
            json!({"type":"kick","room":room,"user":"boss"}),
            json!({"type":"ban","room":room,"user":"boss"}),
            json!({"type":"mute","room":room,"user":"boss","seconds":60}),
        ] {
            assert_eq!(ta.err(cmd.clone()).await, "forbidden", "{cmd}");
        }
        // The host is still in the room and may speak.
        host.ok(json!({"type":"send","room":room,"text":"still here","client_msg_id":"h1"}))
            .await;
        c.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_nats_url_with_sqlite_is_refused_at_start() {
    let out = eventually(
        "refusal",
        Command::new(env!("CARGO_BIN_EXE_studyhall"))
            .arg("serve")
            .env("STUDYHALL_ADDR", "127.0.0.1:0")
            .env("STUDYHALL_DATABASE_URL", "sqlite://never-created.db")
            .env("STUDYHALL_NATS_URL", "nats://127.0.0.1:1")
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(!std::path::Path::new("never-created.db").exists());
}

/// Skips frames until the `call_incoming` of `call_id`.
async fn ring(c: &mut Client, call_id: &str) -> Value {
    of_call(c, "call_incoming", call_id).await
}

/// Skips frames until one of type `ty` about `call_id` (earlier attempts' frames included).
async fn of_call(c: &mut Client, ty: &str, call_id: &str) -> Value {
    loop {
        let f = c.until(ty).await;
        if f["call_id"] == call_id {
            return f;
        }
    }
}

/// GET a text endpoint (`/metrics`).
async fn http_text(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    eventually("http get", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.unwrap();
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        (status, text)
    })
    .await
}

/// The next `av_peer` notice: (session, joined).
async fn av_peer(c: &mut Client) -> (String, bool) {
    let f = c.until("av_peer").await;
    (
        f["session"].as_str().unwrap().to_owned(),
        f["joined"].as_bool().unwrap(),
    )
}

#[tokio::test]
async fn a_class_mesh_spans_nodes_in_one_join_order() {
    eventually("cross-node A/V", async {
        let mut c = Cluster::start_with(3, &[("STUDYHALL_AV_MESH_MAX", "4")]).await;
        let room = "class.av";
        c.room(room, "class").await;
        // The mesh only (`auto` goes to the SFU past the mesh: below).
        c.av_mode(room, "mesh").await;
        let mut peers = Vec::new();
        for i in 0..4 {
            let mut p = Client::connect(c.addr(i % 3), &student(&format!("p{i}"))).await;
            p.join(room).await;
            peers.push(p);
        }
        // All four join the A/V at once, from three nodes.
        let mut rids = Vec::new();
        for p in &mut peers {
            rids.push(p.fire(json!({"type":"av_join","room":room})).await);
        }
        let mut listed: Vec<HashSet<String>> = Vec::new();
        for (p, rid) in peers.iter_mut().zip(rids) {
            let ok = p.reply(rid).await;
            assert_eq!(ok["type"], "ok", "{ok}");
            assert_eq!(ok["mode"], "mesh");
            listed.push(
                ok["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["session"].as_str().unwrap().to_owned())
                    .collect(),
            );
        }
        let sessions: Vec<String> = peers.iter().map(|p| p.session.clone()).collect();
        // One join order for the whole cluster: of every two peers exactly one lists the other
        // (it joined later, and offers); the other hears of it through av_peer instead.
        for i in 0..4 {
            for j in i + 1..4 {
                let (a, b) = (
                    listed[i].contains(&sessions[j]),
                    listed[j].contains(&sessions[i]),
                );
                assert!(a ^ b, "p{i} lists p{j}: {a}, p{j} lists p{i}: {b}");
            }
        }
        for (i, p) in peers.iter_mut().enumerate() {
            let mut expected: HashSet<String> = sessions
                .iter()
                .filter(|s| **s != sessions[i] && !listed[i].contains(*s))
                .cloned()
                .collect();
            while !expected.is_empty() {
                let (s, joined) = av_peer(p).await;
                assert!(
                    joined && expected.remove(&s),
                    "p{i}: unexpected av_peer {s} {joined}"
                );
            }
        }
        // The mesh limit holds across nodes.
        let mut late = Client::connect(c.addr(1), &student("late")).await;
        late.join(room).await;
        assert_eq!(
            late.err(json!({"type":"av_join","room":room})).await,
            "conflict"
        );
        // Signals cross nodes between peers: the later of p0/p1 offers to the earlier.
        let (later, earlier) = if listed[1].contains(&sessions[0]) {
            (1, 0)
        } else {
            (0, 1)
        };
        let offer = json!({"sdp": {"type": "offer", "sdp": OFFER}});
        peers[later]
            .ok(json!({"type":"signal","room":room,"to":sessions[earlier],"data":offer}))
            .await;
        let got = peers[earlier].until("signal").await;
        assert_eq!(got["data"], offer);
        assert_eq!(got["room"], room);
        assert_eq!(got["from"]["session"], sessions[later].as_str());
        let cand = json!({"candidate": null});
        peers[earlier]
            .ok(json!({"type":"signal","room":room,"to":sessions[later],"data":cand}))
            .await;
        let got = peers[later].until("signal").await;
        assert_eq!(got["from"]["session"], sessions[earlier].as_str());
        // Nobody outside the A/V is reachable, on any node.
        assert_eq!(
            peers[0]
                .err(json!({"type":"signal","room":room,"to":late.session,"data":cand}))
                .await,
            "forbidden"
        );
        assert_eq!(
            late.err(json!({"type":"signal","room":room,"to":sessions[0],"data":cand}))
                .await,
            "forbidden"
        );
        // The earlier one leaves and at once joins again: it is the newest member now, lists
        // everyone (and offers to them), and the others hear it leave and come back, in that
        // order, and can still reach it.
        peers[earlier]
            .ok(json!({"type":"av_leave","room":room}))
            .await;
        let ok = peers[earlier]
            .ok(json!({"type":"av_join","room":room}))
            .await;
        assert_eq!(ok["peers"].as_array().unwrap().len(), 3, "{ok}");
        for (i, p) in peers.iter_mut().enumerate() {
            if i != earlier {
                assert_eq!(av_peer(p).await, (sessions[earlier].clone(), false));
                assert_eq!(av_peer(p).await, (sessions[earlier].clone(), true));
            }
        }
        peers[later]
            .ok(json!({"type":"signal","room":room,"to":sessions[earlier],"data":cand}))
            .await;
        let got = peers[earlier].until("signal").await;
        assert_eq!(got["from"]["session"], sessions[later].as_str());
        // p3 (node 0) leaves: everyone hears it, and there is room for one more.
        peers[3].ok(json!({"type":"av_leave","room":room})).await;
        for p in &mut peers[..3] {
            assert_eq!(av_peer(p).await, (sessions[3].clone(), false));
        }
        let ok = late.ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(ok["peers"].as_array().unwrap().len(), 3, "{ok}");
        for p in &mut peers[..3] {
            assert_eq!(av_peer(p).await, (late.session.clone(), true));
        }
        // Node 2 (p2) dies: the survivors hear p2 left once its heartbeats stop, and its
        // place in the mesh is free again.
        c.nodes[2].signal("-KILL").await;
        let (p0, rest) = peers.split_at_mut(1);
        for p in [&mut p0[0], &mut rest[0], &mut late] {
            assert_eq!(av_peer(p).await, (sessions[2].clone(), false));
        }
        // (The survivors forget node 2's members in the store right after they notice.)
        let ok = eventually("p3 back in the mesh", async {
            loop {
                let r = peers[3]
                    .request(json!({"type":"av_join","room":room}))
                    .await;
                if r["type"] == "ok" {
                    return r;
                }
                assert_eq!(r["code"], "conflict", "{r}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(ok["peers"].as_array().unwrap().len(), 3, "{ok}");
        c.stop().await;
    })
    .await;
}

/// Whiteboards across nodes: each node holding a board keeps a full copy. Strokes drawn on
/// one node reach the board's users on the other and are merged there, so a late joiner on
/// either node gets everything from its own node's copy; a node that loads the board after
/// strokes it never saw (not saved yet: saving is every minute here) gets them from the node
/// that has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_with_users_on_two_nodes_converges_on_both() {
    use crate::boards::{apply, board, insert, read, text};
    use yrs::sync::{Message, SyncMessage};
    use yrs::{Doc, ReadTxn, StateVector, Transact};
    eventually("cross-node board", async {
        let c = Cluster::start_with(2, &[("STUDYHALL_BOARD_SAVE_MS", "60000")]).await;
        let room = "board.room";
        c.room(room, "group").await;
        let who = |user: &str, role: RoomRole| token(user, PlatformRole::Student, &[(room, role)]);
        let mut host = Client::connect(c.addr(0), &who("hal", RoomRole::Host)).await;
        host.join(room).await;
        let mut ta = Client::connect(c.addr(1), &who("tia", RoomRole::Ta)).await;
        ta.join(room).await;
        let (hd, td) = (Doc::new(), Doc::new());
        // Node 0 has the board loaded first; node 1 loads it when the ta draws.
        let hello = insert(&hd, 0, "hello");
        host.ok(board(room, &hello)).await;
        // The ta draws on node 1, which loads the board (nothing saved yet), asks node 0 for
        // what it lacks, and passes node 0's answer on to the ta.
        let world = insert(&td, 0, "world ");
        ta.ok(board(room, &world)).await;
        while !text(&td).contains("hello") {
            apply(&td, read(&ta.until("board").await));
        }
        while !text(&hd).contains("world") {
            apply(&hd, read(&host.until("board").await));
        }
        assert_eq!(text(&hd), text(&td));
        // A newcomer on each node gets the whole board from that node's copy.
        let step1 = Message::Sync(SyncMessage::SyncStep1(StateVector::default()));
        for (i, user) in [(0, "ann"), (1, "ben")] {
            let mut late = Client::connect(c.addr(i), &who(user, RoomRole::Member)).await;
            late.join(room).await;
            late.ok(board(room, &step1)).await;
            let ld = Doc::new();
            loop {
                let m = read(&late.until("board").await);
                if let Message::Sync(SyncMessage::SyncStep2(_)) = m {
                    apply(&ld, m);
                    break;
                }
            }
            assert_eq!(text(&ld), text(&hd), "node {i}'s copy");
            assert_eq!(
                ld.transact().state_vector(),
                hd.transact().state_vector(),
                "node {i}'s copy has every stroke"
            );
        }
        c.stop().await;
    })
    .await;
}

/// Counts `breakout_warning` frames until `breakout_closed`.
async fn warnings_until_closed(c: &mut Client) -> usize {
    let mut n = 0;
    loop {
        match c.next().await["type"].as_str() {
            Some("breakout_warning") => n += 1,
            Some("breakout_closed") => return n,
            _ => {}
        }
    }
}

#[tokio::test]
async fn the_breakout_warning_and_the_class_end_cross_nodes() {
    eventually("cross-node class end", async {
        let c = Cluster::start_with(2, &[("STUDYHALL_CLASS_CLOCK_MS", "50")]).await;
        let room = "cls.end";
        c.room(room, "class").await;
        let mut host = Client::connect(
            c.addr(0),
            &token("host", PlatformRole::Student, &[(room, RoomRole::Host)]),
        )
        .await;
        host.join(room).await;
        let mut ann = Client::connect(c.addr(1), &student("ann")).await;
        ann.join(room).await;
        let mut bob = Client::connect(c.addr(1), &student("bob")).await;
        bob.join(room).await;
        // Both nodes' clocks see the warning due; the store gives it to one, and every session
        // hears it once.
        host.ok(json!({"type":"breakout_open","room":room,"duration_s":2,
            "groups":[{"members":["ann"]}]}))
            .await;
        assert_eq!(warnings_until_closed(&mut ann).await, 1);
        assert_eq!(warnings_until_closed(&mut host).await, 1);
        // The end of the class clears hands and stage held on both nodes.
        bob.ok(json!({"type":"raise_hand","room":room})).await;
        let hand = host.until("hand").await;
        assert_eq!(hand["user"]["id"], "bob");
        eventually("ann online on node 0", async {
            loop {
                let r = host
                    .request(json!({"type":"stage","room":room,"user":"ann","on":true}))
                    .await;
                if r["type"] == "ok" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        while ann.until("stage").await["on"] != true {}
        host.ok(json!({"type":"class_end","room":room})).await;
        loop {
            let ev = ann.until("stage").await;
            if ev["user"]["id"] == "ann" && ev["on"] == false {
                break;
            }
        }
        // (bob's own copy of the raise comes first.)
        while bob.until("hand").await["raised"] != false {}
        // Node 1 drops its cached room (a bus hop away) and refuses members' writes too.
        eventually("read-only on node 1", async {
            for k in 0.. {
                let r = bob
                    .request(json!({"type":"send","room":room,"text":"hi","client_msg_id":format!("b{k}")}))
                    .await;
                if r["code"] == "forbidden" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        c.stop().await;
    })
    .await;
}

/// A poll with members on two nodes: the student on node 1 sees it open, answers there, the
/// host on node 0 gets the coalesced results, closes it, and the student sees the close with
/// the final results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_with_members_on_two_nodes() {
    eventually("cross-node poll", async {
        let c = Cluster::start(2).await;
        let room = "poll.room";
        c.room(room, "group").await;
        let mut host = Client::connect(
            c.addr(0),
            &token("hal", PlatformRole::Student, &[(room, RoomRole::Host)]),
        )
        .await;
        host.join(room).await;
        let mut kid = Client::connect(c.addr(1), &student("kid")).await;
        kid.join(room).await;
        let create = json!({"type":"poll_create","room":room,"kind":"poll","question":"q?",
            "options":["a","b"],"show_results":"live"});
        let poll = host.ok(create).await["poll"]["id"].clone();
        host.ok(json!({"type":"poll_open","room":room,"poll":poll}))
            .await;
        while kid.until("poll").await["poll"]["state"] != "open" {}
        kid.ok(json!({"type":"poll_answer","room":room,"poll":poll,"choices":[1]}))
            .await;
        loop {
            let ev = host.until("poll").await;
            if ev["change"] == "results" && ev["poll"]["results"]["counts"] == json!([0, 1]) {
                break;
            }
        }
        host.ok(json!({"type":"poll_close","room":room,"poll":poll}))
            .await;
        let closed = loop {
            let ev = kid.until("poll").await;
            if ev["poll"]["state"] == "closed" {
                break ev;
            }
        };
        assert_eq!(
            closed["poll"]["results"]["counts"],
            json!([0, 1]),
            "{closed}"
        );
        c.stop().await;
    })
    .await;
}

/// Whether `addr`'s node refuses another session of `user` (4029: it counts the user's
/// sessions on the other nodes too, with `max_sessions_per_user` 2 and two open). A session it
/// accepts is closed at once.
async fn refuses_a_third_session(addr: SocketAddr, user: &str) -> bool {
    let mut ws = raw_ws(addr).await;
    futures_util::SinkExt::send(
        &mut ws,
        Message::text(json!({"type":"hello","token":student(user)}).to_string()),
    )
    .await
    .unwrap();
    within("welcome or close", async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(f)) => return f.is_some_and(|f| u16::from(f.code) == 4029),
                Ok(Message::Text(t)) if t.contains(r#""type":"welcome""#) => return false,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    })
    .await
}

/// Per-user limits hold across nodes: a user with sessions on two nodes gets half of each limit
/// on each node, so all the user's sessions together get no more than the limit.
#[tokio::test]
async fn per_user_limits_hold_across_nodes() {
    eventually("per-user limits across nodes", async {
        let c = Cluster::start_with(
            2,
            &[
                ("STUDYHALL_USER_WRITE_PER_S", "0.001"),
                ("STUDYHALL_USER_WRITE_BURST", "6"),
                ("STUDYHALL_MAX_SESSIONS_PER_USER", "2"),
            ],
        )
        .await;
        let room = "limits.room";
        c.room(room, "group").await;
        let mut tabs = Vec::new();
        for i in 0..2 {
            let mut t = Client::connect(c.addr(i), &student("pal")).await;
            t.join(room).await;
            tabs.push(t);
        }
        // Each node has heard of the session on the other once it refuses a third.
        for i in 0..2 {
            while !refuses_a_third_session(c.addr(i), "pal").await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut ok = 0;
        for i in 0..12 {
            let r = tabs[i % 2]
                .request(json!({"type":"send","room":room,"text":"spam","client_msg_id":format!("m{i}")}))
                .await;
            match r["type"].as_str() {
                Some("ok") => ok += 1,
                _ => assert_eq!(r["code"], "rate_limited", "{r}"),
            }
        }
        assert_eq!(ok, 6, "three writes on each node, six in all");
        c.stop().await;
    })
    .await;
}

/// The end of a class closes its A/V on every node: a student in the mesh on another node than
/// the host's is told `av_closed`, and after a reopen nobody is left in the A/V from before.
#[tokio::test]
async fn a_class_end_closes_the_av_on_every_node() {
    eventually("A/V closed across nodes", async {
        let c = Cluster::start(2).await;
        let room = "class.end";
        c.room(room, "class").await;
        let mut host = Client::connect(
            c.addr(0),
            &token("teach", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
        )
        .await;
        host.join(room).await;
        let mut kid = Client::connect(c.addr(1), &student("kid")).await;
        kid.join(room).await;
        host.ok(json!({"type":"av_join","room":room})).await;
        // The kid joins once the host's membership is known on node 1 (the join lists it).
        loop {
            let ok = kid.ok(json!({"type":"av_join","room":room})).await;
            if ok["peers"].as_array().is_some_and(|p| p.len() == 1) {
                break;
            }
            kid.ok(json!({"type":"av_leave","room":room})).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        host.ok(json!({"type":"class_end","room":room})).await;
        for c in [&mut host, &mut kid] {
            let closed = c.until("av_closed").await;
            assert_eq!(closed["reason"], "class_ended", "{closed}");
        }
        assert_eq!(
            kid.err(json!({"type":"av_join","room":room})).await,
            "conflict"
        );
        host.ok(json!({"type":"class_reopen","room":room})).await;
        // (The `ended` event came before `av_closed`; this one is the reopen.)
        let state = kid.until("class_state").await;
        assert_eq!(state["state"], "live", "{state}");
        let again = kid.ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(again["peers"], json!([]), "{again}");
        c.stop().await;
    })
    .await;
}

/// `auto` across nodes: a join past the mesh goes to the SFU whichever node it is on (the
/// store's admission says the mesh is full when the node has not heard of every member yet),
/// and every later join goes there too while the room has an SFU owner, even with the mesh
/// empty again: one SFU, on the node that claimed it, with the sessions of both nodes in it.
/// Sessions of a node that dies leave it. The A/V sweep claims again a room whose claim was
/// lost, and closes one another live node has taken over.
#[tokio::test]
async fn auto_goes_to_one_sfu_for_the_whole_cluster_past_the_mesh() {
    eventually("auto across nodes", async {
        // (Node 2 only lives, for the end.)
        let mut c = Cluster::start_with(3, &[("STUDYHALL_AV_MESH_MAX", "1")]).await;
        let room = "class.auto";
        c.room(room, "class").await;
        let mut p = Vec::new();
        for (i, node) in [0, 1, 0, 0].into_iter().enumerate() {
            let mut x = Client::connect(c.addr(node), &student(&format!("a{i}"))).await;
            x.join(room).await;
            p.push(x);
        }
        let mode = |ok: &Value| ok["mode"].as_str().unwrap().to_owned();
        let listed = |ok: &Value| -> HashSet<String> {
            ok["peers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["session"].as_str().unwrap().to_owned())
                .collect()
        };
        let first = p[0].ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(mode(&first), "mesh");
        // Node 1 claims the room's SFU.
        let second = p[1].ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(mode(&second), "sfu", "{second}");
        assert_eq!(second["peers"], json!([]));
        // Node 0's next joiner goes to node 1's SFU, and is listed with the one there.
        let third = p[2].ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(mode(&third), "sfu", "{third}");
        assert_eq!(listed(&third), HashSet::from([p[1].session.clone()]));
        // The mesh empties; the room still has its SFU, so a join goes there.
        p[0].ok(json!({"type":"av_leave","room":room})).await;
        let fourth = p[3].ok(json!({"type":"av_join","room":room})).await;
        assert_eq!(mode(&fourth), "sfu", "{fourth}");
        assert_eq!(
            listed(&fourth),
            HashSet::from([p[1].session.clone(), p[2].session.clone()])
        );
        // Leaving through node 0 leaves node 1's SFU: the others hear it there.
        let gone = p[2].session.clone();
        p[2].ok(json!({"type":"av_leave","room":room})).await;
        for x in p.iter_mut().skip(1).step_by(2) {
            loop {
                let (s, joined) = av_peer(x).await;
                if s == gone && !joined {
                    break;
                }
            }
        }
        // A lost claim is made again by the node whose SFU holds the room (its A/V sweep).
        let db = sqlx::AnyPool::connect(&c.db.as_ref().unwrap().url)
            .await
            .unwrap();
        let owner = async |db: &sqlx::AnyPool| -> Option<String> {
            sqlx::query_scalar("SELECT node FROM sfu_owners WHERE room_id = $1")
                .bind(room)
                .fetch_optional(db)
                .await
                .unwrap()
        };
        assert_eq!(owner(&db).await.as_deref(), Some("n1"));
        sqlx::query("DELETE FROM sfu_owners")
            .execute(&db)
            .await
            .unwrap();
        while owner(&db).await.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(owner(&db).await.as_deref(), Some("n1"));
        // Node 0 dies: node 1's SFU drops its session there once node 0 is past the TTL, and
        // node 0's claims (here one of another room) are released.
        sqlx::query(
            "INSERT INTO sfu_owners (room_id, node, claimed_at) VALUES ('elsewhere', 'n0', 0)",
        )
        .execute(&db)
        .await
        .unwrap();
        let gone = p[3].session.clone();
        c.nodes[0].signal("-KILL").await;
        loop {
            let (s, joined) = av_peer(&mut p[1]).await;
            if s == gone && !joined {
                break;
            }
        }
        let claims_of_n0 = async |db: &sqlx::AnyPool| -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM sfu_owners WHERE node = 'n0'")
                .fetch_one(db)
                .await
                .unwrap()
        };
        while claims_of_n0(&db).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The room taken over by another live node (as when node 1 was taken for dead): node
        // 1 closes it, and its session there is told to join the owner's.
        sqlx::query("UPDATE sfu_owners SET node = 'n2'")
            .execute(&db)
            .await
            .unwrap();
        let closed = p[1].until("av_closed").await;
        assert_eq!(closed["reason"], "connection_lost", "{closed}");
        db.close().await;
        c.stop().await;
    })
    .await;
}
