//! The front door under hostile clients: idle and slowloris connections closed at the header
//! timeout, slow request bodies answered 408, and the connection cap, where a newcomer takes
//! the place of a connection that never sent a request and is otherwise refused with a JSON
//! 503; and searches, which may hold only their own slots of the database pool.

use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes the connection (a reset counts as closed).
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn idle_and_slowloris_connections_are_closed_at_the_header_timeout() {
    let s = Server::sqlite(|c| c.http_header_timeout_ms = 300).await;

    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    within("idle connection closed", until_closed(&mut idle)).await;

    // One header byte every 50 ms: the head would take 5 s; the server closes it long before.
    let slow = TcpStream::connect(s.addr).await.unwrap();
    let (mut rd, mut wr) = slow.into_split();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let writer = tokio::spawn(async move {
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    });
    let mut got = Vec::new();
    within("slowloris connection closed", rd.read_to_end(&mut got))
        .await
        .ok();
    assert!(
        !String::from_utf8_lossy(&got).contains(" 200 "),
        "the slow head must not be served"
    );
    writer.abort();

    // A normal request on a fresh connection is still served.
    let (status, _) = http(s.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_request_body_slower_than_the_request_timeout_gets_a_json_408() {
    let s = Server::sqlite(|c| c.http_request_timeout_ms = 300).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /api/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"id\":"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let got = within("408", until_closed(&mut c)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
    assert_eq!(v["code"], "bad_request");
    s.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_a_newcomer_evicts_the_oldest_idle_connection() {
    let s = Server::sqlite(|c| c.max_connections = 3).await;
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(s.addr).await.unwrap());
    }
    // The accept queue is first in, first out: this request finds the three idle ones open
    // and takes the place of the oldest.
    let (status, _) = http(s.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    let got = within("oldest idle connection evicted", until_closed(&mut idle[0])).await;
    assert!(
        got.is_empty(),
        "an evicted connection is closed without an answer"
    );
    s.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_with_no_idle_connection_a_newcomer_gets_a_json_503() {
    let s = Server::sqlite(|c| c.max_connections = 2).await;
    let _a = s.client("ana").await;
    let _b = s.client("ben").await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let got = within("refused", until_closed(&mut c)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body.trim()).expect("a JSON error");
    assert_eq!(v["code"], "unavailable");
    drop(_a);
    s.stop().await;
}

#[tokio::test]
async fn the_per_address_cap_refuses_a_second_connection_from_a_busy_address() {
    let s = Server::sqlite(|c| c.max_connections_per_ip = 1).await;
    let _a = s.client("ana").await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let got = within("refused", until_closed(&mut c)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 503"));
    s.stop().await;
}

#[tokio::test]
async fn searches_hold_at_most_their_slots_and_never_stall_other_reads() {
    let s = Server::sqlite(|c| {
        c.search_concurrency = 1;
        c.search_wait_ms = 0;
    })
    .await;
    s.room("big", "open").await;
    s.room("other", "open").await;
    let mut w = s.client("writer").await;
    w.join("big").await;
    w.join("other").await;
    for i in 0..40 {
        w.ok(serde_json::json!({"type": "send", "room": "big", "text": format!("the a of and {i}"), "client_msg_id": format!("m{i}")}))
            .await;
    }
    let mut searchers = Vec::new();
    for i in 0..8 {
        let mut c = s.client(&format!("s{i}")).await;
        c.join("big").await;
        searchers.push(c);
    }
    let mut rids = Vec::new();
    for c in &mut searchers {
        rids.push(
            c.fire(serde_json::json!({"type": "search", "room": "big", "q": "the a of and"}))
                .await,
        );
    }
    // Another room's history is answered meanwhile.
    w.ok(serde_json::json!({"type": "history", "room": "other"}))
        .await;
    let mut answered = 0;
    for (c, rid) in searchers.iter_mut().zip(rids) {
        let r = c.reply(rid).await;
        match r["type"].as_str() {
            Some("ok") => answered += 1,
            _ => assert_eq!(r["code"], "unavailable", "{r}"),
        }
    }
    assert!(answered >= 1, "at least the first search is answered");
    s.stop().await;
}

#[tokio::test]
async fn per_user_limits_hold_across_the_users_sessions() {
    let s = Server::sqlite(|c| {
        c.user_write_per_s = 0.001;
        c.user_write_burst = 5.0;
        c.user_join_per_s = 0.001;
        c.user_join_burst = 4.0;
        c.user_hand_per_s = 0.001;
        c.user_hand_burst = 2.0;
    })
    .await;
    s.room("r", "open").await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut c = s.client("ana").await;
        c.join("r").await;
        tabs.push(c);
    }
    // Five writes in all, whichever tab sends them.
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..9 {
        let c = &mut tabs[i % 3];
        let r = c
            .request(serde_json::json!({"type": "send", "room": "r", "text": "spam", "client_msg_id": format!("m{i}")}))
            .await;
        match r["type"].as_str() {
            Some("ok") => ok += 1,
            _ => {
                assert_eq!(r["code"], "rate_limited", "{r}");
                limited += 1;
            }
        }
    }
    assert_eq!((ok, limited), (5, 4));
    // Joins: three used above, one more, then refused.
    tabs[0]
        .ok(serde_json::json!({"type": "leave", "room": "r"}))
        .await;
    assert_eq!(
        tabs[1]
            .err(serde_json::json!({"type": "leave", "room": "r"}))
            .await,
        "rate_limited"
    );
    // Hands: up, down, then refused.
    tabs[1]
        .ok(serde_json::json!({"type": "raise_hand", "room": "r"}))
        .await;
    tabs[2]
        .ok(serde_json::json!({"type": "lower_hand", "room": "r"}))
        .await;
    assert_eq!(
        tabs[2]
            .err(serde_json::json!({"type": "raise_hand", "room": "r"}))
            .await,
        "rate_limited"
    );
    // Another user is not affected, and the limited sessions stay open.
    let mut ben = s.client("ben").await;
    ben.join("r").await;
    ben.ok(serde_json::json!({"type": "send", "room": "r", "text": "hi", "client_msg_id": "b"}))
        .await;
    tabs[1].ok(serde_json::json!({"type": "rooms"})).await;
    s.stop().await;
}

fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The close code a `hello` with this token gets (None: it was welcomed).
async fn hello_close(s: &Server, claims: serde_json::Value) -> Option<u16> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = raw_ws(s.addr).await;
    let hello = serde_json::json!({"type": "hello", "token": signed(claims)});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let first = within("first frame", ws.next()).await;
    if let Some(Ok(Message::Text(t))) = &first
        && t.as_str().contains("\"welcome\"")
    {
        return None;
    }
    close_code(&mut ws).await
}

#[tokio::test]
async fn ids_and_names_that_hide_or_forge_text_are_refused() {
    let s = Server::sqlite(|_| {}).await;
    let now = studyhall::auth::now_s();
    let claims = |sub: &str, name: Option<&str>| {
        let mut c = serde_json::json!({"sub": sub, "exp": now + 600, "iat": now});
        if let Some(n) = name {
            c["name"] = n.into();
        }
        c
    };
    for sub in [
        "eve\nINFO forged log line",
        "eve\u{0}",
        "eve\u{1b}[31m",
        "\u{202e}eve",
        "e\u{200b}ve",
        "StudyHall",
        "studyhall ",
        " ana",
    ] {
        assert_eq!(
            hello_close(&s, claims(sub, None)).await,
            Some(4001),
            "sub {sub:?} must be refused"
        );
    }
    assert_eq!(
        hello_close(&s, claims("eve", Some("\u{202e}nimda"))).await,
        Some(4001)
    );
    assert_eq!(
        hello_close(&s, claims("eve", Some("\u{200b}\u{200b}"))).await,
        Some(4001)
    );
    // Names in scripts that need joiners, and emoji sequences, are fine.
    assert_eq!(
        hello_close(&s, claims("eve", Some("می‌خواهم 👩‍💻"))).await,
        None
    );
    s.stop().await;
}

#[tokio::test]
async fn text_of_only_invisible_characters_is_blank() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut c = s.client("ana").await;
    c.join("r").await;
    assert_eq!(
        c.err(serde_json::json!({"type": "send", "room": "r", "text": "\u{200b}\u{feff} \u{2060}", "client_msg_id": "z"}))
            .await,
        "bad_request"
    );
    s.stop().await;
}

#[tokio::test]
async fn websocket_protocol_violations_close_1002_and_bad_utf8_1007() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::MaybeTlsStream;
    let s = Server::sqlite(|_| {}).await;
    for (bytes, code) in [
        // A masked frame with the reserved opcode 0x3.
        (vec![0x83u8, 0x80, 0, 0, 0, 0], 1002u16),
        // A masked text frame whose payload is the byte 0xFF.
        (vec![0x81u8, 0x81, 0, 0, 0, 0, 0xFF], 1007u16),
    ] {
        let mut c = s.client("ana").await;
        let MaybeTlsStream::Plain(tcp) = c.ws.get_mut() else {
            panic!("plain TCP expected");
        };
        tcp.write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut c.ws).await, Some(code));
    }
    s.stop().await;
}

#[tokio::test]
async fn a_banned_users_room_list_leaves_out_the_room() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let (status, _) = http(
        s.addr,
        "PUT",
        "/api/rooms/r/members/tia",
        Some(API_KEY),
        Some(serde_json::json!({"role": "host"})),
    )
    .await;
    assert_eq!(status, 200);
    let mut ana = s.client("ana").await;
    ana.join("r").await;
    let mut tia = s.client("tia").await;
    tia.join("r").await;
    tia.ok(serde_json::json!({"type": "ban", "room": "r", "user": "ana"}))
        .await;
    let mut again = s.client("ana").await;
    let rooms = again.ok(serde_json::json!({"type": "rooms"})).await;
    assert_eq!(rooms["rooms"], serde_json::json!([]), "{rooms}");
    s.stop().await;
}

#[tokio::test]
async fn the_page_forbids_framing_and_foreign_scripts() {
    let s = Server::sqlite(|_| {}).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = within("page", until_closed(&mut c)).await;
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-security-policy:") && head.contains("frame-ancestors 'none'"));
    assert!(head.contains("x-frame-options: deny"));
    s.stop().await;
}
