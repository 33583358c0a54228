//! Pure wire parsing for the three protocols the generator speaks: the load message text
//! (`L|step|t_us|sender|n|pad`, which carries the send timestamp so any receiver measures
//! end-to-end latency on the one machine clock), studyhall server frames (only the fields the
//! generator needs), the plain NATS text protocol carried in WebSocket frames (a streaming
//! parser, since NATS ops may span or share frames), and Engine.IO v4 / Socket.IO v5 packets.
//! No I/O here, so all of it is unit-tested.

use serde::Deserialize;
use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (the one clock every process on the machine shares).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a load message says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Scenario-defined tag: the fan-out step, or the traffic class.
    pub step: u32,
    /// Send time, microseconds since the epoch.
    pub t_us: u64,
    /// Sender index (scenario-defined).
    pub sender: u32,
    /// The sender's message number.
    pub n: u32,
}

/// Encodes a load message text, padded with `x` to at least `pad_to` bytes.
pub fn stamp_text(s: Stamp, pad_to: usize) -> String {
    let mut t = format!("L|{}|{}|{}|{}|", s.step, s.t_us, s.sender, s.n);
    while t.len() < pad_to {
        t.push('x');
    }
    t
}

pub fn parse_stamp(text: &str) -> Option<Stamp> {
    let mut it = text.strip_prefix("L|")?.split('|');
    Some(Stamp {
        step: it.next()?.parse().ok()?,
        t_us: it.next()?.parse().ok()?,
        sender: it.next()?.parse().ok()?,
        n: it.next()?.parse().ok()?,
    })
}

/// The fields of a studyhall server frame the generator looks at; everything else is skipped
/// by serde without allocation.
#[derive(Debug, Deserialize)]
pub struct ShFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Cow<'a, str>,
    #[serde(default)]
    pub rid: Option<i64>,
    #[serde(default)]
    pub seq: Option<i64>,
    #[serde(default)]
    pub last_seq: Option<i64>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default)]
    pub gap: Option<bool>,
    #[serde(default)]
    pub replayed: Option<u64>,
}

pub fn parse_sh(text: &str) -> Option<ShFrame<'_>> {
    serde_json::from_str(text).ok()
}

/// The seq and stamp text of a studyhall `message` frame that carries a load stamp, read
/// without a JSON parse (parsing each delivery would cost the generator a fifth of its CPU at
/// the top fan-out steps, and make it, not the server, the one adding latency). It reads the
/// layout the server sends a room event in (`{"room":...,"seq":N,"type":"message",...,
/// "text":...}`, the room and seq in front of the event's own fields) and relies on what the
/// generator itself sends (stamps and user names with no quote or backslash); anything else
/// is `None`, and goes through [`parse_sh`].
pub fn fast_message(text: &str) -> Option<(i64, &str)> {
    let after_room = text.strip_prefix(r#"{"room":""#)?;
    let room_end = after_room.find('"')?;
    if after_room[..room_end].contains('\\') {
        return None;
    }
    let seq_on = after_room[room_end..].strip_prefix(r#"","seq":"#)?;
    let digits = seq_on.find(|c: char| !c.is_ascii_digit())?;
    let seq = seq_on[..digits].parse().ok()?;
    let rest = seq_on[digits..].strip_prefix(r#","type":"message","#)?;
    const TEXT: &str = r#","text":"L|"#;
    let text_on = &rest[rest.find(TEXT)? + TEXT.len() - 2..];
    let stamp = &text_on[..text_on.find('"')?];
    if stamp.contains('\\') {
        return None;
    }
    Some((seq, stamp))
}

// ------------------------------------------------------------------------------------------
// NATS

/// One server-to-client NATS protocol op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsOp {
    Info(String),
    Msg {
        subject: String,
        sid: String,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Streaming parser: feed it the payload of each WebSocket frame in order.
#[derive(Default, Debug)]
pub struct NatsParser {
    buf: Vec<u8>,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

impl NatsParser {
    /// Appends `data` and returns every complete op now available.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<NatsOp>, String> {
        self.buf.extend_from_slice(data);
        let mut ops = Vec::new();
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let Some(eol) = find_crlf(rest) else { break };
            let line = std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?;
            let (verb, args) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            match verb.to_ascii_uppercase().as_str() {
                "MSG" => {
                    let parts: Vec<&str> = args.split_whitespace().collect();
                    let (subject, sid, len) = match parts.as_slice() {
                        [s, i, n] | [s, i, _, n] => (*s, *i, n.parse::<usize>()),
                        _ => return Err(format!("bad MSG line: {line}")),
                    };
                    let len = len.map_err(|_| format!("bad MSG size: {line}"))?;
                    let start = eol + 2;
                    if rest.len() < start + len + 2 {
                        break; // payload not complete yet
                    }
                    ops.push(NatsOp::Msg {
                        subject: subject.to_owned(),
                        sid: sid.to_owned(),
                        payload: rest[start..start + len].to_vec(),
                    });
                    pos += start + len + 2;
                    continue;
                }
                "INFO" => ops.push(NatsOp::Info(args.to_owned())),
                "PING" => ops.push(NatsOp::Ping),
                "PONG" => ops.push(NatsOp::Pong),
                "+OK" => ops.push(NatsOp::Ok),
                "-ERR" => ops.push(NatsOp::Err(args.trim().trim_matches('\'').to_owned())),
                "" => {}
                other => return Err(format!("unknown NATS op {other}")),
            }
            pos += eol + 2;
        }
        self.buf.drain(..pos);
        Ok(ops)
    }
}

/// `CONNECT` + `SUB` (+ a `PING` whose `PONG` says the subscription is in place).
pub fn nats_connect_and_sub(subject: &str, sid: u32) -> String {
    format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false,\"name\":\"studyhall-load\",\"lang\":\"rust\",\"version\":\"0.1\"}}\r\nSUB {subject} {sid}\r\nPING\r\n"
    )
}

pub fn nats_connect() -> String {
    "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false}\r\nPING\r\n"
        .to_owned()
}

pub fn nats_pub(subject: &str, payload: &str) -> String {
    format!("PUB {subject} {}\r\n{payload}\r\n", payload.len())
}

// ------------------------------------------------------------------------------------------
// Engine.IO v4 / Socket.IO v5 (text packets only)

#[derive(Debug, Clone, PartialEq)]
pub enum Eio {
    /// `0{...}`: the handshake (sid, pingInterval, ...).
    Open(serde_json::Value),
    Close,
    /// `2`: the server's heartbeat; answer with `3`.
    Ping,
    Pong,
    /// `4...`: a Socket.IO packet.
    Message(Sio),
    Upgrade,
    Noop,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Sio {
    /// `0[/nsp,]{...}`: namespace connected.
    Connect(serde_json::Value),
    Disconnect,
    /// `2[/nsp,][id][...]`: an event, with an ack id when the sender wants one.
    Event {
        ack: Option<u64>,
        data: serde_json::Value,
    },
    /// `3[/nsp,]id[...]`.
    Ack {
        id: u64,
        data: serde_json::Value,
    },
    /// `4[/nsp,]{...}`.
    ConnectError(serde_json::Value),
}

pub fn parse_eio(text: &str) -> Result<Eio, String> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or("empty Engine.IO packet")?;
    let rest = chars.as_str();
    Ok(match kind {
        '0' => Eio::Open(serde_json::from_str(rest).map_err(|e| e.to_string())?),
        '1' => Eio::Close,
        '2' => Eio::Ping,
        '3' => Eio::Pong,
        '4' => Eio::Message(parse_sio(rest)?),
        '5' => Eio::Upgrade,
        '6' => Eio::Noop,
        other => return Err(format!("unknown Engine.IO packet type {other}")),
    })
}

fn parse_sio(text: &str) -> Result<Sio, String> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or("empty Socket.IO packet")?;
    let mut rest = chars.as_str();
    // Optional namespace: "/name," (the default namespace "/" is omitted).
    if rest.starts_with('/') {
        rest = match rest.find(',') {
            Some(i) => &rest[i + 1..],
            None => "",
        };
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        Some(rest[..digits].parse::<u64>().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let body = &rest[digits..];
    let json = |b: &str| -> Result<serde_json::Value, String> {
        if b.is_empty() {
            Ok(serde_json::Value::Null)
        } else {
            serde_json::from_str(b).map_err(|e| e.to_string())
        }
    };
    Ok(match kind {
        '0' => Sio::Connect(json(body)?),
        '1' => Sio::Disconnect,
        '2' => Sio::Event {
            ack: id,
            data: json(body)?,
        },
        '3' => Sio::Ack {
            id: id.ok_or("ack without id")?,
            data: json(body)?,
        },
        '4' => Sio::ConnectError(json(body)?),
        other => return Err(format!("unsupported Socket.IO packet type {other}")),
    })
}

/// `42[ack]["name",args...]`.
pub fn sio_event(ack: Option<u64>, args: &serde_json::Value) -> String {
    match ack {
        Some(id) => format!("42{id}{args}"),
        None => format!("42{args}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamp_round_trip_and_padding() {
        let s = Stamp {
            step: 3,
            t_us: 1_700_000_000_123_456,
            sender: 42,
            n: 7,
        };
        let t = stamp_text(s, 64);
        assert_eq!(t.len(), 64);
        assert_eq!(parse_stamp(&t), Some(s));
        assert_eq!(parse_stamp("hello"), None);
        assert_eq!(parse_stamp("L|1|2"), None);
    }

    #[test]
    fn studyhall_frames() {
        let m = parse_sh(r#"{"type":"message","room":"r1","seq":9,"id":"m","from":{"id":"u","name":"U","role":"member"},"text":"L|0|5|1|2|","reply_to":null,"ts":1,"client_msg_id":"c"}"#).unwrap();
        assert_eq!(m.ty, "message");
        assert_eq!(m.seq, Some(9));
        assert_eq!(m.text.as_deref(), Some("L|0|5|1|2|"));
        let ok = parse_sh(r#"{"type":"ok","rid":1,"room":{"id":"r1","kind":"group","title":"t"},"role":"member","last_seq":4,"online":[],"gap":false,"replayed":2}"#).unwrap();
        assert_eq!(ok.rid, Some(1));
        assert_eq!(ok.last_seq, Some(4));
        assert_eq!(ok.gap, Some(false));
        assert_eq!(ok.replayed, Some(2));
        // Escaped text still parses (Cow falls back to owned).
        let e = parse_sh(r#"{"type":"message","text":"a\"b"}"#).unwrap();
        assert_eq!(e.text.as_deref(), Some("a\"b"));
        assert!(parse_sh("not json").is_none());
    }

    #[test]
    fn the_fast_path_reads_what_the_parser_reads_or_nothing() {
        // A delivery as the server sends it (room and seq first).
        let frame = r#"{"room":"fanout","seq":9,"type":"message","id":"m01","from":{"id":"u9","name":"U9","role":"member"},"text":"L|1|1796638533398600|0|1|xx","reply_to":null,"ts":1,"client_msg_id":"p0-1"}"#;
        let full = parse_sh(frame).unwrap();
        assert_eq!(
            fast_message(frame),
            Some((full.seq.unwrap(), full.text.as_deref().unwrap()))
        );
        // Not a stamped message, escapes, another layout, a truncated frame: no fast path.
        for other in [
            r#"{"room":"r1","seq":9,"type":"message","text":"hello"}"#,
            r#"{"room":"r1","seq":9,"type":"message","text":"L|0|5|1|2|\"x"}"#,
            r#"{"room":"r\"1","seq":9,"type":"message","text":"L|0|5|1|2|"}"#,
            r#"{"type":"message","room":"r1","seq":9,"text":"L|0|5|1|2|"}"#,
            r#"{"room":"r1","seq":9,"type":"message_edited","text":"L|0|5|1|2|"}"#,
            r#"{"type":"ok","rid":1}"#,
            r#"{"room":"r1","seq":9,"type":"message","text":"L|0|5"#,
            r#"{"room":"r1","seq":"#,
        ] {
            assert_eq!(fast_message(other), None, "{other}");
        }
    }

    #[test]
    fn nats_ops_split_across_frames() {
        let mut p = NatsParser::default();
        let ops = p
            .feed(b"INFO {\"server_id\":\"x\"}\r\nPING\r\nMSG room 1 5\r\nhel")
            .unwrap();
        assert_eq!(
            ops,
            vec![NatsOp::Info("{\"server_id\":\"x\"}".into()), NatsOp::Ping]
        );
        let ops = p.feed(b"lo\r").unwrap();
        assert!(ops.is_empty());
        let ops = p
            .feed(b"\nMSG a.b 2 reply 0\r\n\r\n+OK\r\nPONG\r\n")
            .unwrap();
        assert_eq!(
            ops,
            vec![
                NatsOp::Msg {
                    subject: "room".into(),
                    sid: "1".into(),
                    payload: b"hello".to_vec()
                },
                NatsOp::Msg {
                    subject: "a.b".into(),
                    sid: "2".into(),
                    payload: vec![]
                },
                NatsOp::Ok,
                NatsOp::Pong
            ]
        );
        let ops = p.feed(b"-ERR 'Slow Consumer'\r\n").unwrap();
        assert_eq!(ops, vec![NatsOp::Err("Slow Consumer".into())]);
        assert!(p.feed(b"BOGUS\r\n").is_err());
    }

    #[test]
    fn nats_payload_may_contain_crlf() {
        let mut p = NatsParser::default();
        let ops = p.feed(b"MSG s 1 4\r\na\r\nb\r\n").unwrap();
        assert_eq!(
            ops,
            vec![NatsOp::Msg {
                subject: "s".into(),
                sid: "1".into(),
                payload: b"a\r\nb".to_vec()
            }]
        );
    }

    #[test]
    fn nats_client_lines() {
        assert_eq!(nats_pub("room", "abc"), "PUB room 3\r\nabc\r\n");
        assert!(nats_connect_and_sub("room", 1).contains("\r\nSUB room 1\r\nPING\r\n"));
    }

    #[test]
    fn engine_io_and_socket_io_packets() {
        let open = parse_eio(r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#).unwrap();
        assert!(matches!(open, Eio::Open(ref v) if v["sid"] == "abc"));
        assert_eq!(parse_eio("2").unwrap(), Eio::Ping);
        assert_eq!(parse_eio("3").unwrap(), Eio::Pong);
        assert_eq!(parse_eio("1").unwrap(), Eio::Close);
        assert_eq!(
            parse_eio(r#"40{"sid":"xyz"}"#).unwrap(),
            Eio::Message(Sio::Connect(json!({"sid": "xyz"})))
        );
        assert_eq!(
            parse_eio(r#"42["msg","L|0|1|2|3|"]"#).unwrap(),
            Eio::Message(Sio::Event {
                ack: None,
                data: json!(["msg", "L|0|1|2|3|"])
            })
        );
        assert_eq!(
            parse_eio(r#"4217["join","r"]"#).unwrap(),
            Eio::Message(Sio::Event {
                ack: Some(17),
                data: json!(["join", "r"])
            })
        );
        assert_eq!(
            parse_eio(r#"431["ok"]"#).unwrap(),
            Eio::Message(Sio::Ack {
                id: 1,
                data: json!(["ok"])
            })
        );
        assert_eq!(
            parse_eio(r#"42/admin,5["x"]"#).unwrap(),
            Eio::Message(Sio::Event {
                ack: Some(5),
                data: json!(["x"])
            })
        );
        assert_eq!(parse_eio("41").unwrap(), Eio::Message(Sio::Disconnect));
        assert!(parse_eio("").is_err());
        assert!(parse_eio("9").is_err());
        assert!(parse_eio("43").is_err(), "ack needs an id");
        assert_eq!(
            sio_event(Some(0), &json!(["join", "r"])),
            r#"420["join","r"]"#
        );
        assert_eq!(
            sio_event(None, &json!(["pub", "r", "t"])),
            r#"42["pub","r","t"]"#
        );
    }
}
