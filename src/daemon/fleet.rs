//! The daemon's side of a registry policy: the poller's events (a new
//! policy applied as a reload, a refused one reported in `status`, the log
//! and an audit `warn`), its view in `status` and the metrics, and the
//! schedule shifted per host.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Daemon, Remote, lock};
use crate::audit::{Action, AuditLog, Outcome, Record};
use crate::engine::{Engine, EngineResult};
use crate::fleet::poll::{Event, RemoteStatus};
use crate::status::Dated;

/// The most a host's fires are shifted: a quarter of the schedule's period,
/// at most this.
const MAX_SPREAD: Duration = Duration::from_secs(15 * 60);

pub(super) fn snapshot(remote: &Remote) -> RemoteStatus {
    remote
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// This host's place in `[0, 1)`: stable across restarts (machine id, or
/// host name, and the state dir, so daemons sharing a machine differ).
pub(super) fn host_fraction(state_dir: &Path) -> f64 {
    let id = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.trim().hash(&mut h);
    state_dir.hash(&mut h);
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// The next fire of `schedule` after `at`, every fire shifted by
/// `fraction` of a quarter of the period (at most [`MAX_SPREAD`]).
pub(super) fn spread_fire(
    schedule: &cron::Schedule,
    at: DateTime<Utc>,
    fraction: f64,
) -> Option<DateTime<Utc>> {
    let mut fires = schedule.after(&at);
    let (a, b) = (fires.next()?, fires.next());
    let period = b.map_or(Duration::ZERO, |b| (b - a).to_std().unwrap_or_default());
    let offset = (period / 4).min(MAX_SPREAD).mul_f64(fraction);
    let offset = chrono::Duration::from_std(offset).unwrap_or_default();
    schedule.after(&(at - offset)).next().map(|t| t + offset)
}

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    pub(super) fn on_fleet(&mut self, event: Event) {
        match event {
            Event::Checked => {}
            Event::Accepted(policy) => {
                self.notifier.reloading();
                let digest = self
                    .remote
                    .as_ref()
                    .map(|r| snapshot(r).digest)
                    .unwrap_or_default();
                tracing::info!(
                    "registry policy {} ({digest}) in force: {}",
                    policy.source.display(),
                    policy.summary()
                );
                self.install(*policy);
                self.notifier.ready("registry policy applied");
                self.request(None);
            }
            Event::Refused(refused) => {
                let policy = self.policy();
                let message = format!(
                    "registry policy{} refused, the policy in force stays: {}",
                    refused
                        .digest
                        .as_deref()
                        .map(|d| format!(" {d}"))
                        .unwrap_or_default(),
                    refused.reason
                );
                self.metrics.reload_error();
                self.view().reload_error = Some(Dated {
                    at: refused.at,
                    message: message.clone(),
                });
                self.note_error(message);
                let record = Record {
                    ts: refused.at,
                    run: crate::reconcile::run_id(refused.at),
                    action: Action::Warn,
                    reference: Some(match &refused.digest {
                        Some(d) => self
                            .remote_reference()
                            .map_or_else(|| d.clone(), |r| format!("{r}@{d}")),
                        None => policy.source.display().to_string(),
                    }),
                    image: None,
                    rule: Some("policy".to_owned()),
                    reason: refused.reason,
                    outcome: Outcome::Failed,
                    error: None,
                    bytes: None,
                    duration_ms: None,
                    resumed_bytes: None,
                };
                let mut log =
                    AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
                log.append(&record);
            }
        }
        self.on_fleet_checked();
    }

    /// `oci://host/repo` of the registry policy, for audit records.
    fn remote_reference(&self) -> Option<String> {
        let source = snapshot(self.remote.as_ref()?).source;
        let r = crate::fleet::PolicyRef::parse(&source).ok()?;
        Some(format!("oci://{}/{}", r.host, r.repository))
    }

    /// Copies the poller's view into `status` and the metrics.
    pub(super) fn on_fleet_checked(&mut self) {
        let Some(remote) = &self.remote else { return };
        let status = snapshot(remote);
        self.metrics.policy_remote(
            &status.source,
            &status.digest,
            status
                .last_success
                .map(|t| t.timestamp_millis() as f64 / 1000.0),
        );
        lock(&self.shared.view).policy_remote = Some(status);
    }

    /// SIGHUP with a registry policy: check it now.
    pub(super) fn poll_now(&mut self) {
        if let Some(remote) = &self.remote {
            tracing::info!("SIGHUP: checking the registry policy now");
            remote.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn hosts_spread_over_a_quarter_of_the_period() {
        let every_ten = cron::Schedule::from_str("0 */10 * * * *").unwrap();
        let at = DateTime::parse_from_rfc3339("2025-01-01T00:00:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let fire = |f| spread_fire(&every_ten, at, f).unwrap().to_rfc3339();
        assert_eq!(fire(0.0), "2025-01-01T00:10:00+00:00");
        assert_eq!(fire(0.5), "2025-01-01T00:01:15+00:00", "shifted 75 s");
        assert_eq!(
            fire(0.1),
            "2025-01-01T00:10:15+00:00",
            "15 s: 00:00:15 has passed"
        );
        assert!(host_fraction(Path::new("/a")) != host_fraction(Path::new("/b")));
    }
}
