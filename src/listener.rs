//! The HTTP front door: the accept loop, the connection caps and the time limits that keep
//! idle, slow or hostile TCP clients from holding the server's file descriptors. Every
//! accepted socket holds a [`Slot`] for as long as it is open (through a WebSocket upgrade
//! too); at the cap (total, or per client address when that cap is on) a new connection first
//! evicts the oldest connection that has not sent a complete request head yet, and is
//! otherwise answered 503 and closed. Request heads must arrive within the header timeout
//! (hyper's own timer, which also bounds idle keep-alive connections), and a request's
//! handler, its body read included, within the request timeout. A handler may switch its
//! connection to coalesced writes ([`Coalesce`], in the request's extensions): the socket then
//! holds back what is written until a flush, and gives its buffer back once it is sent. This
//! file knows nothing of routes, sessions or the store: it serves any axum `Router`.

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};

/// The limits of [`serve`], from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at once (WebSockets included).
    pub max_connections: usize,
    /// Open connections from one client address; 0: no such cap.
    pub max_per_ip: usize,
    /// Time for a request head to arrive, from the first read of the connection or the end of
    /// the previous response.
    pub header_timeout: Duration,
}

/// Descriptors kept free for the store, the bus and files when the connection cap is derived
/// from the process's open-file limit: a tenth of it plus this many.
const FD_RESERVE: usize = 32;
/// The cap when the open-file limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 10_000;

/// The connection cap derived from the process's soft open-file limit (Linux
/// `/proc/self/limits`), leaving a tenth of it and [`FD_RESERVE`] descriptors free.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        });
    match soft {
        Some(n) => n.saturating_sub(n / 10 + FD_RESERVE).max(1),
        None => FALLBACK_MAX_CONNECTIONS,
    }
}

/// Open connections, and which of them have not sent a complete request head yet.
#[derive(Default)]
struct Table {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Connections without a request yet, oldest first: (id → address, eviction signal).
    unproven: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    next_id: u64,
}

struct Conns {
    limits: Limits,
    table: Mutex<Table>,
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, evicting an unproven connection if a cap is reached;
    /// `None` when the connection must be refused.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Arc<Slot>> {
        let mut t = self.lock();
        let per_ip_full = self.limits.max_per_ip > 0
            && t.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_ip;
        if per_ip_full {
            let victim = t
                .unproven
                .iter()
                .find(|(_, (from, _))| *from == ip)
                .map(|(id, _)| *id);
            evict(&mut t, victim?);
        } else if t.total >= self.limits.max_connections {
            let victim = t.unproven.keys().next().copied();
            evict(&mut t, victim?);
        }
        t.next_id += 1;
        let id = t.next_id;
        t.total += 1;
        *t.per_ip.entry(ip).or_insert(0) += 1;
        let evicted = Arc::new(Notify::new());
        t.unproven.insert(id, (ip, evicted.clone()));
        Some(Arc::new(Slot {
            id,
            ip,
            conns: self.clone(),
            evicted,
            proven: AtomicBool::new(false),
            coalesce: AtomicUsize::new(0),
        }))
    }
}

/// Takes connection `id` off the unproven list and tells its task to close it. Its counts go
/// when its [`Slot`] drops, a moment later; the newcomer is counted meanwhile, so the cap may
/// be passed by the connections being closed.
fn evict(t: &mut Table, id: u64) {
    if let Some((_, signal)) = t.unproven.remove(&id) {
        signal.notify_one();
    }
}

/// One open connection's place in the table; dropped when the socket closes.
struct Slot {
    id: u64,
    ip: IpAddr,
    conns: Arc<Conns>,
    evicted: Arc<Notify>,
    proven: AtomicBool,
    /// Bytes of writes the socket holds back until a flush (0: every write goes straight
    /// out). Set once the connection is a WebSocket (see [`Coalesce`]).
    coalesce: AtomicUsize,
}

impl Slot {
    /// The connection sent a complete request head: it may no longer be evicted.
    fn prove(&self) {
        if !self.proven.swap(true, Ordering::Relaxed) {
            self.conns.lock().unproven.remove(&self.id);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
        t.unproven.remove(&self.id);
    }
}

/// A connection's switch to coalesced writes, handed to the request handlers in the request's
/// extensions. A WebSocket session flips it once upgraded: from then on the socket gathers
/// what is written into one buffer and sends it at the flush that ends each write batch, and
/// gives the buffer back once it is sent (a WebSocket library's own buffer keeps the largest
/// size it ever reached, for the life of the connection).
#[derive(Clone)]
pub struct Coalesce(Arc<Slot>);

impl Coalesce {
    /// Writes are held back, up to `bytes` at a time, until the next flush.
    pub fn start(&self, bytes: usize) {
        self.0.coalesce.store(bytes, Ordering::Relaxed);
    }
}

/// What a held-back buffer starts with (it grows if a batch needs more); it is given back
/// once sent, so an idle connection keeps none.
const FIRST_BYTES: usize = 2048;

/// A TCP stream that holds its [`Slot`] for as long as it lives, upgrades included, and, once
/// its [`Coalesce`] is started, holds back writes until a flush.
pub struct Counted {
    tcp: TcpStream,
    slot: Arc<Slot>,
    /// Written, not yet sent.
    held: Vec<u8>,
    /// How much of `held` is sent.
    sent: usize,
}

impl Counted {
    fn new(tcp: TcpStream, slot: Arc<Slot>) -> Self {
        Self {
            tcp,
            slot,
            held: Vec::new(),
            sent: 0,
        }
    }

    /// Sends what is held back, and gives the buffer back.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.held = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Holds `bufs` back (sending what is held first if they would pass `limit`); `None` when
    /// they are larger than `limit` on their own and must go straight out.
    fn poll_hold(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        limit: usize,
    ) -> Poll<io::Result<Option<usize>>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.held.len() + len > limit {
            std::task::ready!(self.poll_send_held(cx))?;
            if len > limit {
                return Poll::Ready(Ok(None));
            }
        }
        if self.held.capacity() == 0 {
            self.held.reserve(len.max(FIRST_BYTES).min(limit));
        }
        for b in bufs {
            self.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(Some(len)))
    }

    fn limit(&self) -> usize {
        self.slot.coalesce.load(Ordering::Relaxed)
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let limit = self.limit();
        if limit > 0
            && let Some(n) = std::task::ready!(self.poll_hold(cx, &[io::IoSlice::new(buf)], limit))?
        {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let limit = self.limit();
        if limit > 0
            && let Some(n) = std::task::ready!(self.poll_hold(cx, bufs, limit))?
        {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// What a refused connection reads before it is closed (written without waiting: a client
/// that does not read it just sees the close).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 58\r\n\r\n\
{\"code\":\"unavailable\",\"message\":\"too many connections\"}\n";

/// A listening socket on `addr` with room for `backlog` connections waiting to be accepted.
/// The runtime's own `TcpListener::bind` asks the kernel for 128, which a burst of a few
/// hundred connects outruns while the workers are busy: each one dropped waits a second for
/// its SYN to be sent again.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets the
/// requests in flight finish and returns once every HTTP connection is closed (upgraded
/// WebSockets are the caller's to close).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let conns = Arc::new(Conns {
        limits,
        table: Mutex::new(Table::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): back off a
                    // little rather than spin; the caps keep this rare.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conns.admit(peer.ip()) else {
            tracing::debug!(peer = %peer.ip(), "connection refused: at the connection cap");
            let _ = tcp.try_write(REFUSED);
            continue;
        };
        // Frames go out as soon as the write loop flushes them: with Nagle's algorithm on, a
        // flush behind an unacknowledged one waits for the client's delayed ACK (up to 40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        tokio::spawn(connection(
            tcp,
            peer,
            slot,
            router.clone(),
            limits,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection task holds a receiver: closed() resolves when the last one ends.
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Arc<Slot>,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let evicted = slot.evicted.clone();
    let io = TokioIo::new(Counted::new(tcp, slot.clone()));
    let inner = TowerToHyperService::new(router);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            slot.prove();
            // Only an upgrade can use it: a plain API request pays no extension map for it.
            if req.headers().contains_key(header::UPGRADE) {
                req.extensions_mut().insert(Coalesce(slot.clone()));
            }
            hyper::service::Service::call(&inner, req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %peer.ip(), error = %e, "connection ended");
                }
                break;
            }
            () = evicted.notified() => {
                tracing::debug!(peer = %peer.ip(), "idle connection evicted at the cap");
                break;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Middleware: a request's handler (its body read included) must finish within `limit`, else
/// 408 with a JSON error. WebSocket upgrades answer at once, so they are not affected.
pub async fn request_timeout(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            let mut resp = (
                StatusCode::REQUEST_TIMEOUT,
                Body::from(
                    "{\"code\":\"bad_request\",\"message\":\"request not received in time\"}",
                ),
            )
                .into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(max: usize, per_ip: usize) -> Arc<Conns> {
        Arc::new(Conns {
            limits: Limits {
                max_connections: max,
                max_per_ip: per_ip,
                header_timeout: Duration::from_secs(1),
            },
            table: Mutex::new(Table::default()),
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn at_the_cap_the_oldest_unproven_connection_makes_room() {
        let c = conns(2, 0);
        let first = c.admit(A).expect("room");
        let second = c.admit(A).expect("room");
        second.prove();
        let third = c.admit(B).expect("the unproven first one is evicted");
        assert!(!c.lock().unproven.contains_key(&first.id));
        drop(first);
        assert_eq!(c.lock().total, 2);
        third.prove();
        // Everything proven and the cap reached: refused.
        assert!(c.admit(B).is_none());
        drop(second);
        assert!(c.admit(B).is_some());
    }

    #[test]
    fn the_per_address_cap_evicts_only_that_address() {
        let c = conns(100, 1);
        let a = c.admit(A).expect("room");
        let b = c.admit(B).expect("room");
        b.prove();
        assert!(c.admit(B).is_none(), "B's only connection is proven");
        let a2 = c.admit(A).expect("A's unproven one is evicted");
        drop(a);
        assert_eq!(c.lock().per_ip.get(&A).copied(), Some(1));
        drop((a2, b));
        assert_eq!(c.lock().total, 0);
        assert!(c.lock().per_ip.is_empty());
    }

    /// Connects that arrive while nothing is accepted wait in the queue `bind` asked for: with
    /// the runtime's default (128) the ones past it would get no answer at all here.
    #[tokio::test]
    async fn the_accept_queue_holds_a_burst_of_connects() {
        let l = bind("127.0.0.1:0".parse().expect("addr"), 1024).expect("bind");
        let addr = l.local_addr().expect("addr");
        // Past the kernel's own cap no backlog helps.
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let n = cap.min(300);
        let connects = (0..n).map(|_| TcpStream::connect(addr));
        let all = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::future::try_join_all(connects),
        )
        .await
        .expect("every connect completes without an accept");
        assert_eq!(all.expect("connect").len(), n);
        drop(l);
    }

    /// A connected pair on loopback: the server's end counted in `c`, and the client's end.
    async fn pair(c: &Arc<Conns>) -> (Counted, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        (Counted::new(server, c.admit(A).expect("room")), client)
    }

    /// What `client` has received so far, without waiting for more.
    fn received(client: &TcpStream) -> Vec<u8> {
        let mut out = vec![0u8; 1 << 16];
        let n = client.try_read(&mut out).unwrap_or(0);
        out.truncate(n);
        out
    }

    #[tokio::test]
    async fn coalesced_writes_wait_for_the_flush_and_give_their_buffer_back() {
        use tokio::io::AsyncWriteExt;
        let c = conns(10, 0);
        let (mut server, client) = pair(&c).await;
        // Not started: every write goes out at once.
        server.write_all(b"one").await.unwrap();
        client.readable().await.unwrap();
        assert_eq!(received(&client), b"one");

        Coalesce(server.slot.clone()).start(64);
        server.write_all(b"two").await.unwrap();
        server.write_all(b"three").await.unwrap();
        assert_eq!(server.held, b"twothree", "held back until the flush");
        server.flush().await.unwrap();
        client.readable().await.unwrap();
        let mut got = received(&client);
        while got.len() < 8 {
            client.readable().await.unwrap();
            got.extend(received(&client));
        }
        assert_eq!(got, b"twothree");

        // Past the limit: what is held goes first, a write larger than the limit goes straight
        // out, and a buffer a burst grew is given back once sent.
        server.write_all(b"x").await.unwrap();
        server.write_all(&[b'y'; 100]).await.unwrap();
        assert!(server.held.is_empty());
        Coalesce(server.slot.clone()).start(1 << 20);
        server.write_all(&[b'z'; 10_000]).await.unwrap();
        assert!(server.held.capacity() >= 10_000);
        server.flush().await.unwrap();
        assert_eq!(server.held.capacity(), 0, "a burst's buffer is given back");
        let mut got = Vec::new();
        while got.len() < 10_101 {
            client.readable().await.unwrap();
            got.extend(received(&client));
        }
        assert_eq!(&got[..101], [&b"x"[..], &[b'y'; 100]].concat());
        assert!(got[101..].iter().all(|b| *b == b'z'));
    }

    #[test]
    fn the_derived_cap_leaves_descriptors_free() {
        let n = default_max_connections();
        assert!(n >= 1);
    }
}
