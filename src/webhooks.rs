//! The webhook sender: a background task that takes due deliveries from the store's outbox,
//! POSTs each event to its endpoint signed per the Standard Webhooks scheme, and reports every
//! attempt back (delivered, retry at a time from the configured schedule or `Retry-After`,
//! given up, or 410 Gone which disables the endpoint). A lane (one endpoint, one room) has one
//! delivery in flight at a time and the store hands out only a lane's first pending delivery,
//! so each endpoint sees a room's events in order. Also the endpoint checks shared with the
//! API: URL shape, and the refusal of non-public addresses after DNS resolution (SSRF).
//! `https://` endpoints are reached over TLS (rustls, the system's roots plus
//! `webhook_ca_file`), the certificate checked against the URL's host. Every
//! `webhook_prune_every_s` the sender also prunes the delivery log and the outbox of what
//! finished more than `webhook_retention_s` ago.
//! It knows nothing of rooms, sessions or SQL: events arrive as stored JSON bodies.

use crate::config::Config;
use crate::store::{Attempt, AttemptResult, DueDelivery, Store, WebhookKeys, now_ms};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::Sha256;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The prefix of every endpoint secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest endpoint URL.
pub const MAX_URL_CHARS: usize = 2048;

/// Why an endpoint URL is refused (at creation, or before a delivery).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(
        "url must be an absolute http:// or https:// URL of at most {MAX_URL_CHARS} characters"
    )]
    Shape,
    #[error("url must not carry credentials")]
    Credentials,
    #[error("cannot resolve {0}")]
    Unresolved(String),
    #[error(
        "{host} resolves to {ip}, a loopback, private or otherwise non-public address \
         (set STUDYHALL_WEBHOOK_ALLOW_PRIVATE=true to allow it)"
    )]
    Private { host: String, ip: IpAddr },
}

/// Where a delivery goes: the checked addresses, and what the request line and `Host` say.
#[derive(Clone, Debug)]
pub struct Target {
    pub addrs: Vec<SocketAddr>,
    pub authority: String,
    pub path: String,
    /// For `https://`: the name the server's certificate must carry (the URL's host).
    pub tls: Option<ServerName<'static>>,
}

/// Parses and resolves an endpoint URL; unless `allow_private`, refuses it when any address
/// it resolves to is not public. Deliveries connect only to the addresses checked here.
pub async fn resolve(url: &str, allow_private: bool) -> Result<Target, UrlError> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(UrlError::Shape);
    }
    let uri: hyper::Uri = url.parse().map_err(|_| UrlError::Shape)?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(UrlError::Shape),
    };
    let authority = uri.authority().ok_or(UrlError::Shape)?;
    if authority.as_str().contains('@') {
        return Err(UrlError::Credentials);
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(UrlError::Shape);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // A port that is there but not a u16 (`:99999`) is a bad URL, not the default port.
    let port = match (authority.as_str().strip_prefix(host), authority.port_u16()) {
        (_, Some(port)) => port,
        (Some(""), None) => {
            if https {
                443
            } else {
                80
            }
        }
        _ => return Err(UrlError::Shape),
    };
    let tls = if https {
        Some(ServerName::try_from(bare.to_owned()).map_err(|_| UrlError::Shape)?)
    } else {
        None
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|_| UrlError::Unresolved(bare.to_owned()))?
        .collect();
    if addrs.is_empty() {
        return Err(UrlError::Unresolved(bare.to_owned()));
    }
    if !allow_private && let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(UrlError::Private {
            host: bare.to_owned(),
            ip: a.ip(),
        });
    }
    Ok(Target {
        addrs,
        authority: authority.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        tls,
    })
}

/// Why the TLS set-up for `https://` endpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("webhook_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS client for `https://` endpoints: the system's root certificates, plus those in
/// `ca_file` (PEM) when given. A system store that cannot be read leaves only `ca_file`'s.
pub fn tls_client(ca_file: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "webhooks: reading the system's root certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if !ca_file.is_empty() {
        let bad = |reason: String| TlsError::CaFile {
            path: ca_file.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether an address is on the public internet: not loopback, private, link-local,
/// shared (CGNAT), unspecified, broadcast, multicast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64: the IPv4 address inside decides.
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240)
}

/// A new endpoint secret: `whsec_` and base64 of 32 random bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

/// `v1,` and base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`, keyed with the decoded part
/// of `secret` after `whsec_`. `None` for a secret that is not of that form.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = STANDARD.decode(secret.strip_prefix(SECRET_PREFIX)?).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Some(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` value: the current secret's signature, then the previous
/// secret's while its grace period lasts, space-separated.
pub fn signature_header(keys: &WebhookKeys, now_ms: i64, id: &str, ts: i64, body: &str) -> String {
    let mut sigs: Vec<String> = sign(&keys.secret, id, ts, body).into_iter().collect();
    if let (Some(old), Some(until)) = (&keys.old_secret, keys.old_secret_until)
        && now_ms < until
    {
        sigs.extend(sign(old, id, ts, body));
    }
    sigs.join(" ")
}

/// What the sender needs from the configuration.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// The TLS client for `https://` endpoints.
    pub tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
    pub schedule: Vec<Duration>,
    pub allow_private: bool,
    pub poll: Duration,
    pub concurrency: usize,
    /// How long finished deliveries and unreferenced events are kept; `None`: forever.
    pub retention: Option<Duration>,
    /// Time between pruning passes, and the rows one pruning transaction deletes.
    pub prune_every: Duration,
    pub prune_batch: usize,
}

impl SenderConfig {
    pub fn from_config(c: &Config) -> Result<Self, TlsError> {
        Ok(Self {
            tls: tls_client(c.webhook_ca_file.as_deref().unwrap_or(""))?,
            timeout: Duration::from_millis(c.webhook_timeout_ms),
            // `Config::validate` has checked it; an unchecked config gets one attempt.
            schedule: c.webhook_schedule().unwrap_or_default(),
            allow_private: c.webhook_allow_private,
            poll: Duration::from_millis(c.webhook_poll_ms),
            concurrency: c.webhook_concurrency.max(1),
            retention: (c.webhook_retention_s > 0)
                .then(|| Duration::from_secs(c.webhook_retention_s)),
            prune_every: Duration::from_secs(c.webhook_prune_every_s.max(1)),
            prune_batch: c.webhook_prune_batch.max(1),
        })
    }

    /// When to try again after `attempts` failed attempts; `None` when that was the last.
    fn next_try(&self, attempts: usize, retry_after: Option<Duration>) -> Option<Duration> {
        let base = *self.schedule.get(attempts.saturating_sub(1))?;
        let jitter = base.mul_f64(rand::random::<f64>() * 0.1);
        let wait = base + jitter;
        let longest = self.schedule.iter().max().copied().unwrap_or(base);
        Some(match retry_after {
            Some(ra) => wait.max(ra.min(longest)),
            None => wait,
        })
    }
}

/// Runs until aborted: delivers due webhook events. A crash or abort mid-delivery leaves the
/// delivery pending, so it is sent again (at least once).
pub async fn run(store: Store, cfg: SenderConfig) {
    // Pruning beside sending, so a long pass never holds deliveries back.
    let pruning = prune_loop(
        store.clone(),
        cfg.retention,
        cfg.prune_every,
        cfg.prune_batch,
    );
    tokio::join!(send(store, cfg), pruning);
}

/// Prunes every `every` (the first pass at once) while `retention` is set.
async fn prune_loop(store: Store, retention: Option<Duration>, every: Duration, batch: usize) {
    let Some(keep) = retention else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        prune(&store, keep, batch).await;
    }
}

/// Delivers due events until aborted.
async fn send(store: Store, cfg: SenderConfig) {
    let wake = store.outbox_notify();
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let cfg = Arc::new(cfg);
    let mut refreshed = Instant::now();
    // Aborting this task (at shutdown) aborts the deliveries in flight with it.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        // Endpoints changed on other nodes reach this node's subscription set here.
        if refreshed.elapsed() >= cfg.poll {
            refreshed = Instant::now();
            if let Err(e) = store.refresh_webhook_subscriptions().await {
                tracing::warn!(error = %e, "webhooks: cannot reload subscriptions");
            }
        }
        match store
            .due_deliveries(now_ms(), cfg.concurrency.saturating_mul(2))
            .await
        {
            Ok(due) => {
                for d in due {
                    {
                        let mut busy = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                        if busy.contains(&d.id) {
                            continue;
                        }
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        busy.insert(d.id);
                        let (store, cfg, busy, wake) =
                            (store.clone(), cfg.clone(), in_flight.clone(), wake.clone());
                        tasks.spawn(async move {
                            let id = d.id;
                            // Several nodes may run a sender on one database: one claims it.
                            let lease = now_ms().saturating_add(
                                i64::try_from(cfg.timeout.as_millis().saturating_mul(2))
                                    .unwrap_or(i64::MAX),
                            );
                            match store.claim_delivery(&d, lease).await {
                                Ok(true) => deliver(&store, &cfg, d).await,
                                Ok(false) => {}
                                Err(e) => tracing::warn!(error = %e, "webhooks: cannot claim"),
                            }
                            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            drop(slot);
                            // The lane's next delivery may be due now.
                            wake.notify_one();
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "webhooks: cannot read the outbox"),
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(cfg.poll) => {}
        }
    }
}

/// One pruning pass: what finished more than `keep` ago goes (see
/// [`Store::prune_webhooks`]). Every node's sender runs it; the deletes are idempotent.
async fn prune(store: &Store, keep: Duration, batch: usize) {
    let cutoff = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    match store.prune_webhooks(cutoff, batch).await {
        Ok(p) if p != crate::store::Pruned::default() => tracing::info!(
            deliveries = p.deliveries,
            attempts = p.attempts,
            events = p.events,
            "webhooks: pruned the delivery log"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "webhooks: cannot prune the delivery log"),
    }
}

/// One attempt of one delivery, recorded in the delivery log.
async fn deliver(store: &Store, cfg: &SenderConfig, d: DueDelivery) {
    let at = now_ms();
    let started = Instant::now();
    let ts = at / 1000;
    let signature = signature_header(&d.keys, at, &d.event_id, ts, &d.body);
    let sent = tokio::time::timeout(cfg.timeout, post(cfg, &d, ts, &signature)).await;
    let (status, error, retry_after) = match sent {
        Ok(Ok((status, retry_after))) => (Some(status), None, retry_after),
        Ok(Err(e)) => (None, Some(e), None),
        Err(_) => (
            None,
            Some(format!("timed out after {} ms", cfg.timeout.as_millis())),
            None,
        ),
    };
    let attempts = usize::try_from(d.attempts)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let result = match status {
        Some(s) if (200..300).contains(&s) => AttemptResult::Delivered,
        Some(410) => AttemptResult::Gone,
        _ => match cfg.next_try(attempts, retry_after) {
            Some(wait) => AttemptResult::Retry {
                next_at: now_ms()
                    .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
            },
            None => AttemptResult::GiveUp,
        },
    };
    match &result {
        AttemptResult::Delivered => {}
        AttemptResult::Gone => {
            tracing::warn!(webhook = %d.webhook_id, "webhook endpoint answered 410: disabled")
        }
        other => tracing::info!(
            webhook = %d.webhook_id, event = %d.event_id, ?status, ?error, ?other,
            "webhook delivery failed"
        ),
    }
    let attempt = Attempt {
        at,
        duration_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
        status: status.map(i64::from),
        error,
    };
    if let Err(e) = store.record_attempt(&d, &attempt, &result).await {
        // The delivery stays pending and is sent again: at least once.
        tracing::warn!(error = %e, delivery = d.id, "webhooks: cannot record an attempt");
    }
}

/// POSTs the body; answers the status and any `Retry-After` (in seconds), or why it failed.
async fn post(
    cfg: &SenderConfig,
    d: &DueDelivery,
    ts: i64,
    signature: &str,
) -> Result<(u16, Option<Duration>), String> {
    // Resolved and checked again at each attempt: DNS may have changed since creation.
    let target = resolve(&d.url, cfg.allow_private)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in &target.addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    let stream = stream.ok_or(last)?;
    match target.tls.clone() {
        Some(name) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.tls.clone())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(tls, cfg, d, &target, ts, signature).await
        }
        None => exchange(stream, cfg, d, &target, ts, signature).await,
    }
}

/// One request and its answer's head over an open connection (plain or TLS).
async fn exchange<S>(
    stream: S,
    cfg: &SenderConfig,
    d: &DueDelivery,
    target: &Target,
    ts: i64,
    signature: &str,
) -> Result<(u16, Option<Duration>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let limit = cfg.timeout;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(limit, conn).await;
    });
    let req = hyper::Request::post(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "studyhall-webhooks")
        .header("webhook-id", d.event_id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(d.body.clone())))
        .map_err(|e| format!("request: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let retry_after = res
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Ok((res.status().as_u16(), retry_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("empty.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        for path in [bad.display().to_string(), "/no/such/ca.pem".to_owned()] {
            let err = tls_client(&path).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(&path)),
                "{path}: {err:?}"
            );
        }
        assert!(tls_client("").is_ok(), "the system's roots alone");
    }

    #[test]
    fn non_public_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "64:ff9b::5db8:d822",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn schedule_steps_then_gives_up() {
        let cfg = SenderConfig {
            tls: tls_client("").unwrap(),
            timeout: Duration::from_secs(1),
            schedule: vec![Duration::from_secs(5), Duration::from_secs(300)],
            allow_private: false,
            poll: Duration::from_secs(1),
            concurrency: 1,
            retention: None,
            prune_every: Duration::from_secs(60),
            prune_batch: 1,
        };
        let first = cfg.next_try(1, None).unwrap();
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_millis(5500));
        let honoured = cfg.next_try(1, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(honoured, Duration::from_secs(60));
        let capped = cfg.next_try(2, Some(Duration::from_secs(99_999))).unwrap();
        assert_eq!(capped, Duration::from_secs(300).max(capped));
        assert!(capped <= Duration::from_secs(330));
        assert!(cfg.next_try(3, None).is_none());
    }
}
