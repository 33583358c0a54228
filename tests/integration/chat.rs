//! Chat over WebSockets: fan-out, ordering, idempotency, resume, history, rights.

use crate::common::*;
use serde_json::json;
use std::collections::HashSet;
use studyhall::protocol::{PlatformRole, RoomRole};

#[tokio::test]
async fn fan_out_reaches_every_session_of_every_member() {
    let s = Server::sqlite(|_| {}).await;
    s.room("algebra", "open").await;
    let mut alice_phone = s.client("alice").await;
    let mut alice_laptop = s.client("alice").await;
    let mut bob = s.client("bob").await;
    for c in [&mut alice_phone, &mut alice_laptop, &mut bob] {
        c.join("algebra").await;
    }
    let ok = bob
        .ok(json!({"type":"send","room":"algebra","text":"hello all","client_msg_id":"c1"}))
        .await;
    assert!(
        ok["id"].is_string() && ok["seq"] == 1 && ok["ts"].is_i64(),
        "{ok}"
    );
    for c in [&mut alice_phone, &mut alice_laptop, &mut bob] {
        let m = c.next_of("message").await;
        assert_eq!(m["seq"], 1);
        assert_eq!(m["id"], ok["id"]);
        assert_eq!(m["text"], "hello all");
        assert_eq!(m["room"], "algebra");
        assert_eq!(m["client_msg_id"], "c1");
        assert_eq!(m["from"]["id"], "bob");
        assert_eq!(m["from"]["name"], "BOB");
        assert_eq!(m["reply_to"], serde_json::Value::Null);
    }
    s.stop().await;
}

#[tokio::test]
async fn presence_and_typing_reach_others() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    let mut b = s.client("bob").await;
    let joined = b.join("r").await;
    let online: Vec<_> = joined["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].clone())
        .collect();
    assert_eq!(online, vec![json!("alice"), json!("bob")]);
    let p = a.next_of("presence").await;
    assert_eq!(
        (p["user"]["id"].as_str(), p["state"].as_str()),
        (Some("bob"), Some("online"))
    );
    b.ok(json!({"type":"typing","room":"r"})).await;
    let t = a.next_of("typing").await;
    assert_eq!(t["user"]["id"], "bob");
    b.ok(json!({"type":"leave","room":"r"})).await;
    let p = a.next_of("presence").await;
    assert_eq!(
        (p["user"]["id"].as_str(), p["state"].as_str()),
        (Some("bob"), Some("offline"))
    );
    // Disconnecting also announces offline.
    let mut c = s.client("carol").await;
    c.join("r").await;
    assert_eq!(a.next_of("presence").await["state"], "online");
    drop(c);
    let p = a.next_of("presence").await;
    assert_eq!(
        (p["user"]["id"].as_str(), p["state"].as_str()),
        (Some("carol"), Some("offline"))
    );
    s.stop().await;
}

#[tokio::test]
async fn three_concurrent_senders_one_gap_free_order_for_everyone() {
    let s = Server::sqlite(|_| {}).await;
    s.room("race", "open").await;
    const EACH: usize = 40;
    let mut watchers = Vec::new();
    for u in ["w1", "w2"] {
        let mut c = s.client(u).await;
        c.join("race").await;
        watchers.push(c);
    }
    let mut senders = Vec::new();
    for u in ["s1", "s2", "s3"] {
        let mut c = s.client(u).await;
        c.join("race").await;
        senders.push(c);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut rids = Vec::new();
                for i in 0..EACH {
                    let cid = format!("{}-{i}", c.session);
                    rids.push(c.fire(json!({"type":"send","room":"race","text":format!("m{i}"),"client_msg_id":cid})).await);
                }
                for rid in rids {
                    assert_eq!(c.reply(rid).await["type"], "ok");
                }
                c.messages(3 * EACH).await
            })
        })
        .collect();
    let mut views = Vec::new();
    for t in tasks {
        views.push(within("sender", t).await.unwrap());
    }
    for w in &mut watchers {
        views.push(w.messages(3 * EACH).await);
    }
    let reference: Vec<_> = views[0].iter().map(|m| m["id"].clone()).collect();
    for view in &views {
        let seqs: Vec<i64> = view.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=(3 * EACH) as i64).collect::<Vec<_>>(),
            "gap-free, in order"
        );
        let ids: Vec<_> = view.iter().map(|m| m["id"].clone()).collect();
        assert_eq!(ids, reference, "everyone sees the same order");
    }
    s.stop().await;
}

#[tokio::test]
async fn resending_a_client_msg_id_returns_the_first_ok_and_delivers_nothing() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    let mut w = s.client("watcher").await;
    a.join("r").await;
    w.join("r").await;
    let send = json!({"type":"send","room":"r","text":"once","client_msg_id":"same"});
    let first = a.ok(send.clone()).await;
    let again = a.ok(send.clone()).await;
    assert_eq!(
        (&first["id"], &first["seq"], &first["ts"]),
        (&again["id"], &again["seq"], &again["ts"])
    );
    // From another session of the same user too.
    let mut a2 = s.client("alice").await;
    a2.join("r").await;
    let third = a2.ok(send).await;
    assert_eq!(third["id"], first["id"]);
    // Another user may use the same client_msg_id.
    let other = w
        .ok(json!({"type":"send","room":"r","text":"mine","client_msg_id":"same"}))
        .await;
    assert_eq!(other["seq"], 2);
    let got = w.messages(2).await;
    assert_eq!(got[0]["text"], "once");
    assert_eq!(got[1]["text"], "mine", "the resend delivered nothing");
    s.stop().await;
}

#[tokio::test]
async fn resume_with_after_seq_during_concurrent_sends_has_no_gap_or_duplicate() {
    let s = Server::sqlite(|_| {}).await;
    s.room("live", "open").await;
    const TOTAL: i64 = 300;
    let mut sender = s.client("teacher").await;
    sender.join("live").await;
    let sending = tokio::spawn(async move {
        let mut rids = Vec::new();
        for i in 0..TOTAL {
            rids.push(sender.fire(json!({"type":"send","room":"live","text":format!("n{i}"),"client_msg_id":format!("k{i}")})).await);
            if i % 20 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for rid in rids {
            assert_eq!(sender.reply(rid).await["type"], "ok");
        }
    });
    let mut seen: Vec<i64> = Vec::new();
    let mut reader = s.client("student").await;
    reader
        .ok(json!({"type":"join","room":"live","after_seq":0}))
        .await;
    for round in 0..4 {
        // Read a few, drop the connection, resume from the last seq seen.
        for _ in 0..25 {
            if seen.last() == Some(&TOTAL) {
                break;
            }
            let m = reader.next_of("message").await;
            seen.push(m["seq"].as_i64().unwrap());
        }
        drop(reader);
        reader = s.client("student").await;
        let after = seen.last().copied().unwrap_or(0);
        let ok = reader
            .ok(json!({"type":"join","room":"live","after_seq":after}))
            .await;
        assert_eq!(ok["gap"], false, "round {round}: {ok}");
    }
    while seen.last() != Some(&TOTAL) {
        let m = reader.next_of("message").await;
        seen.push(m["seq"].as_i64().unwrap());
    }
    within("sender done", sending).await.unwrap();
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());
    s.stop().await;
}

#[tokio::test]
async fn resume_beyond_the_replay_limit_says_gap_and_replays_nothing() {
    let s = Server::sqlite(|c| c.replay_limit = 5).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 0..8 {
        a.ok(json!({"type":"send","room":"r","text":"x","client_msg_id":format!("{i}")}))
            .await;
    }
    let mut b = s.client("bob").await;
    let ok = b.ok(json!({"type":"join","room":"r","after_seq":1})).await;
    assert_eq!(ok["gap"], true);
    assert_eq!(ok["last_seq"], 8);
    a.ok(json!({"type":"send","room":"r","text":"live","client_msg_id":"live"}))
        .await;
    let m = b.next_of("message").await;
    assert_eq!(
        (m["seq"].as_i64(), m["text"].as_str()),
        (Some(9), Some("live")),
        "nothing partial, then live"
    );
    // Within the limit the replay comes in order after the ok.
    let mut c = s.client("carol").await;
    let ok = c.ok(json!({"type":"join","room":"r","after_seq":5})).await;
    assert_eq!(ok["gap"], false);
    let seqs: Vec<_> = c
        .messages(4)
        .await
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9]);
    s.stop().await;
}

/// Resumes from a recent seq are replayed from the hub's copy of the room's latest events,
/// resumes from before an edit or a reaction from the store, and both replay what `history`
/// reads from the store: each message as it is stored now.
#[tokio::test]
async fn resumes_replay_recent_events_from_memory_as_the_store_holds_them() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    let send = |i: i64| json!({"type":"send","room":"r","text":format!("t{i}"),"client_msg_id":format!("{i}")});
    let mut ids = vec![];
    for i in 1..=3 {
        ids.push(a.ok(send(i)).await["id"].clone());
    }
    a.ok(json!({"type":"edit","room":"r","id":ids[1],"text":"t2 edited"}))
        .await; // seq 4
    a.ok(json!({"type":"react","room":"r","id":ids[2],"emoji":"👍"}))
        .await; // seq 5
    for i in 6..=7 {
        ids.push(a.ok(send(i)).await["id"].clone());
    }
    // What a resume after each seq replays, and what the store's history holds after it.
    let stored = a.ok(json!({"type":"history","room":"r","limit":100})).await;
    let stored = stored["events"].as_array().unwrap().clone();
    assert_eq!(stored.len(), 7);
    let mut b = s.client("bob").await;
    for after in (0..=7).rev() {
        let ok = b
            .ok(json!({"type":"join","room":"r","after_seq":after}))
            .await;
        let n = ok["replayed"].as_u64().unwrap() as usize;
        let mut got = vec![];
        while got.len() < n {
            let f = b.next().await;
            if f["seq"].is_i64() {
                got.push(f);
            }
        }
        assert_eq!(got, stored[after as usize..], "resume after {after}");
    }
    let replays =
        |text: &str, from: &str| metric(text, &format!("studyhall_replays_{from}_total")) as u64;
    let text = metrics_text(s.addr).await;
    // After 4 to 7 the room's memory holds every event (the reaction at 5 started it again);
    // from further back, the store.
    assert_eq!((replays(&text, "memory"), replays(&text, "store")), (4, 4));
    // An edit of a message held in memory: a resume from before it replays it edited.
    a.ok(json!({"type":"edit","room":"r","id":ids[3],"text":"t6 edited"}))
        .await;
    let ok = b.ok(json!({"type":"join","room":"r","after_seq":5})).await;
    assert_eq!(ok["replayed"], 3);
    // (The edit's live copy came before the reply.)
    let m = b.until("message").await;
    assert_eq!(
        (m["seq"].as_i64(), m["text"].as_str()),
        (Some(6), Some("t6 edited"))
    );
    assert_eq!(b.next_of("message").await["seq"], 7);
    assert_eq!(b.next_of("message_edited").await["seq"], 8);
    let text = metrics_text(s.addr).await;
    assert_eq!((replays(&text, "memory"), replays(&text, "store")), (4, 5));
    // A resume from ahead of the room replays nothing, and live delivery goes on after the
    // room's last seq.
    let ok = b
        .ok(json!({"type":"join","room":"r","after_seq":100}))
        .await;
    assert_eq!(
        (ok["last_seq"].as_i64(), ok["replayed"].as_i64()),
        (Some(8), Some(0))
    );
    a.ok(send(9)).await;
    let m = b.until("message").await;
    assert_eq!(
        (m["seq"].as_i64(), m["text"].as_str()),
        (Some(9), Some("t9"))
    );
    s.stop().await;
}

#[tokio::test]
async fn history_pages_backwards_oldest_first() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 1..=25 {
        a.ok(
            json!({"type":"send","room":"r","text":format!("t{i}"),"client_msg_id":format!("{i}")}),
        )
        .await;
    }
    let seqs = |v: &serde_json::Value| -> Vec<i64> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect()
    };
    let p1 = a.ok(json!({"type":"history","room":"r","limit":10})).await;
    assert_eq!(seqs(&p1), (16..=25).collect::<Vec<_>>());
    assert_eq!(p1["has_more"], true);
    let p2 = a
        .ok(json!({"type":"history","room":"r","before_seq":16,"limit":10}))
        .await;
    assert_eq!(seqs(&p2), (6..=15).collect::<Vec<_>>());
    let p3 = a
        .ok(json!({"type":"history","room":"r","before_seq":6,"limit":10}))
        .await;
    assert_eq!(seqs(&p3), (1..=5).collect::<Vec<_>>());
    assert_eq!(p3["has_more"], false);
    assert_eq!(p3["events"][0]["text"], "t1");
    assert_eq!(
        a.err(json!({"type":"history","room":"r","limit":101}))
            .await,
        "bad_request"
    );
    assert_eq!(
        a.err(json!({"type":"history","room":"r","limit":0})).await,
        "bad_request"
    );
    s.stop().await;
}

#[tokio::test]
async fn edit_delete_react_are_sequenced_and_kept_current_in_history() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    a.join("r").await;
    b.join("r").await;
    let sent = a
        .ok(json!({"type":"send","room":"r","text":"draft","client_msg_id":"1"}))
        .await;
    let id = sent["id"].clone();
    assert_eq!(
        b.err(json!({"type":"edit","room":"r","id":id,"text":"hijack"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        a.ok(json!({"type":"edit","room":"r","id":id,"text":"final"}))
            .await["seq"],
        2
    );
    assert_eq!(
        b.ok(json!({"type":"react","room":"r","id":id,"emoji":"👍"}))
            .await["seq"],
        3
    );
    let again = b
        .ok(json!({"type":"react","room":"r","id":id,"emoji":"👍"}))
        .await;
    assert_eq!(
        again["seq"],
        serde_json::Value::Null,
        "reacting twice changes nothing"
    );
    let reply = b
        .ok(json!({"type":"send","room":"r","text":"re","client_msg_id":"2","reply_to":id}))
        .await;
    assert_eq!(reply["seq"], 4);
    assert_eq!(
        b.err(json!({"type":"send","room":"r","text":"re","client_msg_id":"3","reply_to":"nope"}))
            .await,
        "bad_request"
    );
    let m = b.messages(1).await;
    assert_eq!(m[0]["text"], "draft");
    let edited = b.next_of("message_edited").await;
    assert_eq!(
        (edited["seq"].as_i64(), edited["text"].as_str()),
        (Some(2), Some("final"))
    );
    let r = b.next_of("reaction").await;
    assert_eq!(
        (r["seq"].as_i64(), r["count"].as_i64(), r["added"].as_bool()),
        (Some(3), Some(1), Some(true))
    );
    assert_eq!(r["user"]["id"], "bob");
    let h = a.ok(json!({"type":"history","room":"r"})).await;
    let first = &h["events"][0];
    assert_eq!(first["text"], "final");
    assert!(first["edited_ts"].is_i64());
    assert_eq!(first["reactions"], json!([{"emoji":"👍","count":1}]));
    assert_eq!(
        b.ok(json!({"type":"unreact","room":"r","id":id,"emoji":"👍"}))
            .await["seq"],
        5
    );
    assert_eq!(
        b.err(json!({"type":"delete","room":"r","id":id})).await,
        "forbidden"
    );
    assert_eq!(
        a.ok(json!({"type":"delete","room":"r","id":id})).await["seq"],
        6
    );
    let h = a.ok(json!({"type":"history","room":"r"})).await;
    let first = &h["events"][0];
    assert_eq!(
        (first["text"].as_str(), first["deleted"].as_bool()),
        (Some(""), Some(true)),
        "text erased"
    );
    assert_eq!(h["events"][1]["text"], "", "earlier edits erased too");
    assert_eq!(
        a.err(json!({"type":"edit","room":"r","id":id,"text":"zombie"}))
            .await,
        "not_found"
    );
    s.stop().await;
}

#[tokio::test]
async fn rooms_lists_unread_counts_from_read_markers() {
    let s = Server::sqlite(|_| {}).await;
    s.room("r1", "open").await;
    s.room("r2", "open").await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    for r in ["r1", "r2"] {
        a.join(r).await;
        b.join(r).await;
    }
    for i in 0..3 {
        a.ok(json!({"type":"send","room":"r1","text":"x","client_msg_id":format!("{i}")}))
            .await;
    }
    let rooms = b.ok(json!({"type":"rooms"})).await;
    let list = rooms["rooms"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        (
            list[0]["id"].as_str(),
            list[0]["unread"].as_i64(),
            list[0]["last_seq"].as_i64()
        ),
        (Some("r1"), Some(3), Some(3))
    );
    assert_eq!(list[0]["role"], "member");
    assert_eq!(list[1]["unread"], 0);
    b.ok(json!({"type":"read","room":"r1","seq":2})).await;
    let rooms = b.ok(json!({"type":"rooms"})).await;
    assert_eq!(rooms["rooms"][0]["unread"], 1);
    // A marker past the end is clamped, so later messages still count as unread.
    assert_eq!(
        b.ok(json!({"type":"read","room":"r1","seq":999})).await["seq"],
        3
    );
    a.ok(json!({"type":"send","room":"r1","text":"new","client_msg_id":"later"}))
        .await;
    assert_eq!(b.ok(json!({"type":"rooms"})).await["rooms"][0]["unread"], 1);
    let mine = a.ok(json!({"type":"rooms"})).await;
    assert_eq!(mine["rooms"][0]["unread"], 0, "own messages are not unread");
    s.stop().await;
}

#[tokio::test]
async fn invite_only_rooms_refuse_strangers_and_admit_members_and_grants() {
    let s = Server::sqlite(|_| {}).await;
    s.room("secret", "invite").await;
    let mut carol = s.client("carol").await;
    assert_eq!(
        carol.err(json!({"type":"join","room":"secret"})).await,
        "forbidden"
    );
    assert_eq!(
        carol.err(json!({"type":"history","room":"secret"})).await,
        "forbidden"
    );
    assert_eq!(
        carol
            .err(json!({"type":"send","room":"secret","text":"hi","client_msg_id":"1"}))
            .await,
        "not_member"
    );
    assert_eq!(
        carol.err(json!({"type":"join","room":"nosuch"})).await,
        "not_found"
    );
    assert_eq!(
        carol.err(json!({"type":"join","room":"bad id!"})).await,
        "bad_request"
    );
    let (st, _) = http(
        s.addr,
        "PUT",
        "/api/rooms/secret/members/carol",
        Some(API_KEY),
        Some(json!({"role":"member"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(carol.join("secret").await["role"], "member");
    let mut dave = Client::connect(
        s.addr,
        &token("dave", PlatformRole::Student, &[("secret", RoomRole::Ta)]),
    )
    .await;
    assert_eq!(dave.join("secret").await["role"], "ta");
    // A grant is not stored: the same user with a token without it is a stranger again.
    drop(dave);
    let mut dave_later = s.client("dave").await;
    assert_eq!(
        dave_later.err(json!({"type":"join","room":"secret"})).await,
        "forbidden"
    );
    let mut dave = Client::connect(
        s.addr,
        &token("dave", PlatformRole::Student, &[("secret", RoomRole::Ta)]),
    )
    .await;
    dave.join("secret").await;
    let mut admin = Client::connect(s.addr, &token("root", PlatformRole::Admin, &[])).await;
    assert_eq!(admin.join("secret").await["role"], "host");
    let mut viewer = Client::connect(
        s.addr,
        &token(
            "vic",
            PlatformRole::Student,
            &[("secret", RoomRole::Viewer)],
        ),
    )
    .await;
    viewer.join("secret").await;
    assert_eq!(
        viewer
            .err(json!({"type":"send","room":"secret","text":"hi","client_msg_id":"1"}))
            .await,
        "forbidden",
        "viewers are read-only"
    );
    // A host/ta may delete anyone's message.
    let sent = carol
        .ok(json!({"type":"send","room":"secret","text":"oops","client_msg_id":"1"}))
        .await;
    dave.ok(json!({"type":"delete","room":"secret","id":sent["id"]}))
        .await;
    // Removing a member of an invite-only room ends their live sessions there.
    let (st, _) = http(
        s.addr,
        "DELETE",
        "/api/rooms/secret/members/carol",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(carol.until("kicked").await["reason"], "removed");
    assert_eq!(close_code(&mut carol.ws).await, Some(4003));
    let mut carol = s.client("carol").await;
    assert_eq!(
        carol.err(json!({"type":"join","room":"secret"})).await,
        "forbidden"
    );
    s.stop().await;
}

#[tokio::test]
async fn http_api_manages_rooms_with_the_bearer_key() {
    let s = Server::sqlite(|_| {}).await;
    let room = json!({"id":"bio-1","kind":"live","title":"Biology","visibility":"open","qa":{"enabled":true,"moderated":true},"starts_at":1_900_000_000_000i64});
    let (st, body) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(room.clone()),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(
        (body["kind"].as_str(), body["qa"]["moderated"].as_bool()),
        (Some("live"), Some(true))
    );
    assert_eq!(
        http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(room))
            .await
            .0,
        409
    );
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/api/rooms",
            None,
            Some(json!({"id":"x","kind":"group"}))
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/api/rooms",
            Some("wrong"),
            Some(json!({"id":"x","kind":"group"}))
        )
        .await
        .0,
        401
    );
    let (st, e) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id":"bad id","kind":"group"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (400, Some("bad_request")));
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/api/rooms",
            Some(API_KEY),
            Some(json!({"id":"x","kind":"party"}))
        )
        .await
        .0,
        400
    );
    let (st, got) = http(s.addr, "GET", "/api/rooms/bio-1", Some(API_KEY), None).await;
    assert_eq!((st, got["title"].as_str()), (200, Some("Biology")));
    assert_eq!(
        http(s.addr, "GET", "/api/rooms/none", Some(API_KEY), None)
            .await
            .0,
        404
    );
    let (st, got) = http(
        s.addr,
        "PATCH",
        "/api/rooms/bio-1",
        Some(API_KEY),
        Some(json!({"title":"Bio","starts_at":null})),
    )
    .await;
    assert_eq!(
        (st, got["title"].as_str(), got["starts_at"].is_null()),
        (200, Some("Bio"), true)
    );
    let (st, ann) = http(
        s.addr,
        "POST",
        "/api/rooms/bio-1/messages",
        Some(API_KEY),
        Some(json!({"text":"Exam moved"})),
    )
    .await;
    assert_eq!((st, ann["seq"].as_i64()), (201, Some(1)));
    let (st, page) = http(
        s.addr,
        "GET",
        "/api/rooms/bio-1/messages?after_seq=0&limit=10",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(page["events"][0]["from"]["role"], "system");
    assert_eq!(page["has_more"], false);
    let (st, archived) = http(s.addr, "DELETE", "/api/rooms/bio-1", Some(API_KEY), None).await;
    assert_eq!((st, archived["archived"].as_bool()), (200, Some(true)));
    let mut a = s.client("alice").await;
    a.join("bio-1").await;
    assert_eq!(
        a.err(json!({"type":"send","room":"bio-1","text":"x","client_msg_id":"1"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        http(
            s.addr,
            "DELETE",
            "/api/rooms/bio-1/members/nobody",
            Some(API_KEY),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        http(s.addr, "GET", "/api/rooms/openapi.json", None, None)
            .await
            .0,
        401,
        "only the document is public"
    );
    let (st, doc) = http(s.addr, "GET", "/api/openapi.json", None, None).await;
    assert_eq!((st, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let (st, h) = http(s.addr, "GET", "/healthz", None, None).await;
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));
    s.stop().await;
}

#[tokio::test]
async fn dev_token_endpoint_exists_only_in_dev_mode() {
    let s = Server::sqlite(|_| {}).await;
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/dev/token",
            None,
            Some(json!({"user":"a"}))
        )
        .await
        .0,
        404
    );
    // The web client asks `/client.json` whether to show the dev form (no 404/405 to probe).
    let (st, cfg) = http(s.addr, "GET", "/client.json", None, None).await;
    assert_eq!((st, cfg), (200, json!({"dev_sign_in": false})));
    s.stop().await;
    let s = Server::sqlite(|c| c.dev = true).await;
    let (st, cfg) = http(s.addr, "GET", "/client.json", None, None).await;
    assert_eq!((st, cfg), (200, json!({"dev_sign_in": true})));
    let (st, body) = http(
        s.addr,
        "POST",
        "/dev/token",
        None,
        Some(json!({"user":"ann","name":"Ann","role":"tutor"})),
    )
    .await;
    assert_eq!(st, 200);
    let mut c = Client::connect(s.addr, body["token"].as_str().unwrap()).await;
    assert_eq!(c.ok(json!({"type":"rooms"})).await["rooms"], json!([]));
    // Dev mode has an open lobby to chat in at once.
    assert_eq!(c.join("lobby").await["room"]["title"], "Lobby");
    s.stop().await;
}

/// An SQLite server (`tweak`ed) where alice joined room r and sent one message, and its
/// `/metrics` text after the `ok`.
async fn metrics_after_one_send(
    tweak: impl FnOnce(&mut studyhall::config::Config),
) -> (Server, String) {
    let s = Server::sqlite(tweak).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    a.ok(json!({"type":"send","room":"r","text":"x","client_msg_id":"1"}))
        .await;
    let text = metrics_text(s.addr).await;
    (s, text)
}

/// At SQLite's `full` with `sqlite_commit_syncs = false` the writer's commits do not sync;
/// the log is synced before a batch is answered (counted in
/// `studyhall_store_log_sync_seconds`). By default each `COMMIT` syncs instead.
#[tokio::test]
async fn an_ok_waits_for_the_log_sync_unless_each_commit_syncs() {
    for commit_syncs in [false, true] {
        let (s, text) = metrics_after_one_send(|c| c.sqlite_commit_syncs = commit_syncs).await;
        let syncs: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("studyhall_store_log_sync_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no log sync count in\n{text}"));
        if commit_syncs {
            assert_eq!(syncs, 0, "each COMMIT syncs: the publisher does not");
        } else {
            assert!(syncs >= 1, "the send's batch was synced before its ok");
        }
        s.stop().await;
    }
}

#[tokio::test]
async fn metrics_report_commands_deliveries_and_batches() {
    let (s, text) = metrics_after_one_send(|_| {}).await;
    for needle in [
        "studyhall_connections 1",
        "studyhall_commands_total{type=\"send\"} 1",
        "studyhall_deliveries_total 1",
        "studyhall_store_batch_rows_count",
        "studyhall_store_commit_seconds_bucket",
        "studyhall_slow_consumer_closes_total 0",
        "studyhall_rooms_active 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let seen: HashSet<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
    assert!(seen.len() > 10);
    s.stop().await;
}
