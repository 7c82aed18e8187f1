use std::time::Duration;

/// Exponential backoff with jitter, capped at `max`. "Equal jitter" (the default): each
/// delay is half the exponential step plus a random part of the other half. "Full jitter"
/// ([`Backoff::full_jitter`]): anywhere from zero to the step, which spreads a fleet's
/// retries most evenly — what reconnects after an outage use. Jitter keeps a fleet of
/// nodes that lost the API server at the same moment from retrying in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
    full: bool,
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
            full: false,
        }
    }

    /// Full jitter: each delay uniform in `[0, step]`.
    pub fn full_jitter(mut self) -> Self {
        self.full = true;
        self
    }

    /// The step of the next attempt without jitter (the most it can wait).
    fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Forget past failures (call after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: enough randomness for jitter, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let (floor, spread) = if self.full {
            (Duration::ZERO, step)
        } else {
            (step / 2, step / 2)
        };
        let jitter_nanos = if spread.as_nanos() == 0 {
            0
        } else {
            self.seed % (spread.as_nanos() as u64 + 1)
        };
        floor + Duration::from_nanos(jitter_nanos)
    }
}

/// A duration uniform in `[min, max]`, for timers a fleet must not run in step (resyncs,
/// watch lifetimes).
pub fn jittered(min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    let mut b = Backoff::new(max - min, max - min).full_jitter();
    min + b.next_delay()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_spreads_over_the_whole_step() {
        let mut b =
            Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(600), 7).full_jitter();
        // Reach the cap, then look at where 2,000 delays fall: all within [0, cap], and
        // in every tenth of it (equal jitter would never go below half).
        for _ in 0..12 {
            b.next_delay();
        }
        let mut deciles = [0usize; 10];
        for _ in 0..2000 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(600), "{d:?}");
            deciles[((d.as_secs_f64() / 60.0) as usize).min(9)] += 1;
        }
        assert!(
            deciles.iter().all(|n| (120..=280).contains(n)),
            "{deciles:?}"
        );
    }

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
