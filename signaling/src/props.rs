//! Property tests on bounded, seeded random input (rand's `StdRng`; no extra dependency): the
//! SDP and candidate validators never panic and accept only what the documented limits allow,
//! and random operation sequences on [`Calls`] and [`AvRooms`] keep their invariants.
//!
//! Budget: each property runs a fixed number of cases from a fixed seed, so CI is
//! deterministic and each property takes well under a second on two cores. To run longer:
//! `STUDYHALL_FUZZ_SECS=60 cargo test -p studyhall-signaling props` runs each property for
//! that many seconds from a random seed, printed on failure; `STUDYHALL_FUZZ_SEED=N` replays
//! a seed.

use crate::av::{AvKind, AvRooms};
use crate::calls::{CallConfig, CallRequest, Calls, EndReason};
use crate::fuzz::{check, junk_with, pick};
use crate::sdp::{self, MAX_CANDIDATE_BYTES, MAX_SDP_BYTES, Payload};
use crate::{Media, Msg, Out, Peer, SignalError};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A string of random characters, biased towards the ones SDP and candidates trip on.
fn junk(rng: &mut StdRng, max: usize) -> String {
    junk_with(
        rng,
        max,
        &['\0', '\r', '\n', ' ', '\t', '=', ':', '"', '\\'],
    )
}

const SDP_LINES: &[&str] = &[
    "v=0",
    "o=- 1 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "c=IN IP4 0.0.0.0",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "m=audio 9",
    "m= 9 a b",
    "m=",
    "a=sendrecv",
    "a=sendonly",
    "a=recvonly",
    "a=inactive",
    "a=rtpmap:111 opus/48000/2",
    "a=mid:0",
    "x",
    "",
    "V=0",
    "=0",
];

/// An SDP-like text: mostly well-formed lines in a random order, sometimes junk.
fn sdp_text(rng: &mut StdRng) -> String {
    let mut lines: Vec<String> = Vec::new();
    if rng.random_bool(0.8) {
        lines.extend(["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-"].map(String::from));
    }
    for _ in 0..rng.random_range(0..12) {
        if rng.random_bool(0.1) {
            lines.push(junk(rng, 30));
        } else {
            lines.push((*pick(rng, SDP_LINES)).to_owned());
        }
    }
    let sep = *pick(rng, &["\r\n", "\n", "\r", "\r\n\r\n"]);
    let mut text = lines.join(sep);
    if rng.random_bool(0.03) {
        // Past the size limit.
        text.push_str(sep);
        text.push_str(&"a=x\r\n".repeat(MAX_SDP_BYTES / 5 + 1));
    }
    if rng.random_bool(0.1) && !text.is_empty() {
        // A mutation at a char boundary.
        let at = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .nth(rng.random_range(0..=text.chars().count()))
            .unwrap_or(0);
        text.insert_str(at, &junk(rng, 3));
    }
    text
}

/// What an accepted SDP must have been: the documented rules, computed independently.
fn sdp_oracle(text: &str) -> Option<(Vec<String>, bool)> {
    if text.len() > MAX_SDP_BYTES || text.contains('\0') {
        return None;
    }
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .collect();
    if lines.first() != Some(&"v=0") {
        return None;
    }
    let mut media: Vec<(String, String)> = Vec::new();
    let mut session_dir = "sendrecv".to_owned();
    let (mut o, mut s) = (false, false);
    for l in &lines[1..] {
        let mut chars = l.chars();
        let (Some(k), Some('=')) = (chars.next(), chars.next()) else {
            return None;
        };
        if !k.is_ascii_lowercase() {
            return None;
        }
        let rest = &l[2..];
        match k {
            'o' => o = true,
            's' => s = true,
            'm' => {
                let parts: Vec<&str> = rest.split(' ').collect();
                if parts[0].is_empty() || parts.len() < 4 {
                    return None;
                }
                media.push((parts[0].to_owned(), session_dir.clone()));
            }
            'a' if ["sendrecv", "sendonly", "recvonly", "inactive"].contains(&rest) => {
                match media.last_mut() {
                    Some(m) => m.1 = rest.to_owned(),
                    None => session_dir = rest.to_owned(),
                }
            }
            _ => {}
        }
    }
    if !o || !s || media.is_empty() {
        return None;
    }
    let sends = media
        .iter()
        .any(|(k, d)| (k == "audio" || k == "video") && (d == "sendrecv" || d == "sendonly"));
    Some((media.into_iter().map(|(k, _)| k).collect(), sends))
}

#[test]
fn sdp_parsing_never_panics_and_accepts_exactly_the_documented_form() {
    check("sdp", 3_000, |rng| {
        let text = sdp_text(rng);
        let got = sdp::parse_sdp(&text);
        let want = sdp_oracle(&text);
        match (&got, &want) {
            (Ok(info), Some((media, sends))) => {
                assert_eq!(&info.media, media, "{text:?}");
                assert_eq!(info.sends_media, *sends, "{text:?}");
                assert!(text.len() <= MAX_SDP_BYTES);
            }
            (Err(SignalError::BadRequest(_)), None) => {}
            _ => panic!("parse_sdp {text:?}: got {got:?}, the rules say {want:?}"),
        }
    });
}

fn candidate_line(rng: &mut StdRng) -> String {
    match rng.random_range(0..6) {
        0 => String::new(),
        1 => junk(rng, 40),
        2 => format!(
            "candidate:{}",
            "x".repeat(MAX_CANDIDATE_BYTES - 20 + rng.random_range(0..20))
        ),
        _ => {
            let mut parts: Vec<String> = vec![
                format!("candidate:{}", rng.random_range(0..1000)),
                "1".into(),
                (*pick(rng, &["udp", "tcp", "UDP"])).into(),
                (*pick(rng, &["2122260223", "-5", "x", "18446744073709551616"])).into(),
                (*pick(rng, &["192.0.2.1", "::1", "abc.local"])).into(),
                (*pick(rng, &["54400", "65536", "0", "-1", "p"])).into(),
                (*pick(rng, &["typ", "TYP", "type"])).into(),
                (*pick(rng, &["host", "srflx", "relay"])).into(),
            ];
            let keep = rng.random_range(5..=parts.len());
            parts.truncate(keep);
            if rng.random_bool(0.2) {
                parts.push(junk(rng, 10));
            }
            parts.join(*pick(rng, &[" ", "  ", "\t"]))
        }
    }
}

/// A random JSON value (depth-bounded), with the payload keys over-represented.
fn json_value(rng: &mut StdRng, depth: u32) -> Value {
    let keys = [
        "sdp",
        "candidate",
        "type",
        "sdpMid",
        "sdpMLineIndex",
        "offer",
    ];
    match rng.random_range(0..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random_range(-5i64..2000)),
        3 => json!(*pick(rng, &["offer", "answer", "pranswer", ""])),
        4 => json!(junk(rng, 12)),
        5 => Value::Array(
            (0..rng.random_range(0..3))
                .map(|_| json_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| {
                    let k = if rng.random_bool(0.8) {
                        (*pick(rng, &keys)).to_owned()
                    } else {
                        junk(rng, 6)
                    };
                    (k, json_value(rng, depth - 1))
                })
                .collect(),
        ),
    }
}

/// A signal `data` object: well-formed shapes with random parts, or arbitrary JSON.
fn signal_data(rng: &mut StdRng) -> Value {
    match rng.random_range(0..5) {
        0 => json_value(rng, 3),
        1 | 2 => {
            let mut d = json!({"sdp": {"type": *pick(rng, &["offer", "answer", "rollback"]), "sdp": sdp_text(rng)}});
            if rng.random_bool(0.1) {
                d["candidate"] = Value::Null;
            }
            d
        }
        _ => {
            if rng.random_bool(0.1) {
                return json!({ "candidate": null });
            }
            let mut c = json!({ "candidate": candidate_line(rng) });
            match rng.random_range(0..4) {
                0 => c["sdpMid"] = json!(junk(rng, 70)),
                1 => c["sdpMLineIndex"] = json!(rng.random_range(-3i64..1100)),
                2 => c["sdpMid"] = Value::Null,
                _ => {}
            }
            json!({ "candidate": c })
        }
    }
}

#[test]
fn signal_payloads_never_panic_and_accepted_ones_respect_the_limits() {
    check("payload", 4_000, |rng| {
        let data = signal_data(rng);
        let Ok(payload) = sdp::parse_payload(&data) else {
            return;
        };
        let obj = data.as_object().expect("only objects are accepted");
        assert!(
            obj.contains_key("sdp") != obj.contains_key("candidate"),
            "exactly one of sdp and candidate: {data}"
        );
        match payload {
            Payload::Offer(info) | Payload::Answer(info) => {
                let body = data["sdp"]["sdp"].as_str().unwrap();
                assert!(body.len() <= MAX_SDP_BYTES && !info.media.is_empty());
                assert!(matches!(
                    data["sdp"]["type"].as_str(),
                    Some("offer" | "answer")
                ));
                assert_eq!(sdp_oracle(body).map(|o| o.0), Some(info.media));
            }
            Payload::Candidate(None) => assert!(
                data["candidate"].is_null() || data["candidate"]["candidate"] == "",
                "{data}"
            ),
            Payload::Candidate(Some(line)) => {
                assert!(line.len() <= MAX_CANDIDATE_BYTES, "{line:?}");
                let parts: Vec<&str> = line
                    .strip_prefix("candidate:")
                    .expect("candidate: prefix")
                    .split_ascii_whitespace()
                    .collect();
                assert!(parts.len() >= 8 && parts[6] == "typ", "{line:?}");
                assert!(parts[5].parse::<u16>().is_ok() && parts[3].parse::<u64>().is_ok());
                let c = &data["candidate"];
                assert!(c["sdpMid"].is_null() || c["sdpMid"].as_str().unwrap().len() <= 64);
                assert!(
                    c["sdpMLineIndex"].is_null() || c["sdpMLineIndex"].as_u64().unwrap() < 1024
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Calls

/// What the test knows of a call from what the machine said.
#[derive(Debug)]
struct SeenCall {
    caller: String,
    callee: String,
    ended: bool,
}

const USERS: &[&str] = &["ana", "ben", "cai", "dee"];

fn offer_data() -> Value {
    json!({"sdp": {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}})
}

#[test]
fn random_call_sequences_keep_the_call_invariants() {
    check("calls", 400, |rng| {
        let cfg = CallConfig {
            ring_timeout_ms: rng.random_range(1_000..40_000),
            grace_ms: rng.random_range(0..20_000),
        };
        let mut calls = Calls::new(cfg);
        let waiting: HashMap<&str, bool> =
            USERS.iter().map(|u| (*u, rng.random_bool(0.3))).collect();
        // Online sessions per user (two devices each, which come and go).
        let mut online: BTreeMap<&str, BTreeSet<String>> = USERS
            .iter()
            .map(|u| (*u, [format!("{u}1"), format!("{u}2")].into()))
            .collect();
        let mut seen: BTreeMap<String, SeenCall> = BTreeMap::new();
        let mut ended_ids: HashSet<String> = HashSet::new();
        let mut now = 0u64;
        let mut next_id = 0;
        let steps = rng.random_range(10..80);
        for _ in 0..steps {
            now += rng.random_range(0..4_000);
            let user = *pick(rng, USERS);
            let dev = if rng.random_bool(0.5) { 1 } else { 2 };
            let peer = Peer::new(user, format!("{user}{dev}"));
            let known: Vec<String> = seen.keys().cloned().collect();
            let id = if !known.is_empty() && rng.random_bool(0.9) {
                pick(rng, &known).clone()
            } else {
                format!("nope{}", rng.random_range(0..3))
            };
            let was_ended = ended_ids.contains(&id) || !seen.contains_key(&id);
            let op = rng.random_range(0..9);
            let mut busy = None;
            let result: Result<Vec<Out>, SignalError> = match op {
                0 | 1 => {
                    let to = *pick(rng, USERS);
                    next_id += 1;
                    let new_id = format!("c{next_id}");
                    let sessions: Vec<String> = online[to].iter().cloned().collect();
                    let media = Media {
                        audio: rng.random_bool(0.8),
                        video: rng.random_bool(0.5),
                    };
                    let r = calls.call(
                        now,
                        CallRequest {
                            id: new_id.clone(),
                            from: peer.clone(),
                            to,
                            media,
                            callee_sessions: &sessions,
                            callee_accepts_waiting: waiting[to],
                        },
                    );
                    r.map(|(got, outs)| {
                        let is_busy = outs.iter().any(|o| {
                            matches!(&o.msg, Msg::CallEnded { reason: EndReason::Busy, call_id, .. } if *call_id == got)
                        });
                        if is_busy {
                            busy = Some((got, to));
                        } else if got == new_id {
                            seen.insert(
                                got,
                                SeenCall {
                                    caller: user.to_owned(),
                                    callee: to.to_owned(),
                                    ended: false,
                                },
                            );
                        } else {
                            // Glare: the other call, which this accepts.
                            let c = &seen[&got];
                            assert!(!c.ended && c.caller == to && c.callee == user, "glare {got}");
                        }
                        outs
                    })
                }
                2 => calls.accept(now, &peer, &id),
                3 => calls.reject(now, &peer, &id),
                4 => calls.hangup(now, &peer, &id),
                5 => calls.resume(&peer, &id),
                6 => calls.relay(&peer, &id, &offer_data()).map(|o| vec![o]),
                7 => {
                    let s = online.get_mut(user).unwrap();
                    if s.remove(&peer.session) {
                        Ok(calls.session_closed(now, &peer))
                    } else {
                        s.insert(peer.session.clone());
                        Ok(Vec::new())
                    }
                }
                _ => Ok(calls.tick(now)),
            };
            // An ended (or unknown) call accepts no operation.
            if (2..=6).contains(&op) && was_ended {
                assert!(result.is_err(), "op {op} on ended call {id}: {result:?}");
            }
            // A call ends exactly once: its call_ended frames all come from one operation.
            let outs = result.unwrap_or_default();
            let mut ended_now: BTreeMap<String, EndReason> = BTreeMap::new();
            for o in &outs {
                if let Some(c) = msg_call(&o.msg) {
                    assert!(!ended_ids.contains(c), "frame {o:?} for ended call {c}");
                }
                if let Msg::CallEnded {
                    call_id,
                    reason,
                    duration_ms,
                } = &o.msg
                {
                    if *reason == EndReason::Busy {
                        assert_eq!(*duration_ms, 0);
                        continue;
                    }
                    let prev = ended_now.insert(call_id.clone(), *reason);
                    assert!(prev.is_none_or(|p| p == *reason), "one reason per end");
                }
            }
            if let Some((id, to)) = busy {
                ended_ids.insert(id.clone());
                seen.insert(
                    id,
                    SeenCall {
                        caller: user.to_owned(),
                        callee: to.to_owned(),
                        ended: true,
                    },
                );
            }
            for (c, _) in ended_now {
                ended_ids.insert(c.clone());
                if let Some(s) = seen.get_mut(&c) {
                    s.ended = true;
                }
            }
            for rec in calls.take_finished() {
                assert!(
                    rec.reason == EndReason::Busy || ended_ids.contains(&rec.id),
                    "logged {rec:?} without call_ended"
                );
                if rec.answered_ms.is_none() {
                    assert_eq!(rec.duration_ms, 0);
                }
                if rec.reason != EndReason::Busy {
                    let s = seen.get_mut(&rec.id).expect("a call that rang");
                    s.ended = true;
                    ended_ids.insert(rec.id.clone());
                }
            }
            check_call_invariants(&calls, &seen, &waiting);
        }
        // After every ring and grace period has run out, every call has ended exactly once.
        let outs = calls.tick(now + 1_000_000);
        for o in &outs {
            if let Msg::CallEnded { call_id, .. } = &o.msg {
                assert!(!ended_ids.contains(call_id), "{call_id} ended twice");
            }
        }
        let finished = calls.take_finished();
        let mut ids: Vec<&str> = finished.iter().map(|r| r.id.as_str()).collect();
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!(before, ids.len(), "one log record per call");
        for id in &ids {
            assert!(!ended_ids.contains(*id), "{id} logged twice");
            ended_ids.insert((*id).to_owned());
        }
        // Accepted calls never time out: end them by hanging up.
        for (id, c) in &seen {
            if !ended_ids.contains(id) {
                let by = Peer::new(c.caller.clone(), "any");
                let _ = calls.hangup(now, &by, id);
                let rec = calls.take_finished();
                assert_eq!(rec.len(), 1, "{id} ends once on hang-up: {rec:?}");
                ended_ids.insert(id.clone());
            }
        }
        assert_eq!(calls.live_calls(), 0);
        for id in seen.keys() {
            let by = Peer::new(seen[id].caller.clone(), "x");
            assert!(matches!(
                calls.accept(now, &by, id),
                Err(SignalError::NotFound(_))
            ));
            assert!(matches!(
                calls.hangup(now, &by, id),
                Err(SignalError::NotFound(_))
            ));
            assert!(matches!(
                calls.relay(&by, id, &offer_data()),
                Err(SignalError::Forbidden(_))
            ));
        }
    });
}

fn msg_call(m: &Msg) -> Option<&str> {
    match m {
        Msg::CallIncoming { call_id, .. }
        | Msg::CallState { call_id, .. }
        | Msg::CallEnded { call_id, .. } => Some(call_id),
        Msg::Signal { call_id, .. } => call_id.as_deref(),
        Msg::AvPeer { .. } => None,
    }
}

fn check_call_invariants(
    calls: &Calls,
    seen: &BTreeMap<String, SeenCall>,
    waiting: &HashMap<&str, bool>,
) {
    let live: Vec<(&String, &SeenCall)> = seen.iter().filter(|(_, c)| !c.ended).collect();
    assert_eq!(calls.live_calls(), live.len(), "live calls: {live:?}");
    for u in USERS {
        let mine: Vec<&String> = live
            .iter()
            .filter(|(_, c)| c.caller == *u || c.callee == *u)
            .map(|(id, _)| *id)
            .collect();
        // At most one live call per user, unless the user takes call waiting: a user in a
        // call cannot place another (conflict) and is busy to callers.
        if !waiting[u] {
            assert!(mine.len() <= 1, "{u} is in {mine:?}");
        }
        // The machine follows the user's newest live call; with call waiting an older one may
        // still be up after the newest ended.
        match calls.call_of(u) {
            Some(id) => assert!(
                mine.iter().any(|m| *m == id),
                "{u} is in {id}, live: {mine:?}"
            ),
            None => assert!(waiting[u] || mine.is_empty(), "{u} should be in {mine:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A/V rooms

#[test]
fn random_av_sequences_keep_membership_within_the_mesh_and_notices_exact() {
    check("av", 500, |rng| {
        let max = rng.random_range(1..6);
        let mut av = AvRooms::new(max);
        let rooms = ["r1", "r2"];
        let kinds: HashMap<&str, AvKind> = [("r1", AvKind::Class), ("r2", AvKind::Live)].into();
        let mut model: HashMap<&str, BTreeMap<String, (String, bool)>> =
            rooms.iter().map(|r| (*r, BTreeMap::new())).collect();
        for _ in 0..rng.random_range(5..60) {
            let room = *pick(rng, &rooms);
            let u = *pick(rng, USERS);
            let session = format!("{u}{}", rng.random_range(1..4));
            let members = model.get_mut(room).unwrap();
            match rng.random_range(0..6) {
                0 | 1 => {
                    let publish = rng.random_bool(0.5);
                    let r = av.join(room, kinds[room], Peer::new(u, session.clone()), publish);
                    let already = members.contains_key(&session);
                    match r {
                        Ok((peers, outs)) => {
                            assert!(already || members.len() < max, "joined a full mesh");
                            let others: Vec<&String> =
                                members.keys().filter(|s| **s != session).collect();
                            let got: Vec<&String> = peers.iter().map(|p| &p.session).collect();
                            assert_eq!(got, others, "peers are the others, in session order");
                            let told: BTreeSet<&String> = outs.iter().map(|o| &o.to).collect();
                            if already {
                                assert!(outs.is_empty(), "a re-join tells nobody");
                            } else {
                                assert_eq!(told, others.into_iter().collect());
                                members.insert(session, (u.to_owned(), publish));
                            }
                        }
                        Err(SignalError::Conflict(_)) => {
                            assert!(!already && members.len() >= max, "refused below the limit")
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                2 => {
                    let outs = av.leave(room, &session);
                    if members.remove(&session).is_some() {
                        let told: BTreeSet<&String> = outs.iter().map(|o| &o.to).collect();
                        assert_eq!(told, members.keys().collect());
                    } else {
                        assert!(outs.is_empty());
                    }
                }
                3 => {
                    let (_, outs) = av.session_closed(&session);
                    let mut expect = BTreeSet::new();
                    for m in model.values_mut() {
                        if m.remove(&session).is_some() {
                            expect.extend(m.keys().cloned());
                        }
                    }
                    let told: BTreeSet<String> = outs.iter().map(|o| o.to.clone()).collect();
                    assert_eq!(told, expect);
                }
                4 => {
                    let on = rng.random_bool(0.5);
                    av.set_publisher(room, u, on);
                    for (_, (user, p)) in members.iter_mut() {
                        if user == u {
                            *p = on;
                        }
                    }
                }
                _ => {
                    let to = format!("{}{}", pick(rng, USERS), rng.random_range(1..4));
                    let data = signal_data(rng);
                    let r = av.relay(room, &Peer::new(u, session.clone()), &to, &data);
                    let sender = members.get(&session);
                    if let Ok(out) = &r {
                        assert!(sender.is_some(), "relayed for a non-member");
                        assert!(to != session && members.contains_key(&to));
                        assert_eq!(out.to, to);
                        let payload = sdp::parse_payload(&data).expect("valid payload");
                        if let (AvKind::Live, Some((_, false))) = (kinds[room], sender)
                            && let Payload::Offer(i) | Payload::Answer(i) = payload
                        {
                            assert!(!i.sends_media, "a non-publisher sent media live");
                        }
                    }
                }
            }
            for r in rooms {
                assert!(av.peers(r) <= max, "mesh over {max}");
                assert_eq!(av.peers(r), model[r].len(), "membership in {r}");
            }
        }
    });
}
