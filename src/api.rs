//! HTTP surface: the router (`/ws` upgrade with the Origin check, `/healthz`, `/metrics`, the
//! dev-only token endpoint) and the server-to-server API under `/api` guarded by the bearer
//! key. JSON errors are `{"code","message"}` from [`crate::error::Error`]. Handlers validate
//! input and call the store; they know nothing of sessions beyond handing a socket over.

use crate::App;
use crate::error::{Error, Result};
use crate::protocol::{
    PlatformRole, RoomId, RoomKind, RoomRole, UserId, UserRef, Visibility, valid_room_id,
};
use crate::protocol::{QuestionStatus, QuestionView};
use crate::store::{
    DEFAULT_ANSWER_SLA_S, QaSettings, QuestionFilter, QuestionSort, Room, RoomPatch, RoomRules,
    View, WriteOp, WriteOutcome, now_ms,
};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Largest HTTP request body the API accepts.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest room title.
const MAX_TITLE_CHARS: usize = 200;
/// Most events one `GET /api/rooms/{id}/messages` returns.
const MAX_API_PAGE: u32 = 1000;
/// Rooms in one `GET /api/rooms` page when `limit` is not given.
pub const ROOMS_PAGE_DEFAULT: u32 = 50;
/// Most rooms one `GET /api/rooms` page may hold (`limit` above it is 400).
pub const ROOMS_PAGE_MAX: u32 = 200;

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/rooms", get(list_rooms).post(create_room))
        .route(
            "/rooms/{id}",
            get(get_room).patch(patch_room).delete(archive_room),
        )
        .route(
            "/rooms/{id}/members/{user}",
            put(put_member).delete(delete_member),
        )
        .route(
            "/rooms/{id}/messages",
            get(list_messages).post(post_announcement),
        )
        .route("/calls", get(list_calls))
        .route("/rooms/{id}/questions", get(list_questions))
        .route("/rooms/{id}/faq", get(faq))
        .route("/rooms/{id}/reports", get(list_reports))
        .route("/rooms/{id}/reports/{report}/resolve", post(resolve_report))
        .route("/rooms/{id}/audit", get(audit_log))
        // engagement and room health
        .route("/rooms/{id}/leaderboard", get(leaderboard))
        .route("/rooms/{id}/stats", get(room_stats))
        .route("/webhooks", post(create_webhook).get(list_webhooks))
        .route("/webhooks/{id}", get(get_webhook).delete(delete_webhook))
        .route("/webhooks/{id}/rotate", post(rotate_webhook))
        .route("/webhooks/{id}/deliveries", get(list_deliveries))
        .route(
            "/webhooks/{id}/deliveries/{delivery}/replay",
            post(replay_delivery),
        )
        .route("/rooms/{id}/summary", get(class_summary))
        .route("/rooms/{id}/quiz-leaderboard", get(quiz_leaderboard))
        .route("/rooms/{id}/polls/{poll}/results", get(poll_results))
        .route("/openapi.json", get(openapi))
        .layer(middleware::from_fn_with_state(app.clone(), require_api_key));
    let mut router = Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/client.json", get(client_config))
        .route("/metrics", get(metrics))
        .nest("/api", api)
        .merge(crate::web::routes());
    if app.config.dev {
        router = router.route("/dev/token", post(dev_token));
    }
    router
        .fallback(|| async { Error::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            // The one error whose status is not its code's.
            let mut res = Error::bad_request("method not allowed").into_response();
            *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            res
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(json_errors))
        .with_state(app)
}

/// Every error answer as `{"code","message"}`. The handlers' own errors already are; the
/// framework's rejections (a body over [`MAX_BODY_BYTES`], a path or query string it cannot
/// decode, a WebSocket request that is no upgrade) come as plain text and are rewritten here,
/// keeping their status and headers such as `Allow`.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge(format!(
            "the request body is larger than {MAX_BODY_BYTES} bytes"
        )),
        StatusCode::UNAUTHORIZED => Error::Unauthorized(text),
        StatusCode::FORBIDDEN => Error::Forbidden(text),
        StatusCode::NOT_FOUND => Error::NotFound(text),
        StatusCode::CONFLICT => Error::Conflict(text),
        StatusCode::TOO_MANY_REQUESTS => Error::RateLimited(text),
        StatusCode::SERVICE_UNAVAILABLE => Error::Unavailable(text),
        s if s.is_server_error() => {
            tracing::warn!(%status, body = %text, "framework error");
            Error::Internal(text)
        }
        _ => Error::BadRequest(text),
    };
    let mut out = error.into_response();
    *out.status_mut() = status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name, value.clone());
        }
    }
    out
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    if std::str::from_utf8(body).is_ok_and(crate::protocol::has_nul_escape) {
        return Err(Error::bad_request("text must not contain NUL (U+0000)"));
    }
    serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))
}

fn room_id(id: String) -> Result<RoomId> {
    if valid_room_id(&id) {
        Ok(RoomId(id))
    } else {
        Err(Error::bad_request(
            "room ids are 1..=64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

fn user_id(id: String) -> Result<UserId> {
    if id.is_empty() || id.chars().count() > 64 {
        return Err(Error::bad_request("user ids are 1..=64 characters"));
    }
    Ok(UserId(id))
}

/// Most blocked words / allowed link domains one room may list.
const MAX_RULE_ENTRIES: usize = 500;

fn check_settings(sla: Option<i64>, slow: Option<i64>, rules: Option<&RoomRules>) -> Result<()> {
    if sla.is_some_and(|s| !(1..=30 * 86_400).contains(&s)) {
        return Err(Error::bad_request("answer_sla_s must be 1..=2592000"));
    }
    if slow.is_some_and(|s| !(0..=3600).contains(&s)) {
        return Err(Error::bad_request("slow_mode_s must be 0..=3600"));
    }
    if let Some(r) = rules {
        let domains = match &r.links {
            crate::store::LinkPolicy::Domains { domains } => domains.len(),
            _ => 0,
        };
        if r.blocked_words.len() > MAX_RULE_ENTRIES || domains > MAX_RULE_ENTRIES {
            return Err(Error::bad_request(format!(
                "at most {MAX_RULE_ENTRIES} blocked words and {MAX_RULE_ENTRIES} domains"
            )));
        }
        if r.blocked_words
            .iter()
            .any(|w| w.trim().is_empty() || w.chars().count() > 100)
        {
            return Err(Error::bad_request("blocked words are 1..=100 characters"));
        }
    }
    Ok(())
}

fn check_engagement(e: Option<&crate::store::EngagementSettings>) -> Result<()> {
    if let Some(e) = e
        && crate::engagement::zone(&e.timezone).is_none()
    {
        return Err(Error::bad_request(
            "engagement.timezone must be an IANA time zone name such as Europe/Berlin",
        ));
    }
    Ok(())
}

fn check_title(t: &str) -> Result<()> {
    if t.trim().is_empty() || t.chars().count() > MAX_TITLE_CHARS {
        return Err(Error::bad_request(format!(
            "title must be 1..={MAX_TITLE_CHARS} characters"
        )));
    }
    Ok(())
}

// -- WebSocket, health, metrics ---------------------------------------------------------------

async fn ws_upgrade(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    coalesce: Option<Extension<crate::listener::Coalesce>>,
    ws: crate::ws::Upgrade,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN)
        && !app.config.allowed_origins.is_empty()
    {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| app.config.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            return Error::Forbidden("origin not allowed".into()).into_response();
        }
    }
    if app.shutting_down.load(Relaxed) {
        return Error::Unavailable("server is shutting down".into()).into_response();
    }
    let coalesce = coalesce.map(|Extension(c)| c);
    let coalesce_bytes = app.config.ws_write_buffer_bytes;
    // A connection keeps no read buffer between messages: it reads into a per-thread buffer
    // and keeps only what it could not hand out yet.
    let limits = crate::ws::ReadLimits {
        max_message: app.config.max_frame_bytes,
        chunk: app.config.ws_read_buffer_bytes,
    };
    ws.on_upgrade(limits, move |sink, stream| {
        // The socket gathers the frames of a write batch and sends them at the batch's flush,
        // giving its buffer back once they are out.
        if let Some(c) = coalesce
            && coalesce_bytes > 0
        {
            c.start(coalesce_bytes);
        }
        crate::session::run(app, sink, stream)
    })
}

/// The body of a healthy `/healthz`: `{"status":"ok"}`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// What the web client needs to know before sign-in: whether the dev sign-in form
/// (`POST /dev/token`) is available. Always routed, so the page probes it without an error.
#[derive(Serialize)]
struct ClientConfig {
    dev_sign_in: bool,
}

async fn client_config(State(app): State<Arc<App>>) -> Json<ClientConfig> {
    Json(ClientConfig {
        dev_sign_in: app.config.dev,
    })
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    match tokio::time::timeout(std::time::Duration::from_secs(2), app.store.ping()).await {
        Ok(Ok(())) => Json(Health { status: "ok" }).into_response(),
        _ => Error::Unavailable("store unreachable".into()).into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let sfu = app.sfu.as_ref().map(|s| s.stats().counters());
    let body = app.metrics.render(
        app.hub.active_rooms(),
        app.hub.sessions(),
        sfu.as_ref().map_or(&[][..], |c| &c[..]),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

// -- API key ---------------------------------------------------------------------------------

async fn require_api_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if matches!(req.uri().path(), "/openapi.json" | "/api/openapi.json") {
        return next.run(req).await;
    }
    let Some(key) = app.config.api_key.as_deref() else {
        return Error::Unavailable("the HTTP API is disabled: set STUDYHALL_API_KEY".into())
            .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => Error::Unauthorized("missing or wrong API key".into()).into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

// -- rooms -----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRoom {
    id: String,
    kind: RoomKind,
    title: Option<String>,
    #[serde(default)]
    visibility: Option<Visibility>,
    qa: Option<QaSettings>,
    starts_at: Option<i64>,
    ends_at: Option<i64>,
    answer_sla_s: Option<i64>,
    rules: Option<RoomRules>,
    engagement: Option<crate::store::EngagementSettings>,
    av: Option<crate::protocol::AvSettings>,
    stage: Option<crate::protocol::StageSettings>,
}

/// A talk-time cap is 1..=`stage_talk_cap_max_s` seconds (or `null`: none).
fn check_stage(app: &App, stage: Option<&crate::protocol::StageSettings>) -> Result<()> {
    let max = app.config.stage_talk_cap_max_s;
    if stage
        .and_then(|s| s.talk_cap_s)
        .is_some_and(|c| c == 0 || c > max)
    {
        return Err(Error::bad_request(format!(
            "stage.talk_cap_s must be 1..={max} or null"
        )));
    }
    Ok(())
}

async fn create_room(State(app): State<Arc<App>>, body: Bytes) -> Result<Response> {
    let new: NewRoom = parse_body(&body)?;
    let id = room_id(new.id)?;
    let title = new.title.unwrap_or_else(|| id.to_string());
    check_title(&title)?;
    if let (Some(s), Some(e)) = (new.starts_at, new.ends_at)
        && e <= s
    {
        return Err(Error::bad_request("ends_at must be after starts_at"));
    }
    check_settings(new.answer_sla_s, None, new.rules.as_ref())?;
    check_engagement(new.engagement.as_ref())?;
    check_stage(&app, new.stage.as_ref())?;
    // The store sets the class state from `starts_at`; nothing has started or ended yet.
    let room = Room {
        av: new.av.unwrap_or_default(),
        stage: new.stage.unwrap_or_default(),
        engagement: new.engagement.unwrap_or_default(),
        answer_sla_s: new.answer_sla_s.unwrap_or(DEFAULT_ANSWER_SLA_S),
        rules: new.rules.unwrap_or_default(),
        qa: new.qa.unwrap_or(QaSettings {
            enabled: new.kind == RoomKind::Live,
            moderated: false,
            peer_answers: false,
        }),
        starts_at: new.starts_at,
        ends_at: new.ends_at,
        ..Room::new(
            id,
            new.kind,
            title,
            new.visibility.unwrap_or(Visibility::Open),
        )
    };
    let created = app.store.create_room(&room).await?;
    tracing::info!(room = %created.id, kind = created.kind.as_str(), "room created");
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The answer of `GET /api/rooms`: one page, and the cursor of the next (`None` on the last).
#[derive(Serialize)]
struct RoomList {
    rooms: Vec<Room>,
    next_cursor: Option<String>,
}

async fn list_rooms(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<RoomList>> {
    if let Some(k) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "kind" | "member" | "limit" | "cursor"))
    {
        return Err(Error::bad_request(format!(
            "unknown parameter {k:?}: kind, member, limit and cursor are known"
        )));
    }
    let kind = match q.get("kind") {
        Some(k) => Some(
            RoomKind::parse(k)
                .ok_or_else(|| Error::bad_request("kind must be group, live, tutoring or class"))?,
        ),
        None => None,
    };
    let member = q.get("member").cloned().map(user_id).transpose()?;
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=ROOMS_PAGE_MAX).contains(l))
            .ok_or_else(|| {
                Error::bad_request(format!("limit must be an integer in 1..={ROOMS_PAGE_MAX}"))
            })?,
        None => ROOMS_PAGE_DEFAULT,
    };
    let after = match q.get("cursor") {
        Some(c) if valid_room_id(c) => Some(RoomId(c.clone())),
        Some(_) => {
            return Err(Error::bad_request(
                "cursor must be a next_cursor this endpoint returned",
            ));
        }
        None => None,
    };
    let page = app
        .store
        .rooms_page(&crate::store::RoomQuery {
            kind,
            member,
            after,
            limit,
        })
        .await?;
    let next_cursor = page
        .has_more
        .then(|| page.rooms.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(RoomList {
        rooms: page.rooms,
        next_cursor,
    }))
}

async fn get_room(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Room>> {
    let id = room_id(id)?;
    let room = app
        .store
        .room(&id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("room {id} not found")))?;
    Ok(Json(room))
}

async fn patch_room(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Room>> {
    let id = room_id(id)?;
    let patch: RoomPatch = parse_body(&body)?;
    if let Some(t) = &patch.title {
        check_title(t)?;
    }
    check_settings(patch.answer_sla_s, patch.slow_mode_s, patch.rules.as_ref())?;
    check_engagement(patch.engagement.as_ref())?;
    check_stage(&app, patch.stage.as_ref())?;
    let room = app.store.update_room(&id, &patch).await?;
    app.policies.room_changed(room.clone());
    if let Some(seconds) = patch.slow_mode_s {
        let frame = crate::protocol::encode(&crate::protocol::ServerMsg::SlowMode {
            room: &id,
            seconds: seconds as u64,
        });
        app.hub.notify_all(&id, &crate::hub::Frame::from(frame));
    }
    Ok(Json(room))
}

async fn archive_room(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Room>> {
    let id = room_id(id)?;
    let patch = RoomPatch {
        archived: Some(true),
        ..Default::default()
    };
    let room = app.store.update_room(&id, &patch).await?;
    app.policies.room_changed(room.clone());
    tracing::info!(room = %id, "room archived");
    Ok(Json(room))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    role: RoomRole,
}

/// A stored membership, as `PUT /api/rooms/{id}/members/{user}` answers it.
#[derive(Serialize)]
struct Membership {
    room: RoomId,
    user: UserId,
    role: RoomRole,
}

async fn put_member(
    State(app): State<Arc<App>>,
    Path((id, user)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Membership>> {
    let id = room_id(id)?;
    let user = user_id(user)?;
    let MemberBody { role } = parse_body(&body)?;
    app.store.set_member(&id, &user, role).await?;
    // The platform's word on the user's role replaces a rank remembered from a join.
    app.store.forget_rank(&id, &user).await?;
    app.policies.member_changed(&id, &user, Some(role));
    Ok(Json(Membership {
        room: id,
        user,
        role,
    }))
}

async fn delete_member(
    State(app): State<Arc<App>>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode> {
    let id = room_id(id)?;
    let user = user_id(user)?;
    if app.store.remove_member(&id, &user).await? {
        app.store.forget_rank(&id, &user).await?;
        app.policies.member_changed(&id, &user, None);
        // In an invite-only room membership is what lets them in: end their live sessions.
        if app
            .store
            .room(&id)
            .await?
            .is_some_and(|r| r.visibility == Visibility::Invite)
        {
            app.hub.kick(&id, &user, "removed");
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("{user} is not a member of {id}")))
    }
}

async fn list_messages(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let id = room_id(id)?;
    let num = |k: &str, default: i64| -> Result<i64> {
        q.get(k).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| Error::bad_request(format!("{k} must be an integer")))
        })
    };
    let after = num("after_seq", 0)?;
    let limit = num("limit", 100)?;
    if after < 0 || !(1..=i64::from(MAX_API_PAGE)).contains(&limit) {
        return Err(Error::bad_request(format!(
            "after_seq must be >= 0 and limit 1..={MAX_API_PAGE}"
        )));
    }
    if app.store.room(&id).await?.is_none() {
        return Err(Error::NotFound(format!("room {id} not found")));
    }
    let page = app
        .store
        .events_after(&id, after, limit as u32, crate::store::View::Moderator)
        .await?;
    let body = crate::protocol::HistoryOk {
        events: &page.events,
        has_more: page.has_more,
    }
    .encode();
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A stored announcement, as `POST /api/rooms/{id}/messages` answers it.
#[derive(Serialize)]
struct Announced {
    id: crate::protocol::MessageId,
    seq: i64,
    ts: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Announcement {
    text: String,
    /// Shown as the sender's name; defaults to "Announcement".
    name: Option<String>,
    /// Idempotency key: a retried POST with the same key stores one message.
    client_msg_id: Option<String>,
}

async fn post_announcement(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let id = room_id(id)?;
    let a: Announcement = parse_body(&body)?;
    if a.text.trim().is_empty() {
        return Err(Error::bad_request("text must not be empty"));
    }
    if a.text.chars().count() > app.config.max_text_chars {
        return Err(Error::TooLarge(format!(
            "text is longer than {} characters",
            app.config.max_text_chars
        )));
    }
    let max_cid = app.config.max_client_msg_id_chars;
    if a.client_msg_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.chars().count() > max_cid)
    {
        return Err(Error::bad_request(format!(
            "client_msg_id must be 1..={max_cid} characters"
        )));
    }
    let name = a.name.unwrap_or_else(|| "Announcement".into());
    if name.trim().is_empty() || name.chars().count() > crate::auth::MAX_NAME_CHARS {
        return Err(Error::bad_request("name must be 1..=100 characters"));
    }
    // The system sender id is reserved: no token may carry it (auth refuses it).
    let from = UserRef {
        id: UserId(crate::auth::SYSTEM_USER.into()),
        name,
        role: crate::protocol::ShownRole::System,
    };
    let op = WriteOp::Send(crate::store::SendOp {
        room: id,
        from,
        text: a.text,
        client_msg_id: a.client_msg_id,
        reply_to: None,
    });
    match app.store.write(op).await? {
        WriteOutcome::Sent { id, seq, ts, .. } => {
            Ok((StatusCode::CREATED, Json(Announced { id, seq, ts })).into_response())
        }
        other => Err(Error::Internal(format!("unexpected outcome {other:?}"))),
    }
}

// -- dev sign-in -----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    #[serde(alias = "sub", alias = "id", alias = "user_id")]
    user: String,
    name: Option<String>,
    #[serde(default)]
    role: Option<PlatformRole>,
    #[serde(default)]
    rooms: HashMap<String, RoomRole>,
    ttl: Option<String>,
}

#[derive(Serialize)]
struct DevToken {
    token: String,
}

async fn dev_token(State(app): State<Arc<App>>, body: Bytes) -> Result<Json<DevToken>> {
    let req: DevTokenRequest = parse_body(&body)?;
    let user = user_id(req.user)?;
    let name = req.name.unwrap_or_else(|| user.to_string());
    if name.trim().is_empty() || name.chars().count() > crate::auth::MAX_NAME_CHARS {
        return Err(Error::bad_request("name must be 1..=100 characters"));
    }
    for room in req.rooms.keys() {
        room_id(room.clone())?;
    }
    let ttl =
        crate::auth::parse_ttl(req.ttl.as_deref().unwrap_or("12h")).map_err(Error::BadRequest)?;
    let token = app
        .tokens
        .sign(
            user.as_str(),
            &name,
            req.role.unwrap_or(PlatformRole::Student),
            req.rooms,
            ttl,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Json(DevToken { token }))
}

// -- Q&A, reports, audit ----------------------------------------------------------------------

async fn existing_room(app: &App, id: String) -> Result<Room> {
    let id = room_id(id)?;
    app.store
        .room(&id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("room {id} not found")))
}

#[derive(Serialize)]
struct Questions {
    questions: Vec<QuestionView>,
}

async fn list_questions(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Questions>> {
    let room = existing_room(&app, id).await?;
    let sort = match q.get("sort").map(String::as_str) {
        None | Some("top") => QuestionSort::Top,
        Some("recent") => QuestionSort::Recent,
        Some(_) => return Err(Error::bad_request("sort must be top or recent")),
    };
    let filter = QuestionFilter {
        status: match q.get("status") {
            Some(s) => {
                Some(QuestionStatus::parse(s).ok_or_else(|| Error::bad_request("unknown status"))?)
            }
            None => None,
        },
        overdue_only: q.get("overdue").is_some_and(|v| v == "true" || v == "1"),
    };
    let questions = app
        .store
        .questions(
            &room.id,
            &filter,
            sort,
            View::Moderator,
            room.answer_sla_s,
            now_ms(),
        )
        .await?;
    Ok(Json(Questions { questions }))
}

#[derive(Serialize)]
struct Faq {
    room: RoomId,
    title: String,
    questions: Vec<QuestionView>,
}

/// Answered questions with their answers, most voted first: JSON, or Markdown when the client
/// asks for `text/markdown`.
async fn faq(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let room = existing_room(&app, id).await?;
    let filter = QuestionFilter {
        status: Some(QuestionStatus::Answered),
        overdue_only: false,
    };
    let questions = app
        .store
        .questions(
            &room.id,
            &filter,
            QuestionSort::Top,
            View::Member,
            room.answer_sla_s,
            now_ms(),
        )
        .await?;
    let markdown = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/markdown"));
    if !markdown {
        return Ok(Json(Faq {
            room: room.id,
            title: room.title,
            questions,
        })
        .into_response());
    }
    let mut md = format!("# {} — FAQ\n\n", md_escape(&one_line(&room.title)));
    for q in &questions {
        md.push_str(&format!("## {}\n\n", md_escape(&one_line(&q.text))));
        md.push_str(&format!("_{} votes_\n\n", q.votes));
        for a in &q.answers {
            md.push_str(&format!(
                "{}\n\n— {}\n\n",
                md_escape(&a.text),
                md_escape(&one_line(&a.author.name))
            ));
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/markdown; charset=utf-8")], md).into_response())
}

/// Text as literal Markdown: every character Markdown or HTML could read as markup is
/// backslash-escaped (CommonMark allows it before any ASCII punctuation), so user text can
/// neither start a heading, a link or an image nor carry raw HTML.
fn md_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\`*_{}[]()#+-=!|<>~&".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Text on one line (headings and bylines).
fn one_line(text: &str) -> String {
    text.split(['\n', '\r']).collect::<Vec<_>>().join(" ")
}

#[derive(Serialize)]
struct Reports {
    reports: Vec<crate::store::Report>,
}

async fn list_reports(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Reports>> {
    let room = existing_room(&app, id).await?;
    let all = q.get("all").is_some_and(|v| v == "true" || v == "1");
    let reports = app.store.reports(&room.id, all).await?;
    Ok(Json(Reports { reports }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Resolution {
    /// Who resolved it (a moderator's user id on the platform); default "api".
    by: Option<String>,
    /// What was done, e.g. "deleted", "dismissed".
    resolution: Option<String>,
}

async fn resolve_report(
    State(app): State<Arc<App>>,
    Path((id, report)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<crate::store::Report>> {
    let room = existing_room(&app, id).await?;
    let r: Resolution = if body.is_empty() {
        Resolution::default()
    } else {
        parse_body(&body)?
    };
    let by = r.by.unwrap_or_else(|| "api".into());
    let resolution = r.resolution.unwrap_or_else(|| "resolved".into());
    if by.chars().count() > 64 || resolution.chars().count() > 200 {
        return Err(Error::bad_request(
            "by is at most 64 and resolution at most 200 characters",
        ));
    }
    let done = app
        .store
        .resolve_report(&room.id, &report, &by, &resolution)
        .await?;
    app.store
        .audit(
            &room.id,
            &by,
            "resolve_report",
            Some(&report),
            Some(&resolution),
        )
        .await?;
    Ok(Json(done))
}

#[derive(Serialize)]
struct AuditPage {
    entries: Vec<crate::store::AuditEntry>,
}

async fn audit_log(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AuditPage>> {
    let room = existing_room(&app, id).await?;
    let after = match q.get("after_id") {
        Some(v) => v
            .parse()
            .map_err(|_| Error::bad_request("after_id must be an integer"))?,
        None => 0,
    };
    let entries = app.store.audit_log(&room.id, after).await?;
    Ok(Json(AuditPage { entries }))
}

// -- calls -------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Calls {
    calls: Vec<crate::store::CallLogEntry>,
}

async fn list_calls(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Calls>> {
    let user = q
        .get("user")
        .cloned()
        .ok_or_else(|| Error::bad_request("user is required"))?;
    let user = user_id(user)?;
    let calls = app.store.calls_of(&user).await?;
    Ok(Json(Calls { calls }))
}

// -- engagement and room health ---------------------------------------------------------------

fn query_i64(q: &HashMap<String, String>, k: &str) -> Result<Option<i64>> {
    q.get(k)
        .map(|v| {
            v.parse()
                .map_err(|_| Error::bad_request(format!("{k} must be an integer")))
        })
        .transpose()
}

async fn leaderboard(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::protocol::LeaderboardOk>> {
    let room = existing_room(&app, id).await?;
    let limit = query_i64(&q, "limit")?
        .map(|l| u32::try_from(l).map_err(|_| Error::bad_request("limit must be 1..=100")))
        .transpose()?;
    let v = crate::rooms::engagement::leaderboard_of(
        &app,
        &room,
        q.get("period").map(String::as_str),
        limit,
    )
    .await?;
    Ok(Json(v))
}

async fn room_stats(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::protocol::StatsOk>> {
    let room = existing_room(&app, id).await?;
    let v = crate::rooms::engagement::stats_of(
        &app,
        &room,
        query_i64(&q, "from")?,
        query_i64(&q, "to")?,
        q.get("bucket").map(String::as_str),
    )
    .await?;
    Ok(Json(v))
}

// -- webhooks --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewWebhook {
    url: String,
    events: Vec<String>,
}

/// An endpoint with its secret, as creation answers it.
#[derive(Serialize)]
struct CreatedWebhook {
    #[serde(flatten)]
    webhook: crate::store::Webhook,
    secret: String,
}

/// A new secret, as rotation answers it.
#[derive(Serialize)]
struct RotatedSecret {
    id: String,
    secret: String,
    /// Until when (ms) the previous secret still signs, beside the new one.
    previous_secret_expires_at: i64,
}

#[derive(Serialize)]
struct WebhookList {
    webhooks: Vec<crate::store::Webhook>,
}

#[derive(Serialize)]
struct DeliveryList {
    deliveries: Vec<crate::store::Delivery>,
}

/// Webhook ids: `wh_` and hex, as this server makes them.
fn webhook_id(id: &str) -> Result<&str> {
    let ok = id.len() <= 64
        && id
            .strip_prefix("wh_")
            .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(id)
    } else {
        Err(Error::NotFound(format!("webhook {id} not found")))
    }
}

async fn create_webhook(State(app): State<Arc<App>>, body: Bytes) -> Result<Response> {
    let new: NewWebhook = parse_body(&body)?;
    if new.events.is_empty() {
        return Err(Error::bad_request(
            "events must name at least one event type",
        ));
    }
    let mut events = Vec::with_capacity(new.events.len());
    for name in &new.events {
        let t = crate::store::EventType::parse(name).ok_or_else(|| {
            let known: Vec<&str> = crate::store::EventType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect();
            Error::bad_request(format!(
                "unknown event type {name:?}; the types are {}",
                known.join(", ")
            ))
        })?;
        if !events.contains(&t) {
            events.push(t);
        }
    }
    crate::webhooks::resolve(&new.url, app.config.webhook_allow_private)
        .await
        .map_err(|e| Error::bad_request(e.to_string()))?;
    let max = app.config.webhook_max_endpoints;
    if usize::try_from(app.store.webhook_count().await?).unwrap_or(usize::MAX) >= max {
        return Err(Error::Conflict(format!(
            "at most {max} webhook endpoints (webhook_max_endpoints)"
        )));
    }
    let id = format!("wh_{:016x}", rand::random::<u64>());
    let secret = crate::webhooks::new_secret();
    let webhook = app
        .store
        .create_webhook(&id, &new.url, &events, &secret)
        .await?;
    tracing::info!(webhook = %id, url = %new.url, "webhook endpoint created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook { webhook, secret }),
    )
        .into_response())
}

async fn list_webhooks(State(app): State<Arc<App>>) -> Result<Json<WebhookList>> {
    Ok(Json(WebhookList {
        webhooks: app.store.webhooks().await?,
    }))
}

async fn get_webhook(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<crate::store::Webhook>> {
    let id = webhook_id(&id)?;
    app.store
        .webhook(id)
        .await?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("webhook {id} not found")))
}

async fn delete_webhook(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<StatusCode> {
    let id = webhook_id(&id)?;
    if app.store.delete_webhook(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("webhook {id} not found")))
    }
}

async fn rotate_webhook(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<RotatedSecret>> {
    let id = webhook_id(&id)?;
    let secret = crate::webhooks::new_secret();
    let grace_ms =
        i64::try_from(app.config.webhook_secret_grace_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let until = now_ms().saturating_add(grace_ms);
    if !app.store.rotate_webhook_secret(id, &secret, until).await? {
        return Err(Error::NotFound(format!("webhook {id} not found")));
    }
    Ok(Json(RotatedSecret {
        id: id.to_owned(),
        secret,
        previous_secret_expires_at: until,
    }))
}

async fn list_deliveries(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryList>> {
    let id = webhook_id(&id)?;
    if app.store.webhook(id).await?.is_none() {
        return Err(Error::NotFound(format!("webhook {id} not found")));
    }
    Ok(Json(DeliveryList {
        deliveries: app
            .store
            .webhook_deliveries(id, app.config.webhook_log_page)
            .await?,
    }))
}

async fn replay_delivery(
    State(app): State<Arc<App>>,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Response> {
    let id = webhook_id(&id)?;
    let missing = || Error::NotFound(format!("delivery {delivery} of webhook {id} not found"));
    let n: i64 = delivery.parse().map_err(|_| missing())?;
    let new = app
        .store
        .replay_delivery(id, n)
        .await?
        .ok_or_else(missing)?;
    let listed = app
        .store
        .webhook_deliveries(id, app.config.webhook_log_page)
        .await?
        .into_iter()
        .find(|d| d.id == new)
        .ok_or_else(missing)?;
    Ok((StatusCode::ACCEPTED, Json(listed)).into_response())
}

/// `GET /api/rooms/{id}/summary`: attendance, questions, polls and time on stage.
async fn class_summary(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<crate::protocol::ClassSummary>> {
    let room = existing_room(&app, id).await?;
    let summary = app
        .store
        .class_summary(&room.id, now_ms(), app.config.poll_word_cloud_top)
        .await?;
    Ok(Json(summary))
}

/// `GET /api/rooms/{id}/quiz-leaderboard?limit=`: the room's ranking over its closed quizzes.
async fn quiz_leaderboard(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::protocol::QuizLeaderboardOk>> {
    let room = existing_room(&app, id).await?;
    let limit = query_i64(&q, "limit")?
        .map(|l| u32::try_from(l).map_err(|_| Error::bad_request("limit must be 1..=100")))
        .transpose()?;
    let v = crate::rooms::polls::quiz_leaderboard_of(&app, &room.id, limit).await?;
    Ok(Json(v))
}

/// `GET /api/rooms/{id}/polls/{poll}/results`: the poll as host/ta see it with every answer,
/// as JSON, or as CSV (`?format=csv` or `Accept: text/csv`), one row per answer.
async fn poll_results(
    State(app): State<Arc<App>>,
    Path((id, poll)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response> {
    let room = existing_room(&app, id).await?;
    let csv = match q.get("format").map(String::as_str) {
        Some("csv") => true,
        Some("json") => false,
        Some(_) => return Err(Error::bad_request("format must be json or csv")),
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv")),
    };
    if poll.is_empty() || poll.len() > 64 {
        return Err(Error::NotFound(format!("poll {poll} not found")));
    }
    let (view, answers) = app
        .store
        .poll_export(&room.id, &poll, app.config.poll_word_cloud_top)
        .await?;
    if !csv {
        return Ok(Json(crate::protocol::PollExport {
            poll: view,
            answers,
        })
        .into_response());
    }
    let mut out = String::from("user_id,name,choices,text,ts,correct,response_ms\r\n");
    for a in &answers {
        let choices: Vec<&str> = a
            .choices
            .iter()
            .filter_map(|&c| view.options.get(c as usize).map(String::as_str))
            .collect();
        let cells = [
            csv_text(a.user.id.as_str()),
            csv_text(&a.user.name),
            csv_text(&choices.join("; ")),
            csv_text(a.text.as_deref().unwrap_or("")),
            a.ts.to_string(),
            a.correct.map(|c| c.to_string()).unwrap_or_default(),
            a.response_ms.map(|r| r.to_string()).unwrap_or_default(),
        ];
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    let disposition = format!("attachment; filename=\"poll-{}.csv\"", csv_filename(&poll));
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        out,
    )
        .into_response())
}

/// A CSV cell of user text (RFC 4180): quoted when it holds a comma, quote or line break,
/// quotes doubled; a cell a spreadsheet would read as a formula (starting with `=`, `+`, `-`,
/// `@`, a tab or a carriage return) gets a leading `'` so it stays text.
fn csv_text(text: &str) -> String {
    let mut cell = String::with_capacity(text.len() + 3);
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        cell.push('\'');
    }
    cell.push_str(text);
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell
    }
}

/// A poll id as a file name: anything but `[A-Za-z0-9_-]` becomes `_`.
fn csv_filename(poll: &str) -> String {
    poll.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod csv_tests {
    use super::csv_text;

    #[test]
    fn cells_are_quoted_and_formulas_defused() {
        assert_eq!(csv_text("plain"), "plain");
        assert_eq!(csv_text("a,b"), "\"a,b\"");
        assert_eq!(csv_text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_text("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_text("=1+2"), "'=1+2");
        assert_eq!(csv_text("+1"), "'+1");
        assert_eq!(csv_text("-1"), "'-1");
        assert_eq!(csv_text("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(
            csv_text("=HYPERLINK(\"x\",\"y\")"),
            "\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\""
        );
        assert_eq!(csv_text(""), "");
    }
}
