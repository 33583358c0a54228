//! Simulcast layer selection: how fast each layer of a published video track runs (measured
//! from what arrives), which layer a viewer gets from its bandwidth estimate, and the switch
//! onto a new layer at that layer's next keyframe, with RTP timestamps rewritten so that the
//! viewer's decoder sees one continuous stream. It knows nothing of peers, sockets or rooms:
//! the client feeds it rids, sizes, timestamps and estimates.

use std::time::{Duration, Instant};
use str0m::media::{MediaTime, Rid};

/// A layer silent this long no longer counts as available.
const LAYER_STALE: Duration = Duration::from_secs(1);
/// Moving up to a faster layer needs this much headroom (percent of the layer's rate).
const UP_HEADROOM_PCT: u64 = 115;
/// Below this share of the slowest layer's rate (percent) a viewer's video is paused.
const PAUSE_BELOW_PCT: u64 = 50;
/// How long a slower layer (or a pause) must be called for without a break before a viewer
/// is moved to it: estimates swing, and each switch costs a keyframe.
pub(super) const DOWN_HOLD: Duration = Duration::from_secs(2);
/// The same for a faster layer (or a resume).
pub(super) const UP_HOLD: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct LayerRate {
    rid: Rid,
    /// Bytes since the last `roll`.
    bytes: u64,
    /// Smoothed rate, bit/s; 0 until the first `roll` that saw bytes.
    bps: u64,
    last_seen: Instant,
}

/// The measured rates of one published track's simulcast layers.
#[derive(Debug)]
pub(super) struct Meter {
    layers: Vec<LayerRate>,
    window_start: Instant,
}

impl Meter {
    pub fn new(now: Instant) -> Self {
        Self {
            layers: Vec::new(),
            window_start: now,
        }
    }

    /// Counts a frame of layer `rid`.
    pub fn add(&mut self, rid: Rid, bytes: usize, now: Instant) {
        let bytes = bytes as u64;
        match self.layers.iter_mut().find(|l| l.rid == rid) {
            Some(l) => {
                l.bytes += bytes;
                l.last_seen = now;
            }
            None => self.layers.push(LayerRate {
                rid,
                bytes,
                bps: 0,
                last_seen: now,
            }),
        }
    }

    /// Closes the measuring window: each layer's rate moves a quarter of the way to what the
    /// window saw (all the way for a layer's first window); stale layers are forgotten.
    pub fn roll(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.window_start)
            .as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        self.window_start = now;
        self.layers
            .retain(|l| now.saturating_duration_since(l.last_seen) < LAYER_STALE);
        for l in &mut self.layers {
            let seen = (l.bytes as f64 * 8.0 / secs) as u64;
            l.bps = if l.bps == 0 {
                seen
            } else {
                (l.bps * 3 + seen) / 4
            };
            l.bytes = 0;
        }
    }

    /// The layers with a measured rate, slowest first.
    pub fn active(&self) -> Vec<(Rid, u64)> {
        let mut v: Vec<_> = self
            .layers
            .iter()
            .filter(|l| l.bps > 0)
            .map(|l| (l.rid, l.bps))
            .collect();
        v.sort_by_key(|&(_, bps)| bps);
        v
    }
}

/// The layer a viewer should get: the fastest that fits `budget` (bit/s), where staying on
/// `current` needs the budget to cover its rate and moving to any other layer needs 15 %
/// headroom; when none fits, the slowest while the budget is at least half its rate, else
/// none (the video pauses). No budget (no estimate yet, or none possible): the fastest.
/// `layers` are slowest first.
pub(super) fn choose(
    layers: &[(Rid, u64)],
    budget: Option<u64>,
    current: Option<Rid>,
) -> Option<Rid> {
    let Some(budget) = budget else {
        return layers.last().map(|&(rid, _)| rid);
    };
    let fits = |&(rid, bps): &(Rid, u64)| {
        if Some(rid) == current {
            bps <= budget
        } else {
            bps.saturating_mul(UP_HEADROOM_PCT) / 100 <= budget
        }
    };
    if let Some(&(rid, _)) = layers.iter().rev().find(|l| fits(l)) {
        return Some(rid);
    }
    let &(slowest, bps) = layers.first()?;
    (budget.saturating_mul(100) >= bps.saturating_mul(PAUSE_BELOW_PCT)).then_some(slowest)
}

/// What a viewer's copy of one video track is forwarding, and where it is switching to.
#[derive(Debug, Default)]
pub(super) struct Switch {
    /// The layer forwarded now (`None`: nothing yet, or paused).
    current: Option<Rid>,
    /// The layer wanted; forwarding moves to it at its next keyframe.
    target: Option<Rid>,
    /// An unlayered track has reached this viewer from a keyframe on.
    started: bool,
    /// Added (wrapping) to the source's RTP time since the last switch.
    offset: u64,
    /// The last forwarded frame: its rewritten time and when it arrived.
    last: Option<(u64, Instant)>,
    /// A target called for, and since when without a break (not yet held long enough).
    proposed: Option<(Option<Rid>, Instant)>,
    /// Paused by the estimate (as opposed to not started yet).
    paused: bool,
}

impl Switch {
    /// The layer forwarded now.
    pub fn current(&self) -> Option<Rid> {
        self.current
    }

    /// The layer forwarded now, else the one being switched to.
    pub fn layer(&self) -> Option<Rid> {
        self.current.or(self.target)
    }

    /// Sets the wanted layer at once; `None` pauses.
    pub fn retarget(&mut self, target: Option<Rid>) {
        self.target = target;
        self.proposed = None;
        self.paused = target.is_none();
        if target.is_none() {
            self.current = None;
        }
    }

    /// Waits for a keyframe again before forwarding (of the wanted layer, if layered), with
    /// RTP time kept continuous as at a switch.
    pub fn restart(&mut self) {
        self.current = None;
        self.started = false;
    }

    /// Calls for `want`: taken at once for a track not started yet, else once it has been
    /// called for without a break for `hold` (by `now`).
    pub fn propose(&mut self, want: Option<Rid>, now: Instant, hold: Duration) {
        if want == self.target {
            self.proposed = None;
            return;
        }
        if self.target.is_none() && !self.paused {
            self.retarget(want);
            return;
        }
        match self.proposed {
            Some((p, since)) if p == want => {
                if now.saturating_duration_since(since) >= hold {
                    self.retarget(want);
                }
            }
            _ => self.proposed = Some((want, now)),
        }
    }

    /// The keyframe this viewer waits for, if any: `Some(None)` for an unlayered track that
    /// has not started, `Some(Some(rid))` for a layer to switch to.
    pub fn waits_for(&self, layered: bool) -> Option<Option<Rid>> {
        if layered {
            self.target.filter(|t| Some(*t) != self.current).map(Some)
        } else {
            (!self.started).then_some(None)
        }
    }

    /// Admits a video frame of layer `rid` (`None`: unlayered) that arrived at `at`:
    /// `Some(time)` to forward it with that RTP time, `None` to drop it. `keyframe` is `None`
    /// where the codec does not say (such a frame may start a stream).
    pub fn admit(
        &mut self,
        rid: Option<Rid>,
        keyframe: Option<bool>,
        time: MediaTime,
        at: Instant,
    ) -> Option<MediaTime> {
        let starts = keyframe.unwrap_or(true);
        let Some(rid) = rid else {
            self.started |= starts;
            return self.started.then_some(time);
        };
        if Some(rid) == self.target && self.current != self.target && starts {
            self.offset = match self.last {
                Some((last, last_at)) => {
                    let gap = at.saturating_duration_since(last_at).as_secs_f64();
                    let ticks = ((gap * f64::from(time.frequency().get())) as u64).max(1);
                    last.wrapping_add(ticks).wrapping_sub(time.numer())
                }
                None => 0,
            };
            self.current = self.target;
        }
        if Some(rid) != self.current {
            return None;
        }
        let out = time.numer().wrapping_add(self.offset);
        self.last = Some((out, at));
        Some(MediaTime::new(out, time.frequency()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::media::Frequency;

    fn rid(s: &str) -> Rid {
        Rid::from(s)
    }

    fn three() -> Vec<(Rid, u64)> {
        vec![
            (rid("l"), 150_000),
            (rid("m"), 500_000),
            (rid("h"), 1_500_000),
        ]
    }

    #[test]
    fn the_fastest_layer_that_fits_is_chosen_with_headroom_to_move_up() {
        let l = three();
        assert_eq!(choose(&l, None, None), Some(rid("h")));
        assert_eq!(choose(&l, Some(10_000_000), None), Some(rid("h")));
        assert_eq!(choose(&l, Some(1_600_000), None), Some(rid("m")));
        assert_eq!(choose(&l, Some(1_600_000), Some(rid("h"))), Some(rid("h")));
        assert_eq!(choose(&l, Some(560_000), Some(rid("l"))), Some(rid("l")));
        assert_eq!(choose(&l, Some(560_000), Some(rid("m"))), Some(rid("m")));
        assert_eq!(choose(&l, Some(480_000), Some(rid("m"))), Some(rid("l")));
    }

    #[test]
    fn a_viewer_that_cannot_keep_up_with_the_slowest_layer_is_paused() {
        let l = three();
        assert_eq!(choose(&l, Some(100_000), Some(rid("l"))), Some(rid("l")));
        assert_eq!(choose(&l, Some(80_000), None), Some(rid("l")));
        assert_eq!(choose(&l, Some(70_000), Some(rid("l"))), None);
        assert_eq!(choose(&[], Some(70_000), None), None);
        assert_eq!(choose(&[], None, None), None);
    }

    #[test]
    fn the_meter_orders_layers_by_rate_and_forgets_silent_ones() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0);
        for _ in 0..10 {
            m.add(rid("h"), 6_000, t0);
            m.add(rid("q"), 500, t0);
        }
        assert!(
            m.active().is_empty(),
            "no rate before the first window closes"
        );
        m.roll(t0 + Duration::from_millis(500));
        let a = m.active();
        assert_eq!(
            a.iter().map(|l| l.0).collect::<Vec<_>>(),
            [rid("q"), rid("h")]
        );
        assert_eq!(a[1].1, 60_000 * 8 * 2);
        m.add(rid("h"), 6_000, t0 + Duration::from_millis(900));
        m.roll(t0 + Duration::from_millis(1_600));
        assert_eq!(m.active().len(), 1, "q was silent for a second");
    }

    #[test]
    fn a_switch_waits_for_a_keyframe_of_the_new_layer_and_keeps_time_continuous() {
        let f = Frequency::NINETY_KHZ;
        let t0 = Instant::now();
        let mut s = Switch::default();
        s.retarget(Some(rid("l")));
        assert_eq!(s.waits_for(true), Some(Some(rid("l"))));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            s.admit(Some(rid("l")), Some(false), MediaTime::new(1_000, f), at(0)),
            None
        );
        let first = s.admit(Some(rid("l")), Some(true), MediaTime::new(4_000, f), at(33));
        assert_eq!(first, Some(MediaTime::new(4_000, f)));
        assert_eq!(s.waits_for(true), None);
        assert_eq!(
            s.admit(
                Some(rid("h")),
                Some(true),
                MediaTime::new(900_000, f),
                at(34)
            ),
            None
        );
        // Up to h: l goes on until h's keyframe, which continues l's clock.
        s.retarget(Some(rid("h")));
        let l2 = s.admit(
            Some(rid("l")),
            Some(false),
            MediaTime::new(7_000, f),
            at(66),
        );
        assert_eq!(l2, Some(MediaTime::new(7_000, f)));
        assert_eq!(
            s.admit(
                Some(rid("h")),
                Some(false),
                MediaTime::new(903_000, f),
                at(67)
            ),
            None
        );
        let h = s.admit(
            Some(rid("h")),
            Some(true),
            MediaTime::new(906_000, f),
            at(100),
        );
        assert_eq!(h, Some(MediaTime::new(7_000 + 34 * 90, f)));
        let h2 = s.admit(
            Some(rid("h")),
            Some(false),
            MediaTime::new(909_000, f),
            at(133),
        );
        assert_eq!(h2, Some(MediaTime::new(7_000 + 34 * 90 + 3_000, f)));
        assert_eq!(
            s.admit(
                Some(rid("l")),
                Some(false),
                MediaTime::new(10_000, f),
                at(133)
            ),
            None
        );
        // Paused: nothing goes, whatever comes.
        s.retarget(None);
        assert_eq!(
            s.admit(
                Some(rid("h")),
                Some(true),
                MediaTime::new(912_000, f),
                at(166)
            ),
            None
        );
        assert_eq!(s.waits_for(true), None);
    }

    #[test]
    fn a_new_target_is_taken_only_once_it_has_been_called_for_without_a_break() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hold = Duration::from_secs(2);
        let mut s = Switch::default();
        s.propose(Some(rid("h")), at(0), hold);
        assert_eq!(
            s.layer(),
            Some(rid("h")),
            "a track not started takes its first target at once"
        );
        s.propose(Some(rid("l")), at(100), hold);
        s.propose(Some(rid("l")), at(1_000), hold);
        s.propose(Some(rid("h")), at(1_500), hold);
        s.propose(Some(rid("l")), at(2_200), hold);
        assert_eq!(
            s.layer(),
            Some(rid("h")),
            "the call for l was broken at 1.5 s"
        );
        s.propose(Some(rid("l")), at(4_199), hold);
        assert_eq!(s.layer(), Some(rid("h")));
        s.propose(Some(rid("l")), at(4_200), hold);
        assert_eq!(s.waits_for(true), Some(Some(rid("l"))));
        s.propose(None, at(5_000), hold);
        s.propose(None, at(7_000), hold);
        assert_eq!((s.layer(), s.waits_for(true)), (None, None), "paused");
        s.propose(Some(rid("l")), at(7_100), hold);
        assert_eq!(s.layer(), None, "a paused track resumes after the hold too");
        s.propose(Some(rid("l")), at(9_100), hold);
        assert_eq!(s.layer(), Some(rid("l")));
    }

    #[test]
    fn an_unlayered_track_starts_at_its_first_keyframe() {
        let f = Frequency::NINETY_KHZ;
        let t0 = Instant::now();
        let mut s = Switch::default();
        assert_eq!(s.waits_for(false), Some(None));
        assert_eq!(s.admit(None, Some(false), MediaTime::new(1, f), t0), None);
        assert_eq!(
            s.admit(None, Some(true), MediaTime::new(2, f), t0),
            Some(MediaTime::new(2, f))
        );
        assert_eq!(
            s.admit(None, Some(false), MediaTime::new(3, f), t0),
            Some(MediaTime::new(3, f))
        );
        assert_eq!(s.waits_for(false), None);
        let mut unknown = Switch::default();
        assert!(
            unknown
                .admit(None, None, MediaTime::new(1, f), t0)
                .is_some()
        );
    }
}
