//! Moderation over WebSockets: mute (and its expiry), kick, ban across a restart, slow mode,
//! content rules, the report queue, the audit log, raise hand and stage.

use crate::common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use studyhall::protocol::{PlatformRole, RoomRole};

async fn setup(s: &Server, room: &str) -> (Client, Client, Client) {
    s.room(room, "open").await;
    let mut host = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[(room, RoomRole::Host)]),
    )
    .await;
    host.join(room).await;
    let mut a = s.client("ann").await;
    a.join(room).await;
    let mut b = s.client("bob").await;
    b.join(room).await;
    (host, a, b)
}

fn send(room: &str, text: &str, cid: &str) -> serde_json::Value {
    json!({"type":"send","room":room,"text":text,"client_msg_id":cid})
}

/// Retries `send` until it is accepted (time-based rules), bounded; returns how long it took.
async fn until_accepted(c: &mut Client, room: &str, text: &str) -> Duration {
    let started = Instant::now();
    for i in 0.. {
        let r = c
            .request(send(
                room,
                text,
                &format!("retry-{i}-{}", started.elapsed().as_nanos()),
            ))
            .await;
        if r["type"] == "ok" {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never accepted: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::test]
async fn mute_refuses_send_and_ask_until_it_expires() {
    let s = Server::sqlite(|_| {}).await;
    let (mut host, mut a, mut b) = setup(&s, "r").await;
    assert_eq!(
        b.err(json!({"type":"mute","room":"r","user":"ann","seconds":60}))
            .await,
        "forbidden",
        "members cannot mute"
    );
    assert_eq!(
        host.err(json!({"type":"mute","room":"r","user":"teacher","seconds":60}))
            .await,
        "bad_request"
    );
    let mut ta = Client::connect(
        s.addr,
        &token("tara", PlatformRole::Student, &[("r", RoomRole::Ta)]),
    )
    .await;
    ta.join("r").await;
    assert_eq!(
        ta.err(json!({"type":"mute","room":"r","user":"teacher","seconds":60}))
            .await,
        "forbidden",
        "host cannot be muted"
    );
    host.ok(json!({"type":"mute","room":"r","user":"ann","seconds":1}))
        .await;
    let note = a.next_of("muted").await;
    assert!(note["until"].as_i64().unwrap() > 0);
    assert_eq!(a.err(send("r", "hello?", "1")).await, "muted");
    let waited = until_accepted(&mut a, "r", "back").await;
    assert!(
        waited >= Duration::from_millis(500),
        "mute lasted {waited:?}"
    );
    host.ok(json!({"type":"mute","room":"r","user":"ann","seconds":600}))
        .await;
    assert_eq!(a.err(send("r", "x", "2")).await, "muted");
    host.ok(json!({"type":"unmute","room":"r","user":"ann"}))
        .await;
    a.ok(send("r", "free", "3")).await;
    s.stop().await;
}

#[tokio::test]
async fn kick_closes_4003_and_ban_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ban.db").display());
    let s = Server::start(base_config(url.clone())).await;
    let (mut host, mut a, mut b) = setup(&s, "r").await;
    assert_eq!(
        b.err(json!({"type":"kick","room":"r","user":"ann"})).await,
        "forbidden"
    );
    host.ok(json!({"type":"kick","room":"r","user":"ann"}))
        .await;
    let kicked = a.next_of("kicked").await;
    assert_eq!(
        (kicked["room"].as_str(), kicked["reason"].as_str()),
        (Some("r"), Some("kicked"))
    );
    assert_eq!(close_code(&mut a.ws).await, Some(4003));
    let mut a = s.client("ann").await;
    a.join("r").await; // a kick is not a ban
    host.ok(json!({"type":"ban","room":"r","user":"ann"})).await;
    assert_eq!(a.next_of("kicked").await["reason"], "banned");
    assert_eq!(close_code(&mut a.ws).await, Some(4003));
    let mut a = s.client("ann").await;
    assert_eq!(a.err(json!({"type":"join","room":"r"})).await, "forbidden");
    drop((a, b, host));
    s.stop().await;

    let s = Server::start(base_config(url)).await;
    let mut a = s.client("ann").await;
    assert_eq!(
        a.err(json!({"type":"join","room":"r"})).await,
        "forbidden",
        "ban persisted"
    );
    let mut host = Client::connect(
        s.addr,
        &token("teacher", PlatformRole::Tutor, &[("r", RoomRole::Host)]),
    )
    .await;
    host.join("r").await;
    host.ok(json!({"type":"unban","room":"r","user":"ann"}))
        .await;
    assert_eq!(
        host.err(json!({"type":"unban","room":"r","user":"ann"}))
            .await,
        "not_found"
    );
    a.join("r").await;
    let (st, audit) = http(s.addr, "GET", "/api/rooms/r/audit", Some(API_KEY), None).await;
    assert_eq!(st, 200);
    let actions: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["kick", "ban", "unban"]);
    assert_eq!(audit["entries"][1]["actor"], "teacher");
    assert_eq!(audit["entries"][1]["target"], "ann");
    s.stop().await;
}

#[tokio::test]
async fn slow_mode_allows_one_message_per_interval_for_members() {
    let s = Server::sqlite(|_| {}).await;
    let (mut host, mut a, _b) = setup(&s, "r").await;
    host.ok(json!({"type":"slow_mode","room":"r","seconds":1}))
        .await;
    assert_eq!(a.next_of("slow_mode").await["seconds"], 1);
    a.ok(send("r", "one", "1")).await;
    // Retrying the accepted message inside the window gets its first ok, not a refusal.
    assert_eq!(a.ok(send("r", "one", "1")).await["seq"], 1);
    let refused = a.request(send("r", "two", "2")).await;
    assert_eq!(refused["code"], "rate_limited");
    assert!(refused["message"].as_str().unwrap().contains("slow_mode"));
    host.ok(send("r", "hosts are exempt", "h1")).await;
    host.ok(send("r", "really", "h2")).await;
    let waited = until_accepted(&mut a, "r", "three").await;
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    host.ok(json!({"type":"slow_mode","room":"r","seconds":0}))
        .await;
    a.ok(send("r", "fast", "f1")).await;
    a.ok(send("r", "faster", "f2")).await;
    s.stop().await;
}

#[tokio::test]
async fn blocked_words_and_link_rules_are_enforced_naming_the_rule() {
    let s = Server::sqlite(|_| {}).await;
    let (mut host, mut a, _b) = setup(&s, "r").await;
    let rules =
        json!({"rules": {"blocked_words": ["casino"], "links": {"domains": ["wikipedia.org"]}}});
    let (st, room) = http(s.addr, "PATCH", "/api/rooms/r", Some(API_KEY), Some(rules)).await;
    assert_eq!(st, 200, "{room}");
    assert_eq!(room["rules"]["blocked_words"], json!(["casino"]));
    let e = a.request(send("r", "Best CASINO online", "1")).await;
    assert_eq!(e["code"], "forbidden");
    assert!(e["message"].as_str().unwrap().contains("blocked_words"));
    let e = a
        .request(send("r", "buy at https://shop.example.com", "2"))
        .await;
    assert!(
        e["message"].as_str().unwrap().contains("room rule: links"),
        "{e}"
    );
    a.ok(send("r", "see https://en.wikipedia.org/wiki/Group", "3"))
        .await;
    host.ok(send("r", "teacher link https://school.example.com", "4"))
        .await;
    let e = a
        .request(json!({"type":"ask","room":"r","text":"casino?"}))
        .await;
    assert_eq!(e["type"], "error");
    let (st, _) = http(
        s.addr,
        "PATCH",
        "/api/rooms/r",
        Some(API_KEY),
        Some(json!({"rules":{"links":"nope"}})),
    )
    .await;
    assert_eq!(st, 400);
    s.stop().await;
}

#[tokio::test]
async fn reports_go_to_a_queue_and_to_host_sessions() {
    let s = Server::sqlite(|_| {}).await;
    let (mut host, mut a, mut b) = setup(&s, "r").await;
    let m = a.ok(send("r", "rude words", "1")).await;
    let r = b
        .ok(json!({"type":"report","room":"r","id":m["id"],"reason":"rude"}))
        .await;
    let ev = host.until("report").await;
    assert_eq!(
        (
            ev["report"]["id"].clone(),
            ev["report"]["target_kind"].as_str()
        ),
        (r["id"].clone(), Some("message"))
    );
    assert!(
        a.pending.iter().all(|f| f["type"] != "report"),
        "members do not see reports"
    );
    assert_eq!(
        b.err(json!({"type":"report","room":"r","id":m["id"],"reason":"again"}))
            .await,
        "conflict",
        "one report per target"
    );
    assert_eq!(
        b.err(json!({"type":"report","room":"r","id":"nope","reason":"x"}))
            .await,
        "not_found"
    );
    assert_eq!(
        b.err(json!({"type":"report","room":"r","id":m["id"],"reason":""}))
            .await,
        "bad_request"
    );
    let (st, q) = http(s.addr, "GET", "/api/rooms/r/reports", Some(API_KEY), None).await;
    assert_eq!((st, q["reports"].as_array().unwrap().len()), (200, 1));
    assert_eq!(q["reports"][0]["reason"], "rude");
    let path = format!("/api/rooms/r/reports/{}/resolve", r["id"].as_str().unwrap());
    let (st, done) = http(
        s.addr,
        "POST",
        &path,
        Some(API_KEY),
        Some(json!({"by":"teacher","resolution":"deleted"})),
    )
    .await;
    assert_eq!((st, done["resolution"].as_str()), (200, Some("deleted")));
    assert_eq!(
        http(s.addr, "POST", &path, Some(API_KEY), Some(json!({})))
            .await
            .0,
        409
    );
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/api/rooms/r/reports/nope/resolve",
            Some(API_KEY),
            None
        )
        .await
        .0,
        404
    );
    let (_, open) = http(s.addr, "GET", "/api/rooms/r/reports", Some(API_KEY), None).await;
    assert_eq!(open["reports"], json!([]));
    let (_, all) = http(
        s.addr,
        "GET",
        "/api/rooms/r/reports?all=true",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(all["reports"].as_array().unwrap().len(), 1);
    let (_, audit) = http(s.addr, "GET", "/api/rooms/r/audit", Some(API_KEY), None).await;
    assert_eq!(audit["entries"][0]["action"], "resolve_report");
    s.stop().await;
}

#[tokio::test]
async fn hands_queue_and_stage_with_a_limit_cleared_on_leave() {
    let s = Server::sqlite(|c| c.max_on_stage = 1).await;
    let (mut host, mut a, mut b) = setup(&s, "r").await;
    assert_eq!(
        a.ok(json!({"type":"raise_hand","room":"r"})).await["position"],
        1
    );
    assert_eq!(
        b.ok(json!({"type":"raise_hand","room":"r"})).await["position"],
        2
    );
    let h = host.until("hand").await;
    assert_eq!(
        (h["user"]["id"].as_str(), h["raised"].as_bool()),
        (Some("ann"), Some(true))
    );
    assert_eq!(host.until("hand").await["user"]["id"], "bob");
    assert!(
        b.pending
            .iter()
            .all(|f| f["type"] != "hand" || f["user"]["id"] == "bob"),
        "others' hands go to host/ta only"
    );
    let q = host.ok(json!({"type":"hands","room":"r"})).await;
    let order: Vec<_> = q["hands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["user"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, ["ann", "bob"]);
    assert_eq!(a.err(json!({"type":"hands","room":"r"})).await, "forbidden");
    assert_eq!(
        a.err(json!({"type":"stage","room":"r","user":"ann","on":true}))
            .await,
        "forbidden"
    );
    host.ok(json!({"type":"stage","room":"r","user":"ann","on":true}))
        .await;
    let st = b.until("stage").await;
    assert_eq!(
        (st["user"]["id"].as_str(), st["on"].as_bool()),
        (Some("ann"), Some(true))
    );
    let lowered = host.until("hand").await;
    assert_eq!(
        (lowered["user"]["id"].as_str(), lowered["raised"].as_bool()),
        (Some("ann"), Some(false)),
        "going on stage lowers the hand"
    );
    assert_eq!(
        host.err(json!({"type":"stage","room":"r","user":"bob","on":true}))
            .await,
        "conflict",
        "stage is full"
    );
    assert_eq!(
        host.err(json!({"type":"stage","room":"r","user":"nobody","on":true}))
            .await,
        "not_found"
    );
    let mut late = s.client("late").await;
    let joined = late.join("r").await;
    assert_eq!(joined["stage"][0]["id"], "ann");
    assert!(joined.get("hands").is_none(), "hands only for host/ta");
    assert_eq!(host.join("r").await["hands"][0]["user"]["id"], "bob");
    // Leaving clears hand and stage.
    a.ok(json!({"type":"leave","room":"r"})).await;
    let off = b.until("stage").await;
    assert_eq!(
        (off["user"]["id"].as_str(), off["on"].as_bool()),
        (Some("ann"), Some(false))
    );
    b.ok(json!({"type":"lower_hand","room":"r"})).await;
    assert_eq!(
        host.ok(json!({"type":"hands","room":"r"})).await["hands"],
        json!([])
    );
    s.stop().await;
}

#[tokio::test]
async fn a_ban_does_not_lock_out_a_host_the_token_grants() {
    // The ta cannot know an offline user's token grants, so banning them is accepted; the
    // grant still outranks the ban when the host comes (host and ta cannot be moderated).
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut ta = Client::connect(
        s.addr,
        &token("helper", PlatformRole::Student, &[("r", RoomRole::Ta)]),
    )
    .await;
    ta.join("r").await;
    ta.ok(json!({"type":"ban","room":"r","user":"boss"})).await;
    ta.ok(json!({"type":"ban","room":"r","user":"ann"})).await;
    let mut ann = s.client("ann").await;
    assert_eq!(
        ann.err(json!({"type":"join","room":"r"})).await,
        "forbidden"
    );
    let mut boss = Client::connect(
        s.addr,
        &token("boss", PlatformRole::Tutor, &[("r", RoomRole::Host)]),
    )
    .await;
    let ok = boss.join("r").await;
    assert_eq!(ok["role"], "host", "{ok}");
    // And now that the host is online, the ta cannot kick them.
    assert_eq!(
        ta.err(json!({"type":"kick","room":"r","user":"boss"}))
            .await,
        "forbidden"
    );
    s.stop().await;
}

#[tokio::test]
async fn host_and_ta_list_and_resolve_reports_over_the_websocket() {
    let s = Server::sqlite(|_| {}).await;
    let (mut host, mut a, mut b) = setup(&s, "r").await;
    let mut ta = Client::connect(
        s.addr,
        &token("tara", PlatformRole::Student, &[("r", RoomRole::Ta)]),
    )
    .await;
    ta.join("r").await;
    let m1 = a.ok(send("r", "rude words", "1")).await;
    let m2 = a.ok(send("r", "more rude words", "2")).await;
    let r1 = b
        .ok(json!({"type":"report","room":"r","id":m1["id"],"reason":"rude"}))
        .await;
    let r2 = b
        .ok(json!({"type":"report","room":"r","id":m2["id"],"reason":"also rude"}))
        .await;
    // Members and viewers may not see or resolve the queue.
    assert_eq!(
        b.err(json!({"type":"reports","room":"r"})).await,
        "forbidden"
    );
    assert_eq!(
        b.err(
            json!({"type":"report_resolve","room":"r","report":r1["id"],"resolution":"dismissed"})
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        host.err(json!({"type":"reports","room":"r","state":"nope"}))
            .await,
        "bad_request"
    );
    // The open reports, oldest first, with the reported message's text and author.
    let list = host.ok(json!({"type":"reports","room":"r"})).await;
    let reports = list["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "{list}");
    assert_eq!(reports[0]["id"], r1["id"]);
    assert_eq!(reports[0]["target"]["text"], "rude words");
    assert_eq!(reports[0]["target"]["author"]["id"], "ann");
    assert_eq!(reports[1]["target"]["text"], "more rude words");
    // A deleted message's report shows no target.
    host.ok(json!({"type":"delete","room":"r","id":m2["id"]}))
        .await;
    let list = ta.ok(json!({"type":"reports","room":"r"})).await;
    assert_eq!(list["reports"][1]["target"], serde_json::Value::Null);
    // The ta resolves one: the ok has it resolved, host sessions get it again as `report`.
    let done = ta
        .ok(json!({"type":"report_resolve","room":"r","report":r2["id"],"resolution":"removed"}))
        .await;
    assert_eq!(done["report"]["resolution"], "removed");
    assert_eq!(done["report"]["resolved_by"], "tara");
    // Host sessions got both reports as they were filed, then r2 again, resolved.
    let ev = loop {
        let ev = host.until("report").await;
        if ev["report"]["id"] == r2["id"] && !ev["report"]["resolved_at"].is_null() {
            break ev;
        }
    };
    assert!(ev["report"]["resolved_at"].is_i64(), "{ev}");
    assert_eq!(
        ta.err(
            json!({"type":"report_resolve","room":"r","report":r2["id"],"resolution":"removed"})
        )
        .await,
        "conflict"
    );
    assert_eq!(
        ta.err(json!({"type":"report_resolve","room":"r","report":"nope","resolution":"x"}))
            .await,
        "not_found"
    );
    assert_eq!(
        ta.err(json!({"type":"report_resolve","room":"r","report":r1["id"],"resolution":" "}))
            .await,
        "bad_request"
    );
    let open = host.ok(json!({"type":"reports","room":"r"})).await;
    assert_eq!(open["reports"].as_array().unwrap().len(), 1);
    let resolved = host
        .ok(json!({"type":"reports","room":"r","state":"resolved"}))
        .await;
    assert_eq!(resolved["reports"][0]["id"], r2["id"]);
    let all = host
        .ok(json!({"type":"reports","room":"r","state":"all"}))
        .await;
    assert_eq!(all["reports"].as_array().unwrap().len(), 2);
    // The same queue as the HTTP API's, and the audit log names the ta.
    let (_, http_open) = http(s.addr, "GET", "/api/rooms/r/reports", Some(API_KEY), None).await;
    assert_eq!(http_open["reports"][0]["id"], r1["id"]);
    let (_, audit) = http(s.addr, "GET", "/api/rooms/r/audit", Some(API_KEY), None).await;
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "resolve_report" && e["actor"] == "tara"),
        "{audit}"
    );
    s.stop().await;
}
