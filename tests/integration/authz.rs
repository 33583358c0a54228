//! The authorisation matrix: every room command (the engagement commands, polls, boards,
//! breakouts and the class lifecycle included; `helpful`, whose right depends on who asked, is
//! covered in engagement.rs, and `help`, which needs a breakout group, in breakouts.rs) × room
//! role (none, viewer, member, ta, host, platform admin) × visibility (open, invite-only) ×
//! source of the role (token grant, stored membership), generated, each cell checked against
//! docs/protocol.md (4.2, 5-10, 17-22): the command is allowed (`ok`) or refused with exactly
//! the documented code. One server per
//! visibility; each principal gets a `class` room of its own (so A/V applies) with a victim
//! member who is online and has written, so every command has a target; the principals of a
//! visibility run concurrently.

use crate::common::*;
use serde_json::{Value, json};
use studyhall::protocol::{PlatformRole, RoomRole};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    None,
    Grant,
    Stored,
    Admin,
}

#[derive(Clone, Copy, Debug)]
struct Principal {
    role: Option<RoomRole>,
    source: Source,
}

impl Principal {
    fn all() -> Vec<Self> {
        let mut v = vec![
            Self {
                role: None,
                source: Source::None,
            },
            Self {
                role: None,
                source: Source::Admin,
            },
        ];
        for role in [
            RoomRole::Viewer,
            RoomRole::Member,
            RoomRole::Ta,
            RoomRole::Host,
        ] {
            for source in [Source::Grant, Source::Stored] {
                v.push(Self {
                    role: Some(role),
                    source,
                });
            }
        }
        v
    }

    fn tag(&self) -> String {
        let role = self.role.map_or("none", |r| r.as_str());
        format!("{role}-{:?}", self.source).to_lowercase()
    }

    /// The role docs/protocol.md 4.2 resolves: admin is host everywhere; else the grant or
    /// the stored membership; else member of an open room; else no access.
    fn effective(&self, open: bool) -> Option<RoomRole> {
        match (self.source, self.role) {
            (Source::Admin, _) => Some(RoomRole::Host),
            (_, Some(r)) => Some(r),
            (_, None) if open => Some(RoomRole::Member),
            _ => None,
        }
    }
}

/// What the doc says a command gets: `ok` or an error code.
fn want(allowed: bool, refused: &'static str) -> &'static str {
    if allowed { "ok" } else { refused }
}

struct Cell {
    client: Client,
    room: String,
    cell: String,
    mismatches: Vec<String>,
}

impl Cell {
    /// Sends `cmd` and records a mismatch unless the outcome is `expected`. Returns the reply.
    async fn expect(&mut self, what: &str, cmd: Value, expected: &str) -> Value {
        let r = self.client.request(cmd.clone()).await;
        let got = if r["type"] == "ok" || r["type"] == "pong" {
            "ok".to_owned()
        } else {
            r["code"].as_str().unwrap_or("?").to_owned()
        };
        if got != expected {
            self.mismatches.push(format!(
                "{}: {what}: doc says {expected}, got {r}",
                self.cell
            ));
        }
        r
    }
}

async fn run_cell(s: &Server, p: Principal, open: bool) -> Vec<String> {
    let vis = if open { "open" } else { "invite" };
    let room = format!("{vis}-{}", p.tag());
    let user = format!("p-{room}");
    let victim = format!("v-{room}");
    let create = json!({"id": room, "kind": "class", "title": room, "visibility": vis});
    let (st, body) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(create)).await;
    assert_eq!(st, 201, "{body}");
    let (st, _) = http(
        s.addr,
        "PATCH",
        &format!("/api/rooms/{room}"),
        Some(API_KEY),
        Some(json!({"qa": {"enabled": true}})),
    )
    .await;
    assert_eq!(st, 200);
    let put = |who: String, role: RoomRole| {
        let path = format!("/api/rooms/{room}/members/{who}");
        async move {
            let (st, body) = http(
                s.addr,
                "PUT",
                &path,
                Some(API_KEY),
                Some(json!({"role": role.as_str()})),
            )
            .await;
            assert_eq!(st, 200, "{body}");
        }
    };
    // The victim: a stored member, online in the room, with two messages and a question.
    put(victim.clone(), RoomRole::Member).await;
    let mut v = s.client(&victim).await;
    v.join(&room).await;
    let msg = |n: u32| json!({"type": "send", "room": room, "text": "hello there", "client_msg_id": format!("v{n}")});
    let vm1 = v.ok(msg(1)).await["id"].as_str().unwrap().to_owned();
    let vm2 = v.ok(msg(2)).await["id"].as_str().unwrap().to_owned();
    let vq = v
        .ok(json!({"type": "ask", "room": room, "text": "why?"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A host of the room (stored), online, with an open poll everyone may answer.
    let host = format!("h-{room}");
    put(host.clone(), RoomRole::Host).await;
    let mut h = s.client(&host).await;
    h.join(&room).await;
    let hp = h
        .ok(json!({"type": "poll_create", "room": room, "kind": "poll", "question": "which?", "options": ["a", "b"]}))
        .await["poll"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.ok(json!({"type": "poll_open", "room": room, "poll": hp}))
        .await;

    let token = match (p.source, p.role) {
        (Source::Admin, _) => token(&user, PlatformRole::Admin, &[]),
        (Source::Grant, Some(r)) => token(&user, PlatformRole::Student, &[(room.as_str(), r)]),
        (Source::Stored, Some(r)) => {
            put(user.clone(), r).await;
            token(&user, PlatformRole::Student, &[])
        }
        _ => token(&user, PlatformRole::Student, &[]),
    };
    let mut c = Cell {
        client: Client::connect(s.addr, &token).await,
        room: room.clone(),
        cell: format!("{vis} room, {}", p.tag()),
        mismatches: Vec::new(),
    };
    let eff = p.effective(open);
    let access = eff.is_some();
    let writer = eff.is_some_and(|r| r >= RoomRole::Member);
    let moderator = eff.is_some_and(RoomRole::can_moderate);
    // A command on a joined room: `not_member` when the join was refused, else `refused`
    // unless allowed.
    let joined = |allowed: bool, refused: &'static str| {
        if access {
            want(allowed, refused)
        } else {
            "not_member"
        }
    };
    let r = c.room.clone();

    c.expect(
        "join",
        json!({"type": "join", "room": r}),
        want(access, "forbidden"),
    )
    .await;
    // Reads: no join needed, access as for join (4.2, 5.9, 5.11, 6.5, 9, 17.5).
    c.expect("rooms", json!({"type": "rooms"}), "ok").await;
    let read = want(access, "forbidden");
    c.expect("history", json!({"type": "history", "room": r}), read)
        .await;
    c.expect("read", json!({"type": "read", "room": r, "seq": 1}), read)
        .await;
    c.expect("questions", json!({"type": "questions", "room": r}), read)
        .await;
    c.expect(
        "search",
        json!({"type": "search", "room": r, "q": "hello"}),
        read,
    )
    .await;
    // Polls: the quiz leaderboard is a read (19.8); who answered is host/ta only, checked
    // before the poll is looked up, so host/ta get `not_found` for a poll that is not there
    // (19.6).
    c.expect(
        "quiz_leaderboard",
        json!({"type": "quiz_leaderboard", "room": r}),
        read,
    )
    .await;
    c.expect(
        "poll_answers",
        json!({"type": "poll_answers", "room": r, "poll": "p-none"}),
        if moderator { "not_found" } else { "forbidden" },
    )
    .await;
    // Writes: member and up; viewers `forbidden` (4.2, 5.5-5.10, 6.1-6.2, 7, 17.3).
    let w = joined(writer, "forbidden");
    c.expect("typing", json!({"type": "typing", "room": r}), w)
        .await;
    let sent = c
        .expect(
            "send",
            json!({"type": "send", "room": r, "text": "mine", "client_msg_id": "p1"}),
            w,
        )
        .await;
    let own = sent["id"].as_str().map(str::to_owned);
    let edit_target = own.clone().unwrap_or(vm1.clone());
    c.expect(
        "edit (own)",
        json!({"type": "edit", "room": r, "id": edit_target, "text": "mine, edited"}),
        w,
    )
    .await;
    c.expect(
        "react",
        json!({"type": "react", "room": r, "id": vm1, "emoji": "👍"}),
        w,
    )
    .await;
    c.expect(
        "unreact",
        json!({"type": "unreact", "room": r, "id": vm1, "emoji": "👍"}),
        w,
    )
    .await;
    c.expect(
        "ask",
        json!({"type": "ask", "room": r, "text": "a question"}),
        w,
    )
    .await;
    c.expect(
        "vote",
        json!({"type": "vote", "room": r, "question": vq, "up": true}),
        w,
    )
    .await;
    c.expect("raise_hand", json!({"type": "raise_hand", "room": r}), w)
        .await;
    // Lowering one's own hand: any joined role (4.2, 7).
    c.expect(
        "lower_hand (own)",
        json!({"type": "lower_hand", "room": r}),
        joined(true, "forbidden"),
    )
    .await;
    // `answer`: host/ta, members only with peer answers (off here) (4.2, 6.3).
    c.expect(
        "answer",
        json!({"type": "answer", "room": r, "question": vq, "text": "because"}),
        joined(moderator, "forbidden"),
    )
    .await;
    // Host/ta only (4.2, 6.4, 7, 8).
    let m = joined(moderator, "forbidden");
    c.expect(
        "question_status",
        json!({"type": "question_status", "room": r, "question": vq, "status": "pinned"}),
        m,
    )
    .await;
    c.expect(
        "delete (others')",
        json!({"type": "delete", "room": r, "id": vm2}),
        joined(moderator, "forbidden"),
    )
    .await;
    let own_delete = own.clone().unwrap_or(vm2.clone());
    c.expect(
        "delete (own)",
        json!({"type": "delete", "room": r, "id": own_delete}),
        w,
    )
    .await;
    c.expect("hands", json!({"type": "hands", "room": r}), m)
        .await;
    c.expect(
        "lower_hand (others')",
        json!({"type": "lower_hand", "room": r, "user": victim}),
        m,
    )
    .await;
    c.expect(
        "stage on",
        json!({"type": "stage", "room": r, "user": victim, "on": true}),
        m,
    )
    .await;
    c.expect(
        "stage off",
        json!({"type": "stage", "room": r, "user": victim, "on": false}),
        m,
    )
    .await;
    c.expect(
        "mute",
        json!({"type": "mute", "room": r, "user": victim, "seconds": 60}),
        m,
    )
    .await;
    c.expect(
        "unmute",
        json!({"type": "unmute", "room": r, "user": victim}),
        m,
    )
    .await;
    c.expect(
        "slow_mode",
        json!({"type": "slow_mode", "room": r, "seconds": 0}),
        m,
    )
    .await;
    // `report`: only a join; viewers may report (4.2, 8).
    c.expect(
        "report",
        json!({"type": "report", "room": r, "id": vm1, "reason": "spam"}),
        joined(true, "forbidden"),
    )
    .await;
    // A call placed from the room: a non-viewer role there (4.2, 10.2).
    let call = c
        .expect(
            "call (from the room)",
            json!({"type": "call", "to": victim, "room": r, "media": {"audio": true}}),
            w,
        )
        .await;
    if let Some(id) = call["call_id"].as_str() {
        c.client
            .ok(json!({"type": "call_hangup", "call_id": id}))
            .await;
    }
    // Room A/V: any joined role; `publish` in a class room: host, ta and member (10.6).
    let av = c
        .expect(
            "av_join",
            json!({"type": "av_join", "room": r}),
            joined(true, "forbidden"),
        )
        .await;
    if access && av["publish"] != json!(writer) {
        c.mismatches.push(format!(
            "{}: av_join publish: doc says {writer}, got {av}",
            c.cell
        ));
    }
    c.expect(
        "av_leave",
        json!({"type": "av_leave", "room": r}),
        want(true, "forbidden"),
    )
    .await;
    // Moderation that ends the victim's session comes last.
    c.expect(
        "kick",
        json!({"type": "kick", "room": r, "user": victim}),
        m,
    )
    .await;
    c.expect("ban", json!({"type": "ban", "room": r, "user": victim}), m)
        .await;
    c.expect(
        "unban",
        json!({"type": "unban", "room": r, "user": victim}),
        m,
    )
    .await;
    // Engagement (18.2, 18.7-18.9): check-in for members and up, leaderboard and profile for
    // whoever can read the room, statistics for host/ta; none needs a join.
    c.expect(
        "checkin",
        json!({"type": "checkin", "room": r}),
        want(writer, "forbidden"),
    )
    .await;
    c.expect(
        "leaderboard",
        json!({"type": "leaderboard", "room": r}),
        read,
    )
    .await;
    c.expect(
        "profile",
        json!({"type": "profile", "room": r, "user": victim}),
        read,
    )
    .await;
    c.expect(
        "stats",
        json!({"type": "stats", "room": r}),
        want(moderator, "forbidden"),
    )
    .await;
    // Classroom tools (19-22): polls are a read; answering is a write; creating, opening and
    // closing, boards' drawing grants and breakouts are host/ta; a board's sync step 1 is for
    // anyone joined, an update only for those who may draw (host/ta here: no grants).
    c.expect("polls", json!({"type": "polls", "room": r}), read)
        .await;
    c.expect(
        "poll_answer",
        json!({"type": "poll_answer", "room": r, "poll": hp, "choices": [0]}),
        w,
    )
    .await;
    let created = c
        .expect(
            "poll_create",
            json!({"type": "poll_create", "room": r, "kind": "poll", "question": "q?", "options": ["x", "y"]}),
            m,
        )
        .await;
    let target = created["poll"]["id"].as_str().unwrap_or(&hp).to_owned();
    c.expect(
        "poll_open",
        json!({"type": "poll_open", "room": r, "poll": target}),
        m,
    )
    .await;
    c.expect(
        "poll_close",
        json!({"type": "poll_close", "room": r, "poll": target}),
        m,
    )
    .await;
    c.expect(
        "board (sync step 1)",
        json!({"type": "board", "room": r, "board": "main", "data": "AAABAA=="}),
        joined(true, "forbidden"),
    )
    .await;
    c.expect(
        "board (update)",
        json!({"type": "board", "room": r, "board": "main", "data": "AAICAAA="}),
        m,
    )
    .await;
    c.expect(
        "board_grant",
        json!({"type": "board_grant", "room": r, "board": "main", "user": victim, "draw": true}),
        m,
    )
    .await;
    c.expect(
        "breakout_open",
        json!({"type": "breakout_open", "room": r, "count": 1}),
        m,
    )
    .await;
    c.expect(
        "breakout_close",
        json!({"type": "breakout_close", "room": r}),
        m,
    )
    .await;
    c.expect(
        "class_summary",
        json!({"type": "class_summary", "room": r}),
        want(moderator, "forbidden"),
    )
    .await;
    // The class lifecycle: the host only, not ta (20.2); it ends the class, so it comes last.
    let is_host = joined(eff == Some(RoomRole::Host), "forbidden");
    c.expect(
        "class_start",
        json!({"type": "class_start", "room": r}),
        is_host,
    )
    .await;
    c.expect(
        "class_end",
        json!({"type": "class_end", "room": r}),
        is_host,
    )
    .await;
    c.expect(
        "leave",
        json!({"type": "leave", "room": r}),
        joined(true, "forbidden"),
    )
    .await;
    drop(v);
    drop(h);
    c.mismatches
}

async fn matrix(open: bool) {
    let s = std::sync::Arc::new(Server::sqlite(|_| {}).await);
    let cells: Vec<_> = Principal::all()
        .into_iter()
        .map(|p| {
            let s = s.clone();
            tokio::spawn(async move { run_cell(&s, p, open).await })
        })
        .collect();
    let mut mismatches = Vec::new();
    for cell in cells {
        mismatches.extend(within("matrix cell", cell).await.unwrap());
    }
    assert!(
        mismatches.is_empty(),
        "{} cells disagree with docs/protocol.md:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    if let Ok(s) = std::sync::Arc::try_unwrap(s) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_by_role_and_source_in_an_open_room_is_allowed_or_refused_as_documented() {
    matrix(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_by_role_and_source_in_an_invite_only_room_is_allowed_or_refused_as_documented()
 {
    matrix(false).await;
}
