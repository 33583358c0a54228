//! Bad input and limits: 4001 paths, malformed frames, 1009, rate limits and 4029, slow
//! consumers and 4008, session limits, shutdown with bye and 1001.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use studyhall::auth::now_s;
use studyhall::protocol::{PlatformRole, RoomRole};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

async fn hello_then_close(s: &Server, first: Message) -> (Option<Value>, Option<u16>) {
    let mut ws = raw_ws(s.addr).await;
    ws.send(first).await.unwrap();
    let mut error = None;
    let code = within("close", async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => error = Some(serde_json::from_str::<Value>(&t).unwrap()),
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await;
    (error, code)
}

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn every_4001_path_closes_with_4001() {
    let s = Server::sqlite(|c| c.hello_timeout_ms = 300).await;
    // No hello in time.
    let mut ws = raw_ws(s.addr).await;
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let now = now_s();
    let cases = [
        ("garbage token", json!({"type":"hello","token":"nope"}).to_string()),
        ("wrong secret", json!({"type":"hello","token": jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub":"u","exp":now+60,"iat":now}),
            &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-value")).unwrap()}).to_string()),
        ("expired", json!({"type":"hello","token": signed(json!({"sub":"u","exp":now-3600,"iat":now-7200}))}).to_string()),
        ("future iat", json!({"type":"hello","token": signed(json!({"sub":"u","exp":now+7200,"iat":now+3600}))}).to_string()),
        ("not hello", json!({"type":"join","room":"r"}).to_string()),
        ("not json", "hello?".to_owned()),
    ];
    for (what, frame) in cases {
        let (err, code) = hello_then_close(&s, Message::text(frame)).await;
        assert_eq!(code, Some(4001), "{what}");
        assert_eq!(
            err.map(|e| e["code"].clone()),
            Some(json!("unauthorized")),
            "{what}"
        );
    }
    let (_, code) = hello_then_close(&s, Message::binary(vec![1, 2, 3])).await;
    assert_eq!(code, Some(4001), "binary first frame");
    s.stop().await;
}

#[tokio::test]
async fn malformed_frames_get_bad_request_and_the_connection_stays_up() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut c = s.client("alice").await;
    for (frame, rid) in [
        ("not json at all".to_owned(), None),
        (json!({"no_type": 1, "rid": 4}).to_string(), Some(4)),
        (json!({"type": "fly", "rid": 5}).to_string(), Some(5)),
        (
            json!({"type": "join", "room": 7, "rid": 6}).to_string(),
            Some(6),
        ),
        (
            json!({"type": "send", "room": "r", "rid": 7}).to_string(),
            Some(7),
        ),
        ("[1,2,3]".to_owned(), None),
    ] {
        c.ws.send(Message::text(frame.clone())).await.unwrap();
        let e = c.next().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{frame}"
        );
        assert_eq!(e["rid"].as_i64(), rid, "{frame}");
    }
    c.join("r").await;
    assert_eq!(
        c.err(json!({"type":"send","room":"r","text":"   ","client_msg_id":"1"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        c.err(json!({"type":"send","room":"r","text":"x","client_msg_id":""}))
            .await,
        "bad_request"
    );
    assert_eq!(
        c.err(json!({"type":"send","room":"r","text":"x".repeat(4001),"client_msg_id":"2"}))
            .await,
        "too_large"
    );
    assert_eq!(
        c.ok(json!({"type":"send","room":"r","text":"é".repeat(4000),"client_msg_id":"3"}))
            .await["seq"],
        1,
        "4000 chars, not bytes"
    );
    assert_eq!(
        c.err(json!({"type":"react","room":"r","id":"m1","emoji":"a b"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        c.err(json!({"type":"hello","token":"x"})).await,
        "bad_request"
    );
    let pong = c.request(json!({"type":"ping"})).await;
    assert_eq!(pong["type"], "pong");
    s.stop().await;
}

#[tokio::test]
async fn sustained_garbage_is_closed_4029() {
    let s = Server::sqlite(|c| c.abuse_strikes = 10).await;
    let mut c = s.client("spammer").await;
    for _ in 0..11 {
        c.ws.send(Message::text("garbage")).await.unwrap();
    }
    assert_eq!(close_code(&mut c.ws).await, Some(4029));
    s.stop().await;
}

#[tokio::test]
async fn rate_limit_refuses_then_closes_4029_on_sustained_flooding() {
    let s = Server::sqlite(|c| {
        c.rate_per_s = 1.0;
        c.rate_burst = 5.0;
        c.abuse_strikes = 20;
    })
    .await;
    let mut c = s.client("flood").await;
    for i in 0..5 {
        assert_eq!(
            c.request(json!({"type":"ping"})).await["type"],
            "pong",
            "burst {i}"
        );
    }
    let refused = c.request(json!({"type":"ping"})).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("rate_limited"))
    );
    for _ in 0..30 {
        if c.ws
            .send(Message::text(json!({"type":"ping"}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut c.ws).await, Some(4029));
    s.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_1009() {
    let s = Server::sqlite(|c| c.max_frame_bytes = 64 * 1024).await;
    let mut c = s.client("big").await;
    let huge = json!({"type":"send","room":"r","text":"x".repeat(70 * 1024),"client_msg_id":"1"})
        .to_string();
    let _ = c.ws.send(Message::text(huge)).await;
    assert_eq!(close_code(&mut c.ws).await, Some(1009));
    // The server is fine for everyone else.
    let mut d = s.client("other").await;
    assert_eq!(d.request(json!({"type":"ping"})).await["type"], "pong");
    s.stop().await;
}

#[tokio::test]
async fn too_many_sessions_for_one_user_are_refused_4029() {
    let s = Server::sqlite(|c| c.max_sessions_per_user = 2).await;
    let _a = s.client("u").await;
    let _b = s.client("u").await;
    let mut ws = raw_ws(s.addr).await;
    ws.send(Message::text(
        json!({"type":"hello","token":s.token("u")}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4029));
    s.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_after_two_heartbeats() {
    let s = Server::sqlite(|c| c.heartbeat_s = 1).await;
    // A hand-rolled client that never answers the server's pings (a library client would).
    let mut raw = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.addr
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let hello = json!({"type":"hello","token":s.token("quiet")}).to_string();
    let mut frame = vec![0x81u8];
    let len = hello.len();
    assert!((126..65536).contains(&len));
    frame.push(0x80 | 126);
    frame.extend_from_slice(&(len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // zero mask: payload unchanged
    frame.extend_from_slice(hello.as_bytes());
    raw.write_all(&frame).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let code = within("idle close", async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "socket ended without a close frame");
            buf.extend_from_slice(&chunk[..n]);
            // Skip the HTTP response, then walk the frames looking for a close (opcode 8).
            let Some(start) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let mut i = start + 4;
            while i + 2 <= buf.len() {
                let op = buf[i] & 0x0f;
                let (len, hdr) = match buf[i + 1] & 0x7f {
                    126 if i + 4 <= buf.len() => {
                        (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4)
                    }
                    126 => break,
                    l => (l as usize, 2),
                };
                if i + hdr + len > buf.len() {
                    break;
                }
                if op == 8 {
                    return u16::from_be_bytes([buf[i + hdr], buf[i + hdr + 1]]);
                }
                i += hdr + len;
            }
        }
    })
    .await;
    assert_eq!(code, 1000);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before two heartbeats"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_4008_while_200_members_keep_receiving() {
    const MEMBERS: usize = 200;
    const MESSAGES: usize = 600;
    let s = Server::sqlite_small_send_buffer(|c| {
        c.outbox_frames = 256;
        c.max_sessions_per_user = 1;
    })
    .await;
    s.room("big", "open").await;

    // The slow consumer: a tiny receive buffer and it never reads after joining.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(s.addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", s.addr), stream)
        .await
        .unwrap();
    slow.send(Message::text(
        json!({"type":"hello","token":s.token("slow")}).to_string(),
    ))
    .await
    .unwrap();
    slow.send(Message::text(
        json!({"type":"join","room":"big","rid":1}).to_string(),
    ))
    .await
    .unwrap();

    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let mut c = s.client(&format!("m{i}")).await;
        c.join("big").await;
        members.push(c);
    }
    // Every message any member has read, so the sender can keep the members within a window
    // of itself: the test is about one reader that never reads, not about how far 200 tasks
    // on a shared CI machine fall behind a sender that never waits for them.
    let read = Arc::new((AtomicUsize::new(0), Notify::new()));
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            let read = read.clone();
            tokio::spawn(async move {
                for _ in 0..MESSAGES {
                    c.next_of("message").await;
                    read.0.fetch_add(1, Ordering::Relaxed);
                    read.1.notify_one();
                }
                MESSAGES
            })
        })
        .collect();
    let mut sender = s.client("teacher").await;
    sender.join("big").await;
    let text = "x".repeat(2000);
    // In windows, reading its own replies, so the sender itself is never a slow consumer.
    for window in 0..MESSAGES / 50 {
        let mut rids = Vec::new();
        for i in window * 50..(window + 1) * 50 {
            rids.push(sender.fire(json!({"type":"send","room":"big","text":text,"client_msg_id":format!("{i}")})).await);
        }
        for rid in rids {
            assert_eq!(sender.reply(rid).await["type"], "ok");
        }
        sender.pending.clear();
        let sent = (window + 1) * 50;
        within("members read the window", async {
            while read.0.load(Ordering::Relaxed) < MEMBERS * sent {
                read.1.notified().await;
            }
        })
        .await;
    }
    for r in readers {
        assert_eq!(within("member reads all", r).await.unwrap(), MESSAGES);
    }
    assert_eq!(close_code(&mut slow).await, Some(4008));
    let closes = s.app.metrics.slow_consumer_closes.load(Ordering::Relaxed);
    assert_eq!(closes, 1, "only the slow one was closed");
    s.stop().await;
}

/// Waits until the server has parked at least `n` write loops in all.
async fn parked_at_least(s: &Server, n: u64) -> u64 {
    within("write loops parked", async {
        loop {
            let parked = s.app.metrics.writers_parked.load(Ordering::Relaxed);
            if parked >= n {
                return parked;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// With `write_idle_ms` at 1 ms a session's write loop parks between frames: replies,
/// fan-out and a kick's close still reach the clients, each through a loop started again.
#[tokio::test]
async fn parked_write_loops_start_again_for_frames_and_a_close() {
    let s = Server::sqlite(|c| {
        c.write_idle_ms = 1;
        c.heap_trim_parks = 2;
        c.heap_trim_interval_s = 0;
    })
    .await;
    s.room("r", "open").await;
    let mut host = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[("r", RoomRole::Host)]),
    )
    .await;
    host.join("r").await;
    let mut ann = s.client("ann").await;
    ann.join("r").await;
    let mut parked = parked_at_least(&s, 2).await;
    for i in 0..5 {
        let text = format!("m{i}");
        host.ok(json!({"type":"send","room":"r","text":text,"client_msg_id":format!("c{i}")}))
            .await;
        assert_eq!(ann.next_of("message").await["text"], text.as_str());
        // Both loops wrote, and both park again.
        parked = parked_at_least(&s, parked + 2).await;
    }
    host.ok(json!({"type":"kick","room":"r","user":"ann"}))
        .await;
    assert_eq!(ann.next_of("kicked").await["reason"], "kicked");
    assert_eq!(close_code(&mut ann.ws).await, Some(4003));
    // The parked loops' memory was handed back (a trim per two parks here).
    within("a heap trim", async {
        while s.app.metrics.heap_trims.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn shutdown_says_bye_and_closes_1001_after_committing_accepted_writes() {
    let s = Server::sqlite(|_| {}).await;
    let dir = s.dir.clone().expect("sqlite dir");
    s.room("r", "open").await;
    let mut c = s.client("alice").await;
    c.join("r").await;
    let mut rids = Vec::new();
    for i in 0..20 {
        rids.push(
            c.fire(json!({"type":"send","room":"r","text":"x","client_msg_id":format!("{i}")}))
                .await,
        );
    }
    let stopping = tokio::spawn(s.stop());
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut bye = false;
    let code = within("bye and close", async {
        while let Some(m) = c.ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ok" && rids.contains(&v["rid"].as_i64().unwrap_or(-1)) {
                        acked.push((
                            v["id"]
                                .as_str()
                                .expect("ok carries the message id")
                                .to_owned(),
                            v["seq"].as_i64().expect("ok carries the seq"),
                        ));
                    }
                    if v["type"] == "bye" {
                        assert_eq!(v["reason"], "shutdown");
                        bye = true;
                    }
                }
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await;
    within("stop", stopping).await.unwrap();
    assert!(bye, "bye before close");
    assert_eq!(code, Some(1001));
    // Whatever was acked is stored (the rest may have been refused as the server stopped):
    // reopen the same database and find every acknowledged message at its acknowledged seq.
    assert!(acked.len() <= 20);
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let again = Server::start(base_config(url)).await;
    let mut reader = again.client("alice").await;
    let page = reader
        .ok(json!({"type":"history","room":"r","limit":100}))
        .await;
    let stored: Vec<(String, i64)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    for write in &acked {
        assert!(
            stored.contains(write),
            "acked write {write:?} missing after reopening; stored {stored:?}"
        );
    }
    again.stop().await;
    drop(dir);
}

#[tokio::test]
async fn origin_allowlist_is_checked_before_the_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = Server::sqlite(|c| c.allowed_origins = vec!["https://school.example".into()]).await;
    let attempt = |origin: &'static str| {
        let addr = s.addr;
        async move {
            let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
            req.headers_mut().insert("Origin", origin.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(within("evil", attempt("https://evil.example")).await, 403);
    assert_eq!(within("good", attempt("https://school.example")).await, 101);
    s.stop().await;
}

#[tokio::test]
async fn a_session_joins_at_most_max_rooms_per_session() {
    let s = Server::sqlite(|c| c.max_rooms_per_session = 2).await;
    for r in ["a", "b", "c"] {
        s.room(r, "open").await;
    }
    let mut c = s.client("u").await;
    c.join("a").await;
    c.join("b").await;
    c.join("a").await; // re-joining is a resync, not a new room
    assert_eq!(c.err(json!({"type":"join","room":"c"})).await, "forbidden");
    c.ok(json!({"type":"leave","room":"a"})).await;
    c.join("c").await;
    s.stop().await;
}

/// Reads one (unmasked) server frame from a raw socket, topping `buf` up as needed:
/// `(fin, opcode, payload)`.
async fn raw_frame(raw: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (bool, u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.len() >= 2 {
            let (len, hdr) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                126 | 127 => (usize::MAX, 0),
                l => (l as usize, 2),
            };
            if len != usize::MAX && buf.len() >= hdr + len {
                let (fin, op) = (buf[0] & 0x80 != 0, buf[0] & 0x0f);
                let payload = buf[hdr..hdr + len].to_vec();
                buf.drain(..hdr + len);
                return (fin, op, payload);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = raw.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the socket ended");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client text frame (masked with a zero key, so the payload reads as is).
fn client_text(text: &str) -> Vec<u8> {
    let mut frame = vec![0x81u8];
    match text.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    frame
}

#[tokio::test]
async fn a_long_message_is_sent_as_fragments_no_longer_than_ws_fragment_bytes() {
    use tokio::io::AsyncWriteExt;
    const FRAGMENT: usize = 256;
    let s = Server::sqlite(|c| c.ws_fragment_bytes = FRAGMENT).await;
    s.room("frag", "open").await;
    let mut raw = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat, studyhall.v1\r\n\r\n",
        s.addr
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    // The handshake answer (RFC 6455's own example key), then whatever frames follow it.
    let mut buf = Vec::new();
    let head = within("101", async {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                buf.drain(..end + 4);
                return head;
            }
            let mut chunk = [0u8; 1024];
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "no answer to the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(
        head.contains("sec-websocket-protocol: studyhall.v1"),
        "{head}"
    );

    // Multi-byte characters straddle the fragment boundaries.
    let text = format!("{}{}", "é€".repeat(150), "x".repeat(300));
    for cmd in [
        json!({"type":"hello","token":s.token("frag")}),
        json!({"type":"join","room":"frag","rid":1}),
        json!({"type":"send","room":"frag","text":text,"client_msg_id":"f1","rid":2}),
    ] {
        raw.write_all(&client_text(&cmd.to_string())).await.unwrap();
    }
    // Reassemble messages until the long one comes back, checking every frame on the way.
    let (message, fragments) = within("the long message", async {
        let mut parts: Vec<u8> = Vec::new();
        let mut count = 0;
        loop {
            let (fin, op, payload) = raw_frame(&mut raw, &mut buf).await;
            if op == 9 {
                continue; // the server's ping
            }
            assert!(payload.len() <= FRAGMENT, "a {}-byte frame", payload.len());
            assert_eq!(
                op,
                if parts.is_empty() && count == 0 { 1 } else { 0 },
                "opcode"
            );
            parts.extend_from_slice(&payload);
            count += 1;
            if fin {
                let msg: Value = serde_json::from_slice(&parts).expect("one JSON object");
                if msg["type"] == "message" {
                    return (msg, count);
                }
                parts.clear();
                count = 0;
            }
        }
    })
    .await;
    assert_eq!(message["text"], text.as_str());
    assert!(fragments >= text.len() / FRAGMENT, "{fragments} fragments");
    s.stop().await;
}

/// The first message `pick` takes, skipping the others; the socket must not end first.
async fn first_of<T>(ws: &mut Ws, what: &str, pick: impl Fn(Message) -> Option<T>) -> T {
    within(what, async {
        loop {
            match ws.next().await {
                Some(Ok(m)) => {
                    if let Some(t) = pick(m) {
                        return t;
                    }
                }
                other => panic!("socket ended before {what}: {other:?}"),
            }
        }
    })
    .await
}

/// The server's own WebSocket framing answers a ping with its payload, and a client's close
/// with a close of its own: 1000, no reason text.
#[tokio::test]
async fn a_ping_is_answered_and_a_clients_close_is_answered_with_1000() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let s = Server::sqlite(|_| {}).await;
    let tok = token("pinger", PlatformRole::Student, &[]);
    let mut c = Client::connect(s.addr, &tok).await;
    let payload = bytes::Bytes::from_static(b"are you there");
    c.ws.send(Message::Ping(payload.clone())).await.unwrap();
    let pong = first_of(&mut c.ws, "the pong", |m| match m {
        Message::Pong(p) => Some(p),
        _ => None,
    })
    .await;
    assert_eq!(pong, payload);
    let bye = CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    };
    c.ws.send(Message::Close(Some(bye))).await.unwrap();
    let answer = first_of(&mut c.ws, "the close", |m| match m {
        Message::Close(f) => Some(f),
        _ => None,
    })
    .await
    .expect("a close frame with a code");
    assert_eq!(u16::from(answer.code), 1000);
    assert_eq!(answer.reason.as_str(), "");
}
