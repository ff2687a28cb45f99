//! One reconcile: observe the engine and the state, plan, execute, record.
//!
//! Every change to the engine goes through [`execute`] (see [`execute`'s
//! module](self::execute)): a safe order, a re-check right before each
//! removal, never forced, one audit record per action.

mod execute;
pub mod trash_journal;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, AuditLog};
use crate::blocking::off_loop;
use crate::engine::{Engine, EngineError};
use crate::fmt::human_bytes;
use crate::observe::{Observed, add_storage, noted, observe, observe_for};
use crate::plan::{self, Kind, Plan};
use crate::policy::Policy;
use crate::state::{State, StateError, StateStore};
use crate::transfer;

// Re-exported under their old paths (tests, benches and examples name them so).
pub use crate::clock::{Clock, SystemClock};
pub use execute::{execute, execute_on};

/// Why a reconcile could not run at all (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What one execution did, for the exit code, logs and `STATUS=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub run: String,
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
    pub deferred: usize,
    pub dry_run: usize,
    pub warnings: usize,
    pub removed: usize,
    pub untagged: usize,
    pub tagged: usize,
    pub bytes_freed: u64,
    /// Images pre-pulled (`[[prepull]]`).
    pub pulled: usize,
    /// References pushed to mirrors (`[[mirror]]`).
    pub pushed: usize,
    /// Transfers not attempted because their reference backs off after
    /// earlier failures: the host is not yet as declared.
    pub backing_off: usize,
    /// Images the execution put in the trash, with their state entries.
    pub trashed: Vec<(String, crate::trash::Entry)>,
    /// Set when shutdown stopped the execution between two actions.
    pub interrupted: bool,
    /// Why the state could not be saved at the end of the reconcile (a full
    /// disk, usually): the next reconcile tries again.
    pub unsaved: Option<String>,
    /// Audit records held in memory at the end, not yet written.
    pub audit_held: usize,
    /// What this reconcile's audit records say, counted as written (the
    /// daemon's metrics).
    pub records: audit::Tally,
    /// `(count, bytes)` of the images after a reconcile that ran to its
    /// end, from its observation (the daemon's gauges).
    pub images: Option<(u64, u64)>,
    /// What the trash holds after that reconcile (the daemon's gauges).
    pub trash: Option<crate::trash::Totals>,
    /// What the pulls moved over the network, resumed and found corrupt.
    pub pulls: transfer::PullCounters,
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "removed {}, untagged {}, tagged {}, failed {}, skipped {}, deferred {}",
            self.removed, self.untagged, self.tagged, self.failed, self.skipped, self.deferred
        );
        if self.pulled + self.pushed + self.backing_off > 0 {
            s.push_str(&format!(
                ", pulled {}, pushed {}, backing off {}",
                self.pulled, self.pushed, self.backing_off
            ));
        }
        if !self.pulls.is_zero() {
            s.push_str(&format!(
                ", received {} (resumed {}, verification failures {})",
                human_bytes(self.pulls.bytes_received),
                human_bytes(self.pulls.resumed_bytes),
                self.pulls.verify_failures
            ));
        }
        if !self.trashed.is_empty() {
            s.push_str(&format!(", to the trash {}", self.trashed.len()));
        }
        if self.dry_run > 0 {
            s.push_str(&format!(", dry-run {}", self.dry_run));
        }
        s.push_str(&format!(", freed {}", human_bytes(self.bytes_freed)));
        if self.interrupted {
            s.push_str(" (interrupted by shutdown)");
        }
        if let Some(e) = &self.unsaved {
            s.push_str(&format!("; state NOT saved: {e}"));
        }
        if self.audit_held > 0 {
            s.push_str(&format!(
                "; {} audit record(s) NOT written yet",
                self.audit_held
            ));
        }
        s
    }
}

/// A reconcile id: time plus process id, readable and unique enough per host.
pub fn run_id(at: DateTime<Utc>) -> String {
    format!(
        "{}-{:x}",
        at.format("%Y%m%dT%H%M%S%.3fZ"),
        std::process::id()
    )
}

/// Observe, plan: the read-only half of a reconcile (`stowage plan`).
pub async fn plan_now<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &State,
    at: DateTime<Utc>,
) -> Result<(Observed, Plan), EngineError> {
    let mut state = state.clone();
    let observed = observe_for(engine, policy, &mut state, at.timestamp()).await?;
    let policy = policy.clone();
    Ok(off_loop(move || {
        let plan = plan::plan(&policy, &observed, &state, at.timestamp());
        (observed, plan)
    })
    .await)
}

/// [`StateStore::save`] off the async threads: serialising a large state and
/// its fsyncs take long. Gives the state back.
async fn save_state(store: &StateStore, state: State) -> (State, Result<(), StateError>) {
    let store = store.clone();
    off_loop(move || {
        let saved = store.save(&state);
        (state, saved)
    })
    .await
}

/// How one reconcile runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Plan and record, change nothing (also `[daemon].dry_run`).
    pub dry_run: bool,
    /// Treat every pre-pull `refresh` as due: a one-shot `stowage apply`
    /// checks the registries now rather than waiting for a schedule.
    pub force_refresh: bool,
}

/// One whole reconcile: load state, then [`reconcile_state`].
pub async fn reconcile_with<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    options: Options,
    shutdown: &CancellationToken,
) -> Result<(Plan, Report), ReconcileError> {
    let store = StateStore::new(&policy.daemon.state_dir);
    let now = clock.now().timestamp();
    // A dry run changes nothing, not even a corrupt state's place: it needs
    // no ownership of the state (`stowage apply --dry-run` beside the daemon).
    let readonly = options.dry_run || policy.daemon.dry_run;
    let loaded = off_loop(move || {
        if readonly {
            store.load_readonly(now)
        } else {
            store.load(now)
        }
    })
    .await;
    if let Some(w) = &loaded.warning {
        tracing::warn!("{w}");
    }
    let mut state = loaded.state;
    reconcile_state(engine, policy, clock, options, shutdown, &mut state).await
}

/// One whole reconcile on a state its caller holds (the daemon keeps it in
/// memory; `apply` loads it): observe once, transfers (pre-pulls, then
/// mirror pushes), plan retention, execute, save the state. The engine is
/// listed once (again only after pulls changed it); the executor keeps the
/// observation current, and the `Report` carries the counts and gauges.
/// In a dry run `state` is left as it came.
///
/// A failed state or audit write never ends the reconcile: on a full disk
/// eviction is what frees it. Audit records are held until they can be
/// written (see [`crate::audit`]); a failed state save is logged and tried
/// again at the end of the reconcile, then by the next one.
pub async fn reconcile_state<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    options: Options,
    shutdown: &CancellationToken,
    state: &mut State,
) -> Result<(Plan, Report), ReconcileError> {
    let dry_run = options.dry_run || policy.daemon.dry_run;
    if dry_run {
        // Worked on a copy: what a dry run notes is not kept.
        let mut copy = state.clone();
        return run_reconcile(engine, policy, clock, options, shutdown, &mut copy).await;
    }
    run_reconcile(engine, policy, clock, options, shutdown, state).await
}

async fn run_reconcile<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    options: Options,
    shutdown: &CancellationToken,
    state: &mut State,
) -> Result<(Plan, Report), ReconcileError> {
    let dry_run = options.dry_run || policy.daemon.dry_run;
    let store = StateStore::new(&policy.daemon.state_dir);
    let now = clock.now();
    let run = run_id(now);
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    audit.set_previously_stated(state.reported.clone());
    let mut observed;
    (*state, observed) = noted(
        std::mem::take(state),
        observe(engine).await?,
        now.timestamp(),
    )
    .await;
    // Trash entries a killed run journaled but never saved.
    let journal_path = trash_journal::path_in(&policy.daemon.state_dir);
    let journaled = {
        let path = journal_path.clone();
        off_loop(move || trash_journal::read(&path)).await
    };
    let had_journal = !journaled.is_empty();
    let recovered = crate::trash::recover(state, journaled, &observed.images);
    if recovered > 0 {
        tracing::info!(
            "{recovered} trash entr(ies) recovered from {} (a run stopped before saving them)",
            journal_path.display()
        );
    }
    // Transfers come first so that retention plans on the store as the
    // pulls left it (a freshly pulled image is never a removal candidate).
    let phase = transfer::Phase {
        engine,
        policy,
        run_id: &run,
        options: transfer::RunOptions {
            dry_run,
            force_refresh: options.force_refresh,
        },
        clock,
        shutdown,
    };
    let transfers = transfer::run(&phase, &mut observed, state, &mut audit).await?;
    let has_transfers = !policy.prepull.is_empty() || !policy.mirror.is_empty();
    let stopped = shutdown.is_cancelled();
    if !dry_run && (has_transfers || stopped) {
        // Backoff must survive a crash later in this reconcile, and what the
        // transfers finished (`previous`, refresh checks) a shutdown. On a
        // full disk this fails: eviction below may free it for the final save.
        let saved;
        (*state, saved) = save_state(&store, std::mem::take(state)).await;
        if let Err(e) = saved {
            tracing::error!("{e}; going on (eviction may free space), saving again at the end");
        }
    }
    if stopped {
        // Shutdown during the transfers: retention waits for the next start.
        let mut report = Report {
            run,
            interrupted: true,
            ..Report::default()
        };
        add_transfers(&mut report, &transfers);
        audit.sync().await;
        report.audit_held = audit.held();
        report.records = audit.tally().clone();
        return Ok((Plan::default(), report));
    }
    if transfers.stale {
        observed = observe(engine).await?;
        observed.downloading = transfers.downloading.clone();
    }
    if transfers.changed {
        (*state, observed) = noted(std::mem::take(state), observed, clock.now().timestamp()).await;
    }
    add_storage(engine, policy, state, &mut observed).await?;
    let (planned_state, observed, plan) = {
        let policy = policy.clone();
        let state = std::mem::take(state);
        off_loop(move || {
            let plan = plan::plan_to_apply(&policy, &observed, &state, now.timestamp());
            (state, observed, plan)
        })
        .await
    };
    *state = planned_state;
    let mut observed = observed;
    let mut plan = plan;
    if !dry_run && !plan.trash.is_empty() {
        plan.trash_journal = Some(journal_path.clone());
    }
    let mut report = execute_on(
        engine,
        &plan,
        &mut observed,
        &mut audit,
        &run,
        dry_run,
        clock,
        shutdown,
    )
    .await?;
    add_transfers(&mut report, &transfers);
    if !report.interrupted {
        report.images = Some(observed.totals());
        report.trash = Some(crate::trash::totals(&observed.images));
    }
    if !dry_run {
        // Forget what is gone (the observation follows what the engine
        // removed); the next observation adds what is new.
        let gone: std::collections::HashSet<&str> = plan
            .actions
            .iter()
            .filter(|a| matches!(a.kind, Kind::Remove | Kind::Evict))
            .map(|a| a.image.as_str())
            .collect();
        state.images.retain(|id, _| !gone.contains(id.as_str()));
        state.reported = audit.stated().clone();
        crate::trash::settle(
            state,
            report.trashed.clone(),
            &observed.images,
            clock.now().timestamp(),
        );
        let saved;
        (*state, saved) = save_state(&store, std::mem::take(state)).await;
        match saved {
            Err(e) => {
                tracing::error!("{e}; the next reconcile saves again");
                report.unsaved = Some(e.to_string());
            }
            // Saved: the journal keeps only what this run journaled and the
            // state lacks (a trash stopped halfway by an engine error: the
            // next reconcile sees whether its reference holds the image).
            Ok(()) if had_journal || plan.trash_journal.is_some() => {
                let (path, trash, since) =
                    (journal_path.clone(), state.trash.clone(), now.timestamp());
                off_loop(move || {
                    let mut left = trash_journal::read(&path);
                    left.retain(|id, e| {
                        e.removed_at >= since
                            && trash.get(id).is_none_or(|t| t.reference != e.reference)
                    });
                    trash_journal::settle(&path, &left);
                })
                .await;
            }
            Ok(()) => {}
        }
    }
    report.audit_held = audit.held();
    report.records = audit.tally().clone();
    Ok((plan, report))
}

/// Count what the transfer phase did into a reconcile's report.
fn add_transfers(report: &mut Report, transfers: &transfer::TransferReport) {
    report.pulled = transfers.pulled;
    report.pushed = transfers.pushed;
    report.backing_off = transfers.backing_off;
    report.tagged += transfers.tagged;
    report.untagged += transfers.untagged;
    report.failed += transfers.failed;
    report.ok += transfers.pulled + transfers.pushed + transfers.tagged + transfers.untagged;
    report.dry_run += transfers.dry_run;
    report.interrupted |= transfers.interrupted;
    report.pulls = transfers.counters;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::Outcome;
    use crate::engine::fake::FakeEngine;
    use crate::engine::{Image, Layer};
    use crate::fixture::FixedClock;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;
    const MB: u64 = 1_000_000;

    fn image(hex: &str, days: i64, tag: &str) -> Image {
        Image {
            id: format!("sha256:{hex:0<64}"),
            repo_tags: vec![tag.to_owned()],
            repo_digests: vec![],
            created: NOW - days * DAY,
            size: MB,
        }
    }

    /// `app:1` to `app:3`, oldest first, and `other:1` that no rule scopes.
    fn engine() -> FakeEngine {
        FakeEngine::new(
            vec![
                image("a1", 30, "app:1"),
                image("a2", 20, "app:2"),
                image("a3", 10, "app:3"),
                image("b1", 40, "other:1"),
            ],
            vec![],
        )
    }

    fn policy(dir: &Path, extra: &str) -> Policy {
        let text = format!(
            "version = 1\n[daemon]\nstate_dir = {:?}\nmin_age = \"1h\"\n\
             [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n{extra}",
            dir.display().to_string()
        );
        crate::policy::parse(&text, Path::new("test.toml")).expect("a valid test policy")
    }

    async fn run(engine: &FakeEngine, policy: &Policy, dry_run: bool) -> (Plan, Report) {
        let options = Options {
            dry_run,
            force_refresh: false,
        };
        reconcile_with(
            engine,
            policy,
            &FixedClock(NOW),
            options,
            &CancellationToken::new(),
        )
        .await
        .expect("the reconcile runs")
    }

    #[tokio::test]
    async fn a_reconcile_applies_records_and_saves_then_has_nothing_left_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path(), "");
        let engine = engine();

        let (plan, report) = run(&engine, &policy, false).await;
        assert_eq!(plan.actions.len(), 2, "{}", plan::render(&plan));
        assert_eq!((report.removed, report.failed, report.ok), (2, 0, 2));
        assert_eq!(report.bytes_freed, 2 * MB);
        assert_eq!(engine.references(), vec!["app:3", "other:1"]);

        let records = audit::read(&policy.daemon.audit_log).unwrap().records;
        let removed: Vec<(&str, Outcome)> = records
            .iter()
            .map(|r| (r.reference.as_deref().unwrap_or(""), r.outcome))
            .collect();
        assert_eq!(
            removed,
            vec![("app:1", Outcome::Ok), ("app:2", Outcome::Ok)]
        );
        assert!(records.iter().all(|r| r.run == report.run));

        // The state knows what is left, and only that.
        let state = StateStore::new(&policy.daemon.state_dir).load(NOW).state;
        assert!(state.initialized);
        let known: Vec<&str> = state.images.keys().map(|id| &id[7..9]).collect();
        assert_eq!(known, vec!["a3", "b1"]);

        let (again, report) = run(&engine, &policy, false).await;
        assert!(again.actions.is_empty(), "{}", plan::render(&again));
        assert_eq!(
            report.summary(),
            "removed 0, untagged 0, tagged 0, failed 0, skipped 0, deferred 0, freed 0 B"
        );
        assert_eq!(
            audit::read(&policy.daemon.audit_log).unwrap().records.len(),
            2
        );
    }

    #[tokio::test]
    async fn a_dry_run_records_what_it_would_do_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path(), "");
        let engine = engine();
        let (plan, report) = run(&engine, &policy, true).await;
        assert_eq!(plan.actions.len(), 2);
        assert_eq!((report.dry_run, report.removed), (2, 0));
        assert_eq!(engine.references().len(), 4);
        assert!(!engine.calls().iter().any(|c| c.starts_with("remove")));
        let records = audit::read(&policy.daemon.audit_log).unwrap().records;
        assert!(
            records.iter().all(|r| r.outcome == Outcome::DryRun),
            "{records:?}"
        );
        assert!(
            !StateStore::new(&policy.daemon.state_dir).path().exists(),
            "a dry run writes no state"
        );
    }

    #[tokio::test]
    async fn layers_are_read_once_then_taken_from_the_state() {
        let dir = tempfile::tempdir().unwrap();
        // Large enough that nothing is evicted: only the accounting counts.
        let policy = policy(dir.path(), "[storage]\nmax_size = \"1GB\"\n");
        let engine = engine();
        let base = |mb: u64| Layer {
            chain_id: "sha256:base".to_owned(),
            size: mb * MB,
        };
        for hex in ["a3", "b1"] {
            engine.set_layers(&format!("sha256:{hex:0<64}"), vec![base(5)]);
        }
        let (plan, _) = run(&engine, &policy, false).await;
        let pressure = plan.pressure.expect("[storage] is set");
        // Before retention: a1 and a2 as one pseudo-layer each, the shared base once.
        assert_eq!(pressure.image_bytes, 7 * MB);
        let state = StateStore::new(&policy.daemon.state_dir).load(NOW).state;
        let a3 = &state.images[&format!("sha256:{:0<64}", "a3")];
        assert_eq!(a3.layers, vec![base(5)]);

        // An image's layers never change: the engine is not asked again.
        for hex in ["a3", "b1"] {
            engine.set_layers(&format!("sha256:{hex:0<64}"), vec![base(50)]);
        }
        let (plan, _) = run(&engine, &policy, false).await;
        assert_eq!(plan.pressure.unwrap().image_bytes, 5 * MB);
    }

    #[test]
    fn the_summary_says_what_is_not_done_yet() {
        let report = Report {
            removed: 1,
            pulled: 1,
            bytes_freed: 1_500_000,
            interrupted: true,
            unsaved: Some("disk full".to_owned()),
            audit_held: 2,
            ..Report::default()
        };
        assert_eq!(
            report.summary(),
            "removed 1, untagged 0, tagged 0, failed 0, skipped 0, deferred 0, \
             pulled 1, pushed 0, backing off 0, freed 1.5 MB (interrupted by shutdown); \
             state NOT saved: disk full; 2 audit record(s) NOT written yet"
        );
    }

    fn named(name: &str, days: i64, tags: &[&str]) -> Image {
        Image {
            id: format!("sha256:{name}"),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![],
            created: NOW - days * 86_400,
            size: 1_000_000,
        }
    }

    /// Retention removes two releases, eviction (max_size) takes one more
    /// and a dangling image goes: the engine is listed once, not again per
    /// eviction nor for the gauges, and the report carries what the audit
    /// records say.
    #[tokio::test]
    async fn a_reconcile_lists_the_engine_once_and_reports_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "version = 1\n[daemon]\nmin_age = \"0s\"\nstate_dir = \"{}\"\n\n\
             [storage]\nmax_size = 2500000\n\n\
             [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 3\n\n\
             [[retain]]\nname = \"dangling\"\nuntagged = true\n",
            dir.path().display()
        );
        let policy = crate::policy::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let engine = FakeEngine::new(
            vec![
                named("a1", 50, &["app:1"]),
                named("a2", 40, &["app:2"]),
                named("a3", 30, &["app:3"]),
                named("a4", 20, &["app:4"]),
                named("a5", 10, &["app:5"]),
                named("d1", 60, &[]),
            ],
            vec![],
        );
        let (plan, report) = reconcile_with(
            &engine,
            &policy,
            &FixedClock(NOW),
            Options::default(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let kinds: Vec<Kind> = plan.actions.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Remove, Kind::Remove, Kind::Remove, Kind::Evict],
            "{}",
            plan::render(&plan)
        );
        let calls = engine.calls();
        let lists = calls.iter().filter(|c| *c == "list_images").count();
        assert_eq!(lists, 1, "{calls:?}");
        assert_eq!((report.removed, report.failed), (4, 0));
        let removals = report.records.records[&(audit::Action::Remove, Outcome::Ok)];
        let evictions = report.records.records[&(audit::Action::Evict, Outcome::Ok)];
        assert_eq!((removals, evictions), (3, 1));
        assert_eq!(report.records.bytes_freed, report.bytes_freed);
        // Two images left, from the observation the executor kept current.
        assert_eq!(report.images, Some((2, 2_000_000)));
        assert_eq!(engine.images().len(), 2);
    }
}
