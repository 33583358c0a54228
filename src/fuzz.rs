//! Bounded, seeded random testing for the property tests beside the code (protocol, auth,
//! hub): the runner and pickers of `studyhall_signaling::fuzz`, and the JSON-flavoured
//! generators.
//!
//! Budget: each property runs a fixed number of cases from a fixed seed, so CI is
//! deterministic and each property takes about a second or less on two cores. To run longer,
//! `STUDYHALL_FUZZ_SECS=60 cargo test -p studyhall --lib props` runs each property for that
//! many seconds from a random seed, printed on failure; `STUDYHALL_FUZZ_SEED=N` replays it.
#![cfg(test)]

use rand::Rng;
use rand::rngs::StdRng;

pub(crate) use studyhall_signaling::fuzz::{check, pick};

/// A string of random characters, biased towards the ones JSON trips on.
pub(crate) fn junk(rng: &mut StdRng, max: usize) -> String {
    studyhall_signaling::fuzz::junk_with(
        rng,
        max,
        &['\0', '\r', '\n', ' ', '\t', '"', '\\', '{', '}', ':', ','],
    )
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
