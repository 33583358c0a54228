//! Test harness: a real server on 127.0.0.1:0 (in-process, or the binary as a child process),
//! real WebSocket clients speaking the protocol, requests to the HTTP API (over the load
//! generator's minimal HTTP client, `http1`), and PostgreSQL test databases. Every wait is
//! bounded by a timeout.

#![allow(dead_code)]

// The load generator's HTTP/1.1 client, shared as source.
#[path = "../../load-tests/src/http1.rs"]
pub mod http1;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use studyhall::App;
use studyhall::auth::Tokens;
use studyhall::config::Config;
use studyhall::protocol::{PlatformRole, RoomRole};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in a test.
pub const T: Duration = Duration::from_secs(15);
pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key";

/// The process's open file descriptors. Fails (never reads 0) without /proc: a count that
/// cannot be taken must not let a leak check pass.
pub fn open_fds() -> usize {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d.count(),
        Err(e) => panic!("cannot count open fds: /proc/self/fd unreadable ({e}); mount /proc"),
    }
}

pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub fn base_config(database_url: String) -> Config {
    Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        database_url,
        jwt_secret: Some(SECRET.into()),
        api_key: Some(API_KEY.into()),
        rate_per_s: 10_000.0,
        rate_burst: 10_000.0,
        user_write_per_s: 10_000.0,
        user_write_burst: 10_000.0,
        user_join_per_s: 10_000.0,
        user_join_burst: 10_000.0,
        user_hand_per_s: 10_000.0,
        user_hand_burst: 10_000.0,
        user_call_per_s: 10_000.0,
        user_call_burst: 10_000.0,
        shutdown_grace_ms: 2_000,
        ..Config::default()
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: Option<Arc<tempfile::TempDir>>,
}

impl Server {
    /// A server on a fresh SQLite file, with `tweak` applied to the config.
    pub async fn sqlite(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let mut cfg = base_config(url);
        tweak(&mut cfg);
        let mut s = Self::start(cfg).await;
        s.dir = Some(dir);
        s
    }

    pub async fn start(cfg: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(cfg, listener).await
    }

    /// A server whose accepted sockets have a small kernel send buffer (inherited from the
    /// listener), so a client that stops reading backs up into its outbox quickly.
    pub async fn sqlite_small_send_buffer(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut cfg = base_config(format!("sqlite://{}", dir.path().join("t.db").display()));
        tweak(&mut cfg);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = Self::start_on(cfg, sock.listen(1024).unwrap()).await;
        s.dir = Some(dir);
        s
    }

    pub async fn start_on(cfg: Config, listener: tokio::net::TcpListener) -> Self {
        let app = App::start(cfg).await.expect("server starts");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(studyhall::serve(app.clone(), listener, async {
            let _ = rx.await;
        }))
        .into_future_unit();
        Self {
            addr,
            app,
            stop: Some(tx),
            task: Some(task),
            dir: None,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within("server shutdown", task).await.unwrap();
        }
    }

    pub fn token(&self, user: &str) -> String {
        token(user, PlatformRole::Student, &[])
    }

    pub async fn client(&self, user: &str) -> Client {
        Client::connect(self.addr, &self.token(user)).await
    }

    pub async fn room(&self, id: &str, visibility: &str) {
        let (status, body) = http(
            self.addr,
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id": id, "kind": "group", "title": id, "visibility": visibility})),
        )
        .await;
        assert_eq!(status, 201, "create room: {body}");
    }
}

trait IntoUnit {
    fn into_future_unit(self) -> tokio::task::JoinHandle<()>;
}

impl IntoUnit for tokio::task::JoinHandle<Result<(), studyhall::StartError>> {
    fn into_future_unit(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            self.await.expect("serve task").expect("serve ok");
        })
    }
}

pub fn token(user: &str, role: PlatformRole, grants: &[(&str, RoomRole)]) -> String {
    let rooms: HashMap<String, RoomRole> =
        grants.iter().map(|(r, g)| ((*r).to_owned(), *g)).collect();
    Tokens::new(SECRET.as_bytes())
        .sign(
            user,
            &user.to_uppercase(),
            role,
            rooms,
            Duration::from_secs(600),
        )
        .unwrap()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn raw_ws(addr: SocketAddr) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "studyhall.v1".parse().unwrap());
    let (ws, resp) = within("ws connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("ws connect");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("studyhall.v1".to_owned())
    );
    ws
}

/// Reads frames until the server closes; returns the close code (None if the socket just ended).
pub async fn close_code<S>(ws: &mut WebSocketStream<S>) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("close frame", async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
}

pub struct Client {
    pub ws: Ws,
    next_rid: i64,
    /// Frames read while waiting for something else, in arrival order.
    pub pending: VecDeque<Value>,
    pub session: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr, token: &str) -> Self {
        let mut ws = raw_ws(addr).await;
        ws.send(Message::text(
            json!({"type": "hello", "token": token}).to_string(),
        ))
        .await
        .unwrap();
        let mut c = Self {
            ws,
            next_rid: 1,
            pending: VecDeque::new(),
            session: String::new(),
        };
        let welcome = c.read().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        c.session = welcome["session"].as_str().unwrap().to_owned();
        c
    }

    async fn read(&mut self) -> Value {
        within("next frame", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                    Some(Ok(Message::Close(f))) => panic!("closed by server: {f:?}"),
                    Some(Ok(_)) => continue,
                    other => panic!("socket ended: {other:?}"),
                }
            }
        })
        .await
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Sends `v` with a fresh rid without waiting; returns the rid.
    pub async fn fire(&mut self, mut v: Value) -> i64 {
        let rid = self.next_rid;
        self.next_rid += 1;
        v["rid"] = json!(rid);
        self.send(v).await;
        rid
    }

    /// Waits for the reply to `rid`, keeping other frames for later.
    pub async fn reply(&mut self, rid: i64) -> Value {
        if let Some(pos) = self.pending.iter().position(|f| f["rid"] == rid) {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let f = self.read().await;
            if f["rid"] == rid {
                return f;
            }
            self.pending.push_back(f);
        }
    }

    pub async fn request(&mut self, v: Value) -> Value {
        let rid = self.fire(v).await;
        self.reply(rid).await
    }

    pub async fn ok(&mut self, v: Value) -> Value {
        let r = self.request(v.clone()).await;
        assert_eq!(r["type"], "ok", "request {v} got {r}");
        r
    }

    pub async fn err(&mut self, v: Value) -> String {
        let r = self.request(v.clone()).await;
        assert_eq!(r["type"], "error", "request {v} got {r}");
        r["code"].as_str().unwrap().to_owned()
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.ok(json!({"type": "join", "room": room})).await
    }

    /// The next frame (pending ones first).
    pub async fn next(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(f) => f,
            None => self.read().await,
        }
    }

    /// The next frame of type `ty`, dropping others of the given ignorable types
    /// (presence, typing, badge notices) and failing on anything else.
    pub async fn next_of(&mut self, ty: &str) -> Value {
        loop {
            let f = self.next().await;
            if f["type"] == ty {
                return f;
            }
            assert!(
                matches!(
                    f["type"].as_str(),
                    Some("presence" | "typing" | "ok" | "badge")
                ),
                "expected {ty}, got {f}"
            );
        }
    }

    /// The next frame of type `ty`, skipping any others.
    pub async fn until(&mut self, ty: &str) -> Value {
        loop {
            let f = self.next().await;
            if f["type"] == ty {
                return f;
            }
        }
    }

    /// Collects `n` room events of type `message`, ignoring presence/typing/ok.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.next_of("message").await);
        }
        out
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and JSON body (or Null).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut headers = String::from("Content-Type: application/json\r\n");
    if let Some(k) = key {
        headers.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let answer = within(
        "http request",
        http1::request(addr, method, path, &headers, &body),
    );
    let (status, _, body) = answer.await.expect("http request");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// PostgreSQL for tests: `STUDYHALL_TEST_DATABASE_URL` (default the local `test` database).
/// Never skips: an unreachable server fails the test.
pub fn pg_base_url() -> String {
    std::env::var("STUDYHALL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".into())
}

/// Runs `flow` against a fresh server on SQLite (with `tweak` applied to its settings), then
/// stops it.
pub async fn on_sqlite(tweak: impl FnOnce(&mut Config), flow: impl AsyncFnOnce(&Server)) {
    let s = Server::sqlite(tweak).await;
    flow(&s).await;
    s.stop().await;
}

/// Runs `flow` with the URL of a throw-away SQLite database (for flows that start and
/// restart servers themselves).
pub async fn with_sqlite_url(flow: impl AsyncFnOnce(&str)) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    flow(&url).await;
}

/// Runs `flow` with the URL of a throw-away PostgreSQL database, dropped after.
pub async fn with_postgres_url(flow: impl AsyncFnOnce(&str)) {
    let db = PgDb::create().await;
    flow(&db.url).await;
    db.drop_db().await;
}

/// Runs `flow` against a fresh server on a throw-away PostgreSQL database (with `tweak`
/// applied to its settings), then stops it and drops the database.
pub async fn on_postgres(tweak: impl FnOnce(&mut Config), flow: impl AsyncFnOnce(&Server)) {
    let db = PgDb::create().await;
    let mut cfg = base_config(db.url.clone());
    tweak(&mut cfg);
    let s = Server::start(cfg).await;
    flow(&s).await;
    s.stop().await;
    db.drop_db().await;
}

/// A fresh database on the test PostgreSQL server. [`PgDb::drop_db`] drops it at the end of a
/// test; a test that fails (panics) before that still drops it, from `Drop`, so failed runs
/// leave no `studyhall_t_*` databases behind.
pub struct PgDb {
    pub url: String,
    name: String,
    dropped: bool,
}

impl PgDb {
    pub async fn create() -> Self {
        sqlx::any::install_default_drivers();
        let base = pg_base_url();
        let name = format!("studyhall_t_{:016x}", rand::random::<u64>());
        let admin = sqlx::AnyPool::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL test server unreachable at {base}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => panic!("bad STUDYHALL_TEST_DATABASE_URL"),
        };
        Self {
            url,
            name,
            dropped: false,
        }
    }

    pub async fn drop_db(mut self) {
        self.dropped = true;
        drop_database(&self.name).await;
    }
}

async fn drop_database(name: &str) {
    let Ok(admin) = sqlx::AnyPool::connect(&pg_base_url()).await else {
        return;
    };
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    admin.close().await;
}

impl Drop for PgDb {
    /// The guard for a test that ended without [`PgDb::drop_db`] (a failed assertion, a
    /// timeout): drops the database on a thread of its own with its own runtime, since this
    /// may run inside (or while unwinding out of) the test's runtime.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(T, drop_database(&name)).await;
                });
            }
        });
        let _ = dropper.join();
    }
}

/// The `studyhall serve` binary on `127.0.0.1:0` with the tests' API key, generous rate
/// limits and quiet logs, for tests that need a real process (crashes, signals, clusters).
/// Callers add their own settings, then [`spawn_listening`].
pub fn studyhall_serve(db_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_studyhall"));
    cmd.arg("serve")
        .env("STUDYHALL_ADDR", "127.0.0.1:0")
        .env("STUDYHALL_DATABASE_URL", db_url)
        .env("STUDYHALL_API_KEY", API_KEY)
        .env("STUDYHALL_RATE_PER_S", "100000")
        .env("STUDYHALL_RATE_BURST", "100000")
        .env("STUDYHALL_USER_WRITE_PER_S", "100000")
        .env("STUDYHALL_USER_WRITE_BURST", "100000")
        .env("STUDYHALL_USER_JOIN_PER_S", "100000")
        .env("STUDYHALL_USER_JOIN_BURST", "100000")
        .env("STUDYHALL_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// Starts `cmd` and waits for its "studyhall listening on" line; the child and its address.
pub async fn spawn_listening(
    mut cmd: tokio::process::Command,
    what: &str,
) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd.spawn().expect("spawn studyhall");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = within(what, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(rest) = line.strip_prefix("studyhall listening on http://") {
                return rest.trim().parse().expect("listening address");
            }
        }
        panic!("{what}: exited before listening");
    })
    .await;
    (child, addr)
}

/// The server's `/metrics` text.
pub async fn metrics_text(addr: SocketAddr) -> String {
    within("metrics", async {
        let mut st = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        st.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        st.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
}

/// The value of the unlabelled metric `name` in `/metrics` text (0 when it is not there).
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
