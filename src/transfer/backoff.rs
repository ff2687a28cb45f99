//! Pure: when a reference is tried again. A failed transfer backs off
//! exponentially with jitter ([`next_backoff`], kept in the state); a
//! reference backing off is [`Waiting`]; a refresh is due when its schedule
//! fired since the last check.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::policy::{Policy, Prepull, Refresh};
use crate::state::{Backoff, State};

/// First retry delay; doubles per consecutive failure up to `retry_max`.
const BACKOFF_BASE_SECS: u64 = 10;

/// A transfer not attempted this reconcile because its reference backs off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiting {
    pub action: &'static str,
    #[serde(rename = "ref")]
    pub reference: String,
    pub rule: String,
    pub failures: u32,
    /// Unix seconds.
    pub next_attempt: i64,
    pub last_error: String,
}

impl Waiting {
    pub fn reason(&self) -> String {
        format!(
            "backing off after {} failure{}: next attempt at {} (last error: {})",
            self.failures,
            if self.failures == 1 { "" } else { "s" },
            DateTime::from_timestamp(self.next_attempt, 0)
                .map_or_else(|| self.next_attempt.to_string(), |t| t.to_rfc3339()),
            self.last_error
        )
    }
}

/// Whether the `refresh` schedule of `p` has fired since its last check.
pub(super) fn refresh_due(
    policy: &Policy,
    p: &Prepull,
    last_checked: Option<i64>,
    now: i64,
) -> bool {
    let schedule = match &p.refresh {
        Refresh::Never => return false,
        Refresh::Daemon => &policy.daemon.schedule,
        Refresh::Cron(c) => c,
    };
    let Some(last) = last_checked.and_then(|t| DateTime::<Utc>::from_timestamp(t, 0)) else {
        return true;
    };
    schedule
        .schedule
        .after(&last)
        .next()
        .is_some_and(|t| t.timestamp() <= now)
}

/// `Some(waiting)` when `key` backs off at `now`.
pub(super) fn backing_off(
    state: &State,
    key: &str,
    action: &'static str,
    reference: &str,
    rule: &str,
    now: i64,
) -> Option<Waiting> {
    let b = state.backoff.get(key)?;
    (b.next_attempt > now).then(|| Waiting {
        action,
        reference: reference.to_owned(),
        rule: rule.to_owned(),
        failures: b.failures,
        next_attempt: b.next_attempt,
        last_error: b.last_error.clone(),
    })
}

/// The next backoff after one more failure: `BASE * 2^(failures-1)`, capped
/// at `retry_max`, with jitter (50–100 %) derived from the key and time, so
/// that hosts of a fleet failing together do not retry together.
pub fn next_backoff(
    previous: Option<&Backoff>,
    key: &str,
    error: &str,
    now: i64,
    retry_max: Duration,
) -> Backoff {
    let failures = previous.map_or(0, |b| b.failures).saturating_add(1);
    let exp = BACKOFF_BASE_SECS.saturating_mul(1u64 << (failures - 1).min(32));
    let capped = exp.min(retry_max.as_secs().max(1));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, failures, now).hash(&mut h);
    let fraction = 0.5 + (h.finish() % 1000) as f64 / 2000.0;
    let delay = ((capped as f64) * fraction).round().max(1.0) as i64;
    Backoff {
        failures,
        next_attempt: now.saturating_add(delay),
        last_error: error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::fixtures::{NOW, observed, policy};
    use crate::transfer::pull_intents;

    #[test]
    fn backoff_holds_a_reference_back_and_grows_to_the_cap() {
        let p = policy("[daemon]\nretry_max = \"1m\"\n[[prepull]]\nimage = \"r.local/app:1\"\n");
        let mut st = State::default();
        let b1 = next_backoff(None, "pull r.local/app:1", "down", NOW, p.daemon.retry_max);
        assert_eq!(b1.failures, 1);
        assert!((NOW + 5..=NOW + 10).contains(&b1.next_attempt), "{b1:?}");
        let mut b = b1.clone();
        for _ in 0..10 {
            b = next_backoff(
                Some(&b),
                "pull r.local/app:1",
                "down",
                NOW,
                p.daemon.retry_max,
            );
        }
        assert!((NOW + 30..=NOW + 60).contains(&b.next_attempt), "{b:?}");
        st.backoff.insert("pull r.local/app:1".into(), b1.clone());
        let i = pull_intents(&p, &observed(vec![]), &st, NOW + 1, false);
        assert!(i.due.is_empty());
        assert_eq!(i.waiting.len(), 1);
        assert!(i.waiting[0].reason().contains("last error: down"));
        let i = pull_intents(&p, &observed(vec![]), &st, b1.next_attempt, false);
        assert_eq!(i.due.len(), 1);
    }
}
