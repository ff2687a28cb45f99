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

use std::cmp::Ordering;
use std::collections::BTreeMap;

// Fx hashing: keys are short strings and indices hashed in the hot path;
// no untrusted input can pick them to collide.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::engine::{Container, Image, Layer};
use crate::policy::{FloatOrder, Globs, Order, Policy, RetainScope, Scope};
use crate::refs::split_tag;
use crate::state::State;
use crate::storage::{self, Disk, Pressure};

/// What the engine showed: the input of a plan besides policy, state and time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    pub images: Vec<Image>,
    pub containers: Vec<Container>,
    /// Layers per image id; gathered only when `[storage]` is set. Images
    /// without an entry count as one layer of their size.
    #[serde(skip)]
    pub layers: std::collections::HashMap<String, Vec<Layer>>,
    /// The filesystem holding the engine's data root, when on this host.
    pub disk: Option<Disk>,
    /// Why `disk` is unknown, for the plan and status.
    pub disk_error: Option<String>,
    /// Build cache bytes; gathered only with `build_cache_max`.
    pub build_cache: Option<u64>,
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// In execution order: tags first, then removals.
    pub actions: Vec<Action>,
    /// Removals held back by `max_removals`, for the next reconcile.
    pub deferred: Vec<Action>,
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
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.deferred.is_empty()
    }
}

/// Plan one reconcile. `now` is Unix seconds.
pub fn plan(policy: &Policy, observed: &Observed, state: &State, now: i64) -> Plan {
    let mut result = plan_once(policy, observed, state, now);
    if !result.dangling_after.is_empty() {
        follow_up(policy, observed, state, now, &mut result);
    }
    if let Some(storage) = &policy.storage {
        evict(policy, storage, observed, state, now, &mut result);
    }
    result
}

/// Images that a floating tag leaves without a name (its other references
/// all go) become dangling only once the plan is applied. Dangling images are
/// the business of `untagged` rules alone, so a second pass over just the
/// dangling images, as the plan leaves them, settles them in this reconcile:
/// applying the plan and planning again then finds nothing.
fn follow_up(policy: &Policy, observed: &Observed, state: &State, now: i64, result: &mut Plan) {
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
    let next = plan_once(policy, &store, state, now);
    let known: HashSet<(Option<&str>, &str)> = result
        .actions
        .iter()
        .chain(&result.deferred)
        .map(|d| (d.reference.as_deref(), d.image.as_str()))
        .collect();
    let fresh: Vec<Action> = next
        .actions
        .into_iter()
        .chain(next.deferred)
        .filter(|a| !known.contains(&(a.reference.as_deref(), a.image.as_str())))
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
    result.deferred.extend(later);
}

/// Disk pressure on the store as retention leaves it: evictions go after
/// every retention action, within what is left of `max_removals`.
fn evict(
    policy: &Policy,
    storage: &crate::policy::Storage,
    observed: &Observed,
    state: &State,
    now: i64,
    result: &mut Plan,
) {
    // The store as the plan's retention leaves it, without copying it.
    let mut removed_refs: HashSet<&str> = HashSet::default();
    let mut gone: HashSet<&str> = HashSet::default();
    for a in &result.actions {
        match (a.kind, a.reference.as_deref()) {
            (Kind::Untag, Some(r)) => {
                removed_refs.insert(r);
            }
            (Kind::Remove, _) => {
                gone.insert(a.image.as_str());
            }
            _ => {}
        }
    }
    let mut images: Vec<&Image> = observed
        .images
        .iter()
        .filter(|i| !gone.contains(i.id.as_str()))
        .collect();
    images.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let facts = image_facts(policy, &images, observed, state, now);
    // [[protect]] entries whose globs match, per repository: globs once per
    // repository, tag patterns per reference.
    let mut protects_of_repo: HashMap<&str, Vec<&crate::policy::Protect>> = HashMap::default();
    let candidates: Vec<storage::Candidate> = images
        .iter()
        .zip(facts)
        .map(|(img, f)| {
            let mut tags: Vec<&str> = img
                .repo_tags
                .iter()
                .map(String::as_str)
                .filter(|r| !removed_refs.contains(r))
                .collect();
            tags.sort_unstable();
            // Eviction takes the whole image: a [[protect]] match on any of
            // its references protects it.
            let protection = f.protection.or_else(|| {
                tags.iter().find_map(|r| {
                    let (repo, tag) = split_tag(r);
                    let tag = tag.unwrap_or("");
                    protects_of_repo
                        .entry(repo)
                        .or_insert_with(|| {
                            policy
                                .protect
                                .iter()
                                .filter(|p| p.scope.images.is_match(repo))
                                .collect()
                        })
                        .iter()
                        .find(|p| p.scope.tags.as_ref().is_none_or(|t| t.is_match(tag)))
                        .map(|p| {
                            (
                                p.name.clone(),
                                format!("matches [[protect]] \"{}\"", p.name),
                            )
                        })
                })
            });
            storage::Candidate {
                image: img,
                tags,
                activity: f.activity,
                protection,
            }
        })
        .collect();
    let inputs = storage::Inputs {
        storage,
        layers: &observed.layers,
        disk: observed.disk.as_ref(),
        disk_error: observed.disk_error.as_deref(),
        build_cache: observed.build_cache,
        // Only when retention removes images does "before" differ.
        image_bytes_before: (!gone.is_empty())
            .then(|| storage::unique_bytes(&observed.layers, &observed.images)),
        now,
    };
    let (actions, pressure) = storage::plan(&inputs, &candidates);
    let budget = policy
        .daemon
        .max_removals
        .saturating_sub(count_removals(&result.actions));
    let (now_actions, later) = split_budget(actions, budget);
    let decided: HashMap<&str, (Decision, &Action)> = now_actions
        .iter()
        .map(|a| (a.image.as_str(), (decision_of(a.kind), a)))
        .chain(
            later
                .iter()
                .map(|a| (a.image.as_str(), (Decision::Deferred, a))),
        )
        .collect();
    for v in &mut result.verdicts {
        if let Some((decision, a)) = decided.get(v.image.as_str()) {
            v.decision = *decision;
            v.rule = Some(a.rule.clone());
            v.reason.clone_from(&a.reason);
        }
    }
    result.actions.extend(now_actions);
    result.deferred.extend(later);
    result.pressure = Some(pressure);
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

/// One reference (or a dangling image) in the store.
struct Entry<'a> {
    reference: Option<&'a str>,
    repository: &'a str,
    tag: &'a str,
    img: usize,
}

/// Per-image facts derived once.
struct ImageFacts {
    /// Latest of creation, first seen, last used, last pulled.
    activity: i64,
    /// Image-level protection: (rule, reason).
    protection: Option<(String, String)>,
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// Compact durations for reasons: the largest whole unit (`45d`, `5h`, `10m`).
pub fn human_duration(secs: i64) -> String {
    match secs.max(0) {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
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

/// Newest first: by semver (non-semver last), then created, then name.
fn cmp_semver(
    a: (Option<&semver::Version>, i64, &str),
    b: (Option<&semver::Version>, i64, &str),
) -> Ordering {
    match (a.0, b.0) {
        (Some(x), Some(y)) => y.cmp(x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then(b.1.cmp(&a.1))
    .then(a.2.cmp(b.2))
}

fn plan_once(policy: &Policy, observed: &Observed, state: &State, now: i64) -> Plan {
    // Sort images by id so that input order never matters.
    let mut images: Vec<&Image> = observed.images.iter().collect();
    images.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let mut tags_sorted: Vec<Vec<&str>> = images
        .iter()
        .map(|i| i.repo_tags.iter().map(String::as_str).collect())
        .collect();
    for t in &mut tags_sorted {
        t.sort_unstable();
        t.dedup();
    }

    let mut entries: Vec<Entry> = Vec::new();
    for (idx, tags) in tags_sorted.iter().enumerate() {
        if tags.is_empty() {
            entries.push(Entry {
                reference: None,
                repository: "",
                tag: "",
                img: idx,
            });
        }
        for r in tags {
            let (repository, tag) = split_tag(r);
            entries.push(Entry {
                reference: Some(r),
                repository,
                tag: tag.unwrap_or(""),
                img: idx,
            });
        }
    }
    entries.sort_unstable_by(|a, b| {
        a.reference
            .cmp(&b.reference)
            .then_with(|| images[a.img].id.cmp(&images[b.img].id))
    });

    // Globs match repositories, and there are far fewer repositories than
    // references: match each rule's globs once per repository.
    let mut repo_index: HashMap<&str, usize> = HashMap::default();
    let mut repos: Vec<&str> = Vec::new();
    let repo_of: Vec<usize> = entries
        .iter()
        .map(|e| {
            *repo_index.entry(e.repository).or_insert_with(|| {
                repos.push(e.repository);
                repos.len() - 1
            })
        })
        .collect();
    let mask = |globs: &Globs| -> Vec<bool> { repos.iter().map(|r| globs.is_match(r)).collect() };
    let in_scope = |scope: &Scope, m: &[bool], i: usize| -> bool {
        m[repo_of[i]]
            && scope
                .tags
                .as_ref()
                .is_none_or(|t| t.is_match(entries[i].tag))
    };
    // Parsed once: comparisons during sorting would otherwise parse again.
    let semvers: Vec<Option<semver::Version>> =
        entries.iter().map(|e| parse_semver(e.tag)).collect();

    let facts = image_facts(policy, &images, observed, state, now);
    let by_ref: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.reference.map(|r| (r, i)))
        .collect();

    // Reference-level protection: [[protect]] entries.
    let mut ref_protection: Vec<Option<(String, String)>> = vec![None; entries.len()];
    let protect_masks: Vec<Vec<bool>> = policy
        .protect
        .iter()
        .map(|p| mask(&p.scope.images))
        .collect();
    for (i, e) in entries.iter().enumerate() {
        if e.reference.is_none() {
            continue;
        }
        if let Some(p) = policy
            .protect
            .iter()
            .zip(&protect_masks)
            .find(|(p, m)| in_scope(&p.scope, m, i))
            .map(|(p, _)| p)
        {
            ref_protection[i] = Some((
                p.name.clone(),
                format!("matches [[protect]] \"{}\"", p.name),
            ));
        }
    }

    let mut plan = Plan::default();

    // Floating tags: never removed by retention; moved to the newest candidate.
    let mut floating: HashMap<usize, String> = HashMap::default();
    let mut repos_by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if e.reference.is_some() {
            repos_by_name.entry(e.repository).or_default().push(i);
        }
    }
    // Existing floating references: excluded from retention and conventions.
    for f in &policy.float {
        for repo in repos_by_name.keys() {
            if f.images.is_match(repo)
                && let Some(&cur) = by_ref.get(format!("{repo}:{}", f.tag).as_str())
            {
                floating.insert(cur, f.name.clone());
            }
        }
    }

    // Retention: per rule, per group, decide keep / remove.
    // For each entry: kept_by (rule, reason), removed_by (rule, reason).
    let mut kept_by: Vec<Option<(String, String)>> = vec![None; entries.len()];
    let mut removed_by: Vec<Option<(String, String)>> = vec![None; entries.len()];
    for rule in &policy.retain {
        let rule_mask = match &rule.scope {
            RetainScope::Tagged(s) => mask(&s.images),
            RetainScope::Untagged => Vec::new(),
        };
        let mut scoped: Vec<usize> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let scoped_here = match &rule.scope {
                RetainScope::Untagged => e.reference.is_none(),
                RetainScope::Tagged(s) => {
                    e.reference.is_some()
                        && !floating.contains_key(&i)
                        && in_scope(s, &rule_mask, i)
                }
            };
            if scoped_here {
                scoped.push(i);
            }
        }
        // Group by repository (or "dangling"), plus the group_by capture.
        // Groups are independent of each other, so their order is free.
        let mut groups: HashMap<(usize, Option<&str>), Vec<usize>> = HashMap::default();
        for &i in &scoped {
            let e = &entries[i];
            let cap = rule
                .group_by
                .as_ref()
                .and_then(|g| g.captures(e.tag).and_then(|c| c.get(1)).map(|m| m.as_str()));
            groups.entry((repo_of[i], cap)).or_default().push(i);
        }
        let order_name = match rule.order {
            Order::Created => "created",
            Order::Semver => "semver",
            Order::LastUsed => "last_used",
        };
        for ((repo, cap), mut members) in groups {
            members.sort_by(|&a, &b| {
                let (ea, eb) = (&entries[a], &entries[b]);
                let (ia, ib) = (images[ea.img], images[eb.img]);
                let (ra, rb) = (
                    ea.reference.unwrap_or(&ia.id),
                    eb.reference.unwrap_or(&ib.id),
                );
                match rule.order {
                    Order::Created => ib.created.cmp(&ia.created).then(ra.cmp(rb)),
                    Order::LastUsed => facts[eb.img]
                        .activity
                        .cmp(&facts[ea.img].activity)
                        .then(ib.created.cmp(&ia.created))
                        .then(ra.cmp(rb)),
                    Order::Semver => cmp_semver(
                        (semvers[a].as_ref(), ia.created, ra),
                        (semvers[b].as_ref(), ib.created, rb),
                    ),
                }
            });
            let group_name = match (repos[repo], cap) {
                ("", _) => "dangling images".to_string(),
                (r, Some(c)) => format!("{r} group {c:?}"),
                (r, None) => r.to_string(),
            };
            for (pos, &i) in members.iter().enumerate() {
                let e = &entries[i];
                let act = facts[e.img].activity;
                let keep_last_keeps = rule.keep_last.is_some_and(|n| pos < n);
                let within_keeps = rule.keep_within.is_some_and(|w| {
                    now.saturating_sub(act) <= i64::try_from(w.as_secs()).unwrap_or(i64::MAX)
                });
                if keep_last_keeps {
                    kept_by[i].get_or_insert_with(|| {
                        (
                            rule.name.clone(),
                            format!(
                                "within keep_last={} by {order_name} in {group_name} (#{})",
                                rule.keep_last.unwrap_or(0),
                                pos + 1
                            ),
                        )
                    });
                } else if within_keeps {
                    kept_by[i].get_or_insert_with(|| {
                        (
                            rule.name.clone(),
                            format!(
                                "active within keep_within={} (last activity {} ago)",
                                human_duration(
                                    i64::try_from(rule.keep_within.unwrap_or_default().as_secs())
                                        .unwrap_or(i64::MAX)
                                ),
                                human_duration(now - act)
                            ),
                        )
                    });
                } else if removed_by[i].is_none() {
                    // Only the first rule that would remove it gives the reason.
                    let mut why = Vec::new();
                    if let Some(n) = rule.keep_last {
                        why.push(format!(
                            "beyond keep_last={n} by {order_name} in {group_name} (#{})",
                            pos + 1
                        ));
                    }
                    if let Some(w) = rule.keep_within {
                        why.push(format!(
                            "inactive for {} (keep_within={})",
                            human_duration(now - act),
                            human_duration(i64::try_from(w.as_secs()).unwrap_or(i64::MAX))
                        ));
                    }
                    if why.is_empty() {
                        why.push(format!(
                            "in scope of \"{}\", which keeps nothing",
                            rule.name
                        ));
                    }
                    removed_by[i] = Some((rule.name.clone(), why.join("; ")));
                }
            }
        }
    }

    // Candidate removals from retention (keep wins), then tag conventions.
    // Per entry: removed in this plan, and by which rule and why.
    let mut remove: Vec<bool> = vec![false; entries.len()];
    let mut remove_reason: Vec<Option<(String, String)>> = vec![None; entries.len()];
    for i in 0..entries.len() {
        if kept_by[i].is_none() && removed_by[i].is_some() {
            remove[i] = true;
            remove_reason[i].clone_from(&removed_by[i]);
        }
    }

    // Veto by protection.
    let protection_of = |i: usize| -> Option<&(String, String)> {
        facts[entries[i].img]
            .protection
            .as_ref()
            .or(ref_protection[i].as_ref())
    };
    // Entries listed under "protected" already (a removal they prevented).
    let mut shown: Vec<bool> = vec![false; entries.len()];
    for i in 0..entries.len() {
        if !remove[i] {
            continue;
        }
        if let Some((rule, reason)) = protection_of(i) {
            remove[i] = false;
            shown[i] = true;
            let (prule, preason) = remove_reason[i].as_ref().expect("set with remove");
            plan.protected.push(Protected {
                reference: entries[i].reference.map(str::to_string),
                image: images[entries[i].img].id.clone(),
                rule: rule.clone(),
                reason: reason.clone(),
                prevented: Some(format!("{prule}: {preason}")),
            });
        }
    }

    // Floating tags follow the newest candidate that stays: choosing one that
    // retention removes would move the tag again on the next reconcile.
    // The chosen candidates (`anchors`) are not untagged by conventions.
    let mut anchors: HashSet<usize> = HashSet::default();
    let mut float_targets: HashMap<String, (usize, String, String)> = HashMap::default();
    for f in &policy.float {
        for (repo, idxs) in &repos_by_name {
            if !f.images.is_match(repo) {
                continue;
            }
            let float_ref = format!("{repo}:{}", f.tag);
            let candidates: Vec<usize> = idxs
                .iter()
                .copied()
                .filter(|&i| {
                    entries[i].tag != f.tag && !remove[i] && f.follow.is_match(entries[i].tag)
                })
                .collect();
            let newest = candidates.iter().copied().min_by(|&a, &b| {
                let (ea, eb) = (&entries[a], &entries[b]);
                let (ca, cb) = (images[ea.img].created, images[eb.img].created);
                match f.order {
                    FloatOrder::Semver => cmp_semver(
                        (semvers[a].as_ref(), ca, ea.tag),
                        (semvers[b].as_ref(), cb, eb.tag),
                    ),
                    FloatOrder::Created => cb.cmp(&ca).then(ea.tag.cmp(eb.tag)),
                }
            });
            let Some(newest) = newest else { continue };
            anchors.insert(newest);
            let target_img = entries[newest].img;
            let order = match f.order {
                FloatOrder::Semver => "semver",
                FloatOrder::Created => "created",
            };
            let reason = format!(
                "{float_ref} -> {} (newest by {order} of {} candidate{})",
                entries[newest].reference.unwrap_or(""),
                candidates.len(),
                if candidates.len() == 1 { "" } else { "s" }
            );
            float_targets.insert(float_ref.clone(), (target_img, f.name.clone(), reason));
        }
    }
    let mut float_refs: Vec<&String> = float_targets.keys().collect();
    float_refs.sort();
    for fr in float_refs {
        let (target_img, rule, reason) = &float_targets[fr];
        let already = by_ref
            .get(fr.as_str())
            .is_some_and(|&i| entries[i].img == *target_img);
        if !already {
            plan.actions.push(Action {
                kind: Kind::Tag,
                reference: Some(fr.clone()),
                image: images[*target_img].id.clone(),
                rule: rule.clone(),
                reason: reason.clone(),
                bytes: None,
                keep_bytes: None,
            });
        }
    }

    // Which references stay on each image after the plan (for untag vs remove,
    // and for tag conventions' "keeps another reference").
    let mut remaining: Vec<usize> = vec![0; images.len()];
    for (i, e) in entries.iter().enumerate() {
        if e.reference.is_some() && !remove[i] {
            remaining[e.img] += 1;
        }
    }
    for (fr, (img, _, _)) in &float_targets {
        let existing_on_img = by_ref
            .get(fr.as_str())
            .is_some_and(|&i| entries[i].img == *img);
        if !existing_on_img {
            remaining[*img] += 1;
            if let Some(&cur) = by_ref.get(fr.as_str()) {
                remaining[entries[cur].img] = remaining[entries[cur].img].saturating_sub(1);
            }
        }
    }

    for rule in &policy.tags {
        let rule_mask = mask(&rule.images);
        for (i, e) in entries.iter().enumerate() {
            let Some(r) = e.reference else { continue };
            // Floating tags are stowage's own; they are not held to conventions.
            if remove[i]
                || floating.contains_key(&i)
                || anchors.contains(&i)
                || !rule_mask[repo_of[i]]
                || rule.allow.is_match(e.tag)
            {
                continue;
            }
            let img = &images[e.img];
            let base = format!(
                "tag {:?} does not match allow [{}]",
                e.tag,
                rule.allow.sources.join(", ")
            );
            let untag = rule.on_violation == crate::policy::OnViolation::Untag;
            if untag && remaining[e.img] > 1 && protection_of(i).is_none() {
                remove[i] = true;
                remaining[e.img] -= 1;
                remove_reason[i] = Some((rule.name.clone(), base));
            } else {
                let why = if !untag {
                    base
                } else if let Some((pr, _)) = protection_of(i) {
                    format!("{base}; not untagged: protected by {pr}")
                } else {
                    format!("{base}; not untagged: it is the image's only reference")
                };
                plan.warnings.push(Warning {
                    reference: Some(r.to_string()),
                    image: img.id.clone(),
                    rule: rule.name.clone(),
                    reason: why,
                });
            }
        }
    }

    // Removals in a stable order; an image's last reference goes last, as `remove`.
    // Entries are sorted by reference (dangling first): references in that
    // order, then dangling images.
    let mut removals: Vec<usize> = (0..entries.len())
        .filter(|&i| remove[i] && entries[i].reference.is_some())
        .collect();
    removals.extend((0..entries.len()).filter(|&i| remove[i] && entries[i].reference.is_none()));
    let mut left: Vec<usize> = vec![0; images.len()];
    for &i in &removals {
        left[entries[i].img] += 1;
    }
    // An image with names before and none after, yet not removed: a float
    // moved off its last name.
    plan.dangling_after = (0..images.len())
        .filter(|&k| !tags_sorted[k].is_empty() && remaining[k] == 0 && left[k] == 0)
        .map(|k| images[k].id.clone())
        .collect();
    let mut removal_actions = Vec::new();
    for &i in &removals {
        let e = &entries[i];
        left[e.img] -= 1;
        let img = images[e.img];
        let last = left[e.img] == 0 && remaining[e.img] == 0;
        let (rule, reason) = remove_reason[i].take().expect("set with remove");
        removal_actions.push(Action {
            kind: if last { Kind::Remove } else { Kind::Untag },
            reference: e.reference.map(str::to_string),
            image: img.id.clone(),
            rule,
            reason,
            bytes: last.then_some(img.size),
            keep_bytes: None,
        });
    }
    // Every removal action is a removal: the first `max_removals` go now.
    let now_count = removal_actions.len().min(policy.daemon.max_removals);
    let mut decided: Vec<Option<(Decision, usize)>> = vec![None; entries.len()];
    for (pos, &i) in removals.iter().enumerate() {
        decided[i] = Some(if pos < now_count {
            (decision_of(removal_actions[pos].kind), pos)
        } else {
            (Decision::Deferred, pos)
        });
    }
    // In some retention rule's scope (kept or not), before the reasons move
    // into the verdicts.
    let scoped: Vec<bool> = (0..entries.len())
        .map(|i| kept_by[i].is_some() || removed_by[i].is_some())
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let img = images[e.img];
        let (decision, rule, reason) = if let Some((d, pos)) = decided[i] {
            let a = &removal_actions[pos];
            (d, Some(a.rule.clone()), a.reason.clone())
        } else if let Some((r, why)) = protection_of(i) {
            (Decision::Protected, Some(r.clone()), why.clone())
        } else if let Some(f) = floating.get(&i) {
            (
                Decision::Keep,
                Some(f.clone()),
                "floating tag, never removed by retention".to_string(),
            )
        } else if let Some((r, why)) = kept_by[i].take() {
            (Decision::Keep, Some(r), why)
        } else {
            (
                Decision::Unmanaged,
                None,
                "no retention rule scopes it".to_string(),
            )
        };
        plan.verdicts.push(Verdict {
            reference: e.reference.map(str::to_string),
            image: img.id.clone(),
            decision,
            rule,
            reason,
        });
    }
    let later = removal_actions.split_off(now_count);
    plan.actions.extend(removal_actions);
    plan.deferred = later;
    // Protected references in some rule's scope that nothing tried to remove
    // are worth showing too: a person reading the plan wants to see them.
    for (i, e) in entries.iter().enumerate() {
        if scoped[i]
            && !shown[i]
            && let Some((rule, reason)) = protection_of(i)
        {
            plan.protected.push(Protected {
                reference: e.reference.map(str::to_string),
                image: images[e.img].id.clone(),
                rule: rule.clone(),
                reason: reason.clone(),
                prevented: None,
            });
        }
    }
    plan.protected.sort_by(|a, b| {
        a.reference
            .cmp(&b.reference)
            .then_with(|| a.image.cmp(&b.image))
    });
    plan
}

fn image_facts(
    policy: &Policy,
    images: &[&Image],
    observed: &Observed,
    state: &State,
    now: i64,
) -> Vec<ImageFacts> {
    let mut users: HashMap<&str, Vec<&Container>> = HashMap::default();
    for c in &observed.containers {
        users.entry(c.image_id.as_str()).or_default().push(c);
    }
    for v in users.values_mut() {
        v.sort_by(|a, b| a.id.cmp(&b.id));
    }
    // Images that a [[prepull]] entry names (by tag or by digest).
    let mut prepulled: HashMap<&str, &str> = HashMap::default();
    for p in &policy.prepull {
        for img in images {
            let hit = img.repo_tags.contains(&p.image) || img.repo_digests.contains(&p.image);
            if hit {
                prepulled.entry(img.id.as_str()).or_insert(p.image.as_str());
            }
        }
    }
    // Earlier images of a [[prepull]] entry, kept for rollback (newest first).
    let mut previous: HashMap<&str, (&str, usize)> = HashMap::default();
    for p in &policy.prepull {
        if let Some(ps) = state.prepull.get(&p.key()) {
            for id in ps.previous.iter().take(p.keep_previous) {
                previous
                    .entry(id.as_str())
                    .or_insert((p.image.as_str(), p.keep_previous));
            }
        }
    }
    let min_age = i64::try_from(policy.daemon.min_age.as_secs()).unwrap_or(i64::MAX);
    images
        .iter()
        .map(|img| {
            let st = state.images.get(&img.id);
            let first_seen = st.map_or(img.created.min(now), |s| s.first_seen);
            let activity = [
                Some(img.created),
                Some(first_seen),
                st.and_then(|s| s.last_used),
                st.and_then(|s| s.last_pulled),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(img.created);
            let protection = if let Some(cs) = users.get(img.id.as_str()) {
                let c = cs[0];
                let more = if cs.len() > 1 {
                    format!(" and {} more", cs.len() - 1)
                } else {
                    String::new()
                };
                let name = if c.name.is_empty() {
                    String::new()
                } else {
                    format!(" \"{}\"", c.name)
                };
                Some((
                    "in-use".to_string(),
                    format!(
                        "in use by container {}{name} ({}){more}",
                        short(&c.id),
                        c.state
                    ),
                ))
            } else if let Some(p) = prepulled.get(img.id.as_str()) {
                Some((
                    format!("prepull:{p}"),
                    format!("current image of [[prepull]] {p}"),
                ))
            } else if let Some((p, n)) = previous.get(img.id.as_str()) {
                Some((
                    format!("prepull:{p}"),
                    format!(
                        "previous image of [[prepull]] {p}, kept for rollback (keep_previous={n})"
                    ),
                ))
            } else if now.saturating_sub(first_seen) < min_age {
                Some((
                    "min_age".to_string(),
                    format!(
                        "seen on this host {} ago, younger than min_age={}",
                        human_duration(now - first_seen),
                        human_duration(min_age)
                    ),
                ))
            } else {
                None
            };
            ImageFacts {
                activity,
                protection,
            }
        })
        .collect()
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
    if plan.actions.is_empty() && plan.deferred.is_empty() {
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
        plan.deferred.len(),
        plan.protected.len(),
        plan.warnings.len()
    );
    out
}

/// `1.5 GB`-style sizes (decimal units, as `docker images` shows them).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
