//! Validation of what peers relay through the server: SDP offers/answers (size-limited, well
//! formed, with media sections) and trickled ICE candidates. The server never interprets media;
//! it only refuses garbage and tells whether an SDP would send audio/video (for `live` rooms,
//! where only the host and people on stage may publish).

use crate::SignalError;
use serde_json::Value;

/// Largest SDP accepted, in bytes. Above the default frame limit (`max_frame_bytes`), which
/// is what bounds it in practice: an SFU viewer's SDP grows by two sections per remote
/// publisher.
pub const MAX_SDP_BYTES: usize = 256 * 1024;
/// Largest ICE candidate line accepted, in bytes.
pub const MAX_CANDIDATE_BYTES: usize = 1024;

/// What a validated `signal` payload carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Offer(SdpInfo),
    Answer(SdpInfo),
    /// A candidate, or `None` for end-of-candidates.
    Candidate(Option<String>),
}

/// What the server needs to know about an SDP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdpInfo {
    /// Media sections (audio/video/application) in order.
    pub media: Vec<String>,
    /// Some audio or video section would send (`sendrecv` or `sendonly`, the default).
    pub sends_media: bool,
}

fn bad(msg: impl Into<String>) -> SignalError {
    SignalError::BadRequest(msg.into())
}

/// Parses and checks an SDP body.
pub fn parse_sdp(sdp: &str) -> Result<SdpInfo, SignalError> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(bad(format!("sdp is larger than {MAX_SDP_BYTES} bytes")));
    }
    if sdp.contains('\0') {
        return Err(bad("sdp contains NUL"));
    }
    let mut lines = sdp
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty());
    if lines.next() != Some("v=0") {
        return Err(bad("sdp must start with v=0"));
    }
    let (mut has_o, mut has_s) = (false, false);
    let mut media: Vec<String> = Vec::new();
    // Direction of each media section (sendrecv unless an attribute says otherwise), and the
    // session-level default.
    let mut session_dir = "sendrecv";
    let mut dirs: Vec<&str> = Vec::new();
    for line in lines {
        let bytes = line.as_bytes();
        if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
            return Err(bad(format!(
                "malformed sdp line {:?}",
                line.chars().take(40).collect::<String>()
            )));
        }
        match bytes[0] {
            b'o' => has_o = true,
            b's' => has_s = true,
            b'm' => {
                let kind = line[2..].split(' ').next().unwrap_or("");
                if kind.is_empty() || line[2..].split(' ').count() < 4 {
                    return Err(bad("malformed m= line"));
                }
                media.push(kind.to_owned());
                dirs.push(session_dir);
            }
            b'a' => {
                let attr = &line[2..];
                if matches!(attr, "sendrecv" | "sendonly" | "recvonly" | "inactive") {
                    match dirs.last_mut() {
                        Some(d) => *d = attr_static(attr),
                        None => session_dir = attr_static(attr),
                    }
                }
            }
            _ => {}
        }
    }
    if !has_o || !has_s {
        return Err(bad("sdp needs o= and s= lines"));
    }
    if media.is_empty() {
        return Err(bad("sdp has no media sections"));
    }
    let sends_media = media.iter().zip(&dirs).any(|(kind, dir)| {
        matches!(kind.as_str(), "audio" | "video") && matches!(*dir, "sendrecv" | "sendonly")
    });
    Ok(SdpInfo { media, sends_media })
}

fn attr_static(a: &str) -> &'static str {
    match a {
        "sendonly" => "sendonly",
        "recvonly" => "recvonly",
        "inactive" => "inactive",
        _ => "sendrecv",
    }
}

/// Validates a `signal` `data` object: `{"sdp":{"type":"offer"|"answer","sdp":"..."}}` or
/// `{"candidate":{"candidate","sdpMid","sdpMLineIndex"}}` (`null` candidate = end of candidates).
pub fn parse_payload(data: &Value) -> Result<Payload, SignalError> {
    let obj = data
        .as_object()
        .ok_or_else(|| bad("data must be an object"))?;
    match (obj.get("sdp"), obj.get("candidate")) {
        (Some(sdp), None) => {
            let ty = sdp
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("sdp.type missing"))?;
            let body = sdp
                .get("sdp")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("sdp.sdp missing"))?;
            let info = parse_sdp(body)?;
            match ty {
                "offer" => Ok(Payload::Offer(info)),
                "answer" => Ok(Payload::Answer(info)),
                _ => Err(bad("sdp.type must be offer or answer")),
            }
        }
        (None, Some(Value::Null)) => Ok(Payload::Candidate(None)),
        (None, Some(c)) => {
            let line = c
                .get("candidate")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("candidate.candidate missing"))?;
            if line.len() > MAX_CANDIDATE_BYTES {
                return Err(bad("candidate is too long"));
            }
            if let Some(mid) = c.get("sdpMid")
                && !(mid.is_null() || mid.as_str().is_some_and(|m| m.len() <= 64))
            {
                return Err(bad("sdpMid must be a short string or null"));
            }
            if let Some(idx) = c.get("sdpMLineIndex")
                && !(idx.is_null() || idx.as_u64().is_some_and(|i| i < 1024))
            {
                return Err(bad("sdpMLineIndex must be a small integer or null"));
            }
            if line.is_empty() {
                return Ok(Payload::Candidate(None));
            }
            let body = line
                .strip_prefix("candidate:")
                .ok_or_else(|| bad("candidate must start with candidate:"))?;
            // foundation component transport priority address port "typ" type ...
            let parts: Vec<&str> = body.split_ascii_whitespace().collect();
            if parts.len() < 8
                || parts[6] != "typ"
                || parts[5].parse::<u16>().is_err()
                || parts[3].parse::<u64>().is_err()
            {
                return Err(bad("malformed ICE candidate"));
            }
            Ok(Payload::Candidate(Some(line.to_owned())))
        }
        _ => Err(bad("data must carry exactly one of sdp or candidate")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn sdp(dir: &str) -> String {
        format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na={dir}\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
        )
    }

    #[test]
    fn accepts_offers_answers_and_candidates() {
        let offer = parse_payload(&json!({"sdp":{"type":"offer","sdp":sdp("sendrecv")}})).unwrap();
        assert_eq!(
            offer,
            Payload::Offer(SdpInfo {
                media: vec!["audio".into(), "application".into()],
                sends_media: true
            })
        );
        let ans = parse_payload(&json!({"sdp":{"type":"answer","sdp":sdp("recvonly")}})).unwrap();
        assert!(matches!(
            ans,
            Payload::Answer(SdpInfo {
                sends_media: false,
                ..
            })
        ));
        let c = json!({"candidate":{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host","sdpMid":"0","sdpMLineIndex":0}});
        assert!(matches!(
            parse_payload(&c).unwrap(),
            Payload::Candidate(Some(_))
        ));
        assert_eq!(
            parse_payload(&json!({"candidate": null})).unwrap(),
            Payload::Candidate(None)
        );
        assert_eq!(
            parse_payload(&json!({"candidate": {"candidate": ""}})).unwrap(),
            Payload::Candidate(None)
        );
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            json!("text"),
            json!({}),
            json!({"sdp":{"type":"pranswer","sdp":sdp("sendrecv")}}),
            json!({"sdp":{"type":"offer","sdp":"hello"}}),
            json!({"sdp":{"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 x\r\ns=-\r\n"}}),
            json!({"sdp":{"type":"offer","sdp":"x".repeat(MAX_SDP_BYTES + 1)}}),
            json!({"candidate":{"candidate":"not a candidate"}}),
            json!({"candidate":{"candidate":"candidate:1 1 udp x 127.0.0.1 50000 typ host"}}),
            json!({"candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 50000 typ host","sdpMLineIndex":-1}}),
            json!({"sdp":{"type":"offer","sdp":sdp("sendrecv")},"candidate":null}),
        ] {
            assert!(parse_payload(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_level_direction_applies_to_sections_without_their_own() {
        let s =
            "v=0\r\no=- 1 2 IN IP4 x\r\ns=-\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n";
        assert!(!parse_sdp(s).unwrap().sends_media);
        let s = "v=0\r\no=- 1 2 IN IP4 x\r\ns=-\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n";
        assert!(parse_sdp(s).unwrap().sends_media, "sendrecv is the default");
    }
}
