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
use crate::engine::{Engine, EngineError, Image, Removed};
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
    /// What this reconcile's audit records say, counted as written (the
    /// daemon's metrics).
    pub records: audit::Tally,
    /// `(count, bytes)` of the images after a reconcile that ran to its
    /// end, from its observation (the daemon's gauges).
    pub images: Option<(u64, u64)>,
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
    // Transfers come first so that retention plans on the store as the
    // pulls left it (a freshly pulled image is never a removal candidate).
    let transfers = transfer::run(
        engine,
        policy,
        &mut observed,
        state,
        &mut audit,
        &run,
        transfer::RunOptions {
            dry_run,
            force_refresh: options.force_refresh,
        },
        clock,
        shutdown,
    )
    .await?;
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
        let saved;
        (*state, saved) = save_state(&store, std::mem::take(state)).await;
        if let Err(e) = saved {
            tracing::error!("{e}; the next reconcile saves again");
            report.unsaved = Some(e.to_string());
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
}

/// Apply a plan: tags first (the plan is already in that order), then
/// removals, each re-checked right before it. See [`execute_on`].
pub async fn execute<E: Engine>(
    engine: &E,
    plan: &Plan,
    audit: &mut AuditLog,
    run: &str,
    dry_run: bool,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> Result<Report, ReconcileError> {
    let mut observed = Observed::default();
    execute_on(
        engine,
        plan,
        &mut observed,
        audit,
        run,
        dry_run,
        clock,
        shutdown,
    )
    .await
}

/// What the re-check before an action found.
enum Checked {
    /// Not to be done after all (said in the record).
    Skip(String),
    /// Remove these, in order (never forced): the last one removes the
    /// image, unless the engine refuses for a container.
    Remove(Vec<String>),
    /// Tags and build-cache prunes need no re-check.
    Go,
}

/// What one action did.
enum Done {
    /// Nothing: the re-check (or the engine's refusal for a container)
    /// found a reason not to.
    Skipped(String),
    /// What the engine untagged and deleted.
    Removed(Removed),
    Tagged,
    Pruned,
}

/// [`execute`], keeping `observed` current from what each action did (the
/// engine's answers), so the reconcile needs no listing afterwards.
///
/// Actions run one at a time, in plan order, each record written as soon
/// as its action is done. Between two removals of different images, the
/// next one's re-check runs while the engine carries out the current one:
/// the engine removes layers one at a time anyway, and this keeps it busy,
/// which brings a bulk removal to the engine's own `image prune`. The
/// re-check is then at most one removal older than its own removal.
#[allow(clippy::too_many_arguments)]
pub async fn execute_on<E: Engine>(
    engine: &E,
    plan: &Plan,
    observed: &mut Observed,
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
    let actions = &plan.actions;
    let mut ahead: Option<(DateTime<Utc>, Result<Checked, EngineError>)> = None;
    for (i, a) in actions.iter().enumerate() {
        // Shutdown is heard between actions, never inside one.
        if shutdown.is_cancelled() {
            report.interrupted = true;
            break;
        }
        if dry_run {
            let mut rec = record(a, run, clock.now());
            rec.outcome = Outcome::DryRun;
            report.dry_run += 1;
            tracing::info!(action = a.kind.as_str(), rule = %a.rule, "dry-run {}", describe(a));
            audit.append(&rec);
            continue;
        }
        let (started, checked) = match ahead.take() {
            Some(done) => done,
            None => (clock.now(), check(engine, a).await),
        };
        // Checked ahead only between removals of different images: one
        // image's untags and removal stay strictly one after the other.
        let next = actions
            .get(i + 1)
            .filter(|n| a.kind.is_removal() && n.kind.is_removal() && n.image != a.image);
        let result = match (checked, next) {
            (Ok(c), Some(n)) => {
                let next_started = clock.now();
                let (done, next_checked) = tokio::join!(act(engine, a, c), check(engine, n));
                ahead = Some((next_started, next_checked));
                done
            }
            (Ok(c), None) => act(engine, a, c).await,
            (Err(e), _) => Err(e),
        };
        let mut rec = record(a, run, started);
        rec.duration_ms =
            Some(u64::try_from((clock.now() - started).num_milliseconds()).unwrap_or_default());
        let rec = settle(a, rec, result, observed, &mut report);
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

/// The re-check right before an action (see [`still_free`], [`evict_targets`]).
async fn check<E: Engine>(engine: &E, a: &Action) -> Result<Checked, EngineError> {
    Ok(match a.kind {
        Kind::Tag | Kind::PruneBuild => Checked::Go,
        Kind::Untag | Kind::Remove => match still_free(engine, a).await? {
            Ok(target) => Checked::Remove(vec![target]),
            Err(skip) => Checked::Skip(skip),
        },
        Kind::Evict => evict_targets(engine, a).await?,
    })
}

/// Carry out a checked action.
async fn act<E: Engine>(engine: &E, a: &Action, checked: Checked) -> Result<Done, EngineError> {
    match (a.kind, checked) {
        (_, Checked::Skip(why)) => Ok(Done::Skipped(why)),
        (Kind::Tag, _) => match &a.reference {
            Some(r) => engine.tag(&a.image, r).await.map(|()| Done::Tagged),
            None => Ok(Done::Tagged),
        },
        (Kind::PruneBuild, _) => engine
            .prune_build_cache(a.keep_bytes.unwrap_or(0))
            .await
            .map(|_| Done::Pruned),
        (_, Checked::Remove(targets)) => {
            let Some((last, first)) = targets.split_last() else {
                return Ok(Done::Removed(Removed::default()));
            };
            let mut removed = Removed::default();
            for r in first {
                let r = engine.remove(r).await?;
                removed.untagged.extend(r.untagged);
                removed.deleted.extend(r.deleted);
            }
            match remove_checked(engine, a, last).await? {
                Done::Removed(r) => {
                    removed.untagged.extend(r.untagged);
                    removed.deleted.extend(r.deleted);
                    Ok(Done::Removed(removed))
                }
                other => Ok(other),
            }
        }
        (_, Checked::Go) => Ok(Done::Removed(Removed::default())),
    }
}

/// Counts a finished action into `report`, keeps `observed` current, and
/// gives its record back, outcome set.
fn settle(
    a: &Action,
    mut rec: Record,
    result: Result<Done, EngineError>,
    observed: &mut Observed,
    report: &mut Report,
) -> Record {
    match result {
        Ok(Done::Skipped(why)) => {
            rec.action = audit::Action::Skip;
            rec.outcome = Outcome::Ok;
            rec.reason = format!("{why}; planned: {}", a.reason);
            rec.bytes = None;
            report.skipped += 1;
            tracing::info!(rule = %a.rule, "skip {}: {why}", describe(a));
        }
        Ok(done) => {
            rec.outcome = Outcome::Ok;
            report.ok += 1;
            match done {
                Done::Tagged => {
                    if let Some(r) = &a.reference {
                        observed.tagged(&a.image, r);
                    }
                }
                Done::Removed(removed) => observed.removed(&removed),
                Done::Pruned | Done::Skipped(_) => {}
            }
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
        Err(e) => {
            rec.outcome = Outcome::Failed;
            rec.error = Some(e.to_string());
            rec.bytes = None;
            report.failed += 1;
            tracing::warn!(action = a.kind.as_str(), rule = %a.rule, "failed {}: {e}", describe(a));
        }
    }
    rec
}

/// What evicting one image removes: each of its references (the last one
/// removes the image), or its id when it has none. One inspect of the image
/// right before: it is gone, or its references as they are now (a dangling
/// one's included: a removal by id would take a tag given since planning
/// along). Containers are asked only when the engine would not refuse by
/// itself (untags before the last reference are not checked by it).
async fn evict_targets<E: Engine>(engine: &E, a: &Action) -> Result<Checked, EngineError> {
    let Some(img) = engine.image(&a.image).await? else {
        return Ok(Checked::Skip(format!("{} is already gone", a.image)));
    };
    let mut refs = img.repo_tags.clone();
    refs.sort();
    if refs.is_empty() {
        return Ok(Checked::Remove(vec![a.image.clone()]));
    }
    if !engine_checks_containers(&img, &refs[0])
        && let Some(why) = now_in_use(engine, &a.image).await?
    {
        return Ok(Checked::Skip(why));
    }
    Ok(Checked::Remove(refs))
}

/// Remove `target` (a reference or the image id), never forced. The
/// engine refuses to delete an image a container uses; when it refuses and
/// a container uses the image, that is a skip (created since planning), as
/// when the re-check found it first.
async fn remove_checked<E: Engine>(
    engine: &E,
    a: &Action,
    target: &str,
) -> Result<Done, EngineError> {
    match engine.remove(target).await {
        Ok(removed) => Ok(Done::Removed(removed)),
        Err(EngineError::Conflict(refused)) => match now_in_use(engine, &a.image).await? {
            Some(why) => Ok(Done::Skipped(why)),
            None => Err(EngineError::Conflict(refused)),
        },
        Err(e) => Err(e),
    }
}

/// Whether the engine itself refuses, unforced, when a container uses the
/// image and `reference` is removed: when it is the image's only tag and
/// every digest reference is of the same repository (the removal then
/// deletes the image, which a container's use blocks). With other
/// references the engine only untags, and asks no container.
fn engine_checks_containers(img: &Image, reference: &str) -> bool {
    let repo = crate::refs::split_tag(reference).0;
    img.repo_tags.len() == 1
        && img.repo_tags[0] == reference
        && img
            .repo_digests
            .iter()
            .all(|d| d.split_once('@').is_some_and(|(r, _)| r == repo))
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

/// What to remove for an `untag`/`remove` (the reference, or the id of a
/// dangling image), or why to skip it: a container created since planning
/// uses it, the reference now names another image, or a dangling image has
/// been tagged since planning. One inspect, plus a container query only
/// where the engine would not refuse by itself (see
/// [`engine_checks_containers`]).
async fn still_free<E: Engine>(
    engine: &E,
    a: &Action,
) -> Result<Result<String, String>, EngineError> {
    let target = a.reference.as_deref().unwrap_or(&a.image);
    let Some(img) = engine.image(target).await? else {
        return Ok(Err(format!("{target} is already gone")));
    };
    match &a.reference {
        Some(r) => {
            if img.id != a.image {
                return Ok(Err(format!(
                    "{r} now points at another image {} (changed since planning)",
                    img.id
                )));
            }
            if (a.kind == Kind::Untag || !engine_checks_containers(&img, r))
                && let Some(why) = now_in_use(engine, &a.image).await?
            {
                return Ok(Err(why));
            }
        }
        // A removal by id takes every tag the image has, and the engine has
        // no call that refuses a tagged image: ask last, right before it.
        // Without tags, the engine refuses if a container uses the image.
        None if !img.repo_tags.is_empty() => {
            return Ok(Err(format!(
                "the image is no longer dangling: tagged {} since planning",
                img.repo_tags.join(", ")
            )));
        }
        None => {}
    }
    Ok(Ok(target.to_owned()))
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
