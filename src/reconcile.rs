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
use crate::plan::{self, Action, Kind, Observed, Plan};
use crate::policy::Policy;
use crate::state::{State, StateError, StateStore};
use crate::transfer;

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
        s.push_str(&format!(", freed {}", plan::human_bytes(self.bytes_freed)));
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

/// A source of time, so tests can fix it. The planner never reads it.
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

/// A reconcile id: time plus process id, readable and unique enough per host.
pub fn run_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:x}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        std::process::id()
    )
}

/// Observe the engine: one image listing and one container listing, whatever
/// the number of images.
pub async fn observe<E: Engine>(engine: &E) -> Result<Observed, EngineError> {
    let (images, containers) = tokio::try_join!(engine.list_images(), engine.list_containers())?;
    Ok(Observed {
        images,
        containers,
        ..Observed::default()
    })
}

/// Observe everything the policy needs: images and containers, plus layers,
/// the data root's filesystem and the build cache when `[storage]` is set.
/// Notes first-seen times in `state` (off the async threads; if this future
/// is dropped mid-way, `state` may be left empty).
pub async fn observe_for<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &mut State,
    now: i64,
) -> Result<Observed, EngineError> {
    let observed = observe(engine).await?;
    let (noted_state, mut observed) = noted(std::mem::take(state), observed, now).await;
    *state = noted_state;
    add_storage(engine, policy, state, &mut observed).await?;
    Ok(observed)
}

/// Add what `[storage]` needs to an observation: layers (from the state's
/// cache; new ones are added to it), the data root's filesystem, the build
/// cache. Nothing without `[storage]`.
pub async fn add_storage<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &mut State,
    observed: &mut Observed,
) -> Result<(), EngineError> {
    let Some(storage) = &policy.storage else {
        return Ok(());
    };
    // Owned ids, and no borrow of `state` across an await: the future must
    // stay `Send` for the daemon's spawned reconcile.
    let ids: Vec<String> = observed.images.iter().map(|i| i.id.clone()).collect();
    for id in ids {
        let cached: Vec<crate::engine::Layer> = match state.images.get(&id) {
            Some(s) => s.layers.clone(),
            None => Vec::new(),
        };
        let layers = if cached.is_empty() {
            match engine.image_layers(&id).await {
                Ok(l) => {
                    if let Some(s) = state.images.get_mut(&id) {
                        s.layers.clone_from(&l);
                    }
                    l
                }
                // Removed meanwhile: it counts as one pseudo-layer this time.
                Err(EngineError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        } else {
            cached
        };
        observed.layers.insert(id, layers);
    }
    if storage.high_watermark.is_some() {
        let info = engine.info().await?;
        if !engine.is_local() {
            observed.disk_error = Some(format!(
                "the engine is not on this host, so its data root {} cannot be measured here",
                info.data_root
            ));
        } else {
            match rustix::fs::statvfs(info.data_root.as_str()) {
                Ok(st) => {
                    observed.disk = Some(crate::storage::Disk {
                        path: info.data_root.clone(),
                        total: st.f_blocks.saturating_mul(st.f_frsize),
                        available: st.f_bavail.saturating_mul(st.f_frsize),
                    });
                }
                Err(e) => {
                    observed.disk_error = Some(format!(
                        "the engine's data root {} is not readable on this host ({e}); is the engine in another mount namespace or on another machine?",
                        info.data_root
                    ));
                }
            }
        }
    }
    if storage.build_cache_max.is_some() {
        observed.build_cache = Some(engine.disk_usage().await?.build_cache_size);
    }
    Ok(())
}

/// Update the state with what is on the host now (first-seen times), and
/// forget images that are gone.
pub fn note_observed(state: &mut State, observed: &Observed, now: i64) {
    for img in &observed.images {
        state.observe(&img.id, img.created, now);
    }
    state.retain_images(observed.images.iter().map(|i| i.id.as_str()));
    state.initialized = true;
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

/// [`note_observed`] off the async threads (a large store takes a while).
async fn noted(mut state: State, observed: Observed, now: i64) -> (State, Observed) {
    off_loop(move || {
        note_observed(&mut state, &observed, now);
        (state, observed)
    })
    .await
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
            crate::refs::short_id(&c.id)
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
}
