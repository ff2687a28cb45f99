//! Retention, protection, floating tags and tag conventions over an
//! [`Index`]: steps 1 to 6 of the planner (see the module above).
//!
//! Decisions are kept as indices (which rule, which group, which position)
//! and turned into the words of a reason only for what the plan shows.

use std::cmp::Reverse;
use std::fmt::{self, Write as _};

use rustc_hash::FxHashMap as HashMap;

use crate::fmt::Human;
use crate::policy::{FloatOrder, OnViolation, Order, Policy, Retain, RetainScope};

use super::index::{DANGLING, Entry, Index, TagMemo};
use super::{
    Action, Decision, Detail, Kind, Plan, Protected, Verdict, Warning, decision_of, parallel_map,
    parallel_tasks,
};

/// How one retention rule placed an entry.
#[derive(Clone, Copy)]
enum Why {
    /// Within `keep_last`, at this position of this group.
    KeepLast { pos: usize, group: usize },
    /// Active within `keep_within`.
    Within,
    /// Beyond what the rule keeps.
    Beyond { pos: usize, group: usize },
}

#[derive(Clone, Copy)]
struct Mark {
    rule: usize,
    why: Why,
}

/// Why an entry is removed.
#[derive(Clone, Copy)]
enum Cause {
    Retain(Mark),
    /// A `[[tags]]` convention with `untag`.
    Convention(usize),
}

/// Where a `[[float]]` rule puts one floating reference.
#[derive(Clone, Copy)]
struct Move {
    /// The reference's entry today, if it exists.
    existing: Option<usize>,
    /// The newest candidate, its image, and how many there were.
    newest: usize,
    target: usize,
    count: usize,
    /// The float rule.
    rule: usize,
}

impl Move {
    /// Whether the reference must be tagged: it is missing, or names
    /// another image.
    fn changes(&self, entries: &[Entry]) -> bool {
        self.existing.is_none_or(|i| entries[i].img != self.target)
    }
}

/// A retention group for reasons: a repository (or the dangling images),
/// narrowed by the rule's `group_by` capture.
#[derive(Clone, Copy)]
struct Group<'a> {
    repo: usize,
    cap: Option<&'a str>,
}

struct GroupName<'i, 'a>(&'i Index<'a>, Group<'a>);

impl fmt::Display for GroupName<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.1.repo, self.1.cap) {
            (DANGLING, _) => f.write_str("dangling images"),
            (r, Some(c)) => write!(f, "{} group {c:?}", self.0.repos[r]),
            (r, None) => f.write_str(self.0.repos[r]),
        }
    }
}

fn order_name(o: Order) -> &'static str {
    match o {
        Order::Created => "created",
        Order::Semver => "semver",
        Order::LastUsed => "last_used",
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

struct Reasons<'i, 'a> {
    policy: &'i Policy,
    index: &'i Index<'a>,
    groups: Vec<Group<'a>>,
    /// Per `[[tags]]` convention: its allowed patterns, listed.
    allowed: Vec<String>,
    at: i64,
}

impl Reasons<'_, '_> {
    /// The rule behind a removal, numbered: `[[retain]]` rules, then
    /// `[[tags]]` conventions.
    fn rule_number(&self, c: Cause) -> usize {
        match c {
            Cause::Retain(m) => m.rule,
            Cause::Convention(r) => self.policy.retain.len() + r,
        }
    }

    fn rule_name(&self, number: usize) -> &str {
        match number.checked_sub(self.policy.retain.len()) {
            None => &self.policy.retain[number].name,
            Some(r) => &self.policy.tags[r].name,
        }
    }

    fn kept(&self, m: Mark, activity: i64) -> String {
        let rule = &self.policy.retain[m.rule];
        match m.why {
            Why::KeepLast { pos, group } => format!(
                "within keep_last={} by {} in {} (#{})",
                rule.keep_last.unwrap_or(0),
                order_name(rule.order),
                GroupName(self.index, self.groups[group]),
                pos + 1
            ),
            _ => format!(
                "active within keep_within={} (last activity {} ago)",
                Human(secs(rule.keep_within.unwrap_or_default())),
                Human(self.at - activity)
            ),
        }
    }

    fn removed(&self, c: Cause, e: &Entry) -> (String, String) {
        match c {
            Cause::Retain(m) => {
                let rule: &Retain = &self.policy.retain[m.rule];
                let activity = self.index.facts[e.img].activity;
                // One string per removal: at 100k references these add up.
                let mut why = String::with_capacity(96);
                if let (Some(n), Why::Beyond { pos, group }) = (rule.keep_last, m.why) {
                    let _ = write!(
                        why,
                        "beyond keep_last={n} by {} in {} (#{})",
                        order_name(rule.order),
                        GroupName(self.index, self.groups[group]),
                        pos + 1
                    );
                }
                if let Some(w) = rule.keep_within {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    let _ = write!(
                        why,
                        "inactive for {} (keep_within={})",
                        Human(self.at - activity),
                        Human(secs(w))
                    );
                }
                if why.is_empty() {
                    let _ = write!(why, "in scope of \"{}\", which keeps nothing", rule.name);
                }
                (rule.name.clone(), why)
            }
            Cause::Convention(r) => {
                let rule = &self.policy.tags[r];
                (rule.name.clone(), self.violation(r, e.tag))
            }
        }
    }

    /// A tag against `[[tags]]` convention `r`.
    fn violation(&self, r: usize, tag: &str) -> String {
        format!("tag {tag:?} does not match allow [{}]", self.allowed[r])
    }
}

/// What one `[[retain]]` rule decided: how it placed each entry in its
/// scope, with groups numbered from 0.
struct Placed<'a> {
    marks: Vec<(usize, Why)>,
    groups: Vec<Group<'a>>,
}

impl Why {
    fn in_groups_from(self, offset: usize) -> Why {
        match self {
            Why::KeepLast { pos, group } => Why::KeepLast {
                pos,
                group: group + offset,
            },
            Why::Within => Why::Within,
            Why::Beyond { pos, group } => Why::Beyond {
                pos,
                group: group + offset,
            },
        }
    }
}

/// One `[[retain]]` rule over the store: per group, newest first, which
/// entries it keeps and which go beyond what it keeps. Existing floating
/// references are not its business.
fn place<'a>(rule: &Retain, index: &Index<'a>, floating: &[Option<usize>], at: i64) -> Placed<'a> {
    let entries = &index.entries;
    let facts = &index.facts;
    let mut placed = Placed {
        marks: Vec::new(),
        groups: Vec::new(),
    };
    // The runs of entries the rule may scope: matching repositories, or
    // the dangling images.
    let runs: Vec<(usize, std::ops::Range<usize>)> = match &rule.scope {
        RetainScope::Untagged => vec![(DANGLING, 0..index.starts[0])],
        RetainScope::Tagged(s) => {
            let mask = index.mask(&s.images);
            (0..index.repos.len())
                .filter(|&r| mask[r])
                .map(|r| (r, index.repo_entries(r)))
                .collect()
        }
    };
    let tag_scope = match &rule.scope {
        RetainScope::Tagged(s) => s.tags.as_ref(),
        RetainScope::Untagged => None,
    };
    let mut in_tags = TagMemo::new(index.tags.len());
    // Per distinct tag: its `group_by` capture, once worked out.
    let mut captures: Vec<Option<Option<&str>>> = vec![None; index.tags.len()];
    let keep_within = rule.keep_within.map(secs);
    let mut members: Vec<(Reverse<i64>, Reverse<i64>, usize)> = Vec::new();
    let mut keyed: Vec<(Option<&str>, usize)> = Vec::new();
    for (repo, run) in runs {
        keyed.clear();
        for i in run {
            let e = &entries[i];
            if floating[i].is_some()
                || !tag_scope.is_none_or(|t| in_tags.get(e.tag_id, e.tag, |s| t.is_match(s)))
            {
                continue;
            }
            let cap = match &rule.group_by {
                None => None,
                Some(g) => *captures[e.tag_id].get_or_insert_with(|| {
                    g.captures(e.tag).and_then(|c| c.get(1)).map(|m| m.as_str())
                }),
            };
            keyed.push((cap, i));
        }
        // Groups are independent of each other, so their order is free;
        // within one, entries stay in reference order.
        if rule.group_by.is_some() {
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
        }
        for chunk in keyed.chunk_by(|a, b| a.0 == b.0) {
            let group = placed.groups.len();
            placed.groups.push(Group {
                repo,
                cap: chunk[0].0,
            });
            // Newest first; keys computed once per entry, not per
            // comparison. Entries are in reference order (dangling: id
            // order), so the entry index is the final tie-break by name.
            members.clear();
            members.extend(chunk.iter().map(|&(_, i)| {
                let (first, then) = match rule.order {
                    Order::Created => index.newest(i, false),
                    Order::Semver => index.newest(i, true),
                    Order::LastUsed => {
                        let img = entries[i].img;
                        (Reverse(facts[img].activity), Reverse(index.created[img]))
                    }
                };
                (first, then, i)
            }));
            members.sort_unstable();
            for (pos, &(_, _, i)) in members.iter().enumerate() {
                let act = facts[entries[i].img].activity;
                let why = if rule.keep_last.is_some_and(|k| pos < k) {
                    Why::KeepLast { pos, group }
                } else if keep_within.is_some_and(|w| at.saturating_sub(act) <= w) {
                    Why::Within
                } else {
                    Why::Beyond { pos, group }
                };
                placed.marks.push((i, why));
            }
        }
    }
    placed
}

/// How the `[[retain]]` rules placed each entry, before protections,
/// floats and conventions have their say: the first half of [`retention`],
/// apart so that the planner can run other work beside the second.
pub(super) struct Placement<'a> {
    /// Per entry: the `[[float]]` rule whose floating reference it is.
    floating: Vec<Option<usize>>,
    /// Per `[[float]]` rule: the repositories it covers.
    float_masks: Vec<Vec<bool>>,
    /// Per entry: the first rule keeping it, and the first removing it.
    kept_by: Vec<Option<Mark>>,
    removed_by: Vec<Option<Mark>>,
    groups: Vec<Group<'a>>,
}

/// Steps 1 and 2 of the planner over one store. With `parallel`, two
/// threads share the rules.
pub(super) fn place_all<'a>(
    policy: &Policy,
    index: &Index<'a>,
    at: i64,
    parallel: bool,
) -> Placement<'a> {
    let n = index.entries.len();
    // Existing floating references: excluded from retention and conventions.
    let mut floating: Vec<Option<usize>> = vec![None; n];
    let float_masks: Vec<Vec<bool>> = policy.float.iter().map(|f| index.mask(&f.images)).collect();
    for (fi, f) in policy.float.iter().enumerate() {
        for r in (0..index.repos.len()).filter(|&r| float_masks[fi][r]) {
            if let Some(cur) = index.find_in(index.repos[r], &f.tag) {
                floating[cur] = Some(fi);
            }
        }
    }

    // Retention: per rule, per group, decide keep / remove. The first rule
    // that keeps an entry, and the first that would remove it, give reasons.
    // Rules decide independently of each other, so two threads may share
    // them; their marks are then taken in rule order.
    let placed = parallel_tasks(policy.retain.len(), parallel, |ri| {
        place(&policy.retain[ri], index, &floating, at)
    });
    let mut kept_by: Vec<Option<Mark>> = vec![None; n];
    let mut removed_by: Vec<Option<Mark>> = vec![None; n];
    let mut groups = Vec::new();
    for (ri, placed) in placed.into_iter().enumerate() {
        let offset = groups.len();
        groups.extend(placed.groups);
        for (i, why) in placed.marks {
            let mark = Mark {
                rule: ri,
                why: why.in_groups_from(offset),
            };
            if matches!(why, Why::Beyond { .. }) {
                removed_by[i].get_or_insert(mark);
            } else {
                kept_by[i].get_or_insert(mark);
            }
        }
    }

    Placement {
        floating,
        float_masks,
        kept_by,
        removed_by,
        groups,
    }
}

/// Steps 3 to 6 over the placement of [`place_all`]: the plan before
/// `[storage]`. With `detail.verdicts`, one verdict per entry, in entry order.
pub(super) fn retention(
    policy: &Policy,
    index: &Index,
    placement: Placement,
    at: i64,
    detail: Detail,
) -> Plan {
    let entries = &index.entries;
    let images = &index.images;
    let facts = &index.facts;
    let n = entries.len();
    let Placement {
        floating,
        float_masks,
        kept_by,
        removed_by,
        groups,
    } = placement;
    let reasons = Reasons {
        policy,
        index,
        groups,
        allowed: policy
            .tags
            .iter()
            .map(|t| t.allow.sources.join(", "))
            .collect(),
        at,
    };
    let mut plan = Plan::default();

    // Candidate removals from retention (keep wins).
    let mut cause: Vec<Option<Cause>> = (0..n)
        .map(|i| match (kept_by[i], removed_by[i]) {
            (None, Some(m)) => Some(Cause::Retain(m)),
            _ => None,
        })
        .collect();

    // Veto by protection.
    let protection_of = |i: usize| -> Option<(&str, std::borrow::Cow<str>)> {
        if let Some((rule, reason)) = &facts[entries[i].img].protection {
            return Some((rule, reason.as_str().into()));
        }
        index.protect[i].map(|p| {
            let name = policy.protect[p].name.as_str();
            (name, format!("matches [[protect]] \"{name}\"").into())
        })
    };
    // Entries listed under "protected" already (a removal they prevented).
    let mut shown: Vec<bool> = vec![false; n];
    for i in 0..n {
        let Some(c) = cause[i] else { continue };
        if let Some((rule, reason)) = protection_of(i) {
            cause[i] = None;
            shown[i] = true;
            let (prule, preason) = reasons.removed(c, &entries[i]);
            plan.protected.push(Protected {
                reference: entries[i].reference.map(str::to_string),
                image: images[entries[i].img].id.clone(),
                rule: rule.to_string(),
                reason: reason.into_owned(),
                prevented: Some(format!("{prule}: {preason}")),
            });
        }
    }

    // Floating tags follow the newest candidate that stays: choosing one that
    // retention removes would move the tag again on the next reconcile.
    // The chosen candidates (`anchors`) are not untagged by conventions.
    let mut anchors: Vec<bool> = vec![false; n];
    // Per floating reference (repository, tag): the last rule to place it
    // wins. Words only for the moves that change something.
    let mut moves: HashMap<(usize, &str), Move> = HashMap::default();
    for (fi, f) in policy.float.iter().enumerate() {
        let mut follows = TagMemo::new(index.tags.len());
        for r in (0..index.repos.len()).filter(|&r| float_masks[fi][r]) {
            let run = index.repo_entries(r);
            let mut count = 0usize;
            let mut newest: Option<usize> = None;
            for i in run {
                let e = &entries[i];
                if e.tag == f.tag
                    || cause[i].is_some()
                    || !follows.get(e.tag_id, e.tag, |t| f.follow.is_match(t))
                {
                    continue;
                }
                count += 1;
                let key = |i: usize| index.newest(i, f.order == FloatOrder::Semver);
                // Ties: the first in reference order (the smaller tag).
                if newest.is_none_or(|b| key(i) < key(b)) {
                    newest = Some(i);
                }
            }
            let Some(newest) = newest else { continue };
            anchors[newest] = true;
            let existing = index.find_in(index.repos[r], &f.tag);
            let m = Move {
                existing,
                newest,
                target: entries[newest].img,
                rule: fi,
                count,
            };
            moves.insert((r, f.tag.as_str()), m);
        }
    }
    let moves: Vec<((usize, &str), Move)> = moves.into_iter().collect();
    let mut tags: Vec<Action> = moves
        .iter()
        .filter(|(_, m)| m.changes(entries))
        .map(|&((r, tag), m)| {
            let f = &policy.float[m.rule];
            let float_ref = format!("{}:{tag}", index.repos[r]);
            let order = match f.order {
                FloatOrder::Semver => "semver",
                FloatOrder::Created => "created",
            };
            let reason = format!(
                "{float_ref} -> {} (newest by {order} of {} candidate{})",
                entries[m.newest].reference.unwrap_or(""),
                m.count,
                if m.count == 1 { "" } else { "s" }
            );
            Action {
                kind: Kind::Tag,
                reference: Some(float_ref),
                image: images[m.target].id.clone(),
                rule: f.name.clone(),
                reason,
                bytes: None,
                keep_bytes: None,
                cache: None,
            }
        })
        .collect();
    tags.sort_by(|a, b| a.reference.cmp(&b.reference));
    plan.actions.extend(tags);

    // Which references stay on each image after the plan (for untag vs remove,
    // and for tag conventions' "keeps another reference").
    let mut remaining: Vec<usize> = vec![0; images.len()];
    for (i, e) in entries.iter().enumerate() {
        if e.reference.is_some() && cause[i].is_none() {
            remaining[e.img] += 1;
        }
    }
    for (_, m) in moves.iter().filter(|(_, m)| m.changes(entries)) {
        remaining[m.target] += 1;
        if let Some(cur) = m.existing {
            remaining[entries[cur].img] = remaining[entries[cur].img].saturating_sub(1);
        }
    }

    for (ti, rule) in policy.tags.iter().enumerate() {
        let mask = index.mask(&rule.images);
        let mut allowed = TagMemo::new(index.tags.len());
        let untag = rule.on_violation == OnViolation::Untag;
        for r in (0..index.repos.len()).filter(|&r| mask[r]) {
            for i in index.repo_entries(r) {
                let e = &entries[i];
                // Floating tags are stowage's own; they are not held to conventions.
                if cause[i].is_some()
                    || floating[i].is_some()
                    || anchors[i]
                    || allowed.get(e.tag_id, e.tag, |t| rule.allow.is_match(t))
                {
                    continue;
                }
                let protection = protection_of(i);
                if untag && remaining[e.img] > 1 && protection.is_none() {
                    cause[i] = Some(Cause::Convention(ti));
                    remaining[e.img] -= 1;
                    continue;
                }
                let base = reasons.violation(ti, e.tag);
                let reason = if !untag {
                    base
                } else if let Some((pr, _)) = protection {
                    format!("{base}; not untagged: protected by {pr}")
                } else {
                    format!("{base}; not untagged: it is the image's only reference")
                };
                plan.warnings.push(Warning {
                    reference: e.reference.map(str::to_string),
                    image: images[e.img].id.clone(),
                    rule: rule.name.clone(),
                    reason,
                });
            }
        }
    }

    // Removals in a stable order; an image's last reference goes last, as `remove`.
    // Entries are in reference order with the dangling images first:
    // references, then dangling images.
    let dangling = index.starts[0];
    let mut removals: Vec<usize> = (dangling..n)
        .chain(0..dangling)
        .filter(|&i| cause[i].is_some())
        .collect();
    // Per image: the position of its last removal, which is a `remove`
    // when no reference stays.
    let last_positions = |removals: &[usize]| {
        let mut last_of: Vec<Option<usize>> = vec![None; images.len()];
        for (pos, &i) in removals.iter().enumerate() {
            last_of[entries[i].img] = Some(pos);
        }
        last_of
    };
    let mut last_of = last_positions(&removals);
    // With `[daemon] trash`, an image that goes whole goes as one `trash`
    // action at its last removal, its other references folded into it: the
    // executor takes them all off at once and records them as its former
    // references.
    let window = secs(policy.daemon.trash);
    let trashing = window > 0;
    let mut folded: Vec<usize> = Vec::new();
    if trashing {
        let mut kept = Vec::with_capacity(removals.len());
        for (pos, &i) in removals.iter().enumerate() {
            let img = entries[i].img;
            if remaining[img] == 0 && last_of[img] != Some(pos) {
                folded.push(i);
            } else {
                kept.push(i);
            }
        }
        removals = kept;
        last_of = last_positions(&removals);
    }
    // An image with names before and none after, yet not removed: a float
    // moved off its last name.
    plan.dangling_after = (0..images.len())
        .filter(|&k| index.named[k] && remaining[k] == 0 && last_of[k].is_none())
        .map(|k| images[k].id.clone())
        .collect();
    let last = |pos: usize| {
        let img = entries[removals[pos]].img;
        last_of[img] == Some(pos) && remaining[img] == 0
    };
    let whole = if trashing { Kind::Trash } else { Kind::Remove };
    let kind = |pos: usize| if last(pos) { whole } else { Kind::Untag };
    // Per image going to the trash: how many references it has beyond the
    // one its action names.
    let mut more: Vec<usize> = vec![0; if trashing { images.len() } else { 0 }];
    for &i in &folded {
        more[entries[i].img] += 1;
    }
    // Every removal action is a removal: the first `max_removals` go now,
    // the rest are counted, and spelled out only when asked.
    let in_budget = removals.len().min(policy.daemon.max_removals);
    let built = detail.removals_to_build(removals.len(), in_budget);
    let mut removal_actions = parallel_map(built, |pos| {
        let i = removals[pos];
        let e = &entries[i];
        let img = images[e.img];
        let (rule, mut reason) = reasons.removed(cause[i].expect("a removal"), e);
        let kind = kind(pos);
        if kind == Kind::Trash {
            let _ = write!(reason, "; kept in the trash for {}", Human(window));
            match more[e.img] {
                0 => {}
                m => {
                    let _ = write!(reason, ", with {m} more reference(s)");
                }
            }
        }
        Action {
            kind,
            reference: e.reference.map(str::to_string),
            image: img.id.clone(),
            rule,
            reason,
            bytes: (kind == Kind::Remove).then_some(img.size),
            keep_bytes: None,
            cache: None,
        }
    });
    if trashing {
        let mut refs: Vec<Vec<&str>> = vec![Vec::new(); images.len()];
        for &i in folded.iter().chain(&removals) {
            if let Some(r) = entries[i].reference {
                refs[entries[i].img].push(r);
            }
        }
        let expires = at.saturating_add(window);
        for (pos, a) in removal_actions.iter().enumerate() {
            if a.kind != Kind::Trash {
                continue;
            }
            let k = entries[removals[pos]].img;
            let mut refs: Vec<String> = refs[k].iter().map(|r| (*r).to_string()).collect();
            refs.sort_unstable();
            plan.trash.push(super::Trashing {
                image: a.image.clone(),
                refs,
                trash_ref: crate::trash::reference(&a.image, expires),
                expires,
            });
        }
    }
    // Per rule (numbered): deferred untags and removes.
    let mut backlog = vec![[0usize; 2]; policy.retain.len() + policy.tags.len()];
    for (pos, &i) in removals.iter().enumerate().skip(in_budget) {
        let rule = reasons.rule_number(cause[i].expect("a removal"));
        backlog[rule][usize::from(last(pos))] += 1;
        if entries[i].reference.is_none() {
            plan.deferred_dangling.push(entries[i].img);
        }
    }
    for (rule, [untags, removes]) in backlog.into_iter().enumerate() {
        plan.defer(Kind::Untag, reasons.rule_name(rule), untags);
        plan.defer(whole, reasons.rule_name(rule), removes);
    }
    let mut decided: Vec<Option<(Decision, usize)>> = vec![None; n];
    for (pos, &i) in removals.iter().enumerate() {
        decided[i] = Some(if pos < in_budget {
            (decision_of(removal_actions[pos].kind), pos)
        } else {
            (Decision::Deferred, pos)
        });
    }
    for &i in &folded {
        decided[i] = last_of[entries[i].img].and_then(|pos| decided[removals[pos]]);
    }
    // Verdicts: for `status` and `plan --json`; a reconcile goes without.
    if detail.verdicts {
        plan.verdicts = parallel_map(n, |i| {
            let e = &entries[i];
            let (decision, rule, reason) = if let Some((d, pos)) = decided[i] {
                let a = &removal_actions[pos];
                (d, Some(a.rule.clone()), a.reason.clone())
            } else if let Some((r, why)) = protection_of(i) {
                (Decision::Protected, Some(r.to_string()), why.into_owned())
            } else if let Some(f) = floating[i] {
                (
                    Decision::Keep,
                    Some(policy.float[f].name.clone()),
                    "floating tag, never removed by retention".to_string(),
                )
            } else if let Some(m) = kept_by[i] {
                (
                    Decision::Keep,
                    Some(policy.retain[m.rule].name.clone()),
                    reasons.kept(m, index.facts[e.img].activity),
                )
            } else {
                (
                    Decision::Unmanaged,
                    None,
                    "no retention rule scopes it".to_string(),
                )
            };
            Verdict {
                reference: e.reference.map(str::to_string),
                image: images[e.img].id.clone(),
                decision,
                rule,
                reason,
            }
        });
    }
    let later = removal_actions.split_off(in_budget);
    plan.actions.extend(removal_actions);
    plan.deferred = later;
    // Protected references in some rule's scope that nothing tried to remove
    // are worth showing too: a person reading the plan wants to see them.
    for (i, e) in entries.iter().enumerate() {
        let scoped = kept_by[i].is_some() || removed_by[i].is_some();
        if scoped
            && !shown[i]
            && let Some((rule, reason)) = protection_of(i)
        {
            plan.protected.push(Protected {
                reference: e.reference.map(str::to_string),
                image: images[e.img].id.clone(),
                rule: rule.to_string(),
                reason: reason.into_owned(),
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
