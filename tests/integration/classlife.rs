//! The class lifecycle rules and what a class room gives a late joiner, on SQLite and
//! PostgreSQL: the stage and A/V open only while live (`conflict` otherwise); the end of a
//! class (by hand or by the clock) lowers hands, clears the stage and closes open polls; an
//! ended class is read-only for members until `class_reopen`; the `join` reply's snapshot
//! (class, pinned question, open polls, open breakout, boards); the stage's talk-time cap; and
//! the breakout timer warning, once per session.

use crate::common::*;
use serde_json::{Value, json};
use studyhall::config::Config;
use studyhall::protocol::{PlatformRole, RoomId, RoomRole};

fn now_ms() -> i64 {
    studyhall::store::now_ms()
}

/// A server on SQLite or on a fresh PostgreSQL database, with `tweak` applied.
async fn server(pg: bool, tweak: impl FnOnce(&mut Config)) -> (Server, Option<PgDb>) {
    if !pg {
        return (Server::sqlite(tweak).await, None);
    }
    let db = PgDb::create().await;
    let mut cfg = base_config(db.url.clone());
    tweak(&mut cfg);
    (Server::start(cfg).await, Some(db))
}

async fn done(s: Server, db: Option<PgDb>) {
    s.stop().await;
    if let Some(db) = db {
        db.drop_db().await;
    }
}

async fn class_room(s: &Server, id: &str, extra: Value) -> Value {
    let mut body = json!({"id": id, "kind": "class", "title": id, "qa": {"enabled": true}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (st, resp) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(body)).await;
    assert_eq!(st, 201, "{resp}");
    resp
}

async fn with_role(s: &Server, user: &str, room: &str, role: RoomRole) -> Client {
    let mut c = Client::connect(s.addr, &token(user, PlatformRole::Tutor, &[(room, role)])).await;
    c.join(room).await;
    c
}

async fn student(s: &Server, user: &str, room: &str) -> Client {
    let mut c = s.client(user).await;
    c.join(room).await;
    c
}

/// The next `stage` event about `user` going `on` (or off), skipping others.
async fn stage_event(c: &mut Client, user: &str, on: bool) -> Value {
    loop {
        let ev = c.until("stage").await;
        if ev["user"]["id"] == user && ev["on"] == on {
            return ev;
        }
    }
}

async fn open_poll(h: &mut Client, room: &str) -> Value {
    let poll = h
        .ok(
            json!({"type":"poll_create","room":room,"kind":"poll","question":"Clear?",
            "options":["yes","no"]}),
        )
        .await["poll"]["id"]
        .clone();
    h.ok(json!({"type":"poll_open","room":room,"poll":poll}))
        .await;
    poll
}

async fn lifecycle(pg: bool) {
    let (s, db) = server(pg, |_| {}).await;
    let later = now_ms() + 3_600_000;
    class_room(&s, "c", json!({"starts_at": later})).await;
    let mut h = with_role(&s, "teacher", "c", RoomRole::Host).await;
    let mut t = with_role(&s, "ta", "c", RoomRole::Ta).await;
    let mut ann = student(&s, "ann", "c").await;
    let mut bob = student(&s, "bob", "c").await;

    // Scheduled: questions yes, stage and A/V no.
    ann.ok(json!({"type":"ask","room":"c","text":"Before we start?"}))
        .await;
    let r = h
        .request(json!({"type":"stage","room":"c","user":"ann","on":true}))
        .await;
    assert_eq!(r["code"], "conflict", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("not started"),
        "{r}"
    );
    assert_eq!(
        ann.err(json!({"type":"av_join","room":"c"})).await,
        "conflict"
    );

    h.ok(json!({"type":"class_start","room":"c"})).await;
    assert_eq!(ann.until("class_state").await["state"], "live");
    bob.ok(json!({"type":"raise_hand","room":"c"})).await;
    h.ok(json!({"type":"stage","room":"c","user":"ann","on":true}))
        .await;
    let poll = open_poll(&mut h, "c").await;
    h.ok(json!({"type":"av_join","room":"c"})).await;
    let joined = ann.ok(json!({"type":"av_join","room":"c"})).await;
    assert_eq!(
        joined["peers"].as_array().map(Vec::len),
        Some(1),
        "{joined}"
    );

    // The end: hands down, stage cleared, the open poll closed, each with its usual event;
    // then the A/V closes for everyone in it.
    let ok = h.ok(json!({"type":"class_end","room":"c"})).await;
    assert_eq!(ok["state"], "ended");
    assert_eq!(ann.until("class_state").await["state"], "ended");
    stage_event(&mut ann, "ann", false).await;
    for c in [&mut h, &mut ann] {
        let closed = c.until("av_closed").await;
        assert_eq!(
            (closed["room"].as_str(), closed["reason"].as_str()),
            (Some("c"), Some("class_ended"))
        );
    }
    let hand = t.until("hand").await;
    assert_eq!(
        (hand["user"]["id"].as_str(), &hand["raised"]),
        (Some("bob"), &json!(true))
    );
    let hand = t.until("hand").await;
    assert_eq!(
        (hand["user"]["id"].as_str(), &hand["raised"]),
        (Some("bob"), &json!(false))
    );
    loop {
        let ev = ann.until("poll").await;
        if ev["poll"]["id"] == poll && ev["poll"]["state"] == "closed" {
            break;
        }
    }
    let hands = h.ok(json!({"type":"hands","room":"c"})).await;
    assert_eq!(hands["hands"], json!([]));
    assert!(hands.get("stage").is_none(), "{hands}");

    // Read-only for members; reads still work; host/ta keep writing.
    for cmd in [
        json!({"type":"send","room":"c","text":"hi","client_msg_id":"m1"}),
        json!({"type":"ask","room":"c","text":"After?"}),
        json!({"type":"raise_hand","room":"c"}),
        json!({"type":"poll_answer","room":"c","poll":poll,"choices":[0]}),
    ] {
        let r = ann.request(cmd.clone()).await;
        assert_eq!(r["code"], "forbidden", "{cmd} got {r}");
        assert_eq!(r["message"], "the class has ended", "{r}");
    }
    ann.ok(json!({"type":"history","room":"c"})).await;
    ann.ok(json!({"type":"questions","room":"c"})).await;
    h.ok(json!({"type":"send","room":"c","text":"Thanks all","client_msg_id":"m2"}))
        .await;
    t.ok(json!({"type":"send","room":"c","text":"Notes are up","client_msg_id":"m3"}))
        .await;
    let r = h
        .request(json!({"type":"stage","room":"c","user":"ann","on":true}))
        .await;
    assert_eq!(r["code"], "conflict", "{r}");
    assert!(r["message"].as_str().unwrap().contains("ended"), "{r}");
    assert_eq!(
        ann.err(json!({"type":"av_join","room":"c"})).await,
        "conflict"
    );
    let late = s.client("cat").await.join("c").await;
    assert_eq!(late["class"]["state"], "ended", "{late}");

    // Reopened by the host only; then members write again.
    for c in [&mut ann, &mut t] {
        assert_eq!(
            c.err(json!({"type":"class_reopen","room":"c"})).await,
            "forbidden"
        );
    }
    let ok = h.ok(json!({"type":"class_reopen","room":"c"})).await;
    assert_eq!(ok["state"], "live");
    let ev = ann.until("class_state").await;
    assert_eq!(
        (ev["state"].as_str(), &ev["seq"]),
        (Some("live"), &ok["seq"])
    );
    assert_eq!(
        h.err(json!({"type":"class_reopen","room":"c"})).await,
        "conflict"
    );
    ann.ok(json!({"type":"send","room":"c","text":"one more thing","client_msg_id":"m4"}))
        .await;
    h.ok(json!({"type":"stage","room":"c","user":"ann","on":true}))
        .await;
    // Nobody was left behind in the A/V the end closed.
    let rejoined = h.ok(json!({"type":"av_join","room":"c"})).await;
    assert_eq!(rejoined["peers"], json!([]), "{rejoined}");
    let (st, room) = http(s.addr, "GET", "/api/rooms/c", Some(API_KEY), None).await;
    assert_eq!(st, 200);
    assert_eq!(
        (room["state"].as_str(), &room["ended_at"]),
        (Some("live"), &Value::Null)
    );
    done(s, db).await;
}

/// The class end closes the room's SFU too: every session in it hears `av_closed
/// {reason:"class_ended"}` and the SFU holds none of them after.
#[tokio::test]
async fn the_class_end_closes_the_rooms_sfu() {
    let (s, db) = server(false, |_| {}).await;
    class_room(&s, "c", json!({"av": {"mode": "sfu"}})).await;
    let mut h = with_role(&s, "teacher", "c", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "c").await;
    h.ok(json!({"type":"class_start","room":"c"})).await;
    for c in [&mut h, &mut ann] {
        let joined = c.ok(json!({"type":"av_join","room":"c"})).await;
        assert_eq!(joined["mode"], "sfu", "{joined}");
    }
    let sfu = s.app.sfu.as_ref().expect("a single node runs an SFU");
    assert_eq!(sfu.room_size("c").await, 2);
    h.ok(json!({"type":"class_end","room":"c"})).await;
    for c in [&mut h, &mut ann] {
        let closed = c.until("av_closed").await;
        assert_eq!(
            (closed["room"].as_str(), closed["reason"].as_str()),
            (Some("c"), Some("class_ended"))
        );
    }
    assert_eq!(sfu.room_size("c").await, 0);
    done(s, db).await;
}

#[tokio::test]
async fn an_ended_class_is_read_only_until_reopened() {
    lifecycle(false).await;
}

#[tokio::test]
async fn an_ended_class_is_read_only_until_reopened_on_postgres() {
    lifecycle(true).await;
}

async fn clock_end(pg: bool) {
    let (s, db) = server(pg, |c| c.class_clock_ms = 50).await;
    // Generous: the stage and the poll must be set up before the clock ends the class.
    class_room(&s, "k", json!({"ends_at": now_ms() + 3_000})).await;
    let mut h = with_role(&s, "teacher", "k", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "k").await;
    h.ok(json!({"type":"stage","room":"k","user":"ann","on":true}))
        .await;
    let poll = open_poll(&mut h, "k").await;
    assert_eq!(ann.until("class_state").await["state"], "ended");
    stage_event(&mut ann, "ann", false).await;
    loop {
        let ev = ann.until("poll").await;
        if ev["poll"]["id"] == poll && ev["poll"]["state"] == "closed" {
            break;
        }
    }
    let r = ann
        .request(json!({"type":"send","room":"k","text":"late","client_msg_id":"m5"}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    // Reopening clears an ends_at that has passed, else the clock would end it again.
    let ok = h.ok(json!({"type":"class_reopen","room":"k"})).await;
    assert_eq!(ok["state"], "live");
    let (_, room) = http(s.addr, "GET", "/api/rooms/k", Some(API_KEY), None).await;
    assert_eq!(
        (room["state"].as_str(), &room["ends_at"]),
        (Some("live"), &Value::Null)
    );
    ann.ok(json!({"type":"send","room":"k","text":"back","client_msg_id":"m6"}))
        .await;
    done(s, db).await;
}

#[tokio::test]
async fn the_clock_ends_a_class_with_its_stage_and_polls() {
    clock_end(false).await;
}

#[tokio::test]
async fn the_clock_ends_a_class_with_its_stage_and_polls_on_postgres() {
    clock_end(true).await;
}

async fn snapshot(pg: bool) {
    let (s, db) = server(pg, |_| {}).await;
    let starts = now_ms() - 1_000;
    class_room(&s, "j", json!({"starts_at": starts})).await;
    s.room("plain", "open").await;
    let mut h = with_role(&s, "teacher", "j", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "j").await;
    let _bob = student(&s, "bob", "j").await;

    // A plain room: the class part only.
    let r = s.client("zed").await.join("plain").await;
    assert_eq!(r["class"], json!({"state":"live"}), "{r}");
    for absent in ["pinned", "polls", "breakout", "boards"] {
        assert!(r.get(absent).is_none(), "{absent} in {r}");
    }

    let q = ann
        .ok(json!({"type":"ask","room":"j","text":"Pin me?","anonymous":true}))
        .await["id"]
        .clone();
    h.ok(json!({"type":"question_status","room":"j","question":q,"status":"pinned"}))
        .await;
    let poll = open_poll(&mut h, "j").await;
    let draft = h
        .ok(
            json!({"type":"poll_create","room":"j","kind":"poll","question":"Later",
            "options":["a","b"]}),
        )
        .await["poll"]["id"]
        .clone();
    h.ok(json!({"type":"breakout_open","room":"j","duration_s":600,
        "groups":[{"title":"Red","members":["ann"]},{"members":["bob"]}]}))
        .await;
    s.app
        .store
        .create_board(&RoomId::from("j"), "main")
        .await
        .unwrap();

    // A student's late join: everything as a member sees it, their own group named.
    let r = s.client("ann").await.join("j").await;
    assert_eq!(r["class"]["state"], "live", "{r}");
    assert_eq!(r["class"]["starts_at"], starts);
    assert!(r["class"]["started_at"].is_null() || r["class"]["started_at"].is_i64());
    assert_eq!(r["pinned"]["id"], q, "{r}");
    assert_eq!(
        r["pinned"]["author"],
        Value::Null,
        "anonymous to members: {r}"
    );
    let polls = r["polls"].as_array().unwrap();
    assert_eq!(polls.len(), 1, "{r}");
    assert_eq!(polls[0]["id"], poll);
    assert_ne!(polls[0]["id"], draft);
    assert_eq!(
        r["breakout"]["groups"],
        json!([{"room":"j.g1","title":"Red","members":["ann"]},
               {"room":"j.g2","title":"Group 2","members":["bob"]}])
    );
    assert_eq!(r["breakout"]["group_room"], "j.g1");
    assert!(r["breakout"]["closes_at"].is_i64());
    assert_eq!(r["boards"], json!(["main"]));

    // host/ta: the author of the anonymous question; no group of their own.
    let r = with_role(&s, "teacher", "j", RoomRole::Host)
        .await
        .join("j")
        .await;
    assert_eq!(r["pinned"]["author"]["id"], "ann", "{r}");
    assert!(r["breakout"].get("group_room").is_none(), "{r}");
    assert!(r["hands"].is_array());
    done(s, db).await;
}

#[tokio::test]
async fn a_late_joiner_gets_the_class_snapshot_in_the_join_reply() {
    snapshot(false).await;
}

#[tokio::test]
async fn a_late_joiner_gets_the_class_snapshot_on_postgres() {
    snapshot(true).await;
}

/// What a room holds for the join snapshot is cached with the room's policy once a join has
/// read it; each change that adds to it (a pinned question, an opened poll, a breakout, a
/// board) shows in the very next join, in a room that stays in use throughout.
async fn snapshot_in_use(pg: bool) {
    let (s, db) = server(pg, |_| {}).await;
    class_room(&s, "u", json!({"starts_at": now_ms() - 1_000})).await;
    let mut h = with_role(&s, "teacher", "u", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "u").await;
    let plain = s.client("bob").await.join("u").await;
    for absent in ["pinned", "polls", "breakout", "boards"] {
        assert!(plain.get(absent).is_none(), "{absent} in {plain}");
    }

    let q = ann
        .ok(json!({"type":"ask","room":"u","text":"Pin me?"}))
        .await["id"]
        .clone();
    assert!(
        s.client("bob")
            .await
            .join("u")
            .await
            .get("pinned")
            .is_none()
    );
    h.ok(json!({"type":"question_status","room":"u","question":q,"status":"pinned"}))
        .await;
    let r = s.client("bob").await.join("u").await;
    assert_eq!(r["pinned"]["id"], q, "{r}");
    assert!(r.get("polls").is_none(), "{r}");

    let poll = open_poll(&mut h, "u").await;
    let r = s.client("bob").await.join("u").await;
    assert_eq!(r["polls"][0]["id"], poll, "{r}");
    assert!(r.get("breakout").is_none(), "{r}");

    h.ok(json!({"type":"breakout_open","room":"u","groups":[{"members":["ann"]}]}))
        .await;
    let r = s.client("ann").await.join("u").await;
    assert_eq!(r["breakout"]["group_room"], "u.g1", "{r}");
    assert!(r.get("boards").is_none(), "{r}");

    h.ok(crate::boards::board(
        "u",
        &crate::boards::insert(&yrs::Doc::new(), 0, "hi"),
    ))
    .await;
    let r = s.client("bob").await.join("u").await;
    assert_eq!(r["boards"], json!(["main"]), "{r}");
    assert_eq!(r["pinned"]["id"], q, "{r}");

    // And back: what is closed or unpinned is gone from the next join.
    h.ok(json!({"type":"poll_close","room":"u","poll":poll}))
        .await;
    h.ok(json!({"type":"question_status","room":"u","question":q,"status":"answered"}))
        .await;
    h.ok(json!({"type":"breakout_close","room":"u"})).await;
    let r = s.client("bob").await.join("u").await;
    for absent in ["pinned", "polls", "breakout"] {
        assert!(r.get(absent).is_none(), "{absent} in {r}");
    }
    assert_eq!(r["boards"], json!(["main"]), "{r}");
    done(s, db).await;
}

#[tokio::test]
async fn a_join_into_a_room_in_use_sees_each_change_to_its_snapshot() {
    snapshot_in_use(false).await;
}

#[tokio::test]
async fn a_join_into_a_room_in_use_sees_each_change_to_its_snapshot_on_postgres() {
    snapshot_in_use(true).await;
}

async fn talk_cap(pg: bool) {
    let (s, db) = server(pg, |c| c.stage_clock_ms = 50).await;
    for bad in [json!({"talk_cap_s": 0}), json!({"talk_cap_s": 90_000})] {
        let (st, _) = http(
            s.addr,
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id":"bad","kind":"class","stage": bad})),
        )
        .await;
        assert_eq!(st, 400);
    }
    let made = class_room(&s, "t", json!({"stage": {"talk_cap_s": 1}})).await;
    assert_eq!(made["stage"], json!({"talk_cap_s": 1, "auto_down": false}));
    let mut h = with_role(&s, "teacher", "t", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "t").await;
    let before = now_ms();
    h.ok(json!({"type":"stage","room":"t","user":"ann","on":true}))
        .await;
    let hands = h.ok(json!({"type":"hands","room":"t"})).await;
    assert_eq!(hands["stage"][0]["user"]["id"], "ann", "{hands}");
    let since = hands["stage"][0]["since"].as_i64().unwrap();
    assert!(since >= before && since <= now_ms(), "{hands}");
    assert_eq!(
        ann.err(json!({"type":"hands","room":"t"})).await,
        "forbidden"
    );

    // The cap is enforced once auto_down is on (PATCH, stored).
    let (st, room) = http(
        s.addr,
        "PATCH",
        "/api/rooms/t",
        Some(API_KEY),
        Some(json!({"stage": {"talk_cap_s": 1, "auto_down": true}})),
    )
    .await;
    assert_eq!(st, 200, "{room}");
    assert_eq!(room["stage"]["auto_down"], true);
    let (_, room) = http(s.addr, "GET", "/api/rooms/t", Some(API_KEY), None).await;
    assert_eq!(room["stage"], json!({"talk_cap_s": 1, "auto_down": true}));
    let ev = stage_event(&mut ann, "ann", false).await;
    assert_eq!(ev["room"], "t");
    assert!(now_ms() - since >= 1_000);
    let hands = h.ok(json!({"type":"hands","room":"t"})).await;
    assert!(hands.get("stage").is_none(), "{hands}");
    done(s, db).await;
}

#[tokio::test]
async fn the_talk_time_cap_brings_a_speaker_down() {
    talk_cap(false).await;
}

#[tokio::test]
async fn the_talk_time_cap_brings_a_speaker_down_on_postgres() {
    talk_cap(true).await;
}

async fn warning(pg: bool) {
    let (s, db) = server(pg, |c| {
        c.class_clock_ms = 50;
        c.breakout_warning_s = 60;
    })
    .await;
    s.room("w", "open").await;
    let mut h = with_role(&s, "teacher", "w", RoomRole::Host).await;
    let mut ann = student(&s, "ann", "w").await;
    let ok = h
        .ok(json!({"type":"breakout_open","room":"w","duration_s":2,
            "groups":[{"members":["ann"]}]}))
        .await;
    let closes_at = ok["closes_at"].as_i64().unwrap();
    // ann in the parent and in her group: one warning for her session, one for the host's.
    ann.join("w.g1").await;
    let mut warnings = 0;
    loop {
        let f = ann.next().await;
        match f["type"].as_str() {
            Some("breakout_warning") => {
                assert_eq!(
                    f,
                    json!({"type":"breakout_warning","room":"w","closes_at":closes_at})
                );
                warnings += 1;
            }
            Some("breakout_closed") => break,
            _ => {}
        }
    }
    assert_eq!(warnings, 1);
    let mut warnings = 0;
    loop {
        let f = h.next().await;
        match f["type"].as_str() {
            Some("breakout_warning") => warnings += 1,
            Some("breakout_closed") => break,
            _ => {}
        }
    }
    assert_eq!(warnings, 1);
    done(s, db).await;
}

#[tokio::test]
async fn breakout_groups_are_warned_once_before_they_close() {
    warning(false).await;
}

#[tokio::test]
async fn breakout_groups_are_warned_once_on_postgres() {
    warning(true).await;
}
