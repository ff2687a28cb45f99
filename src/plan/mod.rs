//! The planner: `plan(&Policy, &Observed, &State, now) -> Plan`.
//!
//! Pure: no I/O, no clock. Same input, same plan, in a stable order whatever
//! the order of the input. Every action and every protected reference carries
//! the rule behind it and a reason a person can read.
//!
//! Order of decisions:
//! 1. absolute protections per image (in use, `[[prepull]]`, `min_age`) and per
//!    reference (`[[protect]]`); existing floating references are set aside;
//! 2. `[[retain]]`: a reference in scope of a rule and kept by none goes;
//! 3. protections veto removals;
//! 4. `[[float]]` moves (tags) to the newest candidate that stays;
//! 5. `[[tags]]` conventions (warn, or untag where the image keeps a name);
//! 6. `max_removals` defers the rest;
//! 7. a second pass over the dangling images, when a float move leaves an
//!    image without a name, so applying a plan then planning again gives an
//!    empty plan;
//! 8. `[storage]` eviction on the store as all that leaves it.

mod evict;
mod index;
mod retention;

use std::collections::BTreeMap;
use std::fmt::Write as _;

// Fx hashing: keys are short strings and indices hashed in the hot path;
// no untrusted input can pick them to collide.
use rustc_hash::FxHashSet as HashSet;
use serde::{Deserialize, Serialize};

use crate::engine::Image;
use crate::fmt::{human_bytes, short_id as short};
use crate::policy::{Policy, RetainScope};
use crate::refs::split_tag;
use crate::state::State;
use crate::storage::{self, Pressure};

use index::{Index, Sorted};
use retention::retention;

// The observation is the planner's input; re-exported under its old path.
pub use crate::observe::{LayerMap, Observed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Point a reference at an image (floating tags).
    Tag,
    /// Remove a reference; the image keeps another one.
    Untag,
    /// Remove the image's last reference (or a dangling image): the image goes.
    Remove,
    /// Disk pressure: remove the image with all its references.
    Evict,
    /// Prune the engine's build cache.
    PruneBuild,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tag => "tag",
            Kind::Untag => "untag",
            Kind::Remove => "remove",
            Kind::Evict => "evict",
            Kind::PruneBuild => "prune_build",
        }
    }
    /// Counts against `max_removals`.
    pub fn is_removal(self) -> bool {
        matches!(self, Kind::Untag | Kind::Remove | Kind::Evict)
    }
}

/// One change the executor will make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub kind: Kind,
    /// The reference acted on; `None` for a dangling image.
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// The image id (for `tag`: the image the reference will point at).
    pub image: String,
    pub rule: String,
    pub reason: String,
    /// Bytes freed (`remove`: the image's size; `evict`: its unique layers;
    /// `prune_build`: cache bytes above the maximum).
    pub bytes: Option<u64>,
    /// For `prune_build`: the build-cache bytes to keep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_bytes: Option<u64>,
}

/// A reference (or dangling image) that a protection keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Protected {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub image: String,
    pub rule: String,
    pub reason: String,
    /// The action the protection prevented, if any.
    pub prevented: Option<String>,
}

/// Something to report that changes nothing (`[[tags]]` with `warn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub image: String,
    pub rule: String,
    pub reason: String,
}

/// What the plan decided for one reference: for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// No rule scopes it: never touched by retention.
    Unmanaged,
    Keep,
    Protected,
    Untag,
    Remove,
    Evict,
    Deferred,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Unmanaged => "unmanaged",
            Decision::Keep => "keep",
            Decision::Protected => "protected",
            Decision::Untag => "untag",
            Decision::Remove => "remove",
            Decision::Evict => "evict",
            Decision::Deferred => "deferred",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub image: String,
    pub decision: Decision,
    pub rule: Option<String>,
    pub reason: String,
}

/// Removals of one kind and rule held back by `max_removals`: what a
/// reconcile records, one audit record each, however long the backlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backlog {
    pub kind: Kind,
    pub rule: String,
    pub count: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// In execution order: tags first, then removals.
    pub actions: Vec<Action>,
    /// Removals held back by `max_removals`, for the next reconcile, in
    /// full: only from [`plan`]. A reconcile has no use for what it will not
    /// do, and on a large backlog spelling it out is most of a plan's work.
    pub deferred: Vec<Action>,
    /// The same removals counted per kind and rule, by rule; from every plan.
    pub backlog: Vec<Backlog>,
    pub protected: Vec<Protected>,
    pub warnings: Vec<Warning>,
    /// One per reference (and per dangling image) present before the plan.
    pub verdicts: Vec<Verdict>,
    /// Disk pressure, when `[storage]` is set.
    pub pressure: Option<Pressure>,
    /// Images that keep no name after this plan without being removed (a
    /// floating tag moved off their last one), in id order.
    #[serde(skip)]
    dangling_after: Vec<String>,
    /// Images (in index order) whose removal as dangling images is deferred:
    /// for the follow-up pass, which must not plan them twice.
    #[serde(skip)]
    deferred_dangling: Vec<usize>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.backlog.is_empty()
    }

    /// Removals held back by `max_removals`.
    pub fn deferred_count(&self) -> usize {
        self.backlog.iter().map(|b| b.count).sum()
    }

    /// Count `n` more deferred removals of a kind and rule.
    fn defer(&mut self, kind: Kind, rule: &str, n: usize) {
        if n == 0 {
            return;
        }
        match self
            .backlog
            .iter_mut()
            .find(|b| b.kind == kind && b.rule == rule)
        {
            Some(b) => b.count += n,
            None => self.backlog.push(Backlog {
                kind,
                rule: rule.to_string(),
                count: n,
            }),
        }
    }
}

/// What a plan spells out beyond what a reconcile executes.
#[derive(Debug, Clone, Copy)]
struct Detail {
    /// A verdict per reference (needs `deferred`: verdicts quote them).
    verdicts: bool,
    /// Each deferred removal as an action, not only counted.
    deferred: bool,
}

impl Detail {
    const ALL: Detail = Detail {
        verdicts: true,
        deferred: true,
    };
    const APPLY: Detail = Detail {
        verdicts: false,
        deferred: false,
    };

    /// Of `all` removals whose first `now` go now: how many to build as
    /// actions. The rest are only counted unless deferred ones are spelled out.
    fn removals_to_build(self, all: usize, now: usize) -> usize {
        if self.deferred { all } else { now }
    }
}

/// Plan one reconcile, with a verdict for every reference (`status`,
/// `plan --json`). `now` is Unix seconds.
pub fn plan(policy: &Policy, observed: &Observed, state: &State, now: i64) -> Plan {
    plan_with(policy, observed, state, now, Detail::ALL, PARALLEL_FROM)
}

/// The same plan without `verdicts` and with `deferred` only counted (in
/// `backlog`): what a reconcile executes. The verdicts, a row per reference,
/// are for `status`; a reconcile would only build and drop them.
pub fn plan_to_apply(policy: &Policy, observed: &Observed, state: &State, now: i64) -> Plan {
    plan_with(policy, observed, state, now, Detail::APPLY, PARALLEL_FROM)
}

fn plan_with(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    now: i64,
    detail: Detail,
    parallel_from: usize,
) -> Plan {
    let sorted = Sorted::new(&observed.images);
    let parallel = observed.images.len() >= parallel_from;
    let look = || index::known(&sorted, policy, &observed.containers, state, now);
    let count_layers = || {
        policy
            .storage
            .is_some()
            .then(|| storage::LayerCounts::count(&observed.images, &observed.layers))
    };
    std::thread::scope(|scope| {
        // On a large store, work that needs only the images in id order runs
        // on a second thread beside the main line: what the state and the
        // containers say of each image beside the indexing of references,
        // and layer accounting (for eviction, last) beside retention's
        // second half. Retention rules share both threads in between. The
        // result is the same either way.
        let known = beside(scope, parallel, look);
        let index = Index::build(policy, &observed.images, &sorted, || {
            known.map_or_else(look, join)
        });
        let placement = retention::place_all(policy, &index, now, parallel);
        let counting = beside(scope, parallel, count_layers);
        let mut result = retention(policy, &index, placement, now, detail);
        if !result.dangling_after.is_empty() {
            follow_up(policy, observed, state, now, &index, detail, &mut result);
        }
        result.deferred_dangling = Vec::new();
        let counts = counting.map_or_else(count_layers, join);
        if let (Some(storage), Some(counts)) = (&policy.storage, counts) {
            evict::evict(
                policy,
                storage,
                observed,
                &index,
                counts,
                now,
                detail,
                &mut result,
            );
        }
        result
            .backlog
            .sort_by(|a, b| a.rule.cmp(&b.rule).then(a.kind.cmp(&b.kind)));
        result
    })
}

/// `f` on a second thread, when `on` and a thread can be had.
fn beside<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    on: bool,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Option<std::thread::ScopedJoinHandle<'scope, T>> {
    on.then(|| {
        std::thread::Builder::new()
            .name("stowage-plan".into())
            .spawn_scoped(scope, f)
            .ok()
    })
    .flatten()
}

/// The result of a thread, or its panic passed on.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `(0..n).map(f)`, in two halves on two threads when `n` is large: for
/// building the strings of a plan, which at 100k references is much of its
/// time. Same result in the same order either way.
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if n < PARALLEL_FROM {
        return (0..n).map(&f).collect();
    }
    let mid = n / 2;
    std::thread::scope(|scope| {
        let f = &f;
        let upper = beside(scope, true, move || (mid..n).map(f).collect::<Vec<T>>());
        let mut out: Vec<T> = Vec::with_capacity(n);
        out.extend((0..mid).map(f));
        match upper {
            Some(handle) => out.extend(join(handle)),
            None => out.extend((mid..n).map(f)),
        }
        out
    })
}

/// `(0..n).map(f)` for a few tasks of uneven size: with `parallel`, two
/// threads each take the next task until none is left. Same result in the
/// same order either way.
fn parallel_tasks<T: Send>(n: usize, parallel: bool, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if !parallel || n < 2 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= n {
                return done;
            }
            done.push((k, f(k)));
        }
    };
    let mut done = std::thread::scope(|scope| {
        let other = beside(scope, true, work);
        // Should the thread not start, this one takes every task.
        let mut done = work();
        if let Some(handle) = other {
            done.extend(join(handle));
        }
        done
    });
    done.sort_unstable_by_key(|(k, _)| *k);
    done.into_iter().map(|(_, t)| t).collect()
}

/// Images (for `parallel_map`: items) from which a second thread pays for
/// itself.
pub(super) const PARALLEL_FROM: usize = 4096;

/// Images that a floating tag leaves without a name (its other references
/// all go) become dangling only once the plan is applied. Dangling images are
/// the business of `untagged` rules alone, so a second pass over just the
/// dangling images, as the plan leaves them, settles them in this reconcile:
/// applying the plan and planning again then finds nothing.
fn follow_up(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    now: i64,
    first: &Index,
    detail: Detail,
    result: &mut Plan,
) {
    let untagged_rules = policy
        .retain
        .iter()
        .any(|r| matches!(r.scope, RetainScope::Untagged));
    if !untagged_rules {
        return;
    }
    let newly: HashSet<&str> = result.dangling_after.iter().map(String::as_str).collect();
    let removed: HashSet<&str> = result
        .actions
        .iter()
        .filter(|a| a.kind == Kind::Remove && a.reference.is_none())
        .map(|a| a.image.as_str())
        .collect();
    let store = Observed {
        images: observed
            .images
            .iter()
            .filter(|i| {
                newly.contains(i.id.as_str())
                    || (i.repo_tags.is_empty() && !removed.contains(i.id.as_str()))
            })
            .map(|i| Image {
                repo_tags: Vec::new(),
                ..i.clone()
            })
            .collect(),
        containers: observed.containers.clone(),
        ..Observed::default()
    };
    let sorted = Sorted::new(&store.images);
    let index = Index::build(policy, &store.images, &sorted, || {
        index::known(&sorted, policy, &store.containers, state, now)
    });
    let placement = retention::place_all(policy, &index, now, false);
    let next = retention(
        policy,
        &index,
        placement,
        now,
        Detail {
            verdicts: false,
            deferred: true,
        },
    );
    // Every action of this pass is a dangling image's; those the first pass
    // removes are not in its store, those it defers are planned already.
    let deferred: HashSet<&str> = result
        .deferred_dangling
        .iter()
        .map(|&k| first.images[k].id.as_str())
        .collect();
    let fresh: Vec<Action> = next
        .actions
        .into_iter()
        .chain(next.deferred)
        .filter(|a| !deferred.contains(a.image.as_str()))
        .collect();
    let budget = policy
        .daemon
        .max_removals
        .saturating_sub(count_removals(&result.actions));
    let (now_actions, later) = split_budget(fresh, budget);
    for (a, decision) in now_actions
        .iter()
        .map(|a| (a, decision_of(a.kind)))
        .chain(later.iter().map(|a| (a, Decision::Deferred)))
        .filter(|_| detail.verdicts)
    {
        result.verdicts.push(Verdict {
            reference: a.reference.clone(),
            image: a.image.clone(),
            decision,
            rule: Some(a.rule.clone()),
            reason: format!("{} (after the changes above)", a.reason),
        });
    }
    result.actions.extend(now_actions);
    for a in &later {
        result.defer(a.kind, &a.rule, 1);
    }
    if detail.deferred {
        result.deferred.extend(later);
    }
}

fn decision_of(k: Kind) -> Decision {
    match k {
        Kind::Tag | Kind::PruneBuild => Decision::Keep,
        Kind::Untag => Decision::Untag,
        Kind::Remove => Decision::Remove,
        Kind::Evict => Decision::Evict,
    }
}

fn count_removals(actions: &[Action]) -> usize {
    actions.iter().filter(|a| a.kind.is_removal()).count()
}

/// Keep the first `budget` removals; the rest are deferred. Tags always pass.
fn split_budget(actions: Vec<Action>, budget: usize) -> (Vec<Action>, Vec<Action>) {
    let mut now = Vec::new();
    let mut later = Vec::new();
    let mut used = 0;
    for a in actions {
        if a.kind.is_removal() {
            if used < budget {
                used += 1;
                now.push(a);
            } else {
                later.push(a);
            }
        } else {
            now.push(a);
        }
    }
    (now, later)
}

fn parse_semver(tag: &str) -> Option<semver::Version> {
    let t = tag.strip_prefix('v').unwrap_or(tag);
    if let Ok(v) = semver::Version::parse(t) {
        return Some(v);
    }
    // Common image tags have one or two components (`1.25`): pad them.
    let (core, rest) = match t.find(['-', '+']) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let parts = core.split('.').count();
    if !(1..=2).contains(&parts) || !core.split('.').all(|p| p.parse::<u64>().is_ok()) {
        return None;
    }
    let padded = format!("{core}{}{rest}", ".0".repeat(3 - parts));
    semver::Version::parse(&padded).ok()
}

/// Render a plan for people: actions grouped by repository, then what is
/// protected and why, then warnings. Stable, so tests can compare text.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    // Dangling images and the build cache sort after every repository
    // ("~" > any name character).
    let group_of = |a: &Action| -> String {
        match (&a.reference, a.kind) {
            (_, Kind::PruneBuild) => "~~".to_string(),
            (Some(r), _) => split_tag(r).0.to_string(),
            (None, _) => "~".to_string(),
        }
    };
    let fmt_ref = |r: &Option<String>, img: &str| -> String {
        r.clone()
            .unwrap_or_else(|| format!("<none> {}", short(img)))
    };
    if plan.is_empty() {
        out.push_str("nothing to do\n");
    } else {
        let mut groups: BTreeMap<String, Vec<(&Action, bool)>> = BTreeMap::new();
        for a in &plan.actions {
            groups.entry(group_of(a)).or_default().push((a, false));
        }
        for a in &plan.deferred {
            groups.entry(group_of(a)).or_default().push((a, true));
        }
        for (repo, actions) in groups {
            let heading = match repo.as_str() {
                "~" => "<dangling>",
                "~~" => "<build cache>",
                r => r,
            };
            let _ = writeln!(out, "{heading}");
            for (a, deferred) in actions {
                let what = if deferred {
                    format!("{} (deferred)", a.kind.as_str())
                } else {
                    a.kind.as_str().to_string()
                };
                let bytes = a
                    .bytes
                    .map(|b| format!(" [{}]", human_bytes(b)))
                    .unwrap_or_default();
                let target = if a.kind == Kind::Tag {
                    format!(" -> {}", short(&a.image))
                } else {
                    String::new()
                };
                let name = if a.kind == Kind::PruneBuild {
                    "build cache".to_string()
                } else {
                    fmt_ref(&a.reference, &a.image)
                };
                let _ = writeln!(
                    out,
                    "  {what:<8} {name}{target}{bytes}  ({}: {})",
                    a.rule, a.reason
                );
            }
        }
    }
    if let Some(p) = &plan.pressure {
        let _ = writeln!(
            out,
            "storage: images {} (unique bytes); {}",
            human_bytes(p.image_bytes),
            p.summary
        );
        if p.to_free > 0 {
            let evicted: u64 = plan
                .actions
                .iter()
                .filter(|a| a.kind == Kind::Evict)
                .filter_map(|a| a.bytes)
                .sum();
            let _ = writeln!(
                out,
                "  to free {}: retention frees {}, eviction {}",
                human_bytes(p.to_free + p.freed_by_retention),
                human_bytes(p.freed_by_retention),
                human_bytes(evicted)
            );
        }
        if let Some(msg) = p.shortfall_message() {
            let _ = writeln!(out, "  {msg}");
        }
        if let Some((size, max)) = p.build_cache {
            let _ = writeln!(
                out,
                "  build cache {} (build_cache_max {})",
                human_bytes(size),
                human_bytes(max)
            );
        }
    }
    if !plan.protected.is_empty() {
        out.push_str("protected\n");
        for p in &plan.protected {
            let prevented = p
                .prevented
                .as_ref()
                .map(|x| format!(" (would otherwise go: {x})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}  ({}: {}){prevented}",
                fmt_ref(&p.reference, &p.image),
                p.rule,
                p.reason
            );
        }
    }
    if !plan.warnings.is_empty() {
        out.push_str("warnings\n");
        for w in &plan.warnings {
            let _ = writeln!(
                out,
                "  {}  ({}: {})",
                fmt_ref(&w.reference, &w.image),
                w.rule,
                w.reason
            );
        }
    }
    let removed: u64 = plan.actions.iter().filter_map(|a| a.bytes).sum();
    let count = |k: Kind| plan.actions.iter().filter(|a| a.kind == k).count();
    let evict = if plan.pressure.is_some() {
        format!(", {} evict", count(Kind::Evict))
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "summary: {} tag, {} untag, {} remove{evict} ({} freed), {} deferred, {} protected, {} warnings",
        count(Kind::Tag),
        count(Kind::Untag),
        count(Kind::Remove),
        human_bytes(removed),
        plan.deferred_count(),
        plan.protected.len(),
        plan.warnings.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{SYNTHETIC_NOW, synthetic_policy, synthetic_store};

    /// Layer counting on a second thread or inline: the same plan.
    #[test]
    fn the_second_thread_changes_nothing() {
        let store = synthetic_store(3_000, 7);
        let policy = crate::policy::parse(
            &synthetic_policy(store.unique_bytes),
            std::path::Path::new("synthetic.toml"),
        )
        .expect("valid");
        let (observed, state) = (&store.observed, &store.state);
        let inline = plan_with(
            &policy,
            observed,
            state,
            SYNTHETIC_NOW,
            Detail::ALL,
            usize::MAX,
        );
        let beside = plan_with(&policy, observed, state, SYNTHETIC_NOW, Detail::ALL, 0);
        assert!(inline.pressure.is_some() && !inline.deferred.is_empty());
        assert_eq!(inline, beside);
    }
}
