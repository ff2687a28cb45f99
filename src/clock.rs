//! The one source of time outside tests. The planner never reads it: the
//! instant it plans for is passed in (`at`). In the code, `now` is a clock
//! reading just taken; an instant handed to a function or kept in a field is
//! `at`.

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
