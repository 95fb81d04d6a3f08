//! Retry backoff: exponential with full jitter (AWS Architecture Blog, "Exponential
//! Backoff And Jitter"): `delay = uniform(0, min(cap, base * 2^(attempt-1)))`.
//! The random draw is passed in, so tests pin it without a clock or a seed.

use std::time::Duration;

/// The ceiling for `attempt` (1-based): `min(cap, base * 2^(attempt-1))`.
pub fn ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(63);
    let factor = 1u64.checked_shl(exp).unwrap_or(u64::MAX);
    let nanos = (base.as_nanos()).saturating_mul(u128::from(factor));
    Duration::from_nanos(nanos.min(cap.as_nanos()).min(u128::from(u64::MAX)) as u64)
}

/// Full-jitter delay for `attempt`, given a uniform draw `u` in `[0, 1)`.
pub fn full_jitter(attempt: u32, base: Duration, cap: Duration, u: f64) -> Duration {
    ceiling(attempt, base, cap).mul_f64(u.clamp(0.0, 1.0))
}

/// Full-jitter delay with a thread-local random draw.
pub fn delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    full_jitter(attempt, base, cap, rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let cap = Duration::from_secs(60);
        assert_eq!(ceiling(1, S, cap), S);
        assert_eq!(ceiling(2, S, cap), 2 * S);
        assert_eq!(ceiling(6, S, cap), 32 * S);
        assert_eq!(ceiling(7, S, cap), cap);
        assert_eq!(ceiling(1_000, S, cap), cap, "huge attempts do not overflow");
        assert_eq!(ceiling(0, S, cap), S, "attempt 0 treated as the first");
    }

    #[test]
    fn jitter_spans_zero_to_ceiling() {
        let cap = Duration::from_secs(3600);
        assert_eq!(full_jitter(3, S, cap, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(3, S, cap, 0.5), 2 * S);
        assert_eq!(full_jitter(3, S, cap, 1.0), 4 * S);
        assert_eq!(full_jitter(3, S, cap, 7.0), 4 * S, "draw clamped");
    }

    #[test]
    fn random_delays_stay_within_bounds_and_vary() {
        let cap = Duration::from_secs(10);
        let ds: Vec<Duration> = (0..200).map(|_| delay(5, S, cap)).collect();
        assert!(ds.iter().all(|d| *d <= cap));
        let distinct: std::collections::BTreeSet<_> = ds.iter().collect();
        assert!(distinct.len() > 100, "jitter is not constant");
    }
}
