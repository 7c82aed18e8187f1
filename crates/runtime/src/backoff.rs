use std::time::Duration;

/// Exponential backoff with "equal jitter": each delay is half the exponential step plus
/// a random part of the other half, capped at `max`. Jitter keeps a fleet of nodes that
/// lost the API server at the same moment from retrying in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// Start at `initial`, double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Self::with_seed(initial, max, seed)
    }

    /// As [`Backoff::new`] with a fixed jitter seed, for reproducible tests.
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            seed: seed | 1,
        }
    }

    /// Forget past failures (call after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let step = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: enough randomness for jitter, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = step / 2;
        let jitter_nanos = if half.as_nanos() == 0 {
            0
        } else {
            self.seed % (half.as_nanos() as u64 + 1)
        };
        half + Duration::from_nanos(jitter_nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_with_bounded_jitter() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 42);
        let mut prev_cap = Duration::ZERO;
        for i in 0..10u32 {
            let cap = (Duration::from_millis(100) * 2u32.pow(i)).min(Duration::from_secs(2));
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {i}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
