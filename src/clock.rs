//! The one source of time outside tests, and the jitter of retry delays.
//! The planner never reads it: the instant it plans for is passed in (`at`).
//! In the code, `now` is a clock reading just taken; an instant handed to a
//! function or kept in a field is `at`.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A source of time, so tests can fix it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// `delay` shortened by up to half, so that retries of many waiters (or of
/// hosts failing together) spread out.
pub fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + random_fraction() / 2.0)
}

/// A random number in `[0, 1)`, in steps of 1/1000: jitter, not secrets.
pub fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh random seed per call is all the randomness needed here.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() % 1000) as f64 / 1000.0
}
