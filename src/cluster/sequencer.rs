//! The per-room sequencer of cluster mode: it stands in front of `Hub::publish` and hands it a
//! room's events strictly in seq order, whichever way they came (this node's commit hook, the
//! NATS bus, or a refill from the store). An event whose predecessor has not arrived is held
//! back; a gap that stays open past a bound is reported so the caller can refill the missing
//! seqs from the store; a seq already handed on is dropped. Plain logic, no I/O, no clock of
//! its own (time comes in as an `Instant`): it knows nothing of NATS, SQL or sessions.

use crate::store::CommittedEvent;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most events held back for one room. Beyond it new arrivals are dropped (they are refilled
/// from the store with the rest of the gap), so a long outage cannot grow memory without bound.
pub const HELD_MAX: usize = 10_000;

/// What became of an offered event.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Handed on (with any held successors it released).
    Delivered,
    /// Waiting for a predecessor.
    Held,
    /// At or below what was already handed on (or held twice): dropped.
    Duplicate,
    /// The hold-back buffer is full: dropped, to be refilled.
    Overflow,
}

/// One room's ordering state.
#[derive(Debug, Default)]
pub struct RoomSequencer {
    /// The next seq to hand on; `None` until the start point is known.
    next: Option<i64>,
    held: BTreeMap<i64, CommittedEvent>,
    /// When the current gap opened (the oldest hold still waiting).
    gap_since: Option<Instant>,
}

impl RoomSequencer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next seq this room expects, once started.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Sets the start point: everything at or below `last_seq` is history the joiners read
    /// from the store themselves. Held events above it that now follow on are handed on.
    pub fn start(&mut self, last_seq: i64, now: Instant, out: &mut impl FnMut(CommittedEvent)) {
        if self.next.is_some() {
            return;
        }
        self.next = Some(last_seq + 1);
        self.held = self.held.split_off(&(last_seq + 1));
        self.release(now, out);
    }

    /// Offers one event; what can go out in order goes to `out`.
    pub fn offer(
        &mut self,
        ev: CommittedEvent,
        now: Instant,
        out: &mut impl FnMut(CommittedEvent),
    ) -> Offered {
        let Some(next) = self.next else {
            return self.hold(ev, now);
        };
        if ev.seq < next {
            return Offered::Duplicate;
        }
        if ev.seq > next {
            return self.hold(ev, now);
        }
        self.next = Some(next + 1);
        out(ev);
        self.release(now, out);
        Offered::Delivered
    }

    fn hold(&mut self, ev: CommittedEvent, now: Instant) -> Offered {
        if self.held.contains_key(&ev.seq) {
            return Offered::Duplicate;
        }
        if self.held.len() >= HELD_MAX {
            return Offered::Overflow;
        }
        self.held.insert(ev.seq, ev);
        self.gap_since.get_or_insert(now);
        Offered::Held
    }

    /// Hands on held events that now follow in order.
    fn release(&mut self, now: Instant, out: &mut impl FnMut(CommittedEvent)) {
        let Some(mut next) = self.next else { return };
        let mut progressed = false;
        while let Some(ev) = self.held.remove(&next) {
            out(ev);
            next += 1;
            progressed = true;
        }
        self.next = Some(next);
        if self.held.is_empty() {
            self.gap_since = None;
        } else if progressed {
            // What remains is a new gap: give it its own bound.
            self.gap_since = Some(now);
        }
    }

    /// When a refill is due: the seq to refill after (the last one handed on), if a gap has
    /// stayed open for `bound` or the hold-back buffer is full.
    pub fn refill_due(&self, now: Instant, bound: Duration) -> Option<i64> {
        let next = self.next?;
        let since = self.gap_since?;
        (now.duration_since(since) >= bound || self.held.len() >= HELD_MAX).then_some(next - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64) -> CommittedEvent {
        CommittedEvent {
            room: "r".into(),
            seq,
            json: format!("{seq}"),
            public_json: None,
        }
    }

    fn run(s: &mut RoomSequencer, seqs: &[i64], now: Instant) -> Vec<i64> {
        let mut out = vec![];
        for &q in seqs {
            s.offer(ev(q), now, &mut |e| out.push(e.seq));
        }
        out
    }

    #[test]
    fn hands_on_in_order_holding_back_early_ones() {
        let now = Instant::now();
        let mut s = RoomSequencer::new();
        let mut out = vec![];
        s.start(4, now, &mut |e| out.push(e.seq));
        assert_eq!(run(&mut s, &[5, 7, 8], now), vec![5]);
        assert_eq!(s.held(), 2);
        assert_eq!(run(&mut s, &[6], now), vec![6, 7, 8]);
        assert_eq!(
            run(&mut s, &[6, 8, 3], now),
            Vec::<i64>::new(),
            "duplicates"
        );
        assert_eq!(s.next(), Some(9));
    }

    #[test]
    fn events_before_the_start_point_wait_then_old_ones_are_dropped() {
        let now = Instant::now();
        let mut s = RoomSequencer::new();
        assert_eq!(run(&mut s, &[3, 5, 6], now), Vec::<i64>::new());
        let mut out = vec![];
        s.start(4, now, &mut |e| out.push(e.seq));
        assert_eq!(out, vec![5, 6], "3 was history, 5 and 6 follow on");
    }

    #[test]
    fn a_gap_is_due_for_refill_after_the_bound_and_a_refill_closes_it() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(100);
        let mut s = RoomSequencer::new();
        s.start(0, t0, &mut |_| {});
        assert_eq!(run(&mut s, &[1, 3, 4], t0), vec![1]);
        assert_eq!(s.refill_due(t0 + Duration::from_millis(50), bound), None);
        assert_eq!(s.refill_due(t0 + bound, bound), Some(1));
        // The refill brings 2..=4 from the store; 3 and 4 were held, so they go once.
        let t1 = t0 + bound;
        assert_eq!(run(&mut s, &[2, 3, 4], t1), vec![2, 3, 4]);
        assert_eq!(s.refill_due(t1 + bound, bound), None);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn the_hold_back_buffer_is_bounded() {
        let now = Instant::now();
        let mut s = RoomSequencer::new();
        s.start(0, now, &mut |_| {});
        for q in 2..(2 + HELD_MAX as i64) {
            assert_eq!(s.offer(ev(q), now, &mut |_| {}), Offered::Held);
        }
        assert_eq!(
            s.offer(ev(HELD_MAX as i64 + 5), now, &mut |_| {}),
            Offered::Overflow
        );
        assert_eq!(s.refill_due(now, Duration::from_secs(60)), Some(0));
    }
}
