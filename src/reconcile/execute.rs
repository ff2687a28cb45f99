//! The executor: a plan's actions against the engine, in a safe order
//! (floating tags move before anything is removed), a few removals in
//! flight at once, each re-checked right before it where the engine does not
//! check by itself, never forced, going on after a failed action, one audit
//! record per action in plan order, journaled so that a kill loses none.

mod journal;
mod trash;

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditLog, Outcome, Record};
use crate::blocking::off_loop;
use crate::clock::Clock;
use crate::engine::{Engine, EngineError, Image, Removed};
use crate::fmt::short_id;
use crate::observe::Observed;
use crate::plan::{Action, Kind, Plan, Trashing};
use crate::store::{Store, StoreError};

use super::{ReconcileError, Report};
use journal::Journal;

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
    /// A `trash`: the trash reference put on, the others taken off.
    Trashed(trash::Trashed),
    Pruned,
    /// The content store shrank by these bytes, or could not (its own
    /// error: the engine took no part): recorded as `ok` or `failed`.
    CachePruned(Result<u64, StoreError>),
}

/// Removals in flight at once. A small image's removal is mostly the
/// engine's handling of its request (see `docs/benchmarks.md`): with a few
/// side by side the engine is never idle between two, which brings a bulk
/// removal to its own `image prune`.
const IN_FLIGHT: usize = 3;

/// [`execute`], keeping `observed` current from what each action did (the
/// engine's answers), so the reconcile needs no listing afterwards.
///
/// Tags and build-cache prunes run alone, in plan order. Removals run up
/// to [`IN_FLIGHT`] at once, started in plan order, each re-checked right
/// before its own removal; one image's actions never overlap (the next
/// waits for the one in flight). Records are written in plan order, each
/// as soon as its action and those before it are done, whatever order the
/// engine finishes them in. Each removal is journaled before the engine is
/// asked ([`journal`]), so a kill with removals in flight loses none of
/// their records; when the journal cannot be written, one removal is in
/// flight at a time.
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
    if !dry_run {
        journal::recover(engine, audit).await;
    }
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
    let journal = Journal::new(audit.path(), run);
    let x = Executor {
        engine,
        run,
        clock,
        journal: &journal,
        trash: &plan.trash,
        trash_journal: plan.trash_journal.as_deref(),
    };
    let mut out = Out {
        observed: &mut *observed,
        audit: &mut *audit,
        report: &mut report,
    };
    if dry_run {
        x.dry_run(&plan.actions, &mut out, shutdown);
    } else {
        x.apply(&plan.actions, &mut out, shutdown).await;
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
            resumed_bytes: None,
        });
        report.deferred += b.count;
    }
    audit.sync().await;
    // Every record is appended: the journal goes.
    drop(journal);
    Ok(report)
}

/// What the actions of one execution share.
struct Executor<'a, E> {
    engine: &'a E,
    run: &'a str,
    clock: &'a dyn Clock,
    journal: &'a Journal,
    /// What each `trash` action takes off and puts on.
    trash: &'a [Trashing],
    /// Where each trash's entry is journaled before its reference is put on.
    trash_journal: Option<&'a std::path::Path>,
}

/// What the actions' outcomes go into.
struct Out<'a> {
    observed: &'a mut Observed,
    audit: &'a mut AuditLog,
    report: &'a mut Report,
}

impl<E: Engine> Executor<'_, E> {
    /// A record per action, nothing asked of the engine.
    fn dry_run(&self, actions: &[Action], out: &mut Out<'_>, shutdown: &CancellationToken) {
        for a in actions {
            if shutdown.is_cancelled() {
                out.report.interrupted = true;
                break;
            }
            let mut rec = record(a, self.run, self.clock.now());
            rec.outcome = Outcome::DryRun;
            out.report.dry_run += 1;
            tracing::info!(action = a.kind.as_str(), rule = %a.rule, "dry-run {}", describe(a));
            out.audit.append(&rec);
        }
    }

    /// Carry out the actions (see [`execute_on`] for the order).
    async fn apply(&self, actions: &[Action], out: &mut Out<'_>, shutdown: &CancellationToken) {
        let mut running = FuturesUnordered::new();
        // Images with a removal in flight.
        let mut busy: HashSet<&str> = HashSet::new();
        // A tag or prune is in flight: nothing starts beside it.
        let mut alone = false;
        // Done, waiting for the actions before them to be recorded.
        let mut finished: BTreeMap<usize, Record> = BTreeMap::new();
        let (mut next, mut written) = (0, 0);
        loop {
            if running.is_empty() && self.journal.noted() > 0 {
                self.journal.clear();
            }
            // Shutdown is heard between actions, never inside one: what is
            // in flight finishes and is recorded.
            while next < actions.len() && !alone && !out.report.interrupted {
                if shutdown.is_cancelled() {
                    out.report.interrupted = true;
                    break;
                }
                let a = &actions[next];
                let removal = in_flight(a.kind);
                let window = if self.journal.working() { IN_FLIGHT } else { 1 };
                let may = if removal {
                    running.len() < window
                        && !busy.contains(a.image.as_str())
                        && self.journal.noted() < journal::SPAN
                } else {
                    running.is_empty()
                };
                if !may {
                    break;
                }
                if removal {
                    busy.insert(a.image.as_str());
                } else {
                    alone = true;
                }
                let i = next;
                running.push(async move { (i, self.one(a).await) });
                next += 1;
            }
            // Empty: everything started is done, and nothing more starts.
            let Some((i, (started, result))) = running.next().await else {
                break;
            };
            let a = &actions[i];
            if in_flight(a.kind) {
                busy.remove(a.image.as_str());
            } else {
                alone = false;
            }
            let mut rec = record(a, self.run, started);
            rec.duration_ms = Some(
                u64::try_from((self.clock.now() - started).num_milliseconds()).unwrap_or_default(),
            );
            finished.insert(i, settle(a, rec, result, out.observed, out.report));
            while let Some(rec) = finished.remove(&written) {
                out.audit.append(&rec);
                written += 1;
            }
        }
    }

    /// One action: its re-check, then the action, journaled in between when
    /// it removes something. Gives back when it started.
    async fn one(&self, a: &Action) -> (DateTime<Utc>, Result<Done, EngineError>) {
        let started = self.clock.now();
        if a.kind == Kind::Trash {
            let t = self.trash.iter().find(|t| t.image == a.image);
            let done = trash::trash(self.engine, a, t, started, self.trash_journal).await;
            return (
                started,
                done.map(|d| d.map_or_else(Done::Skipped, Done::Trashed)),
            );
        }
        let result = async {
            let checked = check(self.engine, a).await?;
            if let Checked::Remove(targets) = &checked {
                self.journal.note(&record(a, self.run, started), targets);
            }
            act(self.engine, a, checked).await
        }
        .await;
        (started, result)
    }
}

/// The re-check right before an action (see [`still_free`], [`evict_targets`]).
async fn check<E: Engine>(engine: &E, a: &Action) -> Result<Checked, EngineError> {
    Ok(match a.kind {
        Kind::Tag | Kind::PruneBuild | Kind::PruneCache | Kind::Trash => Checked::Go,
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
        (Kind::PruneCache, _) => Ok(Done::CachePruned(prune_cache(a).await)),
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

/// Whether an action runs beside others (a removal, re-checked on its own,
/// journaled) or alone: tags, prunes, and a `trash`, which tags before it
/// untags.
fn in_flight(kind: Kind) -> bool {
    kind.is_removal() && kind != Kind::Trash
}

/// Shrink the content store to the action's `keep_bytes` of complete
/// blobs, least recently used first ([`Store::gc`]), keeping every partial
/// download found now and the blobs unfinished downloads need. Gives the
/// bytes freed (whole blobs: at least those planned, when nothing else
/// freed them meanwhile).
async fn prune_cache(a: &Action) -> Result<u64, StoreError> {
    let Some(target) = a.cache.clone() else {
        return Ok(0);
    };
    let limit = a.keep_bytes.unwrap_or(0);
    off_loop(move || {
        let store = Store::open(&target.dir)?;
        let mut keep: std::collections::HashSet<String> = store.partials().into_iter().collect();
        keep.extend(target.keep);
        store.gc(limit, &keep)
    })
    .await
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
        Ok(Done::CachePruned(Err(e))) => failed(a, &mut rec, report, &e),
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
                Done::Trashed(t) => {
                    observed.tagged(&a.image, &t.entry.reference);
                    observed.removed(&t.removed);
                    rec.reason = format!(
                        "{}; held by {} until its window ends; former references: {}",
                        a.reason,
                        t.entry.reference,
                        if t.entry.former.is_empty() {
                            "none".to_string()
                        } else {
                            t.entry.former.join(", ")
                        }
                    );
                    report.trashed.push((a.image.clone(), t.entry));
                }
                Done::CachePruned(Ok(freed)) => rec.bytes = Some(freed),
                Done::Pruned | Done::Skipped(_) | Done::CachePruned(Err(_)) => {}
            }
            match a.kind {
                Kind::Tag => report.tagged += 1,
                Kind::Untag => report.untagged += 1,
                Kind::Remove | Kind::Evict => {
                    report.removed += 1;
                    report.bytes_freed += a.bytes.unwrap_or(0);
                }
                Kind::Trash => {}
                Kind::PruneBuild => report.bytes_freed += a.bytes.unwrap_or(0),
                Kind::PruneCache => report.bytes_freed += rec.bytes.unwrap_or(0),
            }
            tracing::info!(action = a.kind.as_str(), rule = %a.rule, "{}", describe(a));
        }
        Err(e) => failed(a, &mut rec, report, &e),
    }
    rec
}

/// A failed action's record and count.
fn failed(a: &Action, rec: &mut Record, report: &mut Report, e: &dyn std::fmt::Display) {
    rec.outcome = Outcome::Failed;
    rec.error = Some(e.to_string());
    rec.bytes = None;
    report.failed += 1;
    tracing::warn!(action = a.kind.as_str(), rule = %a.rule, "failed {}: {e}", describe(a));
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
        resumed_bytes: None,
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
        resumed_bytes: None,
    }
}

fn audit_action(kind: Kind) -> audit::Action {
    match kind {
        Kind::Tag => audit::Action::Tag,
        Kind::Untag => audit::Action::Untag,
        Kind::Remove => audit::Action::Remove,
        Kind::Evict => audit::Action::Evict,
        Kind::PruneBuild => audit::Action::PruneBuild,
        Kind::PruneCache => audit::Action::PruneCache,
        Kind::Trash => audit::Action::Trash,
    }
}
