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
use futures_util::StreamExt;

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

/// Removals of different images in flight at once. The engine removes
/// layers one at a time; a few removals in flight keep it busy while the
/// re-checks of the next ones travel, which is what brings a bulk removal
/// near the engine's own `image prune`.
const REMOVALS_AT_ONCE: usize = 4;

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

/// What one action did.
enum Done {
    /// Nothing: the re-check found a reason not to (said in the record).
    Skipped(String),
    /// What the engine untagged and deleted.
    Removed(Removed),
    Tagged,
    Pruned,
}

/// [`execute`], keeping `observed` current from what each action did (the
/// engine's answers), so the reconcile needs no listing afterwards.
///
/// Tags run one by one before any removal. Removals are grouped per image
/// (its untags, then its removal, in plan order) and up to
/// [`REMOVALS_AT_ONCE`] images are worked on at once; each record is written
/// as its image's group finishes. The build-cache prune comes last.
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
    if dry_run {
        for a in &plan.actions {
            if shutdown.is_cancelled() {
                report.interrupted = true;
                break;
            }
            let mut rec = record(a, run, clock.now());
            rec.outcome = Outcome::DryRun;
            report.dry_run += 1;
            tracing::info!(action = a.kind.as_str(), rule = %a.rule, "dry-run {}", describe(a));
            audit.append(&rec);
        }
    } else {
        let (tags, rest): (Vec<&Action>, Vec<&Action>) =
            plan.actions.iter().partition(|a| a.kind == Kind::Tag);
        let (prunes, removals): (Vec<&Action>, Vec<&Action>) =
            rest.into_iter().partition(|a| a.kind == Kind::PruneBuild);
        // Floating tags move before anything is removed.
        let done = run_group(engine, tags, clock, shutdown).await;
        report.interrupted |= settle(done, observed, audit, &mut report);
        if !report.interrupted {
            let mut groups: Vec<Vec<&Action>> = Vec::new();
            let mut group_of: std::collections::HashMap<&str, usize> =
                std::collections::HashMap::new();
            for a in removals {
                let g = *group_of.entry(a.image.as_str()).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(a);
            }
            // Futures of a plain `async fn` collected first: a closure in
            // the stream trips the compiler's `Send` inference for the
            // daemon's spawn.
            let jobs: Vec<_> = groups
                .into_iter()
                .map(|g| run_group(engine, g, clock, shutdown))
                .collect();
            let mut running = futures_util::stream::iter(jobs).buffer_unordered(REMOVALS_AT_ONCE);
            while let Some(done) = running.next().await {
                report.interrupted |= settle(done, observed, audit, &mut report);
            }
        }
        if !report.interrupted {
            let done = run_group(engine, prunes, clock, shutdown).await;
            report.interrupted |= settle(done, observed, audit, &mut report);
        }
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

/// Actions run one after the other, each with its record (its outcome not
/// set yet); `true` when shutdown stopped them between two actions.
struct GroupDone<'a> {
    done: Vec<(&'a Action, Record, Result<Done, EngineError>)>,
    interrupted: bool,
}

async fn run_group<'a, E: Engine>(
    engine: &E,
    actions: Vec<&'a Action>,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> GroupDone<'a> {
    let mut out = GroupDone {
        done: Vec::with_capacity(actions.len()),
        interrupted: false,
    };
    for a in actions {
        // Shutdown is heard between actions, never inside one.
        if shutdown.is_cancelled() {
            out.interrupted = true;
            break;
        }
        let started = clock.now();
        let mut rec = record(a, "", started);
        let result = run_one(engine, a).await;
        rec.duration_ms =
            Some(u64::try_from((clock.now() - started).num_milliseconds()).unwrap_or_default());
        out.done.push((a, rec, result));
    }
    out
}

async fn run_one<E: Engine>(engine: &E, a: &Action) -> Result<Done, EngineError> {
    match a.kind {
        Kind::Tag => match &a.reference {
            Some(r) => engine.tag(&a.image, r).await.map(|()| Done::Tagged),
            None => Ok(Done::Tagged),
        },
        Kind::Untag | Kind::Remove => match still_free(engine, a).await? {
            Err(skip) => Ok(Done::Skipped(skip)),
            Ok(target) => remove_checked(engine, a, &target).await,
        },
        Kind::Evict => evict(engine, a).await,
        Kind::PruneBuild => engine
            .prune_build_cache(a.keep_bytes.unwrap_or(0))
            .await
            .map(|_| Done::Pruned),
    }
}

/// Writes the records of a finished group, counts them into `report` and
/// keeps `observed` current. Returns whether the group was interrupted.
fn settle(
    group: GroupDone<'_>,
    observed: &mut Observed,
    audit: &mut AuditLog,
    report: &mut Report,
) -> bool {
    for (a, mut rec, result) in group.done {
        rec.run.clone_from(&report.run);
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
        audit.append(&rec);
    }
    group.interrupted
}

/// Evict one image with all its references, never forced: untag each
/// reference (the last one removes the image), or remove it by id when it
/// has none. One inspect of the image right before: it is gone, or its
/// references as they are now (a dangling one's included: a removal by id
/// would take a tag given since planning along).
async fn evict<E: Engine>(engine: &E, a: &Action) -> Result<Done, EngineError> {
    let Some(img) = engine.image(&a.image).await? else {
        return Ok(Done::Skipped(format!("{} is already gone", a.image)));
    };
    let mut refs = img.repo_tags.clone();
    refs.sort();
    if refs.is_empty() {
        return remove_checked(engine, a, &a.image).await;
    }
    // Untags before the last reference are not checked by the engine.
    if !engine_checks_containers(&img, &refs[0])
        && let Some(why) = now_in_use(engine, &a.image).await?
    {
        return Ok(Done::Skipped(why));
    }
    let (last, first) = refs.split_last().expect("not empty");
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
