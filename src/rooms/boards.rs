//! Whiteboards: each board of a room is a Yjs document held here (yrs), loaded from the store
//! on first use. `board {room, board, data}` carries one y-protocols message: a sync step 1 is
//! answered with a sync step 2 holding exactly what the sender lacks (then, for a session that
//! may draw, the server's own step 1, as y-websocket servers do); a step 2 or an update from
//! someone who may draw is merged and relayed to the room's other sessions; awareness is
//! relayed as it came. `board_grant` (host/ta) lets others draw, and sends the grantee's
//! sessions in the room the server's step 1, so that their clients learn it at once. Every
//! update merged is appended to the board's log in the store before the sender's `ok`; the
//! saver (`run_saver`, every `board_save_ms`, and at shutdown) folds a board's log into its
//! snapshot once `board_compact_every` updates have piled up ([`fold`] merges them; the store
//! makes sure no update is lost on the way). In cluster
//! mode each node holding a board keeps a full copy: updates merged here go to the other nodes
//! through the broker ([`BoardRelay::Update`]) and are merged there too, and a node that loads
//! a board asks the others for what the store lacks ([`BoardRelay::Sync`]); Yjs merges are
//! idempotent and commutative, so the copies converge whatever the order. Nothing here touches
//! a socket or SQL; the document lock is never held across an `.await`.

use super::check_room_id;
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::hub::Frame;
use crate::node::BoardRelay;
use crate::protocol::{self, EmptyOk, RoomId, ServerMsg, UserId};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use dashmap::DashMap;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// One board in memory.
struct Board {
    doc: Doc,
    /// Users other than host/ta who may draw.
    grants: HashSet<UserId>,
    /// Updates in the store's log of this board that no compaction has folded yet, as far as
    /// this node knows (those it loaded plus those it appended).
    logged: usize,
    /// An update merged here may be missing from the log (its append failed): the saver
    /// appends the whole state.
    unlogged: bool,
    /// The encoded state's size at the last load or compaction, plus every update merged since
    /// (an upper bound: merged updates never take more room than their sum).
    size: usize,
}

type Shared = Arc<Mutex<Board>>;

/// The boards held on this node, by (room, board).
#[derive(Default)]
pub struct Boards(DashMap<(RoomId, String), Shared>);

fn lock(b: &Shared) -> MutexGuard<'_, Board> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// Board ids follow the room id rules: 1..=64 of `[A-Za-z0-9_.-]`.
fn check_board(board: &str) -> Result<()> {
    if protocol::valid_room_id(board) {
        Ok(())
    } else {
        Err(Error::bad_request(
            "board ids are 1..=64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

impl Boards {
    /// The board, loaded from the store if need be. A board that does not exist yet is
    /// created when `create` (within `board_max_per_room`), else `None`.
    async fn get(
        &self,
        app: &App,
        room: &RoomId,
        board: &str,
        create: bool,
    ) -> Result<Option<Shared>> {
        let key = (room.clone(), board.to_owned());
        if let Some(b) = self.0.get(&key) {
            return Ok(Some(b.clone()));
        }
        let mut stored = app.store.board_state(room, board).await?;
        if stored.is_none() {
            if !create {
                return Ok(None);
            }
            let mut ids: HashSet<String> = app.store.board_ids(room).await?.into_iter().collect();
            ids.extend(
                self.0
                    .iter()
                    .filter(|e| &e.key().0 == room)
                    .map(|e| e.key().1.clone()),
            );
            if ids.len() >= app.config.board_max_per_room {
                return Err(Error::TooLarge(format!(
                    "a room holds at most {} boards",
                    app.config.board_max_per_room
                )));
            }
            app.store.create_board(room, board).await?;
            app.policies.extras_changed(room);
            // Another node may have created it (and logged updates) meanwhile.
            stored = app.store.board_state(room, board).await?;
        }
        let stored = stored.unwrap_or_default();
        let doc = Doc::new();
        let size = stored.len();
        let logged = stored.updates.len();
        for bytes in std::iter::once(&stored.snapshot).chain(&stored.updates) {
            apply(&doc, bytes)
                .map_err(|e| Error::Internal(format!("stored board {room}/{board}: {e}")))?;
        }
        let grants = app
            .store
            .board_grants(room, board)
            .await?
            .into_iter()
            .collect();
        let sv = doc.transact().state_vector().encode_v1();
        let loaded = Arc::new(Mutex::new(Board {
            doc,
            grants,
            logged,
            unlogged: false,
            size,
        }));
        let mut fresh = false;
        let shared = self
            .0
            .entry(key)
            .or_insert_with(|| {
                fresh = true;
                loaded
            })
            .clone();
        if fresh {
            // Other nodes may hold strokes not saved yet: they answer with what we lack.
            app.broker.board(room, board, BoardRelay::Sync(sv));
        }
        Ok(Some(shared))
    }
}

/// Merges one encoded update (v1) into a document.
fn apply(doc: &Doc, bytes: &[u8]) -> std::result::Result<(), String> {
    let update = Update::decode_v1(bytes).map_err(|e| e.to_string())?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.transact_mut().apply_update(update)
    })) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the update could not be merged".into()),
    }
}

/// A compaction's merge: the snapshot with the updates folded in, as one encoded update (v1)
/// of the whole document. Updates whose dependencies are missing stay in it (yrs encodes
/// pending updates with the state), so nothing given is dropped.
pub fn fold(snapshot: &[u8], updates: &[Vec<u8>]) -> std::result::Result<Vec<u8>, String> {
    let doc = Doc::new();
    for bytes in std::iter::once(snapshot).chain(updates.iter().map(Vec::as_slice)) {
        apply(&doc, bytes)?;
    }
    let state = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    Ok(state)
}

fn board_frame(room: &RoomId, board: &str, msg: &Message) -> Frame {
    let data = B64.encode(msg.encode_v1());
    Frame::from(protocol::encode(&ServerMsg::Board {
        room,
        board,
        data: &data,
    }))
}

/// Decodes a `board` frame's `data` into one y-protocols message, within the size limit.
fn decode(app: &App, data: &str) -> Result<Message> {
    let max = app.config.board_max_message_bytes;
    if data.len() > max.div_ceil(3) * 4 {
        return Err(Error::TooLarge(format!(
            "a board message is at most {max} bytes"
        )));
    }
    let bytes = B64
        .decode(data)
        .map_err(|_| Error::bad_request("data must be base64"))?;
    if bytes.len() > max {
        return Err(Error::TooLarge(format!(
            "a board message is at most {max} bytes"
        )));
    }
    Message::decode_v1(&bytes)
        .map_err(|e| Error::bad_request(format!("data is not a y-protocols message: {e}")))
}

pub(super) async fn message(
    ctx: &mut Ctx,
    room: RoomId,
    board: String,
    data: String,
) -> Result<Outcome> {
    check_room_id(&room)?;
    check_board(&board)?;
    let role = ctx.joined_role(&room)?;
    let msg = decode(&ctx.app, &data)?;
    let app = ctx.app.clone();
    match msg {
        Message::Sync(SyncMessage::SyncStep1(sv)) => {
            let found = app.boards.get(&app, &room, &board, false).await?;
            let (diff, ours) = match &found {
                Some(b) => {
                    let b = lock(b);
                    let txn = b.doc.transact();
                    let may_draw = role.can_moderate() || b.grants.contains(&ctx.me.user);
                    (
                        txn.encode_diff_v1(&sv),
                        may_draw.then(|| txn.state_vector()),
                    )
                }
                None => (Doc::new().transact().encode_diff_v1(&sv), None),
            };
            // A board not created yet: those who may draw still get the server's step 1 (an
            // empty state vector), which is how a client learns that it may draw.
            let ours = match (&found, ours) {
                (None, _) => {
                    let may_draw = role.can_moderate()
                        || app
                            .store
                            .board_grants(&room, &board)
                            .await?
                            .contains(&ctx.me.user);
                    may_draw.then(StateVector::default)
                }
                (Some(_), ours) => ours,
            };
            let step2 = Message::Sync(SyncMessage::SyncStep2(diff));
            ctx.push(board_frame(&room, &board, &step2)).await;
            if let Some(sv) = ours {
                let step1 = Message::Sync(SyncMessage::SyncStep1(sv));
                ctx.push(board_frame(&room, &board, &step1)).await;
            }
        }
        Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
            let b = app
                .boards
                .get(&app, &room, &board, true)
                .await?
                .ok_or_else(|| Error::Internal("board not created".into()))?;
            merge(ctx, &room, &board, &b, role.can_moderate(), &update)?;
            // Durable before the sender's ok. If the append fails the document still holds the
            // update: the saver appends the whole state at its next look.
            if let Err(e) = app.store.append_board_update(&room, &board, &update).await {
                lock(&b).unlogged = true;
                return Err(e.into());
            }
            lock(&b).logged += 1;
        }
        Message::Awareness(_) | Message::AwarenessQuery => {
            let frame = Frame::from(protocol::encode(&ServerMsg::Board {
                room: &room,
                board: &board,
                data: &data,
            }));
            app.hub.notify_other_sessions(&room, &ctx.handle.id, &frame);
        }
        Message::Auth(_) | Message::Custom(..) => {
            return Err(Error::bad_request(
                "a board carries sync and awareness messages only",
            ));
        }
    }
    Ok(Outcome::ok(EmptyOk {}))
}

/// Merges an update into the board (if the session may draw and it fits) and relays it to the
/// room's other sessions as an update message.
fn merge(
    ctx: &Ctx,
    room: &RoomId,
    board: &str,
    shared: &Shared,
    moderator: bool,
    update: &[u8],
) -> Result<()> {
    let max = ctx.app.config.board_max_doc_bytes;
    {
        let mut b = lock(shared);
        if !moderator && !b.grants.contains(&ctx.me.user) {
            return Err(Error::Forbidden(
                "only host/ta and users granted drawing may change this board".into(),
            ));
        }
        if b.size + update.len() > max {
            return Err(Error::TooLarge(format!(
                "a board's document is at most {max} bytes"
            )));
        }
        let decoded = Update::decode_v1(update)
            .map_err(|e| Error::bad_request(format!("not a Yjs update: {e}")))?;
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.doc.transact_mut().apply_update(decoded)
        }));
        match applied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::bad_request(format!("update refused: {e}"))),
            Err(_) => {
                // The document may be half-changed: forget it, the next use reloads the saved one.
                drop(b);
                ctx.app.boards.0.remove(&(room.clone(), board.to_owned()));
                return Err(Error::bad_request("update refused"));
            }
        }
        b.size += update.len();
    }
    let frame = board_frame(
        room,
        board,
        &Message::Sync(SyncMessage::Update(update.to_vec())),
    );
    ctx.app.hub.notify_local(room, Some(&ctx.handle.id), &frame);
    ctx.app
        .broker
        .board(room, board, BoardRelay::Update(update.to_vec()));
    Ok(())
}

/// What another node said about a board. An update is merged into this node's copy (when it
/// holds one: a node that loads the board later asks for what the store lacks) and passed to
/// this node's sessions in the room; a sync request is answered with what the asker lacks.
pub(crate) fn remote(app: &App, room: &RoomId, board: &str, relay: BoardRelay) {
    let shared = app
        .boards
        .0
        .get(&(room.clone(), board.to_owned()))
        .map(|b| b.clone());
    match relay {
        BoardRelay::Update(update) => {
            if let Some(shared) = &shared {
                let Ok(decoded) = Update::decode_v1(&update) else {
                    tracing::warn!(room = %room, board = %board, "undecodable board update from another node");
                    return;
                };
                let mut b = lock(shared);
                let before = b.doc.transact().state_vector();
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    b.doc.transact_mut().apply_update(decoded)
                }));
                match applied {
                    Ok(Ok(())) => {
                        // Only what was new here counts (an answer to another node's sync
                        // request reaches every node, most of which had it already).
                        if b.doc.transact().state_vector() == before {
                            return;
                        }
                        // The node that merged it first logged it.
                        b.size += update.len();
                    }
                    _ => {
                        tracing::warn!(room = %room, board = %board, "a board update from another node was refused");
                        drop(b);
                        app.boards.0.remove(&(room.clone(), board.to_owned()));
                        return;
                    }
                }
            }
            let frame = board_frame(room, board, &Message::Sync(SyncMessage::Update(update)));
            app.hub.notify_local(room, None, &frame);
        }
        BoardRelay::Sync(sv) => {
            let (Some(shared), Ok(sv)) = (shared, StateVector::decode_v1(&sv)) else {
                return;
            };
            let diff = lock(&shared).doc.transact().encode_diff_v1(&sv);
            // An empty update (no structs, no deletions) encodes as two zero bytes: the asker
            // has all we have.
            if diff.len() > 2 {
                app.broker.board(room, board, BoardRelay::Update(diff));
            }
        }
    }
}

pub(super) async fn grant(
    ctx: &mut Ctx,
    room: RoomId,
    board: String,
    user: UserId,
    draw: bool,
) -> Result<Outcome> {
    check_room_id(&room)?;
    check_board(&board)?;
    if user.as_str().is_empty() || user.as_str().chars().count() > 64 {
        return Err(Error::bad_request("user ids are 1..=64 characters"));
    }
    if !ctx.joined_role(&room)?.can_moderate() {
        return Err(Error::Forbidden("only host/ta grant drawing".into()));
    }
    ctx.app
        .store
        .set_board_grant(&room, &board, &user, draw)
        .await?;
    if let Some(b) = ctx.app.boards.0.get(&(room.clone(), board.clone())) {
        let mut b = lock(&b);
        if draw {
            b.grants.insert(user.clone());
        } else {
            b.grants.remove(&user);
        }
    }
    if draw {
        // The grantee's open sessions learn at once that they may draw: the server's own sync
        // step 1 (what it sends only to sessions that may draw), which they answer with a
        // step 2 of anything the server lacks.
        let app = ctx.app.clone();
        let sv = match app.boards.get(&app, &room, &board, false).await? {
            Some(b) => lock(&b).doc.transact().state_vector(),
            None => StateVector::default(),
        };
        let step1 = Message::Sync(SyncMessage::SyncStep1(sv));
        app.hub
            .notify_user(&room, &user, &board_frame(&room, &board, &step1));
    }
    Ok(Outcome::ok(EmptyOk {}))
}

/// Looks at every board held here: appends the whole state of a board whose last append
/// failed, and compacts a board with `board_compact_every` updates logged (any logged at all
/// when `all`, as at shutdown); then forgets the boards of rooms no session on this node has
/// joined.
pub async fn save_all(app: &App, all: bool) {
    let held: Vec<((RoomId, String), Shared)> = app
        .boards
        .0
        .iter()
        .map(|e| (e.key().clone(), e.value().clone()))
        .collect();
    for ((room, board), shared) in held {
        let unlogged = {
            let mut b = lock(&shared);
            std::mem::take(&mut b.unlogged).then(|| {
                b.doc
                    .transact()
                    .encode_state_as_update_v1(&StateVector::default())
            })
        };
        if let Some(state) = unlogged {
            if let Err(e) = app.store.append_board_update(&room, &board, &state).await {
                tracing::warn!(error = %e, room = %room, board = %board, "saving a board failed");
                lock(&shared).unlogged = true;
                continue;
            }
            lock(&shared).logged += 1;
        }
        let logged = lock(&shared).logged;
        // A board about to be forgotten here is compacted now, whatever its log's length.
        let leaving = !app.hub.has_room(&room);
        if logged == 0 || !(all || leaving || logged >= app.config.board_compact_every) {
            continue;
        }
        let batch = app.config.board_compact_batch;
        match app.store.compact_board(&room, &board, batch, fold).await {
            Ok(done) => {
                let mut b = lock(&shared);
                b.logged = b.logged.saturating_sub(done.folded);
                if done.lost_race {
                    // Another node compacted it: what is left is re-counted at the next load.
                    b.logged = 0;
                }
                let now = b
                    .doc
                    .transact()
                    .encode_state_as_update_v1(&StateVector::default())
                    .len();
                b.size = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, room = %room, board = %board, "compacting a board failed");
            }
        }
    }
    app.boards
        .0
        .retain(|(room, _), b| lock(b).unlogged || app.hub.has_room(room));
}

/// Every `board_save_ms`: saves and compacts the boards that need it ([`save_all`]).
pub async fn run_saver(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.board_save_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        save_all(&app, false).await;
    }
}
