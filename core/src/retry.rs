//! When to try again after a failure that may pass (a timeout, a lock, a
//! deadlock): exponential backoff, capped, with equal jitter, and a bound on
//! the attempts. The outbox's `nudge.fail` applies the same rule in SQL.

/// The retry settings (`nudge.retry_base_seconds`, `nudge.retry_max_seconds`,
/// `nudge.max_attempts`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base_seconds: f64,
    pub max_seconds: f64,
    pub max_attempts: i32,
}

impl Backoff {
    /// The delay before the next attempt, in microseconds, after `failed`
    /// attempts have failed (1 after the first), or None when they are
    /// used up. `jitter` in [0, 1) picks a point in the upper half of the
    /// delay, so that a burst of failures does not retry in lockstep.
    pub fn delay_us(&self, failed: i32, jitter: f64) -> Option<i64> {
        if failed >= self.max_attempts {
            return None;
        }
        let exp = (failed.max(1) - 1).min(60);
        let delay = (self.base_seconds * 2f64.powi(exp))
            .min(self.max_seconds)
            .max(0.0);
        let delay = delay / 2.0 + jitter.clamp(0.0, 1.0) * delay / 2.0;
        Some((delay * 1e6) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base_seconds: 30.0,
        max_seconds: 3600.0,
        max_attempts: 5,
    };

    #[test]
    fn doubles_from_the_base_within_the_jitter_band() {
        assert_eq!(B.delay_us(1, 0.0), Some(15_000_000));
        assert_eq!(B.delay_us(1, 0.999_999_9).map(|d| d / 1_000_000), Some(29));
        assert_eq!(B.delay_us(2, 0.0), Some(30_000_000));
        assert_eq!(B.delay_us(4, 0.0), Some(120_000_000));
    }

    #[test]
    fn is_capped_and_bounded_in_attempts() {
        let b = Backoff {
            max_attempts: 100,
            ..B
        };
        assert_eq!(b.delay_us(40, 0.0), Some(1_800_000_000));
        assert_eq!(B.delay_us(5, 0.5), None);
        assert_eq!(B.delay_us(6, 0.5), None);
    }

    #[test]
    fn odd_settings_never_panic_or_go_negative() {
        let zero = Backoff {
            base_seconds: 0.0,
            max_seconds: 0.0,
            max_attempts: 3,
        };
        assert_eq!(zero.delay_us(1, 0.7), Some(0));
        assert_eq!(B.delay_us(0, 2.0), Some(30_000_000));
        assert_eq!(B.delay_us(i32::MIN, -1.0), Some(15_000_000));
    }
}
