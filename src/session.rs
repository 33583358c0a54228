//! One WebSocket connection: the `hello` handshake and token check, the read loop that turns
//! frames into commands (rate-limited, malformed input answered with `bad_request`), the write
//! loop that drains the bounded outbox to the socket coalescing frames per flush (and parks,
//! its task ended, while there is nothing to write), heartbeats, and the close codes. Room commands themselves live in `rooms/`. A session touches other
//! sessions only through the hub.

use crate::App;
use crate::auth::Identity;
use crate::command::{Ctx, Deferred, Outcome, error_frame};
use crate::error::Error;
use crate::hub::{CloseSignal, SessionHandle};
use crate::outbox::{Next, OutboxReader, Outgoing};
use crate::protocol::{self, ClientFrame, ClientMsg, CommandKind, ServerMsg, close};
use crate::ratelimit::TokenBucket;
use crate::ws::{FrameSink, FrameStream, feed_text, is_too_big, violation};
use crate::wsio::{Message, OutFrame, WsError};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Refused frames (rate-limited or malformed) counted over a 10 s window.
struct Strikes {
    window_start: Instant,
    count: u32,
    limit: u32,
}

impl Strikes {
    const WINDOW: Duration = Duration::from_secs(10);

    /// No strikes yet; the connection may collect `limit` per window.
    fn new(limit: u32) -> Self {
        Self {
            window_start: Instant::now(),
            count: 0,
            limit,
        }
    }

    /// Records a strike; true when the connection has passed the limit.
    fn hit(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) > Self::WINDOW {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > self.limit
    }
}

/// The close asked for when the client sent its own close: never sent as such, it ends the
/// write loop at once and is answered with a plain 1000.
const PEER_CLOSED: u16 = 1;

fn close_reason(code: u16) -> &'static str {
    match code {
        close::GOING_AWAY => "server shutting down",
        close::TOO_BIG => "frame too large",
        close::PROTOCOL_ERROR => "websocket protocol error",
        close::INVALID_DATA => "text frame is not utf-8",
        close::UNAUTHORIZED => "unauthorized",
        close::KICKED => "removed from the room",
        close::SLOW_CONSUMER => "slow consumer: resume with join after_seq",
        close::RATE_LIMITED => "rate limit exceeded",
        _ => "idle timeout",
    }
}

async fn close_with(sink: &mut FrameSink, code: u16, reason: &str) {
    let frame = OutFrame::close(code, reason);
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(frame)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
}

/// Reads the `hello`; on any failure the connection is closed with the returned code.
async fn handshake(app: &App, stream: &mut FrameStream) -> Result<(Identity, bool), (u16, String)> {
    let deadline = Duration::from_millis(app.config.hello_timeout_ms);
    let unauthorized = |why: &str| (close::UNAUTHORIZED, why.to_owned());
    let msg = match tokio::time::timeout(deadline, stream.next()).await {
        Err(_) => return Err(unauthorized("no hello in time")),
        Ok(None) => return Err(unauthorized("closed before hello")),
        Ok(Some(Err(e))) => {
            return Err(if is_too_big(&e) {
                (close::TOO_BIG, "frame too large".into())
            } else {
                unauthorized("read error before hello")
            });
        }
        Ok(Some(Ok(m))) => m,
    };
    let Message::Text(text) = msg else {
        return Err(unauthorized("first frame must be a hello text frame"));
    };
    match serde_json::from_str::<ClientFrame>(&text) {
        Ok(ClientFrame {
            msg:
                ClientMsg::Hello {
                    token,
                    call_waiting,
                },
            ..
        }) => app
            .tokens
            .verify(&token)
            .map(|id| (id, call_waiting))
            .map_err(|e| unauthorized(&e.to_string())),
        _ => Err(unauthorized("first frame must be hello")),
    }
}

/// Runs one connection to its end.
///
/// Takes the socket as its two halves (see [`crate::wsio::split`]).
pub fn run(app: Arc<App>, sink: FrameSink, stream: FrameStream) -> impl Future<Output = ()> + Send {
    serve(app, sink, stream)
}

/// A signed-in session, ready to read commands.
struct Open {
    ctx: Ctx,
    stream: FrameStream,
    /// Resolves once the write side is done with the socket (closed it, or failed).
    written: tokio::sync::oneshot::Receiver<()>,
}

async fn serve(app: Arc<App>, sink: FrameSink, stream: FrameStream) {
    app.metrics.connections_open.fetch_add(1, Relaxed);
    app.metrics.connections_total.fetch_add(1, Relaxed);
    let _guard = app.track_session();
    // The handshake is boxed and over before the session settles in: a future is as large as
    // its largest await, and the connection's task keeps that size for as long as it lives.
    // The session's parts come boxed: moved into `live` whole they would take their room in
    // this future twice (once here, once there).
    if let Some(open) = Box::pin(open(&app, sink, stream)).await {
        live(open).await;
    }
    app.metrics.connections_open.fetch_sub(1, Relaxed);
}

/// The `hello` handshake, registration with the hub and the write loop; `None` when the
/// connection was refused (and closed).
async fn open(app: &Arc<App>, mut sink: FrameSink, mut stream: FrameStream) -> Option<Box<Open>> {
    let (me, call_waiting) = match handshake(app, &mut stream).await {
        Ok(ok) => ok,
        Err((code, why)) => {
            refuse_hello(app, &mut sink, code, &why).await;
            return None;
        }
    };
    keep_zone(app, &me).await;

    let sid = app.new_session_id();
    let (outbox, outbox_rx) = crate::outbox::outbox(app.config.outbox_frames);
    let (handle, close_rx) = SessionHandle::with_call_waiting(
        sid.clone(),
        me.user.clone(),
        outbox.clone(),
        call_waiting,
    );
    if let Err(e) = app.hub.register(handle.clone()) {
        let err = Error::RateLimited(e.to_string());
        refuse(
            &mut sink,
            &err,
            close::RATE_LIMITED,
            "too many sessions for this user",
        )
        .await;
        return None;
    }
    tracing::info!(session = %sid, user = %me.user, "session started");
    let welcome = protocol::encode(&ServerMsg::Welcome {
        session: &sid,
        user: &me.platform_ref(),
        heartbeat_s: app.config.heartbeat_s,
    });
    let (done, written) = tokio::sync::oneshot::channel();
    let writer = Writer {
        sink,
        close: close_rx,
        timing: WriteTiming {
            heartbeat: app.config.heartbeat(),
            batch: app.config.write_batch_frames,
            lazy: Duration::from_millis(app.config.presence_flush_ms),
            fragment: app.config.ws_fragment_bytes,
            idle: Duration::from_millis(app.config.write_idle_ms),
        },
        runtime: tokio::runtime::Handle::current(),
        metrics: app.metrics.clone(),
        _done: done,
    };
    start_writer(writer, outbox_rx);
    let mut ctx = Ctx {
        app: app.clone(),
        me,
        handle,
        outbox,
        joined: crate::command::JoinedRooms::default(),
        last_typing: HashMap::new(),
    };
    ctx.push(welcome).await;
    Some(Box::new(Open {
        ctx,
        stream,
        written,
    }))
}

/// Refuses a connection whose `hello` failed: an unauthorized client is told why before the
/// close, an oversized frame only closes.
async fn refuse_hello(app: &App, sink: &mut FrameSink, code: u16, why: &str) {
    tracing::debug!(code, reason = %why, "connection refused at hello");
    if code == close::UNAUTHORIZED {
        app.metrics.auth_failures.fetch_add(1, Relaxed);
        let err = Error::Unauthorized(why.to_owned());
        refuse(sink, &err, code, close_reason(code)).await;
    } else {
        app.metrics.frames_too_large.fetch_add(1, Relaxed);
        close_with(sink, code, close_reason(code)).await;
    }
}

/// Sends `err` as an error frame, then closes with `code` and `reason`.
async fn refuse(sink: &mut FrameSink, err: &Error, code: u16, reason: &str) {
    let frame = OutFrame::text(Bytes::from(error_frame(None, err)));
    let _ = sink.send(frame).await;
    close_with(sink, code, reason).await;
}

/// Keeps the token's time zone for the user's local day in engagement caps (their sends are
/// committed by the writer, which has no session to ask). Read first: most hellos name the
/// zone already kept, and need no write.
async fn keep_zone(app: &App, me: &Identity) {
    let Some(tz) = &me.tz else { return };
    let kept = app.store.user_zone(&me.user).await.ok().flatten();
    if kept.as_deref() != Some(tz.as_str())
        && let Err(e) = app.store.remember_zone(&me.user, tz).await
    {
        tracing::warn!(error = %e, "could not keep the user's time zone");
    }
}

/// Reads commands until the session ends, then leaves its rooms and lets the write loop drain
/// and close with whatever code was asked for.
///
/// The session's parts stay in their box, used in place: moved out into this future they would
/// take their room twice for the session's life (the box is freed only when its binding goes,
/// at the end, even once emptied).
async fn live(mut open: Box<Open>) {
    let Open { ctx, stream, .. } = &mut *open;
    read_loop(ctx, stream).await;
    let Open {
        ctx,
        stream,
        written,
    } = *open;
    // Boxed: the leaving's state is needed once, at the end, not for the session's life.
    Box::pin(leave_all(ctx, stream, written)).await;
}

/// The end of a session: it leaves every room (announcing offline where it was the user's last
/// session), unregisters, and lets the write loop drain and close.
async fn leave_all(mut ctx: Ctx, stream: FrameStream, written: tokio::sync::oneshot::Receiver<()>) {
    let app = ctx.app.clone();
    let sid = ctx.handle.id.clone();
    // Leave every room (announcing offline where this was the user's last session).
    for (room, role) in std::mem::take(&mut ctx.joined) {
        let was_on_stage = app.hub.on_stage(&room, &ctx.me.user);
        app.hub.leave(&room, &sid);
        app.broker.leave_room(&room);
        let me = ctx.me.room_ref(role);
        crate::rooms::class::left(&app, &room, &me, sid.as_str(), was_on_stage);
        if app.hub.local_role(&room, &ctx.me.user).is_none() {
            let (node, run) = app.member_node();
            if let Err(e) = app
                .store
                .member_exited(&room, me, &node, run, "disconnect")
                .await
            {
                tracing::warn!(error = %e, %room, "webhooks: member.left not recorded");
            }
        }
    }
    app.hub.unregister(&ctx.handle);
    crate::rtc::session_closed(&app, &ctx.me.user, sid.as_str());
    app.broker.session_closed(&ctx.me.user, sid.as_str());
    let code = final_code(ctx.handle.close_code());
    tracing::info!(session = %sid, user = %ctx.me.user, code, "session ended");
    drop(ctx);
    drop(stream);
    let _ = written.await;
}

/// Reads frames and runs their commands until the session ends: a close is asked for, the
/// token expires, the socket ends, or the client breaks the rules. Commands whose writes are
/// deferred are answered as they finish, at most `max_inflight_per_session` at a time.
async fn read_loop(ctx: &mut Ctx, stream: &mut FrameStream) {
    let cfg = &ctx.app.config;
    let max_inflight = cfg.max_inflight_per_session;
    let mut bucket = TokenBucket::new(cfg.rate_per_s, cfg.rate_burst);
    let mut strikes = Strikes::new(cfg.abuse_strikes);
    // Made at the first deferred write: a session that only reads (most of a room) never
    // allocates one (its queue and stub task are ~200 bytes).
    let mut inflight: Option<FuturesUnordered<Deferred>> = None;
    // One close waiter for the whole loop, polled by reference: building one per frame
    // registered a new waiter for every command. Idleness is the hub's heartbeat round's to
    // judge (see `Hub::heartbeat`), from when the client was last heard.
    let signal = ctx.handle.close_signal();
    let closed = signal.wait_for(|c| c != 0);
    tokio::pin!(closed);
    // The token's end (plus the verification leeway); `refresh` moves it, and the timer is
    // re-armed when it finds the token renewed.
    let expiry = tokio::time::sleep_until(token_end(ctx.me.exp));
    tokio::pin!(expiry);

    loop {
        tokio::select! {
            biased;
            _ = &mut closed => break,
            () = &mut expiry => {
                if token_timer(ctx, expiry.as_mut()).is_break() {
                    break;
                }
            }
            Some(reply) = next_reply(&mut inflight), if in_flight(&inflight) > 0 => {
                // While writes are in flight the socket may go unread (the in-flight limit):
                // a slow store must not make a live client look idle.
                ctx.handle.heard(crate::store::now_ms());
                if let Some(frame) = reply
                    && !ctx.push(frame).await
                {
                    break;
                }
            }
            msg = stream.next(), if in_flight(&inflight) < max_inflight => {
                ctx.handle.heard(crate::store::now_ms());
                // In a block: the step (and its borrow of the session) ends before the push.
                let reply = {
                    let step = match step_of(ctx, &mut bucket, &mut strikes, msg) {
                        ControlFlow::Break(()) => break,
                        ControlFlow::Continue(step) => step,
                    };
                    match step {
                        Step::Reply(frame) => frame,
                        Step::Run(rid, command) => match command.await {
                            Ok(Outcome::Ok(reply)) => rid.map(reply),
                            Ok(Outcome::Deferred(fut)) => {
                                inflight.get_or_insert_with(FuturesUnordered::new).push(fut);
                                None
                            }
                            Ok(Outcome::Done) => None,
                            Err(e) => Some(error_frame(rid, &e)),
                        },
                    }
                };
                if let Some(frame) = reply
                    && !ctx.push(frame).await
                {
                    break;
                }
            }
        }
    }

    // Writes already accepted are answered before the session goes (bounded by the grace).
    let grace = Duration::from_millis(ctx.app.config.shutdown_grace_ms);
    if let Some(inflight) = inflight.as_mut() {
        let _ = answer_accepted(inflight, &ctx.outbox, grace).await;
    }
    say_bye_on_shutdown(ctx);
}

/// Writes in flight (deferred until their commit).
fn in_flight(inflight: &Option<FuturesUnordered<Deferred>>) -> usize {
    inflight.as_ref().map_or(0, FuturesUnordered::len)
}

/// The next deferred write's reply; `None` when none is in flight.
async fn next_reply(inflight: &mut Option<FuturesUnordered<Deferred>>) -> Option<Option<String>> {
    match inflight {
        Some(f) => f.next().await,
        None => None,
    }
}

/// The token timer fired: re-arms it if the token was renewed meanwhile (`Continue`), or
/// tells the client and asks for the close (`Break`) when the token has really expired.
fn token_timer(ctx: &Ctx, expiry: Pin<&mut tokio::time::Sleep>) -> ControlFlow<()> {
    let end = token_end(ctx.me.exp);
    if end > tokio::time::Instant::now() {
        expiry.reset(end);
        return ControlFlow::Continue(());
    }
    tracing::info!(session = %ctx.handle.id, user = %ctx.me.user, "token expired");
    let err = Error::Unauthorized("token expired: refresh it before exp".into());
    let _ = ctx.outbox.try_send(error_frame(None, &err));
    ctx.handle.close(close::UNAUTHORIZED);
    ControlFlow::Break(())
}

/// What to do about what the socket gave: a frame to answer with (or nothing, for a ping or
/// a pong), a command to run, or `Break` when the session must end.
fn step_of<'a>(
    ctx: &'a mut Ctx,
    bucket: &mut TokenBucket,
    strikes: &mut Strikes,
    msg: Option<Result<Message, WsError>>,
) -> ControlFlow<(), Step<'a>> {
    match text_of(ctx, strikes, msg)? {
        Read::Skip => ControlFlow::Continue(Step::Reply(None)),
        Read::Refused(frame) => ControlFlow::Continue(Step::Reply(Some(frame))),
        Read::Text(text) => admit(ctx, bucket, strikes, text.as_str()),
    }
}

/// Answers the deferred writes still in flight as they finish, within `grace`. Boxed: this
/// wait happens once, at the session's end, and must not add to the read loop's size.
fn answer_accepted<'a>(
    inflight: &'a mut FuturesUnordered<Deferred>,
    outbox: &'a crate::outbox::Outbox,
    grace: Duration,
) -> Pin<Box<impl Future<Output = Result<(), tokio::time::error::Elapsed>> + 'a>> {
    Box::pin(tokio::time::timeout(grace, async move {
        while let Some(reply) = inflight.next().await {
            if let Some(frame) = reply {
                let _ = outbox.try_send(frame);
            }
        }
    }))
}

/// Queues the `bye` when the session ends because the server is shutting down.
fn say_bye_on_shutdown(ctx: &Ctx) {
    if ctx.handle.close_code() == close::GOING_AWAY {
        let _ = ctx
            .outbox
            .try_send(protocol::encode(&ServerMsg::Bye { reason: "shutdown" }));
    }
}

/// The text of what the socket gave; `Continue(None)` for a frame the loop skips (a refused
/// binary frame, a ping or a pong), `Break` when the session must end.
fn text_of(
    ctx: &mut Ctx,
    strikes: &mut Strikes,
    msg: Option<Result<Message, WsError>>,
) -> ControlFlow<(), Read> {
    match msg {
        None => ControlFlow::Break(()),
        Some(Err(e)) => {
            if is_too_big(&e) {
                ctx.app.metrics.frames_too_large.fetch_add(1, Relaxed);
                ctx.handle.close(close::TOO_BIG);
            } else if let Some(code) = violation(&e) {
                tracing::debug!(session = %ctx.handle.id, code, "websocket protocol violation");
                ctx.handle.close(code);
            }
            ControlFlow::Break(())
        }
        Some(Ok(Message::Text(t))) => ControlFlow::Continue(Read::Text(t)),
        Some(Ok(Message::Binary(_))) => {
            if strikes.hit() {
                ctx.handle.close(close::RATE_LIMITED);
                return ControlFlow::Break(());
            }
            let err = Error::bad_request("binary frames are not supported: send JSON text");
            ControlFlow::Continue(Read::Refused(error_frame(None, &err)))
        }
        Some(Ok(Message::Close(_))) => {
            // Answered at once (RFC 6455 §5.5.1), not after the frames still queued.
            ctx.handle.close(PEER_CLOSED);
            ControlFlow::Break(())
        }
        // A ping is answered by the write loop, in its turn among the frames; pongs only count
        // as life.
        Some(Ok(Message::Ping(payload))) => {
            ctx.outbox.pong(payload);
            ControlFlow::Continue(Read::Skip)
        }
        Some(Ok(Message::Pong)) => ControlFlow::Continue(Read::Skip),
    }
}

/// What the socket gave, for the read loop.
enum Read {
    /// A text frame to run.
    Text(String),
    /// Nothing to do (a ping or a pong).
    Skip,
    /// Refused: this error frame is the answer.
    Refused(String),
}

/// What to do about one text frame.
enum Step<'a> {
    /// Answer with this frame (or nothing).
    Reply(Option<String>),
    /// Run the command (its `rid`, its future).
    Run(Option<i64>, Running<'a>),
}

/// Admits one text frame: the rate limit, parsing, and the start of its command (not awaited:
/// the read loop awaits it). `Break` when the session must end. Not async, so that neither
/// the parsed frame nor the largest command's state is part of every session's read loop (a
/// few KB per idle connection otherwise).
fn admit<'a>(
    ctx: &'a mut Ctx,
    bucket: &mut TokenBucket,
    strikes: &mut Strikes,
    text: &str,
) -> ControlFlow<(), Step<'a>> {
    if !bucket.take() {
        ctx.app.metrics.rate_limited.fetch_add(1, Relaxed);
        if strikes.hit() {
            ctx.handle.close(close::RATE_LIMITED);
            return ControlFlow::Break(());
        }
        let err = Error::RateLimited("too many commands: slow down".into());
        let frame = error_frame(protocol::salvage_rid(text), &err);
        return ControlFlow::Continue(Step::Reply(Some(frame)));
    }
    match parse_frame(text) {
        Ok(frame) => {
            let rid = frame.rid;
            ControlFlow::Continue(Step::Run(rid, start_command(ctx, frame)))
        }
        Err(err) => {
            ctx.app.metrics.command(CommandKind::Invalid);
            if strikes.hit() {
                ctx.handle.close(close::RATE_LIMITED);
                return ControlFlow::Break(());
            }
            let frame = error_frame(protocol::salvage_rid(text), &err);
            ControlFlow::Continue(Step::Reply(Some(frame)))
        }
    }
}

/// A command being run, boxed.
type Running<'a> = Pin<Box<dyn Future<Output = crate::error::Result<Outcome>> + Send + 'a>>;

/// Parses a text frame into a command.
fn parse_frame(text: &str) -> Result<ClientFrame, Error> {
    if protocol::has_nul_escape(text) {
        return Err(Error::bad_request("text must not contain NUL (U+0000)"));
    }
    serde_json::from_str::<ClientFrame>(text)
        .map_err(|e| Error::bad_request(format!("malformed command: {e}")))
}

/// Starts a parsed command: its future, boxed.
fn start_command(ctx: &mut Ctx, frame: ClientFrame) -> Running<'_> {
    ctx.app.metrics.command(frame.msg.kind());
    Box::pin(crate::rooms::dispatch(ctx, frame.rid, frame.msg))
}

/// When a session whose token expires at `exp` (Unix seconds) must end: `exp` plus the
/// verification leeway.
fn token_end(exp: u64) -> tokio::time::Instant {
    let left = exp
        .saturating_add(crate::auth::LEEWAY_S)
        .saturating_sub(crate::auth::now_s());
    let now = tokio::time::Instant::now();
    now.checked_add(Duration::from_secs(left))
        .unwrap_or(now + Duration::from_secs(86_400 * 365))
}

/// Runs a socket write with a time limit; false if it failed or took too long.
async fn within<E>(limit: Duration, write: impl Future<Output = Result<(), E>>) -> bool {
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

/// How the write loop paces the socket.
struct WriteTiming {
    /// How long one socket write may take.
    heartbeat: Duration,
    /// Most frames written per flush.
    batch: usize,
    /// How long lazy frames (presence, typing, counts) may wait for the next flush.
    lazy: Duration,
    /// Longest frame sent whole; longer ones go as fragments (0: none do).
    fragment: usize,
    /// How long the loop waits with nothing to write before it parks (zero: never).
    idle: Duration,
}

/// The write side of a session: what its write loop needs, kept while the loop is parked.
struct Writer {
    sink: FrameSink,
    close: Arc<CloseSignal>,
    timing: WriteTiming,
    /// Where a parked loop is started again (the thread that resumes it may be outside the
    /// runtime: the store's commit hook publishes from its own).
    runtime: tokio::runtime::Handle,
    metrics: Arc<crate::metrics::Metrics>,
    /// Dropped with the writer: tells the session that the write side is done with the socket.
    _done: tokio::sync::oneshot::Sender<()>,
}

/// How a run of the write loop ended.
enum WriteEnd {
    /// Nothing to write for `idle`: park.
    Idle,
    /// Close the socket with the code asked for (the outbox drained, or a close that cannot
    /// wait).
    Close,
    /// A write failed or took too long: the socket is given up.
    Failed,
}

/// Starts (or starts again) a session's write loop on its runtime.
fn start_writer(writer: Writer, outbox: OutboxReader) {
    let runtime = writer.runtime.clone();
    runtime.spawn(write_loop(writer, outbox));
}

/// Resolves when the armed deadline passes; never when none is armed.
async fn deadline(due: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match due {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Runs the write side: [`write_frames`] until it ends; then it closes the socket, gives it
/// up, or parks the writer in the outbox, to be started again by the next frame, ping or
/// close (an idle connection then holds no task for its writes).
async fn write_loop(mut writer: Writer, mut outbox: OutboxReader) {
    match write_frames(&mut writer, &mut outbox).await {
        WriteEnd::Idle => {
            let metrics = writer.metrics.clone();
            let resume: crate::outbox::Resume =
                Box::new(move |outbox| start_writer(writer, outbox));
            match outbox.park(resume) {
                Ok(()) => {
                    metrics.writers_parked.fetch_add(1, Relaxed);
                }
                // Something came in meanwhile.
                Err((outbox, resume)) => resume(outbox),
            }
        }
        WriteEnd::Close => {
            let asked = writer.close.code();
            // The client closed or went: a plain normal closure.
            let reason = match asked {
                0 | PEER_CLOSED => "",
                code => close_reason(code),
            };
            Box::pin(close_with(&mut writer.sink, final_code(asked), reason)).await;
        }
        WriteEnd::Failed => {}
    }
}

/// Drains the outbox to the socket, coalescing up to `batch` frames per flush, and sends the
/// pings the heartbeat round asks for. A flush happens as soon as a frame that is not lazy is
/// queued; lazy frames wait up to `lazy` to leave with whatever follows (the timer exists only
/// while some wait). Ends when every sender is gone (draining first), at once for a close
/// code that means the client must go now, or after `idle` with nothing to write.
async fn write_frames(writer: &mut Writer, outbox: &mut OutboxReader) -> WriteEnd {
    let Writer {
        sink,
        close,
        timing,
        ..
    } = writer;
    // A client that stops reading (a zero TCP window) must not pin this task or its socket:
    // every write gets a heartbeat to finish.
    let limit = timing.heartbeat;
    // One long-lived close waiter, polled by reference: re-creating it on every wake-up
    // registered a fresh waiter per delivered frame.
    let closed = close.wait_for(closes_at_once);
    tokio::pin!(closed);
    // When buffered lazy frames must be flushed at the latest.
    let mut lazy_due: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // When the loop may park: moved on lazily (the timer is reset only when it fires early).
    let parks = !timing.idle.is_zero();
    let mut last_write = tokio::time::Instant::now();
    let idle = tokio::time::sleep(timing.idle);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            () = &mut closed => return WriteEnd::Close,
            next = outbox.recv() => {
                last_write = tokio::time::Instant::now();
                let control = match next {
                    None => return WriteEnd::Close,
                    Some(Next::Ping) => OutFrame::ping(),
                    Some(Next::Pong(payload)) => OutFrame::pong(payload),
                    Some(Next::Frame(queued)) => {
                        // One time limit for the whole batch: a timer per frame would cost
                        // more than the frame's write.
                        let batch = write_batch(sink, outbox, queued, timing);
                        match tokio::time::timeout(limit, batch).await {
                            Ok(Ok(true)) => lazy_due = None,
                            Ok(Ok(false)) => {
                                if lazy_due.is_none() {
                                    lazy_due = Some(Box::pin(tokio::time::sleep(timing.lazy)));
                                }
                            }
                            _ => return WriteEnd::Failed,
                        }
                        continue;
                    }
                };
                // A ping or pong goes out at once, and takes the buffered lazy frames with it.
                if !within(limit, sink.send(control)).await {
                    return WriteEnd::Failed;
                }
                lazy_due = None;
            }
            _ = deadline(&mut lazy_due), if lazy_due.is_some() => {
                lazy_due = None;
                if !within(limit, sink.flush()).await {
                    return WriteEnd::Failed;
                }
            }
            () = &mut idle, if parks && lazy_due.is_none() => {
                let now = tokio::time::Instant::now();
                let due = last_write + timing.idle;
                if due > now {
                    idle.as_mut().reset(due);
                    continue;
                }
                // The socket keeps the waker of the last task that wrote to it, and a waker
                // keeps its finished task's memory: leave a no-op one in its place (a flush
                // with nothing held is all it takes). Parks only if that went through.
                let mut forget = std::task::Context::from_waker(std::task::Waker::noop());
                match futures_util::Sink::poll_flush(Pin::new(&mut *sink), &mut forget) {
                    std::task::Poll::Ready(Ok(())) => return WriteEnd::Idle,
                    std::task::Poll::Ready(Err(_)) => return WriteEnd::Failed,
                    std::task::Poll::Pending => idle.as_mut().reset(now + timing.idle),
                }
            }
        }
    }
}

/// Writes `first` and up to `timing.batch - 1` more queued frames, flushing if any of them is
/// not lazy. Whether it flushed.
async fn write_batch(
    sink: &mut FrameSink,
    outbox: &mut OutboxReader,
    first: Outgoing,
    timing: &WriteTiming,
) -> std::io::Result<bool> {
    let mut urgent = !first.lazy;
    feed_text(sink, first.frame, timing.fragment).await?;
    for _ in 1..timing.batch {
        let Some(q) = outbox.try_recv() else { break };
        urgent |= !q.lazy;
        feed_text(sink, q.frame, timing.fragment).await?;
    }
    if urgent {
        sink.flush().await?;
    }
    Ok(urgent)
}

/// Whether a close code ends the write loop at once. Shutdown, idle and kick closes (and no
/// close yet) let queued frames (the `bye`, the `kicked`) go out first.
fn closes_at_once(code: u16) -> bool {
    !matches!(
        code,
        0 | close::GOING_AWAY | close::NORMAL | close::KICKED | close::UNAUTHORIZED
    )
}

/// The code the socket is closed with: the one asked for, or a normal close when none was.
fn final_code(asked: u16) -> u16 {
    match asked {
        0 | PEER_CLOSED => close::NORMAL,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<A, F: FnOnce(A) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Each connection holds its session future (`serve`) for its whole life, and its write
    /// loop's while it has something to write (an idle one parks). Their size is memory per
    /// connection, and it grows silently as commands are awaited inline (hence the boxed
    /// command, parsed frame and leaving in `serve`, and the session's parts used in their box).
    /// Bounds with some room for compiler changes (the session future: 712 bytes in a debug
    /// build).
    #[test]
    fn a_connections_resting_futures_stay_small() {
        let serve = future_size(|(a, k, s): (Arc<App>, FrameSink, FrameStream)| serve(a, k, s));
        let write = future_size(|(w, o): (Writer, OutboxReader)| write_loop(w, o));
        assert!(serve <= 900, "the session future takes {serve} bytes");
        assert!(write <= 1_300, "the write loop future takes {write} bytes");
    }
}
