//! Rate limits as token buckets: one per connection (every command, kept by the session) and
//! one per user and kind of action, shared by all of the user's sessions on this node, so ten
//! tabs of one user get no more than one. In cluster mode a user with sessions on `n` nodes
//! gets `1/n` of each rate and burst on each of them (the caller says `n`), so the user's
//! sessions on all nodes together get no more than the limit. Knows nothing of sockets, rooms,
//! nodes or the store: a caller names the user, the action and the share, and gets an answer.

use crate::protocol::UserId;
use dashmap::DashMap;
use std::time::{Duration, Instant};

/// `rate` tokens per second sustained, `burst` at once.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    rate: f64,
    burst: f64,
}

impl Limit {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst }
    }

    /// The burst of a `1/parts` share, never below one token (every holder can act at all).
    fn share(self, parts: f64) -> f64 {
        (self.burst / parts).max(1.0_f64.min(self.burst))
    }
}

/// Milliseconds on this module's clock (from its first use; wraps after 49 days, and bucket
/// levels compare readings with wrapping arithmetic).
fn clock_ms() -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    (ms & u128::from(u32::MAX)) as u32
}

/// A bucket's fill and when it was last taken from: 8 bytes, its limit kept elsewhere (a
/// user's entry holds one per action, and there is an entry per active user).
#[derive(Clone, Copy, Debug)]
struct Level {
    tokens: f32,
    at: u32,
}

impl Level {
    fn full(limit: Limit) -> Self {
        Self {
            tokens: limit.burst as f32,
            at: clock_ms(),
        }
    }

    /// The tokens there would be by `now` (whole milliseconds of both readings: what a
    /// truncation loses on one call, the next gains, so refills add up exactly).
    fn refill(self, limit: Limit, parts: f64, now: u32) -> f64 {
        let elapsed = f64::from(now.wrapping_sub(self.at)) / 1000.0;
        (f64::from(self.tokens) + elapsed * limit.rate / parts).min(limit.share(parts))
    }

    /// Takes one token of a `1/parts` share of `limit`; tokens above the share are dropped.
    fn take_share(&mut self, limit: Limit, parts: usize) -> bool {
        let parts = parts.max(1) as f64;
        let now = clock_ms();
        let tokens = self.refill(limit, parts, now);
        self.at = now;
        let taken = tokens >= 1.0;
        self.tokens = (if taken { tokens - 1.0 } else { tokens }) as f32;
        taken
    }

    /// Whether the bucket would be full again by now (so forgetting it changes nothing).
    fn refilled(self, limit: Limit, now: u32) -> bool {
        self.refill(limit, 1.0, now) >= limit.burst
    }
}

/// One token bucket with its own limit (a session's bucket for all its commands).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    limit: Limit,
    level: Level,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        let limit = Limit::new(rate, burst);
        Self {
            limit,
            level: Level::full(limit),
        }
    }

    /// Takes one token; false when none is left.
    pub fn take(&mut self) -> bool {
        self.take_share(1)
    }

    /// Takes one token from a bucket `1/parts` of the size and rate (a share of a limit split
    /// between `parts` holders; tokens above the share are dropped). A share's burst is never
    /// below one token, so that every holder can act at all.
    pub fn take_share(&mut self, parts: usize) -> bool {
        self.level.take_share(self.limit, parts)
    }
}

/// The kinds of action limited per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Messages, edits, reactions, questions, answers and reports.
    Write,
    /// Joining and leaving rooms (each may announce presence).
    Join,
    /// Raising and lowering one's hand, and asking for help from a breakout group.
    Hand,
    /// Placing calls.
    Call,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Join => "join",
            Self::Hand => "hand",
            Self::Call => "call",
        }
    }
}

/// Per-user buckets for each [`Action`], with the rate and burst of each. One map entry per
/// active user (its four levels take 32 bytes), looked up by `&str` (no allocation for a user
/// already in it).
pub struct UserLimits {
    limits: [Limit; 4],
    buckets: DashMap<UserId, [Level; 4]>,
}

impl UserLimits {
    /// `rates`: (per second, burst) for write, join, hand and call, in that order.
    pub fn new(rates: [(f64, f64); 4]) -> Self {
        Self {
            limits: rates.map(|(rate, burst)| Limit::new(rate, burst)),
            buckets: DashMap::new(),
        }
    }

    fn index(action: Action) -> usize {
        match action {
            Action::Write => 0,
            Action::Join => 1,
            Action::Hand => 2,
            Action::Call => 3,
        }
    }

    /// Takes one token of `user`'s `action` bucket; false when the user is over the limit.
    pub fn take(&self, user: &UserId, action: Action) -> bool {
        self.take_share(user, action, 1)
    }

    /// [`UserLimits::take`] for a user whose sessions are on `nodes` nodes (this one
    /// included): this node grants `1/nodes` of the rate and burst.
    pub fn take_share(&self, user: &UserId, action: Action, nodes: usize) -> bool {
        let i = Self::index(action);
        let limit = self.limits[i];
        if let Some(mut levels) = self.buckets.get_mut(user.as_str()) {
            return levels[i].take_share(limit, nodes);
        }
        let fresh = self.limits.map(Level::full);
        self.buckets.entry(user.clone()).or_insert(fresh)[i].take_share(limit, nodes)
    }

    /// Forgets the users whose buckets have all refilled (they could spend a full burst
    /// anyway): the map holds only users active in the last burst's worth of time. A map left
    /// at under a quarter of its room after a wave of users gives the rest back.
    pub fn sweep(&self) {
        let now = clock_ms();
        self.buckets.retain(|_, levels| {
            !levels
                .iter()
                .zip(self.limits)
                .all(|(level, limit)| level.refilled(limit, now))
        });
        if self.buckets.len() * 4 < self.buckets.capacity() {
            self.buckets.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// How often [`UserLimits::sweep`] runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_actions_share_one_bucket_per_kind() {
        let limits = UserLimits::new([(0.0001, 3.0), (0.0001, 1.0), (1.0, 1.0), (1.0, 1.0)]);
        let ana = UserId::from("ana");
        let ben = UserId::from("ben");
        assert!((0..3).all(|_| limits.take(&ana, Action::Write)));
        assert!(!limits.take(&ana, Action::Write), "the burst is spent");
        assert!(
            limits.take(&ana, Action::Join),
            "another kind, another bucket"
        );
        assert!(
            limits.take(&ben, Action::Write),
            "another user, another bucket"
        );
        assert_eq!(limits.len(), 2, "one entry per user");
        limits.sweep();
        assert_eq!(limits.len(), 2, "nothing refilled yet");
    }

    #[test]
    fn a_user_on_several_nodes_gets_a_share_on_each() {
        let limits = UserLimits::new([(0.0001, 6.0), (0.0001, 1.0), (1.0, 1.0), (1.0, 1.0)]);
        let ana = UserId::from("ana");
        // On three nodes: two of six here; the spare tokens of the full bucket are dropped.
        assert!((0..2).all(|_| limits.take_share(&ana, Action::Write, 3)));
        assert!(!limits.take_share(&ana, Action::Write, 3));
        // A burst of one is never split below one token.
        assert!(limits.take_share(&ana, Action::Join, 4));
        assert!(!limits.take_share(&ana, Action::Join, 4));
        let mut b = TokenBucket::new(0.0001, 4.0);
        assert!((0..2).all(|_| b.take_share(2)));
        assert!(!b.take_share(2), "half of four");
    }

    #[test]
    fn levels_refill_by_the_clock_and_full_users_are_forgotten() {
        let limit = Limit::new(2.0, 4.0);
        let now = clock_ms();
        let empty = Level {
            tokens: 0.0,
            at: now.wrapping_sub(1_500),
        };
        assert!(
            (empty.refill(limit, 1.0, now) - 3.0).abs() < 1e-9,
            "1.5 s at 2/s"
        );
        assert!(
            (empty.refill(limit, 2.0, now) - 1.5).abs() < 1e-9,
            "half the rate"
        );
        assert_eq!(
            empty.refill(limit, 1.0, now.wrapping_add(60_000)),
            4.0,
            "capped"
        );
        assert!(!empty.refilled(limit, now));
        assert!(empty.refilled(limit, now.wrapping_add(500)));
        // Across the clock's wrap.
        let wrapped = Level {
            tokens: 0.0,
            at: u32::MAX - 499,
        };
        assert!((wrapped.refill(limit, 1.0, 500) - 2.0).abs() < 1e-9);

        let limits = UserLimits::new([(1.0, 1.0); 4]);
        let ana = UserId::from("ana");
        assert!(limits.take(&ana, Action::Write));
        limits.buckets.get_mut("ana").unwrap()[0].at = clock_ms().wrapping_sub(2_000);
        limits.sweep();
        assert!(
            limits.is_empty(),
            "a user whose buckets refilled is forgotten"
        );
    }
}
