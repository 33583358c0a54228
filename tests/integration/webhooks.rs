//! Webhooks end to end: a receiver on 127.0.0.1:0 that checks the Standard Webhooks signature
//! on its own (HMAC-SHA256 here, not the server's code), scripted answers (500s, 410), order
//! per room, retries without loss, delivery after a restart, the SSRF refusal at creation and
//! at delivery, secret rotation, replay, the API's errors, and `https://` endpoints (a TLS
//! receiver with a certificate of the test's own CA: trusted through `webhook_ca_file`,
//! refused without it), and breakout group rooms reported as rooms. The main paths run on SQLite
//! and on PostgreSQL.

use crate::common::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use studyhall::config::Config;
use tokio::sync::mpsc;

/// One request the receiver got.
#[derive(Debug)]
struct Received {
    id: String,
    body: Value,
    /// Each trusted secret (in the order given) that one of the signatures verifies with.
    verified_by: Vec<usize>,
    signatures: usize,
    timestamp: i64,
    /// What the receiver answered.
    status: u16,
}

#[derive(Clone, Default)]
struct Script {
    /// Answers to give first, in order; then `default`.
    next: Arc<Mutex<VecDeque<u16>>>,
    default: Arc<AtomicU16>,
    secrets: Arc<Mutex<Vec<String>>>,
    seen: Option<mpsc::UnboundedSender<Received>>,
}

struct Receiver {
    url: String,
    script: Script,
    rx: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Standard Webhooks check, written independently of the server: `v1,` + base64
/// HMAC-SHA256(secret bytes after `whsec_`, "{id}.{timestamp}.{body}").
fn verifies(secret: &str, id: &str, ts: &str, body: &str, header: &str) -> bool {
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    header
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

async fn receive(State(script): State<Script>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, ts, sig) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    let text = String::from_utf8_lossy(&body).into_owned();
    let verified_by = script
        .secrets
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, s)| verifies(s, &id, &ts, &text, &sig))
        .map(|(i, _)| i)
        .collect();
    let status = script
        .next
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| script.default.load(Ordering::SeqCst));
    if let Some(seen) = &script.seen {
        let _ = seen.send(Received {
            id,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            verified_by,
            signatures: sig.split(' ').filter(|s| !s.is_empty()).count(),
            timestamp: ts.parse().unwrap_or(0),
            status,
        });
    }
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Script {
            seen: Some(tx),
            ..Script::default()
        };
        script.default.store(200, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(script.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            script,
            rx,
            task,
        }
    }

    /// A receiver behind TLS on 127.0.0.1:0, its certificate (for `localhost`) issued by a
    /// fresh CA; returns it and the CA's certificate in PEM.
    async fn start_tls() -> (Self, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (tx, rx) = mpsc::unbounded_channel();
        let script = Script {
            seen: Some(tx),
            ..Script::default()
        };
        script.default.store(200, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends the handshake here.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let receiver = Self {
            url: format!("https://localhost:{port}/hook"),
            script,
            rx,
            task,
        };
        (receiver, ca_cert.pem())
    }

    fn trust(&self, secret: &str) {
        self.script.secrets.lock().unwrap().push(secret.to_owned());
    }

    fn answer_first(&self, statuses: &[u16]) {
        self.script.next.lock().unwrap().extend(statuses);
    }

    fn answer(&self, status: u16) {
        self.script.default.store(status, Ordering::SeqCst);
    }

    async fn next(&mut self) -> Received {
        within("a webhook request", self.rx.recv())
            .await
            .expect("receiver open")
    }

    /// Requests until `n` were answered 2xx; returns those, in arrival order.
    async fn delivered(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::new();
        while out.len() < n {
            let r = self.next().await;
            assert_eq!(r.verified_by, vec![0], "signature must verify: {r:?}");
            if (200..300).contains(&r.status) {
                out.push(r);
            }
        }
        out
    }
}

/// Short retry steps and a fast poll, receivers on loopback allowed.
fn fast(c: &mut Config) {
    c.webhook_allow_private = true;
    c.webhook_retry_schedule = "50ms,50ms,50ms,50ms,50ms".into();
    c.webhook_poll_ms = 20;
    c.webhook_timeout_ms = 5_000;
}

/// The two stores the main paths run on.
#[derive(Clone, Copy, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

/// A database URL for `db`, with what keeps it alive (a temp dir) or drops it (PostgreSQL).
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDb>,
}

impl TestDb {
    async fn new(db: Db) -> Self {
        match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Self {
                    url: format!("sqlite://{}", dir.path().join("t.db").display()),
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Db::Postgres => {
                let pg = PgDb::create().await;
                Self {
                    url: pg.url.clone(),
                    _dir: None,
                    pg: Some(pg),
                }
            }
        }
    }

    async fn server(&self, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut cfg = base_config(self.url.clone());
        tweak(&mut cfg);
        Server::start(cfg).await
    }

    async fn drop_db(mut self) {
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
    }
}

async fn api(s: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http(s.addr, method, path, Some(API_KEY), body).await
}

/// Registers `url` for `events`; returns the id and the secret.
async fn subscribe(s: &Server, url: &str, events: &[&str]) -> (String, String) {
    let (status, body) = api(
        s,
        "POST",
        "/api/webhooks",
        Some(json!({"url": url, "events": events})),
    )
    .await;
    assert_eq!(status, 201, "create webhook: {body}");
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let key = STANDARD.decode(&secret["whsec_".len()..]).unwrap();
    assert!(key.len() >= 24);
    assert_eq!(body["url"], url);
    (body["id"].as_str().unwrap().to_owned(), secret)
}

async fn send(c: &mut Client, room: &str, text: &str) -> Value {
    let cid = format!("c-{text}");
    c.ok(json!({"type": "send", "room": room, "text": text, "client_msg_id": cid}))
        .await
}

fn now_s() -> i64 {
    studyhall::store::now_ms() / 1000
}

// -- order and signatures -------------------------------------------------------------------

async fn signed_and_in_order_per_room(db: Db) {
    let db = TestDb::new(db).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    let events = [
        "room.created",
        "member.joined",
        "member.left",
        "message.created",
    ];
    let (hook, secret) = subscribe(&s, &rcv.url, &events).await;
    rcv.trust(&secret);
    s.room("r1", "open").await;
    s.room("r2", "open").await;
    let mut a = s.client("alice").await;
    a.join("r1").await;
    a.join("r2").await;
    for i in 0..5 {
        send(&mut a, "r1", &format!("m{i}")).await;
        send(&mut a, "r2", &format!("n{i}")).await;
    }
    drop(a); // the session ends: a synthetic member.left per room

    let got = rcv.delivered(16).await;
    for r in &got {
        assert_eq!(r.body["id"], r.id.as_str(), "webhook-id is the event id");
        assert_eq!(r.signatures, 1);
        assert!(
            (r.timestamp - now_s()).abs() < 60,
            "webhook-timestamp in Unix seconds"
        );
        assert!(r.body["ts"].is_i64());
    }
    for (room, prefix) in [("r1", "m"), ("r2", "n")] {
        let lane: Vec<&Received> = got.iter().filter(|r| r.body["room"] == room).collect();
        let types: Vec<&str> = lane
            .iter()
            .map(|r| r.body["type"].as_str().unwrap())
            .collect();
        let mut expected = vec!["room.created", "member.joined"];
        expected.extend(["message.created"; 5]);
        expected.push("member.left");
        assert_eq!(types, expected, "room {room} in order");
        assert_eq!(lane[0].body["data"]["id"], room);
        assert_eq!(lane[1].body["data"]["user"]["id"], "alice");
        let texts: Vec<String> = lane[2..7]
            .iter()
            .map(|r| r.body["data"]["text"].as_str().unwrap().to_owned())
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(texts, want);
        let seqs: Vec<i64> = lane[2..7]
            .iter()
            .map(|r| r.body["seq"].as_i64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seqs ascend: {seqs:?}"
        );
        assert_eq!(lane[7].body["data"]["reason"], "disconnect");
    }

    // The delivery log, and a replay that sends the same event (same id) again.
    let (status, log) = api(&s, "GET", &format!("/api/webhooks/{hook}/deliveries"), None).await;
    assert_eq!(status, 200, "{log}");
    let deliveries = log["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 16);
    let first = deliveries.last().unwrap();
    assert_eq!(first["state"], "delivered");
    assert_eq!(first["type"], "room.created");
    assert_eq!(first["attempts"][0]["status"], 200);
    let path = format!(
        "/api/webhooks/{hook}/deliveries/{}/replay",
        first["id"].as_i64().unwrap()
    );
    let (status, replay) = api(&s, "POST", &path, None).await;
    assert_eq!(status, 202, "{replay}");
    assert_eq!(replay["event_id"], first["event_id"]);
    let again = rcv.delivered(1).await;
    assert_eq!(again[0].id, first["event_id"].as_str().unwrap());
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn signed_and_in_order_per_room_sqlite() {
    signed_and_in_order_per_room(Db::Sqlite).await;
}

#[tokio::test]
async fn signed_and_in_order_per_room_postgres() {
    signed_and_in_order_per_room(Db::Postgres).await;
}

// -- outage, restart --------------------------------------------------------------------------

async fn outage_is_retried_without_loss(db: Db) {
    let db = TestDb::new(db).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    s.room("r", "open").await;
    let (hook, secret) = subscribe(&s, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    rcv.answer_first(&[500, 500, 503]);
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 0..3 {
        send(&mut a, "r", &format!("m{i}")).await;
    }
    let mut all = Vec::new();
    let mut ok = Vec::new();
    while ok.len() < 3 {
        let r = rcv.next().await;
        assert_eq!(r.verified_by, vec![0]);
        if r.status == 200 {
            ok.push(r.body["data"]["text"].as_str().unwrap().to_owned());
        }
        all.push(r);
    }
    assert_eq!(ok, ["m0", "m1", "m2"], "none lost, in order");
    // The room's later events waited: the first four requests are the same event.
    assert!(all[..4].iter().all(|r| r.id == all[0].id));
    assert_eq!(all.len(), 6);
    let (_, log) = api(&s, "GET", &format!("/api/webhooks/{hook}/deliveries"), None).await;
    let first = log["deliveries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let statuses: Vec<i64> = first["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 503, 200]);
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn outage_is_retried_without_loss_sqlite() {
    outage_is_retried_without_loss(Db::Sqlite).await;
}

#[tokio::test]
async fn outage_is_retried_without_loss_postgres() {
    outage_is_retried_without_loss(Db::Postgres).await;
}

async fn pending_events_survive_a_restart(db: Db) {
    let db = TestDb::new(db).await;
    let mut rcv = Receiver::start().await;
    let slow = |c: &mut Config| {
        fast(c);
        c.webhook_retry_schedule = "300ms,".repeat(50);
    };
    let s = db.server(slow).await;
    s.room("r", "open").await;
    let (_, secret) = subscribe(&s, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    rcv.answer(503);
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 0..3 {
        send(&mut a, "r", &format!("m{i}")).await;
    }
    let failed = rcv.next().await;
    assert_eq!(failed.status, 503);
    drop(a);
    s.stop().await;

    rcv.answer(200);
    let s = db.server(slow).await;
    let got = rcv.delivered(3).await;
    let texts: Vec<&str> = got
        .iter()
        .map(|r| r.body["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
    assert_eq!(
        got[0].id, failed.id,
        "the event keeps its id across retries"
    );
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn pending_events_survive_a_restart_sqlite() {
    pending_events_survive_a_restart(Db::Sqlite).await;
}

#[tokio::test]
async fn pending_events_survive_a_restart_postgres() {
    pending_events_survive_a_restart(Db::Postgres).await;
}

// -- 410, SSRF, rotation, the other events, the API -------------------------------------------

/// Polls the API until `done` holds for the answer (bounded by the test timeout).
async fn until_api(s: &Server, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    within(path, async {
        loop {
            let (_, body) = api(s, "GET", path, None).await;
            if done(&body) {
                return body;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test]
async fn gone_disables_the_endpoint() {
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    s.room("r", "open").await;
    let (hook, secret) = subscribe(&s, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    rcv.answer(410);
    let mut a = s.client("alice").await;
    a.join("r").await;
    send(&mut a, "r", "m0").await;
    assert_eq!(rcv.next().await.status, 410);
    let w = until_api(&s, &format!("/api/webhooks/{hook}"), |w| {
        w["disabled"] == true
    })
    .await;
    assert!(w["disabled_reason"].as_str().unwrap().contains("410"));
    let log = until_api(&s, &format!("/api/webhooks/{hook}/deliveries"), |l| {
        l["deliveries"][0]["state"] == "failed"
    })
    .await;
    assert_eq!(log["deliveries"].as_array().unwrap().len(), 1);
    // A disabled endpoint gets nothing more: the commit (the ok) queued no delivery.
    send(&mut a, "r", "m1").await;
    let (_, log) = api(&s, "GET", &format!("/api/webhooks/{hook}/deliveries"), None).await;
    assert_eq!(log["deliveries"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn private_addresses_are_refused_without_the_flag() {
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    // With the flag: created, and delivered.
    let s = db.server(fast).await;
    s.room("r", "open").await;
    let (hook, secret) = subscribe(&s, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    s.stop().await;

    let strict = |c: &mut Config| {
        fast(c);
        c.webhook_allow_private = false;
    };
    let s = db.server(strict).await;
    for url in [
        rcv.url.as_str(),
        "http://localhost/hook",
        "http://[::1]:8080/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
    ] {
        let (status, body) = api(
            &s,
            "POST",
            "/api/webhooks",
            Some(json!({"url": url, "events": ["message.created"]})),
        )
        .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["code"], "bad_request");
        assert!(
            body["message"].as_str().unwrap().contains("non-public"),
            "{body}"
        );
    }
    // A public address is accepted (nothing is sent to it: it subscribes to an event that
    // never happens here).
    let (status, body) = api(
        &s,
        "POST",
        "/api/webhooks",
        Some(json!({"url": "http://93.184.216.34/hook", "events": ["poll.closed"]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The endpoint registered earlier is checked again at delivery: refused, logged, retried.
    let mut a = s.client("alice").await;
    a.join("r").await;
    send(&mut a, "r", "m0").await;
    let log = until_api(&s, &format!("/api/webhooks/{hook}/deliveries"), |l| {
        l["deliveries"][0]["attempts"][0]["error"].is_string()
    })
    .await;
    let error = log["deliveries"][0]["attempts"][0]["error"]
        .as_str()
        .unwrap();
    assert!(error.contains("non-public"), "{error}");
    assert!(
        rcv.rx.try_recv().is_err(),
        "nothing reached the private receiver"
    );
    s.stop().await;
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_for_the_grace_period() {
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    let (hook, old) = subscribe(&s, &rcv.url, &["room.created"]).await;
    let (status, rotated) = api(&s, "POST", &format!("/api/webhooks/{hook}/rotate"), None).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].as_i64().unwrap() > studyhall::store::now_ms());
    rcv.trust(&new); // 0
    rcv.trust(&old); // 1
    s.room("r1", "open").await;
    let r = rcv.next().await;
    assert_eq!(r.signatures, 2);
    assert_eq!(
        r.verified_by,
        vec![0, 1],
        "signed with the new and the old secret"
    );
    s.stop().await;

    // Without a grace period the old secret stops signing at once.
    let s = db
        .server(|c| {
            fast(c);
            c.webhook_secret_grace_s = 0;
        })
        .await;
    let (status, rotated) = api(&s, "POST", &format!("/api/webhooks/{hook}/rotate"), None).await;
    assert_eq!(status, 200);
    let newest = rotated["secret"].as_str().unwrap().to_owned();
    rcv.script.secrets.lock().unwrap().insert(0, newest);
    s.room("r2", "open").await;
    let r = rcv.next().await;
    assert_eq!(r.signatures, 1);
    assert_eq!(r.verified_by, vec![0]);
    s.stop().await;
}

#[tokio::test]
async fn questions_reports_and_archiving_are_reported() {
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    let events = [
        "question.asked",
        "question.answered",
        "report.created",
        "room.archived",
    ];
    let (_, secret) = subscribe(&s, &rcv.url, &events).await;
    rcv.trust(&secret);
    let (status, body) = api(
        &s,
        "POST",
        "/api/rooms",
        Some(json!({"id": "g", "kind": "group", "title": "G",
                    "qa": {"enabled": true, "moderated": false, "peer_answers": true}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    a.join("g").await;
    b.join("g").await;
    let q = a
        .ok(json!({"type": "ask", "room": "g", "text": "why?"}))
        .await["id"]
        .clone();
    b.ok(json!({"type": "answer", "room": "g", "question": q, "text": "because"}))
        .await;
    let m = send(&mut a, "g", "hello").await;
    b.ok(json!({"type": "report", "room": "g", "id": m["id"], "reason": "rude"}))
        .await;
    let (status, _) = api(&s, "DELETE", "/api/rooms/g", None).await;
    assert_eq!(status, 200);
    let got = rcv.delivered(4).await;
    let types: Vec<&str> = got
        .iter()
        .map(|r| r.body["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, events);
    assert_eq!(got[0].body["data"]["text"], "why?");
    assert!(got[0].body["seq"].is_i64());
    assert_eq!(got[1].body["data"]["id"], q);
    assert_eq!(got[2].body["data"]["reason"], "rude");
    assert_eq!(got[3].body["data"]["archived"], true);
    s.stop().await;
}

#[tokio::test]
async fn the_webhook_api_validates_and_lists() {
    let db = TestDb::new(Db::Sqlite).await;
    let s = db.server(fast).await;
    let bad = [
        json!({"url": "ftp://example.com/", "events": ["room.created"]}),
        json!({"url": "https://93.184.216.34:99999/", "events": ["room.created"]}),
        json!({"url": "not a url", "events": ["room.created"]}),
        json!({"url": "http://93.184.216.34/", "events": []}),
        json!({"url": "http://93.184.216.34/", "events": ["room.exploded"]}),
        json!({"url": "http://93.184.216.34/"}),
    ];
    for b in bad {
        let (status, body) = api(&s, "POST", "/api/webhooks", Some(b.clone())).await;
        assert_eq!(status, 400, "{b}: {body}");
        assert_eq!(body["code"], "bad_request");
        assert!(body["message"].is_string());
    }
    let (status, _) = http(s.addr, "GET", "/api/webhooks", None, None).await;
    assert_eq!(status, 401);
    let (id, _) = subscribe(
        &s,
        "http://93.184.216.34/in",
        &["poll.closed", "class.started"],
    )
    .await;
    let (status, list) = api(&s, "GET", "/api/webhooks", None).await;
    assert_eq!(status, 200);
    let listed = &list["webhooks"][0];
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["events"], json!(["poll.closed", "class.started"]));
    assert!(
        listed.get("secret").is_none(),
        "the secret is shown only once"
    );
    let (status, log) = api(&s, "GET", &format!("/api/webhooks/{id}/deliveries"), None).await;
    assert_eq!((status, log), (200, json!({"deliveries": []})));
    let path = format!("/api/webhooks/{id}/deliveries/12345/replay");
    assert_eq!(api(&s, "POST", &path, None).await.0, 404);
    let path = format!("/api/webhooks/{id}");
    assert_eq!(api(&s, "DELETE", &path, None).await.0, 204);
    assert_eq!(api(&s, "DELETE", &path, None).await.0, 404);
    assert_eq!(
        api(&s, "GET", "/api/webhooks/nope/deliveries", None)
            .await
            .0,
        404
    );
    s.stop().await;
}

#[tokio::test]
async fn class_start_poll_close_and_class_end_are_reported() {
    use studyhall::protocol::{PlatformRole, RoomRole};
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    let s = db.server(fast).await;
    let events = ["class.started", "poll.closed", "class.ended"];
    let (_, secret) = subscribe(&s, &rcv.url, &events).await;
    rcv.trust(&secret);
    let later = (now_s() + 3600) * 1000;
    let (status, body) = api(
        &s,
        "POST",
        "/api/rooms",
        Some(json!({"id": "c", "kind": "class", "title": "C", "starts_at": later})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut h = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[("c", RoomRole::Host)]),
    )
    .await;
    h.join("c").await;
    h.ok(json!({"type": "class_start", "room": "c"})).await;
    let poll = h
        .ok(
            json!({"type": "poll_create", "room": "c", "kind": "poll", "question": "Ready?",
                   "options": ["yes", "no"]}),
        )
        .await["poll"]["id"]
        .clone();
    h.ok(json!({"type": "poll_open", "room": "c", "poll": poll}))
        .await;
    h.ok(json!({"type": "poll_close", "room": "c", "poll": poll}))
        .await;
    h.ok(json!({"type": "class_end", "room": "c"})).await;
    let got = rcv.delivered(3).await;
    let types: Vec<&str> = got
        .iter()
        .map(|r| r.body["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, events);
    assert!(
        got.iter()
            .all(|r| r.body["room"] == "c" && r.body["seq"].is_i64())
    );
    s.stop().await;
    db.drop_db().await;
}

// -- breakout groups ------------------------------------------------------------------------

/// The types delivered for `room`, in arrival order.
fn lane<'a>(got: &'a [Received], room: &str) -> Vec<&'a str> {
    got.iter()
        .filter(|r| r.body["room"] == room)
        .map(|r| r.body["type"].as_str().unwrap())
        .collect()
}

/// Breakout group rooms are reported as rooms: `room.created` at open, `room.archived` at the
/// close by command and by the clock (a group archived through the API before the close is
/// reported once). Placing and moving students changes stored memberships, not presence, so it
/// makes no `member.*` event: the only ones are the three sessions entering the parent.
async fn breakout_groups_are_reported(db: Db) {
    use studyhall::protocol::{PlatformRole, RoomRole};
    let db = TestDb::new(db).await;
    let mut rcv = Receiver::start().await;
    let s = db
        .server(|c| {
            fast(c);
            c.class_clock_ms = 50;
        })
        .await;
    let events = [
        "room.created",
        "room.archived",
        "member.joined",
        "member.left",
    ];
    let (hook, secret) = subscribe(&s, &rcv.url, &events).await;
    rcv.trust(&secret);
    s.room("p", "open").await;
    let mut h = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[("p", RoomRole::Host)]),
    )
    .await;
    h.join("p").await;
    let mut ann = s.client("ann").await;
    ann.join("p").await;
    let mut bob = s.client("bob").await;
    bob.join("p").await;

    h.ok(json!({"type":"breakout_open","room":"p",
        "groups":[{"title":"Red","members":["ann"]},{"members":["bob"]}]}))
        .await;
    h.ok(json!({"type":"breakout_move","room":"p","user":"bob","group_room":"p.g1"}))
        .await;
    let (status, body) = api(&s, "DELETE", "/api/rooms/p.g2", None).await;
    assert_eq!(status, 200, "{body}");
    h.ok(json!({"type":"breakout_close","room":"p"})).await;
    ann.until("breakout_closed").await;
    let ok = h
        .ok(json!({"type":"breakout_open","room":"p","count":1,"duration_s":1}))
        .await;
    assert_eq!(ok["groups"][0]["room"], "p.b2.g1");
    assert_eq!(ann.until("breakout_closed").await["room"], "p");

    let got = rcv.delivered(10).await;
    assert_eq!(
        lane(&got, "p"),
        [
            "room.created",
            "member.joined",
            "member.joined",
            "member.joined"
        ]
    );
    let mut joined: Vec<&str> = got
        .iter()
        .filter(|r| r.body["room"] == "p" && r.body["type"] == "member.joined")
        .map(|r| r.body["data"]["user"]["id"].as_str().unwrap())
        .collect();
    joined.sort_unstable();
    assert_eq!(joined, ["ann", "bob", "teacher"]);
    for room in ["p.g1", "p.g2", "p.b2.g1"] {
        assert_eq!(
            lane(&got, room),
            ["room.created", "room.archived"],
            "{room}"
        );
        let archived = got
            .iter()
            .find(|r| r.body["room"] == room && r.body["type"] == "room.archived")
            .unwrap();
        assert_eq!(archived.body["data"]["id"], room);
        assert_eq!(archived.body["data"]["archived"], true);
    }
    // Every event the store queued was delivered above: nothing more is queued.
    let (status, log) = api(&s, "GET", &format!("/api/webhooks/{hook}/deliveries"), None).await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(log["deliveries"].as_array().unwrap().len(), 10, "{log}");
    drop((h, ann, bob));
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn breakout_groups_are_reported_sqlite() {
    breakout_groups_are_reported(Db::Sqlite).await;
}

#[tokio::test]
async fn breakout_groups_are_reported_postgres() {
    breakout_groups_are_reported(Db::Postgres).await;
}

// -- https:// endpoints ---------------------------------------------------------------------

/// An `https://` endpoint gets its deliveries over TLS when its certificate chains to a root
/// the server trusts (here the test's CA, given as `webhook_ca_file`); a server that does not
/// trust it records the TLS failure in the delivery log and sends nothing in the clear.
#[tokio::test]
async fn https_endpoints_are_delivered_over_verified_tls() {
    let db = TestDb::new(Db::Sqlite).await;
    let (mut rcv, ca_pem) = Receiver::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();

    // Without the CA: the handshake fails on the certificate, logged as the attempt's error.
    let untrusting = db.server(fast).await;
    untrusting.room("r", "open").await;
    let (hook, secret) = subscribe(&untrusting, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    let mut a = untrusting.client("alice").await;
    a.join("r").await;
    send(&mut a, "r", "m0").await;
    let log = until_api(
        &untrusting,
        &format!("/api/webhooks/{hook}/deliveries"),
        |l| l["deliveries"][0]["attempts"][0]["error"].is_string(),
    )
    .await;
    let error = log["deliveries"][0]["attempts"][0]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{error}"
    );
    assert!(rcv.rx.try_recv().is_err(), "nothing was delivered");
    untrusting.stop().await;

    // With the CA: the pending delivery and a new one arrive, signed, over TLS.
    let path = ca_file.display().to_string();
    let s = db
        .server(|c| {
            fast(c);
            c.webhook_ca_file = Some(path);
        })
        .await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    send(&mut a, "r", "m1").await;
    let got = rcv.delivered(2).await;
    let texts: Vec<&str> = got
        .iter()
        .map(|r| r.body["data"]["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["m0", "m1"], "{got:?}");
    s.stop().await;

    db.drop_db().await;
}

// -- retention --------------------------------------------------------------------------------

/// Retry once after 50 ms, then not for an hour: a delivery that fails twice stays pending.
fn stuck(c: &mut Config) {
    fast(c);
    c.webhook_retry_schedule = "50ms,1h".into();
}

async fn pruning_keeps_what_is_pending(db: Db) {
    use studyhall::store::Pruned;
    let db = TestDb::new(db).await;
    let mut up = Receiver::start().await;
    let mut down = Receiver::start().await;
    let s = db.server(stuck).await;
    s.room("r", "open").await;
    let (up_hook, up_secret) = subscribe(&s, &up.url, &["message.created"]).await;
    up.trust(&up_secret);
    let (down_hook, down_secret) = subscribe(&s, &down.url, &["message.created"]).await;
    down.trust(&down_secret);
    down.answer(503);
    let before = studyhall::store::now_ms();
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 0..3 {
        send(&mut a, "r", &format!("m{i}")).await;
    }
    up.delivered(3).await;
    for _ in 0..2 {
        assert_eq!(down.next().await.status, 503);
    }
    let up_path = format!("/api/webhooks/{up_hook}/deliveries");
    let down_path = format!("/api/webhooks/{down_hook}/deliveries");
    let up_log = until_api(&s, &up_path, |l| {
        let d = l["deliveries"].as_array().unwrap();
        d.len() == 3 && d.iter().all(|d| d["state"] == "delivered")
    })
    .await;
    // The first delivery of the endpoint that is down has failed twice and waits an hour.
    until_api(&s, &down_path, |l| {
        l["deliveries"].as_array().unwrap().last().is_some_and(|d| {
            d["attempts"].as_array().unwrap().len() == 2 && d["state"] == "pending"
        })
    })
    .await;
    let store = &s.app.store;
    // Retention not reached: nothing goes.
    assert_eq!(
        store.prune_webhooks(before, 2).await.unwrap(),
        Pruned::default()
    );
    // Past it, in batches of two: the delivered go with their attempts; the pending stay, and
    // so do the events they need.
    let cutoff = studyhall::store::now_ms() + 1;
    let p = store.prune_webhooks(cutoff, 2).await.unwrap();
    assert_eq!(
        p,
        Pruned {
            deliveries: 3,
            attempts: 3,
            events: 0
        }
    );
    let (_, log) = api(&s, "GET", &up_path, None).await;
    assert_eq!(log["deliveries"], json!([]), "{log}");
    let (_, log) = api(&s, "GET", &down_path, None).await;
    let left = log["deliveries"].as_array().unwrap();
    assert_eq!(left.len(), 3, "{log}");
    assert!(left.iter().all(|d| d["state"] == "pending"), "{log}");
    assert_eq!(left[2]["attempts"].as_array().unwrap().len(), 2);
    // A pruned delivery cannot be replayed.
    let pruned_id = up_log["deliveries"][2]["id"].as_i64().unwrap();
    let (status, body) = api(&s, "POST", &format!("{up_path}/{pruned_id}/replay"), None).await;
    assert_eq!(status, 404, "{body}");
    // The pending ones still can, and their events are still there to send.
    let pending_id = left[0]["id"].as_i64().unwrap();
    let (status, body) = api(
        &s,
        "POST",
        &format!("{down_path}/{pending_id}/replay"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // Once no delivery refers to them (the endpoint is deleted), the events go too.
    let (status, _) = api(&s, "DELETE", &format!("/api/webhooks/{down_hook}"), None).await;
    assert_eq!(status, 204);
    let p = store
        .prune_webhooks(studyhall::store::now_ms() + 1, 2)
        .await
        .unwrap();
    assert_eq!(
        p,
        Pruned {
            deliveries: 0,
            attempts: 0,
            events: 3
        }
    );
    assert_eq!(
        store
            .prune_webhooks(studyhall::store::now_ms() + 1, 2)
            .await
            .unwrap(),
        Pruned::default()
    );
    drop(a);
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn pruning_keeps_what_is_pending_sqlite() {
    pruning_keeps_what_is_pending(Db::Sqlite).await;
}

#[tokio::test]
async fn pruning_keeps_what_is_pending_postgres() {
    pruning_keeps_what_is_pending(Db::Postgres).await;
}

/// The sender prunes by itself every `webhook_prune_every_s`, what finished more than
/// `webhook_retention_s` ago (one second here: the wait is on the log emptying).
#[tokio::test]
async fn the_sender_prunes_past_the_retention() {
    let db = TestDb::new(Db::Sqlite).await;
    let mut rcv = Receiver::start().await;
    let s = db
        .server(|c| {
            fast(c);
            c.webhook_retention_s = 1;
            c.webhook_prune_every_s = 1;
        })
        .await;
    s.room("r", "open").await;
    let (hook, secret) = subscribe(&s, &rcv.url, &["message.created"]).await;
    rcv.trust(&secret);
    let mut a = s.client("alice").await;
    a.join("r").await;
    send(&mut a, "r", "m0").await;
    rcv.delivered(1).await;
    let path = format!("/api/webhooks/{hook}/deliveries");
    until_api(&s, &path, |l| l["deliveries"][0]["state"] == "delivered").await;
    until_api(&s, &path, |l| l["deliveries"] == json!([])).await;
    drop(a);
    s.stop().await;
    db.drop_db().await;
}

// -- member events across nodes ---------------------------------------------------------------

/// Two nodes of one cluster as the store sees them: two stores on one database, each
/// deciding `member.*` under the same per-user lock.
async fn member_events_once_across_nodes(db: Db) {
    use studyhall::protocol::{RoomId, UserId, UserRef};
    use studyhall::store::{EventType, MemberRuns, Store, StoreOptions};
    let db = TestDb::new(db).await;
    let open = || async {
        let metrics = Arc::new(studyhall::metrics::Metrics::default());
        within(
            "open",
            Store::open(&StoreOptions::new(db.url.as_str()), metrics, None),
        )
        .await
        .unwrap()
    };
    let n1 = open().await;
    let n2 = open().await;
    let events = [EventType::MemberJoined, EventType::MemberLeft];
    let secret = studyhall::webhooks::new_secret();
    n1.create_webhook("wh_members", "http://127.0.0.1:9/hook", &events, &secret)
        .await
        .unwrap();
    n2.refresh_webhook_subscriptions().await.unwrap();
    let types = |store: Store| async move {
        let mut d = store.webhook_deliveries("wh_members", 100).await.unwrap();
        d.reverse();
        d.into_iter()
            .map(|d| format!("{} {}", d.kind, d.room.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let user = |id: &str| UserRef {
        id: UserId(id.into()),
        name: id.to_uppercase(),
        role: studyhall::protocol::ShownRole::Member,
    };
    let r = RoomId("r".into());

    // Alice enters on both nodes at once, and leaves both at once: one of each.
    let (x, y) = tokio::join!(
        n1.member_entered(&r, user("alice"), "n1", 1),
        n2.member_entered(&r, user("alice"), "n2", 2)
    );
    x.unwrap();
    y.unwrap();
    // Leaving one node and coming back while on the other is no transition.
    n1.member_exited(&r, user("alice"), "n1", 1, "leave")
        .await
        .unwrap();
    n1.member_entered(&r, user("alice"), "n1", 1).await.unwrap();
    assert_eq!(types(n1.clone()).await, ["member.joined r"]);
    let (x, y) = tokio::join!(
        n1.member_exited(&r, user("alice"), "n1", 1, "leave"),
        n2.member_exited(&r, user("alice"), "n2", 2, "disconnect")
    );
    x.unwrap();
    y.unwrap();
    assert_eq!(
        types(n1.clone()).await,
        ["member.joined r", "member.left r"]
    );
    // A second leave of the same stay (two sessions of one node racing) adds nothing.
    n1.member_exited(&r, user("alice"), "n1", 1, "leave")
        .await
        .unwrap();
    assert_eq!(types(n2.clone()).await.len(), 2);

    // Node n2 dies while Bob is on both: every survivor forgets it, no member.left; his
    // leaving n1 is the one.
    let r2 = RoomId("r2".into());
    n1.member_entered(&r2, user("bob"), "n1", 1).await.unwrap();
    n2.member_entered(&r2, user("bob"), "n2", 2).await.unwrap();
    let (x, y) = tokio::join!(
        n1.members_forget_node("n2", MemberRuns::One(2)),
        n2.members_forget_node("n2", MemberRuns::One(2))
    );
    assert_eq!(x.unwrap() + y.unwrap(), 0);
    n1.member_exited(&r2, user("bob"), "n1", 1, "leave")
        .await
        .unwrap();
    // Carol only on n2 (a later run), which dies: one member.left however many forget it.
    let r3 = RoomId("r3".into());
    n2.member_entered(&r3, user("carol"), "n2", 3)
        .await
        .unwrap();
    let (x, y) = tokio::join!(
        n1.members_forget_node("n2", MemberRuns::One(3)),
        n1.members_forget_node("n2", MemberRuns::One(3))
    );
    assert_eq!(x.unwrap() + y.unwrap(), 1);
    // A node starting again forgets its earlier runs, never its current one.
    let r4 = RoomId("r4".into());
    n1.member_entered(&r4, user("dave"), "n1", 4).await.unwrap();
    assert_eq!(
        n1.members_forget_node("n1", MemberRuns::AllBut(4))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        n1.members_forget_node("n1", MemberRuns::AllBut(5))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        types(n1.clone()).await,
        [
            "member.joined r",
            "member.left r",
            "member.joined r2",
            "member.left r2",
            "member.joined r3",
            "member.left r3",
            "member.joined r4",
            "member.left r4",
        ]
    );
    n1.close().await;
    n2.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn member_events_once_across_nodes_sqlite() {
    member_events_once_across_nodes(Db::Sqlite).await;
}

#[tokio::test]
async fn member_events_once_across_nodes_postgres() {
    member_events_once_across_nodes(Db::Postgres).await;
}
