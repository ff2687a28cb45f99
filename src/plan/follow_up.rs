//! Step 7: the follow-up pass over the images a floating tag leaves dangling.

// Fx hashing: keys are short strings hashed in the hot path; no untrusted
// input can pick them to collide.
use rustc_hash::FxHashSet as HashSet;

use crate::engine::Image;
use crate::policy::{Policy, RetainScope};
use crate::state::State;

use super::index::{self, Index, Sorted};
use super::retention::{self, retention};
use super::{
    Action, Decision, Detail, Kind, Observed, Plan, Verdict, count_removals, decision_of,
    split_budget,
};

/// Images that a floating tag leaves without a name (its other references
/// all go) become dangling only once the plan is applied. Dangling images are
/// the business of `untagged` rules alone, so a second pass over just the
/// dangling images, as the plan leaves them, settles them in this reconcile:
/// applying the plan and planning again then finds nothing.
pub(super) fn follow_up(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    at: i64,
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
        .filter(|a| matches!(a.kind, Kind::Remove | Kind::Trash) && a.reference.is_none())
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
        engine: observed.engine,
        ..Observed::default()
    };
    let sorted = Sorted::new(&store.images);
    let index = Index::build(
        policy,
        store.engine.naming(),
        &store.images,
        &sorted,
        || index::known(&sorted, policy, &store.containers, state, at),
    );
    let placement = retention::place_all(policy, &index, at, false);
    let next = retention(
        policy,
        &index,
        placement,
        at,
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
    let trash = next.trash;
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
    let (kept, later) = split_budget(fresh, budget);
    for (a, decision) in kept
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
    // Its images are not the first pass's: no image is trashed twice.
    result.trash.extend(trash);
    result.actions.extend(kept);
    for a in &later {
        result.defer(a.kind, &a.rule, 1);
    }
    if detail.deferred {
        result.deferred.extend(later);
    }
}
