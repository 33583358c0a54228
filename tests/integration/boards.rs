//! Whiteboards with yrs as the client: two editors converge on a shared text and map, a late
//! joiner's sync step 1 is answered with exactly what it lacks, a student draws only once
//! granted (and the grant reaches its open session as the server's sync step 1), viewers still
//! sync and relay awareness, and a board survives a restart.

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use studyhall::protocol::{PlatformRole, RoomRole};
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

pub(crate) fn b64(m: &Message) -> String {
    B64.encode(m.encode_v1())
}

pub(crate) fn read(frame: &Value) -> Message {
    let bytes = B64.decode(frame["data"].as_str().unwrap()).unwrap();
    Message::decode_v1(&bytes).unwrap()
}

pub(crate) fn text(doc: &Doc) -> String {
    let t = doc.get_or_insert_text("t");
    t.get_string(&doc.transact())
}

/// The document's text "t" (taken before a transaction is open: taking it opens one).
pub(crate) fn text_of(doc: &Doc) -> yrs::TextRef {
    doc.get_or_insert_text("t")
}

/// Edits `doc` with `f` and returns the update message of the edit.
pub(crate) fn edit(doc: &Doc, f: impl FnOnce(&mut yrs::TransactionMut)) -> Message {
    let before = doc.transact().state_vector();
    f(&mut doc.transact_mut());
    let update = doc.transact().encode_diff_v1(&before);
    Message::Sync(SyncMessage::Update(update))
}

/// Inserts `s` at `at` into the text "t" and returns the update message.
pub(crate) fn insert(doc: &Doc, at: u32, s: &str) -> Message {
    let t = text_of(doc);
    edit(doc, |txn| t.insert(txn, at, s))
}

pub(crate) fn apply(doc: &Doc, m: Message) {
    let update = match m {
        Message::Sync(SyncMessage::Update(u) | SyncMessage::SyncStep2(u)) => u,
        other => panic!("expected an update, got {other:?}"),
    };
    doc.transact_mut()
        .apply_update(Update::decode_v1(&update).unwrap())
        .unwrap();
}

pub(crate) fn board(room: &str, m: &Message) -> Value {
    json!({"type":"board","room":room,"board":"main","data":b64(m)})
}

async fn person(s: &Server, user: &str, room: &str, role: RoomRole) -> Client {
    let mut c = Client::connect(s.addr, &token(user, PlatformRole::Student, &[(room, role)])).await;
    c.join(room).await;
    c
}

#[tokio::test]
async fn editors_converge_late_joiners_get_what_they_lack_and_drawing_needs_a_grant() {
    on_sqlite(|_| {}, converge).await;
}

#[tokio::test]
async fn editors_converge_and_drawing_needs_a_grant_on_postgres() {
    on_postgres(|_| {}, converge).await;
}

async fn converge(s: &Server) {
    s.room("w", "invite").await;
    let mut host = person(s, "hal", "w", RoomRole::Host).await;
    let mut sam = person(s, "sam", "w", RoomRole::Member).await;
    let (hd, sd) = (Doc::new(), Doc::new());
    let hello = insert(&hd, 0, "hello");
    host.ok(board("w", &hello)).await;
    apply(&sd, read(&sam.until("board").await));
    assert_eq!(text(&sd), "hello");
    // A student without a grant may not change the board.
    let early = insert(&sd, 5, "!");
    assert_eq!(sam.err(board("w", &early)).await, "forbidden");
    assert_eq!(
        sam.err(json!({"type":"board_grant","room":"w","board":"main","user":"sam","draw":true}))
            .await,
        "forbidden"
    );
    host.ok(json!({"type":"board_grant","room":"w","board":"main","user":"sam","draw":true}))
        .await;
    // The grant reaches sam's open session as the server's sync step 1: its state vector, so
    // that sam's answer can carry what the server lacks.
    let pushed = read(&sam.until("board").await);
    let Message::Sync(SyncMessage::SyncStep1(sv)) = pushed else {
        panic!("expected the server's sync step 1 after the grant, got {pushed:?}");
    };
    assert_eq!(sv, hd.transact().state_vector());
    sam.ok(board("w", &early)).await;
    let world = insert(&sd, 6, " world");
    sam.ok(board("w", &world)).await;
    apply(&hd, read(&host.until("board").await));
    apply(&hd, read(&host.until("board").await));
    let hm = hd.get_or_insert_map("m");
    let color = edit(&hd, |t| {
        hm.insert(t, "color", "red");
    });
    host.ok(board("w", &color)).await;
    apply(&sd, read(&sam.until("board").await));
    assert_eq!(text(&hd), "hello! world");
    assert_eq!(text(&sd), text(&hd));
    let m = sd.get_or_insert_map("m");
    assert_eq!(
        m.get(&sd.transact(), "color")
            .map(|v| v.to_string(&sd.transact())),
        Some("red".into())
    );

    // A late joiner who has only "hello" asks with its state vector: the step 2 holds exactly
    // the rest (it cannot be applied on its own: it builds on what the joiner has).
    let mut late = person(s, "lia", "w", RoomRole::Viewer).await;
    let ld = Doc::new();
    apply(&ld, hello.clone());
    let step1 = Message::Sync(SyncMessage::SyncStep1(ld.transact().state_vector()));
    late.ok(board("w", &step1)).await;
    let answer = read(&late.until("board").await);
    let Message::Sync(SyncMessage::SyncStep2(diff)) = answer.clone() else {
        panic!("expected a sync step 2, got {answer:?}");
    };
    let alone = Doc::new();
    alone
        .transact_mut()
        .apply_update(Update::decode_v1(&diff).unwrap())
        .unwrap();
    assert_eq!(
        text(&alone),
        "",
        "the answer repeats nothing the joiner had"
    );
    apply(&ld, answer);
    assert_eq!(text(&ld), "hello! world");
    assert_eq!(
        hd.transact().encode_diff_v1(&ld.transact().state_vector()),
        vec![0u8, 0],
        "nothing is missing after the step 2"
    );
    // A viewer may sync and send awareness, not updates; awareness reaches the others as sent.
    let nope = insert(&ld, 0, ">");
    assert_eq!(late.err(board("w", &nope)).await, "forbidden");
    let mut aw = Awareness::new(ld.clone());
    aw.set_local_state_raw(r#"{"user":"lia","cursor":3}"#);
    let here = Message::Awareness(aw.update().unwrap());
    late.ok(board("w", &here)).await;
    let got = host.until("board").await;
    assert_eq!(got["data"], json!(b64(&here)));
    // Malformed data and bad ids are refused.
    assert_eq!(
        host.err(json!({"type":"board","room":"w","board":"main","data":"%%%"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        host.err(json!({"type":"board","room":"w","board":"no/slash","data":b64(&here)}))
            .await,
        "bad_request"
    );
}

#[tokio::test]
async fn a_board_survives_a_restart_and_its_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let cfg = |url: &str| {
        let mut c = base_config(url.to_owned());
        c.board_max_per_room = 1;
        c.board_max_message_bytes = 1024;
        c
    };
    let s = Server::start(cfg(&url)).await;
    s.room("w", "open").await;
    let mut host = person(&s, "hal", "w", RoomRole::Host).await;
    let hd = Doc::new();
    let hello = insert(&hd, 0, "kept");
    host.ok(board("w", &hello)).await;
    let other = json!({"type":"board","room":"w","board":"second","data":b64(&hello)});
    assert_eq!(host.err(other).await, "too_large");
    let big = insert(&hd, 0, &"x".repeat(2000));
    assert_eq!(host.err(board("w", &big)).await, "too_large");
    drop(host);
    s.stop().await;

    let s = Server::start(cfg(&url)).await;
    let mut host = person(&s, "hal", "w", RoomRole::Host).await;
    let fresh = Doc::new();
    let step1 = Message::Sync(SyncMessage::SyncStep1(StateVector::default()));
    host.ok(board("w", &step1)).await;
    apply(&fresh, read(&host.until("board").await));
    assert_eq!(text(&fresh), "kept");
    // Someone who may draw also gets the server's own step 1, to send what the server lacks.
    let ours = read(&host.until("board").await);
    assert!(
        matches!(ours, Message::Sync(SyncMessage::SyncStep1(_))),
        "{ours:?}"
    );
    s.stop().await;
}

/// Every update acknowledged is in the store's log at once (no waiting for a save: a crash
/// after the `ok` loses nothing), the saver folds a long log into the snapshot, and a board
/// loaded from snapshot plus log, after a restart, holds every stroke.
#[tokio::test]
async fn acknowledged_updates_are_logged_and_compaction_keeps_them() {
    with_sqlite_url(logged_and_compacted).await;
}

#[tokio::test]
async fn acknowledged_updates_are_logged_and_compacted_on_postgres() {
    with_postgres_url(logged_and_compacted).await;
}

async fn logged_and_compacted(url: &str) {
    let cfg = |url: &str| {
        let mut c = base_config(url.to_owned());
        c.board_compact_every = 4;
        // The test calls the saver itself.
        c.board_save_ms = 3_600_000;
        c
    };
    let s = Server::start(cfg(url)).await;
    s.room("w", "open").await;
    let mut host = person(&s, "hal", "w", RoomRole::Host).await;
    let hd = Doc::new();
    let room = studyhall::protocol::RoomId::from("w");
    let stored_text = |stored: studyhall::store::StoredBoard| {
        let folded = studyhall::rooms::boards::fold(&stored.snapshot, &stored.updates).unwrap();
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(&folded).unwrap())
            .unwrap();
        text(&doc)
    };
    let mut written = String::new();
    for (i, word) in ["one ", "two ", "three ", "four ", "five ", "six "]
        .iter()
        .enumerate()
    {
        host.ok(board("w", &insert(&hd, written.len() as u32, word)))
            .await;
        written.push_str(word);
        let stored = s.app.store.board_state(&room, "main").await.unwrap();
        let stored = stored.expect("the board exists once updated");
        assert_eq!(stored.updates.len(), i + 1, "one log row per update");
        assert_eq!(stored_text(stored), written);
    }
    // Six logged, four or more: the saver's look folds them all into the snapshot.
    studyhall::rooms::boards::save_all(&s.app, false).await;
    let stored = s
        .app
        .store
        .board_state(&room, "main")
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.updates.is_empty(),
        "{} still logged",
        stored.updates.len()
    );
    assert_eq!(stored_text(stored), written);
    // More strokes after the compaction land in the log again.
    host.ok(board("w", &insert(&hd, written.len() as u32, "seven")))
        .await;
    written.push_str("seven");
    assert_eq!(s.app.store.board_log_len(&room, "main").await.unwrap(), 1);
    drop(host);
    s.stop().await;

    let s = Server::start(cfg(url)).await;
    let mut ann = person(&s, "ann", "w", RoomRole::Member).await;
    let fresh = Doc::new();
    let step1 = Message::Sync(SyncMessage::SyncStep1(StateVector::default()));
    ann.ok(board("w", &step1)).await;
    apply(&fresh, read(&ann.until("board").await));
    assert_eq!(text(&fresh), written);
    s.stop().await;
}
