//! Polls, quizzes and word clouds over WebSockets: rights, validation, one answer per user
//! (changeable while open, refused once closed), results for members only as `show_results`
//! allows, a quiz's `correct` hidden until close, word counts, the close by `duration_s` (also
//! across a restart), replay on join, coalesced results updates, and PostgreSQL.

use crate::common::*;
use serde_json::{Value, json};
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

/// The next `poll` event (skipping `hidden` ones and other noise).
async fn next_poll(c: &mut Client) -> Value {
    c.until("poll").await
}

async fn create(h: &mut Client, room: &str, extra: Value) -> Value {
    let mut cmd = json!({"type":"poll_create","room":room,"kind":"poll","question":"Best day?",
        "options":["Mon","Tue","Wed"]});
    if let (Some(c), Some(e)) = (cmd.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    h.ok(cmd).await["poll"].clone()
}

async fn life_cycle(s: &Server) {
    s.room("p", "open").await;
    let mut h = host(s, "p").await;
    let mut a = member(s, "ann", "p").await;
    let made = h
        .ok(
            json!({"type":"poll_create","room":"p","kind":"poll","question":"Best day?",
            "options":["Mon","Tue","Wed"]}),
        )
        .await;
    let poll = made["poll"].clone();
    assert_eq!(poll["state"], "draft");
    assert_eq!(made["seq"], 1);
    let id = poll["id"].as_str().unwrap().to_owned();
    // Members see a draft as `hidden`, and not in the listing.
    assert_eq!(a.until("hidden").await["seq"], 1);
    assert_eq!(
        a.ok(json!({"type":"polls","room":"p"})).await["polls"],
        json!([])
    );
    for cmd in [
        json!({"type":"poll_create","room":"p","kind":"poll","question":"q","options":["a","b"]}),
        json!({"type":"poll_open","room":"p","poll":id}),
        json!({"type":"poll_close","room":"p","poll":id}),
    ] {
        assert_eq!(a.err(cmd).await, "forbidden");
    }
    assert_eq!(
        a.err(json!({"type":"poll_answer","room":"p","poll":id,"choices":[0]}))
            .await,
        "conflict",
        "a draft takes no answers"
    );
    h.ok(json!({"type":"poll_open","room":"p","poll":id})).await;
    let opened = next_poll(&mut a).await;
    assert_eq!(
        (opened["poll"]["state"].as_str(), opened["change"].as_str()),
        (Some("open"), Some("opened"))
    );
    assert_eq!(opened["poll"]["results"]["counts"], json!([0, 0, 0]));
    let ok = a
        .ok(json!({"type":"poll_answer","room":"p","poll":id,"choices":[0]}))
        .await;
    assert_eq!(ok["choices"], json!([0]));
    for (cmd, code) in [
        (json!({"choices":[3]}), "bad_request"),
        (json!({"choices":[0, 1]}), "bad_request"),
        (json!({"choices":[]}), "bad_request"),
        (json!({"text":"hi"}), "bad_request"),
    ] {
        let mut c = json!({"type":"poll_answer","room":"p","poll":id});
        c.as_object_mut()
            .unwrap()
            .extend(cmd.as_object().unwrap().clone());
        assert_eq!(a.err(c).await, code);
    }
    assert_eq!(
        a.err(json!({"type":"poll_answer","room":"p","poll":"nope","choices":[0]}))
            .await,
        "not_found"
    );
    // Changed while open: the last answer counts, once.
    a.ok(json!({"type":"poll_answer","room":"p","poll":id,"choices":[2]}))
        .await;
    let closed = h
        .ok(json!({"type":"poll_close","room":"p","poll":id}))
        .await;
    assert_eq!(closed["poll"]["state"], "closed");
    assert_eq!(closed["poll"]["results"]["counts"], json!([0, 0, 1]));
    assert_eq!(closed["poll"]["results"]["answers"], 1);
    loop {
        let ev = next_poll(&mut a).await;
        if ev["poll"]["state"] == "closed" {
            assert_eq!(ev["poll"]["results"]["counts"], json!([0, 0, 1]));
            break;
        }
    }
    assert_eq!(
        a.err(json!({"type":"poll_answer","room":"p","poll":id,"choices":[1]}))
            .await,
        "conflict",
        "a closed poll takes no answers"
    );
    assert_eq!(
        h.ok(json!({"type":"poll_close","room":"p","poll":id}))
            .await["seq"],
        Value::Null,
        "closing twice changes nothing"
    );
    assert_eq!(
        h.err(json!({"type":"poll_open","room":"p","poll":id}))
            .await,
        "conflict"
    );
}

#[tokio::test]
async fn rights_answers_and_the_life_of_a_poll() {
    on_sqlite(|_| {}, life_cycle).await;
}

#[tokio::test]
async fn rights_answers_and_the_life_of_a_poll_on_postgres() {
    on_postgres(|_| {}, life_cycle).await;
}

#[tokio::test]
async fn new_polls_are_validated() {
    let s = Server::sqlite(|c| c.poll_max_options = 3).await;
    s.room("v", "open").await;
    let mut h = host(&s, "v").await;
    let base = |extra: Value| {
        let mut c = json!({"type":"poll_create","room":"v","question":"q"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    for extra in [
        json!({"kind":"poll","options":["only"]}),
        json!({"kind":"poll","options":["a","b","c","d"]}),
        json!({"kind":"poll","options":["a",""]}),
        json!({"kind":"poll","options":["a","b"],"correct":[0]}),
        json!({"kind":"quiz","options":["a","b"]}),
        json!({"kind":"quiz","options":["a","b"],"correct":[2]}),
        json!({"kind":"quiz","options":["a","b"],"correct":[0,1]}),
        json!({"kind":"word_cloud","options":["a","b"]}),
        json!({"kind":"poll","options":["a","b"],"duration_s":0}),
        json!({"kind":"survey","options":["a","b"]}),
        json!({"kind":"poll","options":["a","b"],"show_results":"never"}),
    ] {
        assert_eq!(h.err(base(extra.clone())).await, "bad_request", "{extra}");
    }
    let quiz = h
        .ok(base(
            json!({"kind":"quiz","options":["a","b"],"correct":[1]}),
        ))
        .await;
    assert_eq!(quiz["poll"]["show_results"], "after_close");
    assert_eq!(quiz["poll"]["correct"], json!([1]));
    s.stop().await;
}

#[tokio::test]
async fn results_reach_members_live_or_after_close_and_host_always() {
    let s = Server::sqlite(|c| c.poll_results_interval_ms = 50).await;
    s.room("r", "open").await;
    let mut h = host(&s, "r").await;
    let mut a = member(&s, "ann", "r").await;
    let live = create(&mut h, "r", json!({})).await["id"].clone();
    let later = create(&mut h, "r", json!({"show_results":"after_close"})).await["id"].clone();
    for id in [&live, &later] {
        h.ok(json!({"type":"poll_open","room":"r","poll":id})).await;
        a.ok(json!({"type":"poll_answer","room":"r","poll":id,"choices":[1]}))
            .await;
    }
    // A live poll's results update reaches the member; the other's does not.
    loop {
        let ev = next_poll(&mut a).await;
        if ev["change"] == "results" {
            assert_eq!(ev["poll"]["id"], live);
            assert_eq!(ev["poll"]["results"]["counts"], json!([0, 1, 0]));
            break;
        }
        if ev["poll"]["id"] == later {
            assert!(ev["poll"].get("results").is_none(), "{ev}");
        }
    }
    let listed = a.ok(json!({"type":"polls","room":"r"})).await;
    let by_id = |v: &Value, id: &Value| {
        v["polls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| &p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id(&listed, &live)["results"]["answers"], 1);
    assert!(by_id(&listed, &later).get("results").is_none());
    let hosted = h.ok(json!({"type":"polls","room":"r"})).await;
    assert_eq!(
        by_id(&hosted, &later)["results"]["counts"],
        json!([0, 1, 0])
    );
    h.ok(json!({"type":"poll_close","room":"r","poll":later}))
        .await;
    let listed = a.ok(json!({"type":"polls","room":"r"})).await;
    assert_eq!(
        by_id(&listed, &later)["results"]["counts"],
        json!([0, 1, 0])
    );
    s.stop().await;
}

#[tokio::test]
async fn a_quiz_reveals_correct_only_when_closed() {
    let s = Server::sqlite(|_| {}).await;
    s.room("q", "open").await;
    let mut h = host(&s, "q").await;
    let mut a = member(&s, "ann", "q").await;
    let quiz = create(&mut h, "q", json!({"kind":"quiz","correct":[2]})).await;
    let id = quiz["id"].clone();
    h.ok(json!({"type":"poll_open","room":"q","poll":id})).await;
    let opened = next_poll(&mut a).await;
    assert!(opened["poll"].get("correct").is_none(), "{opened}");
    assert!(opened["poll"].get("results").is_none(), "{opened}");
    a.ok(json!({"type":"poll_answer","room":"q","poll":id,"choices":[2]}))
        .await;
    let listed = a.ok(json!({"type":"polls","room":"q"})).await;
    assert!(listed["polls"][0].get("correct").is_none());
    let hosted = h.ok(json!({"type":"polls","room":"q"})).await;
    assert_eq!(hosted["polls"][0]["correct"], json!([2]));
    h.ok(json!({"type":"poll_close","room":"q","poll":id}))
        .await;
    let closed = loop {
        let ev = next_poll(&mut a).await;
        if ev["poll"]["state"] == "closed" {
            break ev;
        }
    };
    assert_eq!(closed["poll"]["correct"], json!([2]));
    assert_eq!(closed["poll"]["results"]["counts"], json!([0, 0, 1]));
    s.stop().await;
}

#[tokio::test]
async fn a_word_cloud_counts_lowercased_words() {
    let s = Server::sqlite(|c| c.poll_max_text_chars = 20).await;
    s.room("w", "open").await;
    let mut h = host(&s, "w").await;
    let cloud = h
        .ok(json!({"type":"poll_create","room":"w","kind":"word_cloud","question":"One word?"}))
        .await["poll"]
        .clone();
    let id = cloud["id"].clone();
    h.ok(json!({"type":"poll_open","room":"w","poll":id})).await;
    for (user, text) in [("ann", "Rust"), ("bob", "rust, Go"), ("cy", "GO rust")] {
        let mut c = member(&s, user, "w").await;
        c.ok(json!({"type":"poll_answer","room":"w","poll":id,"text":text}))
            .await;
        assert_eq!(
            c.err(json!({"type":"poll_answer","room":"w","poll":id,"choices":[0]}))
                .await,
            "bad_request"
        );
        assert_eq!(
            c.err(json!({"type":"poll_answer","room":"w","poll":id,"text":"x".repeat(21)}))
                .await,
            "too_large"
        );
    }
    let closed = h
        .ok(json!({"type":"poll_close","room":"w","poll":id}))
        .await;
    assert_eq!(
        closed["poll"]["results"],
        json!({"answers":3,"words":[{"word":"rust","count":3},{"word":"go","count":2}]})
    );
    s.stop().await;
}

#[tokio::test]
async fn duration_closes_a_poll_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let tweak = |url: &str| {
        let mut c = base_config(url.to_owned());
        c.class_clock_ms = 50;
        c
    };
    let s = Server::start(tweak(&url)).await;
    s.room("d", "open").await;
    let mut h = host(&s, "d").await;
    let id = create(&mut h, "d", json!({"duration_s":1})).await["id"].clone();
    let opened = h.ok(json!({"type":"poll_open","room":"d","poll":id})).await;
    assert!(opened["poll"]["closes_at"].is_i64());
    let mut a = member(&s, "ann", "d").await;
    let closed = loop {
        let ev = next_poll(&mut a).await;
        if ev["poll"]["state"] == "closed" {
            break ev;
        }
    };
    assert_eq!(closed["change"], "closed");
    // Opened again on a second poll, then the server stops before it is due: the next start
    // closes it.
    let id2 = create(&mut h, "d", json!({"duration_s":1})).await["id"].clone();
    let seq = h
        .ok(json!({"type":"poll_open","room":"d","poll":id2}))
        .await["seq"]
        .as_i64()
        .unwrap();
    drop((h, a));
    s.stop().await;
    let s = Server::start(tweak(&url)).await;
    let mut a = s.client("ann").await;
    a.ok(json!({"type":"join","room":"d","after_seq":seq}))
        .await;
    let ev = next_poll(&mut a).await;
    assert_eq!(
        (ev["poll"]["id"].clone(), ev["poll"]["state"].as_str()),
        (id2, Some("closed"))
    );
    s.stop().await;
}

#[tokio::test]
async fn poll_events_are_replayed_on_join() {
    let s = Server::sqlite(|_| {}).await;
    s.room("j", "open").await;
    let mut h = host(&s, "j").await;
    let id = create(&mut h, "j", json!({})).await["id"].clone();
    h.ok(json!({"type":"poll_open","room":"j","poll":id})).await;
    h.ok(json!({"type":"poll_close","room":"j","poll":id}))
        .await;
    let mut a = s.client("ann").await;
    let joined = a.ok(json!({"type":"join","room":"j","after_seq":0})).await;
    assert_eq!(joined["replayed"], 3);
    assert_eq!(a.next_of("hidden").await["seq"], 1);
    let states: Vec<Value> = [a.next_of("poll").await, a.next_of("poll").await]
        .iter()
        .map(|e| json!([e["seq"], e["poll"]["state"]]))
        .collect();
    assert_eq!(states, vec![json!([2, "open"]), json!([3, "closed"])]);
    // Host/ta get the draft itself.
    let mut t = Client::connect(
        s.addr,
        &token("ta", PlatformRole::Student, &[("j", RoomRole::Ta)]),
    )
    .await;
    t.ok(json!({"type":"join","room":"j","after_seq":0})).await;
    assert_eq!(t.next_of("poll").await["poll"]["state"], "draft");
    s.stop().await;
}

#[tokio::test]
async fn a_burst_of_answers_makes_few_results_updates() {
    let s = Server::sqlite(|c| c.poll_results_interval_ms = 500).await;
    s.room("b", "open").await;
    let mut h = host(&s, "b").await;
    let id = create(&mut h, "b", json!({})).await["id"].clone();
    h.ok(json!({"type":"poll_open","room":"b","poll":id})).await;
    let n = 40;
    let mut students = Vec::new();
    for i in 0..n {
        students.push(member(&s, &format!("s{i}"), "b").await);
    }
    let mut rids = Vec::new();
    for (i, c) in students.iter_mut().enumerate() {
        let choice = i % 3;
        rids.push(
            c.fire(json!({"type":"poll_answer","room":"b","poll":id,"choices":[choice]}))
                .await,
        );
    }
    for (c, rid) in students.iter_mut().zip(rids) {
        assert_eq!(c.reply(rid).await["type"], "ok");
    }
    let mut updates = 0;
    loop {
        let ev = next_poll(&mut h).await;
        if ev["change"] != "results" {
            continue;
        }
        updates += 1;
        if ev["poll"]["results"]["answers"] == n {
            assert_eq!(ev["poll"]["results"]["counts"], json!([14, 13, 13]));
            break;
        }
    }
    assert!(updates <= 5, "{updates} results updates for {n} answers");
    s.stop().await;
}

/// A restart in the middle of an open poll and a live board loses nothing: the answers given
/// before it count after it (and can still be changed), and the board's strokes are all there
/// for a client syncing afresh (each was logged before its ok).
#[tokio::test]
async fn a_restart_mid_poll_and_mid_board_loses_nothing() {
    use crate::boards::{board, insert, read, text};
    use yrs::sync::{Message, SyncMessage};
    use yrs::{Doc, StateVector};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    // The saver looks only every minute here: the update log keeps the strokes.
    let tweak = |url: &str| {
        let mut c = base_config(url.to_owned());
        c.board_save_ms = 60_000;
        c
    };
    let s = Server::start(tweak(&url)).await;
    s.room("r", "open").await;
    let mut h = host(&s, "r").await;
    let id = create(&mut h, "r", json!({})).await["id"].clone();
    h.ok(json!({"type":"poll_open","room":"r","poll":id})).await;
    let mut ann = member(&s, "ann", "r").await;
    let mut bob = member(&s, "bob", "r").await;
    ann.ok(json!({"type":"poll_answer","room":"r","poll":id,"choices":[0]}))
        .await;
    bob.ok(json!({"type":"poll_answer","room":"r","poll":id,"choices":[2]}))
        .await;
    let doc = Doc::new();
    for (at, word) in [(0, "strokes "), (8, "survive")] {
        h.ok(board("r", &insert(&doc, at, word))).await;
    }
    drop((h, ann, bob));
    s.stop().await;

    let s = Server::start(tweak(&url)).await;
    let mut h = host(&s, "r").await;
    let polls = h.ok(json!({"type":"polls","room":"r"})).await;
    let poll = &polls["polls"][0];
    assert_eq!(poll["state"], "open", "{polls}");
    assert_eq!(poll["results"]["answers"], 2, "{polls}");
    assert_eq!(poll["results"]["counts"], json!([1, 0, 1]), "{polls}");
    // Still open: Ann changes her answer, and the count follows.
    let mut ann = member(&s, "ann", "r").await;
    ann.ok(json!({"type":"poll_answer","room":"r","poll":id,"choices":[1]}))
        .await;
    let closed = h
        .ok(json!({"type":"poll_close","room":"r","poll":id}))
        .await;
    assert_eq!(
        closed["poll"]["results"]["counts"],
        json!([0, 1, 1]),
        "{closed}"
    );
    // The board: a fresh client's step 1 gets every stroke.
    let step1 = Message::Sync(SyncMessage::SyncStep1(StateVector::default()));
    ann.ok(board("r", &step1)).await;
    let fresh = Doc::new();
    loop {
        if let m @ Message::Sync(SyncMessage::SyncStep2(_)) = read(&ann.until("board").await) {
            crate::boards::apply(&fresh, m);
            break;
        }
    }
    assert_eq!(text(&fresh), "strokes survive");
    s.stop().await;
}
