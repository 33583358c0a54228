//! The WebSocket transport of `/ws`: the opening handshake (RFC 6455 §4.2: the upgrade
//! request checked, `101 Switching Protocols` with the accept key and the `studyhall.v1`
//! subprotocol when the client offers it), the upgraded connection split into the frame reader
//! and writer of [`crate::wsio`] with the server's limits, and the sending of a text frame,
//! split into fragments when it is long.
//!
//! It owns the socket type rather than taking axum's, whose WebSocket (tungstenite) keeps a
//! read buffer and a write buffer as large as the largest frame, per connection, for the
//! connection's life. Long text goes as fragments of at most `ws_fragment_bytes` so that the
//! socket's coalescing buffer is filled a fragment at a time; clients reassemble fragments as
//! every WebSocket implementation must (RFC 6455 §5.4).
//!
//! Knows nothing of sessions, commands or the wire's JSON.

use crate::error::Error;
use crate::wsio::{OutFrame, WsError};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::future::Future;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// An upgraded `/ws` connection.
pub type Io = TokioIo<Upgraded>;
/// Its writing half.
pub type FrameSink = crate::wsio::Writer<Io>;
/// Its reading half.
pub type FrameStream = crate::wsio::Reader<Io>;

/// The limits of an upgraded connection's reading.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    /// The largest frame or message a client may send.
    pub max_message: usize,
    /// The most bytes read from the socket at once.
    pub chunk: usize,
}

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A checked WebSocket upgrade request: the extractor of the `/ws` handler.
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
    /// The subprotocol to confirm, when the client offered one the server speaks.
    protocol: Option<HeaderValue>,
}

/// Whether the comma-separated header `name` lists `token` (case-insensitively).
fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
fn accept_key(key: &[u8]) -> HeaderValue {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    let encoded = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    // Base64 is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

impl Upgrade {
    /// Checks the request's upgrade headers; the refusal says what is missing.
    fn check(parts: &mut Parts, subprotocol: &'static str) -> Result<Self, Refusal> {
        let bad = |why| Refusal(StatusCode::BAD_REQUEST, why);
        let h = &parts.headers;
        if !lists(h, header::CONNECTION, "upgrade") {
            return Err(bad("Connection header did not include 'upgrade'"));
        }
        if !lists(h, header::UPGRADE, "websocket") {
            return Err(bad("`Upgrade` header did not include 'websocket'"));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(bad("WebSocket version 13 required"));
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(bad("`Sec-WebSocket-Key` header missing"));
        };
        let accept = accept_key(key.as_bytes());
        let protocol = lists(h, header::SEC_WEBSOCKET_PROTOCOL, subprotocol)
            .then(|| HeaderValue::from_static(subprotocol));
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(Refusal(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Self {
            on_upgrade,
            accept,
            protocol,
        })
    }

    /// Answers `101 Switching Protocols` and, once the connection has switched, runs `serve`
    /// on it in a task of its own.
    pub fn on_upgrade<F, Fut>(self, limits: ReadLimits, serve: F) -> Response
    where
        F: FnOnce(FrameSink, FrameStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self {
            on_upgrade,
            accept,
            protocol,
        } = self;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                tracing::debug!("the connection ended before switching to WebSocket");
                return;
            };
            let (sink, stream) =
                crate::wsio::split(TokioIo::new(upgraded), limits.max_message, limits.chunk);
            serve(sink, stream).await;
        });
        let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let h = res.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(p) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        res
    }
}

/// Why a request to `/ws` is not upgraded: its status and what is missing, answered as a
/// `bad_request` JSON error.
#[derive(Debug)]
pub struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut res = Error::BadRequest(self.1.to_owned()).into_response();
        *res.status_mut() = self.0;
        res
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::check(parts, crate::protocol::SUBPROTOCOL)
    }
}

/// Feeds one text frame to `sink` (without flushing): whole when it is at most `fragment`
/// bytes long (or `fragment` is 0), else as a run of fragments of at most `fragment` bytes,
/// each cut on a character boundary.
pub async fn feed_text<S>(sink: &mut S, text: Utf8Bytes, fragment: usize) -> Result<(), S::Error>
where
    S: Sink<OutFrame> + Unpin,
{
    let bytes = Bytes::from(text);
    if fragment == 0 || bytes.len() <= fragment {
        return sink.feed(OutFrame::text(bytes)).await;
    }
    let mut start = 0;
    while start < bytes.len() {
        let end = next_cut(&bytes, start, fragment);
        let frame = OutFrame::fragment(start == 0, end == bytes.len(), bytes.slice(start..end));
        sink.feed(frame).await?;
        start = end;
    }
    Ok(())
}

/// Where the fragment of the UTF-8 text `text` that begins at `start` ends: at most `fragment`
/// bytes on, on a character boundary, never empty (a character longer than `fragment` goes
/// whole), and at most at `text.len()`. Computed as the fragments go, so sending a long
/// message allocates nothing.
fn next_cut(text: &[u8], start: usize, fragment: usize) -> usize {
    // In UTF-8 only continuation bytes look like 0b10xx_xxxx.
    let boundary = |i: usize| i == text.len() || text[i] & 0xC0 != 0x80;
    let mut end = (start + fragment).min(text.len());
    while end > start && !boundary(end) {
        end -= 1;
    }
    if end == start {
        end = start + 1;
        while !boundary(end) {
            end += 1;
        }
    }
    end
}

/// Whether a read failed because the client broke the WebSocket protocol (1007 for a text
/// frame that is not UTF-8, 1002 for anything else it forbids), with that close code.
pub fn violation(e: &WsError) -> Option<u16> {
    match e {
        WsError::Utf8 => Some(crate::protocol::close::INVALID_DATA),
        WsError::Protocol(_) => Some(crate::protocol::close::PROTOCOL_ERROR),
        _ => None,
    }
}

/// Whether a read failed because the client's frame or message passed the size limit.
pub fn is_too_big(e: &WsError) -> bool {
    matches!(e, WsError::TooBig(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        // RFC 6455 §1.3.
        let got = accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(got, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn fragments_are_cut_on_character_boundaries_and_cover_the_text() {
        let text = "aé€😀".repeat(50);
        for fragment in [1, 2, 3, 5, 16, 100, 1000] {
            let mut start = 0;
            while start < text.len() {
                let end = next_cut(text.as_bytes(), start, fragment);
                assert!(end > start, "an empty fragment at {start} ({fragment})");
                assert!(text.is_char_boundary(end));
                // Longer than a fragment only when one character is.
                assert!(
                    end - start <= fragment.max(4),
                    "{start}..{end} ({fragment})"
                );
                start = end;
            }
            assert_eq!(start, text.len());
        }
    }

    /// Collects what `feed_text` feeds into a sink.
    async fn fed(text: &str, fragment: usize) -> Vec<OutFrame> {
        let mut out: Vec<OutFrame> = Vec::new();
        feed_text(&mut out, Utf8Bytes::from(text.to_owned()), fragment)
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_long_text_goes_as_one_text_fragment_then_continuations_ending_in_fin() {
        let whole = fed("short", 16).await;
        assert!(matches!(&whole[..], [f] if f.parts() == (1, true, &b"short"[..])));
        let text = "x".repeat(40);
        let parts = fed(&text, 16).await;
        assert_eq!(parts.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in parts.iter().enumerate() {
            let (opcode, fin, payload) = f.parts();
            assert_eq!(
                opcode,
                if i == 0 { 1 } else { 0 },
                "text, then continuations"
            );
            assert_eq!(fin, i == 2);
            assert!(payload.len() <= 16);
            joined.extend_from_slice(payload);
        }
        assert_eq!(joined, text.as_bytes());
        // 0: never fragmented.
        assert_eq!(fed(&text, 0).await.len(), 1);
    }
}
