//! One reconcile: observe the engine and the state, plan, execute, record.
//!
//! Every change to the engine goes through [`execute`], which applies a plan
//! in a safe order (floating tags move before anything is removed), re-checks
//! right before each removal that no container has started using the image,
//! never forces, goes on after a failed action, and writes one audit record per
//! action.

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, AuditLog, Outcome, Record};
use crate::blocking::off_loop;
use crate::engine::{Engine, EngineError};
use crate::fmt::{human_bytes, short_id};
use crate::observe::{Observed, add_storage, noted, observe, observe_for};
use crate::plan::{self, Action, Kind, Plan};
use crate::policy::Policy;
use crate::state::{State, StateError, StateStore};
use crate::transfer;

// Re-exported under their old paths (tests, benches and examples name them so).
pub use crate::clock::{Clock, SystemClock};

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
    /// Set when shutdown stopped the execution between two actions.
    pub interrupted: bool,
    /// Why the state could not be saved at the end of the reconcile (a full
    /// disk, usually): the next reconcile tries again.
    pub unsaved: Option<String>,
    /// Audit records held in memory at the end, not yet written.
    pub audit_held: usize,
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
pub fn run_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:x}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        std::process::id()
    )
}

/// Observe, plan: the read-only half of a reconcile (`stowage plan`).
pub async fn plan_now<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &State,
    now: DateTime<Utc>,
) -> Result<(Observed, Plan), EngineError> {
    let mut state = state.clone();
    let observed = observe_for(engine, policy, &mut state, now.timestamp()).await?;
    let policy = policy.clone();
    Ok(off_loop(move || {
        let plan = plan::plan(&policy, &observed, &state, now.timestamp());
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

/// One whole reconcile as the daemon runs it: pre-pull refreshes follow
/// their schedules. See [`reconcile_with`].
pub async fn reconcile<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> Result<(Plan, Report), ReconcileError> {
    let options = Options {
        dry_run,
        force_refresh: false,
    };
    reconcile_with(engine, policy, clock, options, shutdown).await
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

/// One whole reconcile: load state, observe, transfers (pre-pulls, then
/// mirror pushes), observe again, plan retention, execute, save state.
///
/// A failed state or audit write never ends the reconcile: on a full disk
/// eviction is what frees it. Audit records are held until they can be
/// written (see [`crate::audit`]); a failed state save is logged and tried
/// again at the end of the reconcile, then by the next one.
pub async fn reconcile_with<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    options: Options,
    shutdown: &CancellationToken,
) -> Result<(Plan, Report), ReconcileError> {
    let dry_run = options.dry_run;
    let store = StateStore::new(&policy.daemon.state_dir);
    let now = clock.now();
    // A dry run changes nothing, not even a corrupt state's place: it needs
    // no ownership of the state (`stowage apply --dry-run` beside the daemon).
    let loaded = {
        let store = store.clone();
        let readonly = dry_run || policy.daemon.dry_run;
        off_loop(move || {
            if readonly {
                store.load_readonly(now.timestamp())
            } else {
                store.load(now.timestamp())
            }
        })
        .await
    };
    if let Some(w) = &loaded.warning {
        tracing::warn!("{w}");
    }
    let state = loaded.state;
    let run = run_id(now);
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    audit.set_previously_stated(state.reported.clone());
    let (mut state, mut observed) = noted(state, observe(engine).await?, now.timestamp()).await;
    // Transfers come first so that retention plans on the store as the
    // pulls left it (a freshly pulled image is never a removal candidate).
    let transfers = transfer::run(
        engine,
        policy,
        &observed,
        &mut state,
        &mut audit,
        &run,
        transfer::RunOptions {
            dry_run: dry_run || policy.daemon.dry_run,
            force_refresh: options.force_refresh,
        },
        clock,
        shutdown,
    )
    .await?;
    let has_transfers = !policy.prepull.is_empty() || !policy.mirror.is_empty();
    let stopped = shutdown.is_cancelled();
    if !(dry_run || policy.daemon.dry_run) && (has_transfers || stopped) {
        // Backoff must survive a crash later in this reconcile, and what the
        // transfers finished (`previous`, refresh checks) a shutdown. On a
        // full disk this fails: eviction below may free it for the final save.
        let saved;
        (state, saved) = save_state(&store, state).await;
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
        return Ok((Plan::default(), report));
    }
    if transfers.changed {
        (state, observed) = noted(state, observe(engine).await?, clock.now().timestamp()).await;
    }
    add_storage(engine, policy, &mut state, &mut observed).await?;
    let (mut state, plan) = {
        let policy = policy.clone();
        off_loop(move || {
            let plan = plan::plan_to_apply(&policy, &observed, &state, now.timestamp());
            (state, plan)
        })
        .await
    };
    let mut report = execute(
        engine,
        &plan,
        &mut audit,
        &run,
        dry_run || policy.daemon.dry_run,
        clock,
        shutdown,
    )
    .await?;
    add_transfers(&mut report, &transfers);
    if !(dry_run || policy.daemon.dry_run) {
        // Forget what is gone; the next observation adds what is new.
        let gone: Vec<&str> = plan
            .actions
            .iter()
            .filter(|a| matches!(a.kind, Kind::Remove | Kind::Evict))
            .map(|a| a.image.as_str())
            .collect();
        state.images.retain(|id, _| !gone.contains(&id.as_str()));
        state.reported = audit.stated().clone();
        if let Err(e) = save_state(&store, state).await.1 {
            tracing::error!("{e}; the next reconcile saves again");
            report.unsaved = Some(e.to_string());
        }
    }
    report.audit_held = audit.held();
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
}

/// Apply a plan: tags first (the plan is already in that order), then
/// removals, each re-checked against the containers right before it.
pub async fn execute<E: Engine>(
    engine: &E,
    plan: &Plan,
    audit: &mut AuditLog,
    run: &str,
    dry_run: bool,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> Result<Report, ReconcileError> {
    let mut report = Report {
        run: run.to_string(),
        ..Report::default()
    };
    for w in &plan.warnings {
        tracing::warn!(rule = %w.rule, "{}: {}", w.reference.as_deref().unwrap_or(&w.image), w.reason);
        audit.append(&warn_record(
            clock,
            run,
            w.reference.clone(),
            Some(w.image.clone()),
            &w.rule,
            &w.reason,
        ));
        report.warnings += 1;
    }
    // Disk pressure out of reach is said once per reconcile, not retried as
    // a failure.
    if let Some(msg) = plan.pressure.as_ref().and_then(|p| p.shortfall_message()) {
        tracing::warn!(rule = "storage", "{msg}");
        audit.append(&warn_record(clock, run, None, None, "storage", &msg));
        report.warnings += 1;
    }
    for a in &plan.actions {
        // Shutdown is heard between actions, never inside one.
        if shutdown.is_cancelled() {
            report.interrupted = true;
            break;
        }
        let started = clock.now();
        let mut rec = record(a, run, started);
        if dry_run {
            rec.outcome = Outcome::DryRun;
            report.dry_run += 1;
            tracing::info!(action = a.kind.as_str(), rule = %a.rule, "dry-run {}", describe(a));
            audit.append(&rec);
            continue;
        }
        let result = match a.kind {
            Kind::Tag => match &a.reference {
                Some(r) => engine.tag(&a.image, r).await.map(|()| None),
                None => Ok(None),
            },
            Kind::Untag | Kind::Remove => match still_free(engine, a).await {
                Ok(None) => {
                    let target = a.reference.as_deref().unwrap_or(&a.image);
                    engine.remove(target).await.map(|_| None)
                }
                Ok(Some(skip)) => Ok(Some(skip)),
                Err(e) => Err(e),
            },
            Kind::Evict => evict(engine, a).await,
            Kind::PruneBuild => engine
                .prune_build_cache(a.keep_bytes.unwrap_or(0))
                .await
                .map(|_| None),
        };
        rec.duration_ms =
            Some(u64::try_from((clock.now() - started).num_milliseconds()).unwrap_or_default());
        match result {
            Ok(None) => {
                rec.outcome = Outcome::Ok;
                report.ok += 1;
                match a.kind {
                    Kind::Tag => report.tagged += 1,
                    Kind::Untag => report.untagged += 1,
                    Kind::Remove | Kind::Evict => {
                        report.removed += 1;
                        report.bytes_freed += a.bytes.unwrap_or(0);
                    }
                    Kind::PruneBuild => report.bytes_freed += a.bytes.unwrap_or(0),
                }
                tracing::info!(action = a.kind.as_str(), rule = %a.rule, "{}", describe(a));
            }
            Ok(Some(why)) => {
                rec.action = audit::Action::Skip;
                rec.outcome = Outcome::Ok;
                rec.reason = format!("{why}; planned: {}", a.reason);
                rec.bytes = None;
                report.skipped += 1;
                tracing::info!(rule = %a.rule, "skip {}: {why}", describe(a));
            }
            Err(e) => {
                rec.outcome = Outcome::Failed;
                rec.error = Some(e.to_string());
                rec.bytes = None;
                report.failed += 1;
                tracing::warn!(action = a.kind.as_str(), rule = %a.rule, "failed {}: {e}", describe(a));
            }
        }
        audit.append(&rec);
    }
    // One record per kind and rule, not per removal: a backlog of thousands
    // would otherwise write thousands of records on every reconcile until it
    // drains. `stowage plan` lists each one.
    for b in &plan.backlog {
        audit.append(&Record {
            ts: clock.now(),
            run: run.to_string(),
            action: audit_action(b.kind),
            reference: None,
            image: None,
            rule: Some(b.rule.clone()),
            reason: format!(
                "{} deferred: max_removals reached; they wait for the next reconcile (`stowage plan` lists them)",
                b.count
            ),
            outcome: Outcome::Deferred,
            error: None,
            bytes: None,
            duration_ms: None,
        });
        report.deferred += b.count;
    }
    audit.sync().await;
    Ok(report)
}

/// Evict one image with all its references: re-check containers, then
/// untag each reference (the last one removes the image), never forced.
async fn evict<E: Engine>(engine: &E, a: &Action) -> Result<Option<String>, EngineError> {
    if let Some(why) = now_in_use(engine, &a.image).await? {
        return Ok(Some(why));
    }
    let images = engine.list_images().await?;
    let Some(img) = images.iter().find(|i| i.id == a.image) else {
        return Ok(Some(format!("{} is already gone", a.image)));
    };
    let mut refs = img.repo_tags.clone();
    refs.sort();
    if refs.is_empty() {
        // By id, so the same last question as for a dangling removal.
        if let Some(tags) = engine.tags_of(&a.image).await?
            && !tags.is_empty()
        {
            return Ok(Some(format!(
                "the image is no longer dangling: tagged {} since planning",
                tags.join(", ")
            )));
        }
        engine.remove(&a.image).await?;
    }
    for r in &refs {
        engine.remove(r).await?;
    }
    Ok(None)
}

/// Why an image may not go after all: a container created since planning.
async fn now_in_use<E: Engine>(engine: &E, image: &str) -> Result<Option<String>, EngineError> {
    Ok(engine.containers_using(image).await?.first().map(|c| {
        format!(
            "image is now used by container {} (created since planning); never forced",
            short_id(&c.id)
        )
    }))
}

/// `None` when the image may still go; `Some(reason)` to skip: a container
/// created since planning uses it, the reference now names another image,
/// or a dangling image has been tagged since planning.
async fn still_free<E: Engine>(engine: &E, a: &Action) -> Result<Option<String>, EngineError> {
    // Narrow questions, not full listings: this runs per removal.
    if let Some(why) = now_in_use(engine, &a.image).await? {
        return Ok(Some(why));
    }
    match &a.reference {
        Some(r) => match engine.image_id_of(r).await? {
            Some(id) if id != a.image => {
                return Ok(Some(format!(
                    "{r} now points at another image {id} (changed since planning)"
                )));
            }
            None => return Ok(Some(format!("{r} is already gone"))),
            Some(_) => {}
        },
        // A removal by id takes every tag the image has, and the engine has
        // no call that refuses a tagged image: ask last, right before it.
        None => match engine.tags_of(&a.image).await? {
            None => return Ok(Some(format!("{} is already gone", a.image))),
            Some(tags) if !tags.is_empty() => {
                return Ok(Some(format!(
                    "the image is no longer dangling: tagged {} since planning",
                    tags.join(", ")
                )));
            }
            Some(_) => {}
        },
    }
    Ok(None)
}

fn describe(a: &Action) -> String {
    match (&a.reference, a.kind) {
        (Some(r), Kind::Tag) => format!("tag {r} -> {}", a.image),
        (Some(r), k) => format!("{} {r}", k.as_str()),
        (None, k) => format!("{} dangling {}", k.as_str(), a.image),
    }
}

/// A `warn` record: reported, nothing changed.
fn warn_record(
    clock: &dyn Clock,
    run: &str,
    reference: Option<String>,
    image: Option<String>,
    rule: &str,
    reason: &str,
) -> Record {
    Record {
        ts: clock.now(),
        run: run.to_string(),
        action: audit::Action::Warn,
        reference,
        image,
        rule: Some(rule.to_string()),
        reason: reason.to_string(),
        outcome: Outcome::Ok,
        error: None,
        bytes: None,
        duration_ms: None,
    }
}

fn record(a: &Action, run: &str, ts: DateTime<Utc>) -> Record {
    Record {
        ts,
        run: run.to_string(),
        action: audit_action(a.kind),
        reference: a.reference.clone(),
        image: Some(a.image.clone()),
        rule: Some(a.rule.clone()),
        reason: a.reason.clone(),
        outcome: Outcome::Ok,
        error: None,
        bytes: a.bytes,
        duration_ms: None,
    }
}

fn audit_action(kind: Kind) -> audit::Action {
    match kind {
        Kind::Tag => audit::Action::Tag,
        Kind::Untag => audit::Action::Untag,
        Kind::Remove => audit::Action::Remove,
        Kind::Evict => audit::Action::Evict,
        Kind::PruneBuild => audit::Action::PruneBuild,
    }
}
