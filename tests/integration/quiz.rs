//! Quizzes beyond the poll basics: who answered and when (`poll_answers`, host/ta only, paged),
//! accuracy and response time in the results (hidden from members until close), points into
//! the engagement ledger at the close (by hand and by the clock, within the daily cap, once),
//! the quiz leaderboard over closed quizzes (WebSocket and HTTP), and the results export as
//! JSON and formula-safe CSV; on SQLite and PostgreSQL.

use crate::common::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use studyhall::protocol::{PlatformRole, RoomRole};

async fn host(s: &Server, room: &str) -> Client {
    let mut h = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
    )
    .await;
    h.join(room).await;
    h
}

async fn member(s: &Server, user: &str, room: &str) -> Client {
    let mut c = s.client(user).await;
    c.join(room).await;
    c
}

async fn points_in(c: &mut Client, room: &str) -> i64 {
    let p = c.ok(json!({"type": "profile", "room": room})).await;
    p["rooms"][0]["points"].as_i64().unwrap()
}

/// The next `poll` event of `id` in state `state`.
async fn poll_event(c: &mut Client, id: &Value, state: &str) -> Value {
    loop {
        let ev = c.until("poll").await;
        if &ev["poll"]["id"] == id && ev["poll"]["state"] == state {
            return ev;
        }
    }
}

/// A GET with an `Accept` header, answering the status, the headers and the body as text.
async fn get_text(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let headers = format!("Authorization: Bearer {API_KEY}\r\nAccept: {accept}\r\n");
    let answer = within(
        "http request",
        http1::request(addr, "GET", path, &headers, ""),
    );
    answer.await.expect("http request")
}

async fn quiz_flow(s: &Server) {
    s.room("qz", "open").await;
    let mut h = host(s, "qz").await;
    let mut ann = member(s, "ann", "qz").await;
    let mut bob = member(s, "bob", "qz").await;
    let mut cy = member(s, "cy", "qz").await;
    let made = h
        .ok(
            json!({"type":"poll_create","room":"qz","kind":"quiz","question":"Which?",
            "options":["=1+2","b, c","@x"],"multiple":true,"correct":[2,0]}),
        )
        .await;
    assert_eq!(made["poll"]["correct"], json!([0, 2]), "kept sorted");
    let id = made["poll"]["id"].clone();
    h.ok(json!({"type":"poll_open","room":"qz","poll":id}))
        .await;
    // Exactly the correct set is correct: a subset or a superset is not.
    for (c, choices) in [
        (&mut ann, json!([2, 0])),
        (&mut bob, json!([0])),
        (&mut cy, json!([0, 1, 2])),
    ] {
        c.ok(json!({"type":"poll_answer","room":"qz","poll":id,"choices":choices}))
            .await;
    }
    assert_eq!(
        ann.err(json!({"type":"poll_answers","room":"qz","poll":id}))
            .await,
        "forbidden",
        "members do not see who answered"
    );
    assert_eq!(
        h.err(json!({"type":"poll_answers","room":"qz","poll":"nope"}))
            .await,
        "not_found"
    );
    for bad in [
        json!({"limit":0}),
        json!({"limit":201}),
        json!({"cursor":"x"}),
    ] {
        let mut cmd = json!({"type":"poll_answers","room":"qz","poll":id});
        cmd.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        assert_eq!(h.err(cmd).await, "bad_request", "{bad}");
    }
    // All at once, then in pages of two: the same answers in the same order.
    let all = h
        .ok(json!({"type":"poll_answers","room":"qz","poll":id}))
        .await;
    assert_eq!(all["next_cursor"], Value::Null);
    let all = all["answers"].as_array().unwrap().clone();
    assert_eq!(all.len(), 3);
    let first = h
        .ok(json!({"type":"poll_answers","room":"qz","poll":id,"limit":2}))
        .await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let rest = h
        .ok(json!({"type":"poll_answers","room":"qz","poll":id,"limit":2,"cursor":cursor}))
        .await;
    assert_eq!(rest["next_cursor"], Value::Null);
    let paged: Vec<Value> = first["answers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["answers"].as_array().unwrap())
        .cloned()
        .collect();
    assert_eq!(paged, all);
    let by_user = |user: &str| {
        all.iter()
            .find(|a| a["user"]["id"] == user)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_user("ann")["user"]["name"], "ANN");
    assert_eq!(by_user("ann")["choices"], json!([0, 2]));
    assert_eq!(
        ["ann", "bob", "cy"].map(|u| by_user(u)["correct"].clone()),
        [json!(true), json!(false), json!(false)]
    );
    assert!(all.iter().all(|a| a["response_ms"].as_i64().unwrap() >= 0));
    let ts: Vec<i64> = all.iter().map(|a| a["ts"].as_i64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "oldest first: {ts:?}");

    // Accuracy and response time: host/ta while open; members see no results (after_close).
    let hosted = h.ok(json!({"type":"polls","room":"qz"})).await["polls"][0].clone();
    assert_eq!(hosted["results"]["correct_answers"], 1);
    assert!(hosted["results"]["avg_response_ms"].as_i64().unwrap() >= 0);
    assert!(
        ann.ok(json!({"type":"polls","room":"qz"})).await["polls"][0]
            .get("results")
            .is_none()
    );
    // A live quiz shows members the counts but not which answers are right.
    let live = h
        .ok(
            json!({"type":"poll_create","room":"qz","kind":"quiz","question":"Live?",
            "options":["a","b"],"correct":[1],"show_results":"live"}),
        )
        .await["poll"]["id"]
        .clone();
    h.ok(json!({"type":"poll_open","room":"qz","poll":live}))
        .await;
    ann.ok(json!({"type":"poll_answer","room":"qz","poll":live,"choices":[1]}))
        .await;
    let listed = ann.ok(json!({"type":"polls","room":"qz"})).await;
    let seen = listed["polls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == live)
        .cloned()
        .unwrap();
    assert_eq!(seen["results"]["counts"], json!([0, 1]));
    assert!(seen["results"].get("correct_answers").is_none(), "{seen}");
    assert!(seen["results"].get("avg_response_ms").is_none(), "{seen}");

    // The close: everyone sees the accuracy; a correct answer earns its points, once.
    let closed = h
        .ok(json!({"type":"poll_close","room":"qz","poll":id}))
        .await;
    assert_eq!(closed["poll"]["results"]["correct_answers"], 1);
    assert_eq!(closed["poll"]["results"]["answers"], 3);
    let ev = poll_event(&mut bob, &id, "closed").await;
    assert_eq!(ev["poll"]["results"]["correct_answers"], 1);
    assert!(ev["poll"]["results"]["avg_response_ms"].is_i64());
    assert_eq!(points_in(&mut ann, "qz").await, 10);
    assert_eq!(points_in(&mut bob, "qz").await, 0);
    assert_eq!(
        h.ok(json!({"type":"poll_close","room":"qz","poll":id}))
            .await["seq"],
        Value::Null
    );
    assert_eq!(
        points_in(&mut ann, "qz").await,
        10,
        "closing again awards nothing"
    );
    let board = ann
        .ok(json!({"type":"leaderboard","room":"qz","period":"all"}))
        .await;
    assert_eq!(board["entries"][0]["user"]["id"], "ann");
    assert_eq!(board["entries"][0]["points"], 10);

    // The quiz leaderboard: closed quizzes only (the live one is still open).
    let lb = bob.ok(json!({"type":"quiz_leaderboard","room":"qz"})).await;
    assert_eq!(lb["quizzes"], 1);
    let rows: Vec<Value> = lb["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!([e["rank"], e["user"]["id"], e["correct"], e["answered"]]))
        .collect();
    assert_eq!(
        rows,
        vec![
            json!([1, "ann", 1, 1]),
            json!([2, "bob", 0, 1]),
            json!([2, "cy", 0, 1])
        ]
    );
    assert_eq!(
        lb["entries"][0]["total_response_ms"],
        by_user("ann")["response_ms"]
    );
    assert_eq!(
        bob.err(json!({"type":"quiz_leaderboard","room":"qz","limit":0}))
            .await,
        "bad_request"
    );
    let (st, http_lb) = http(
        s.addr,
        "GET",
        "/api/rooms/qz/quiz-leaderboard",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let mut ws_lb = lb.clone();
    for k in ["type", "rid"] {
        ws_lb.as_object_mut().unwrap().remove(k);
    }
    assert_eq!(http_lb, ws_lb);
    let (st, _) = http(
        s.addr,
        "GET",
        "/api/rooms/nope/quiz-leaderboard",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = http(
        s.addr,
        "GET",
        "/api/rooms/qz/quiz-leaderboard?limit=500",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 400);

    // The results export: JSON by default, CSV on request, formula-safe.
    let path = format!("/api/rooms/qz/polls/{}/results", id.as_str().unwrap());
    let (st, export) = http(s.addr, "GET", &path, Some(API_KEY), None).await;
    assert_eq!(st, 200, "{export}");
    assert_eq!(export["poll"]["results"]["correct_answers"], 1);
    assert_eq!(export["answers"], Value::Array(all.clone()));
    for bad in [
        "/api/rooms/qz/polls/nope/results".to_owned(),
        format!("/api/rooms/nope/polls/{}/results", id.as_str().unwrap()),
    ] {
        assert_eq!(http(s.addr, "GET", &bad, Some(API_KEY), None).await.0, 404);
    }
    assert_eq!(
        http(
            s.addr,
            "GET",
            &format!("{path}?format=xml"),
            Some(API_KEY),
            None
        )
        .await
        .0,
        400
    );
    let (st, head, csv) = get_text(s.addr, &format!("{path}?format=csv"), "*/*").await;
    assert_eq!(st, 200, "{csv}");
    assert!(head.contains("content-type: text/csv"), "{head}");
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], "user_id,name,choices,text,ts,correct,response_ms");
    let row = |user: &str| {
        let a = by_user(user);
        format!(
            "{user},{},{{}},,{},{},{}",
            user.to_uppercase(),
            a["ts"],
            a["correct"],
            a["response_ms"]
        )
    };
    let want: Vec<String> = all
        .iter()
        .map(|a| {
            let user = a["user"]["id"].as_str().unwrap();
            let choices = match user {
                "ann" => "'=1+2; @x",
                "bob" => "'=1+2",
                _ => "\"'=1+2; b, c; @x\"",
            };
            row(user).replace("{}", choices)
        })
        .collect();
    assert_eq!(lines[1..].to_vec(), want);
    let (st, head, by_accept) = get_text(s.addr, &path, "text/csv").await;
    assert_eq!((st, by_accept), (200, csv));
    assert!(head.contains("content-type: text/csv"), "{head}");
}

#[tokio::test]
async fn quizzes_answers_points_leaderboard_and_export() {
    on_sqlite(|_| {}, quiz_flow).await;
}

#[tokio::test]
async fn quizzes_answers_points_leaderboard_and_export_on_postgres() {
    on_postgres(|_| {}, quiz_flow).await;
}

/// A quiz closed by the clock awards like one closed by hand; the daily cap and the
/// configured points apply; ties on correct answers go to the faster total.
async fn clock_and_cap(s: &Server) {
    s.room("qc", "open").await;
    let mut h = host(s, "qc").await;
    let mut ann = member(s, "ann", "qc").await;
    let mut bob = member(s, "bob", "qc").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = h
            .ok(
                json!({"type":"poll_create","room":"qc","kind":"quiz","question":"1 + 1?",
                "options":["1","2"],"correct":[1],"duration_s":1}),
            )
            .await["poll"]["id"]
            .clone();
        h.ok(json!({"type":"poll_open","room":"qc","poll":id}))
            .await;
        // Bob answers first: his total is never larger than Ann's.
        for c in [&mut bob, &mut ann] {
            c.ok(json!({"type":"poll_answer","room":"qc","poll":id,"choices":[1]}))
                .await;
        }
        ids.push(id);
    }
    for id in &ids {
        poll_event(&mut ann, id, "closed").await;
    }
    // Two correct answers, a cap of one award a day at 7 points.
    assert_eq!(points_in(&mut ann, "qc").await, 7);
    assert_eq!(points_in(&mut bob, "qc").await, 7);
    assert_eq!(
        h.ok(json!({"type":"poll_close","room":"qc","poll":ids[0]}))
            .await["seq"],
        Value::Null
    );
    assert_eq!(points_in(&mut ann, "qc").await, 7);
    let lb = ann
        .ok(json!({"type":"quiz_leaderboard","room":"qc","limit":1}))
        .await;
    assert_eq!(lb["quizzes"], 2);
    let e = &lb["entries"];
    assert_eq!(e.as_array().unwrap().len(), 1, "limit");
    assert_eq!(
        (e[0]["correct"].as_i64(), e[0]["answered"].as_i64()),
        (Some(2), Some(2))
    );
    let full = ann.ok(json!({"type":"quiz_leaderboard","room":"qc"})).await["entries"].clone();
    let (b, a) = (&full[0], &full[1]);
    assert!(
        b["total_response_ms"].as_i64() <= a["total_response_ms"].as_i64(),
        "{full}"
    );
    if b["total_response_ms"] == a["total_response_ms"] {
        assert_eq!((b["rank"].as_i64(), a["rank"].as_i64()), (Some(1), Some(1)));
    } else {
        assert_eq!(b["user"]["id"], "bob");
        assert_eq!((b["rank"].as_i64(), a["rank"].as_i64()), (Some(1), Some(2)));
    }
}

/// A fast clock, 7 points a correct answer and a daily cap of 1.
fn fast_capped(c: &mut studyhall::config::Config) {
    c.class_clock_ms = 50;
    c.engagement.points.quiz_correct = 7;
    c.engagement.daily_caps.quiz_correct = 1;
}

#[tokio::test]
async fn the_clock_awards_quiz_points_within_the_cap() {
    on_sqlite(fast_capped, clock_and_cap).await;
}

#[tokio::test]
async fn the_clock_awards_quiz_points_within_the_cap_on_postgres() {
    on_postgres(fast_capped, clock_and_cap).await;
}
