//! The class lifecycle: `class_start`/`class_end` by the host (rights, conflicts; an ended
//! class refuses members' writes), the `class_state` events and the room object's `state`, the
//! clock at `starts_at`/`ends_at`, and the summary (attendance, questions, polls, time on
//! stage), on SQLite and PostgreSQL.

use crate::common::*;
use serde_json::{Value, json};
use studyhall::protocol::{PlatformRole, RoomRole};

fn now_ms() -> i64 {
    studyhall::store::now_ms()
}

async fn class_room(s: &Server, id: &str, extra: Value) -> Value {
    let mut body = json!({"id": id, "kind": "class", "title": id});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (st, resp) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(body)).await;
    assert_eq!(st, 201, "{resp}");
    resp
}

async fn get_room(s: &Server, id: &str) -> Value {
    let (st, room) = http(
        s.addr,
        "GET",
        &format!("/api/rooms/{id}"),
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 200, "{room}");
    room
}

async fn host(s: &Server, room: &str) -> Client {
    let mut h = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
    )
    .await;
    h.join(room).await;
    h
}

async fn start_and_end(s: &Server) {
    let later = now_ms() + 3_600_000;
    let made = class_room(
        s,
        "c",
        json!({"starts_at": later, "ends_at": later + 3_600_000}),
    )
    .await;
    assert_eq!(made["state"], "scheduled");
    assert_eq!(made["ends_at"], later + 3_600_000);
    let mut h = host(s, "c").await;
    let mut a = s.client("ann").await;
    a.join("c").await;
    let mut t = Client::connect(
        s.addr,
        &token("ta", PlatformRole::Student, &[("c", RoomRole::Ta)]),
    )
    .await;
    t.join("c").await;
    assert_eq!(
        a.err(json!({"type":"class_start","room":"c"})).await,
        "forbidden"
    );
    assert_eq!(
        t.err(json!({"type":"class_start","room":"c"})).await,
        "forbidden"
    );
    let ok = h.ok(json!({"type":"class_start","room":"c"})).await;
    assert_eq!(ok["state"], "live");
    let ev = a.until("class_state").await;
    assert_eq!(
        (ev["state"].as_str(), ev["seq"].clone()),
        (Some("live"), ok["seq"].clone())
    );
    let room = get_room(s, "c").await;
    assert_eq!(room["state"], "live");
    assert!(room["started_at"].is_i64());
    assert_eq!(
        h.err(json!({"type":"class_start","room":"c"})).await,
        "conflict"
    );
    h.ok(json!({"type":"class_end","room":"c"})).await;
    assert_eq!(a.until("class_state").await["state"], "ended");
    let room = get_room(s, "c").await;
    assert_eq!(room["state"], "ended");
    assert!(room["ended_at"].is_i64());
    assert_eq!(
        h.err(json!({"type":"class_end","room":"c"})).await,
        "conflict"
    );
    assert_eq!(
        h.err(json!({"type":"class_start","room":"c"})).await,
        "conflict"
    );
    // An ended class is read-only for members until the host reopens it (more in classlife.rs).
    assert_eq!(
        a.err(json!({"type":"send","room":"c","text":"still here?","client_msg_id":"m1"}))
            .await,
        "forbidden"
    );
    t.ok(json!({"type":"send","room":"c","text":"notes are up","client_msg_id":"m2"}))
        .await;
}

#[tokio::test]
async fn the_host_starts_and_ends_a_class() {
    on_sqlite(|_| {}, start_and_end).await;
}

#[tokio::test]
async fn the_host_starts_and_ends_a_class_on_postgres() {
    on_postgres(|_| {}, start_and_end).await;
}

#[tokio::test]
async fn the_clock_starts_and_ends_a_class() {
    let s = Server::sqlite(|c| c.class_clock_ms = 50).await;
    let start = now_ms() + 400;
    class_room(&s, "k", json!({"starts_at": start, "ends_at": start + 400})).await;
    let mut a = s.client("ann").await;
    a.join("k").await;
    assert_eq!(a.until("class_state").await["state"], "live");
    assert_eq!(a.until("class_state").await["state"], "ended");
    let room = get_room(&s, "k").await;
    assert_eq!(room["state"], "ended");
    // PATCH takes ends_at; a room without a schedule is live from the start.
    class_room(&s, "k2", json!({})).await;
    let (st, room) = http(
        s.addr,
        "PATCH",
        "/api/rooms/k2",
        Some(API_KEY),
        Some(json!({"ends_at": now_ms() + 3_600_000})),
    )
    .await;
    assert_eq!(st, 200, "{room}");
    assert_eq!(room["state"], "live");
    assert!(room["ends_at"].is_i64());
    let (st, _) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id":"bad","kind":"class","starts_at": 10, "ends_at": 5})),
    )
    .await;
    assert_eq!(st, 400);
    s.stop().await;
}

#[tokio::test]
async fn the_summary_tells_how_the_class_went() {
    let s = Server::sqlite(|_| {}).await;
    class_room(&s, "sum", json!({"qa": {"enabled": true}})).await;
    let mut h = host(&s, "sum").await;
    h.ok(json!({"type":"class_start","room":"sum"})).await;
    let mut a = s.client("ann").await;
    a.join("sum").await;
    let mut b = s.client("bob").await;
    b.join("sum").await;
    let q = a.ok(json!({"type":"ask","room":"sum","text":"Why?"})).await["id"].clone();
    b.ok(json!({"type":"ask","room":"sum","text":"How?"})).await;
    h.ok(json!({"type":"answer","room":"sum","question":q,"text":"Because."}))
        .await;
    let poll = h
        .ok(
            json!({"type":"poll_create","room":"sum","kind":"poll","question":"Clear?",
            "options":["yes","no"]}),
        )
        .await["poll"]["id"]
        .clone();
    h.ok(json!({"type":"poll_open","room":"sum","poll":poll}))
        .await;
    a.ok(json!({"type":"poll_answer","room":"sum","poll":poll,"choices":[0]}))
        .await;
    h.ok(json!({"type":"poll_close","room":"sum","poll":poll}))
        .await;
    h.ok(json!({"type":"stage","room":"sum","user":"ann","on":true}))
        .await;
    h.ok(json!({"type":"stage","room":"sum","user":"ann","on":false}))
        .await;
    b.ok(json!({"type":"leave","room":"sum"})).await;
    h.ok(json!({"type":"class_end","room":"sum"})).await;
    let (st, sum) = http(s.addr, "GET", "/api/rooms/sum/summary", Some(API_KEY), None).await;
    assert_eq!(st, 200, "{sum}");
    assert_eq!(sum["state"], "ended");
    assert!(sum["started_at"].is_i64() && sum["ended_at"].is_i64());
    let users: Vec<&str> = sum["attendance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["ann", "bob", "teacher"]);
    let bob = &sum["attendance"][1];
    assert!(bob["last_leave"].is_i64(), "{bob}");
    assert!(sum["attendance"][0]["last_leave"].is_null());
    assert_eq!(bob["sessions"], 1);
    assert_eq!(sum["questions"], json!({"asked": 2, "answered": 1}));
    assert_eq!(sum["polls"][0]["results"]["counts"], json!([1, 0]));
    assert_eq!(sum["stage"][0]["user"], "ann");
    assert!(sum["stage"][0]["on_stage_ms"].as_i64().unwrap() >= 0);
    let (st, _) = http(
        s.addr,
        "GET",
        "/api/rooms/nope/summary",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = http(s.addr, "GET", "/api/rooms/sum/summary", None, None).await;
    assert_eq!(st, 401);
    s.stop().await;
}
