//! Client identity: HS256 JWTs with the algorithm pinned, `exp`/`iat` required and checked
//! with a small leeway, and the `rooms` claim turned into room-role grants. Also mints tokens
//! for `studyhall token` and the dev sign-in endpoint. It never logs a token and knows nothing
//! of rooms beyond the grant map.

use crate::protocol::{PlatformRole, RoomId, RoomRole, UserId, UserRef};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clock skew tolerated on `exp`, `iat` and `nbf`.
pub const LEEWAY_S: u64 = 30;
/// Longest display name accepted from a token, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest token lifetime `studyhall token` and `/dev/token` sign: one year.
pub const MAX_TTL_S: u64 = 365 * 86_400;
/// The sender id of HTTP API announcements; no token may use it.
pub const SYSTEM_USER: &str = "studyhall";
/// Most room grants one token may carry.
pub const MAX_ROOM_GRANTS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_role")]
    pub role: PlatformRole,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub rooms: HashMap<String, RoomRole>,
    /// IANA time zone of the user (engagement: local days for check-ins and caps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
}

fn default_role() -> PlatformRole {
    PlatformRole::Student
}

/// A verified identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub name: String,
    pub role: PlatformRole,
    /// Room roles granted by the token itself.
    pub grants: HashMap<RoomId, RoomRole>,
    /// The token's `tz` claim when it names a known IANA zone (an unknown one is ignored).
    pub tz: Option<String>,
    /// When the token expires (Unix seconds); the session ends [`LEEWAY_S`] later unless a
    /// `refresh` brings a new token.
    pub exp: u64,
}

impl Identity {
    /// The user as shown in `welcome` (platform role).
    pub fn platform_ref(&self) -> UserRef {
        UserRef {
            id: self.user.clone(),
            name: self.name.clone(),
            role: self.role.into(),
        }
    }

    /// The user as shown in a room's events (room role).
    pub fn room_ref(&self, role: RoomRole) -> UserRef {
        UserRef {
            id: self.user.clone(),
            name: self.name.clone(),
            role: role.into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("token issued in the future")]
    FromTheFuture,
    #[error("invalid claim: {0}")]
    BadClaim(&'static str),
    #[error("cannot sign token")]
    Sign,
}

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(<secret>)")
    }
}

/// Whether `sub` names the system user, however it is spelled in case or padded.
pub fn is_reserved(sub: &str) -> bool {
    sub.trim().eq_ignore_ascii_case(SYSTEM_USER)
}

/// A user id is shown and logged as it is: no control characters (a newline would forge a log
/// line), nothing invisible or reordering, no padding, and not the system user's id.
fn check_sub(sub: &str) -> Result<(), AuthError> {
    if sub
        .chars()
        .any(|c| c.is_control() || crate::protocol::is_invisible(c))
    {
        return Err(AuthError::BadClaim(
            "sub must not contain control, invisible or bidi characters",
        ));
    }
    if sub.trim() != sub {
        return Err(AuthError::BadClaim("sub must not start or end with spaces"));
    }
    if is_reserved(sub) {
        return Err(AuthError::BadClaim("sub is reserved"));
    }
    Ok(())
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Self {
        // Pinned: a token whose header names any other algorithm (including "none") is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_S;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        // Platforms may put an audience in their tokens; studyhall is not configured with one.
        validation.validate_aud = false;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        let c = data.claims;
        if c.iat > now_s() + LEEWAY_S {
            return Err(AuthError::FromTheFuture);
        }
        if c.exp > now_s().saturating_add(MAX_TTL_S + LEEWAY_S) {
            return Err(AuthError::BadClaim(
                "exp is further away than the longest token lifetime",
            ));
        }
        if c.sub.is_empty() || c.sub.chars().count() > 64 {
            return Err(AuthError::BadClaim("sub must be 1..=64 characters"));
        }
        check_sub(&c.sub)?;
        let name = c.name.unwrap_or_else(|| c.sub.clone());
        if name.chars().count() > MAX_NAME_CHARS || crate::protocol::is_blank(&name) {
            return Err(AuthError::BadClaim("name must be 1..=100 characters"));
        }
        if name
            .chars()
            .any(|ch| ch.is_control() || crate::protocol::is_bidi_control(ch))
        {
            return Err(AuthError::BadClaim(
                "name must not contain control or bidi override characters",
            ));
        }
        if c.rooms.len() > MAX_ROOM_GRANTS {
            return Err(AuthError::BadClaim("too many room grants"));
        }
        let mut grants = HashMap::with_capacity(c.rooms.len());
        for (room, role) in c.rooms {
            if !crate::protocol::valid_room_id(&room) {
                return Err(AuthError::BadClaim("rooms has an invalid room id"));
            }
            grants.insert(RoomId(room), role);
        }
        // An unknown zone does not make the token invalid: the user's days fall back to the
        // room's zone.
        let tz = c.tz.filter(|z| crate::engagement::zone(z).is_some());
        Ok(Identity {
            user: UserId(c.sub),
            name,
            role: c.role,
            grants,
            tz,
            exp: c.exp,
        })
    }

    /// Signs exactly these claims (tests and platforms that add `tz`).
    pub fn sign_claims(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|_| AuthError::Sign)
    }

    pub fn sign(
        &self,
        user: &str,
        name: &str,
        role: PlatformRole,
        rooms: HashMap<String, RoomRole>,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let iat = now_s();
        let claims = Claims {
            sub: user.to_owned(),
            name: Some(name.to_owned()),
            role,
            exp: iat.saturating_add(ttl.as_secs()),
            iat,
            nbf: None,
            rooms,
            tz: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| AuthError::Sign)
    }
}

/// Parses a TTL such as `90`, `45s`, `30m`, `1h` or `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad ttl {s:?}: expected e.g. 30m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(format!("bad ttl unit in {s:?}: use s, m, h or d")),
    };
    let secs = secs
        .filter(|s| (1..=MAX_TTL_S).contains(s))
        .ok_or_else(|| format!("ttl must be 1s..={}d", MAX_TTL_S / 86_400))?;
    Ok(Duration::from_secs(secs))
}

/// The syntax [`parse_room_grants`] takes, as its errors name it.
pub const ROOM_GRANTS_SYNTAX: &str = "room:role or room=role, comma-separated, role one of host, \
     ta, member or viewer (member when left out), e.g. lobby:host,algebra=ta,physics";

/// Parses room grants, `room:role,room2=role2`: each entry is a room id, optionally followed by
/// `:` or `=` and a room role (`member` when left out). Blank entries are skipped. An error
/// names the entry and the expected syntax.
pub fn parse_room_grants(s: &str) -> Result<HashMap<String, RoomRole>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: &str| {
            format!("invalid room grant {part:?}: {why}; expected {ROOM_GRANTS_SYNTAX}")
        };
        let (room, role) = match part.split_once([':', '=']) {
            Some((room, role)) => (room.trim(), role.trim()),
            None => (part, "member"),
        };
        if !crate::protocol::valid_room_id(room) {
            return Err(bad("room ids are 1..=64 characters of A-Z a-z 0-9 _ . -"));
        }
        let role = RoomRole::parse(role).ok_or_else(|| bad(&format!("unknown role {role:?}")))?;
        out.insert(room.to_owned(), role);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(secret: &[u8], alg: Algorithm, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_grants() {
        let t = Tokens::new(b"0123456789abcdef0123");
        let rooms = parse_room_grants("algebra=host,physics").unwrap();
        let tok = t
            .sign(
                "u1",
                "Ada",
                PlatformRole::Tutor,
                rooms,
                Duration::from_secs(60),
            )
            .unwrap();
        let id = t.verify(&tok).unwrap();
        assert_eq!(id.user.as_str(), "u1");
        assert_eq!(id.role, PlatformRole::Tutor);
        assert_eq!(id.grants[&RoomId::from("algebra")], RoomRole::Host);
        assert_eq!(id.grants[&RoomId::from("physics")], RoomRole::Member);
    }

    #[test]
    fn refuses_wrong_secret_alg_expiry_and_future() {
        let secret = b"0123456789abcdef0123";
        let t = Tokens::new(secret);
        let now = now_s();
        let good =
            serde_json::json!({"sub":"u","name":"U","role":"student","exp":now+60,"iat":now});
        assert!(
            t.verify(&raw(secret, Algorithm::HS256, good.clone()))
                .is_ok()
        );
        assert_eq!(
            t.verify(&raw(
                b"another-secret-of-20",
                Algorithm::HS256,
                good.clone()
            ))
            .unwrap_err(),
            AuthError::Invalid
        );
        assert!(
            t.verify(&raw(secret, Algorithm::HS384, good)).is_err(),
            "alg is pinned"
        );
        let expired = serde_json::json!({"sub":"u","exp":now-120,"iat":now-200});
        assert_eq!(
            t.verify(&raw(secret, Algorithm::HS256, expired))
                .unwrap_err(),
            AuthError::Expired
        );
        let future = serde_json::json!({"sub":"u","exp":now+600,"iat":now+300});
        assert_eq!(
            t.verify(&raw(secret, Algorithm::HS256, future))
                .unwrap_err(),
            AuthError::FromTheFuture
        );
        let no_exp = serde_json::json!({"sub":"u","iat":now});
        assert!(t.verify(&raw(secret, Algorithm::HS256, no_exp)).is_err());
        let no_iat = serde_json::json!({"sub":"u","exp":now+60});
        assert!(t.verify(&raw(secret, Algorithm::HS256, no_iat)).is_err());
        let bad_room = serde_json::json!({"sub":"u","exp":now+60,"iat":now,"rooms":{"a b":"host"}});
        assert!(t.verify(&raw(secret, Algorithm::HS256, bad_room)).is_err());
        assert!(t.verify("not.a.token").is_err());
    }

    #[test]
    fn ttl_and_grant_parsing() {
        assert_eq!(parse_ttl("90").unwrap().as_secs(), 90);
        assert_eq!(parse_ttl("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_ttl("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_ttl("7d").unwrap().as_secs(), 604_800);
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("0").is_err());
        assert!(
            parse_ttl("99999999999999999d").is_err(),
            "overflow is an error"
        );
        assert!(parse_ttl("366d").is_err());
        assert!(parse_room_grants("a=boss").is_err());
        assert!(parse_room_grants("bad id=host").is_err());
    }

    #[test]
    fn room_grants_take_either_separator_and_name_the_syntax_when_malformed() {
        let grants = parse_room_grants("lobby:host, algebra=ta ,physics,, chem : viewer").unwrap();
        assert_eq!(grants.len(), 4);
        assert_eq!(grants["lobby"], RoomRole::Host);
        assert_eq!(grants["algebra"], RoomRole::Ta);
        assert_eq!(grants["physics"], RoomRole::Member);
        assert_eq!(grants["chem"], RoomRole::Viewer);
        assert!(parse_room_grants("").unwrap().is_empty());
        for bad in [
            "lobby:host:ta",
            "lobby=host=ta",
            "lobby:",
            ":host",
            "lobby:boss",
            "a b:host",
        ] {
            let err = parse_room_grants(bad).unwrap_err();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("room:role or room=role"),
                "{bad}: {err}"
            );
        }
    }
}

/// Property tests of token verification: arbitrary strings and tampered tokens are refused
/// without a panic, valid ones keep their claims. Budget and longer runs: see `crate::fuzz`.
#[cfg(test)]
mod props {
    use super::*;
    use crate::fuzz::{check, junk, pick};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use rand::Rng;
    use rand::rngs::StdRng;
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"props-secret-0123456789";

    fn b64(v: &Value) -> String {
        B64.encode(v.to_string())
    }

    fn room_id(rng: &mut StdRng) -> String {
        (0..rng.random_range(1..=20))
            .map(|_| *pick(rng, b"abz09_.-") as char)
            .collect()
    }

    fn valid_claims(rng: &mut StdRng) -> Claims {
        let now = now_s();
        // Shown text only: no control or invisible characters (those are refused), no padding.
        let shown = |t: String| -> String {
            t.chars()
                .filter(|c| !c.is_control() && !crate::protocol::is_invisible(*c))
                .collect::<String>()
                .trim()
                .to_owned()
        };
        let mut sub = shown(format!("u{}", junk(rng, 40)));
        sub = sub.chars().take(64).collect::<String>().trim().to_owned();
        if is_reserved(&sub) {
            sub.push('x');
        }
        let rooms = (0..rng.random_range(0..4))
            .map(|_| {
                let role = *pick(
                    rng,
                    &[
                        RoomRole::Viewer,
                        RoomRole::Member,
                        RoomRole::Ta,
                        RoomRole::Host,
                    ],
                );
                (room_id(rng), role)
            })
            .collect();
        Claims {
            sub,
            name: rng.random_bool(0.7).then(|| {
                shown(format!("N{}", junk(rng, 60)))
                    .chars()
                    .take(100)
                    .collect()
            }),
            role: *pick(
                rng,
                &[
                    PlatformRole::Student,
                    PlatformRole::Tutor,
                    PlatformRole::Admin,
                ],
            ),
            exp: now + rng.random_range(1..MAX_TTL_S),
            iat: now - rng.random_range(0..100_000),
            nbf: None,
            rooms,
            tz: None,
        }
    }

    #[test]
    fn arbitrary_strings_are_refused_without_panicking() {
        let tokens = Tokens::new(SECRET);
        check("jwt arbitrary", 3_000, |rng| {
            let t = match rng.random_range(0..4) {
                0 => junk(rng, 200),
                1 => (0..rng.random_range(0..5))
                    .map(|_| {
                        let bytes: Vec<u8> =
                            (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                        B64.encode(bytes)
                    })
                    .collect::<Vec<_>>()
                    .join("."),
                _ => {
                    let alg = *pick(rng, &["HS256", "none", "RS256", "HS512", "", "hs256"]);
                    let header = json!({"alg": alg, "typ": "JWT"});
                    let payload =
                        json!({"sub": junk(rng, 10), "exp": rng.random::<u32>(), "iat": 0});
                    let sig: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                    format!("{}.{}.{}", b64(&header), b64(&payload), B64.encode(sig))
                }
            };
            assert!(tokens.verify(&t).is_err(), "accepted {t:?}");
        });
    }

    #[test]
    fn valid_tokens_verify_with_their_claims() {
        let tokens = Tokens::new(SECRET);
        check("jwt valid", 1_000, |rng| {
            let c = valid_claims(rng);
            let t = tokens.sign_claims(&c).unwrap();
            let id = tokens.verify(&t).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            assert_eq!(id.user.as_str(), c.sub);
            assert_eq!(id.name, c.name.clone().unwrap_or(c.sub.clone()));
            assert_eq!(id.role, c.role);
            assert_eq!(id.exp, c.exp);
            assert_eq!(id.grants.len(), c.rooms.len());
            for (room, role) in &c.rooms {
                assert_eq!(id.grants.get(room.as_str()), Some(role));
            }
        });
    }

    #[test]
    fn tampered_tokens_are_never_accepted() {
        let tokens = Tokens::new(SECRET);
        check("jwt tampered", 2_000, |rng| {
            let c = valid_claims(rng);
            let good = tokens.sign_claims(&c).unwrap();
            let parts: Vec<&str> = good.split('.').collect();
            let (header, payload, sig) = (parts[0], parts[1], parts[2]);
            let bad = match rng.random_range(0..6) {
                // One character changed anywhere.
                0 => {
                    let mut chars: Vec<char> = good.chars().collect();
                    let at = rng.random_range(0..chars.len());
                    let new = *pick(rng, &['A', 'B', 'z', '0', '-', '_', '.', '=', '+', ' ']);
                    if chars[at] == new {
                        return;
                    }
                    chars[at] = new;
                    let bad: String = chars.into_iter().collect();
                    if let Ok(id) = tokens.verify(&bad) {
                        // Only a different spelling of the same signature bytes may pass.
                        let b: Vec<&str> = bad.split('.').collect();
                        assert_eq!((b[0], b[1]), (header, payload), "claims changed: {bad}");
                        assert_eq!(B64.decode(b[2]).ok(), B64.decode(sig).ok(), "{bad}");
                        assert_eq!(id.user.as_str(), c.sub);
                    }
                    return;
                }
                // A claim changed, the old signature kept.
                1 => {
                    let mut v: Value =
                        serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
                    match rng.random_range(0..5) {
                        0 => v["sub"] = json!(format!("{}x", c.sub)),
                        1 => v["role"] = json!("admin"),
                        2 => v["rooms"] = json!({"any-room": "host"}),
                        3 => v["exp"] = json!(c.exp + 1),
                        _ => v["name"] = json!("Mallory"),
                    }
                    if B64.encode(v.to_string()) == payload {
                        return;
                    }
                    format!("{header}.{}.{sig}", b64(&v))
                }
                // Another algorithm named in the header, with the old signature or none.
                2 => {
                    let alg = *pick(rng, &["none", "None", "HS384", "HS512", "RS256", "ES256"]);
                    let h = json!({"alg": alg, "typ": "JWT"});
                    let s = if rng.random_bool(0.5) { sig } else { "" };
                    format!("{}.{payload}.{s}", b64(&h))
                }
                // Properly signed with the same secret but another HMAC algorithm.
                3 => {
                    let alg = *pick(rng, &[Algorithm::HS384, Algorithm::HS512]);
                    jsonwebtoken::encode(&Header::new(alg), &c, &EncodingKey::from_secret(SECRET))
                        .unwrap()
                }
                // Signed with another secret.
                4 => Tokens::new(b"another-secret-0123456789")
                    .sign_claims(&c)
                    .unwrap(),
                // Signature dropped or truncated.
                _ => format!(
                    "{header}.{payload}.{}",
                    &sig[..rng.random_range(0..sig.len())]
                ),
            };
            assert!(tokens.verify(&bad).is_err(), "accepted tampered {bad}");
        });
    }
}
