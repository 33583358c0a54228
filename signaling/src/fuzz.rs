//! Bounded, seeded random testing shared by the property tests of this crate and of the
//! server (which depends on this crate with the `fuzz` feature, for its tests only): rand's
//! `StdRng`, no extra dependency. Knows nothing of what is tested.
//!
//! Budget: each property runs a fixed number of cases from a fixed seed, so CI is
//! deterministic. To run longer, `STUDYHALL_FUZZ_SECS=60` runs each property for that many
//! seconds from a random seed, printed on failure; `STUDYHALL_FUZZ_SEED=N` replays it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Runs `prop` on `cases` seeded generators (or for `STUDYHALL_FUZZ_SECS` seconds), naming
/// the seed and case of a failure.
pub fn check(name: &str, cases: u64, mut prop: impl FnMut(&mut StdRng)) {
    let secs: Option<f64> = std::env::var("STUDYHALL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("STUDYHALL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            if secs.is_some() {
                rand::random()
            } else {
                0x5717_d4a1
            }
        });
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut case = 0u64;
    while match deadline {
        Some(d) => case == 0 || Instant::now() < d,
        None => case < cases,
    } {
        let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prop(&mut rng)));
        if let Err(panic) = run {
            eprintln!("property {name} failed at case {case}; replay: STUDYHALL_FUZZ_SEED={seed}");
            std::panic::resume_unwind(panic);
        }
        case += 1;
    }
}

/// One of `items`, at random.
pub fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A string of up to `max` random characters, biased towards `specials` (the characters the
/// tested parser trips on) and towards invisible and astral ones.
pub fn junk_with(rng: &mut StdRng, max: usize, specials: &[char]) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| match rng.random_range(0..10) {
            0 => *pick(rng, specials),
            1 => *pick(rng, &['é', 'ß', '€', '𝄞', '\u{200b}', '\u{feff}', '\u{7f}']),
            2 => char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'),
            _ => rng.random_range(b' '..=b'~') as char,
        })
        .collect()
}
