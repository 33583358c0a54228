//! Live Q&A over WebSockets: ask/vote/answer/status with rights, anonymous and moderated
//! questions, exact votes under concurrency, questions before `starts_at`, the answer SLA,
//! the FAQ export, search and resume.

use crate::common::*;
use serde_json::{Value, json};
use studyhall::protocol::{PlatformRole, RoomRole};

async fn live_room(s: &Server, id: &str, extra: Value) {
    let mut body = json!({"id": id, "kind": "live", "title": id});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (st, resp) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(body)).await;
    assert_eq!(st, 201, "{resp}");
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

async fn member(s: &Server, user: &str, room: &str) -> Client {
    let mut c = s.client(user).await;
    c.join(room).await;
    c
}

#[tokio::test]
async fn ask_vote_answer_and_status_with_rights() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "lec", json!({})).await;
    let mut t = host(&s, "lec").await;
    let mut a = member(&s, "ann", "lec").await;
    let mut b = member(&s, "bob", "lec").await;
    let asked = a
        .ok(json!({"type":"ask","room":"lec","text":"What is a monoid?"}))
        .await;
    assert_eq!(
        (asked["status"].as_str(), asked["seq"].as_i64()),
        (Some("open"), Some(1))
    );
    let qid = asked["id"].clone();
    for c in [&mut t, &mut a, &mut b] {
        let q = c.next_of("question").await;
        assert_eq!(
            (q["id"].clone(), q["seq"].as_i64(), q["votes"].as_i64()),
            (qid.clone(), Some(1), Some(0))
        );
        assert_eq!(q["author"]["id"], "ann");
        assert_eq!(q["text"], "What is a monoid?");
    }
    assert_eq!(
        b.ok(json!({"type":"vote","room":"lec","question":qid,"up":true}))
            .await["seq"],
        2
    );
    assert_eq!(
        b.ok(json!({"type":"vote","room":"lec","question":qid,"up":true}))
            .await["seq"],
        Value::Null,
        "one vote per user"
    );
    let up = a.next_of("question_updated").await;
    assert_eq!(
        (up["votes"].as_i64(), up["change"].as_str()),
        (Some(1), Some("vote"))
    );
    assert_eq!(
        b.err(json!({"type":"answer","room":"lec","question":qid,"text":"me!"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        b.err(json!({"type":"question_status","room":"lec","question":qid,"status":"pinned"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        t.err(json!({"type":"question_status","room":"lec","question":qid,"status":"weird"}))
            .await,
        "bad_request"
    );
    t.ok(json!({"type":"question_status","room":"lec","question":qid,"status":"pinned"}))
        .await;
    let ans = t.ok(json!({"type":"answer","room":"lec","question":qid,"text":"A semigroup with identity."})).await;
    assert_eq!(ans["seq"], 4);
    let done = a.next_of("question_updated").await;
    assert_eq!(done["change"], "status");
    let done = a.next_of("question_updated").await;
    assert_eq!(
        (done["status"].as_str(), done["change"].as_str()),
        (Some("answered"), Some("answer"))
    );
    assert_eq!(done["answers"][0]["text"], "A semigroup with identity.");
    assert_eq!(done["answers"][0]["author"]["role"], "host");
    assert!(done["answered_at"].is_i64());
    b.ok(json!({"type":"vote","room":"lec","question":qid,"up":false}))
        .await;
    // Listing: top is by votes then age; recent newest first.
    let q2 = a
        .ok(json!({"type":"ask","room":"lec","text":"Second?"}))
        .await["id"]
        .clone();
    b.ok(json!({"type":"vote","room":"lec","question":q2,"up":true}))
        .await;
    let top = a
        .ok(json!({"type":"questions","room":"lec","sort":"top"}))
        .await;
    let ids: Vec<_> = top["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["id"].clone())
        .collect();
    assert_eq!(ids, vec![q2.clone(), qid.clone()]);
    let recent = a
        .ok(json!({"type":"questions","room":"lec","sort":"recent"}))
        .await;
    assert_eq!(recent["questions"][0]["id"], q2);
    let answered = a
        .ok(json!({"type":"questions","room":"lec","status":"answered"}))
        .await;
    assert_eq!(answered["questions"].as_array().unwrap().len(), 1);
    assert_eq!(
        a.err(json!({"type":"questions","room":"lec","sort":"best"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        a.err(json!({"type":"ask","room":"lec","text":"x".repeat(1001)}))
            .await,
        "too_large"
    );
    let mut v = Client::connect(
        s.addr,
        &token("vic", PlatformRole::Student, &[("lec", RoomRole::Viewer)]),
    )
    .await;
    v.join("lec").await;
    assert_eq!(
        v.err(json!({"type":"ask","room":"lec","text":"hi"})).await,
        "forbidden"
    );
    assert_eq!(
        v.err(json!({"type":"vote","room":"lec","question":q2,"up":true}))
            .await,
        "forbidden"
    );
    // Q&A is off in a plain group room unless enabled; peer answers when the room allows.
    s.room("grp", "open").await;
    a.join("grp").await;
    assert_eq!(
        a.err(json!({"type":"ask","room":"grp","text":"hi"})).await,
        "forbidden"
    );
    let (st, _) = http(
        s.addr,
        "PATCH",
        "/api/rooms/grp",
        Some(API_KEY),
        Some(json!({"qa":{"enabled":true,"peer_answers":true}})),
    )
    .await;
    assert_eq!(st, 200);
    let q3 = a
        .ok(json!({"type":"ask","room":"grp","text":"Anyone?"}))
        .await["id"]
        .clone();
    b.join("grp").await;
    b.ok(json!({"type":"answer","room":"grp","question":q3,"text":"Me, a peer."}))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn anonymous_questions_hide_the_author_from_members_only() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "lec", json!({})).await;
    let mut t = host(&s, "lec").await;
    let mut a = member(&s, "ann", "lec").await;
    let mut b = member(&s, "bob", "lec").await;
    a.ok(json!({"type":"ask","room":"lec","text":"Shy question","anonymous":true}))
        .await;
    let for_host = t.next_of("question").await;
    assert_eq!(
        (
            for_host["author"]["id"].as_str(),
            for_host["anonymous"].as_bool()
        ),
        (Some("ann"), Some(true))
    );
    for c in [&mut a, &mut b] {
        let q = c.next_of("question").await;
        assert_eq!(
            (q["author"].clone(), q["anonymous"].as_bool()),
            (Value::Null, Some(true))
        );
    }
    let listed = b.ok(json!({"type":"questions","room":"lec"})).await;
    assert_eq!(listed["questions"][0]["author"], Value::Null);
    assert_eq!(
        t.ok(json!({"type":"questions","room":"lec"})).await["questions"][0]["author"]["id"],
        "ann"
    );
    let h = b.ok(json!({"type":"history","room":"lec"})).await;
    assert_eq!(h["events"][0]["author"], Value::Null);
    let h = t.ok(json!({"type":"history","room":"lec"})).await;
    assert_eq!(h["events"][0]["author"]["id"], "ann");
    // The HTTP API (server-to-server) sees the author, for moderation.
    let (_, page) = http(
        s.addr,
        "GET",
        "/api/rooms/lec/messages",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(page["events"][0]["author"]["id"], "ann");
    s.stop().await;
}

#[tokio::test]
async fn pending_questions_are_invisible_to_members_until_approved_and_seq_stays_gap_free() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "mod", json!({"qa":{"enabled":true,"moderated":true}})).await;
    let mut t = host(&s, "mod").await;
    let mut a = member(&s, "ann", "mod").await;
    let mut b = member(&s, "bob", "mod").await;
    let asked = a
        .ok(json!({"type":"ask","room":"mod","text":"Pending one"}))
        .await;
    assert_eq!(asked["status"], "pending");
    let qid = asked["id"].clone();
    let hidden = b.next().await;
    assert_eq!(
        (hidden["type"].as_str(), hidden["seq"].as_i64()),
        (Some("hidden"), Some(1)),
        "{hidden}"
    );
    assert!(hidden.get("text").is_none());
    let full = t.next_of("question").await;
    assert_eq!(
        (full["status"].as_str(), full["text"].as_str()),
        (Some("pending"), Some("Pending one"))
    );
    assert_eq!(
        b.ok(json!({"type":"questions","room":"mod"})).await["questions"],
        json!([])
    );
    assert_eq!(
        b.ok(json!({"type":"questions","room":"mod","status":"pending"}))
            .await["questions"],
        json!([])
    );
    assert_eq!(
        t.ok(json!({"type":"questions","room":"mod","status":"pending"}))
            .await["questions"][0]["id"],
        qid
    );
    assert_eq!(
        b.err(json!({"type":"vote","room":"mod","question":qid,"up":true}))
            .await,
        "not_found"
    );
    assert_eq!(
        b.ok(json!({"type":"search","room":"mod","q":"pending"}))
            .await["results"],
        json!([])
    );
    assert_eq!(
        t.ok(json!({"type":"search","room":"mod","q":"pending"}))
            .await["results"][0]["id"],
        qid
    );
    // The host's own questions need no approval.
    assert_eq!(
        t.ok(json!({"type":"ask","room":"mod","text":"From the host"}))
            .await["status"],
        "open"
    );
    t.ok(json!({"type":"question_status","room":"mod","question":qid,"status":"approved"}))
        .await;
    let seen: Vec<Value> = vec![b.next().await, b.next().await];
    assert_eq!(seen[0]["type"], "question");
    assert_eq!(
        (
            seen[1]["type"].as_str(),
            seen[1]["status"].as_str(),
            seen[1]["seq"].as_i64()
        ),
        (Some("question_updated"), Some("open"), Some(3))
    );
    b.ok(json!({"type":"vote","room":"mod","question":qid,"up":true}))
        .await;
    // Dismissing a question that was never approved keeps it hidden from members.
    let spam = a
        .ok(json!({"type":"ask","room":"mod","text":"buy followers now"}))
        .await["id"]
        .clone();
    t.ok(json!({"type":"question_status","room":"mod","question":spam,"status":"dismissed"}))
        .await;
    let listed = b.ok(json!({"type":"questions","room":"mod"})).await;
    assert!(
        listed["questions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["id"] != spam)
    );
    assert_eq!(
        b.ok(json!({"type":"search","room":"mod","q":"followers"}))
            .await["results"],
        json!([])
    );
    assert_eq!(
        b.err(json!({"type":"vote","room":"mod","question":spam,"up":true}))
            .await,
        "not_found"
    );
    assert_eq!(
        b.err(json!({"type":"report","room":"mod","id":spam,"reason":"spam"}))
            .await,
        "not_found"
    );
    let (_, page) = http(
        s.addr,
        "GET",
        "/api/rooms/mod/messages?after_seq=0",
        Some(API_KEY),
        None,
    )
    .await;
    let spam_events = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["id"] == spam)
        .count();
    assert_eq!(spam_events, 2, "host/ta and the API still see it");
    let h = b.ok(json!({"type":"history","room":"mod"})).await;
    assert!(
        h["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != spam),
        "members' history hides it"
    );
    // Resume covers Q&A: a member replaying from 0 sees hidden, question, question_updated...
    let mut late = s.client("late").await;
    late.ok(json!({"type":"join","room":"mod","after_seq":0}))
        .await;
    let kinds: Vec<String> = [
        late.next().await,
        late.next().await,
        late.next().await,
        late.next().await,
    ]
    .iter()
    .map(|e| format!("{}:{}", e["type"].as_str().unwrap(), e["seq"]))
    .collect();
    assert_eq!(
        kinds,
        [
            "hidden:1",
            "question:2",
            "question_updated:3",
            "question_updated:4"
        ]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_of_100_users_at_once_are_all_counted() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "big", json!({})).await;
    let mut a = member(&s, "asker", "big").await;
    let qid = a
        .ok(json!({"type":"ask","room":"big","text":"Vote for me"}))
        .await["id"]
        .clone();
    let mut voters = Vec::new();
    for i in 0..100 {
        voters.push(member(&s, &format!("v{i}"), "big").await);
    }
    let tasks: Vec<_> = voters
        .into_iter()
        .map(|mut c| {
            let qid = qid.clone();
            tokio::spawn(async move {
                let r = c
                    .request(json!({"type":"vote","room":"big","question":qid,"up":true}))
                    .await;
                assert_eq!(r["type"], "ok", "{r}");
                c
            })
        })
        .collect();
    for t in tasks {
        within("vote", t).await.unwrap();
    }
    let listed = a.ok(json!({"type":"questions","room":"big"})).await;
    assert_eq!(listed["questions"][0]["votes"], 100);
    let mut last = 0;
    for _ in 0..100 {
        last = a.until("question_updated").await["votes"].as_i64().unwrap();
    }
    assert_eq!(last, 100);
    s.stop().await;
}

#[tokio::test]
async fn questions_are_collected_before_the_session_starts() {
    let s = Server::sqlite(|_| {}).await;
    let tomorrow = studyhall::store::now_ms() + 86_400_000;
    live_room(&s, "soon", json!({"starts_at": tomorrow})).await;
    let mut a = member(&s, "ann", "soon").await;
    let mut b = member(&s, "bob", "soon").await;
    let q = a
        .ok(json!({"type":"ask","room":"soon","text":"Early bird?"}))
        .await["id"]
        .clone();
    b.ok(json!({"type":"vote","room":"soon","question":q,"up":true}))
        .await;
    let mut t = host(&s, "soon").await;
    let top = t
        .ok(json!({"type":"questions","room":"soon","sort":"top"}))
        .await;
    assert_eq!(
        (
            top["questions"][0]["id"].clone(),
            top["questions"][0]["votes"].as_i64()
        ),
        (q, Some(1))
    );
    s.stop().await;
}

#[tokio::test]
async fn unanswered_questions_past_the_sla_are_flagged_listed_and_announced_once() {
    let s = Server::sqlite(|c| c.sla_check_interval_ms = 50).await;
    live_room(&s, "sla", json!({"answer_sla_s": 1})).await;
    let mut t = host(&s, "sla").await;
    let mut a = member(&s, "ann", "sla").await;
    let q1 = a
        .ok(json!({"type":"ask","room":"sla","text":"Quick one"}))
        .await["id"]
        .clone();
    let q2 = a
        .ok(json!({"type":"ask","room":"sla","text":"Answered fast"}))
        .await["id"]
        .clone();
    t.ok(json!({"type":"answer","room":"sla","question":q2,"text":"Done"}))
        .await;
    let due = t.until("question_overdue").await;
    assert_eq!(due["id"], q1);
    let listed = t
        .ok(json!({"type":"questions","room":"sla","status":"overdue"}))
        .await;
    let ids: Vec<_> = listed["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["id"].clone())
        .collect();
    assert_eq!(ids, vec![q1.clone()]);
    let (st, api) = http(
        s.addr,
        "GET",
        "/api/rooms/sla/questions?overdue=true",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!((st, api["questions"].as_array().unwrap().len()), (200, 1));
    assert_eq!(api["questions"][0]["overdue"], true);
    // Announced once: the next frame the host gets is the answer it triggers itself.
    t.ok(json!({"type":"answer","room":"sla","question":q1,"text":"Late"}))
        .await;
    let next = t.until("question_updated").await;
    assert_eq!(next["overdue"], false);
    assert!(t.pending.iter().all(|f| f["type"] != "question_overdue"));
    let (_, api) = http(
        s.addr,
        "GET",
        "/api/rooms/sla/questions?overdue=true",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(api["questions"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn faq_export_in_json_and_markdown() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "faq", json!({"title": "Algebra"})).await;
    let mut t = host(&s, "faq").await;
    let mut a = member(&s, "ann", "faq").await;
    let q1 = a
        .ok(json!({"type":"ask","room":"faq","text":"Less popular?"}))
        .await["id"]
        .clone();
    let q2 = a
        .ok(json!({"type":"ask","room":"faq","text":"Most popular?"}))
        .await["id"]
        .clone();
    a.ok(json!({"type":"ask","room":"faq","text":"Never answered"}))
        .await;
    let q3 = a
        .ok(json!({"type":"ask","room":"faq","text":"<img src=x onerror=alert(1)>\n# Injected"}))
        .await["id"]
        .clone();
    t.ok(json!({"type":"answer","room":"faq","question":q3,"text":"line\n# heading\n[link](http://evil)"}))
        .await;
    a.ok(json!({"type":"vote","room":"faq","question":q2,"up":true}))
        .await;
    t.ok(json!({"type":"answer","room":"faq","question":q1,"text":"Answer one"}))
        .await;
    t.ok(json!({"type":"answer","room":"faq","question":q2,"text":"Answer two"}))
        .await;
    let (st, body) = http(s.addr, "GET", "/api/rooms/faq/faq", Some(API_KEY), None).await;
    assert_eq!(st, 200);
    let texts: Vec<_> = body["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts[..2], ["Most popular?", "Less popular?"]);
    assert_eq!(body["questions"][0]["answers"][0]["text"], "Answer two");
    let md = within("markdown", async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut st = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let req = format!("GET /api/rooms/faq/faq HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nAccept: text/markdown\r\nConnection: close\r\n\r\n");
        st.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        st.read_to_string(&mut out).await.unwrap();
        out
    })
    .await;
    assert!(
        md.to_ascii_lowercase()
            .contains("content-type: text/markdown"),
        "{md}"
    );
    let first = md.find("## Most popular?").expect("markdown heading");
    let second = md.find("## Less popular?").expect("markdown heading");
    assert!(first < second && md.contains("Answer two") && !md.contains("Never answered"));
    // User text is literal: no raw HTML, no heading or link of its own.
    let body = md.split_once("\r\n\r\n").map_or("", |x| x.1);
    assert!(
        body.match_indices('<')
            .all(|(i, _)| body[..i].ends_with('\\')),
        "raw HTML in {body}"
    );
    assert!(
        body.contains("## \\<img src\\=x onerror\\=alert\\(1\\)\\> \\# Injected"),
        "{body}"
    );
    assert!(
        !md.contains("\n# heading") && md.contains("\\# heading"),
        "{md}"
    );
    assert!(md.contains("\\[link\\]\\(http://evil\\)"), "{md}");
    s.stop().await;
}

#[tokio::test]
async fn search_finds_messages_and_questions_and_forgets_deleted_ones() {
    let s = Server::sqlite(|_| {}).await;
    live_room(&s, "srch", json!({})).await;
    let mut a = member(&s, "ann", "srch").await;
    let m = a
        .ok(json!({"type":"send","room":"srch","text":"Eigenvalues are fun","client_msg_id":"1"}))
        .await;
    a.ok(json!({"type":"send","room":"srch","text":"Unrelated chatter","client_msg_id":"2"}))
        .await;
    a.ok(json!({"type":"ask","room":"srch","text":"How do eigenvalues relate to eigenvectors?"}))
        .await;
    let r = a
        .ok(json!({"type":"search","room":"srch","q":"EIGENVALUES"}))
        .await;
    let kinds: Vec<_> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.len(), 2);
    assert!(kinds.contains(&"message".to_owned()) && kinds.contains(&"question".to_owned()));
    let both = a
        .ok(json!({"type":"search","room":"srch","q":"eigenvalues eigenvectors"}))
        .await;
    assert_eq!(
        both["results"].as_array().unwrap().len(),
        1,
        "every word must match"
    );
    let paged = a
        .ok(json!({"type":"search","room":"srch","q":"eigenvalues","limit":1}))
        .await;
    assert_eq!(
        (
            paged["results"].as_array().unwrap().len(),
            paged["has_more"].as_bool()
        ),
        (1, Some(true))
    );
    a.ok(json!({"type":"edit","room":"srch","id":m["id"],"text":"Matrices are fun"}))
        .await;
    assert_eq!(
        a.ok(json!({"type":"search","room":"srch","q":"matrices"}))
            .await["results"][0]["id"],
        m["id"]
    );
    a.ok(json!({"type":"delete","room":"srch","id":m["id"]}))
        .await;
    assert_eq!(
        a.ok(json!({"type":"search","room":"srch","q":"matrices"}))
            .await["results"],
        json!([])
    );
    assert_eq!(
        a.err(json!({"type":"search","room":"srch","q":"  ** "}))
            .await,
        "bad_request"
    );
    assert_eq!(
        a.ok(json!({"type":"search","room":"srch","q":"\"OR NEAR("}))
            .await["results"],
        json!([]),
        "query syntax is matched literally"
    );
    s.stop().await;
}
