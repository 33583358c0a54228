//! The ```json examples of `docs/protocol.md` checked against the code, so the document cannot
//! drift from it. Each block is read into the type the server builds that JSON from, encoded
//! again by the server's own encoder, and must come back as the same JSON: the same fields,
//! values, nulls and absences. Client commands only need to parse as a [`ClientFrame`].
//!
//! What a block is checked as:
//! - a block right after `<!-- not checked: why -->` is skipped (and counted as skipped);
//! - after `<!-- reply to: <command> -->`: the `ok` reply of that command;
//! - after `<!-- shape: <name> -->`: a JSON value without a `type` (see [`encode_shape`]);
//! - otherwise the block is an object whose `type` names a sequenced room event, another
//!   server frame, or (when no server frame has that type) a client command.

#![cfg(test)]

use super::views::{BadgeView, Report, UserBrief};
use super::*;
use crate::store::{CallLogEntry, Room};
use serde::de::DeserializeOwned;
use serde_json::Value;
use studyhall_signaling::calls::{CallState, EndReason};

const DOC: &str = include_str!("../../docs/protocol.md");

struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The HTML comment on the last non-blank line before the fence, if any.
    marker: Option<String>,
    text: String,
}

fn json_blocks(doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut last_text: Option<&str> = None;
    let mut lines = doc.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            let lang = trimmed.trim_start_matches('`').trim();
            let mut text = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim().starts_with("```") {
                    break;
                }
                text.push_str(l);
                text.push('\n');
            }
            if lang == "json" {
                let marker = last_text
                    .and_then(|t| t.strip_prefix("<!--"))
                    .and_then(|t| t.strip_suffix("-->"))
                    .map(|t| t.trim().to_owned());
                blocks.push(Block {
                    line: i + 1,
                    marker,
                    text,
                });
            }
            last_text = None;
        } else if !trimmed.is_empty() {
            last_text = Some(trimmed);
        }
    }
    blocks
}

/// Whether the internally tagged enum `T` has a variant named `ty`.
fn knows<T: DeserializeOwned>(ty: &str) -> bool {
    match serde_json::from_value::<T>(serde_json::json!({ "type": ty })) {
        Ok(_) => true,
        Err(e) => !e.to_string().starts_with("unknown variant"),
    }
}

fn read<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("does not parse: {e}"))
}

/// Where `got` (what the server encodes) differs from `want` (the document).
fn differences(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => differences(&p, wv, gv, out),
                    None => out.push(format!("{p} is in the document but the server omits it")),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k} is sent by the server but missing from the document"
                ));
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                differences(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!(
            "{path}: the document has {want}, the server sends {got}"
        )),
    }
}

fn same(want: &Value, encoded: &str) -> Result<(), String> {
    let got: Value =
        serde_json::from_str(encoded).map_err(|e| format!("server output unreadable: {e}"))?;
    let mut out = Vec::new();
    differences("", want, &got, &mut out);
    if out.is_empty() {
        Ok(())
    } else {
        Err(out.join("; "))
    }
}

/// Reads `v` as `T` and encodes it again.
fn again<T: DeserializeOwned + Serialize>(v: &Value) -> Result<String, String> {
    Ok(encode(&read::<T>(v)?))
}

/// The owned twin of [`CallParty`].
#[derive(Deserialize)]
struct Party {
    user: String,
    session: String,
    #[serde(default)]
    name: Option<String>,
}

impl Party {
    fn view(&self) -> CallParty<'_> {
        CallParty {
            user: &self.user,
            session: &self.session,
            name: self.name.as_deref(),
        }
    }
}

/// The owned twin of [`ServerMsg`] (which borrows, so cannot be read back).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame {
    Welcome {
        session: SessionId,
        user: UserRef,
        heartbeat_s: u64,
    },
    Pong {
        #[serde(default)]
        rid: Option<i64>,
    },
    Presence {
        room: RoomId,
        user: UserRef,
        state: PresenceState,
    },
    OnlineCount {
        room: RoomId,
        count: usize,
    },
    Typing {
        room: RoomId,
        user: UserRef,
    },
    Bye {
        reason: String,
    },
    Hand {
        room: RoomId,
        user: UserRef,
        raised: bool,
    },
    Stage {
        room: RoomId,
        user: UserRef,
        on: bool,
    },
    Kicked {
        room: RoomId,
        reason: String,
    },
    Muted {
        room: RoomId,
        user: UserId,
        until: i64,
    },
    SlowMode {
        room: RoomId,
        seconds: u64,
    },
    Report {
        room: RoomId,
        report: Report,
    },
    CallIncoming {
        call_id: String,
        from: Party,
        media: Media,
        #[serde(default)]
        room: Option<RoomId>,
    },
    CallState {
        call_id: String,
        state: CallState,
    },
    CallEnded {
        call_id: String,
        reason: EndReason,
        duration_ms: u64,
    },
    Signal {
        #[serde(default)]
        call_id: Option<String>,
        #[serde(default)]
        room: Option<String>,
        from: Party,
        data: Value,
    },
    AvPeer {
        room: String,
        session: String,
        user: String,
        joined: bool,
    },
    AvMuted {
        room: RoomId,
        kind: AvTrackKind,
        by: UserId,
    },
    AvUnmuted {
        room: RoomId,
        kind: AvTrackKind,
        by: UserId,
    },
    AvClosed {
        room: RoomId,
        reason: String,
    },
    ActiveSpeakers {
        room: String,
        users: Vec<String>,
    },
    QuestionOverdue {
        room: RoomId,
        id: QuestionId,
        ts: i64,
    },
    Error {
        #[serde(default)]
        rid: Option<i64>,
        code: ErrorCode,
        message: String,
    },
    Badge {
        room: RoomId,
        badge: BadgeView,
        user: UserBrief,
        ts: i64,
    },
    BreakoutAssigned {
        room: RoomId,
        group_room: RoomId,
    },
    BreakoutClosed {
        room: RoomId,
    },
    BreakoutWarning {
        room: RoomId,
        closes_at: i64,
    },
    HelpRequested {
        room: RoomId,
        group_room: RoomId,
        user: UserRef,
    },
    Board {
        room: RoomId,
        board: String,
        data: String,
    },
}

impl ServerFrame {
    fn encode(&self) -> String {
        let msg = match self {
            Self::Welcome {
                session,
                user,
                heartbeat_s,
            } => ServerMsg::Welcome {
                session,
                user,
                heartbeat_s: *heartbeat_s,
            },
            Self::Pong { rid } => return encode_pong(*rid),
            Self::Presence { room, user, state } => ServerMsg::Presence {
                room,
                user,
                state: *state,
            },
            Self::OnlineCount { room, count } => ServerMsg::OnlineCount {
                room,
                count: *count,
            },
            Self::Typing { room, user } => ServerMsg::Typing { room, user },
            Self::Bye { reason } => ServerMsg::Bye { reason },
            Self::Hand { room, user, raised } => ServerMsg::Hand {
                room,
                user,
                raised: *raised,
            },
            Self::Stage { room, user, on } => ServerMsg::Stage {
                room,
                user,
                on: *on,
            },
            Self::Kicked { room, reason } => ServerMsg::Kicked { room, reason },
            Self::Muted { room, user, until } => ServerMsg::Muted {
                room,
                user,
                until: *until,
            },
            Self::SlowMode { room, seconds } => ServerMsg::SlowMode {
                room,
                seconds: *seconds,
            },
            Self::Report { room, report } => ServerMsg::Report { room, report },
            Self::CallIncoming {
                call_id,
                from,
                media,
                room,
            } => ServerMsg::CallIncoming {
                call_id,
                from: from.view(),
                media: *media,
                room: room.as_ref(),
            },
            Self::CallState { call_id, state } => ServerMsg::CallState {
                call_id,
                state: *state,
            },
            Self::CallEnded {
                call_id,
                reason,
                duration_ms,
            } => ServerMsg::CallEnded {
                call_id,
                reason: *reason,
                duration_ms: *duration_ms,
            },
            Self::Signal {
                call_id,
                room,
                from,
                data,
            } => ServerMsg::Signal {
                call_id: call_id.as_deref(),
                room: room.as_deref(),
                from: from.view(),
                data,
            },
            Self::AvPeer {
                room,
                session,
                user,
                joined,
            } => ServerMsg::AvPeer {
                room,
                session,
                user,
                joined: *joined,
            },
            Self::AvMuted { room, kind, by } => ServerMsg::AvMuted {
                room,
                kind: *kind,
                by,
            },
            Self::AvUnmuted { room, kind, by } => ServerMsg::AvUnmuted {
                room,
                kind: *kind,
                by,
            },
            Self::AvClosed { room, reason } => ServerMsg::AvClosed { room, reason },
            Self::ActiveSpeakers { room, users } => ServerMsg::ActiveSpeakers { room, users },
            Self::QuestionOverdue { room, id, ts } => {
                ServerMsg::QuestionOverdue { room, id, ts: *ts }
            }
            Self::Error { rid, code, message } => ServerMsg::Error {
                rid: *rid,
                code: *code,
                message,
            },
            Self::Badge {
                room,
                badge,
                user,
                ts,
            } => ServerMsg::Badge {
                room,
                badge,
                user,
                ts: *ts,
            },
            Self::BreakoutAssigned { room, group_room } => {
                ServerMsg::BreakoutAssigned { room, group_room }
            }
            Self::BreakoutClosed { room } => ServerMsg::BreakoutClosed { room },
            Self::BreakoutWarning { room, closes_at } => ServerMsg::BreakoutWarning {
                room,
                closes_at: *closes_at,
            },
            Self::HelpRequested {
                room,
                group_room,
                user,
            } => ServerMsg::HelpRequested {
                room,
                group_room,
                user,
            },
            Self::Board { room, board, data } => ServerMsg::Board { room, board, data },
        };
        encode(&msg)
    }
}

/// Stops compiling when a frame is added to [`ServerMsg`], as a reminder to add it to
/// [`ServerFrame`] too.
#[allow(dead_code)]
fn every_frame_has_a_twin(msg: &ServerMsg<'_>) {
    match msg {
        ServerMsg::Welcome { .. }
        | ServerMsg::Pong
        | ServerMsg::Presence { .. }
        | ServerMsg::OnlineCount { .. }
        | ServerMsg::Typing { .. }
        | ServerMsg::Bye { .. }
        | ServerMsg::Hand { .. }
        | ServerMsg::Stage { .. }
        | ServerMsg::Kicked { .. }
        | ServerMsg::Muted { .. }
        | ServerMsg::SlowMode { .. }
        | ServerMsg::Report { .. }
        | ServerMsg::CallIncoming { .. }
        | ServerMsg::CallState { .. }
        | ServerMsg::CallEnded { .. }
        | ServerMsg::Signal { .. }
        | ServerMsg::AvPeer { .. }
        | ServerMsg::AvMuted { .. }
        | ServerMsg::AvUnmuted { .. }
        | ServerMsg::AvClosed { .. }
        | ServerMsg::ActiveSpeakers { .. }
        | ServerMsg::QuestionOverdue { .. }
        | ServerMsg::Error { .. }
        | ServerMsg::Badge { .. }
        | ServerMsg::BreakoutAssigned { .. }
        | ServerMsg::BreakoutClosed { .. }
        | ServerMsg::BreakoutWarning { .. }
        | ServerMsg::HelpRequested { .. }
        | ServerMsg::Board { .. } => {}
    }
}

/// The owned twin of [`RoomBrief`].
#[derive(Deserialize)]
struct JoinRoom {
    id: RoomId,
    kind: RoomKind,
    title: String,
}

/// The owned twin of [`JoinOk`].
#[derive(Deserialize)]
struct JoinReply {
    room: JoinRoom,
    role: RoomRole,
    last_seq: i64,
    online: Vec<UserRef>,
    online_count: usize,
    stage: Vec<UserRef>,
    #[serde(default)]
    hands: Option<Vec<RaisedHand>>,
    #[serde(default)]
    gap: Option<bool>,
    #[serde(default)]
    replayed: Option<usize>,
    class: ClassBrief,
    #[serde(default)]
    pinned: Option<QuestionView>,
    #[serde(default)]
    polls: Option<Vec<PollView>>,
    #[serde(default)]
    breakout: Option<BreakoutSnapshot>,
    #[serde(default)]
    boards: Option<Vec<String>>,
}

/// The `history` reply as it reads back: events parsed rather than spliced.
#[derive(Deserialize)]
struct HistoryReply {
    events: Vec<SequencedEvent>,
    has_more: bool,
}

/// Encodes the ok of `command` from the document's `ok` object.
fn encode_reply(command: &str, doc: &Value) -> Result<String, String> {
    if !knows::<ClientMsg>(command) {
        return Err(format!("`{command}` is not a command"));
    }
    if doc.get("type").and_then(Value::as_str) != Some("ok") {
        return Err("a reply must have \"type\":\"ok\"".into());
    }
    let rid = doc
        .get("rid")
        .and_then(Value::as_i64)
        .ok_or("a reply in the document should show an integer rid")?;
    let mut fields = doc.clone();
    if let Some(map) = fields.as_object_mut() {
        map.remove("type");
        map.remove("rid");
    }
    fn ok<T: DeserializeOwned + Serialize>(rid: i64, fields: &Value) -> Result<String, String> {
        Ok(encode_ok_as(rid, &read::<T>(fields)?))
    }
    match command {
        "join" => {
            let r: JoinReply = read(&fields)?;
            let listed: Vec<_> = r.online.into_iter().map(Listed::new).collect();
            let online = OnlineList::new(listed.iter().map(|u| &**u));
            Ok(JoinOk {
                room: RoomBrief {
                    id: &r.room.id,
                    kind: r.room.kind,
                    title: &r.room.title,
                },
                role: r.role,
                last_seq: r.last_seq,
                online: &online,
                online_count: r.online_count,
                stage: &r.stage,
                hands: r.hands,
                gap: r.gap,
                replayed: r.replayed,
                class: r.class,
                pinned: r.pinned,
                polls: r.polls,
                breakout: r.breakout,
                boards: r.boards,
            }
            .encode(rid))
        }
        "history" => {
            let r: HistoryReply = read(&fields)?;
            let events: Vec<String> = r.events.iter().map(encode).collect();
            Ok(HistoryOk {
                events: &events,
                has_more: r.has_more,
            }
            .encode_ok(rid))
        }
        "leave" | "typing" | "unban" | "av_leave" | "av_mute" | "av_unmute" | "signal" => {
            ok::<EmptyOk>(rid, &fields)
        }
        "send" => ok::<SentOk>(rid, &fields),
        "edit" | "delete" | "react" | "unreact" | "vote" | "answer" | "question_status"
        | "helpful" => ok::<SeqOk>(rid, &fields),
        "ask" => ok::<AskOk>(rid, &fields),
        "checkin" => ok::<CheckinOk>(rid, &fields),
        "read" => ok::<ReadOk>(rid, &fields),
        "rooms" => ok::<RoomsOk>(rid, &fields),
        "questions" => ok::<QuestionsOk>(rid, &fields),
        "search" => ok::<SearchOk>(rid, &fields),
        "raise_hand" => ok::<RaiseHandOk>(rid, &fields),
        "lower_hand" => ok::<LowerHandOk>(rid, &fields),
        "hands" => ok::<HandsOk>(rid, &fields),
        "stage" => ok::<StageOk>(rid, &fields),
        "mute" => ok::<MuteOk>(rid, &fields),
        "unmute" => ok::<UnmuteOk>(rid, &fields),
        "kick" | "ban" => ok::<KickOk>(rid, &fields),
        "refresh" => ok::<RefreshOk>(rid, &fields),
        "slow_mode" => ok::<SlowModeOk>(rid, &fields),
        "report" => ok::<ReportOk>(rid, &fields),
        "reports" => ok::<ReportsOk>(rid, &fields),
        "report_resolve" => ok::<ReportResolveOk>(rid, &fields),
        "call" | "call_accept" | "call_reject" | "call_hangup" | "call_resume" => {
            ok::<CallOk>(rid, &fields)
        }
        "av_join" => ok::<AvJoinOk>(rid, &fields),
        "leaderboard" => ok::<LeaderboardOk>(rid, &fields),
        "profile" => ok::<ProfileOk>(rid, &fields),
        "stats" => ok::<StatsOk>(rid, &fields),
        "poll_create" | "poll_open" | "poll_close" => ok::<PollOk>(rid, &fields),
        "poll_answer" => ok::<PollAnswerOk>(rid, &fields),
        "polls" => ok::<PollsOk>(rid, &fields),
        "poll_answers" => ok::<PollAnswersOk>(rid, &fields),
        "quiz_leaderboard" => ok::<QuizLeaderboardOk>(rid, &fields),
        "class_start" | "class_end" | "class_reopen" => ok::<ClassOk>(rid, &fields),
        "class_summary" => ok::<ClassSummaryOk>(rid, &fields),
        "breakout_open" => ok::<BreakoutOpenOk>(rid, &fields),
        "breakout_move" | "breakout_broadcast" | "breakout_close" | "help" | "board"
        | "board_grant" => ok::<EmptyOk>(rid, &fields),
        other => Err(format!("no reply type is known for `{other}`")),
    }
}

/// Encodes a value that has no `type` of its own, by the name the marker gives it.
fn encode_shape(shape: &str, doc: &Value) -> Result<String, String> {
    match shape {
        "question" => again::<QuestionView>(doc),
        "report" => again::<Report>(doc),
        "ice_servers" => again::<Vec<IceServer>>(doc),
        "stats" => again::<StatsOk>(doc),
        "room" => again::<Room>(doc),
        "call record" => again::<CallLogEntry>(doc),
        "poll" => again::<PollView>(doc),
        "summary" => again::<ClassSummary>(doc),
        "poll export" => again::<PollExport>(doc),
        other => Err(format!("unknown shape `{other}`")),
    }
}

/// Checks a block whose marker names nothing: a frame or command with a `type`.
fn check_typed(doc: &Value) -> Result<(), String> {
    let ty = doc
        .get("type")
        .and_then(Value::as_str)
        .ok_or("has no \"type\": mark it `<!-- shape: ... -->` or `<!-- not checked: ... -->`")?;
    if ty == "ok" {
        return Err("an ok needs a `<!-- reply to: <command> -->` marker".into());
    }
    if knows::<RoomEvent>(ty) {
        same(doc, &again::<SequencedEvent>(doc)?)
    } else if knows::<ServerFrame>(ty) {
        same(doc, &read::<ServerFrame>(doc)?.encode())
    } else if knows::<ClientMsg>(ty) {
        read::<ClientFrame>(doc).map(|_| ())
    } else {
        Err(format!("`{ty}` is neither a server frame nor a command"))
    }
}

fn check(block: &Block) -> Result<bool, String> {
    let marker = block.marker.as_deref();
    if marker.is_some_and(|m| m.starts_with("not checked:")) {
        return Ok(false);
    }
    let doc: Value =
        serde_json::from_str(&block.text).map_err(|e| format!("is not valid JSON: {e}"))?;
    match marker.and_then(|m| m.split_once(':')) {
        Some(("reply to", command)) => same(&doc, &encode_reply(command.trim(), &doc)?),
        Some(("shape", shape)) if shape.trim() == "command" => {
            read::<ClientFrame>(&doc).map(|_| ())
        }
        Some(("shape", shape)) => same(&doc, &encode_shape(shape.trim(), &doc)?),
        _ => check_typed(&doc),
    }
    .map(|()| true)
}

#[test]
fn protocol_doc_examples_match_the_code() {
    let blocks = json_blocks(DOC);
    let mut checked = 0;
    let mut skipped = 0;
    let mut failures = Vec::new();
    for block in &blocks {
        match check(block) {
            Ok(true) => checked += 1,
            Ok(false) => skipped += 1,
            Err(why) => failures.push(format!("docs/protocol.md:{}: {why}", block.line)),
        }
    }
    println!(
        "docs/protocol.md: {checked} json examples checked, {skipped} skipped (marked not checked)"
    );
    assert!(
        failures.is_empty(),
        "{} of {} json examples do not match the code:\n{}",
        failures.len(),
        blocks.len(),
        failures.join("\n")
    );
    assert!(checked > 0, "no json example was checked");
}

#[test]
fn the_doc_check_notices_drift() {
    let block = |marker: Option<&str>, text: &str| Block {
        line: 1,
        marker: marker.map(str::to_owned),
        text: text.to_owned(),
    };
    let welcome = r#"{"type":"welcome","session":"s1","user":{"id":"a","name":"A","role":"student"},"heartbeat_s":25}"#;
    assert_eq!(check(&block(None, welcome)), Ok(true));
    // A field the server does not send, and one it sends that the document leaves out.
    let extra = welcome.replace("\"heartbeat_s\"", "\"beat\":1,\"heartbeat_s\"");
    assert!(check(&block(None, &extra)).is_err());
    let missing = r#"{"type":"ok","rid":1}"#;
    assert!(check(&block(Some("reply to: read"), missing)).is_err());
    assert_eq!(
        check(&block(
            Some("reply to: read"),
            r#"{"type":"ok","rid":1,"seq":4}"#
        )),
        Ok(true)
    );
    // null where the server leaves a field out.
    let call = r#"{"type":"ok","rid":1,"call_id":"c1","ice_servers":null}"#;
    assert!(check(&block(Some("reply to: call_hangup"), call)).is_err());
    assert!(check(&block(None, r#"{"type":"ok","rid":1}"#)).is_err());
    assert!(check(&block(None, r#"{"type":"nope"}"#)).is_err());
    assert!(check(&block(None, "{\"type\":\"ok\",\"rid\":N}")).is_err());
    assert_eq!(
        check(&block(Some("not checked: a sketch"), "{...}")),
        Ok(false)
    );
    // A command only has to parse.
    assert_eq!(
        check(&block(None, r#"{"type":"join","room":"r","after_seq":3}"#)),
        Ok(true)
    );
    assert!(check(&block(None, r#"{"type":"join"}"#)).is_err());
}
