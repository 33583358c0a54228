//! Per-room policy as sessions check it on every join and write: the room's settings (Q&A,
//! slow mode, content rules), its stored memberships and bans, active mutes and each user's
//! last message time, and which of the things a join snapshot shows the room has (open polls,
//! a pinned question, an open breakout, boards), cached in memory and loaded from the store on
//! first use, so a join or a send to a room in use costs no database read. Local changes
//! (commands and the HTTP API) update the cache in place; other nodes' changes drop the cached
//! copy. Also the content rules themselves: blocked words and the link policy.

use crate::error::{Error, Result};
use crate::hub::SnapshotMark;
use crate::protocol::{RoomId, RoomRole, UserId};
use crate::store::{LinkPolicy, Room, RoomExtras, RoomRules, Store, now_ms};
use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

/// Rooms whose policy is cached before the cache is emptied and refilled on demand.
const MAX_CACHED_ROOMS: usize = 100_000;

pub struct Policy {
    pub room: Room,
    /// user -> muted until (ms).
    mutes: Mutex<HashMap<UserId, i64>>,
    /// user -> last accepted message (ms) and its `client_msg_id`, for slow mode.
    last_sent: Mutex<HashMap<UserId, (i64, String)>>,
    /// The stored memberships and bans, complete as loaded and kept in step with every change
    /// made through this node (shared with the copy a settings change replaces this with).
    access: Arc<RwLock<Access>>,
    /// What a join snapshot must read beyond this policy (see [`Policies::extras`]), with the
    /// hub's mark of the room when it was read: good until an event changes it (the mark
    /// tells) or a change that is not an event clears it ([`Policies::extras_changed`]).
    extras: Mutex<Option<(RoomExtras, SnapshotMark)>>,
}

/// Who the store lets into a room beyond its visibility.
#[derive(Default)]
struct Access {
    /// user -> stored room role.
    members: HashMap<UserId, RoomRole>,
    banned: HashSet<UserId>,
}

impl Access {
    fn set_banned(&mut self, user: &UserId, banned: bool) {
        if banned {
            self.banned.insert(user.clone());
        } else {
            self.banned.remove(user);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain maps; the data
    // is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl Policy {
    /// The user's stored membership role in the room, if any.
    pub fn stored_role(&self, user: &UserId) -> Option<RoomRole> {
        read(&self.access).members.get(user).copied()
    }

    pub fn is_banned(&self, user: &UserId) -> bool {
        read(&self.access).banned.contains(user)
    }

    pub fn qa_enabled(&self) -> bool {
        self.room.qa.enabled || self.room.kind == crate::protocol::RoomKind::Live
    }

    /// Refuses a write from a muted user. Host and ta are never muted: a mute recorded while
    /// they were not known as such (offline, say) does not bind them.
    pub fn check_muted(&self, user: &UserId, role: RoomRole) -> Result<()> {
        if role.can_moderate() {
            return Ok(());
        }
        let now = now_ms();
        if let Some(until) = lock(&self.mutes).get(user).copied()
            && until > now
        {
            return Err(Error::Muted(format!(
                "you are muted in this room for {} more seconds",
                (until - now + 999) / 1000
            )));
        }
        Ok(())
    }

    /// The room's content rules: blocked words for everyone, links for members and viewers.
    pub fn check_text(&self, text: &str, role: RoomRole) -> Result<()> {
        check_rules(&self.room.rules, text, role.can_moderate())
    }

    /// What every posted text (message, edit, question, answer) must pass: the author is not
    /// muted and the text keeps the room's content rules.
    pub fn check_post(&self, user: &UserId, role: RoomRole, text: &str) -> Result<()> {
        self.check_muted(user, role)?;
        self.check_text(text, role)
    }

    /// Slow mode for members (host/ta are exempt); records the accepted message time. A
    /// resend of the last accepted `client_msg_id` passes, so its idempotent `ok` comes back.
    pub fn check_slow_mode(
        &self,
        user: &UserId,
        role: RoomRole,
        client_msg_id: &str,
    ) -> Result<()> {
        let slow = self.room.slow_mode_s;
        if slow <= 0 || role.can_moderate() {
            return Ok(());
        }
        let now = now_ms();
        let mut last = lock(&self.last_sent);
        if let Some((prev, cid)) = last.get(user) {
            if cid == client_msg_id {
                return Ok(());
            }
            let next = prev + slow * 1000;
            if now < next {
                return Err(Error::RateLimited(format!(
                    "slow mode: one message every {slow} s; wait {} s (room rule: slow_mode)",
                    (next - now + 999) / 1000
                )));
            }
        }
        last.insert(user.clone(), (now, client_msg_id.to_owned()));
        Ok(())
    }
}

/// Checks `text` against `rules`; `trusted` (host/ta) may post links.
pub fn check_rules(rules: &RoomRules, text: &str, trusted: bool) -> Result<()> {
    let lower = text.to_lowercase();
    for word in &rules.blocked_words {
        let w = word.trim().to_lowercase();
        if !w.is_empty() && contains_word(&lower, &w) {
            return Err(Error::Forbidden(
                "the text contains a blocked word (room rule: blocked_words)".into(),
            ));
        }
    }
    if trusted {
        return Ok(());
    }
    match &rules.links {
        LinkPolicy::Allow => Ok(()),
        LinkPolicy::Deny => match links(&lower).next() {
            Some(_) => Err(Error::Forbidden(
                "links are not allowed in this room (room rule: links)".into(),
            )),
            None => Ok(()),
        },
        LinkPolicy::Domains { domains } => {
            for host in links(&lower) {
                let ok = domains.iter().any(|d| {
                    let d = d.trim().trim_start_matches('.').to_lowercase();
                    host == d || host.ends_with(&format!(".{d}"))
                });
                if !ok {
                    return Err(Error::Forbidden(format!(
                        "links to {host} are not allowed in this room (room rule: links)"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// Whole-word (or whole-phrase) match: the match may not be glued to letters or digits.
fn contains_word(hay: &str, word: &str) -> bool {
    let mut from = 0;
    while let Some(i) = hay[from..].find(word) {
        let start = from + i;
        let end = start + word.len();
        let before = hay[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        let after = hay[end..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric());
        if before && after {
            return true;
        }
        from = start + word.len().max(1);
        while !hay.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}

/// Top-level domains that make a bare `name.tld` count as a link (with a scheme or `www.`
/// any host counts). A heuristic: "end of sentence.Next" is not a link, "cheap.biz" is.
const COMMON_TLDS: &[&str] = &[
    "com", "org", "net", "edu", "gov", "io", "co", "info", "biz", "me", "app", "dev", "ly", "gg",
    "xyz", "ru", "de", "uk", "us", "ca", "fr", "in", "cn", "jp", "br", "au", "tv", "online",
    "site", "club", "shop", "top", "ai", "link", "click", "live", "store", "es", "it", "nl", "pl",
    "eu",
];

/// Host names of the links in a (lowercased) text: `scheme://host...`, `www.host...`, or a
/// bare `name.tld/...` with a common TLD.
fn links(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"' | '(' | ')' | '[' | ']'))
        .filter_map(|token| {
            let token =
                token.trim_matches(|c: char| matches!(c, '.' | ',' | ';' | ':' | '!' | '?' | '\''));
            let rest = match token.find("://") {
                Some(i) => &token[i + 3..],
                None => token,
            };
            let host = rest.split(['/', '?', '#']).next()?.rsplit('@').next()?;
            let host = host.split(':').next()?;
            let looks_like_link = token.contains("://") || token.starts_with("www.") || {
                let tld = host.rsplit('.').next().unwrap_or("");
                host.contains('.')
                    && host.split('.').all(|p| !p.is_empty())
                    && COMMON_TLDS.contains(&tld)
            };
            (looks_like_link && !host.is_empty()).then(|| host.to_owned())
        })
}

/// The cache of room policies.
#[derive(Default)]
pub struct Policies {
    map: DashMap<RoomId, Arc<Policy>>,
    /// Cluster mode: rooms whose settings, memberships, bans or mutes changed here, for the
    /// broker to announce (the other nodes drop their cached copy). `None` on a single node.
    changes: Option<tokio::sync::mpsc::Sender<RoomId>>,
    /// Other nodes change rooms too (cluster mode): the cached access may lag one bus hop, so
    /// a join's second look reads the joiner's own rows from the store.
    shared_store: bool,
    /// Slow-mode clocks of policies dropped by [`Policies::invalidate`], taken over by the
    /// reload (a remote settings change must not reset who sent when).
    carried: DashMap<RoomId, HashMap<UserId, (i64, String)>>,
    /// Per room, bumped by every change and invalidation: a load that saw another value when
    /// it started may hold what the change was about, and is used once but not cached.
    versions: DashMap<RoomId, u64>,
    /// Bumped when every cached policy is dropped at once.
    epoch: std::sync::atomic::AtomicU64,
    /// One load at a time per room: a reconnect storm into a cold room reads it once.
    loading: DashMap<RoomId, Arc<tokio::sync::Mutex<()>>>,
}

impl Policies {
    /// A cache for a node that is the only writer of its store (`changes` is `None`) or one
    /// of several (cluster mode: its changes go to `changes` for the other nodes).
    pub fn new(changes: Option<tokio::sync::mpsc::Sender<RoomId>>) -> Self {
        Self {
            shared_store: changes.is_some(),
            changes,
            ..Self::default()
        }
    }

    /// The room's change count (see [`Policies::member_recorded`]).
    pub fn version(&self, room: &RoomId) -> u64 {
        self.versions.get(room).map_or(0, |v| *v)
    }

    fn stamp(&self, room: &RoomId) -> (u64, u64) {
        (
            self.epoch.load(std::sync::atomic::Ordering::Acquire),
            self.version(room),
        )
    }

    fn bump(&self, room: &RoomId) {
        *self.versions.entry(room.clone()).or_default() += 1;
    }

    /// The room's policy, loaded from the store on first use.
    pub async fn get(&self, store: &Store, room: &RoomId) -> Result<Arc<Policy>> {
        if let Some(p) = self.map.get(room) {
            return Ok(p.clone());
        }
        let gate = self.loading.entry(room.clone()).or_default().clone();
        let _loading = gate.lock().await;
        if let Some(p) = self.map.get(room) {
            return Ok(p.clone());
        }
        let result = self.load(store, room).await;
        self.loading.remove(room);
        result
    }

    async fn load(&self, store: &Store, room: &RoomId) -> Result<Arc<Policy>> {
        let stamp = self.stamp(room);
        let stored = store
            .room_access(room, now_ms())
            .await?
            .ok_or_else(|| Error::NotFound(format!("room {room} not found")))?;
        let mutes = stored.mutes;
        let access = Access {
            members: stored.members.into_iter().collect(),
            banned: stored.banned.into_iter().collect(),
        };
        if self.map.len() >= MAX_CACHED_ROOMS {
            self.map.clear();
        }
        let policy = Arc::new(Policy {
            room: stored.room,
            mutes: Mutex::new(mutes),
            last_sent: Mutex::new(
                self.carried
                    .remove(room)
                    .map(|(_, clocks)| clocks)
                    .unwrap_or_default(),
            ),
            access: Arc::new(RwLock::new(access)),
            extras: Mutex::new(None),
        });
        // Checked under the map's lock for the room: a change either came before (and this
        // copy is not kept) or finds the copy in the map and applies itself to it.
        let entry = self.map.entry(room.clone());
        if self.stamp(room) != stamp {
            return Ok(policy);
        }
        Ok(entry.or_insert(policy).clone())
    }

    /// A join's second look, after entering the room: on a node that shares its store with
    /// others, the user's own membership and ban are read again from the store into the
    /// cached copy (a ban on another node may be one bus hop away from here).
    pub async fn refresh_user(&self, store: &Store, room: &RoomId, user: &UserId) -> Result<()> {
        if !self.shared_store {
            return Ok(());
        }
        let banned = store.is_banned(room, user).await?;
        let role = store.member_role(room, user).await?;
        if let Some(p) = self.map.get(room) {
            let mut access = write(&p.access);
            access.set_banned(user, banned);
            match role {
                Some(r) => access.members.insert(user.clone(), r),
                None => access.members.remove(user),
            };
        }
        Ok(())
    }

    /// Whether the room has open polls, a pinned question, an open breakout or boards: what a
    /// join snapshot reads details of. Read from the store once and kept with the policy, so
    /// joins into a warm room make no round trip for it. `mark` is the hub's mark of the room
    /// now ([`crate::hub::Hub::snapshot_mark`]): the events that change these (polls, question
    /// statuses) are seen by the hub in seq order, before any join can see their seq, so a
    /// kept copy is used only while the mark says no such event came after its read. The
    /// changes that are not events (a breakout opened or closed, a board created) clear it
    /// through [`Policies::extras_changed`]. Without a mark nothing is kept. On a node that
    /// shares its store with others (cluster mode) every join reads it: a breakout or board
    /// made on another node reaches this node one bus hop after it was stored, and a join in
    /// between would miss it.
    pub async fn extras(
        &self,
        store: &Store,
        policy: &Policy,
        mark: Option<SnapshotMark>,
    ) -> Result<RoomExtras> {
        let room = &policy.room.id;
        if self.shared_store {
            return Ok(store.room_extras(room).await?);
        }
        if let (Some(now), Some((known, read_at))) = (mark, *lock(&policy.extras))
            && read_at.still_good(&now)
        {
            return Ok(known);
        }
        let stamp = self.stamp(room);
        let read = store.room_extras(room).await?;
        // Kept only if no change came in meanwhile. Checked under the lock that
        // `extras_changed` clears through (after its bump), so a read from before a change is
        // either refused here or cleared there.
        let mut known = lock(&policy.extras);
        if let Some(mark) = mark
            && self.stamp(room) == stamp
        {
            *known = Some((read, mark));
        }
        Ok(read)
    }

    /// A breakout opened or closed, or a board was created, in `room` through this node, and
    /// is stored: the cached [`Policies::extras`] are read again at the next join.
    pub fn extras_changed(&self, room: &RoomId) {
        self.bump(room);
        if let Some(p) = self.map.get(room) {
            *lock(&p.extras) = None;
        }
    }

    /// Drops a room's cached policy (another node changed it); the next use reloads it.
    pub fn invalidate(&self, room: &RoomId) {
        self.bump(room);
        if let Some((_, old)) = self.map.remove(room) {
            let clocks = lock(&old.last_sent).clone();
            if !clocks.is_empty() && self.carried.len() < MAX_CACHED_ROOMS {
                self.carried.insert(room.clone(), clocks);
            }
        }
    }

    /// Drops every cached policy (cluster mode, after the bus was disrupted: invalidations
    /// may have been lost with it); slow-mode clocks are carried over as by `invalidate`.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let rooms: Vec<RoomId> = self.map.iter().map(|e| e.key().clone()).collect();
        for room in rooms {
            self.invalidate(&room);
        }
    }

    /// A change made through this node: loads in progress must not cache what they read
    /// before it, and the other nodes drop their copies.
    fn changed(&self, room: &RoomId) {
        self.bump(room);
        if let Some(tx) = &self.changes
            && tx.try_send(room.clone()).is_err()
        {
            // As lossy as any publish on the bus (the queue is `bus_queue_max` long and drained
            // at once): the other nodes keep their copy until its next invalidation.
            tracing::warn!(room = %room, "policy change not announced: the bus queue is full");
        }
    }

    /// A stored membership was set (`Some`) or removed (`None`) through this node.
    pub fn member_changed(&self, room: &RoomId, user: &UserId, role: Option<RoomRole>) {
        self.changed(room);
        if let Some(p) = self.map.get(room) {
            let mut access = write(&p.access);
            match role {
                Some(r) => access.members.insert(user.clone(), r),
                None => access.members.remove(user),
            };
        }
    }

    /// A join recorded the user as a plain member of an open room (keeping any role they
    /// already had). `seen` is the room's [`Policies::version`] from before the record was
    /// written: if anything changed the room since (a removal of this very membership, say),
    /// the cached copy is dropped rather than guessed at. Not announced to other nodes: a
    /// node that does not know it sees an open room and records the same membership again,
    /// which changes nothing.
    pub fn member_recorded(&self, room: &RoomId, user: &UserId, role: RoomRole, seen: u64) {
        let Some(p) = self.map.get(room) else {
            return;
        };
        if self.version(room) == seen {
            write(&p.access).members.entry(user.clone()).or_insert(role);
        } else {
            drop(p);
            self.invalidate(room);
        }
    }

    /// A ban was added or lifted through this node.
    pub fn ban_changed(&self, room: &RoomId, user: &UserId, banned: bool) {
        self.changed(room);
        if let Some(p) = self.map.get(room) {
            write(&p.access).set_banned(user, banned);
        }
    }

    /// The room's settings changed: keep mutes and slow-mode clocks, replace the rest.
    pub fn room_changed(&self, room: Room) {
        self.changed(&room.id);
        if let Some(mut entry) = self.map.get_mut(&room.id) {
            let old = entry.clone();
            *entry = Arc::new(Policy {
                room,
                mutes: Mutex::new(lock(&old.mutes).clone()),
                last_sent: Mutex::new(lock(&old.last_sent).clone()),
                access: old.access.clone(),
                extras: Mutex::new(*lock(&old.extras)),
            });
        }
    }

    /// Cluster mode: a message committed on another node, in a room whose policy is cached
    /// here with slow mode on, starts the sender's slow-mode clock here too (so sessions on
    /// several nodes do not multiply the allowance). `json` is the event as stored.
    pub fn remote_event(&self, room: &RoomId, json: &str) {
        let Some(p) = self.map.get(room).map(|p| p.clone()) else {
            return;
        };
        if p.room.slow_mode_s <= 0 {
            return;
        }
        #[derive(serde::Deserialize)]
        struct From {
            id: UserId,
        }
        #[derive(serde::Deserialize)]
        struct Sent {
            #[serde(rename = "type")]
            kind: String,
            from: From,
            ts: i64,
            #[serde(default)]
            client_msg_id: Option<String>,
        }
        let Ok(sent) = serde_json::from_str::<Sent>(json) else {
            return;
        };
        if sent.kind != "message" {
            return;
        }
        let mut last = lock(&p.last_sent);
        let newer = last.get(&sent.from.id).is_none_or(|(t, _)| *t < sent.ts);
        if newer {
            last.insert(
                sent.from.id,
                (sent.ts, sent.client_msg_id.unwrap_or_default()),
            );
        }
    }

    pub fn set_mute(&self, room: &RoomId, user: &UserId, until: Option<i64>) {
        self.changed(room);
        if let Some(p) = self.map.get(room) {
            let mut mutes = lock(&p.mutes);
            match until {
                Some(t) => mutes.insert(user.clone(), t),
                None => mutes.remove(user),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(words: &[&str], links: LinkPolicy) -> RoomRules {
        RoomRules {
            blocked_words: words.iter().map(|w| (*w).to_owned()).collect(),
            links,
        }
    }

    #[test]
    fn blocked_words_match_whole_words_case_insensitively() {
        let r = rules(&["spam", "buy now"], LinkPolicy::Allow);
        assert!(check_rules(&r, "This is SPAM!", false).is_err());
        assert!(check_rules(&r, "please Buy Now", false).is_err());
        assert!(check_rules(&r, "spammy but fine", false).is_ok());
        assert!(check_rules(&r, "a spa maybe", false).is_ok());
        assert!(
            check_rules(&r, "spam", true).is_err(),
            "blocked words bind host/ta too"
        );
    }

    #[test]
    fn link_policies() {
        let deny = rules(&[], LinkPolicy::Deny);
        for (text, refused) in [
            ("see https://ads.example.com/x", true),
            ("www.casino.io", true),
            ("visit cheap.biz/now", true),
            ("(http://a.b)", true),
            ("version 1.2 is out", false),
            ("e.g. this", false),
            ("3.14159", false),
            ("end of sentence.Next", false),
        ] {
            assert_eq!(check_rules(&deny, text, false).is_err(), refused, "{text}");
        }
        assert!(
            check_rules(&deny, "https://x.com", true).is_ok(),
            "host/ta may link"
        );
        let some = rules(
            &[],
            LinkPolicy::Domains {
                domains: vec!["wikipedia.org".into()],
            },
        );
        assert!(check_rules(&some, "read https://en.wikipedia.org/wiki/Algebra", false).is_ok());
        assert!(check_rules(&some, "read wikipedia.org", false).is_ok());
        let err = check_rules(&some, "read https://evil.com", false).unwrap_err();
        assert!(
            err.to_string().contains("evil.com") && err.to_string().contains("room rule: links")
        );
    }

    #[test]
    fn link_policy_json_forms() {
        let r: RoomRules =
            serde_json::from_str(r#"{"blocked_words":["x"],"links":"deny"}"#).unwrap();
        assert_eq!(r.links, LinkPolicy::Deny);
        let r: RoomRules = serde_json::from_str(r#"{"links":{"domains":["a.org"]}}"#).unwrap();
        assert_eq!(
            r.links,
            LinkPolicy::Domains {
                domains: vec!["a.org".into()]
            }
        );
        assert_eq!(
            serde_json::to_string(&LinkPolicy::Allow).unwrap(),
            "\"allow\""
        );
        assert!(serde_json::from_str::<RoomRules>(r#"{"links":"maybe"}"#).is_err());
    }
}
