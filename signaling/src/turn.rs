//! ICE servers handed to clients: configured STUN URLs, and TURN URLs with time-limited
//! credentials in the TURN REST API scheme (coturn's `use-auth-secret`): username
//! `EXPIRY:USER` (EXPIRY in Unix seconds), credential base64(HMAC-SHA1(secret, username)).

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;

/// One entry of `RTCConfiguration.iceServers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Where clients find STUN/TURN.
#[derive(Clone, Debug, Default)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    /// The TURN server's `static-auth-secret`; without it no TURN entry is handed out.
    pub turn_secret: Option<String>,
    /// Credential lifetime in seconds.
    pub turn_ttl_s: u64,
}

/// The TURN REST credential for `user` valid until `expiry` (Unix seconds).
pub fn turn_credential(secret: &str, user: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{user}");
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    let credential = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, credential)
}

impl IceConfig {
    /// The ICE servers for `user` at `now_s` (Unix seconds).
    pub fn servers_for(&self, user: &str, now_s: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn_urls.is_empty(), &self.turn_secret) {
            let (username, credential) = turn_credential(secret, user, now_s + self.turn_ttl_s);
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_matches_the_rest_scheme() {
        // Reference value computed independently (Python hmac/hashlib/base64).
        let (u, c) = turn_credential("secret", "alice", 1_700_000_000);
        assert_eq!(u, "1700000000:alice");
        assert_eq!(c, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn servers_include_turn_only_with_a_secret() {
        let mut cfg = IceConfig {
            stun_urls: vec!["stun:stun.example:3478".into()],
            turn_urls: vec!["turn:turn.example:3478".into()],
            turn_secret: None,
            turn_ttl_s: 600,
        };
        assert_eq!(cfg.servers_for("u", 100).len(), 1);
        cfg.turn_secret = Some("s".into());
        let servers = cfg.servers_for("u", 100);
        assert_eq!(servers[1].username.as_deref(), Some("700:u"));
        let json = serde_json::to_value(&servers[0]).unwrap();
        assert!(json.get("username").is_none());
    }
}
