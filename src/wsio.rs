//! WebSocket frames on an upgraded connection, the server's side of RFC 6455 §5: a [`Reader`]
//! that turns the client's masked frames into messages (fragments reassembled, control frames
//! taken between them, every rule of §5 checked) and a [`Writer`] that sends unmasked frames
//! straight to the socket, the payload written from the caller's shared bytes.
//!
//! Neither keeps a buffer while the connection rests, which is most of a connection's life:
//! the reader reads into a per-thread scratch buffer and keeps only what it could not hand out
//! yet (an unfinished frame, or the frames after the one returned), the writer keeps only the
//! frame it is in the middle of writing. The listener's socket gathers the frames of a write
//! batch and sends them at the flush.
//!
//! Knows nothing of sessions, commands or the wire's JSON; answering a ping is the caller's
//! (its pong must take its place among the frames the writer is sending).

use bytes::Bytes;
use futures_util::{Sink, Stream};
use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
    /// A ping, with its payload (at most 125 bytes), to be answered with a pong.
    Ping(Bytes),
    Pong,
    /// A close, with its status code when it carried one.
    Close(Option<u16>),
}

/// Why reading ended.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client broke a rule of RFC 6455 (close 1002).
    #[error("websocket protocol violation: {0}")]
    Protocol(&'static str),
    /// A text message that is not UTF-8 (close 1007).
    #[error("text message is not utf-8")]
    Utf8,
    /// A frame or message over the limit (close 1009).
    #[error("frame or message larger than {0} bytes")]
    TooBig(usize),
}

/// A frame to send.
#[derive(Clone, Debug)]
pub struct OutFrame {
    opcode: u8,
    fin: bool,
    payload: Bytes,
}

/// Frame opcodes (RFC 6455 §5.2).
mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}
use opcode::{BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT};

/// The most a control frame may carry (RFC 6455 §5.5).
const CONTROL_MAX: usize = 125;

impl OutFrame {
    /// A whole text message (the caller vouches that it is UTF-8).
    pub fn text(payload: Bytes) -> Self {
        Self {
            opcode: TEXT,
            fin: true,
            payload,
        }
    }

    /// One fragment of a text message: the first carries the text opcode, the others are
    /// continuations; `last` ends the message.
    pub fn fragment(first: bool, last: bool, payload: Bytes) -> Self {
        Self {
            opcode: if first { TEXT } else { CONTINUATION },
            fin: last,
            payload,
        }
    }

    pub fn ping() -> Self {
        Self {
            opcode: PING,
            fin: true,
            payload: Bytes::new(),
        }
    }

    /// The answer to a ping: its payload, cut to what a control frame may carry.
    pub fn pong(mut payload: Bytes) -> Self {
        payload.truncate(CONTROL_MAX);
        Self {
            opcode: PONG,
            fin: true,
            payload,
        }
    }

    /// A close with `code` and `reason` (the reason cut, on a character boundary, to what a
    /// control frame may carry).
    pub fn close(code: u16, reason: &str) -> Self {
        let mut end = reason.len().min(CONTROL_MAX - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        Self {
            opcode: CLOSE,
            fin: true,
            payload: Bytes::from(payload),
        }
    }

    /// Its opcode, whether it ends its message, and its payload.
    #[cfg(test)]
    pub fn parts(&self) -> (u8, bool, &[u8]) {
        (self.opcode, self.fin, &self.payload)
    }

    /// The frame's header (a server's frames are not masked): its bytes and their number.
    fn header(&self) -> ([u8; 10], usize) {
        let mut head = [0u8; 10];
        head[0] = (u8::from(self.fin) << 7) | self.opcode;
        let len = self.payload.len();
        let n = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(short) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        (head, n)
    }
}

/// Splits an upgraded connection into its reader (messages of at most `max` bytes, read at
/// most `chunk` bytes at a time) and its writer.
pub fn split<S>(io: S, max: usize, chunk: usize) -> (Writer<S>, Reader<S>)
where
    S: AsyncRead + AsyncWrite,
{
    let (read, write) = tokio::io::split(io);
    (
        Writer {
            io: write,
            pending: None,
        },
        Reader {
            io: read,
            buf: Vec::new(),
            pos: 0,
            message: None,
            max,
            chunk: chunk.max(16),
            done: false,
        },
    )
}

thread_local! {
    /// Where every reader on this thread reads to: what it cannot hand out at once is copied
    /// into the reader's own buffer.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The reading half: a stream of the client's messages. Ends (`None`) after a close, an error
/// or the end of the connection.
pub struct Reader<S> {
    io: ReadHalf<S>,
    /// Read and not handed out yet, from `pos` on; empty, with no allocation, between
    /// messages.
    buf: Vec<u8>,
    /// Where the unparsed bytes of `buf` begin (the parsed ones are dropped before the next
    /// read, not after each frame).
    pos: usize,
    /// A fragmented message so far: whether it is text, and its bytes.
    message: Option<(bool, Vec<u8>)>,
    max: usize,
    chunk: usize,
    done: bool,
}

/// A parsed frame header.
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Bytes of the header.
    len: usize,
    /// Bytes of the payload.
    payload: usize,
}

/// The header at the start of `buf`, once it is all there. `room` is what a data frame may
/// carry: the limit, less what a fragmented message in progress (`in_message`) already holds.
/// Everything a header alone can break is refused before the payload is read.
fn head(buf: &[u8], max: usize, in_message: Option<usize>) -> Result<Option<Head>, WsError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    match (opcode, in_message) {
        (CONTINUATION, None) => {
            return Err(WsError::Protocol("continuation frame outside a message"));
        }
        (TEXT | BINARY, Some(_)) => {
            return Err(WsError::Protocol("new message inside a fragmented one"));
        }
        (CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG, _) => {}
        _ => return Err(WsError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("client frame not masked"));
    }
    let (payload, at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut n = [0u8; 8];
            n.copy_from_slice(b);
            let n = u64::from_be_bytes(n);
            if n >> 63 != 0 {
                return Err(WsError::Protocol("payload length out of range"));
            }
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode & 0x8 != 0 {
        if !fin {
            return Err(WsError::Protocol("fragmented control frame"));
        }
        if payload > CONTROL_MAX as u64 {
            return Err(WsError::Protocol("control frame longer than 125 bytes"));
        }
    } else if payload > max.saturating_sub(in_message.unwrap_or(0)) as u64 {
        return Err(WsError::TooBig(max));
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len: at + 4,
        // At most `max` (a usize) or 125.
        payload: payload as usize,
    }))
}

/// Whether a close frame's status code may be sent by an endpoint (RFC 6455 §7.4, and the
/// codes registered since: 1012-1014).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl<S: AsyncRead> Reader<S> {
    /// The next message in what is buffered, if it is all there.
    fn parse(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let in_message = self.message.as_ref().map(|(_, data)| data.len());
            let Some(h) = head(&self.buf[self.pos..], self.max, in_message)? else {
                return Ok(None);
            };
            let (start, end) = (self.pos + h.len, self.pos + h.len + h.payload);
            if self.buf.len() < end {
                return Ok(None);
            }
            let mut payload = self.buf[start..end].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= h.mask[i & 3];
            }
            self.pos = end;
            if self.pos == self.buf.len() {
                // Nothing left over: the buffer is given back.
                self.buf = Vec::new();
                self.pos = 0;
            }
            match h.opcode {
                // `head` lets a continuation through only inside a message, and a text or binary
                // frame only outside one.
                CONTINUATION | TEXT | BINARY => {
                    let (text, data) = match self.message.take() {
                        Some((text, mut data)) => {
                            data.reserve_exact(payload.len());
                            data.extend_from_slice(&payload);
                            (text, data)
                        }
                        None => (h.opcode == TEXT, payload),
                    };
                    if h.fin {
                        return finish(text, data).map(Some);
                    }
                    self.message = Some((text, data));
                }
                CLOSE => {
                    let code = match payload.as_slice() {
                        [] => None,
                        [_] => return Err(WsError::Protocol("close frame of one byte")),
                        [a, b, reason @ ..] => {
                            let code = u16::from_be_bytes([*a, *b]);
                            if !valid_close_code(code) {
                                return Err(WsError::Protocol("invalid close code"));
                            }
                            if std::str::from_utf8(reason).is_err() {
                                return Err(WsError::Utf8);
                            }
                            Some(code)
                        }
                    };
                    return Ok(Some(Message::Close(code)));
                }
                PING => return Ok(Some(Message::Ping(Bytes::from(payload)))),
                // `head` lets no other opcode through.
                _ => return Ok(Some(Message::Pong)),
            }
        }
    }

    /// Drops the parsed bytes before a read, keeping the buffer no larger than what is left
    /// needs (a large frame's room is not kept for the small ones after it).
    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        let left = self.buf.len() - self.pos;
        if self.buf.capacity() > 2 * left + self.chunk {
            self.buf = self.buf[self.pos..].to_vec();
        } else {
            self.buf.drain(..self.pos);
        }
        self.pos = 0;
    }

    /// Reads once into the thread's scratch buffer and keeps what came; `false` at the end of
    /// the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.poll_fill_from(cx, &mut scratch),
            // Never expected (a read does not poll another reader), but not a panic either.
            Err(_) => self.poll_fill_from(cx, &mut Vec::new()),
        })
    }

    fn poll_fill_from(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut Vec<u8>,
    ) -> Poll<io::Result<bool>> {
        if scratch.len() < self.chunk {
            scratch.resize(self.chunk, 0);
        }
        let mut rb = ReadBuf::new(&mut scratch[..self.chunk]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.buf.extend_from_slice(got);
        Poll::Ready(Ok(true))
    }
}

/// A whole message's bytes as the message.
fn finish(text: bool, data: Vec<u8>) -> Result<Message, WsError> {
    if text {
        String::from_utf8(data)
            .map(Message::Text)
            .map_err(|_| WsError::Utf8)
    } else {
        Ok(Message::Binary(Bytes::from(data)))
    }
}

impl<S: AsyncRead> Stream for Reader<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.parse() {
                Ok(Some(msg)) => {
                    this.done = matches!(msg, Message::Close(_));
                    return Poll::Ready(Some(Ok(msg)));
                }
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            this.compact();
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    this.done = true;
                    if this.buf.is_empty() && this.message.is_none() {
                        return Poll::Ready(None);
                    }
                    let err = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Poll::Ready(Some(Err(err.into())));
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

/// The writing half: a sink of frames. A frame goes to the socket as it is started; the
/// writer keeps only the part of it the socket did not take yet.
pub struct Writer<S> {
    io: WriteHalf<S>,
    pending: Option<Pending>,
}

/// A frame being written: its header, its payload, and how much of both is out.
struct Pending {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
    out: usize,
}

impl<S: AsyncWrite> Writer<S> {
    /// Writes the rest of the frame in progress, if any.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(p) = self.pending.as_mut() {
            let head_len = usize::from(p.head_len);
            let n = if p.out < head_len {
                let bufs = [
                    IoSlice::new(&p.head[p.out..head_len]),
                    IoSlice::new(&p.payload),
                ];
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &bufs))?
            } else if p.out < head_len + p.payload.len() {
                ready!(Pin::new(&mut self.io).poll_write(cx, &p.payload[p.out - head_len..]))?
            } else {
                self.pending = None;
                break;
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            p.out += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite> Sink<OutFrame> for Writer<S> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx)
    }

    fn start_send(self: Pin<&mut Self>, frame: OutFrame) -> io::Result<()> {
        let this = self.get_mut();
        if this.pending.is_some() {
            // Sink's contract: poll_ready first. Replacing a frame half written would corrupt
            // the stream.
            return Err(io::Error::other(
                "a frame started before the last one was written",
            ));
        }
        let (head, n) = frame.header();
        this.pending = Some(Pending {
            head,
            head_len: n as u8,
            payload: frame.payload,
            out: 0,
        });
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A client frame: masked, as a client must send it (unless `masked` is false).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xFFFF => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&mask);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    fn pair(
        max: usize,
        chunk: usize,
    ) -> (Writer<DuplexStream>, Reader<DuplexStream>, DuplexStream) {
        let (server, client) = tokio::io::duplex(1 << 20);
        let (w, r) = split(server, max, chunk);
        (w, r, client)
    }

    async fn next(r: &mut Reader<DuplexStream>) -> Option<Result<Message, WsError>> {
        tokio::time::timeout(std::time::Duration::from_secs(5), r.next())
            .await
            .expect("a message in time")
    }

    #[tokio::test]
    async fn messages_come_whole_from_frames_cut_anywhere() {
        let (_w, mut r, mut client) = pair(1 << 17, 7);
        let mut bytes = client_frame(true, TEXT, "héllo".as_bytes(), true);
        bytes.extend(client_frame(false, TEXT, b"frag", true));
        bytes.extend(client_frame(true, PING, b"p", true));
        bytes.extend(client_frame(false, CONTINUATION, b"men", true));
        bytes.extend(client_frame(true, CONTINUATION, b"ted", true));
        bytes.extend(client_frame(true, BINARY, &[0, 1, 2], true));
        bytes.extend(client_frame(
            true,
            TEXT,
            "z".repeat(70_000).as_bytes(),
            true,
        ));
        bytes.extend(client_frame(true, CLOSE, &[0x03, 0xE8, b'o', b'k'], true));
        // Byte by byte: every cut of a header and payload is met.
        for b in bytes {
            client.write_all(&[b]).await.unwrap();
        }
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Text("héllo".into())
        );
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Ping(Bytes::from_static(b"p")),
            "a control frame between fragments"
        );
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Text("fragmented".into())
        );
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(&[0, 1, 2]))
        );
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Text("z".repeat(70_000))
        );
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Close(Some(1000))
        );
        assert!(next(&mut r).await.is_none(), "nothing after a close");
        assert!(r.buf.capacity() == 0, "no buffer kept between messages");
    }

    async fn refused(bytes: Vec<u8>, max: usize) -> WsError {
        let (_w, mut r, mut client) = pair(max, 4096);
        client.write_all(&bytes).await.unwrap();
        match next(&mut r).await {
            Some(Err(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_rule_of_the_framing_is_enforced() {
        let unmasked = refused(client_frame(true, TEXT, b"hi", false), 100).await;
        assert!(matches!(unmasked, WsError::Protocol(_)), "{unmasked}");
        let mut rsv = client_frame(true, TEXT, b"hi", true);
        rsv[0] |= 0x40;
        assert!(matches!(refused(rsv, 100).await, WsError::Protocol(_)));
        // Too big is known from the header alone.
        let mut big = client_frame(true, TEXT, &[b'a'; 200], true);
        big.truncate(4);
        assert!(matches!(refused(big, 100).await, WsError::TooBig(100)));
        let mut parts = client_frame(false, TEXT, &[b'a'; 60], true);
        parts.extend(client_frame(true, CONTINUATION, &[b'a'; 60], true));
        assert!(matches!(refused(parts, 100).await, WsError::TooBig(100)));
        let bad_utf8 = client_frame(true, TEXT, &[0xC3, 0x28], true);
        assert!(matches!(refused(bad_utf8, 100).await, WsError::Utf8));
        let stray = client_frame(true, CONTINUATION, b"x", true);
        assert!(matches!(refused(stray, 100).await, WsError::Protocol(_)));
        let mut nested = client_frame(false, TEXT, b"a", true);
        nested.extend(client_frame(true, TEXT, b"b", true));
        assert!(matches!(refused(nested, 100).await, WsError::Protocol(_)));
        let split_ping = client_frame(false, PING, b"x", true);
        assert!(matches!(
            refused(split_ping, 100).await,
            WsError::Protocol(_)
        ));
        let long_ping = client_frame(true, PING, &[0; 126], true);
        assert!(matches!(
            refused(long_ping, 1000).await,
            WsError::Protocol(_)
        ));
        let bad_code = client_frame(true, CLOSE, &1005u16.to_be_bytes(), true);
        assert!(matches!(refused(bad_code, 100).await, WsError::Protocol(_)));
        let one_byte = client_frame(true, CLOSE, &[3], true);
        assert!(matches!(refused(one_byte, 100).await, WsError::Protocol(_)));
        let opcode = client_frame(true, 0x3, b"", true);
        assert!(matches!(refused(opcode, 100).await, WsError::Protocol(_)));
    }

    #[tokio::test]
    async fn the_end_of_the_connection_ends_the_stream_an_unfinished_frame_is_an_error() {
        let (_w, mut r, client) = pair(100, 4096);
        drop(client);
        assert!(next(&mut r).await.is_none());
        let (_w, mut r, mut client) = pair(100, 4096);
        let frame = client_frame(true, TEXT, b"hello", true);
        client.write_all(&frame[..4]).await.unwrap();
        drop(client);
        assert!(matches!(next(&mut r).await, Some(Err(WsError::Io(_)))));
    }

    /// tungstenite, as a client, reads what the writer sends and is read by the reader: the
    /// two implementations agree on every length encoding and on fragments.
    #[tokio::test]
    async fn a_tungstenite_client_and_this_framing_understand_each_other() {
        let (mut w, mut r, client) = pair(1 << 20, 4096);
        let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for n in [0, 125, 126, 65_535, 65_536, 200_000] {
            let text = "é".repeat(n / 2) + &"a".repeat(n % 2);
            w.send(OutFrame::text(Bytes::from(text.clone())))
                .await
                .unwrap();
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(
                got,
                TMessage::Text(text.clone().into()),
                "{n} bytes to the client"
            );
            ws.send(TMessage::Text(text.clone().into())).await.unwrap();
            assert_eq!(
                next(&mut r).await.unwrap().unwrap(),
                Message::Text(text),
                "{n} bytes back"
            );
        }
        let text = "fragments ".repeat(10);
        let bytes = Bytes::from(text.clone());
        w.feed(OutFrame::fragment(true, false, bytes.slice(..30)))
            .await
            .unwrap();
        w.feed(OutFrame::fragment(false, false, bytes.slice(30..60)))
            .await
            .unwrap();
        w.feed(OutFrame::fragment(false, true, bytes.slice(60..)))
            .await
            .unwrap();
        w.flush().await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Text(text.into())
        );
        w.send(OutFrame::ping()).await.unwrap();
        assert!(matches!(ws.next().await.unwrap().unwrap(), TMessage::Ping(p) if p.is_empty()));
        ws.send(TMessage::Ping(Bytes::from_static(b"hb")))
            .await
            .unwrap();
        let Message::Ping(payload) = next(&mut r).await.unwrap().unwrap() else {
            panic!("a ping")
        };
        w.send(OutFrame::pong(payload)).await.unwrap();
        w.send(OutFrame::close(4001, "bye")).await.unwrap();
        // tungstenite reads the pong (it answers pings itself) and then the close.
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, TMessage::Pong(Bytes::from_static(b"hb")));
        let TMessage::Close(Some(close)) = ws.next().await.unwrap().unwrap() else {
            panic!("a close")
        };
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (4001, "bye")
        );
    }

    #[tokio::test]
    async fn a_close_reason_is_cut_to_a_control_frames_room_on_a_character() {
        let long = "é".repeat(100);
        let frame = OutFrame::close(1000, &long);
        let (opcode, fin, payload) = frame.parts();
        assert_eq!((opcode, fin), (CLOSE, true));
        assert!(payload.len() <= CONTROL_MAX);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        let want = payload.len();
        let (mut w, _r, mut client) = pair(10, 16);
        w.send(frame).await.unwrap();
        let mut raw = vec![0u8; 2 + want];
        client.read_exact(&mut raw).await.unwrap();
        assert_eq!(raw[0], 0x80 | CLOSE);
        assert_eq!(usize::from(raw[1]), want, "one length byte, unmasked");
    }

    /// A reader at rest after what it was sent: one poll, with nothing more to read.
    fn settle(r: &mut Reader<DuplexStream>) {
        use futures_util::FutureExt;
        assert!(r.next().now_or_never().is_none(), "nothing to hand out");
    }

    #[tokio::test]
    async fn a_slow_or_large_frame_leaves_no_large_buffer_behind() {
        let (_w, mut r, mut client) = pair(1 << 20, 4096);
        // A header announcing a large frame, then a trickle: the buffer holds what came, not
        // what was announced.
        let big = client_frame(true, TEXT, &[b'a'; 500_000], true);
        client.write_all(&big[..100]).await.unwrap();
        settle(&mut r);
        assert!(r.buf.capacity() < 4096, "{} bytes kept", r.buf.capacity());
        // The rest of it, and the first byte of the next frame: what is kept afterwards is sized
        // to that byte, not to the large frame.
        client.write_all(&big[100..]).await.unwrap();
        client.write_all(&[0x81]).await.unwrap();
        let Some(Ok(Message::Text(t))) = next(&mut r).await else {
            panic!("the large message")
        };
        assert_eq!(t.len(), 500_000);
        settle(&mut r);
        assert_eq!(r.buf.len(), 1);
        assert!(
            r.buf.capacity() <= 2 * 4096,
            "{} bytes kept",
            r.buf.capacity()
        );
        // Many small frames in one read are parsed in place, then dropped together.
        let mut pings = Vec::new();
        pings.extend(client_frame(true, TEXT, b"", true)[1..].iter());
        for _ in 0..500 {
            pings.extend(client_frame(true, PONG, b"", true));
        }
        client.write_all(&pings).await.unwrap();
        assert_eq!(
            next(&mut r).await.unwrap().unwrap(),
            Message::Text(String::new())
        );
        for _ in 0..500 {
            assert_eq!(next(&mut r).await.unwrap().unwrap(), Message::Pong);
        }
        settle(&mut r);
        assert_eq!(r.buf.capacity(), 0, "all handed out, nothing kept");
    }

    #[tokio::test]
    async fn starting_a_frame_before_the_last_is_written_is_an_error_not_corruption() {
        let (mut w, _r, _client) = pair(10, 16);
        let mut w = Pin::new(&mut w);
        w.as_mut()
            .start_send(OutFrame::text(Bytes::from_static(b"one")))
            .unwrap();
        assert!(
            w.as_mut()
                .start_send(OutFrame::text(Bytes::from_static(b"two")))
                .is_err()
        );
    }
}
