//! Client sockets: a TCP connection bound to a chosen 127.0.0.x source address (so tens of
//! thousands of clients do not exhaust one address's ephemeral ports), upgraded to a
//! WebSocket with small buffers (tungstenite's defaults preallocate 128 KiB per connection),
//! plus the studyhall handshake (hello, join) that every scenario shares.

use crate::frames::{ShFrame, parse_sh};
use crate::procs::ensure_loopback;
use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// Bound on every handshake step.
pub const STEP: Duration = Duration::from_secs(30);

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(16 << 20)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Source address number `i` of a worker's set: 127.0.0.(base + i % count).
pub fn src_ip(base: u8, count: u8, i: usize) -> Ipv4Addr {
    let count = count.max(1) as usize;
    Ipv4Addr::new(127, 0, 0, base.wrapping_add((i % count) as u8))
}

/// Opens `ws://target{path}` from `src` (port chosen by the kernel).
pub async fn ws_connect(
    target: SocketAddr,
    src: Ipv4Addr,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<Ws> {
    ensure_loopback(target)?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let tcp = tokio::time::timeout(STEP, sock.connect(target))
        .await
        .context("tcp connect timed out")?
        .context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let mut req = format!("ws://{target}{path}").into_client_request()?;
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse()?);
    }
    let (ws, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config())),
    )
    .await
    .context("websocket upgrade timed out")?
    .context("websocket upgrade")?;
    Ok(ws)
}

/// Next text frame (pings are answered by tungstenite itself), bounded by [`STEP`].
pub async fn next_text(ws: &mut Ws) -> Result<String> {
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Binary(b))) => {
                    return Ok(String::from_utf8_lossy(&b).into_owned());
                }
                Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("read: {e}"),
                None => bail!("socket ended"),
            }
        }
    })
    .await
    .context("timed out waiting for a frame")?
}

/// Result of a studyhall `join`.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    pub last_seq: i64,
    pub gap: bool,
    pub replayed: u64,
}

/// Connects, says hello, joins `room` (optionally resuming after `after_seq`). Frames that
/// arrive before the join reply (presence, messages) are handed to `early`.
pub async fn studyhall_session(
    target: SocketAddr,
    src: Ipv4Addr,
    token: &str,
    room: &str,
    after_seq: Option<i64>,
    mut early: impl FnMut(&ShFrame<'_>),
) -> Result<(Ws, Joined)> {
    let mut ws = ws_connect(target, src, "/ws", Some(studyhall::protocol::SUBPROTOCOL)).await?;
    ws.send(Message::text(
        serde_json::json!({"type": "hello", "token": token}).to_string(),
    ))
    .await?;
    let welcome = next_text(&mut ws).await?;
    match parse_sh(&welcome) {
        Some(f) if f.ty == "welcome" => {}
        _ => bail!("expected welcome, got {welcome}"),
    }
    let mut join = serde_json::json!({"type": "join", "room": room, "rid": 0});
    if let Some(s) = after_seq {
        join["after_seq"] = s.into();
    }
    ws.send(Message::text(join.to_string())).await?;
    loop {
        let t = next_text(&mut ws).await?;
        let Some(f) = parse_sh(&t) else {
            bail!("unparsable frame {t}")
        };
        if f.rid == Some(0) {
            if f.ty != "ok" {
                bail!("join {room} refused: {t}");
            }
            return Ok((
                ws,
                Joined {
                    last_seq: f.last_seq.unwrap_or(0),
                    gap: f.gap.unwrap_or(false),
                    replayed: f.replayed.unwrap_or(0),
                },
            ));
        }
        early(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_rotate_within_the_set() {
        assert_eq!(src_ip(10, 4, 0), Ipv4Addr::new(127, 0, 0, 10));
        assert_eq!(src_ip(10, 4, 5), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(src_ip(10, 0, 5), Ipv4Addr::new(127, 0, 0, 10));
    }
}
