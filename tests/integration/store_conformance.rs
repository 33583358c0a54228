//! The store conformance suite: every case runs unchanged on SQLite and on PostgreSQL. The
//! PostgreSQL half needs a reachable server (see `common::pg_base_url`) and fails without one.

use crate::common::*;
use std::sync::Arc;
use std::sync::Mutex;
use studyhall::metrics::Metrics;
use studyhall::protocol::{
    MessageId, QuestionId, QuestionStatus, RoomId, RoomKind, RoomRole, UserId, UserRef, Visibility,
};
use studyhall::store::PresenceKind::{self, Attend, Stage};
use studyhall::store::{AvJoin, QuestionFilter, QuestionSort, now_ms};
use studyhall::store::{
    CommitHook, CommittedEvent, QaSettings, Room, RoomPatch, Store, StoreError, StoreOptions, View,
    WriteOp, WriteOutcome,
};

/// A store plus what its commit hook saw.
struct Fixture {
    store: Store,
    published: Arc<Mutex<Vec<CommittedEvent>>>,
    url: String,
}

async fn open(url: &str) -> Fixture {
    open_with(StoreOptions::new(url)).await
}

async fn open_with(opts: StoreOptions) -> Fixture {
    let url = opts.url.clone();
    let published = Arc::new(Mutex::new(Vec::new()));
    let sink = published.clone();
    let hook: CommitHook = Arc::new(move |ev| sink.lock().unwrap().push(ev));
    let store = within(
        "open store",
        Store::open(&opts, Arc::new(Metrics::default()), Some(hook)),
    )
    .await
    .expect("open store");
    Fixture {
        store,
        published,
        url,
    }
}

fn room(id: &str, visibility: Visibility) -> Room {
    Room {
        created_at: 1,
        ..Room::new(
            RoomId::from(id),
            RoomKind::Group,
            format!("Room {id}"),
            visibility,
        )
    }
}

fn user(id: &str) -> UserRef {
    UserRef {
        id: UserId::from(id),
        name: id.to_uppercase(),
        role: studyhall::protocol::ShownRole::Member,
    }
}

fn send(room: &str, from: &str, text: &str, cid: &str) -> WriteOp {
    WriteOp::Send(studyhall::store::SendOp {
        room: RoomId::from(room),
        from: user(from),
        text: text.into(),
        client_msg_id: Some(cid.into()),
        reply_to: None,
    })
}

fn sent(o: WriteOutcome) -> (MessageId, i64) {
    match o {
        WriteOutcome::Sent { id, seq, .. } => (id, seq),
        other => panic!("expected Sent, got {other:?}"),
    }
}

async fn rooms_crud(f: Fixture) {
    let s = &f.store;
    let created = s
        .create_room(&room("r1", Visibility::Invite))
        .await
        .unwrap();
    assert_eq!((created.last_seq, created.archived), (0, false));
    assert!(matches!(
        s.create_room(&room("r1", Visibility::Open)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.room(&"r1".into()).await.unwrap().unwrap().title,
        "Room r1"
    );
    assert!(s.room(&"none".into()).await.unwrap().is_none());
    let patch = RoomPatch {
        title: Some("New".into()),
        qa: Some(QaSettings {
            enabled: true,
            moderated: true,
            peer_answers: false,
        }),
        starts_at: Some(Some(42)),
        ..Default::default()
    };
    let r = s.update_room(&"r1".into(), &patch).await.unwrap();
    assert_eq!(
        (r.title.as_str(), r.qa.moderated, r.starts_at),
        ("New", true, Some(42))
    );
    let r = s
        .update_room(
            &"r1".into(),
            &RoomPatch {
                starts_at: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.starts_at, None);
    assert!(matches!(
        s.update_room(&"zz".into(), &patch).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn members_and_roles(f: Fixture) {
    let s = &f.store;
    s.create_room(&room("r", Visibility::Invite)).await.unwrap();
    let (r, u) = (RoomId::from("r"), UserId::from("u"));
    assert_eq!(s.member_role(&r, &u).await.unwrap(), None);
    s.set_member(&r, &u, RoomRole::Ta).await.unwrap();
    assert_eq!(s.member_role(&r, &u).await.unwrap(), Some(RoomRole::Ta));
    s.ensure_member(&r, &u, RoomRole::Member).await.unwrap();
    assert_eq!(
        s.member_role(&r, &u).await.unwrap(),
        Some(RoomRole::Ta),
        "ensure keeps the role"
    );
    s.set_member(&r, &u, RoomRole::Viewer).await.unwrap();
    let access = s.room_access(&r, now_ms()).await.unwrap().unwrap();
    assert_eq!(access.members, vec![(u.clone(), RoomRole::Viewer)]);
    assert_eq!(access.room.id, r);
    assert!(access.banned.is_empty() && access.mutes.is_empty());
    assert!(s.room_access(&"zz".into(), 0).await.unwrap().is_none());
    assert!(s.remove_member(&r, &u).await.unwrap());
    assert!(!s.remove_member(&r, &u).await.unwrap());
    assert!(matches!(
        s.set_member(&"nope".into(), &u, RoomRole::Member).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn seq_is_gap_free_and_events_page_both_ways(f: Fixture) {
    let s = &f.store;
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    s.create_room(&room("q", Visibility::Open)).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..30 {
        let r = if i % 3 == 0 { "q" } else { "r" };
        pending.push(
            s.submit(send(r, "a", &format!("t{i}"), &format!("c{i}")))
                .await
                .unwrap(),
        );
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    assert_eq!(s.last_seq(&"r".into()).await.unwrap(), 20);
    assert_eq!(s.last_seq(&"q".into()).await.unwrap(), 10);
    // Many rooms at once, across more than one query; missing rooms are left out.
    let mut ids: Vec<studyhall::protocol::RoomId> = (0..600)
        .map(|i| format!("none{i}").as_str().into())
        .collect();
    ids.insert(300, "q".into());
    ids.push("r".into());
    let lasts = s.last_seqs(&ids).await.unwrap();
    assert_eq!(lasts.len(), 2, "{lasts:?}");
    assert_eq!(lasts[&studyhall::protocol::RoomId::from("r")], 20);
    assert_eq!(lasts[&studyhall::protocol::RoomId::from("q")], 10);
    let published = f.published.lock().unwrap().clone();
    let r_seqs: Vec<i64> = published
        .iter()
        .filter(|e| e.room.as_str() == "r")
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        r_seqs,
        (1..=20).collect::<Vec<_>>(),
        "hook sees commit order"
    );
    let page = s
        .events_after(&"r".into(), 5, 10, View::Moderator)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 10);
    assert!(page.has_more);
    let first: serde_json::Value = serde_json::from_str(&page.events[0]).unwrap();
    assert_eq!(
        (
            first["seq"].as_i64(),
            first["type"].as_str(),
            first["room"].as_str()
        ),
        (Some(6), Some("message"), Some("r"))
    );
    assert_eq!(
        page.events[0],
        published
            .iter()
            .find(|e| e.room.as_str() == "r" && e.seq == 6)
            .unwrap()
            .json,
        "stored bytes = published bytes"
    );
    let tail = s
        .events_after(&"r".into(), 15, 10, View::Moderator)
        .await
        .unwrap();
    assert_eq!((tail.events.len(), tail.has_more), (5, false));
    let back = s
        .events_before(&"r".into(), None, 4, View::Moderator)
        .await
        .unwrap();
    let seqs: Vec<i64> = back
        .events
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!((seqs, back.has_more), (vec![17, 18, 19, 20], true));
    let oldest = s
        .events_before(&"r".into(), Some(3), 10, View::Moderator)
        .await
        .unwrap();
    assert_eq!((oldest.events.len(), oldest.has_more), (2, false));
    assert!(matches!(
        s.last_seq(&"none".into()).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn idempotent_send_and_refusals(f: Fixture) {
    let s = &f.store;
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let (id, seq) = sent(s.write(send("r", "a", "hi", "k")).await.unwrap());
    match s.write(send("r", "a", "hi again", "k")).await.unwrap() {
        WriteOutcome::Sent {
            id: id2,
            seq: seq2,
            duplicate,
            ..
        } => {
            assert_eq!((id2, seq2, duplicate), (id.clone(), seq, true));
        }
        other => panic!("{other:?}"),
    }
    let (_, seq_b) = sent(s.write(send("r", "b", "other user", "k")).await.unwrap());
    assert_eq!(seq_b, 2);
    assert_eq!(
        f.published.lock().unwrap().len(),
        2,
        "the duplicate published nothing"
    );
    assert!(matches!(
        s.write(send("nope", "a", "x", "z")).await,
        Err(StoreError::NotFound(_))
    ));
    let bad_reply = WriteOp::Send(studyhall::store::SendOp {
        room: "r".into(),
        from: user("a"),
        text: "x".into(),
        client_msg_id: Some("z".into()),
        reply_to: Some(MessageId::from("missing")),
    });
    assert!(matches!(
        s.write(bad_reply).await,
        Err(StoreError::BadRequest(_))
    ));
    s.update_room(
        &"r".into(),
        &RoomPatch {
            archived: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        s.write(send("r", "a", "late", "late")).await,
        Err(StoreError::Forbidden(_))
    ));
    assert_eq!(
        s.last_seq(&"r".into()).await.unwrap(),
        2,
        "refusals leave no gap"
    );
}

async fn edit_delete_react(f: Fixture) {
    let s = &f.store;
    let r = RoomId::from("r");
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let (id, _) = sent(s.write(send("r", "a", "hello", "1")).await.unwrap());
    assert!(!s.rewritten_after(&r, 0), "a send rewrites nothing");
    let edit = |by: &str, text: &str| WriteOp::Edit {
        room: r.clone(),
        id: id.clone(),
        by: user(by),
        text: text.into(),
    };
    assert!(matches!(
        s.write(edit("b", "x")).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(!s.rewritten_after(&r, 1), "a refused edit rewrites nothing");
    assert_eq!(
        s.write(edit("a", "hello!")).await.unwrap(),
        WriteOutcome::Changed { seq: 2 }
    );
    assert_eq!(
        (s.rewritten_after(&r, 1), s.rewritten_after(&r, 2)),
        (true, false),
        "the edit at seq 2 changed the stored copy of seq 1"
    );
    let react = |who: &str, emoji: &str, add: bool| WriteOp::React {
        room: r.clone(),
        id: id.clone(),
        user: user(who),
        emoji: emoji.into(),
        add,
        max_distinct: 2,
    };
    assert_eq!(
        s.write(react("b", "👍", true)).await.unwrap(),
        WriteOutcome::Changed { seq: 3 }
    );
    assert!(s.rewritten_after(&r, 2), "a reaction");
    assert_eq!(
        s.write(react("b", "👍", true)).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert_eq!(
        s.write(react("c", "👍", true)).await.unwrap(),
        WriteOutcome::Changed { seq: 4 }
    );
    assert_eq!(
        s.write(react("c", "🎉", true)).await.unwrap(),
        WriteOutcome::Changed { seq: 5 }
    );
    assert!(
        matches!(
            s.write(react("c", "🔥", true)).await,
            Err(StoreError::TooLarge(_))
        ),
        "max distinct"
    );
    assert_eq!(
        s.write(react("c", "🎉", false)).await.unwrap(),
        WriteOutcome::Changed { seq: 6 }
    );
    assert_eq!(
        s.write(react("c", "🎉", false)).await.unwrap(),
        WriteOutcome::Unchanged
    );
    let last = f.published.lock().unwrap().last().unwrap().json.clone();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (
            v["type"].as_str(),
            v["count"].as_i64(),
            v["added"].as_bool()
        ),
        (Some("reaction"), Some(0), Some(false))
    );
    let page = s.events_after(&r, 0, 100, View::Moderator).await.unwrap();
    let msg: serde_json::Value = serde_json::from_str(&page.events[0]).unwrap();
    assert_eq!(msg["text"], "hello!");
    assert_eq!(
        msg["reactions"],
        serde_json::json!([{"emoji":"👍","count":2}])
    );
    let del = |by: &str, m: bool| WriteOp::Delete {
        room: r.clone(),
        id: id.clone(),
        by: user(by),
        as_moderator: m,
    };
    assert!(matches!(
        s.write(del("b", false)).await,
        Err(StoreError::Forbidden(_))
    ));
    assert_eq!(
        s.write(del("b", true)).await.unwrap(),
        WriteOutcome::Changed { seq: 7 }
    );
    assert!(s.rewritten_after(&r, 6), "a delete");
    assert_eq!(
        s.write(del("a", false)).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert!(matches!(
        s.write(edit("a", "back")).await,
        Err(StoreError::NotFound(_))
    ));
    let page = s.events_after(&r, 0, 100, View::Moderator).await.unwrap();
    for body in &page.events {
        assert!(
            !body.contains("hello"),
            "deleted text erased everywhere: {body}"
        );
    }
}

async fn read_markers_and_unread(f: Fixture) {
    let s = &f.store;
    let (r, b) = (RoomId::from("r"), UserId::from("b"));
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    s.create_room(&room("g", Visibility::Invite)).await.unwrap();
    s.ensure_member(&r, &b, RoomRole::Member).await.unwrap();
    for i in 0..4 {
        s.write(send("r", "a", "x", &i.to_string())).await.unwrap();
    }
    s.write(send("r", "b", "mine", "mine")).await.unwrap();
    assert_eq!(s.unread(&r, &b).await.unwrap(), 4);
    s.set_read_marker(&r, &b, 3).await.unwrap();
    assert_eq!(s.unread(&r, &b).await.unwrap(), 1);
    s.set_read_marker(&r, &b, 1).await.unwrap();
    assert_eq!(
        s.unread(&r, &b).await.unwrap(),
        1,
        "markers only move forward"
    );
    let list = s
        .user_rooms(&b, &[(RoomId::from("g"), RoomRole::Ta)])
        .await
        .unwrap();
    let ids: Vec<_> = list
        .iter()
        .map(|x| (x.id.as_str(), x.role, x.unread, x.last_seq))
        .collect();
    assert_eq!(
        ids,
        vec![("g", RoomRole::Ta, 0, 0), ("r", RoomRole::Member, 1, 5)]
    );
}

async fn settings_keep_the_first_value(f: Fixture) {
    let s = &f.store;
    assert_eq!(
        s.setting_or_insert("k", || "one".into()).await.unwrap(),
        "one"
    );
    assert_eq!(
        s.setting_or_insert("k", || "two".into()).await.unwrap(),
        "one"
    );
}

/// Two store instances on one database, as two server processes: writes to one room from both
/// interleave into one gap-free sequence.
async fn two_writers_share_one_gap_free_sequence(f: Fixture) {
    f.store
        .create_room(&room("r", Visibility::Open))
        .await
        .unwrap();
    let other = open(&f.url).await;
    let mut pending = Vec::new();
    for i in 0..60 {
        let (store, who) = if i % 2 == 0 {
            (&f.store, "a")
        } else {
            (&other.store, "b")
        };
        pending.push(
            store
                .submit(send("r", who, "x", &i.to_string()))
                .await
                .unwrap(),
        );
    }
    let mut seqs = Vec::new();
    for p in pending {
        seqs.push(sent(within("write", p).await.unwrap().unwrap()).1);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    let page = f
        .store
        .events_after(&"r".into(), 0, 100, View::Moderator)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 60);
    other.store.close().await;
}

/// An attendance (`Attend`) or stage (`Stage`) log write in room `r`.
fn log_write(who: &str, session: &str, kind: PresenceKind, on: bool, ts: i64) -> WriteOp {
    WriteOp::Presence {
        room: RoomId::from("r"),
        user: UserId::from(who),
        name: who.to_uppercase(),
        session: session.into(),
        kind,
        on,
        ts,
    }
}

/// A second store on `url` whose log writes linger ten minutes for company.
async fn lingering(url: &str) -> Fixture {
    open_with(StoreOptions {
        detached_linger_ms: 600_000,
        ..StoreOptions::new(url)
    })
    .await
}

/// The attendance log's writes (nobody waits for them) linger for company, but a write someone
/// waits for ends the wait at once and commits with them; alone, they commit within the linger.
async fn log_writes_wait_for_company_but_never_hold_up_a_waited_write(f: Fixture) {
    f.store
        .create_room(&room("r", Visibility::Open))
        .await
        .unwrap();
    let attending = |store: Store| async move {
        let summary = store.class_summary(&"r".into(), now_ms(), 5).await.unwrap();
        summary
            .attendance
            .into_iter()
            .map(|a| a.user.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    // Ten minutes of linger: only the waited-for write can end it within the test's bound.
    let slow = lingering(&f.url).await;
    let attend = |who: &str| log_write(who, &format!("{who}-1"), Attend, true, now_ms());
    slow.store.submit_detached(attend("ann"));
    slow.store.write(send("r", "a", "x", "1")).await.unwrap();
    assert_eq!(attending(f.store.clone()).await, ["ann"]);
    // Alone, with the default linger (20 ms), a log write still commits on its own.
    f.store.submit_detached(attend("bob"));
    loop {
        if attending(f.store.clone()).await.len() == 2 {
            break;
        }
        // Polled: the condition is a commit in another thread, bounded by the case's timeout.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    slow.store.close().await;
}

/// A batch's attendance and stage log writes go in at most two statements, and leave what
/// one by one would: a session that leaves and comes back within the batch, a session that
/// leaves in the batch after joining before it, a stage spell, a join that is still open.
async fn log_writes_in_one_batch_leave_what_one_by_one_would(f: Fixture) {
    f.store
        .create_room(&room("r", Visibility::Open))
        .await
        .unwrap();
    // Before the batch: carl is in (committed by the write after it).
    f.store
        .submit_detached(log_write("carl", "c1", Attend, true, 500));
    f.store.write(send("r", "a", "x", "1")).await.unwrap();
    // One batch: the long linger holds the log writes until the send arrives.
    let slow = lingering(&f.url).await;
    for op in [
        log_write("ann", "a1", Attend, true, 1_000),
        log_write("bob", "b1", Attend, true, 1_500),
        log_write("ann", "a1", Attend, false, 2_000),
        log_write("carl", "c1", Attend, false, 2_500),
        log_write("ann", "a1", Attend, true, 3_000),
        log_write("bob", "", Stage, true, 4_000),
        log_write("bob", "", Stage, false, 4_600),
    ] {
        slow.store.submit_detached(op);
    }
    slow.store.write(send("r", "a", "x", "2")).await.unwrap();
    let summary = f.store.class_summary(&"r".into(), 10_000, 5).await.unwrap();
    let attended: Vec<_> = summary
        .attendance
        .iter()
        .map(|a| {
            (
                a.user.as_str(),
                a.first_join,
                a.last_leave,
                a.present_ms,
                a.sessions,
            )
        })
        .collect();
    assert_eq!(
        attended,
        [
            ("ann", 1_000, None, 1_000 + 7_000, 2),
            ("bob", 1_500, None, 8_500, 1),
            ("carl", 500, Some(2_500), 2_000, 1),
        ]
    );
    let stage: Vec<_> = summary
        .stage
        .iter()
        .map(|s| (s.user.as_str(), s.on_stage_ms))
        .collect();
    assert_eq!(stage, [("bob", 600)]);
    slow.store.close().await;
}

async fn close_commits_everything_queued(f: Fixture) {
    let s = &f.store;
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..50 {
        pending.push(s.submit(send("r", "a", "x", &i.to_string())).await.unwrap());
    }
    s.close().await;
    for p in pending {
        assert!(matches!(p.await.unwrap(), Ok(WriteOutcome::Sent { .. })));
    }
    let reopened = open(&f.url).await;
    assert_eq!(reopened.store.last_seq(&"r".into()).await.unwrap(), 50);
    assert!(matches!(
        s.write(send("r", "a", "x", "after")).await,
        Err(StoreError::Closed)
    ));
    reopened.store.close().await;
}

fn ask(room: &str, who: &str, text: &str, anonymous: bool, pending: bool) -> WriteOp {
    WriteOp::Ask {
        room: RoomId::from(room),
        author: user(who),
        text: text.into(),
        anonymous,
        pending,
    }
}

fn asked(o: WriteOutcome) -> QuestionId {
    match o {
        WriteOutcome::Asked { id, .. } => id,
        other => panic!("expected Asked, got {other:?}"),
    }
}

async fn questions_votes_answers_and_renderings(f: Fixture) {
    let s = &f.store;
    let r = RoomId::from("r");
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let q1 = asked(s.write(ask("r", "a", "anon?", true, false)).await.unwrap());
    let q2 = asked(
        s.write(ask("r", "b", "pending?", false, true))
            .await
            .unwrap(),
    );
    {
        let published = f.published.lock().unwrap();
        let anon: serde_json::Value = serde_json::from_str(&published[0].json).unwrap();
        assert_eq!(
            anon["author"]["id"], "a",
            "host/ta rendering has the author"
        );
        let public: serde_json::Value =
            serde_json::from_str(published[0].public_json.as_ref().unwrap()).unwrap();
        assert_eq!(public["author"], serde_json::Value::Null);
        let hidden: serde_json::Value =
            serde_json::from_str(published[1].public_json.as_ref().unwrap()).unwrap();
        assert_eq!(
            (hidden["type"].as_str(), hidden["seq"].as_i64()),
            (Some("hidden"), Some(2))
        );
    }
    let member_view = s.events_after(&r, 0, 10, View::Member).await.unwrap();
    assert!(member_view.events[1].contains("\"hidden\""));
    let vote = |who: &str, q: &QuestionId, up: bool| WriteOp::Vote {
        room: r.clone(),
        question: q.clone(),
        user: UserId::from(who),
        up,
    };
    let mut pending_votes = Vec::new();
    for i in 0..20 {
        pending_votes.push(s.submit(vote(&format!("v{i}"), &q1, true)).await.unwrap());
    }
    for p in pending_votes {
        p.await.unwrap().unwrap();
    }
    assert_eq!(
        s.write(vote("v0", &q1, true)).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert!(
        matches!(
            s.write(vote("v0", &q2, true)).await,
            Err(StoreError::NotFound(_))
        ),
        "pending takes no votes"
    );
    s.write(vote("v0", &q1, false)).await.unwrap();
    let answer = WriteOp::Answer {
        room: r.clone(),
        question: q1.clone(),
        author: user("t"),
        text: "because".into(),
    };
    s.write(answer).await.unwrap();
    assert!(matches!(
        s.write(WriteOp::Answer {
            room: r.clone(),
            question: q2.clone(),
            author: user("t"),
            text: "x".into()
        })
        .await,
        Err(StoreError::BadRequest(_))
    ));
    let q = s.question(&r, &q1).await.unwrap();
    assert_eq!(
        (q.votes, q.status, q.answers.len()),
        (19, QuestionStatus::Answered, 1)
    );
    assert!(q.first_answer_at.is_some());
    let members = s
        .questions(
            &r,
            &QuestionFilter::default(),
            QuestionSort::Top,
            View::Member,
            3600,
            now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "pending hidden from members");
    assert_eq!(members[0].author, None);
    let hosts = s
        .questions(
            &r,
            &QuestionFilter::default(),
            QuestionSort::Recent,
            View::Moderator,
            3600,
            now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(
        hosts.iter().map(|q| q.id.clone()).collect::<Vec<_>>(),
        vec![q2.clone(), q1.clone()]
    );
    let set = |q: &QuestionId, st: QuestionStatus| WriteOp::SetQuestionStatus {
        room: r.clone(),
        question: q.clone(),
        status: st,
    };
    assert!(matches!(
        s.write(set(&q2, QuestionStatus::Open)).await.unwrap(),
        WriteOutcome::Changed { .. }
    ));
    assert_eq!(
        s.write(set(&q2, QuestionStatus::Open)).await.unwrap(),
        WriteOutcome::Unchanged
    );
    let last = f.published.lock().unwrap().last().unwrap().clone();
    assert!(
        last.public_json.is_none(),
        "approved and not anonymous: one rendering"
    );
    // Overdue: q2 is unanswered; with a 1 s SLA it is overdue 2 s after it was asked.
    s.update_room(
        &r,
        &RoomPatch {
            answer_sla_s: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let later = now_ms() + 2_000;
    let overdue = QuestionFilter {
        overdue_only: true,
        ..Default::default()
    };
    let due = s
        .questions(&r, &overdue, QuestionSort::Top, View::Moderator, 1, later)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|q| q.id.clone()).collect::<Vec<_>>(),
        vec![q2.clone()]
    );
    assert_eq!(
        s.claim_overdue(later).await.unwrap(),
        vec![(r.clone(), q2.clone())]
    );
    assert_eq!(
        s.claim_overdue(later).await.unwrap(),
        vec![],
        "claimed once"
    );
}

async fn search_ranks_and_respects_pending(f: Fixture) {
    let s = &f.store;
    let r = RoomId::from("r");
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    s.create_room(&room("other", Visibility::Open))
        .await
        .unwrap();
    let (m1, _) = sent(
        s.write(send("r", "a", "photosynthesis in plants", "1"))
            .await
            .unwrap(),
    );
    s.write(send(
        "r",
        "a",
        "photosynthesis photosynthesis photosynthesis",
        "2",
    ))
    .await
    .unwrap();
    s.write(send("other", "a", "photosynthesis elsewhere", "3"))
        .await
        .unwrap();
    let pq = asked(
        s.write(ask("r", "b", "is photosynthesis pending", false, true))
            .await
            .unwrap(),
    );
    let (hits, more) = s.search(&r, "Photosynthesis", false, 10, 0).await.unwrap();
    assert_eq!((hits.len(), more), (2, false), "{hits:?}");
    assert!(hits.iter().all(|h| h.kind == "message"));
    let (hits, _) = s.search(&r, "photosynthesis", true, 10, 0).await.unwrap();
    assert!(
        hits.iter().any(|h| h.id == pq.as_str()),
        "host/ta find pending questions"
    );
    let (hits, _) = s
        .search(&r, "photosynthesis plants", false, 10, 0)
        .await
        .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>(),
        vec![m1.as_str().to_owned()]
    );
    let (page, more) = s.search(&r, "photosynthesis", false, 1, 0).await.unwrap();
    assert_eq!((page.len(), more), (1, true));
    let (page2, _) = s.search(&r, "photosynthesis", false, 1, 1).await.unwrap();
    assert_ne!(page[0].id, page2[0].id);
    assert!(matches!(
        s.search(&r, " ** ", false, 10, 0).await,
        Err(StoreError::BadRequest(_))
    ));
    s.write(WriteOp::Delete {
        room: r.clone(),
        id: m1.clone(),
        by: user("a"),
        as_moderator: false,
    })
    .await
    .unwrap();
    let (hits, _) = s.search(&r, "plants", false, 10, 0).await.unwrap();
    assert!(hits.is_empty());
}

async fn mutes_bans_reports_and_audit(f: Fixture) {
    let s = &f.store;
    let (r, u) = (RoomId::from("r"), UserId::from("u"));
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let now = now_ms();
    s.set_mute(&r, &u, now + 60_000).await.unwrap();
    s.set_mute(&r, &UserId::from("old"), now - 1).await.unwrap();
    let mutes = s.room_access(&r, now).await.unwrap().unwrap().mutes;
    assert_eq!(mutes.len(), 1);
    assert_eq!(mutes.get(&u), Some(&(now + 60_000)));
    assert!(s.clear_mute(&r, &u).await.unwrap());
    assert!(!s.is_banned(&r, &u).await.unwrap());
    s.ban(&r, &u, &UserId::from("t")).await.unwrap();
    s.ban(&r, &u, &UserId::from("t")).await.unwrap();
    assert!(s.is_banned(&r, &u).await.unwrap());
    let access = s.room_access(&r, now).await.unwrap().unwrap();
    assert_eq!(access.banned, vec![u.clone()]);
    assert!(s.unban(&r, &u).await.unwrap());
    assert!(!s.unban(&r, &u).await.unwrap());
    let (m, _) = sent(s.write(send("r", "a", "bad", "1")).await.unwrap());
    let q = asked(s.write(ask("r", "a", "bad?", false, false)).await.unwrap());
    let rep = s.add_report(&r, m.as_str(), &u, "spam").await.unwrap();
    assert_eq!(rep.target_kind, "message");
    assert_eq!(
        s.add_report(&r, q.as_str(), &u, "off-topic")
            .await
            .unwrap()
            .target_kind,
        "question"
    );
    assert!(matches!(
        s.add_report(&r, "nope", &u, "x").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.reports(&r, false).await.unwrap().len(), 2);
    let done = s.resolve_report(&r, &rep.id, "t", "deleted").await.unwrap();
    assert_eq!(done.resolution.as_deref(), Some("deleted"));
    assert!(matches!(
        s.resolve_report(&r, &rep.id, "t", "again").await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.reports(&r, false).await.unwrap().len(), 1);
    assert_eq!(s.reports(&r, true).await.unwrap().len(), 2);
    s.audit(&r, "t", "mute", Some("u"), Some("60s"))
        .await
        .unwrap();
    s.audit(&r, "t", "ban", Some("u"), None).await.unwrap();
    let log = s.audit_log(&r, 0).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["mute", "ban"]
    );
    assert_eq!(s.audit_log(&r, log[0].id).await.unwrap().len(), 1);
}

/// Plain sends only (so every room of the batch takes the batched path), in two rooms, with
/// a key stored before, keys repeated in the batch and a key repeated in the other room (a
/// different key there): each repeat gets its first copy's outcome, each new send the next
/// seq of its room, and every new message is stored once.
async fn plain_sends_in_a_batch_find_their_copies(f: Fixture) {
    let s = &f.store;
    for r in ["p", "q"] {
        s.create_room(&room(r, Visibility::Open)).await.unwrap();
    }
    let (stored_id, stored_seq) = sent(s.write(send("p", "a", "stored", "k0")).await.unwrap());
    let mut pending = Vec::new();
    for i in 0..60 {
        let r = if i % 2 == 0 { "p" } else { "q" };
        let key = format!("k{}", i % 20);
        pending.push(
            s.submit(send(r, "a", &format!("m{i}"), &key))
                .await
                .unwrap(),
        );
    }
    let mut outcomes = Vec::new();
    for p in pending {
        outcomes.push(p.await.unwrap().unwrap());
    }
    let mut first: std::collections::HashMap<(&str, String), (MessageId, i64)> = Default::default();
    let mut next = [stored_seq + 1, 1];
    for (i, o) in outcomes.iter().enumerate() {
        let WriteOutcome::Sent {
            id, seq, duplicate, ..
        } = o
        else {
            panic!("{o:?}")
        };
        let (r, ri) = if i % 2 == 0 { ("p", 0) } else { ("q", 1) };
        let key = (r, format!("k{}", i % 20));
        if r == "p" && key.1 == "k0" {
            assert!(*duplicate, "send {i} repeats the stored k0");
            assert_eq!((id, *seq), (&stored_id, stored_seq));
        } else if let Some((fid, fseq)) = first.get(&key) {
            assert!(*duplicate, "send {i} repeats {key:?}");
            assert_eq!((id, seq), (fid, fseq), "the first copy's outcome");
        } else {
            assert!(!duplicate, "send {i} is new");
            assert_eq!(*seq, next[ri], "consecutive seqs in queue order in {r}");
            next[ri] += 1;
            first.insert(key, (id.clone(), *seq));
        }
    }
    // p: the stored k0 and k2..k18 (even); q: k1..k19 (odd): ten keys each.
    assert_eq!(next, [stored_seq + 10, 11]);
    for (r, n) in [("p", 10), ("q", 10)] {
        let r = RoomId::from(r);
        assert_eq!(s.last_seq(&r).await.unwrap(), n);
        let page = s.events_after(&r, 0, 100, View::Moderator).await.unwrap();
        assert_eq!(
            page.events.len(),
            n as usize,
            "one event per new message in {r}"
        );
    }
}

/// Many sends queued at once take the batched path: the same outcomes as one by one,
/// including duplicates of stored messages and of messages earlier in the same batch.
async fn batched_sends_match_single_sends(f: Fixture) {
    let s = &f.store;
    let r = RoomId::from("r");
    s.create_room(&room("r", Visibility::Open)).await.unwrap();
    let (first_id, first_seq) = sent(s.write(send("r", "a", "stored", "k0")).await.unwrap());
    let mut pending = Vec::new();
    for i in 0..50 {
        pending.push(
            s.submit(send("r", "a", &format!("n{i}"), &format!("k{}", i % 40)))
                .await
                .unwrap(),
        );
    }
    let reply = WriteOp::Send(studyhall::store::SendOp {
        room: r.clone(),
        from: user("b"),
        text: "a reply".into(),
        client_msg_id: Some("reply".into()),
        reply_to: Some(first_id.clone()),
    });
    pending.push(s.submit(reply).await.unwrap());
    let mut outcomes = Vec::new();
    for p in pending {
        outcomes.push(p.await.unwrap().unwrap());
    }
    // k0 was stored before: the first of the batch is a duplicate of it.
    assert_eq!(
        outcomes[0],
        WriteOutcome::Sent {
            id: first_id.clone(),
            seq: first_seq,
            ts: match &outcomes[0] {
                WriteOutcome::Sent { ts, .. } => *ts,
                _ => 0,
            },
            duplicate: true
        }
    );
    let mut seqs = Vec::new();
    let mut by_key: std::collections::HashMap<String, (MessageId, i64)> = Default::default();
    for (i, o) in outcomes.iter().take(50).enumerate() {
        let WriteOutcome::Sent {
            id, seq, duplicate, ..
        } = o
        else {
            panic!("{o:?}")
        };
        let key = format!("k{}", i % 40);
        if i >= 40 || i == 0 {
            assert!(*duplicate, "send {i} repeats {key}");
            if i >= 40 && i % 40 != 0 {
                assert_eq!(
                    by_key[&key],
                    (id.clone(), *seq),
                    "duplicate of an earlier send in the batch"
                );
            }
        } else {
            assert!(!duplicate);
            seqs.push(*seq);
            by_key.insert(key, (id.clone(), *seq));
        }
    }
    assert_eq!(
        seqs,
        (2..=40).collect::<Vec<_>>(),
        "new sends get consecutive seqs in queue order"
    );
    assert!(matches!(
        outcomes[50],
        WriteOutcome::Sent {
            seq: 41,
            duplicate: false,
            ..
        }
    ));
    assert_eq!(s.last_seq(&r).await.unwrap(), 41);
    let page = s.events_after(&r, 0, 100, View::Moderator).await.unwrap();
    assert_eq!(page.events.len(), 41, "one event per new message");
    let published: Vec<i64> = f.published.lock().unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(
        published,
        (1..=41).collect::<Vec<_>>(),
        "published once each, in order"
    );
    let (hits, _) = s.search(&r, "n7", false, 10, 0).await.unwrap();
    assert_eq!(hits.len(), 1, "batched messages are searchable");
    // A batch into an archived room is refused as a whole, leaving no gap.
    s.update_room(
        &r,
        &RoomPatch {
            archived: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(
            s.submit(send("r", "a", "late", &format!("late{i}")))
                .await
                .unwrap(),
        );
    }
    for p in pending {
        assert!(matches!(p.await.unwrap(), Err(StoreError::Forbidden(_))));
    }
    assert_eq!(s.last_seq(&r).await.unwrap(), 41);
}

/// Two writers (two nodes) checking the same users in at the same moment: each user's
/// check-in counts once (the check-in locks the room row before reading the member's last
/// day).
async fn simultaneous_checkins_count_once(f: Fixture) {
    f.store
        .create_room(&room("r", Visibility::Open))
        .await
        .unwrap();
    let other = open(&f.url).await;
    let checkin = |i: usize| WriteOp::Checkin {
        room: RoomId::from("r"),
        user: user(&format!("u{i}")),
        tz: None,
    };
    let mut pending = Vec::new();
    for i in 0..30 {
        pending.push((i, f.store.submit(checkin(i)).await.unwrap()));
        pending.push((i, other.store.submit(checkin(i)).await.unwrap()));
    }
    let mut new_days = vec![0; 30];
    for (i, p) in pending {
        match within("checkin", p).await.unwrap().unwrap() {
            WriteOutcome::CheckedIn(ok) => new_days[i] += usize::from(!ok.already),
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(new_days, vec![1; 30]);
    other.store.close().await;
}

/// Cluster A/V admission: two store instances (two nodes) admit concurrent joins of one room
/// in one order (the later lists the earlier, generations count up), under the mesh limit;
/// re-joins, leaves of old and current generations, a gone node's run, and stale rows of
/// nodes not alive.
async fn av_members_in_one_join_order(f: Fixture) {
    let r = RoomId::from("cls");
    let other = open(&f.url).await;
    let join = |i: usize, node: &'static str| {
        let stores = [f.store.clone(), other.store.clone()];
        let r = r.clone();
        async move {
            let (s, u) = (format!("s{i}.{node}"), UserId(format!("u{i}")));
            let j = AvJoin {
                room: &r,
                session: &s,
                user: &u,
                node,
                epoch: 7,
                mesh_max: 6,
                live_nodes: None,
                now_ms: 1,
            };
            let store = &stores[usize::from(node == "n1")];
            (s.clone(), store.av_join(&j).await)
        }
    };
    let joined = futures_util::future::join_all(
        (0..6).map(|i| join(i, if i % 2 == 0 { "n0" } else { "n1" })),
    )
    .await;
    let mut admitted: Vec<(String, i64, Vec<String>)> = joined
        .into_iter()
        .map(|(s, r)| {
            let a = r.unwrap();
            (
                s,
                a.generation,
                a.before.into_iter().map(|m| m.session).collect(),
            )
        })
        .collect();
    // One order: the k-th admitted (generation k) lists exactly the k - 1 before it, in order.
    admitted.sort_by_key(|(_, g, _)| *g);
    for (k, (_, g, before)) in admitted.iter().enumerate() {
        assert_eq!(*g, k as i64 + 1);
        let expected: Vec<String> = admitted[..k].iter().map(|(s, _, _)| s.clone()).collect();
        assert_eq!(before, &expected);
    }
    // Full: a seventh is refused (and takes no generation); a re-join takes no place and
    // gets a new generation, so a late leave of its old membership cannot remove it.
    assert!(matches!(
        join(6, "n0").await.1,
        Err(StoreError::Conflict(_))
    ));
    let again = join(0, "n0").await.1.unwrap();
    assert_eq!(again.before.len(), 5);
    let g0 = again.generation;
    assert_eq!(g0, 7);
    let m = f.store.av_member(&r, "s1.n1").await.unwrap().unwrap();
    assert_eq!(
        (m.user, m.node.as_str(), m.epoch),
        (UserId::from("u1"), "n1", 7)
    );
    // One read gives the join count and the members in join order.
    let snap = f
        .store
        .av_snapshot(&[r.clone(), RoomId::from("never")])
        .await
        .unwrap();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].1, 7);
    let order: Vec<&str> = snap[0].2.iter().map(|m| m.session.as_str()).collect();
    assert_eq!(order.len(), 6);
    assert_eq!(order[5], "s0.n0", "the re-join is the newest");
    // A leave of an older generation spares the current membership; the current one goes.
    f.store.av_leave(&r, "s0.n0", g0 - 1).await.unwrap();
    assert!(f.store.av_member(&r, "s0.n0").await.unwrap().is_some());
    f.store.av_leave(&r, "s0.n0", g0).await.unwrap();
    assert_eq!(f.store.av_member(&r, "s0.n0").await.unwrap(), None);
    assert_eq!(join(6, "n0").await.1.unwrap().before.len(), 5);
    // A gone run of a node loses its rows; another run's stay.
    assert_eq!(other.store.av_forget_node("n1", Some(8)).await.unwrap(), 0);
    assert_eq!(other.store.av_forget_node("n1", Some(7)).await.unwrap(), 3);
    // Rows of a node not among the live ones are stale once the joiner knows every node.
    assert_eq!(join(7, "n3").await.1.unwrap().before.len(), 3);
    let (s, u) = ("s9.n2".to_owned(), UserId::from("u9"));
    let live = vec!["n0".to_owned()];
    let listed = f
        .store
        .av_join(&AvJoin {
            room: &r,
            session: &s,
            user: &u,
            node: "n2",
            epoch: 1,
            mesh_max: 6,
            live_nodes: Some(&live),
            now_ms: 2,
        })
        .await
        .unwrap();
    // (In join order, which the concurrent joins above made: compare as a set.)
    let mut listed: Vec<String> = listed.before.into_iter().map(|m| m.session).collect();
    listed.sort();
    assert_eq!(listed, vec!["s2.n0", "s4.n0", "s6.n0"]);
    assert_eq!(f.store.av_member(&r, "s7.n3").await.unwrap(), None);
    // Nodes that died unseen; then every run of a node, when it starts again under its name.
    assert_eq!(
        f.store.av_forget_other_nodes(&r, "n0", &[]).await.unwrap(),
        1,
        "s9.n2"
    );
    let snap = f.store.av_snapshot(std::slice::from_ref(&r)).await.unwrap();
    let mut left: Vec<&str> = snap[0].2.iter().map(|m| m.session.as_str()).collect();
    left.sort();
    assert_eq!(left, vec!["s2.n0", "s4.n0", "s6.n0"]);
    assert_eq!(f.store.av_forget_node("n0", None).await.unwrap(), 3);
    other.store.close().await;
}

/// Cluster SFU ownership: two stores (two nodes) claim one room's SFU at once and agree on one
/// owner; a claim of a live owner stands, one of a node not live is taken over (once, by one
/// claimant); only the owner's release or its restart frees the room.
async fn one_node_runs_a_rooms_sfu(f: Fixture) {
    let r = RoomId::from("big.class");
    let other = open(&f.url).await;
    assert_eq!(f.store.sfu_owner(&r).await.unwrap(), None);
    let (a, b) = futures_util::future::join(
        f.store.sfu_claim(&r, "n0", None, 1),
        other.store.sfu_claim(&r, "n1", None, 1),
    )
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "one owner");
    let (owner, loser) = if a == "n0" {
        ("n0", "n1")
    } else {
        ("n1", "n0")
    };
    assert_eq!(f.store.sfu_owner(&r).await.unwrap().as_deref(), Some(owner));
    // The owner is live (or nobody can tell): its claim stands.
    let live = vec![owner.to_owned()];
    assert_eq!(
        f.store.sfu_claim(&r, loser, Some(&live), 2).await.unwrap(),
        owner
    );
    assert_eq!(f.store.sfu_claim(&r, loser, None, 2).await.unwrap(), owner);
    // Another node's release leaves it; the owner's frees it.
    f.store.sfu_release(&r, loser).await.unwrap();
    assert_eq!(f.store.sfu_owner(&r).await.unwrap().as_deref(), Some(owner));
    f.store.sfu_release(&r, owner).await.unwrap();
    assert_eq!(f.store.sfu_owner(&r).await.unwrap(), None);
    // A dead owner's claim: two claimants that both see it dead agree on one successor.
    assert_eq!(
        f.store.sfu_claim(&r, "gone", None, 3).await.unwrap(),
        "gone"
    );
    let live = vec!["n0".to_owned(), "n1".to_owned()];
    let (a, b) = futures_util::future::join(
        f.store.sfu_claim(&r, "n0", Some(&live), 4),
        other.store.sfu_claim(&r, "n1", Some(&live), 4),
    )
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "one successor");
    assert!(a == "n0" || a == "n1", "{a}");
    // A node that starts again under its name forgets its rooms.
    f.store
        .sfu_claim(&RoomId::from("r2"), &a, None, 5)
        .await
        .unwrap();
    assert_eq!(f.store.sfu_release_node(&a).await.unwrap(), 2);
    assert_eq!(f.store.sfu_owner(&r).await.unwrap(), None);
    other.store.close().await;
}

/// Whiteboard compaction never loses an update: four writers on two stores (two nodes) append
/// Yjs updates to one board while a compactor on each store folds the log in small batches;
/// one writer appends its updates in swapped pairs, so batches end with updates whose
/// predecessors are not folded yet (pending in yrs terms). After the writers stop and the log
/// is folded away, the snapshot alone holds every update written.
async fn board_compaction_never_loses_an_update(f: Fixture) {
    use studyhall::rooms::boards::fold;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, Map, ReadTxn, Transact, Update};
    const WRITERS: usize = 4;
    const EACH: usize = 40;
    f.store
        .create_room(&room("r", Visibility::Open))
        .await
        .unwrap();
    let other = open(&f.url).await;
    let stores = [f.store.clone(), other.store.clone()];
    let r = RoomId::from("r");
    stores[0].create_board(&r, "main").await.unwrap();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = stores[w % 2].clone();
        let (r, done) = (r.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let doc = Doc::new();
            let map = doc.get_or_insert_map("m");
            let mut updates = Vec::new();
            for i in 0..EACH {
                let before = doc.transact().state_vector();
                map.insert(&mut doc.transact_mut(), format!("w{w}-{i}"), i as i64);
                updates.push(doc.transact().encode_diff_v1(&before));
            }
            if w == 3 {
                for pair in updates.chunks_mut(2) {
                    pair.reverse();
                }
            }
            for u in updates {
                store.append_board_update(&r, "main", &u).await.unwrap();
                tokio::task::yield_now().await;
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let mut compactors = Vec::new();
    for store in stores.clone() {
        let (r, done) = (r.clone(), done.clone());
        compactors.push(tokio::spawn(async move {
            let (mut folded, mut races) = (0, 0);
            loop {
                let writing = done.load(std::sync::atomic::Ordering::SeqCst) < WRITERS;
                let c = store.compact_board(&r, "main", 7, fold).await.unwrap();
                folded += c.folded;
                races += usize::from(c.lost_race);
                if !writing && c.folded == 0 && !c.lost_race {
                    return (folded, races);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for w in writers {
        within("writer", w).await.unwrap();
    }
    let mut folded = 0;
    for c in compactors {
        folded += within("compactor", c).await.unwrap().0;
    }
    assert_eq!(folded, WRITERS * EACH, "every update folded exactly once");
    let stored = f.store.board_state(&r, "main").await.unwrap().unwrap();
    assert!(stored.updates.is_empty(), "the log is folded away");
    let doc = Doc::new();
    let map = doc.get_or_insert_map("m");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&stored.snapshot).unwrap())
        .unwrap();
    let txn = doc.transact();
    for w in 0..WRITERS {
        for i in 0..EACH {
            assert_eq!(
                map.get(&txn, &format!("w{w}-{i}")),
                Some(yrs::Out::Any((i as i64).into())),
                "w{w}-{i} is in the snapshot"
            );
        }
    }
    assert_eq!(map.len(&txn), (WRITERS * EACH) as u32);
    other.store.close().await;
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("c.db").display());
                    let f = super::open(&url).await;
                    let store = f.store.clone();
                    crate::common::within(stringify!($case), super::$case(f)).await;
                    store.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let db = crate::common::PgDb::create().await;
                    let f = super::open(&db.url).await;
                    let store = f.store.clone();
                    crate::common::within(stringify!($case), super::$case(f)).await;
                    store.close().await;
                    db.drop_db().await;
                }
            )*
        }
    };
}

conformance!(
    rooms_crud,
    members_and_roles,
    seq_is_gap_free_and_events_page_both_ways,
    idempotent_send_and_refusals,
    edit_delete_react,
    read_markers_and_unread,
    settings_keep_the_first_value,
    two_writers_share_one_gap_free_sequence,
    close_commits_everything_queued,
    log_writes_wait_for_company_but_never_hold_up_a_waited_write,
    log_writes_in_one_batch_leave_what_one_by_one_would,
    questions_votes_answers_and_renderings,
    search_ranks_and_respects_pending,
    mutes_bans_reports_and_audit,
    batched_sends_match_single_sends,
    plain_sends_in_a_batch_find_their_copies,
    simultaneous_checkins_count_once,
    av_members_in_one_join_order,
    one_node_runs_a_rooms_sfu,
    board_compaction_never_loses_an_update,
);

/// A batch that fails is retried write by write; what a retried send earned (a badge
/// announcement, sequenced in that send's own transaction) reaches the commit hook right
/// after the send, so each room's seqs reach the hook in increasing order (the hub drops a
/// seq lower than one it has already seen).
#[tokio::test(flavor = "current_thread")]
async fn retried_batch_publishes_each_rooms_seqs_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let published = Arc::new(Mutex::new(Vec::new()));
    let sink = published.clone();
    let hook: CommitHook = Arc::new(move |ev: CommittedEvent| sink.lock().unwrap().push(ev));
    let mut opts = StoreOptions::new(url.as_str());
    // Queued writes wait for each other: the three below commit as one batch.
    opts.batch_linger_us = 200_000;
    let eng = studyhall::engagement::EngagementConfig {
        badges: vec![studyhall::engagement::BadgeRule {
            id: "first_message".into(),
            name: "First message".into(),
            description: "1 message".into(),
            metric: studyhall::engagement::Metric::Messages,
            threshold: 1,
        }],
        ..Default::default()
    };
    opts.engagement = Arc::new(eng);
    let s = within(
        "open store",
        Store::open(&opts, Arc::new(Metrics::default()), Some(hook)),
    )
    .await
    .unwrap();
    let mut a = room("a", Visibility::Open);
    a.engagement.announce_badges = true;
    s.create_room(&a).await.unwrap();
    s.create_room(&room("z", Visibility::Open)).await.unwrap();
    // A message in "z" whose edit event is corrupt: deleting it fails the batch.
    let (bad, _) = sent(s.write(send("z", "x", "bad", "b")).await.unwrap());
    s.write(WriteOp::Edit {
        room: RoomId::from("z"),
        id: bad.clone(),
        by: user("x"),
        text: "edited".into(),
    })
    .await
    .unwrap();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE events SET body = 'not json' WHERE kind = 'message_edited'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    published.lock().unwrap().clear();

    let first = s.submit(send("a", "u", "one", "1")).await.unwrap();
    let second = s.submit(send("a", "v", "two", "2")).await.unwrap();
    let failing = s
        .submit(WriteOp::Delete {
            room: RoomId::from("z"),
            id: bad,
            by: user("x"),
            as_moderator: false,
        })
        .await
        .unwrap();
    within("batch", async {
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert!(failing.await.unwrap().is_err());
    })
    .await;
    let seqs: Vec<i64> = published
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.room.as_str() == "a")
        .map(|e| e.seq)
        .collect();
    // Two sends and each sender's announcement, in order.
    assert_eq!(seqs.len(), 4, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    s.close().await;
}

/// One random operation, by the index of the message or question it targets, so the same
/// sequence can be applied to two stores whose ids differ.
#[derive(Clone, Debug)]
enum Op {
    Send {
        from: usize,
        text: String,
        cid: usize,
    },
    Edit {
        msg: usize,
        by: usize,
        text: String,
    },
    Delete {
        msg: usize,
        by: usize,
        moderator: bool,
    },
    React {
        msg: usize,
        who: usize,
        emoji: usize,
        add: bool,
    },
    Ask {
        who: usize,
        anonymous: bool,
        pending: bool,
    },
    Vote {
        q: usize,
        who: usize,
        up: bool,
    },
    Answer {
        q: usize,
        who: usize,
    },
    Status {
        q: usize,
        status: usize,
    },
}

const PEOPLE: [&str; 3] = ["ann", "bob", "cy"];
const EMOJI: [&str; 3] = ["👍", "🎉", "x"];
const STATUSES: [QuestionStatus; 4] = [
    QuestionStatus::Open,
    QuestionStatus::Pinned,
    QuestionStatus::Answered,
    QuestionStatus::Dismissed,
];

fn random_op(rng: &mut rand::rngs::StdRng) -> Op {
    use rand::Rng;
    let who = rng.random_range(0..PEOPLE.len());
    let idx = rng.random_range(0..8);
    let text =
        ["hi", "hello world", "ça va?", "1 2 3", "🦀 rust"][rng.random_range(0..5)].to_owned();
    match rng.random_range(0..9) {
        0 | 1 => Op::Send {
            from: who,
            text,
            // Small, so some sends repeat a client_msg_id (the idempotent path).
            cid: rng.random_range(0..12),
        },
        2 => Op::Edit {
            msg: idx,
            by: who,
            text,
        },
        3 => Op::Delete {
            msg: idx,
            by: who,
            moderator: rng.random_bool(0.3),
        },
        4 => Op::React {
            msg: idx,
            who,
            emoji: rng.random_range(0..EMOJI.len()),
            add: rng.random_bool(0.7),
        },
        5 => Op::Ask {
            who,
            anonymous: rng.random_bool(0.3),
            pending: rng.random_bool(0.3),
        },
        6 => Op::Vote {
            q: idx,
            who,
            up: rng.random_bool(0.7),
        },
        7 => Op::Answer { q: idx, who },
        _ => Op::Status {
            q: idx,
            status: rng.random_range(0..STATUSES.len()),
        },
    }
}

/// Applies `op` to one store; `msgs` and `qs` are that store's ids by index. The outcome is
/// returned without ids or times, to compare with the other backend's.
async fn apply_op(
    s: &Store,
    op: &Op,
    msgs: &mut Vec<MessageId>,
    qs: &mut Vec<QuestionId>,
) -> String {
    let r = RoomId::from("r");
    let msg = |i: usize| {
        msgs.get(i)
            .cloned()
            .unwrap_or_else(|| MessageId::from("m-none"))
    };
    let q = |i: usize| {
        qs.get(i)
            .cloned()
            .unwrap_or_else(|| QuestionId::from("q-none"))
    };
    let w = match op.clone() {
        Op::Send { from, text, cid } => {
            s.write(send("r", PEOPLE[from], &text, &cid.to_string()))
                .await
        }
        Op::Edit { msg: m, by, text } => {
            s.write(WriteOp::Edit {
                room: r,
                id: msg(m),
                by: user(PEOPLE[by]),
                text,
            })
            .await
        }
        Op::Delete {
            msg: m,
            by,
            moderator,
        } => {
            s.write(WriteOp::Delete {
                room: r,
                id: msg(m),
                by: user(PEOPLE[by]),
                as_moderator: moderator,
            })
            .await
        }
        Op::React {
            msg: m,
            who,
            emoji,
            add,
        } => {
            s.write(WriteOp::React {
                room: r,
                id: msg(m),
                user: user(PEOPLE[who]),
                emoji: EMOJI[emoji].into(),
                add,
                max_distinct: 2,
            })
            .await
        }
        Op::Ask {
            who,
            anonymous,
            pending,
        } => {
            s.write(ask("r", PEOPLE[who], "why?", anonymous, pending))
                .await
        }
        Op::Vote { q: i, who, up } => {
            s.write(WriteOp::Vote {
                room: r,
                question: q(i),
                user: UserId::from(PEOPLE[who]),
                up,
            })
            .await
        }
        Op::Answer { q: i, who } => {
            s.write(WriteOp::Answer {
                room: r,
                question: q(i),
                author: user(PEOPLE[who]),
                text: "because".into(),
            })
            .await
        }
        Op::Status { q: i, status } => {
            s.write(WriteOp::SetQuestionStatus {
                room: r,
                question: q(i),
                status: STATUSES[status],
            })
            .await
        }
    };
    match w {
        Ok(WriteOutcome::Sent {
            id, seq, duplicate, ..
        }) => {
            if !duplicate {
                msgs.push(id);
            }
            format!("sent seq {seq} duplicate {duplicate}")
        }
        Ok(WriteOutcome::Asked {
            id, seq, status, ..
        }) => {
            qs.push(id);
            format!("asked seq {seq} {status:?}")
        }
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("error {:?}", std::mem::discriminant(&e)),
    }
}

/// An event body with ids replaced by their order of first appearance and times zeroed.
fn normalised(
    body: &str,
    ids: &mut std::collections::HashMap<String, String>,
) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value, ids: &mut std::collections::HashMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    match (k.as_str(), &*v) {
                        ("id" | "question" | "reply_to", serde_json::Value::String(s)) => {
                            let n = ids.len();
                            let id = ids
                                .entry(s.clone())
                                .or_insert_with(|| format!("#{n}"))
                                .clone();
                            *v = serde_json::Value::String(id);
                        }
                        ("ts" | "edited_ts" | "answered_at", serde_json::Value::Number(_)) => {
                            *v = serde_json::json!(0)
                        }
                        _ => walk(v, ids),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| walk(v, ids)),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
    walk(&mut v, ids);
    v
}

/// Random operation sequences (send, edit, delete, react, ask, vote, answer, status) applied
/// to a SQLite store and a PostgreSQL store give the same outcomes and leave the same event
/// log, in both renderings, ids and times aside. Budget: `STUDYHALL_FUZZ_CASES` sequences
/// (default 2) of 120 operations, from seed `STUDYHALL_FUZZ_SEED` (default fixed).
#[tokio::test]
async fn random_operation_sequences_leave_the_same_event_log_on_sqlite_and_postgres() {
    use rand::SeedableRng;
    let cases: u64 = std::env::var("STUDYHALL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("STUDYHALL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5717_d4a1);
    for case in 0..cases {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ case);
        let dir = tempfile::tempdir().unwrap();
        let lite = open(&format!("sqlite://{}", dir.path().join("c.db").display())).await;
        let db = PgDb::create().await;
        let pg = open(&db.url).await;
        let mut state = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for f in [&lite, &pg] {
            f.store
                .create_room(&room("r", Visibility::Open))
                .await
                .unwrap();
        }
        let ops: Vec<Op> = (0..120).map(|_| random_op(&mut rng)).collect();
        within("random operations on both stores", async {
            for (i, op) in ops.iter().enumerate() {
                let [a, b] = &mut state;
                let on_lite = apply_op(&lite.store, op, &mut a.0, &mut a.1).await;
                let on_pg = apply_op(&pg.store, op, &mut b.0, &mut b.1).await;
                assert_eq!(
                    on_lite, on_pg,
                    "case {case} (seed {seed}) op {i} {op:?}: SQLite and PostgreSQL differ"
                );
            }
        })
        .await;
        let r = RoomId::from("r");
        for view in [View::Moderator, View::Member] {
            let mut logs = Vec::new();
            for f in [&lite, &pg] {
                let page = f.store.events_after(&r, 0, 10_000, view).await.unwrap();
                let mut ids = std::collections::HashMap::new();
                logs.push(
                    page.events
                        .iter()
                        .map(|e| normalised(e, &mut ids))
                        .collect::<Vec<_>>(),
                );
            }
            assert!(!logs[0].is_empty());
            for (i, (a, b)) in logs[0].iter().zip(&logs[1]).enumerate() {
                assert_eq!(a, b, "case {case} (seed {seed}): event {i} differs");
            }
            assert_eq!(logs[0].len(), logs[1].len());
        }
        lite.store.close().await;
        pg.store.close().await;
        db.drop_db().await;
    }
}

/// Commits are announced by a publisher task beside the writer, one batch behind. If the
/// commit hook panics there, the writer stops: no later batch commits unannounced (even one
/// already formed while the panicking batch was being told), and each submitter hears the
/// store closed rather than waiting forever.
#[tokio::test(flavor = "current_thread")]
async fn a_panicking_commit_hook_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let announced = Arc::new(Mutex::new(0_i64));
    let count = announced.clone();
    let hook: CommitHook = Arc::new(move |ev: CommittedEvent| {
        assert_ne!(ev.room.as_str(), "boom", "the hook refuses room boom");
        *count.lock().unwrap() += 1;
    });
    let mut opts = StoreOptions::new(url.as_str());
    // Small batches: the writes queued behind the panicking one form later batches.
    opts.batch_max = 4;
    let s = within(
        "open store",
        Store::open(&opts, Arc::new(Metrics::default()), Some(hook)),
    )
    .await
    .unwrap();
    s.create_room(&room("a", Visibility::Open)).await.unwrap();
    s.create_room(&room("boom", Visibility::Open))
        .await
        .unwrap();
    within("a write before", s.write(send("a", "u", "one", "1")))
        .await
        .unwrap();
    let mut replies = vec![s.submit(send("boom", "u", "x", "b")).await.unwrap()];
    for i in 0..40 {
        let cid = format!("q{i}");
        replies.push(s.submit(send("a", "u", "queued", &cid)).await.unwrap());
    }
    let outcomes = within("the queued writes", async {
        let mut all = Vec::new();
        for r in replies {
            all.push(r.await);
        }
        all
    })
    .await;
    assert!(
        matches!(outcomes[0], Err(_) | Ok(Err(StoreError::Closed))),
        "the write whose event panicked: {:?}",
        outcomes[0]
    );
    let after = within("a write after", s.write(send("a", "u", "two", "2"))).await;
    assert!(matches!(after, Err(StoreError::Closed)), "{after:?}");
    // Every message room a holds was announced: none committed behind the panic.
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE room_id = 'a'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(stored, *announced.lock().unwrap());
    assert!(
        stored < 41,
        "the writes behind the panic were refused: {stored}"
    );
}
