//! Rate limits as token buckets: one per connection (every command, kept by the session) and
//! one per user and kind of action, shared by all of the user's sessions on this node, so ten
//! tabs of one user get no more than one. In cluster mode a user with sessions on `n` nodes
//! gets `1/n` of each rate and burst on each of them (the caller says `n`), so the user's
//! sessions on all nodes together get no more than the limit. Knows nothing of sockets, rooms,
//! nodes or the store: a caller names the user, the action and the share, and gets an answer.

use crate::protocol::UserId;
use dashmap::DashMap;
use std::time::{Duration, Instant};

/// `rate` per second sustained, `burst` at once.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
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
        let parts = parts.max(1) as f64;
        let now = Instant::now();
        let burst = (self.burst / parts).max(1.0_f64.min(self.burst));
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.rate / parts)
            .min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full again by now (so forgetting it changes nothing).
    fn refilled(&self, now: Instant) -> bool {
        self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate >= self.burst
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
/// active user, looked up by `&str` (no allocation for a user already in it).
pub struct UserLimits {
    rates: [(f64, f64); 4],
    buckets: DashMap<UserId, [TokenBucket; 4]>,
}

impl UserLimits {
    /// `rates`: (per second, burst) for write, join, hand and call, in that order.
    pub fn new(rates: [(f64, f64); 4]) -> Self {
        Self {
            rates,
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
        if let Some(mut buckets) = self.buckets.get_mut(user.as_str()) {
            return buckets[i].take_share(nodes);
        }
        let fresh = self
            .rates
            .map(|(rate, burst)| TokenBucket::new(rate, burst));
        self.buckets.entry(user.clone()).or_insert(fresh)[i].take_share(nodes)
    }

    /// Forgets the users whose buckets have all refilled (they could spend a full burst
    /// anyway): the map holds only users active in the last burst's worth of time.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.buckets
            .retain(|_, buckets| !buckets.iter().all(|b| b.refilled(now)));
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
}
