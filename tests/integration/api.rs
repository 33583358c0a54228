//! The HTTP API's edges: `GET /api/rooms` (filters, keyset paging, refusals) on both stores,
//! and error answers that are JSON `{"code","message"}` on every route and status, the
//! framework's own rejections (body too large, undecodable path or query) included.

use crate::common::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One raw HTTP/1.1 exchange: status, lower-cased head and body text.
async fn raw(addr: SocketAddr, request: Vec<u8>) -> (u16, String, String) {
    within("raw http", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&request).await.unwrap();
        let mut resp = Vec::new();
        // The server may answer and close before reading a large body: a reset after the
        // answer arrived is fine.
        let _ = s.read_to_end(&mut resp).await;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    })
    .await
}

fn request(method: &str, path: &str, ctype: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The answer is JSON `{"code": code, "message": non-empty}` with a JSON content type.
fn assert_json_error(what: &str, (status, head, body): &(u16, String, String), want: (u16, &str)) {
    assert_eq!(*status, want.0, "{what}: {head}\n{body}");
    assert!(
        head.contains("content-type: application/json"),
        "{what}: not JSON: {head}\n{body}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(v["code"], want.1, "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
}

#[tokio::test]
async fn every_api_error_is_json_with_code_and_message() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r1", "open").await;
    let big = vec![b'x'; 300 * 1024];
    let cases: Vec<(&str, Vec<u8>, (u16, &str))> = vec![
        (
            "300 KB body",
            request("POST", "/api/rooms", "application/json", &big),
            (413, "too_large"),
        ),
        (
            "300 KB announcement",
            request("POST", "/api/rooms/r1/messages", "application/json", &big),
            (413, "too_large"),
        ),
        (
            "method not allowed",
            request("PUT", "/api/rooms", "application/json", b"{}"),
            (405, "bad_request"),
        ),
        (
            "method not allowed on a room",
            request("POST", "/api/rooms/r1", "application/json", b"{}"),
            (405, "bad_request"),
        ),
        (
            "unknown route under /api",
            request("GET", "/api/nothing/here", "application/json", b""),
            (404, "not_found"),
        ),
        (
            "bad JSON",
            request("POST", "/api/rooms", "application/json", b"{not json"),
            (400, "bad_request"),
        ),
        (
            "JSON of the wrong shape",
            request("POST", "/api/rooms", "application/json", b"[1,2]"),
            (400, "bad_request"),
        ),
        (
            "not JSON at all",
            request("POST", "/api/rooms", "text/plain", b"hello"),
            (400, "bad_request"),
        ),
        (
            "undecodable path",
            request("GET", "/api/rooms/%FF%FE", "application/json", b""),
            (400, "bad_request"),
        ),
        (
            "undecodable query",
            request("GET", "/api/rooms?kind=%FF", "application/json", b""),
            (400, "bad_request"),
        ),
        (
            "unknown room",
            request("GET", "/api/rooms/nope", "application/json", b""),
            (404, "not_found"),
        ),
        (
            "existing room",
            request(
                "POST",
                "/api/rooms",
                "application/json",
                br#"{"id":"r1","kind":"group"}"#,
            ),
            (409, "conflict"),
        ),
        (
            "WebSocket path without an upgrade",
            request("GET", "/ws", "application/json", b""),
            (400, "bad_request"),
        ),
    ];
    for (what, req, want) in cases {
        assert_json_error(what, &raw(s.addr, req).await, want);
    }
    // The 405 still says which methods the path has.
    let (_, head, _) = raw(
        s.addr,
        request("PUT", "/api/rooms", "application/json", b"{}"),
    )
    .await;
    assert!(head.contains("allow:"), "{head}");
    // Without the key: 401, JSON.
    let mut no_key = b"GET /api/rooms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    assert_json_error(
        "no key",
        &raw(s.addr, no_key.clone()).await,
        (401, "unauthorized"),
    );
    s.stop().await;
    // With the API off: 503, JSON.
    let s = Server::sqlite(|c| c.api_key = None).await;
    no_key.shrink_to_fit();
    assert_json_error("API off", &raw(s.addr, no_key).await, (503, "unavailable"));
    s.stop().await;
}

async fn create(addr: SocketAddr, id: &str, kind: &str) {
    let (status, body) = http(
        addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id": id, "kind": kind})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

fn ids(body: &Value) -> Vec<&str> {
    body["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("no rooms: {body}"))
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect()
}

async fn rooms_are_listed_filtered_and_paged(s: &Server) {
    let get = |path: String| async move { http(s.addr, "GET", &path, Some(API_KEY), None).await };
    let (status, body) = get("/api/rooms".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"rooms": [], "next_cursor": null}));
    for (id, kind) in [
        ("c-live", "live"),
        ("a-group", "group"),
        ("e-group", "group"),
        ("b-class", "class"),
        ("d-group", "group"),
    ] {
        create(s.addr, id, kind).await;
    }
    for room in ["a-group", "d-group", "c-live"] {
        let (status, body) = http(
            s.addr,
            "PUT",
            &format!("/api/rooms/{room}/members/ann"),
            Some(API_KEY),
            Some(json!({"role": "member"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // Everything, in id order, as full room objects.
    let (_, body) = get("/api/rooms".into()).await;
    assert_eq!(
        ids(&body),
        ["a-group", "b-class", "c-live", "d-group", "e-group"]
    );
    assert_eq!(body["next_cursor"], Value::Null);
    assert_eq!(body["rooms"][2]["kind"], "live");
    assert_eq!(body["rooms"][2]["qa"]["enabled"], true);
    // Pages of two, following next_cursor to the end.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/rooms?limit=2&cursor={c}"),
            None => "/api/rooms?limit=2".into(),
        };
        let (status, body) = get(path).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        seen.extend(ids(&body).into_iter().map(str::to_owned));
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["a-group", "b-class", "c-live", "d-group", "e-group"]);
    // A last page that is exactly full has no next cursor.
    let (_, body) = get("/api/rooms?limit=5".into()).await;
    assert_eq!((ids(&body).len(), &body["next_cursor"]), (5, &Value::Null));
    // Filters, alone and together, with paging.
    let (_, body) = get("/api/rooms?kind=group".into()).await;
    assert_eq!(ids(&body), ["a-group", "d-group", "e-group"]);
    let (_, body) = get("/api/rooms?member=ann".into()).await;
    assert_eq!(ids(&body), ["a-group", "c-live", "d-group"]);
    let (_, body) = get("/api/rooms?kind=group&member=ann&limit=1".into()).await;
    assert_eq!(ids(&body), ["a-group"]);
    assert_eq!(body["next_cursor"], "a-group");
    let (_, body) = get("/api/rooms?kind=group&member=ann&limit=1&cursor=a-group".into()).await;
    assert_eq!(ids(&body), ["d-group"]);
    let (_, body) = get("/api/rooms?kind=group&member=ann&limit=1&cursor=d-group".into()).await;
    assert_eq!((ids(&body).len(), &body["next_cursor"]), (0, &Value::Null));
    let (_, body) = get("/api/rooms?member=nobody".into()).await;
    assert_eq!(ids(&body), Vec::<&str>::new());
    // Refusals: 400 with a JSON error.
    for bad in [
        "kind=lecture",
        "limit=0",
        "limit=201",
        "limit=ten",
        "limit=-1",
        "cursor=bad%20cursor",
        "member=",
        "colour=blue",
    ] {
        let (status, body) = get(format!("/api/rooms?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "bad_request", "{bad}: {body}");
    }
    let (status, body) = get("/api/rooms?limit=200".into()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn rooms_are_listed_filtered_and_paged_on_sqlite() {
    let s = Server::sqlite(|_| {}).await;
    rooms_are_listed_filtered_and_paged(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn rooms_are_listed_filtered_and_paged_on_postgres() {
    let db = PgDb::create().await;
    let s = Server::start(base_config(db.url.clone())).await;
    rooms_are_listed_filtered_and_paged(&s).await;
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_openapi_document_lists_the_room_list() {
    let s = Server::sqlite(|_| {}).await;
    let (status, doc) = http(s.addr, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let get = &doc["paths"]["/api/rooms"]["get"];
    assert!(
        get.is_object(),
        "GET /api/rooms is not in the OpenAPI document"
    );
    let params: Vec<&str> = get["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["kind", "member", "limit", "cursor"]);
    s.stop().await;
}

#[tokio::test]
async fn a_request_to_ws_that_is_no_upgrade_is_told_what_is_missing() {
    let s = Server::sqlite(|_| {}).await;
    let cases = [
        ("no Upgrade", "Connection: Upgrade\r\n", "'websocket'"),
        (
            "old version",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "version 13",
        ),
        (
            "no key",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Key",
        ),
    ];
    for (what, headers, says) in cases {
        let req = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
        let answer = raw(s.addr, req.into_bytes()).await;
        assert_json_error(what, &answer, (400, "bad_request"));
        assert!(answer.2.contains(says), "{what}: {}", answer.2);
    }
    s.stop().await;
}
