//! Bounded, seeded random testing for the property tests beside the code (protocol, auth,
//! hub): rand's `StdRng`, no extra dependency.
//!
//! Budget: each property runs a fixed number of cases from a fixed seed, so CI is
//! deterministic and each property takes about a second or less on two cores. To run longer,
//! `STUDYHALL_FUZZ_SECS=60 cargo test -p studyhall --lib props` runs each property for that
//! many seconds from a random seed, printed on failure; `STUDYHALL_FUZZ_SEED=N` replays it.
#![cfg(test)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Runs `prop` on `cases` seeded generators (or for `STUDYHALL_FUZZ_SECS` seconds), naming
/// the seed and case of a failure.
pub(crate) fn check(name: &str, cases: u64, mut prop: impl FnMut(&mut StdRng)) {
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

pub(crate) fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A string of random characters, biased towards the troublesome ones.
pub(crate) fn junk(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| match rng.random_range(0..10) {
            0 => *pick(
                rng,
                &['\0', '\r', '\n', ' ', '\t', '"', '\\', '{', '}', ':', ','],
            ),
            1 => *pick(rng, &['é', 'ß', '€', '𝄞', '\u{200b}', '\u{feff}', '\u{7f}']),
            2 => char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'),
            _ => rng.random_range(b' '..=b'~') as char,
        })
        .collect()
}

/// `text` with a few random edits (deletions, insertions, replacements, truncation), kept
/// valid UTF-8 (a WebSocket text frame always is).
pub(crate) fn mutate(rng: &mut StdRng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..=chars.len());
        match rng.random_range(0..5) {
            0 if at < chars.len() => {
                let end = (at + rng.random_range(1..4)).min(chars.len());
                chars.drain(at..end);
            }
            1 => {
                let ins: Vec<char> = junk(rng, 4).chars().collect();
                chars.splice(at..at, ins);
            }
            2 if at < chars.len() => {
                chars[at] = *pick(
                    rng,
                    &['"', '{', '}', '[', ']', '0', '-', 'e', 'n', ':', ',', '\\'],
                );
            }
            3 => chars.truncate(at),
            _ => {
                let ins: Vec<char> = pick(
                    rng,
                    &["null", "1e999", "-0", "\"\\u0000\"", "[]", "{}", "true"],
                )
                .chars()
                .collect();
                chars.splice(at..at, ins);
            }
        }
    }
    chars.into_iter().collect()
}
