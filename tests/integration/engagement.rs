//! Engagement and room health through the real server and real WebSocket clients: check-in
//! streaks, points with caps and reversals, each default badge rule, leaderboards and ties,
//! profile rights, and the teacher statistics on a synthetic room with known answers on
//! SQLite and PostgreSQL (the PostgreSQL half fails, never skips, without a server).

use crate::common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use studyhall::auth::{Claims, Tokens};
use studyhall::protocol::{PlatformRole, RoomRole};

fn tz_token(user: &str, tz: Option<&str>, grants: &[(&str, RoomRole)]) -> String {
    let now = studyhall::auth::now_s();
    let rooms: HashMap<String, RoomRole> =
        grants.iter().map(|(r, g)| ((*r).to_owned(), *g)).collect();
    Tokens::new(SECRET.as_bytes())
        .sign_claims(&Claims {
            sub: user.into(),
            name: Some(user.to_uppercase()),
            role: PlatformRole::Student,
            exp: now + 600,
            iat: now,
            nbf: None,
            rooms,
            tz: tz.map(str::to_owned),
        })
        .unwrap()
}

async fn make_room(s: &Server, body: Value) {
    let (status, resp) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(body)).await;
    assert_eq!(status, 201, "create room: {resp}");
}

async fn put_member(s: &Server, room: &str, user: &str, role: &str) {
    let (status, resp) = http(
        s.addr,
        "PUT",
        &format!("/api/rooms/{room}/members/{user}"),
        Some(API_KEY),
        Some(json!({"role": role})),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
}

async fn points_in(c: &mut Client, room: &str) -> i64 {
    let p = c.ok(json!({"type": "profile", "room": room})).await;
    p["rooms"][0]["points"].as_i64().unwrap()
}

async fn send(c: &mut Client, room: &str, text: &str, cid: &str) -> Value {
    c.ok(json!({"type": "send", "room": room, "text": text, "client_msg_id": cid}))
        .await
}

/// Today's local day in `tz` (read twice around `f` so a test crossing midnight still agrees).
fn today_in(tz: &str) -> String {
    let z = studyhall::engagement::zone(tz).unwrap();
    studyhall::engagement::local_day(studyhall::store::now_ms(), &z).to_string()
}

#[tokio::test]
async fn checkin_once_per_local_day_in_the_users_zone() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "engagement": {"timezone": "Asia/Tokyo"}}),
    )
    .await;
    make_room(
        &s,
        json!({"id": "inv", "kind": "group", "visibility": "invite"}),
    )
    .await;

    // A zone from the token claim.
    let mut kiri =
        Client::connect(s.addr, &tz_token("kiri", Some("Pacific/Kiritimati"), &[])).await;
    let before = today_in("Pacific/Kiritimati");
    let r = kiri.ok(json!({"type": "checkin", "room": "g"})).await;
    let after = today_in("Pacific/Kiritimati");
    assert!(r["day"] == before || r["day"] == after, "{r}");
    assert_eq!(r["room"], "g");
    assert_eq!(r["tz"], "Pacific/Kiritimati");
    assert_eq!(r["already"], false);
    assert_eq!(r["streak"], json!({"current": 1, "longest": 1}));
    assert_eq!(r["points"], 3, "the default check-in points");
    // The same local day again is not an error: already, same streak, no points.
    let again = kiri.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(again["already"], true);
    assert_eq!(again["day"], r["day"]);
    assert_eq!(again["streak"], json!({"current": 1, "longest": 1}));
    assert_eq!(again["points"], 0);
    assert_eq!(points_in(&mut kiri, "g").await, 3);

    // No claim (or an unknown zone, which is ignored): the room's zone.
    let mut plain = Client::connect(s.addr, &tz_token("plain", Some("Mars/Olympus"), &[])).await;
    let r = plain.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(r["tz"], "Asia/Tokyo");
    let mut utc = s.client("utc").await;
    make_room(&s, json!({"id": "u", "kind": "group"})).await;
    let r = utc.ok(json!({"type": "checkin", "room": "u"})).await;
    assert_eq!(r["tz"], "UTC", "rooms default to UTC");

    // Viewers do not check in; nor does anyone in a room they cannot read.
    let mut viewer = Client::connect(
        s.addr,
        &token("vic", PlatformRole::Student, &[("inv", RoomRole::Viewer)]),
    )
    .await;
    assert_eq!(
        viewer.err(json!({"type": "checkin", "room": "inv"})).await,
        "forbidden"
    );
    assert_eq!(
        utc.err(json!({"type": "checkin", "room": "inv"})).await,
        "forbidden"
    );
    assert_eq!(
        utc.err(json!({"type": "checkin", "room": "nope"})).await,
        "not_found"
    );
    // A bad room timezone is refused by the API.
    let (status, _) = http(
        s.addr,
        "PATCH",
        "/api/rooms/g",
        Some(API_KEY),
        Some(json!({"engagement": {"timezone": "Nowhere/Land"}})),
    )
    .await;
    assert_eq!(status, 400);
    s.stop().await;
}

#[tokio::test]
async fn points_caps_reversals_and_no_double_count_on_resend() {
    let s = Server::sqlite(|c| {
        c.engagement.daily_caps.message = 3;
    })
    .await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true, "peer_answers": true}}),
    )
    .await;
    put_member(&s, "g", "host", "host").await;
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let mut host = s.client("host").await;
    for c in [&mut alice, &mut bob, &mut host] {
        c.join("g").await;
    }
    // Five messages, capped at three a day; a resend of the same client_msg_id counts once.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(send(&mut alice, "g", &format!("m{i}"), &format!("c{i}")).await["id"].clone());
    }
    let dup = send(&mut alice, "g", "m0", "c0").await;
    assert_eq!(dup["id"], ids[0]);
    assert_eq!(
        points_in(&mut alice, "g").await,
        3,
        "message cap of 3 a day"
    );

    // A question: 5 points.
    alice
        .ok(json!({"type": "ask", "room": "g", "text": "why?"}))
        .await;
    assert_eq!(points_in(&mut alice, "g").await, 8);

    // Reactions: 2 to the author from someone else, none for reacting to oneself, reversed
    // on unreact.
    let react = |id: &Value, e: &str, add: bool| json!({"type": if add {"react"} else {"unreact"}, "room": "g", "id": id, "emoji": e});
    bob.ok(react(&ids[0], "👍", true)).await;
    assert_eq!(points_in(&mut alice, "g").await, 10);
    alice.ok(react(&ids[0], "❤", true)).await;
    assert_eq!(
        points_in(&mut alice, "g").await,
        10,
        "no points for reacting to oneself"
    );
    bob.ok(react(&ids[0], "👍", false)).await;
    assert_eq!(points_in(&mut alice, "g").await, 8, "unreact reverses");
    assert_eq!(points_in(&mut bob, "g").await, 0, "reacting earns nothing");

    // Moderation delete reverses the message's points and its reactions' points.
    bob.ok(react(&ids[1], "🎉", true)).await;
    assert_eq!(points_in(&mut alice, "g").await, 10);
    host.ok(json!({"type": "delete", "room": "g", "id": ids[1]}))
        .await;
    assert_eq!(
        points_in(&mut alice, "g").await,
        7,
        "1 for the message, 2 for the reaction"
    );
    // Deleting one's own message keeps its points (the cap already counted it).
    alice
        .ok(json!({"type": "delete", "room": "g", "id": ids[2]}))
        .await;
    assert_eq!(points_in(&mut alice, "g").await, 7);
    // Deleting again changes nothing.
    host.ok(json!({"type": "delete", "room": "g", "id": ids[1]}))
        .await;
    assert_eq!(points_in(&mut alice, "g").await, 7);

    // Answers: 10 once per question per answerer; helpful: 15 to the answer's author when the
    // asker (or host/ta) marks it, reversed when unmarked; nobody else may mark.
    let q = bob
        .ok(json!({"type": "ask", "room": "g", "text": "how?"}))
        .await["id"]
        .clone();
    alice
        .ok(json!({"type": "answer", "room": "g", "question": q, "text": "like this"}))
        .await;
    alice
        .ok(json!({"type": "answer", "room": "g", "question": q, "text": "or this"}))
        .await;
    assert_eq!(points_in(&mut alice, "g").await, 17);
    assert_eq!(
        alice
            .err(json!({"type": "helpful", "room": "g", "question": q}))
            .await,
        "forbidden",
        "only host/ta or the asker"
    );
    let h = bob
        .ok(json!({"type": "helpful", "room": "g", "question": q}))
        .await;
    assert!(h["seq"].is_i64(), "{h}");
    let upd = alice.until("question_updated").await;
    // The earlier answer events come first; find the helpful one.
    let mut upd = upd;
    while upd["change"] != "helpful" {
        upd = alice.until("question_updated").await;
    }
    assert_eq!(upd["answers"][0]["helpful"], true);
    assert_eq!(points_in(&mut alice, "g").await, 32);
    let again = bob
        .ok(json!({"type": "helpful", "room": "g", "question": q}))
        .await;
    assert_eq!(again["seq"], Value::Null, "marking twice changes nothing");
    bob.ok(json!({"type": "helpful", "room": "g", "question": q, "on": false}))
        .await;
    assert_eq!(points_in(&mut alice, "g").await, 17);
    assert_eq!(
        bob.err(json!({"type": "helpful", "room": "g", "question": q, "answer": "a-none"}))
            .await,
        "not_found"
    );

    // A system announcement earns nobody anything.
    let (status, _) = http(
        s.addr,
        "POST",
        "/api/rooms/g/messages",
        Some(API_KEY),
        Some(json!({"text": "hello all"})),
    )
    .await;
    assert_eq!(status, 201);
    let lb = alice
        .ok(json!({"type": "leaderboard", "room": "g", "period": "all"}))
        .await;
    let users: Vec<&str> = lb["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["user"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["alice", "bob"]);
    assert_eq!(lb["entries"][1]["points"], 5);
    s.stop().await;
}

/// Waits for a `badge` frame, skipping everything else.
async fn badge(c: &mut Client) -> Value {
    c.until("badge").await
}

#[tokio::test]
async fn each_default_badge_rule_with_real_events() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true, "peer_answers": true},
               "engagement": {"announce_badges": true}}),
    )
    .await;
    let mut ann = s.client("ann").await;
    let mut ben = s.client("ben").await;
    ann.join("g").await;
    ben.join("g").await;

    // first_question, announced in the room by the system sender.
    let q = ann
        .ok(json!({"type": "ask", "room": "g", "text": "q0"}))
        .await["id"]
        .clone();
    let b = badge(&mut ann).await;
    assert_eq!(b["badge"]["id"], "first_question");
    assert_eq!(b["badge"]["name"], "First question");
    assert_eq!(b["user"], json!({"id": "ann", "name": "ANN"}));
    assert_eq!(b["room"], "g");
    assert!(b["ts"].is_i64());
    let m = ben.until("message").await;
    assert_eq!(m["from"]["role"], "system");
    assert!(
        m["text"].as_str().unwrap().contains("First question"),
        "{m}"
    );
    // Earned once: a second question earns no badge (checked below by the profile).
    ann.ok(json!({"type": "ask", "room": "g", "text": "q1"}))
        .await;

    // first_answer.
    ben.ok(json!({"type": "answer", "room": "g", "question": q, "text": "a"}))
        .await;
    assert_eq!(badge(&mut ben).await["badge"]["id"], "first_answer");

    // helpful_10: ten of ben's answers marked helpful by the asker.
    for i in 0..10 {
        let q = ann
            .ok(json!({"type": "ask", "room": "g", "text": format!("hq{i}")}))
            .await["id"]
            .clone();
        ben.ok(json!({"type": "answer", "room": "g", "question": q, "text": "a"}))
            .await;
        ann.ok(json!({"type": "helpful", "room": "g", "question": q}))
            .await;
    }
    assert_eq!(badge(&mut ben).await["badge"]["id"], "helpful_10");

    // likes_100: 100 reactions from someone else (two messages, 50 emoji each).
    let m1 = send(&mut ann, "g", "like me", "l1").await["id"].clone();
    let m2 = send(&mut ann, "g", "me too", "l2").await["id"].clone();
    for (i, id) in (0..100).map(|i| (i, if i < 50 { &m1 } else { &m2 })) {
        let rid = ben
            .fire(json!({"type": "react", "room": "g", "id": id, "emoji": format!("e{i}")}))
            .await;
        let r = ben.reply(rid).await;
        assert_eq!(r["type"], "ok", "{r}");
    }
    assert_eq!(badge(&mut ann).await["badge"]["id"], "likes_100");

    let p = ann.ok(json!({"type": "profile", "room": "g"})).await;
    let ids: Vec<&str> = p["rooms"][0]["badges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["first_question", "likes_100"]);
    assert!(p["rooms"][0]["badges"][0]["earned_ts"].is_i64());

    // streak_7 and streak_30: the stored streak stands at 6 (and 29) with a check-in
    // yesterday; today's check-in makes it 7 (30) and earns the badge.
    let url = format!(
        "sqlite://{}",
        s.dir.as_ref().unwrap().path().join("t.db").display()
    );
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let yesterday = {
        let z = studyhall::engagement::zone("UTC").unwrap();
        let today = studyhall::engagement::local_day(studyhall::store::now_ms(), &z);
        today.yesterday().unwrap().to_string()
    };
    for (user, streak) in [("ann", 6i64), ("ben", 29)] {
        sqlx::query(
            "UPDATE engagement_members SET streak_current = $1, streak_longest = $1, \
             last_checkin_day = $2 WHERE room_id = 'g' AND user_id = $3",
        )
        .bind(streak)
        .bind(yesterday.as_str())
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    let r = ann.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(r["streak"], json!({"current": 7, "longest": 7}));
    assert_eq!(badge(&mut ann).await["badge"]["id"], "streak_7");
    let r = ben.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(r["streak"], json!({"current": 30, "longest": 30}));
    assert_eq!(badge(&mut ben).await["badge"]["id"], "streak_30");
    let p = ben.ok(json!({"type": "profile"})).await;
    let ids: Vec<&str> = p["rooms"][0]["badges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["first_answer", "helpful_10", "streak_30"]);
    assert_eq!(p["rooms"][0]["streak"]["current"], 30);
    s.stop().await;
}

#[tokio::test]
async fn configured_badge_thresholds_and_points_rules() {
    // A lowered threshold for a configured rule on a metric the defaults do not use.
    let s = Server::sqlite(|c| {
        c.engagement.badges = vec![studyhall::engagement::BadgeRule {
            id: "chatty".into(),
            name: "Chatty".into(),
            description: "3 messages".into(),
            metric: studyhall::engagement::Metric::Messages,
            threshold: 3,
        }];
        c.engagement.levels = vec![0, 2, 4];
    })
    .await;
    make_room(&s, json!({"id": "g", "kind": "group"})).await;
    let mut a = s.client("a").await;
    a.join("g").await;
    for i in 0..2 {
        send(&mut a, "g", "x", &format!("c{i}")).await;
    }
    let p = a.ok(json!({"type": "profile", "room": "g"})).await;
    assert_eq!(p["rooms"][0]["level"], 2);
    assert_eq!(p["rooms"][0]["next_level_points"], 4);
    send(&mut a, "g", "x", "c2").await;
    let b = a.until("badge").await;
    assert_eq!(
        b["badge"],
        json!({"id": "chatty", "name": "Chatty", "description": "3 messages"})
    );
    for i in 3..6 {
        send(&mut a, "g", "x", &format!("c{i}")).await;
    }
    let p = a.ok(json!({"type": "profile", "room": "g"})).await;
    assert_eq!(p["rooms"][0]["level"], 3);
    assert_eq!(p["rooms"][0]["next_level_points"], Value::Null);
    assert_eq!(p["rooms"][0]["badges"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn leaderboard_order_ties_periods_and_http() {
    let s = Server::sqlite(|_| {}).await;
    make_room(&s, json!({"id": "g", "kind": "group"})).await;
    // d 1, c 5, b 5, a 10 points: ranks a 1, b 2, c 2 (b before c by id), d 4.
    let mut n = 0;
    for (user, msgs) in [("d", 1), ("c", 5), ("b", 5), ("a", 10)] {
        let mut c = s.client(user).await;
        c.join("g").await;
        for _ in 0..msgs {
            n += 1;
            send(&mut c, "g", "hi", &format!("c{n}")).await;
        }
    }
    let mut v = s.client("viewer").await;
    for period in ["week", "month", "all"] {
        let lb = v
            .ok(json!({"type": "leaderboard", "room": "g", "period": period}))
            .await;
        assert_eq!(lb["room"], "g");
        assert_eq!(lb["period"], period);
        let got: Vec<(i64, &str, i64)> = lb["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["rank"].as_i64().unwrap(),
                    e["user"]["id"].as_str().unwrap(),
                    e["points"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(1, "a", 10), (2, "b", 5), (2, "c", 5), (4, "d", 1)],
            "{period}"
        );
        assert_eq!(lb["entries"][0]["user"]["name"], "A");
        assert_eq!(lb["entries"][0]["level"], 1);
        if period == "all" {
            assert_eq!(lb["since"], Value::Null);
        } else {
            assert!(lb["since"].as_i64().unwrap() <= studyhall::store::now_ms());
        }
    }
    let lb = v
        .ok(json!({"type": "leaderboard", "room": "g", "limit": 2}))
        .await;
    assert_eq!(lb["period"], "week", "the default period");
    assert_eq!(lb["entries"].as_array().unwrap().len(), 2);
    for bad in [
        json!({"type": "leaderboard", "room": "g", "period": "year"}),
        json!({"type": "leaderboard", "room": "g", "limit": 0}),
        json!({"type": "leaderboard", "room": "g", "limit": 101}),
    ] {
        assert_eq!(v.err(bad).await, "bad_request");
    }
    let (status, body) = http(
        s.addr,
        "GET",
        "/api/rooms/g/leaderboard?period=all&limit=3",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["entries"].as_array().unwrap().len(), 3);
    assert_eq!(
        body["entries"][2],
        json!({"rank": 2, "user": {"id": "c", "name": "C"}, "points": 5, "level": 1})
    );
    let (status, _) = http(
        s.addr,
        "GET",
        "/api/rooms/g/leaderboard?period=x",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(s.addr, "GET", "/api/rooms/g/leaderboard", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        s.addr,
        "GET",
        "/api/rooms/zz/leaderboard",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Points from before this week count for `all` only (and for `month` when the day is in
    // this month): a day row three days before the week began.
    let utc = studyhall::engagement::zone("UTC").unwrap();
    let now = studyhall::store::now_ms();
    let week = studyhall::engagement::week_start(now, &utc);
    let old_day = week - 3 * 86_400_000;
    let url = format!(
        "sqlite://{}",
        s.dir.as_ref().unwrap().path().join("t.db").display()
    );
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO engagement_daily (room_id, day_start, user_id, messages, points, first_ts, \
         last_ts) VALUES ('g', $1, 'e', 50, 50, $1, $1)",
    )
    .bind(old_day)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO engagement_members (room_id, user_id, name, messages, points) \
         VALUES ('g', 'e', 'Eve', 50, 50)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let top = |lb: &Value| lb["entries"][0]["user"]["id"].as_str().unwrap().to_owned();
    let wk = v.ok(json!({"type": "leaderboard", "room": "g"})).await;
    assert_eq!(wk["since"], week);
    assert_eq!(top(&wk), "a");
    assert_eq!(wk["entries"].as_array().unwrap().len(), 4);
    let all = v
        .ok(json!({"type": "leaderboard", "room": "g", "period": "all"}))
        .await;
    assert_eq!(
        all["entries"][0],
        json!({"rank": 1, "user": {"id": "e", "name": "Eve"}, "points": 50, "level": 2})
    );
    let month = v
        .ok(json!({"type": "leaderboard", "room": "g", "period": "month"}))
        .await;
    let month_start = studyhall::engagement::month_start(now, &utc);
    assert_eq!(month["since"], month_start);
    assert_eq!(top(&month) == "e", old_day >= month_start);

    // Periods start in the room's zone.
    make_room(
        &s,
        json!({"id": "tokyo", "kind": "group", "engagement": {"timezone": "Asia/Tokyo"}}),
    )
    .await;
    let lb = v.ok(json!({"type": "leaderboard", "room": "tokyo"})).await;
    let tokyo = studyhall::engagement::zone("Asia/Tokyo").unwrap();
    assert_eq!(lb["since"], studyhall::engagement::week_start(now, &tokyo));
    assert_eq!(lb["entries"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn profile_shows_only_rooms_the_requester_can_read() {
    let s = Server::sqlite(|_| {}).await;
    make_room(&s, json!({"id": "shared", "kind": "group"})).await;
    make_room(
        &s,
        json!({"id": "private", "kind": "group", "visibility": "invite"}),
    )
    .await;
    put_member(&s, "private", "alice", "member").await;
    let mut alice = s.client("alice").await;
    alice.join("shared").await;
    alice.join("private").await;
    send(&mut alice, "shared", "a", "c1").await;
    send(&mut alice, "private", "b", "c2").await;
    send(&mut alice, "private", "c", "c3").await;

    let me = alice.ok(json!({"type": "profile"})).await;
    assert_eq!(me["user"], json!({"id": "alice", "name": "ALICE"}));
    let rooms: Vec<(&str, i64)> = me["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["room"].as_str().unwrap(), r["points"].as_i64().unwrap()))
        .collect();
    assert_eq!(rooms, vec![("private", 2), ("shared", 1)]);
    assert_eq!(me["rooms"][0]["level"], 1);
    assert_eq!(me["rooms"][0]["next_level_points"], 50);
    assert_eq!(
        me["rooms"][0]["streak"],
        json!({"current": 0, "longest": 0, "last_day": null})
    );

    let mut bob = s.client("bob").await;
    let other = bob.ok(json!({"type": "profile", "user": "alice"})).await;
    assert_eq!(other["user"], json!({"id": "alice", "name": "ALICE"}));
    let rooms: Vec<&str> = other["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room"].as_str().unwrap())
        .collect();
    assert_eq!(rooms, vec!["shared"], "bob cannot read the private room");
    assert_eq!(
        bob.err(json!({"type": "profile", "user": "alice", "room": "private"}))
            .await,
        "forbidden"
    );
    // A room with nothing earned yet answers zeros.
    let none = bob.ok(json!({"type": "profile", "room": "shared"})).await;
    assert_eq!(none["rooms"][0]["points"], 0);
    assert_eq!(none["rooms"][0]["badges"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn stats_rights_bad_input_and_live_counts() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true}}),
    )
    .await;
    put_member(&s, "g", "teach", "host").await;
    let mut teach = s.client("teach").await;
    let mut mem = s.client("mem").await;
    teach.join("g").await;
    mem.join("g").await;
    send(&mut mem, "g", "one", "c1").await;
    send(&mut mem, "g", "two", "c2").await;
    send(&mut teach, "g", "three", "c3").await;
    let q = mem
        .ok(json!({"type": "ask", "room": "g", "text": "?"}))
        .await["id"]
        .clone();
    teach
        .ok(json!({"type": "answer", "room": "g", "question": q, "text": "!"}))
        .await;

    assert_eq!(
        mem.err(json!({"type": "stats", "room": "g"})).await,
        "forbidden"
    );
    let st = teach.ok(json!({"type": "stats", "room": "g"})).await;
    assert_eq!(st["room"], "g");
    assert_eq!(st["bucket"], "day");
    assert_eq!(
        st["to"].as_i64().unwrap() - st["from"].as_i64().unwrap(),
        30 * 86_400_000
    );
    assert_eq!(st["members"], 2);
    assert_eq!(st["new_members"], 2);
    assert_eq!(st["weekly_active_members"], 2);
    assert_eq!(st["weekly_active_ratio"], 1.0);
    assert_eq!(st["health"], "high");
    assert_eq!(st["healthy_band"], json!({"low": 0.15, "high": 0.3}));
    let series = st["series"].as_array().unwrap();
    assert!(series.len() == 31 || series.len() == 30, "{}", series.len());
    let last = series.last().unwrap();
    assert_eq!(
        (
            last["messages"].as_i64(),
            last["questions"].as_i64(),
            last["answers"].as_i64()
        ),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(last["active_members"], 2);
    assert_eq!(st["questions"]["asked"], 1);
    assert_eq!(st["questions"]["answered"], 1);
    assert_eq!(st["questions"]["answered_share"], 1.0);
    assert!(
        st["questions"]["first_answer_ms"]["median"]
            .as_i64()
            .unwrap()
            >= 0
    );
    assert_eq!(st["churn_risk"]["count"], 0);
    assert_eq!(st["top_contributors"][0]["user"]["id"], "teach");
    assert_eq!(st["top_contributors"][0]["points"], 11);
    assert_eq!(st["top_contributors"][1]["messages"], 2);

    let now = studyhall::store::now_ms();
    for bad in [
        json!({"type": "stats", "room": "g", "bucket": "hour"}),
        json!({"type": "stats", "room": "g", "from": 0, "to": now}),
        json!({"type": "stats", "room": "g", "from": now, "to": now - 1}),
        json!({"type": "stats", "room": "g", "from": -5}),
    ] {
        assert_eq!(teach.err(bad).await, "bad_request");
    }
    let weeks = teach
        .ok(json!({"type": "stats", "room": "g", "from": now - 300 * DAY, "to": now, "bucket": "week"}))
        .await;
    let n = weeks["series"].as_array().unwrap().len();
    assert!((43..=45).contains(&n), "{n} weeks");
    assert_eq!(
        teach
            .err(json!({"type": "stats", "room": "g", "from": now - 3000 * DAY, "to": now, "bucket": "week"}))
            .await,
        "bad_request",
        "more than 366 weeks"
    );
    let (status, body) = http(
        s.addr,
        "GET",
        "/api/rooms/g/stats?bucket=year",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, _) = http(
        s.addr,
        "GET",
        "/api/rooms/g/stats?from=x",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 400);

    // Buckets follow the room's zone: New York days and Monday weeks.
    make_room(
        &s,
        json!({"id": "ny", "kind": "group", "engagement": {"timezone": "America/New_York"}}),
    )
    .await;
    let ny = studyhall::engagement::zone("America/New_York").unwrap();
    let (from, to) = (now - 20 * DAY, now);
    for (bucket, first) in [
        ("day", studyhall::engagement::day_start_of(from, &ny)),
        ("week", studyhall::engagement::week_start(from, &ny)),
    ] {
        let path = format!("/api/rooms/ny/stats?from={from}&to={to}&bucket={bucket}");
        let (status, st) = http(s.addr, "GET", &path, Some(API_KEY), None).await;
        assert_eq!(status, 200, "{st}");
        let series = st["series"].as_array().unwrap();
        assert_eq!(series[0]["start"], first, "{bucket}");
        let last = series.last().unwrap()["start"].as_i64().unwrap();
        assert!(
            last < to
                && last
                    >= to
                        - if bucket == "day" {
                            25 * HOUR
                        } else {
                            7 * DAY + HOUR
                        }
        );
        assert_eq!(
            st["tz"], "America/New_York",
            "the zone the buckets align to"
        );
        assert_eq!(st["members"], 0);
        assert_eq!(st["weekly_active_ratio"], 0.0);
        assert_eq!(st["health"], "low");
    }
    s.stop().await;
}

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

/// Seeds a synthetic room `syn` (UTC) through SQL: members, day counters and questions with
/// known timestamps, so every number of its statistics is known (see the assertions).
async fn seed_synthetic(url: &str, d: i64) {
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    let members = [
        ("u1", d - 30 * DAY),
        ("u2", d - 30 * DAY),
        ("u3", d - 30 * DAY),
        ("u4", d - 30 * DAY),
        ("u5", d - 30 * DAY),
        ("u6", d - 30 * DAY),
        ("u7", d + DAY + HOUR),
        ("u8", d + DAY + 2 * HOUR),
        ("u9", d + 13 * DAY),
        ("u10", d - 20 * DAY),
    ];
    for (u, at) in members {
        sqlx::query("INSERT INTO room_members (room_id, user_id, role, added_at) VALUES ('syn', $1, 'member', $2)")
            .bind(u)
            .bind(at)
            .execute(&pool)
            .await
            .unwrap();
    }
    // (day, user, messages, questions, answers, points, first, last)
    type Row = (
        i64,
        &'static str,
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
    );
    let days: [Row; 8] = [
        (0, "u1", 3, 0, 0, 3, Some(HOUR), Some(5 * HOUR)),
        (13, "u1", 1, 0, 0, 1, Some(2 * HOUR), Some(2 * HOUR)),
        (10, "u2", 2, 1, 0, 7, Some(HOUR), Some(3 * HOUR)),
        (2, "u3", 0, 0, 1, 10, Some(HOUR), Some(HOUR)),
        (8, "u7", 5, 0, 0, 5, Some(0), Some(HOUR)),
        (-3, "u10", 1, 0, 0, 1, Some(HOUR), Some(HOUR)),
        (12, "host1", 4, 0, 0, 4, Some(HOUR), Some(2 * HOUR)),
        (9, "u4", 0, 0, 0, 2, None, None),
    ];
    for (day, u, m, q, a, p, first, last) in days {
        let start = d + day * DAY;
        sqlx::query(
            "INSERT INTO engagement_daily (room_id, day_start, user_id, messages, questions, \
             answers, reactions, checkins, points, first_ts, last_ts) \
             VALUES ('syn', $1, $2, $3, $4, $5, 0, 0, $6, $7, $8)",
        )
        .bind(start)
        .bind(u)
        .bind(m)
        .bind(q)
        .bind(a)
        .bind(p)
        .bind(first.map(|f| start + f))
        .bind(last.map(|l| start + l))
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO engagement_members (room_id, user_id, name, points) VALUES ('syn', 'u3', 'Uma', 10)")
        .execute(&pool)
        .await
        .unwrap();
    // (id, ts, first answer after, status)
    let questions: [(&str, i64, Option<i64>, &str); 7] = [
        ("q1", d + HOUR, Some(60_000), "answered"),
        ("q2", d + 2 * DAY, Some(120_000), "answered"),
        ("q3", d + 3 * DAY, Some(600_000), "answered"),
        ("q4", d + 4 * DAY, None, "open"),
        ("q5", d + 5 * DAY, None, "answered"),
        ("q6", d - DAY, Some(1_000), "answered"),
        ("q7", d + 6 * DAY, None, "dismissed"),
    ];
    for (i, (id, ts, after, status)) in questions.into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO questions (id, room_id, seq, author_id, author_name, author_role, \
             anonymous, text, status, votes, ts, first_answer_at, approved) \
             VALUES ($1, 'syn', $2, 'u2', 'U2', 'member', 0, 'q', $3, 0, $4, $5, 1)",
        )
        .bind(id)
        .bind(i as i64 + 1)
        .bind(status)
        .bind(ts)
        .bind(after.map(|a| ts + a))
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
}

async fn synthetic_stats(s: &Server, url: &str) {
    make_room(s, json!({"id": "syn", "kind": "group"})).await;
    // Monday 2026-01-05 00:00 UTC.
    let d: i64 = 1_767_571_200_000;
    seed_synthetic(url, d).await;
    let path = format!(
        "/api/rooms/syn/stats?from={d}&to={}&bucket=day",
        d + 14 * DAY
    );
    let (status, st) = http(s.addr, "GET", &path, Some(API_KEY), None).await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["from"], d);
    assert_eq!(st["to"], d + 14 * DAY);
    assert_eq!(st["members"], 10);
    assert_eq!(st["new_members"], 3);
    // u1, u2 and u7 contributed in the last 7 days; host1 did too but is no stored member.
    assert_eq!(st["weekly_active_members"], 3);
    assert_eq!(st["weekly_active_ratio"], 0.3);
    assert_eq!(st["health"], "healthy", "0.30 is inside the band");
    let series = st["series"].as_array().unwrap();
    assert_eq!(series.len(), 14);
    let col = |k: &str| -> Vec<i64> { series.iter().map(|p| p[k].as_i64().unwrap()).collect() };
    assert_eq!(col("start")[0], d);
    assert_eq!(col("start")[13], d + 13 * DAY);
    assert_eq!(
        col("messages"),
        vec![3, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2, 0, 4, 1]
    );
    assert_eq!(
        col("questions"),
        vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    );
    assert_eq!(
        col("answers"),
        vec![0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        col("active_members"),
        vec![1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1]
    );
    assert_eq!(
        col("new_members"),
        vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert_eq!(
        st["questions"],
        json!({"asked": 6, "answered": 4, "answered_share": 4.0 / 6.0,
               "first_answer_ms": {"median": 120_000, "p90": 600_000}, "overdue": 1})
    );
    assert_eq!(st["churn_risk"]["inactive_days"], 14);
    assert_eq!(st["churn_risk"]["count"], 4);
    assert_eq!(
        st["churn_risk"]["users"],
        json!([
            {"id": "u10", "name": "u10", "last_active_ts": d - 3 * DAY + HOUR},
            {"id": "u4", "name": "u4", "last_active_ts": null},
            {"id": "u5", "name": "u5", "last_active_ts": null},
            {"id": "u6", "name": "u6", "last_active_ts": null},
        ])
    );
    let top: Vec<(&str, i64)> = st["top_contributors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["user"]["id"].as_str().unwrap(),
                t["points"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        top,
        vec![
            ("u3", 10),
            ("u2", 7),
            ("u7", 5),
            ("host1", 4),
            ("u1", 4),
            ("u4", 2)
        ]
    );
    assert_eq!(
        st["top_contributors"][0],
        json!({"user": {"id": "u3", "name": "Uma"}, "points": 10, "messages": 0, "questions": 0, "answers": 1})
    );
    assert_eq!(st["top_contributors"][1]["questions"], 1);

    // Week buckets: two ISO weeks.
    let path = format!(
        "/api/rooms/syn/stats?from={d}&to={}&bucket=week",
        d + 14 * DAY
    );
    let (status, wk) = http(s.addr, "GET", &path, Some(API_KEY), None).await;
    assert_eq!(status, 200, "{wk}");
    assert_eq!(
        wk["series"],
        json!([
            {"start": d, "messages": 3, "questions": 0, "answers": 1, "active_members": 2, "new_members": 2},
            {"start": d + 7 * DAY, "messages": 12, "questions": 1, "answers": 0, "active_members": 4, "new_members": 1},
        ])
    );

    // The WebSocket command answers the same object.
    let mut host = Client::connect(
        s.addr,
        &token("boss", PlatformRole::Student, &[("syn", RoomRole::Host)]),
    )
    .await;
    let ws = host
        .ok(json!({"type": "stats", "room": "syn", "from": d, "to": d + 14 * DAY}))
        .await;
    let mut ws = ws.as_object().unwrap().clone();
    ws.remove("type");
    ws.remove("rid");
    assert_eq!(Value::Object(ws), st);
}

#[tokio::test]
async fn stats_on_a_synthetic_room_sqlite() {
    let s = Server::sqlite(|_| {}).await;
    let url = format!(
        "sqlite://{}",
        s.dir.as_ref().unwrap().path().join("t.db").display()
    );
    within("synthetic stats", synthetic_stats(&s, &url)).await;
    s.stop().await;
}

#[tokio::test]
async fn stats_on_a_synthetic_room_postgres() {
    let db = PgDb::create().await;
    let s = Server::start(base_config(db.url.clone())).await;
    within("synthetic stats", synthetic_stats(&s, &db.url)).await;
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn engagement_counts_on_postgres_too() {
    let db = PgDb::create().await;
    let s = Server::start(base_config(db.url.clone())).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true}}),
    )
    .await;
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    a.join("g").await;
    b.join("g").await;
    // A burst of sends rides the batched path (several per group commit).
    let mut rids = Vec::new();
    for i in 0..20 {
        rids.push(
            a.fire(
                json!({"type": "send", "room": "g", "text": "x", "client_msg_id": format!("c{i}")}),
            )
            .await,
        );
    }
    let mut first = Value::Null;
    for (i, rid) in rids.into_iter().enumerate() {
        let r = a.reply(rid).await;
        assert_eq!(r["type"], "ok");
        if i == 0 {
            first = r["id"].clone();
        }
    }
    b.ok(json!({"type": "react", "room": "g", "id": first, "emoji": "👍"}))
        .await;
    a.ok(json!({"type": "ask", "room": "g", "text": "?"})).await;
    a.ok(json!({"type": "checkin", "room": "g"})).await;
    let p = a.ok(json!({"type": "profile", "room": "g"})).await;
    assert_eq!(p["rooms"][0]["points"], 20 + 2 + 5 + 3);
    let lb = b
        .ok(json!({"type": "leaderboard", "room": "g", "period": "week"}))
        .await;
    assert_eq!(lb["entries"][0]["points"], 30);
    s.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn daily_caps_count_in_the_earners_zone() {
    // Kiritimati (UTC+14) and Pago Pago (UTC-11) are 25 hours apart: their dates always
    // differ, so which zone a cap day is taken in is visible at any time of day.
    let s = Server::sqlite(|c| c.engagement.daily_caps.message = 2).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "engagement": {"timezone": "Pacific/Pago_Pago"}}),
    )
    .await;
    let mut k = Client::connect(s.addr, &tz_token("kiri", Some("Pacific/Kiritimati"), &[])).await;
    k.join("g").await;
    let url = format!(
        "sqlite://{}",
        s.dir.as_ref().unwrap().path().join("t.db").display()
    );
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    // The cap is used up on the room's day: the user's own day is untouched.
    sqlx::query(
        "INSERT INTO points_caps (room_id, user_id, action, day, n) VALUES ('g', 'kiri', 'message', $1, 2)",
    )
    .bind(today_in("Pacific/Pago_Pago"))
    .execute(&pool)
    .await
    .unwrap();
    send(&mut k, "g", "a", "c1").await;
    assert_eq!(points_in(&mut k, "g").await, 1, "counted in the user's day");
    // Used up on the user's day: nothing more today.
    sqlx::query(
        "UPDATE points_caps SET n = 2 WHERE room_id = 'g' AND user_id = 'kiri' AND day = $1",
    )
    .bind(today_in("Pacific/Kiritimati"))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    send(&mut k, "g", "b", "c2").await;
    assert_eq!(points_in(&mut k, "g").await, 1, "capped in the user's day");
    s.stop().await;
}

/// The engagement counters of one user in room `g`, read from the database.
async fn counters(s: &Server, user: &str) -> (i64, i64) {
    let url = format!(
        "sqlite://{}",
        s.dir.as_ref().unwrap().path().join("t.db").display()
    );
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let row: (i64, i64) = sqlx::query_as(
        "SELECT reactions_received, helpful FROM engagement_members \
         WHERE room_id = 'g' AND user_id = $1",
    )
    .bind(user)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    row
}

#[tokio::test]
async fn badges_of_anonymous_or_pending_questions_are_not_announced() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true},
               "engagement": {"announce_badges": true}}),
    )
    .await;
    make_room(
        &s,
        json!({"id": "mod", "kind": "group", "qa": {"enabled": true, "moderated": true},
               "engagement": {"announce_badges": true}}),
    )
    .await;
    let mut ann = s.client("ann").await;
    let mut carl = s.client("carl").await;
    let mut ben = s.client("ben").await;
    for c in [&mut ann, &mut carl, &mut ben] {
        c.join("g").await;
        c.join("mod").await;
    }

    // Anonymous: it earns nothing (a badge or points would name the asker), and the room
    // sees no announcement.
    ann.ok(json!({"type": "ask", "room": "g", "text": "q", "anonymous": true}))
        .await;
    send(&mut ann, "g", "after the anonymous question", "a1").await;
    let m = ben.until("message").await;
    assert_eq!(m["text"], "after the anonymous question", "{m}");

    // Pending in a moderated room: the same until it is approved.
    carl.ok(json!({"type": "ask", "room": "mod", "text": "q"}))
        .await;
    send(&mut carl, "mod", "after the pending question", "c1").await;
    let m = ben.until("message").await;
    assert_eq!(m["text"], "after the pending question", "{m}");

    // A question asked openly is still announced.
    carl.ok(json!({"type": "ask", "room": "g", "text": "q"}))
        .await;
    assert_eq!(badge(&mut carl).await["badge"]["id"], "first_question");
    let m = ben.until("message").await;
    assert_eq!(m["from"]["role"], "system", "{m}");
    assert!(m["text"].as_str().unwrap().contains("CARL"), "{m}");
    s.stop().await;
}

#[tokio::test]
async fn reacting_and_unreacting_uses_up_nobodys_cap() {
    let s = Server::sqlite(|c| c.engagement.daily_caps.reaction_received = 2).await;
    make_room(&s, json!({"id": "g", "kind": "group"})).await;
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let mut carl = s.client("carl").await;
    for c in [&mut alice, &mut bob, &mut carl] {
        c.join("g").await;
    }
    let id = send(&mut alice, "g", "hello", "h").await["id"].clone();
    let base = points_in(&mut alice, "g").await;
    let react = |e: &str, add: bool| json!({"type": if add {"react"} else {"unreact"}, "room": "g", "id": id, "emoji": e});
    for _ in 0..3 {
        bob.ok(react("👍", true)).await;
        bob.ok(react("👍", false)).await;
    }
    assert_eq!(points_in(&mut alice, "g").await, base);
    // Someone else's reaction still earns: the withdrawn ones gave their places back.
    carl.ok(react("🎉", true)).await;
    assert_eq!(points_in(&mut alice, "g").await, base + 2);
    bob.ok(react("👍", true)).await;
    assert_eq!(points_in(&mut alice, "g").await, base + 4);
    s.stop().await;
}

#[tokio::test]
async fn badge_counters_follow_points_on_moderation_and_self_marks() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true, "peer_answers": true}}),
    )
    .await;
    put_member(&s, "g", "host", "host").await;
    let mut ann = s.client("ann").await;
    let mut ben = s.client("ben").await;
    let mut host = s.client("host").await;
    for c in [&mut ann, &mut ben, &mut host] {
        c.join("g").await;
    }
    // reactions_received counts reactions still standing: a moderation delete takes its
    // message's reactions away.
    let m1 = send(&mut ann, "g", "one", "1").await["id"].clone();
    let m2 = send(&mut ann, "g", "two", "2").await["id"].clone();
    for (id, e) in [(&m1, "a"), (&m1, "b"), (&m2, "c")] {
        ben.ok(json!({"type": "react", "room": "g", "id": id, "emoji": e}))
            .await;
    }
    ann.ok(json!({"type": "react", "room": "g", "id": m1, "emoji": "self"}))
        .await;
    assert_eq!(counters(&s, "ann").await.0, 3);
    host.ok(json!({"type": "delete", "room": "g", "id": m1}))
        .await;
    assert_eq!(
        counters(&s, "ann").await.0,
        1,
        "m1's two reactions are gone"
    );

    // helpful counts marks by others: marking one's own answer counts nothing, nor does
    // taking that mark back.
    let q = ann
        .ok(json!({"type": "ask", "room": "g", "text": "q"}))
        .await["id"]
        .clone();
    ann.ok(json!({"type": "answer", "room": "g", "question": q, "text": "mine"}))
        .await;
    ann.ok(json!({"type": "helpful", "room": "g", "question": q}))
        .await;
    assert_eq!(counters(&s, "ann").await.1, 0, "a self-mark counts nothing");
    let q2 = ann
        .ok(json!({"type": "ask", "room": "g", "text": "q2"}))
        .await["id"]
        .clone();
    ben.ok(json!({"type": "answer", "room": "g", "question": q2, "text": "a"}))
        .await;
    ann.ok(json!({"type": "helpful", "room": "g", "question": q2}))
        .await;
    assert_eq!(counters(&s, "ben").await.1, 1);
    ann.ok(json!({"type": "helpful", "room": "g", "question": q, "on": false}))
        .await;
    assert_eq!(counters(&s, "ann").await.1, 0);
    ann.ok(json!({"type": "helpful", "room": "g", "question": q2, "on": false}))
        .await;
    assert_eq!(counters(&s, "ben").await.1, 0);
    s.stop().await;
}

#[tokio::test]
async fn a_checkins_cap_day_is_its_own_day() {
    // The token of one session names Kiritimati, a later one's Pago Pago (now the zone kept
    // for the user). Their dates always differ: Kiritimati's is later.
    let s = Server::sqlite(|_| {}).await;
    make_room(&s, json!({"id": "g", "kind": "group"})).await;
    let mut k = Client::connect(s.addr, &tz_token("u", Some("Pacific/Kiritimati"), &[])).await;
    let mut p = Client::connect(s.addr, &tz_token("u", Some("Pacific/Pago_Pago"), &[])).await;
    let r = p.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(r["points"], 3, "{r}");
    // A new day in Kiritimati: its own cap day, not Pago Pago's (already used).
    let r = k.ok(json!({"type": "checkin", "room": "g"})).await;
    assert_eq!(r["already"], false, "{r}");
    assert_eq!(r["points"], 3, "{r}");
    s.stop().await;
}

/// Points (all time) the leaderboard shows for `user` in room `g`, as `viewer` sees it.
async fn points_of(viewer: &mut Client, user: &str) -> i64 {
    let lb = viewer
        .ok(json!({"type": "leaderboard", "room": "g", "period": "all"}))
        .await;
    lb["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["user"]["id"] == user)
        .map_or(0, |e| e["points"].as_i64().unwrap())
}

#[tokio::test]
async fn anonymous_and_pending_questions_do_not_show_their_asker_in_points_or_badges() {
    let s = Server::sqlite(|_| {}).await;
    make_room(
        &s,
        json!({"id": "g", "kind": "group", "qa": {"enabled": true, "moderated": true}}),
    )
    .await;
    put_member(&s, "g", "tia", "host").await;
    let mut tia = s.client("tia").await;
    let mut ann = s.client("ann").await;
    let mut ben = s.client("ben").await;
    for c in [&mut tia, &mut ann, &mut ben] {
        c.join("g").await;
    }

    // Anonymous, then approved: the asker never earns anything visible for it.
    let anon = ann
        .ok(json!({"type": "ask", "room": "g", "text": "is this on the exam?", "anonymous": true}))
        .await["id"]
        .clone();
    tia.ok(json!({"type": "question_status", "room": "g", "question": anon, "status": "open"}))
        .await;
    assert_eq!(points_of(&mut ben, "ann").await, 0);
    let p = ben
        .ok(json!({"type": "profile", "room": "g", "user": "ann"}))
        .await;
    assert!(
        !p.to_string().contains("first_question"),
        "the anonymous question earned a visible badge: {p}"
    );

    // Named but pending: nothing while hidden, the points once approved.
    let named = ann
        .ok(json!({"type": "ask", "room": "g", "text": "can we get the slides?"}))
        .await["id"]
        .clone();
    assert_eq!(points_of(&mut ben, "ann").await, 0);
    tia.ok(json!({"type": "question_status", "room": "g", "question": named, "status": "open"}))
        .await;
    assert!(points_of(&mut ben, "ann").await > 0);
    s.stop().await;
}
