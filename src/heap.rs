//! Giving freed heap memory back to the system. glibc keeps what the program frees for its
//! next allocations, and a connect storm leaves many small freed blocks between live ones (the
//! task of a write loop that parked, about 1.2 KB per connection): later allocations reuse
//! them, but the pages they lie in stay in the process's resident memory until `malloc_trim`
//! returns the whole pages among them. Knows nothing of sessions: the app says when.

/// Returns the free pages of every heap arena to the system. False where there is nothing to
/// do: an allocator other than glibc's (mimalloc and jemalloc give memory back by themselves).
pub fn trim() -> bool {
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        not(feature = "mimalloc"),
        not(feature = "jemalloc")
    ))]
    {
        // SAFETY: `malloc_trim` takes no pointer and works on glibc's own heaps under their
        // locks; any thread may call it at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        true
    }
    #[cfg(not(all(
        target_os = "linux",
        target_env = "gnu",
        not(feature = "mimalloc"),
        not(feature = "jemalloc")
    )))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_is_safe_to_call_at_any_time() {
        let held: Vec<Vec<u8>> = (0..1_000).map(|i| vec![1u8; 1_000 + i]).collect();
        let kept: Vec<_> = held.into_iter().step_by(2).collect();
        let done = super::trim();
        assert_eq!(done, cfg!(all(target_os = "linux", target_env = "gnu")));
        assert!(
            kept.iter().all(|v| v.iter().all(|b| *b == 1)),
            "live memory untouched"
        );
    }
}
