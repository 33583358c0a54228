//! Breakout groups: opening with named groups and with `count` (balanced), `breakout_assigned`,
//! moving a student, broadcasting into every group, `help` -> `help_requested`, closing (group
//! rooms archived, `breakout_closed`), closing by `duration_s` across a restart, and the rights
//! of each command, on SQLite and PostgreSQL.

use crate::common::*;
use serde_json::{Value, json};
use studyhall::protocol::{PlatformRole, RoomId, RoomRole};

async fn host(s: &Server, room: &str) -> Client {
    let mut h = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
    )
    .await;
    h.join(room).await;
    h
}

async fn student(s: &Server, user: &str, room: &str) -> Client {
    let mut c = s.client(user).await;
    c.join(room).await;
    c
}

async fn room_json(s: &Server, id: &str) -> Value {
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

#[tokio::test]
async fn named_groups_move_broadcast_help_and_close() {
    let s = Server::sqlite(|_| {}).await;
    s.room("p", "open").await;
    let mut h = host(&s, "p").await;
    let mut ann = student(&s, "ann", "p").await;
    let mut bob = student(&s, "bob", "p").await;
    let open = json!({"type":"breakout_open","room":"p",
        "groups":[{"title":"Red","members":["ann"]},{"members":["bob"]}]});
    assert_eq!(ann.err(open.clone()).await, "forbidden");
    let ok = h.ok(open.clone()).await;
    assert_eq!(
        ok["groups"],
        json!([{"room":"p.g1","title":"Red","members":["ann"]},
               {"room":"p.g2","title":"Group 2","members":["bob"]}])
    );
    let ev = ann.until("breakout_assigned").await;
    assert_eq!(
        ev,
        json!({"type":"breakout_assigned","room":"p","group_room":"p.g1"})
    );
    assert_eq!(bob.until("breakout_assigned").await["group_room"], "p.g2");
    assert_eq!(h.err(open).await, "conflict");
    let g1 = room_json(&s, "p.g1").await;
    assert_eq!(
        (g1["visibility"].as_str(), g1["title"].as_str()),
        (Some("invite"), Some("Red"))
    );
    ann.join("p.g1").await;
    h.join("p.g1").await;
    assert_eq!(
        bob.err(json!({"type":"join","room":"p.g1"})).await,
        "forbidden"
    );
    bob.join("p.g2").await;

    // Rights: students get forbidden for every host/ta command.
    for cmd in [
        json!({"type":"breakout_move","room":"p","user":"bob","group_room":"p.g1"}),
        json!({"type":"breakout_broadcast","room":"p","text":"hi"}),
        json!({"type":"breakout_close","room":"p"}),
    ] {
        assert_eq!(ann.err(cmd).await, "forbidden");
    }
    let bad = json!({"type":"breakout_move","room":"p","user":"bob","group_room":"elsewhere"});
    assert_eq!(h.err(bad).await, "not_found");
    h.ok(json!({"type":"breakout_move","room":"p","user":"bob","group_room":"p.g1"}))
        .await;
    assert_eq!(bob.until("breakout_assigned").await["group_room"], "p.g1");
    bob.join("p.g1").await;
    assert_eq!(
        bob.err(json!({"type":"send","room":"p.g2","text":"x","client_msg_id":"c1"}))
            .await,
        "forbidden",
        "bob left his old group"
    );

    h.ok(json!({"type":"breakout_broadcast","room":"p","text":"Five minutes left"}))
        .await;
    let msg = ann.until("message").await;
    assert_eq!(
        (
            msg["room"].as_str(),
            msg["text"].as_str(),
            msg["from"]["role"].as_str()
        ),
        (Some("p.g1"), Some("Five minutes left"), Some("system"))
    );

    ann.ok(json!({"type":"help","room":"p.g1"})).await;
    let help = h.until("help_requested").await;
    assert_eq!(
        (
            help["room"].as_str(),
            help["group_room"].as_str(),
            help["user"]["id"].as_str()
        ),
        (Some("p"), Some("p.g1"), Some("ann"))
    );
    // From the parent room too: the server finds the student's group.
    bob.ok(json!({"type":"help","room":"p"})).await;
    let help = h.until("help_requested").await;
    assert_eq!(
        (help["group_room"].as_str(), help["user"]["id"].as_str()),
        (Some("p.g1"), Some("bob"))
    );

    h.ok(json!({"type":"breakout_close","room":"p"})).await;
    assert_eq!(
        ann.until("breakout_closed").await,
        json!({"type":"breakout_closed","room":"p"})
    );
    assert_eq!(bob.until("breakout_closed").await["room"], "p");
    assert_eq!(room_json(&s, "p.g1").await["archived"], true);
    assert_eq!(room_json(&s, "p.g2").await["archived"], true);
    assert_eq!(
        ann.err(json!({"type":"send","room":"p.g1","text":"x","client_msg_id":"c2"}))
            .await,
        "forbidden",
        "an archived group is read-only"
    );
    assert_eq!(
        h.err(json!({"type":"breakout_close","room":"p"})).await,
        "not_found"
    );
    assert_eq!(
        ann.err(json!({"type":"help","room":"p.g1"})).await,
        "conflict"
    );
    // A second breakout gets new rooms.
    let again = h
        .ok(json!({"type":"breakout_open","room":"p","groups":[{"members":["ann"]}]}))
        .await;
    assert_eq!(again["groups"][0]["room"], "p.b2.g1");
    s.stop().await;
}

async fn count_balanced(s: &Server) {
    s.room("q", "open").await;
    let mut h = host(s, "q").await;
    let mut students = Vec::new();
    for u in ["dan", "ann", "cat", "bob"] {
        students.push(student(s, u, "q").await);
    }
    let ok = h
        .ok(json!({"type":"breakout_open","room":"q","count":2,"assign":"balanced"}))
        .await;
    assert_eq!(
        ok["groups"],
        json!([{"room":"q.g1","title":"Group 1","members":["ann","cat"]},
               {"room":"q.g2","title":"Group 2","members":["bob","dan"]}])
    );
    for (c, want) in students.iter_mut().zip(["q.g2", "q.g1", "q.g1", "q.g2"]) {
        assert_eq!(c.until("breakout_assigned").await["group_room"], want);
        c.join(want).await;
    }
    let random = json!({"type":"breakout_open","room":"q","count":0});
    assert_eq!(h.err(random).await, "bad_request");
}

#[tokio::test]
async fn count_with_balanced_assignment_deals_the_online_students() {
    let s = Server::sqlite(|_| {}).await;
    count_balanced(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn count_with_balanced_assignment_on_postgres() {
    on_postgres(|_| {}, count_balanced).await;
}

#[tokio::test]
async fn duration_closes_breakouts_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let cfg = |url: &str| {
        let mut c = base_config(url.to_owned());
        c.class_clock_ms = 50;
        c
    };
    let s = Server::start(cfg(&url)).await;
    s.room("d", "open").await;
    let mut h = host(&s, "d").await;
    let mut ann = student(&s, "ann", "d").await;
    let ok = h
        .ok(json!({"type":"breakout_open","room":"d","count":1,"duration_s":1}))
        .await;
    assert!(ok["closes_at"].is_i64());
    assert_eq!(ann.until("breakout_closed").await["room"], "d");
    assert_eq!(room_json(&s, "d.g1").await["archived"], true);
    // Opened again, then the server stops before it is due: the next start closes it.
    h.ok(json!({"type":"breakout_open","room":"d","count":1,"duration_s":1}))
        .await;
    drop((h, ann));
    s.stop().await;
    let s = Server::start(cfg(&url)).await;
    let mut h = host(&s, "d").await;
    let parent = RoomId::from("d");
    // Joined first, looked second: either it closed already, or the event is on its way.
    if s.app
        .store
        .open_breakout_of(&parent)
        .await
        .unwrap()
        .is_some()
    {
        assert_eq!(h.until("breakout_closed").await["room"], "d");
    }
    assert!(
        s.app
            .store
            .open_breakout_of(&parent)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(room_json(&s, "d.b2.g1").await["archived"], true);
    s.stop().await;
}
