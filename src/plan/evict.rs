//! Step 8: `[storage]` eviction on the store as retention leaves it, within
//! what is left of `max_removals`. The index and its per-image facts are the
//! ones retention used; nothing is derived twice.

use crate::policy::{Policy, Storage};
use crate::storage;

use super::index::Index;
use super::{Decision, Detail, Kind, Observed, Plan, count_removals, decision_of, parallel_map};

/// `counts`: the layer counts of `observed.images`, in their order.
#[allow(clippy::too_many_arguments)]
pub(super) fn evict(
    policy: &Policy,
    storage: &Storage,
    observed: &Observed,
    index: &Index,
    mut counts: storage::LayerCounts,
    now: i64,
    detail: Detail,
    result: &mut Plan,
) {
    let images = &index.images;
    let entries = &index.entries;
    // The store as the plan's retention leaves it, without copying it.
    let mut gone = vec![false; images.len()];
    let mut untagged = vec![false; entries.len()];
    for a in &result.actions {
        match (a.kind, a.reference.as_deref()) {
            (Kind::Untag, Some(r)) => {
                if let Some(i) = index.find(r) {
                    untagged[i] = true;
                }
            }
            (Kind::Remove, _) => {
                if let Some(k) = index.image(&a.image) {
                    gone[k] = true;
                }
            }
            _ => {}
        }
    }
    // Per image: its first reference left, how many are left, and the first
    // [[protect]] entry matching one of them (eviction takes the whole image,
    // so a match on any of its references protects it).
    let mut first: Vec<Option<&str>> = vec![None; images.len()];
    let mut count = vec![0usize; images.len()];
    let mut protect: Vec<Option<usize>> = vec![None; images.len()];
    for (i, e) in entries.iter().enumerate() {
        let Some(r) = e.reference else { continue };
        if untagged[i] {
            continue;
        }
        first[e.img].get_or_insert(r);
        count[e.img] += 1;
        if protect[e.img].is_none() {
            protect[e.img] = index.protect[i];
        }
    }
    // Per image: its position in the input, which the counts follow.
    let mut counted = vec![0; images.len()];
    for (input, &k) in index.at().iter().enumerate() {
        counted[k] = input;
    }
    let image_bytes_before = counts.bytes();
    for k in (0..images.len()).filter(|&k| gone[k]) {
        counts.remove(counted[k]);
    }
    let kept: Vec<usize> = (0..images.len()).filter(|&k| !gone[k]).collect();
    let candidates: Vec<storage::Candidate> = kept
        .iter()
        .map(|&k| storage::Candidate {
            image: images[k],
            counted: counted[k],
            first_tag: first[k],
            tags: count[k],
            activity: index.facts[k].activity,
            protection: index.facts[k]
                .protection
                .as_ref()
                .map(|(rule, _)| rule.as_str())
                .or_else(|| protect[k].map(|p| policy.protect[p].name.as_str())),
        })
        .collect();
    let inputs = storage::Inputs {
        storage,
        image_bytes_before,
        disk: observed.disk.as_ref(),
        disk_error: observed.disk_error.as_deref(),
        build_cache: observed.build_cache,
        now,
    };
    let outcome = storage::plan(&inputs, &candidates, counts);
    let budget = policy
        .daemon
        .max_removals
        .saturating_sub(count_removals(&result.actions));
    // Evictions are all removals: the first `budget` go now, the rest are
    // counted, and spelled out only when asked.
    let evictions = &outcome.evictions;
    let now_count = evictions.len().min(budget);
    let built = detail.removals_to_build(evictions.len(), now_count);
    let mut now_actions = parallel_map(built, |j| {
        outcome.action(&inputs, &candidates, evictions[j])
    });
    let later = now_actions.split_off(now_count);
    result.defer(Kind::Evict, "storage", evictions.len() - now_count);
    if detail.verdicts {
        // Per image: what eviction decided, and the action behind it.
        let mut decided: Vec<Option<(Decision, &super::Action)>> = vec![None; images.len()];
        for (j, e) in evictions.iter().enumerate() {
            decided[kept[e.candidate]] = Some(if j < now_count {
                (decision_of(now_actions[j].kind), &now_actions[j])
            } else {
                (Decision::Deferred, &later[j - now_count])
            });
        }
        // Verdicts of this index's entries come first, in entry order; any
        // after them (the follow-up pass) name their image.
        for (n, v) in result.verdicts.iter_mut().enumerate() {
            let k = match entries.get(n) {
                Some(e) => Some(e.img),
                None => index.image(&v.image),
            };
            if let Some((decision, a)) = k.and_then(|k| decided[k]) {
                v.decision = decision;
                v.rule = Some(a.rule.clone());
                v.reason.clone_from(&a.reason);
            }
        }
    }
    result.actions.extend(now_actions);
    result.actions.extend(outcome.prune);
    result.deferred.extend(later);
    result.pressure = Some(outcome.pressure);
}
