//! Starting a reconcile (with the held state and the marks so far) and
//! taking its result: the view, metrics, waiters.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::engine::{Engine, EngineResult};
use crate::reconcile::{self, ReconcileError};
use crate::status::ReconcileResult;

use super::handler::lock;
use super::holder::{Held, Snapshot, hold, snapshot_of};
use super::{Daemon, events};

/// A finished reconcile task.
pub(super) struct Finished {
    pub(super) started: DateTime<Utc>,
    pub(super) elapsed: Duration,
    pub(super) result: Result<reconcile::Report, ReconcileError>,
    /// The state, given back.
    pub(super) held: Held,
    pub(super) snapshot: Snapshot,
}

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    pub(super) fn maybe_start_reconcile(&mut self) {
        if self.running.is_some() || self.flushing.is_some() || self.stop.is_cancelled() {
            return;
        }
        let Some(engine) = self.engine() else { return };
        if self.pending.is_none() {
            return;
        }
        let policy = self.policy();
        if !self.owns_state(&policy) {
            return;
        }
        let Some(waiters) = self.pending.take() else {
            return;
        };
        // The reconcile borrows the state with the marks so far in it, and
        // saves both; the loop writes nothing meanwhile.
        let held = self.state.take();
        let marks = events::take(&self.marks);
        let clock = self.clock.clone();
        let stop = self.stop.clone();
        let inbox = std::mem::take(&mut self.inbox_ready);
        self.notifier.status("reconciling");
        self.running_engine = Some(engine.clone());
        let task = tokio::spawn(async move {
            let started = clock.now();
            let t0 = Instant::now();
            let dir = policy.daemon.state_dir.clone();
            // Bundles first: the reconcile (its pre-pulls) sees their images.
            if !inbox.is_empty() && !policy.daemon.dry_run {
                super::inbox::process(&*engine, &policy, &*clock, &stop, inbox).await;
            }
            let mut held = hold(held, &dir, started.timestamp()).await;
            if !marks.is_empty() {
                marks.apply(&mut held.state);
                held.unsaved = true;
            }
            let result = reconcile::reconcile_state(
                &*engine,
                &policy,
                &*clock,
                reconcile::Options::default(),
                &stop,
                &mut held.state,
            )
            .await
            .map(|(_, report)| report);
            if !policy.daemon.dry_run && matches!(&result, Ok(r) if r.unsaved.is_none()) {
                held.unsaved = false;
            }
            let (held, snapshot) = snapshot_of(held, None).await;
            Finished {
                started,
                elapsed: t0.elapsed(),
                result,
                held,
                snapshot,
            }
        });
        self.running = Some(task);
        self.running_waiters = waiters;
    }

    pub(super) fn on_finished(&mut self, finished: Option<Finished>) {
        self.running = None;
        self.running_engine = None;
        let waiters = std::mem::take(&mut self.running_waiters);
        let now = self.clock.now();
        let Some(f) = finished else {
            // The state went with it: loaded again by the next user.
            let message = "the reconcile task panicked".to_owned();
            tracing::error!("{message}");
            self.note_error(message);
            return;
        };
        let duration_ms = u64::try_from(f.elapsed.as_millis()).unwrap_or(u64::MAX);
        self.state = Some(f.held);
        *lock(&self.shared.snapshot) = f.snapshot;
        let result = match &f.result {
            Ok(report) => {
                tracing::info!(
                    "reconcile {} done in {duration_ms} ms: {}",
                    report.run,
                    report.summary()
                );
                if report.failed > 0 {
                    self.note_error(format!(
                        "reconcile {}: {} action(s) failed (see `stowage history`)",
                        report.run, report.failed
                    ));
                }
                ReconcileResult {
                    run: report.run.clone(),
                    started: f.started,
                    finished: now,
                    duration_ms,
                    failed: report.failed,
                    summary: report.summary(),
                    error: None,
                }
            }
            Err(e) => {
                tracing::error!("reconcile could not run: {e}");
                self.note_error(format!("reconcile could not run: {e}"));
                ReconcileResult {
                    run: String::new(),
                    started: f.started,
                    finished: now,
                    duration_ms,
                    failed: 0,
                    summary: format!("could not run: {e}"),
                    error: Some(e.to_string()),
                }
            }
        };
        let failed = result.error.is_some() || result.failed > 0;
        let (records, images, pulls, trash) = match &f.result {
            Ok(report) => (
                report.records.clone(),
                report.images,
                report.pulls,
                report.trash,
            ),
            Err(_) => (Default::default(), None, Default::default(), None),
        };
        self.metrics.pulls(&pulls);
        self.metrics.reconciled(
            now.timestamp_millis() as f64 / 1000.0,
            f.elapsed,
            failed,
            &records,
        );
        if let Some((count, bytes)) = images {
            self.metrics.images(count, bytes);
        }
        if let Some(t) = trash {
            self.metrics.trash(t);
        }
        self.notifier.status(&format!(
            "last reconcile {}: {}",
            now.with_timezone(&chrono::Local).format("%H:%M:%S"),
            result.summary
        ));
        {
            let mut view = self.view();
            view.reconciles += 1;
            view.last_reconcile = Some(result.clone());
            view.pulls.add(&pulls);
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        if let Err(ReconcileError::Engine(e)) = &f.result
            && e.is_unreachable()
        {
            self.engine_lost(&e.to_string());
        }
    }
}
