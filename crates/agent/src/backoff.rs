//! Capped exponential backoff with jitter, for reconnecting to the controller.
//!
//! Delay n (from 0) is `min(initial * 2^n, max)`, then scaled by a random factor in
//! `[1 - jitter, 1]` so that many agents restarted together do not reconnect in lockstep.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// The longest pause.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// A backoff from `initial` doubling up to `max`, with `jitter` in `0.0..=1.0`.
    pub fn new(initial: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            jitter: jitter.clamp(0.0, 1.0),
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next attempt.
    pub fn peek_base(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.peek_base();
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(1.0 - self.jitter * random_unit())
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    /// 200 ms doubling to 5 s, 20 % jitter.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5), 0.2)
    }
}

/// A random number in `[0, 1)` from the standard library's randomly keyed hasher.
/// A random number in `[0, 1)`.
pub(crate) fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700), 0.0);
        let delays: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 700, 700, 700]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.5);
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(1) && d >= Duration::from_millis(500),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 1, "jitter should vary the delay");
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 0.0);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
