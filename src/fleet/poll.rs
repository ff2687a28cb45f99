//! Reading a registry policy at start ([`open`]) and the daemon's checks
//! for a new one ([`Poller`]): a manifest `HEAD` every `policy_poll` (±10 %
//! jitter), the body fetched by digest only when the digest changed, a
//! capped exponential backoff after failures, the last good policy kept.
//! The timing and the rollback rule are pure functions, tested alone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::last_good::{self, LastGood};
use super::{Fetched, FleetError, PolicyRef, PublicKey, fetch, fetch_current, validate};
use crate::clock::{Clock, random_fraction};
use crate::policy::Policy;
use crate::registry::Registry;

/// How long a start waits for the registry before running on the last
/// good policy (systemd's start timeout in the unit is 30 s).
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// The first retry after a failed check; doubling up to `policy_poll`.
const FIRST_RETRY: Duration = Duration::from_secs(2);

/// The wait before the next check: `interval` ±10 % (`fraction` in [0, 1)).
pub fn next_check(interval: Duration, fraction: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fraction)
}

/// The wait after `failures` failed checks in a row: 2 s doubling, capped
/// at `interval` (so a fleet converges within one poll of the registry's
/// return), ±10 %.
pub fn retry_after(failures: u32, interval: Duration, fraction: f64) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(20));
    next_check(doubled.min(interval), fraction)
}

/// No rollback by a replayed tag: a policy created before the one in force
/// is refused, unless the reference pins it by digest. Without a `created`
/// on the new one while the one in force has one, newer cannot be told.
pub fn rollback(
    new: Option<DateTime<Utc>>,
    in_force: Option<DateTime<Utc>>,
    pinned: bool,
) -> Result<(), String> {
    match (new, in_force) {
        _ if pinned => Ok(()),
        (Some(n), Some(c)) if n < c => Err(format!(
            "older than the policy in force (created {}, the one in force {}): a replayed tag? pin a digest to roll back",
            n.to_rfc3339(),
            c.to_rfc3339()
        )),
        (None, Some(c)) => Err(format!(
            "it has no org.opencontainers.image.created annotation and the policy in force was created {}: cannot tell it is newer",
            c.to_rfc3339()
        )),
        _ => Ok(()),
    }
}

/// A policy refused at the reference (the old one stays in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub at: DateTime<Utc>,
    /// The digest refused, when one was read.
    pub digest: Option<String>,
    pub reason: String,
}

/// What `status` and the metrics show about a registry policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteStatus {
    /// The reference (`oci://…`).
    pub source: String,
    /// Digest of the policy in force.
    pub digest: String,
    pub created: Option<DateTime<Utc>>,
    /// The policy in force came from the copy under `state_dir`.
    pub from_last_good: bool,
    /// Signatures are required (`--policy-key`).
    pub signed: bool,
    /// A digest-pinned reference: checked until read once, then never.
    pub pinned: bool,
    pub last_check: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// The registry has not answered since then.
    pub unreachable_since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub refused: Option<Refused>,
    pub next_check: Option<DateTime<Utc>>,
}

/// The registry lines of `stowage status`.
pub fn render(s: &RemoteStatus, at: DateTime<Utc>) -> String {
    let local = |t: DateTime<Utc>| {
        t.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let ago = |t: DateTime<Utc>| crate::fmt::human_age((at - t).num_seconds());
    let mut out = format!(
        "policy source: {} digest {}{}{}{}\n",
        s.source,
        s.digest,
        s.created
            .map(|c| format!(" (created {})", local(c)))
            .unwrap_or_default(),
        if s.signed { ", signature required" } else { "" },
        if s.pinned { ", pinned" } else { "" },
    );
    if s.from_last_good {
        out.push_str("  running on the last good policy kept in the state dir\n");
    }
    match (s.unreachable_since, &s.last_error) {
        (Some(since), e) => out.push_str(&format!(
            "  registry UNREACHABLE since {} ({} ago){}\n",
            local(since),
            ago(since),
            e.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        )),
        (None, _) => {
            if let Some(t) = s.last_success {
                out.push_str(&format!("  last check OK {} ({} ago)\n", local(t), ago(t)));
            }
        }
    }
    if let Some(r) = &s.refused {
        out.push_str(&format!(
            "  REFUSED at {}{}: {}\n",
            local(r.at),
            r.digest
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            r.reason.replace('\n', "\n    ")
        ));
    }
    if let Some(n) = s.next_check {
        out.push_str(&format!("  next check {}\n", local(n)));
    }
    out
}

/// The policy in force, as the rollback check and the poller see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub digest: String,
    pub created: Option<DateTime<Utc>>,
}

/// A registry policy read at start.
#[derive(Debug)]
pub struct Opened {
    pub policy: Policy,
    pub current: Current,
    pub status: RemoteStatus,
}

fn accept(
    fetched: &Fetched,
    r: &PolicyRef,
    state_dir: &std::path::Path,
    in_force: Option<DateTime<Utc>>,
) -> Result<Policy, FleetError> {
    let policy = validate(fetched, r, state_dir)?;
    rollback(fetched.created, in_force, r.pinned()).map_err(|why| FleetError::NotPolicy {
        reference: r.at_digest(&fetched.digest),
        why,
    })?;
    Ok(policy)
}

fn keep(state_dir: &std::path::Path, r: &PolicyRef, fetched: &Fetched, at: DateTime<Utc>) {
    let good = LastGood {
        source: r.to_string(),
        digest: fetched.digest.clone(),
        created: fetched.created,
        accepted: at,
        text: String::from_utf8_lossy(&fetched.text).into_owned(),
    };
    if let Err(e) = last_good::save(state_dir, &good) {
        tracing::warn!("{e}");
    }
}

/// Reads the policy `r` names now (within [`START_DEADLINE`]), validated
/// for this host's `state_dir`, signed with `key` when given, not older
/// than the last good one. When it cannot be read or is refused and
/// `fallback` is set, the last good policy kept under `state_dir` is used
/// (the status says why); `keep_good`: an accepted one is kept as the new
/// last good (the daemon; commands only read it).
pub async fn open(
    r: &PolicyRef,
    state_dir: &std::path::Path,
    key: Option<&PublicKey>,
    fallback: bool,
    keep_good: bool,
    at: DateTime<Utc>,
) -> Result<Opened, FleetError> {
    let last = match last_good::load(state_dir) {
        Ok(Some(g)) if g.source == r.to_string() => Some(g),
        Ok(Some(g)) => {
            tracing::warn!(
                "the last good policy in {} is of {}, not {r}: not used",
                state_dir.display(),
                g.source
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    let mut status = RemoteStatus {
        source: r.to_string(),
        signed: key.is_some(),
        pinned: r.pinned(),
        last_check: Some(at),
        ..RemoteStatus::default()
    };
    let registry = r.registry()?;
    let read = match tokio::time::timeout(START_DEADLINE, fetch_current(&registry, r, key)).await {
        Ok(read) => read,
        Err(_) => Err(FleetError::Input(format!(
            "{r}: the registry did not answer within {}s",
            START_DEADLINE.as_secs()
        ))),
    };
    let in_force = last.as_ref().and_then(|g| g.created);
    let error = match read.and_then(|f| accept(&f, r, state_dir, in_force).map(|p| (f, p))) {
        Ok((fetched, policy)) => {
            if keep_good && last.as_ref().is_none_or(|g| g.digest != fetched.digest) {
                keep(state_dir, r, &fetched, at);
            }
            status.digest = fetched.digest.clone();
            status.created = fetched.created;
            status.last_success = Some(at);
            return Ok(Opened {
                policy,
                current: Current {
                    digest: fetched.digest,
                    created: fetched.created,
                },
                status,
            });
        }
        Err(e) => e,
    };
    let Some(good) = last.filter(|_| fallback) else {
        return Err(error);
    };
    let reason = error.to_string();
    if matches!(error, FleetError::Input(_)) || error.retryable() {
        status.unreachable_since = Some(at);
        status.last_error = Some(reason.clone());
    } else {
        status.last_success = Some(at);
        status.refused = Some(Refused {
            at,
            digest: None,
            reason: reason.clone(),
        });
    }
    tracing::warn!(
        "{reason}; running on the last good policy {} (accepted {})",
        good.digest,
        good.accepted.to_rfc3339()
    );
    let fetched = Fetched {
        digest: good.digest.clone(),
        created: good.created,
        text: good.text.clone().into_bytes().into(),
    };
    let policy = validate(&fetched, r, state_dir)?;
    status.digest = good.digest.clone();
    status.created = good.created;
    status.from_last_good = true;
    Ok(Opened {
        policy,
        current: Current {
            digest: good.digest,
            created: good.created,
        },
        status,
    })
}

/// What the poller tells the daemon.
#[derive(Debug)]
pub enum Event {
    /// A new, valid, signed (when required), not older policy: apply it as
    /// a reload would.
    Accepted(Box<Policy>),
    /// The reference names a policy that is refused; the old one stays.
    Refused(Refused),
    /// A check ended (the status changed).
    Checked,
}

/// The daemon's checks of a registry policy.
pub struct Poller {
    pub r: PolicyRef,
    pub registry: Registry,
    pub key: Option<PublicKey>,
    pub state_dir: PathBuf,
    /// `policy_poll` of the policy in force.
    pub interval: Duration,
    pub current: Current,
    pub status: Arc<Mutex<RemoteStatus>>,
    pub clock: Arc<dyn Clock>,
    /// Check now (SIGHUP).
    pub wake: Arc<Notify>,
}

fn lock(status: &Mutex<RemoteStatus>) -> std::sync::MutexGuard<'_, RemoteStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

impl Poller {
    /// Checks until `events` is closed (the daemon stopped).
    pub async fn run<T: From<Event> + Send>(mut self, events: mpsc::Sender<T>) {
        // A start on the last good policy because the registry was down
        // retries soon, not a whole poll later.
        let mut failures = u32::from(lock(&self.status).unreachable_since.is_some());
        // A digest refused once is not fetched (nor reported) again.
        let mut refused: Option<String> = None;
        loop {
            let done = self.r.pinned() && self.current.digest == self.r.reference;
            let wait = if failures == 0 {
                next_check(self.interval, random_fraction())
            } else {
                retry_after(failures, self.interval, random_fraction())
            };
            lock(&self.status).next_check = (!done)
                .then(|| self.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default());
            tokio::select! {
                () = tokio::time::sleep(wait), if !done => {}
                () = self.wake.notified() => {}
                () = events.closed() => return,
            }
            if done {
                continue;
            }
            let event = self.check(&mut failures, &mut refused).await;
            if events.send(T::from(event)).await.is_err() {
                return;
            }
        }
    }

    /// One check: `HEAD`, and the artifact when its digest is new.
    async fn check(&mut self, failures: &mut u32, refused: &mut Option<String>) -> Event {
        let now = self.clock.now();
        lock(&self.status).last_check = Some(now);
        let r = &self.r;
        let digest = match self
            .registry
            .manifest_digest(&r.repository, &r.reference)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.failed(failures, e.into()),
        };
        if digest == self.current.digest || refused.as_deref() == Some(&digest) {
            self.succeeded(failures, now);
            return Event::Checked;
        }
        let read = fetch(&self.registry, r, &digest, self.key.as_ref()).await;
        let read =
            read.and_then(|f| accept(&f, r, &self.state_dir, self.current.created).map(|p| (f, p)));
        match read {
            Ok((fetched, policy)) => {
                self.succeeded(failures, now);
                keep(&self.state_dir, r, &fetched, now);
                tracing::info!("{r}: new policy {} accepted", fetched.digest);
                self.current = Current {
                    digest: fetched.digest.clone(),
                    created: fetched.created,
                };
                self.interval = policy.daemon.policy_poll;
                *refused = None;
                let mut status = lock(&self.status);
                status.digest = fetched.digest;
                status.created = fetched.created;
                status.from_last_good = false;
                status.refused = None;
                Event::Accepted(Box::new(policy))
            }
            Err(e) if e.retryable() => self.failed(failures, e),
            Err(e) => {
                self.succeeded(failures, now);
                let reason = e.to_string();
                tracing::error!(
                    "{r}: policy {digest} refused; the policy in force ({}) stays: {reason}",
                    self.current.digest
                );
                *refused = Some(digest.clone());
                let refusal = Refused {
                    at: now,
                    digest: Some(digest),
                    reason,
                };
                lock(&self.status).refused = Some(refusal.clone());
                Event::Refused(refusal)
            }
        }
    }

    fn succeeded(&self, failures: &mut u32, now: DateTime<Utc>) {
        let mut status = lock(&self.status);
        if let Some(since) = status.unreachable_since.take() {
            tracing::info!(
                "{}: the registry answers again (unreachable since {})",
                self.r,
                since.to_rfc3339()
            );
        }
        status.last_success = Some(now);
        status.last_error = None;
        *failures = 0;
    }

    fn failed(&self, failures: &mut u32, e: FleetError) -> Event {
        let now = self.clock.now();
        let message = e.to_string();
        let mut status = lock(&self.status);
        if status.last_error.as_deref() != Some(&message) {
            tracing::warn!(
                "{}: policy check failed (the policy in force stays): {message}",
                self.r
            );
        }
        status.unreachable_since.get_or_insert(now);
        status.last_error = Some(message);
        *failures = failures.saturating_add(1);
        Event::Checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_jittered_ten_percent_and_retries_capped_at_the_poll() {
        let poll = Duration::from_secs(10);
        assert_eq!(next_check(poll, 0.0), Duration::from_secs(9));
        assert_eq!(next_check(poll, 0.999), Duration::from_millis(10_998));
        let waits: Vec<u64> = (1..=6)
            .map(|n| retry_after(n, poll, 0.5).as_secs())
            .collect();
        assert_eq!(waits, [2, 4, 8, 10, 10, 10]);
        assert_eq!(retry_after(u32::MAX, poll, 0.5), poll);
    }

    #[test]
    fn an_older_policy_is_refused_unless_pinned() {
        let t = |s: i64| DateTime::from_timestamp(s, 0);
        assert!(rollback(t(2), t(1), false).is_ok());
        assert!(
            rollback(t(1), t(1), false).is_ok(),
            "the same time: a re-push"
        );
        let e = rollback(t(1), t(2), false).unwrap_err();
        assert!(e.contains("older than the policy in force"), "{e}");
        assert!(rollback(t(1), t(2), true).is_ok(), "pinned by digest");
        assert!(rollback(None, t(2), false).is_err());
        assert!(rollback(None, None, false).is_ok());
        assert!(rollback(t(1), None, false).is_ok());
    }
}
