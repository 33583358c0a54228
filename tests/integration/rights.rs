//! Rights that follow a live session: `refresh` with a new token, the close at `exp` (plus the
//! leeway) without one, and role changes, removals and bans made through the API applying to
//! sessions already in the room.

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use studyhall::auth::{LEEWAY_S, now_s};
use tokio_tungstenite::tungstenite::Message;

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token for `sub` that expires `exp_in` seconds from now (negative: already past `exp`,
/// still inside the leeway).
fn token_expiring(sub: &str, exp_in: i64, rooms: Value) -> String {
    let now = now_s() as i64;
    signed(json!({"sub": sub, "exp": now + exp_in, "iat": now - 60, "rooms": rooms}))
}

#[tokio::test]
async fn a_session_is_closed_4001_when_its_token_runs_out_and_a_refresh_keeps_it_open() {
    let s = Server::sqlite(|_| {}).await;
    let leeway = LEEWAY_S as i64;

    // Ends a second from now: an `unauthorized` error, then close 4001.
    let mut short = Client::connect(s.addr, &token_expiring("ana", 1 - leeway, json!({}))).await;
    let err = within("expiry error", async {
        loop {
            let f = short.next().await;
            if f["type"] == "error" {
                return f;
            }
        }
    })
    .await;
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(close_code(&mut short.ws).await, Some(4001));

    // Would end two seconds from now; refreshed at once, it outlives that.
    let mut kept = Client::connect(s.addr, &token_expiring("ben", 2 - leeway, json!({}))).await;
    let fresh = token_expiring("ben", 3600, json!({}));
    let ok = kept.ok(json!({"type": "refresh", "token": fresh})).await;
    let exp = ok["exp"].as_u64().expect("exp");
    assert!(exp >= now_s() + 3500, "{ok}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    kept.ok(json!({"type": "rooms"})).await;
    s.stop().await;
}

#[tokio::test]
async fn refresh_refuses_another_user_and_a_bad_token_and_the_session_stays() {
    let s = Server::sqlite(|_| {}).await;
    let mut c = s.client("ana").await;
    let other = token_expiring("ben", 3600, json!({}));
    assert_eq!(
        c.err(json!({"type": "refresh", "token": other})).await,
        "forbidden"
    );
    assert_eq!(
        c.err(json!({"type": "refresh", "token": "not-a-jwt"}))
            .await,
        "unauthorized"
    );
    let expired = signed(json!({"sub": "ana", "exp": now_s() - 3600, "iat": now_s() - 7200}));
    assert_eq!(
        c.err(json!({"type": "refresh", "token": expired})).await,
        "unauthorized"
    );
    c.ok(json!({"type": "rooms"})).await;
    s.stop().await;
}

#[tokio::test]
async fn a_refresh_without_the_grant_leaves_the_invite_only_room() {
    let s = Server::sqlite(|_| {}).await;
    s.room("seminar", "invite").await;
    let mut c = Client::connect(
        s.addr,
        &token_expiring("ana", 3600, json!({"seminar": "member"})),
    )
    .await;
    c.join("seminar").await;
    c.ok(json!({"type": "send", "room": "seminar", "text": "hi", "client_msg_id": "m1"}))
        .await;
    let fresh = token_expiring("ana", 3600, json!({}));
    c.ok(json!({"type": "refresh", "token": fresh})).await;
    assert_eq!(
        c.err(
            json!({"type": "send", "room": "seminar", "text": "still here?", "client_msg_id": "m2"})
        )
        .await,
        "not_member"
    );
    assert_eq!(
        c.err(json!({"type": "join", "room": "seminar"})).await,
        "forbidden"
    );
    s.stop().await;
}

#[tokio::test]
async fn api_role_changes_apply_to_sessions_already_in_the_room() {
    let s = Server::sqlite(|_| {}).await;
    s.room("algebra", "open").await;
    let put = |user: &'static str, role: &'static str| {
        let addr = s.addr;
        async move {
            let (status, _) = http(
                addr,
                "PUT",
                &format!("/api/rooms/algebra/members/{user}"),
                Some(API_KEY),
                Some(json!({"role": role})),
            )
            .await;
            assert_eq!(status, 200);
        }
    };
    put("tess", "host").await;
    let mut tess = s.client("tess").await;
    tess.join("algebra").await;
    let mut sam = s.client("sam").await;
    sam.join("algebra").await;
    let mut uma = s.client("uma").await;
    uma.join("algebra").await;

    // Demoted while in the room: the next moderation is refused.
    put("tess", "member").await;
    assert_eq!(
        tess.err(json!({"type": "mute", "room": "algebra", "user": "sam", "seconds": 60}))
            .await,
        "forbidden"
    );
    // Promoted while in the room: allowed without joining again.
    put("sam", "ta").await;
    sam.ok(json!({"type": "mute", "room": "algebra", "user": "uma", "seconds": 60}))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn a_ban_through_moderation_or_a_removal_through_the_api_reaches_live_sessions() {
    let s = Server::sqlite(|_| {}).await;
    s.room("club", "invite").await;
    for (u, role) in [("hana", "host"), ("ivo", "member")] {
        let (status, _) = http(
            s.addr,
            "PUT",
            &format!("/api/rooms/club/members/{u}"),
            Some(API_KEY),
            Some(json!({"role": role})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut ivo = s.client("ivo").await;
    ivo.join("club").await;
    let (status, _) = http(
        s.addr,
        "DELETE",
        "/api/rooms/club/members/ivo",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(close_code(&mut ivo.ws).await, Some(4003));
    s.stop().await;
}

#[tokio::test]
async fn a_token_whose_exp_is_beyond_the_longest_lifetime_is_refused() {
    let s = Server::sqlite(|_| {}).await;
    let mut ws = raw_ws(s.addr).await;
    let t = signed(json!({"sub": "ana", "exp": i64::MAX, "iat": now_s()}));
    use futures_util::SinkExt;
    ws.send(Message::Text(
        json!({"type": "hello", "token": t}).to_string().into(),
    ))
    .await
    .unwrap();
    let first = within("error", ws.next()).await;
    assert!(matches!(first, Some(Ok(Message::Text(_)))));
    assert_eq!(close_code(&mut ws).await, Some(4001));
    s.stop().await;
}

#[tokio::test]
async fn a_host_or_ta_stays_out_of_reach_of_moderation_while_offline() {
    let s = Server::sqlite(|_| {}).await;
    s.room("hall", "open").await;
    let (status, _) = http(
        s.addr,
        "PUT",
        "/api/rooms/hall/members/tess",
        Some(API_KEY),
        Some(json!({"role": "ta"})),
    )
    .await;
    assert_eq!(status, 200);
    // Host by the token's grant only, then gone.
    let mut hana = Client::connect(
        s.addr,
        &token_expiring("hana", 3600, json!({"hall": "host"})),
    )
    .await;
    hana.join("hall").await;
    drop(hana);
    let (room, user) = (
        studyhall::protocol::RoomId("hall".into()),
        studyhall::protocol::UserId("hana".into()),
    );
    within("hana offline", async {
        while s.app.hub.online_role(&room, &user).is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut tess = s.client("tess").await;
    tess.join("hall").await;
    for cmd in [
        json!({"type": "mute", "room": "hall", "user": "hana", "seconds": 60}),
        json!({"type": "kick", "room": "hall", "user": "hana"}),
        json!({"type": "ban", "room": "hall", "user": "hana"}),
    ] {
        assert_eq!(tess.err(cmd).await, "forbidden");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_mute_does_not_bind_a_user_once_they_are_host_or_ta_and_any_moderator_can_lift_it() {
    let s = Server::sqlite(|_| {}).await;
    s.room("hall", "open").await;
    let put = |user: &'static str, role: &'static str| {
        let addr = s.addr;
        async move {
            let (status, _) = http(
                addr,
                "PUT",
                &format!("/api/rooms/hall/members/{user}"),
                Some(API_KEY),
                Some(json!({"role": role})),
            )
            .await;
            assert_eq!(status, 200);
        }
    };
    put("tess", "ta").await;
    let mut tess = s.client("tess").await;
    tess.join("hall").await;
    let mut sam = s.client("sam").await;
    sam.join("hall").await;
    tess.ok(json!({"type": "mute", "room": "hall", "user": "sam", "seconds": 600}))
        .await;
    assert_eq!(
        sam.err(json!({"type": "send", "room": "hall", "text": "hi", "client_msg_id": "a"}))
            .await,
        "muted"
    );
    put("sam", "ta").await;
    sam.ok(json!({"type": "send", "room": "hall", "text": "hi", "client_msg_id": "b"}))
        .await;
    // Lifting it needs no rank over its target.
    sam.ok(json!({"type": "unmute", "room": "hall", "user": "sam"}))
        .await;
    s.stop().await;
}
