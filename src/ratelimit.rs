//! Rate limits as token buckets: one per connection (every command, kept by the session) and
//! one per user and kind of action, shared by all of the user's sessions on this node, so ten
//! tabs of one user get no more than one. Knows nothing of sockets, rooms or the store: a
//! caller names the user and the action and gets an answer.

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
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
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
        let i = Self::index(action);
        if let Some(mut buckets) = self.buckets.get_mut(user.as_str()) {
            return buckets[i].take();
        }
        let fresh = self
            .rates
            .map(|(rate, burst)| TokenBucket::new(rate, burst));
        self.buckets.entry(user.clone()).or_insert(fresh)[i].take()
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
}
