//! Property tests of the frame decoder (the read loop's path: the NUL check,
//! `ClientFrame` parsing, `salvage_rid`, `kind` and `room`): arbitrary bytes and mutated
//! frames never panic, and every valid frame round-trips. Budget and longer runs: see
//! `crate::fuzz`.
#![cfg(test)]

use super::{ClientFrame, has_nul_escape, salvage_rid, valid_room_id};
use crate::fuzz::{check, junk, mutate, pick};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

#[derive(Clone, Copy)]
enum F {
    Room,
    Str,
    Bool,
    I64,
    U32,
    U64,
    Data,
    Media,
}

/// A command's fields: (name, kind, required).
type Fields = &'static [(&'static str, F, bool)];

/// Every command with its fields.
const COMMANDS: &[(&str, Fields)] = &[
    (
        "hello",
        &[("token", F::Str, true), ("call_waiting", F::Bool, false)],
    ),
    ("ping", &[]),
    ("refresh", &[("token", F::Str, true)]),
    (
        "join",
        &[("room", F::Room, true), ("after_seq", F::I64, false)],
    ),
    ("leave", &[("room", F::Room, true)]),
    (
        "send",
        &[
            ("room", F::Room, true),
            ("text", F::Str, true),
            ("client_msg_id", F::Str, true),
            ("reply_to", F::Str, false),
        ],
    ),
    (
        "edit",
        &[
            ("room", F::Room, true),
            ("id", F::Str, true),
            ("text", F::Str, true),
        ],
    ),
    ("delete", &[("room", F::Room, true), ("id", F::Str, true)]),
    (
        "react",
        &[
            ("room", F::Room, true),
            ("id", F::Str, true),
            ("emoji", F::Str, true),
        ],
    ),
    (
        "unreact",
        &[
            ("room", F::Room, true),
            ("id", F::Str, true),
            ("emoji", F::Str, true),
        ],
    ),
    (
        "history",
        &[
            ("room", F::Room, true),
            ("before_seq", F::I64, false),
            ("limit", F::U32, false),
        ],
    ),
    ("typing", &[("room", F::Room, true)]),
    ("read", &[("room", F::Room, true), ("seq", F::I64, true)]),
    ("rooms", &[]),
    (
        "ask",
        &[
            ("room", F::Room, true),
            ("text", F::Str, true),
            ("anonymous", F::Bool, false),
        ],
    ),
    (
        "vote",
        &[
            ("room", F::Room, true),
            ("question", F::Str, true),
            ("up", F::Bool, true),
        ],
    ),
    (
        "answer",
        &[
            ("room", F::Room, true),
            ("question", F::Str, true),
            ("text", F::Str, true),
        ],
    ),
    (
        "question_status",
        &[
            ("room", F::Room, true),
            ("question", F::Str, true),
            ("status", F::Str, true),
        ],
    ),
    (
        "questions",
        &[
            ("room", F::Room, true),
            ("sort", F::Str, false),
            ("status", F::Str, false),
        ],
    ),
    ("raise_hand", &[("room", F::Room, true)]),
    (
        "lower_hand",
        &[("room", F::Room, true), ("user", F::Str, false)],
    ),
    ("hands", &[("room", F::Room, true)]),
    (
        "stage",
        &[
            ("room", F::Room, true),
            ("user", F::Str, true),
            ("on", F::Bool, true),
        ],
    ),
    (
        "mute",
        &[
            ("room", F::Room, true),
            ("user", F::Str, true),
            ("seconds", F::U64, true),
        ],
    ),
    ("unmute", &[("room", F::Room, true), ("user", F::Str, true)]),
    ("kick", &[("room", F::Room, true), ("user", F::Str, true)]),
    ("ban", &[("room", F::Room, true), ("user", F::Str, true)]),
    ("unban", &[("room", F::Room, true), ("user", F::Str, true)]),
    (
        "slow_mode",
        &[("room", F::Room, true), ("seconds", F::U64, true)],
    ),
    (
        "report",
        &[
            ("room", F::Room, true),
            ("id", F::Str, true),
            ("reason", F::Str, true),
        ],
    ),
    (
        "search",
        &[
            ("room", F::Room, true),
            ("q", F::Str, true),
            ("limit", F::U32, false),
            ("offset", F::U32, false),
        ],
    ),
    (
        "call",
        &[
            ("to", F::Str, true),
            ("media", F::Media, false),
            ("room", F::Room, false),
        ],
    ),
    ("call_accept", &[("call_id", F::Str, true)]),
    ("call_reject", &[("call_id", F::Str, true)]),
    ("call_hangup", &[("call_id", F::Str, true)]),
    ("call_resume", &[("call_id", F::Str, true)]),
    ("av_join", &[("room", F::Room, true)]),
    ("av_leave", &[("room", F::Room, true)]),
    (
        "signal",
        &[
            ("call_id", F::Str, false),
            ("room", F::Room, false),
            ("to", F::Str, false),
            ("data", F::Data, true),
        ],
    ),
    ("checkin", &[("room", F::Room, true)]),
    (
        "leaderboard",
        &[
            ("room", F::Room, true),
            ("period", F::Str, false),
            ("limit", F::U32, false),
        ],
    ),
    (
        "profile",
        &[("user", F::Str, false), ("room", F::Room, false)],
    ),
    (
        "stats",
        &[
            ("room", F::Room, true),
            ("from", F::I64, false),
            ("to", F::I64, false),
            ("bucket", F::Str, false),
        ],
    ),
    (
        "helpful",
        &[
            ("room", F::Room, true),
            ("question", F::Str, true),
            ("answer", F::Str, false),
            ("on", F::Bool, false),
        ],
    ),
];

fn room_id(rng: &mut StdRng) -> String {
    let alphabet = b"abcXYZ019_.-";
    (0..rng.random_range(1..=64))
        .map(|_| *pick(rng, alphabet) as char)
        .collect()
}

fn value(rng: &mut StdRng, f: F) -> Value {
    match f {
        F::Room => json!(room_id(rng)),
        F::Str => json!(junk(rng, 20)),
        F::Bool => json!(rng.random_bool(0.5)),
        F::I64 => json!(rng.random::<i64>() >> rng.random_range(0..63)),
        F::U32 => json!(rng.random::<u32>() >> rng.random_range(0..32)),
        F::U64 => json!(rng.random::<u64>() >> rng.random_range(0..64)),
        F::Media => json!({"audio": rng.random_bool(0.5), "video": rng.random_bool(0.5)}),
        F::Data => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..3) {
                m.insert(junk(rng, 6), json!(junk(rng, 10)));
            }
            Value::Object(m)
        }
    }
}

/// A valid frame: a command with its required fields, some optional ones, maybe a `rid`
/// and maybe an unknown field (ignored for forward compatibility).
fn valid_frame(rng: &mut StdRng) -> (Value, &'static str) {
    let (name, fields) = *pick(rng, COMMANDS);
    let mut m = Map::new();
    m.insert("type".into(), json!(name));
    for (field, kind, required) in fields.iter() {
        if *required || rng.random_bool(0.5) {
            m.insert((*field).into(), value(rng, *kind));
        }
    }
    if rng.random_bool(0.7) {
        m.insert("rid".into(), value(rng, F::I64));
    }
    if rng.random_bool(0.2) {
        m.insert("x_future_field".into(), json!([1, {"a": null}]));
    }
    (Value::Object(m), name)
}

/// Everything the read loop does with a text frame before dispatch; must never panic.
fn decode(text: &str) -> Option<ClientFrame> {
    let _ = has_nul_escape(text);
    let _ = salvage_rid(text);
    let frame = serde_json::from_str::<ClientFrame>(text).ok()?;
    let _ = frame.msg.kind();
    if let Some(room) = frame.msg.room() {
        let _ = valid_room_id(room.as_str());
    }
    Some(frame)
}

#[test]
fn valid_frames_decode_and_round_trip() {
    check("frames round-trip", 3_000, |rng| {
        let (v, name) = valid_frame(rng);
        let text = v.to_string();
        let frame = decode(&text).unwrap_or_else(|| panic!("valid frame refused: {text}"));
        let once = serde_json::to_value(&frame).unwrap();
        assert_eq!(once["type"], name);
        for (k, given) in v.as_object().unwrap() {
            if k != "x_future_field" {
                assert_eq!(&once[k], given, "field {k} of {text}");
            }
        }
        assert_eq!(salvage_rid(&text), v["rid"].as_i64(), "{text}");
        if let Some(room) = frame.msg.room() {
            assert_eq!(v["room"], room.as_str());
        }
        // Encoding the decoded frame gives a frame that decodes to the same thing.
        let again = decode(&once.to_string()).expect("re-encoded frame decodes");
        assert_eq!(serde_json::to_value(&again).unwrap(), once);
    });
}

#[test]
fn mutated_frames_and_arbitrary_bytes_never_panic_the_decoder() {
    check("frames mutated", 6_000, |rng| {
        let text = match rng.random_range(0..4) {
            0 => {
                let bytes: Vec<u8> = (0..rng.random_range(0..80)).map(|_| rng.random()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            1 => junk(rng, 60),
            _ => {
                let valid = valid_frame(rng).0.to_string();
                mutate(rng, &valid)
            }
        };
        if let Some(frame) = decode(&text) {
            // Whatever is accepted is a frame whose rid is what salvage_rid reads.
            if let Some(rid) = frame.rid {
                assert_eq!(salvage_rid(&text), Some(rid), "{text:?}");
            }
        }
    });
}

#[test]
fn frames_with_a_field_of_the_wrong_type_are_refused() {
    check("frames wrong type", 2_000, |rng| {
        let (mut v, name) = valid_frame(rng);
        let fields = COMMANDS.iter().find(|c| c.0 == name).unwrap().1;
        let Some((field, kind, _)) = fields
            .iter()
            .filter(|f| !matches!(f.1, F::Data))
            .nth(rng.random_range(0..fields.len().max(1)))
        else {
            return;
        };
        let wrong = match kind {
            F::Room | F::Str => json!(rng.random_range(0..9)),
            F::Bool => json!("true"),
            F::I64 | F::U32 | F::U64 => json!("1"),
            F::Media => json!(true),
            F::Data => return,
        };
        v[*field] = wrong;
        assert!(decode(&v.to_string()).is_none(), "accepted {v}");
    });
}
