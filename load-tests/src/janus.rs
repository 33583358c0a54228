//! Janus 1.1 as the `sfu` benchmark's peer: the `janus` process (a generated configuration:
//! the VideoRoom plugin and the plain HTTP transport on a loopback port only, ICE on `lo`,
//! with `peers/janus/loopback.c` preloaded so that Janus gathers on `lo` at all),
//! and the Janus HTTP API that puts the benchmark's media peers into one VideoRoom room:
//! publishers `join` and `publish` with their offer; viewers `join` as subscribers to every
//! publisher's feed, answer Janus's offer and `start`. One Janus session holds every handle;
//! one long poll reads its events and hands each to its handle. It knows nothing of the
//! media itself (`crate::rtc`) nor of the scenario's steps.

use crate::procs::{free_port, http, spawn_listening};
use crate::rtc::{self, Counters, MediaPlan, Sdp, Start};
use crate::scenarios::sfu::Member;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Where Debian's janus package keeps its plugins.
const LIB: &str = "/usr/lib/x86_64-linux-gnu/janus";
/// The VideoRoom room of the benchmark.
const ROOM: u64 = 4242;
/// Bound on one API request.
const REQUEST: Duration = Duration::from_secs(15);
/// Bound on one long poll (Janus answers a quiet one with a keepalive after 30 s).
const LONG_POLL: Duration = Duration::from_secs(45);
/// Bound on waiting for one plugin event.
const EVENT: Duration = Duration::from_secs(20);
/// Every plugin but the VideoRoom, and every transport but HTTP, stay unloaded.
const OTHER_PLUGINS: &str = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so";
const OTHER_TRANSPORTS: &str = "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_websockets.so";

type Routes = Arc<Mutex<HashMap<u64, UnboundedSender<Value>>>>;

/// The API of one Janus session (cheap to clone).
#[derive(Clone)]
struct Api {
    addr: SocketAddr,
    session: u64,
    routes: Routes,
}

/// A running Janus with its session, its long poll and its VideoRoom room.
pub struct Janus {
    pub pid: u32,
    api: Api,
    feeds: Mutex<Vec<u64>>,
    poll: tokio::task::JoinHandle<()>,
    _child: Child,
}

impl Drop for Janus {
    fn drop(&mut self) {
        self.poll.abort();
    }
}

fn write_config(dir: &Path, port: u16) -> Result<()> {
    let d = dir.display();
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            "general: {{\n configs_folder = \"{d}\"\n plugins_folder = \"{LIB}/plugins\"\n transports_folder = \"{LIB}/transports\"\n events_folder = \"{LIB}/events\"\n loggers_folder = \"{LIB}/loggers\"\n debug_level = 3\n session_timeout = 120\n}}\nmedia: {{\n rtp_port_range = \"30000-60000\"\n}}\nnat: {{\n ice_enforce_list = \"lo\"\n ignore_mdns = true\n nice_debug = false\n}}\nplugins: {{\n disable = \"{OTHER_PLUGINS}\"\n}}\ntransports: {{\n disable = \"{OTHER_TRANSPORTS}\"\n}}\nloggers: {{\n disable = \"libjanus_jsonlog.so\"\n}}\nevents: {{\n broadcast = false\n}}\n"
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            "general: {{\n json = \"compact\"\n base_path = \"/janus\"\n http = true\n port = {port}\n ip = \"127.0.0.1\"\n https = false\n}}\nadmin: {{\n admin_http = false\n admin_https = false\n}}\n"
        ),
    )?;
    std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
    Ok(())
}

impl Janus {
    /// Starts Janus with a fresh configuration under `work`, opens a session and creates the
    /// room for up to `sessions` participants.
    pub async fn start(bin: &str, work: &Path, sessions: usize) -> Result<Self> {
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)?;
        let dir = std::fs::canonicalize(work)?;
        let port = free_port()?;
        write_config(&dir, port)?;
        let shim = loopback_shim(&dir)?;
        let log = std::fs::File::create(dir.join("janus.log"))?;
        let mut cmd = Command::new(bin);
        cmd.env("LD_PRELOAD", &shim)
            .arg("-C")
            .arg(dir.join("janus.jcfg"))
            .arg("-F")
            .arg(&dir)
            .arg("-o");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (child, pid) = spawn_listening(cmd, log, bin, addr).await?;
        let created = post(addr, "/janus", json!({"janus": "create"})).await?;
        let session = created["data"]["id"].as_u64().context("no session id")?;
        let api = Api {
            addr,
            session,
            routes: Routes::default(),
        };
        let poll = tokio::spawn(long_poll(api.clone()));
        let (admin, _events) = api.attach().await?;
        let body = json!({"request": "create", "room": ROOM, "publishers": sessions,
            "videocodec": "vp8", "audiocodec": "opus", "bitrate": 0, "fir_freq": 0,
            "notify_joining": false});
        let reply = api.message(admin, body, None).await?;
        let made = &reply["plugindata"]["data"];
        ensure!(made["videoroom"] == "created", "create room: {reply}");
        Ok(Self {
            pid,
            api,
            feeds: Mutex::new(Vec::new()),
            poll,
            _child: child,
        })
    }

    /// A publisher: joins the room, then publishes its offer.
    pub async fn publisher(&self, n: u32, plan: Arc<MediaPlan>) -> Result<Member> {
        let (h, mut events) = self.api.attach().await?;
        let body = json!({"request": "join", "ptype": "publisher", "room": ROOM,
            "display": format!("p{n}")});
        self.api.message(h, body, None).await?;
        let joined = next_event(&mut events, |e| {
            e["plugindata"]["data"]["videoroom"] == "joined"
        })
        .await?;
        let feed = joined["plugindata"]["data"]["id"]
            .as_u64()
            .context("no feed id")?;
        self.feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(feed);
        self.peer_on(h, events, Start::Publish, Some(plan)).await
    }

    /// A viewer: subscribes to every publisher's feed and answers Janus's offer.
    pub async fn viewer(&self, _n: u32) -> Result<Member> {
        let (h, events) = self.api.attach().await?;
        let streams: Vec<Value> = self
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| json!({"feed": f}))
            .collect();
        let body = json!({"request": "join", "ptype": "subscriber", "room": ROOM,
            "streams": streams});
        let member = self.peer_on(h, events, Start::Answer, None).await?;
        self.api.message(h, body, None).await?;
        Ok(member)
    }

    /// Starts a peer whose SDP goes through Janus handle `h` (see [`bridge`]).
    async fn peer_on(
        &self,
        h: u64,
        events: UnboundedReceiver<Value>,
        start: Start,
        plan: Option<Arc<MediaPlan>>,
    ) -> Result<Member> {
        let (out_tx, out) = unbounded_channel();
        let (into, in_rx) = unbounded_channel();
        let peer = rtc::start(start, plan, out_tx, in_rx).await?;
        let handle = Handle {
            api: self.api.clone(),
            id: h,
            counters: peer.counters.clone(),
        };
        let bridge = tokio::spawn(bridge(handle, events, out, into));
        Ok(Member::new(peer, bridge))
    }
}

/// A Janus plugin handle one peer talks through, and where that peer counts failures.
struct Handle {
    api: Api,
    id: u64,
    counters: Arc<Counters>,
}

/// Builds `peers/janus/loopback.c` (with `cc`) into `dir`; returns the library's path.
fn loopback_shim(dir: &Path) -> Result<std::path::PathBuf> {
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/janus/loopback.c");
    ensure!(src.exists(), "{} missing", src.display());
    let lib = dir.join("loopback.so");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .context("run cc")?;
    ensure!(
        out.status.success(),
        "cc {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(lib)
}

async fn post(addr: SocketAddr, path: &str, mut body: Value) -> Result<Value> {
    body["transaction"] = json!(format!("t{:x}", rand::random::<u64>()));
    let (st, v) = http(addr, REQUEST, "POST", path, None, Some(body)).await?;
    ensure!(st == 200, "janus {path}: HTTP {st} {v}");
    if v["janus"] == "error" {
        bail!("janus {path}: {}", v["error"]);
    }
    Ok(v)
}

impl Api {
    /// A VideoRoom handle and the channel its events arrive on.
    async fn attach(&self) -> Result<(u64, UnboundedReceiver<Value>)> {
        let path = format!("/janus/{}", self.session);
        let v = post(
            self.addr,
            &path,
            json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}),
        )
        .await?;
        let h = v["data"]["id"].as_u64().context("no handle id")?;
        let (tx, rx) = unbounded_channel();
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(h, tx);
        Ok((h, rx))
    }

    /// A plugin message (with a JSEP); returns Janus's immediate reply (`ack` or `success`).
    async fn message(&self, h: u64, body: Value, jsep: Option<Value>) -> Result<Value> {
        let mut m = json!({"janus": "message", "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        post(self.addr, &format!("/janus/{}/{h}", self.session), m).await
    }

    /// Tells Janus this handle has no more candidates (they are all in its SDP).
    async fn trickle_done(&self, h: u64) -> Result<()> {
        let m = json!({"janus": "trickle", "candidate": {"completed": true}});
        post(self.addr, &format!("/janus/{}/{h}", self.session), m).await?;
        Ok(())
    }
}

/// Reads the session's events for as long as it lives and hands each to its handle.
async fn long_poll(api: Api) {
    let path = format!("/janus/{}?maxev=50", api.session);
    loop {
        let Ok((200, v)) = http(api.addr, LONG_POLL, "GET", &path, None, None).await else {
            return;
        };
        let events = match v {
            Value::Array(a) => a,
            other => vec![other],
        };
        let routes = api.routes.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            if let Some(tx) = e["sender"].as_u64().and_then(|h| routes.get(&h)) {
                let _ = tx.send(e);
            }
        }
    }
}

/// The next event of a handle that `pick` takes (bounded); an error event fails it.
async fn next_event(
    events: &mut UnboundedReceiver<Value>,
    pick: impl Fn(&Value) -> bool,
) -> Result<Value> {
    tokio::time::timeout(EVENT, async {
        loop {
            let e = events.recv().await.context("janus session ended")?;
            if let Some(err) = e["plugindata"]["data"].get("error") {
                bail!("janus: {err}");
            }
            if pick(&e) {
                return Ok(e);
            }
        }
    })
    .await
    .context("no answer from janus")?
}

/// Carries a peer's SDP through a handle: an offer is published, an answer starts the
/// subscription; JSEPs in the handle's events go to the peer.
async fn bridge(
    handle: Handle,
    mut events: UnboundedReceiver<Value>,
    mut out: UnboundedReceiver<Sdp>,
    into: UnboundedSender<Sdp>,
) {
    loop {
        tokio::select! {
            sdp = out.recv() => {
                let Some(sdp) = sdp else { return };
                let (body, jsep) = match sdp {
                    Sdp::Offer(s) => (json!({"request": "publish", "audio": true, "video": true}),
                        json!({"type": "offer", "sdp": s})),
                    Sdp::Answer(s) => (json!({"request": "start", "room": ROOM}),
                        json!({"type": "answer", "sdp": s})),
                };
                let (api, h) = (&handle.api, handle.id);
                if api.message(h, body, Some(jsep)).await.is_err() || api.trickle_done(h).await.is_err() {
                    return;
                }
            }
            e = events.recv() => {
                let Some(e) = e else { return };
                let jsep = &e["jsep"];
                let (body, dropped) = loopback_only(jsep["sdp"].as_str().unwrap_or_default());
                if !dropped.is_empty() && !body.contains("a=candidate:") {
                    handle.counters.fail(format!(
                        "janus offered no loopback ICE candidate, only {dropped:?} (its \
                         loopback shim did not take; this benchmark only talks to loopback \
                         addresses)"
                    ));
                }
                let sdp = match jsep["type"].as_str() {
                    Some("offer") => Sdp::Offer(body),
                    Some("answer") => Sdp::Answer(body),
                    _ => continue,
                };
                if into.send(sdp).is_err() {
                    return;
                }
            }
        }
    }
}

/// The SDP without its ICE candidates on other than loopback addresses (this benchmark never
/// sends to those), and the addresses it dropped.
fn loopback_only(sdp: &str) -> (String, Vec<String>) {
    let mut dropped = Vec::new();
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if let Some(c) = line.trim_end().strip_prefix("a=candidate:") {
            let addr = c.split_whitespace().nth(4).unwrap_or_default();
            let ip: Option<std::net::IpAddr> = addr.parse().ok();
            if !ip.is_some_and(|ip| ip.is_loopback()) {
                if !dropped.iter().any(|d| d == addr) {
                    dropped.push(addr.to_owned());
                }
                continue;
            }
        }
        out.push_str(line);
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_candidates_are_kept() {
        let sdp = "m=audio 9 x\r\na=candidate:1 1 udp 2015363327 192.0.2.2 38044 typ host\r\na=candidate:2 1 udp 2015363327 127.0.0.1 4000 typ host\r\na=end-of-candidates\r\n";
        let (kept, dropped) = loopback_only(sdp);
        assert_eq!(dropped, vec!["192.0.2.2".to_owned()]);
        assert!(kept.contains("127.0.0.1 4000"));
        assert!(!kept.contains("192.0.2.2"));
        assert!(kept.ends_with("a=end-of-candidates\r\n"));
    }
}
