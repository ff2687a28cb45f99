//! Step 8: `[storage]` eviction on the store as retention leaves it, within
//! what is left of `max_removals`, after shrinking the content store (not a
//! removal: it removes no image). The index and its per-image facts are the
//! ones retention used; nothing is derived twice.

use std::fmt::Write as _;

use crate::fmt::{Human, human_bytes};
use crate::policy::{EvictOrder, Policy, Storage};
use crate::storage;

use super::index::Index;
use super::{
    Action, CacheTarget, Decision, Detail, Kind, Observed, Plan, count_removals, decision_of,
    parallel_map,
};

/// `counts`: the layer counts of `observed.images`, in their order.
#[allow(clippy::too_many_arguments)]
pub(super) fn evict(
    policy: &Policy,
    storage: &Storage,
    observed: &Observed,
    index: &Index,
    mut counts: storage::LayerCounts,
    at: i64,
    detail: Detail,
    result: &mut Plan,
) {
    let images = &index.images;
    let entries = &index.entries;
    // The store as the plan's retention leaves it, without copying it.
    let mut gone = vec![false; images.len()];
    let mut untagged = vec![false; entries.len()];
    // Per image: when its trash window ends, for one in the trash or going
    // there in this plan (eviction takes those first, oldest first).
    let mut in_trash: Vec<Option<i64>> = images
        .iter()
        .map(|i| crate::trash::held_by(i).map(|(_, t)| t))
        .collect();
    for t in &result.trash {
        if let Some(k) = index.image(&t.image) {
            in_trash[k] = Some(t.expires);
        }
    }
    for a in &result.actions {
        match (a.kind, a.reference.as_deref()) {
            (Kind::Untag, Some(r)) => {
                if let Some(i) = index.find(r) {
                    untagged[i] = true;
                }
            }
            (Kind::Trash, _) => {
                for r in result.trashing(&a.image).map_or(&[][..], |t| &t.refs) {
                    if let Some(i) = index.find(r) {
                        untagged[i] = true;
                    }
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
    for (input, &k) in index.positions().iter().enumerate() {
        counted[k] = input;
    }
    let image_bytes_before = counts.bytes();
    for k in (0..images.len()).filter(|&k| gone[k]) {
        counts.remove(counted[k]);
    }
    let kept: Vec<usize> = (0..images.len()).filter(|&k| !gone[k]).collect();
    let candidates: Vec<storage::Evictable> = kept
        .iter()
        .map(|&k| storage::Evictable {
            image: images[k],
            counted: counted[k],
            first_tag: first[k],
            tags: count[k],
            activity: index.facts[k].activity,
            trash: in_trash[k],
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
        cache: observed.cache.as_ref(),
        cache_error: observed.cache_error.as_deref(),
        at,
    };
    let decided = storage::decide(&inputs, &candidates, counts);
    let budget = policy
        .daemon
        .max_removals
        .saturating_sub(count_removals(&result.actions));
    // Evictions are all removals: the first `budget` go now, the rest are
    // counted, and spelled out only when asked.
    let evictions = &decided.evictions;
    let in_budget = evictions.len().min(budget);
    let built = detail.removals_to_build(evictions.len(), in_budget);
    let mut evict_actions = parallel_map(built, |j| {
        evict_action(&inputs, &decided.targets, &candidates, evictions[j])
    });
    let later = evict_actions.split_off(in_budget);
    result.defer(Kind::Evict, "storage", evictions.len() - in_budget);
    if detail.verdicts {
        // Per image: what eviction decided, and the action behind it.
        let mut per_image: Vec<Option<(Decision, &Action)>> = vec![None; images.len()];
        for (j, e) in evictions.iter().enumerate() {
            per_image[kept[e.candidate]] = Some(if j < in_budget {
                (decision_of(evict_actions[j].kind), &evict_actions[j])
            } else {
                (Decision::Deferred, &later[j - in_budget])
            });
        }
        // Verdicts of this index's entries come first, in entry order; any
        // after them (the follow-up pass) name their image.
        for (n, v) in result.verdicts.iter_mut().enumerate() {
            let k = match entries.get(n) {
                Some(e) => Some(e.img),
                None => index.image(&v.image),
            };
            if let Some((decision, a)) = k.and_then(|k| per_image[k]) {
                v.decision = decision;
                v.rule = Some(a.rule.clone());
                v.reason.clone_from(&a.reason);
            }
        }
    }
    // The content store shrinks before any image is evicted.
    result.actions.extend(
        decided
            .shrink
            .map(|s| shrink_action(policy, observed, &decided.targets, s)),
    );
    result.actions.extend(evict_actions);
    result.actions.extend(decided.prune.map(prune_action));
    result.deferred.extend(later);
    result.pressure = Some(decided.pressure);
}

/// The `evict` action of one eviction.
fn evict_action(
    inputs: &storage::Inputs,
    targets: &str,
    candidates: &[storage::Evictable],
    e: storage::Eviction,
) -> Action {
    let c = &candidates[e.candidate];
    let mut reason = String::with_capacity(80 + targets.len());
    let _ = match (c.trash, inputs.storage.order) {
        (Some(t), _) => write!(
            reason,
            "in the trash (its window ends in {}): the trash is emptied first",
            Human(t.saturating_sub(inputs.at).max(0))
        ),
        (None, EvictOrder::Lru) => write!(
            reason,
            "least recently active (last activity {} ago)",
            Human(inputs.at - c.activity)
        ),
        (None, EvictOrder::Created) => write!(
            reason,
            "oldest created ({} ago)",
            Human(inputs.at - c.image.created)
        ),
    };
    if c.tags > 1 {
        let _ = write!(reason, ", with {} more reference(s)", c.tags - 1);
    }
    reason.push_str("; ");
    reason.push_str(targets);
    Action {
        kind: Kind::Evict,
        reference: c.first_tag.map(str::to_string),
        image: c.image.id.clone(),
        rule: "storage".to_string(),
        reason,
        bytes: Some(e.bytes),
        keep_bytes: None,
        cache: None,
    }
}

/// The `prune_cache` action of a content-store shrink.
fn shrink_action(
    policy: &Policy,
    observed: &Observed,
    targets: &str,
    s: storage::Shrink,
) -> Action {
    let mut keep: Vec<String> = observed
        .downloading
        .iter()
        .map(|(digest, _)| digest.clone())
        .collect();
    keep.sort_unstable();
    keep.dedup();
    Action {
        kind: Kind::PruneCache,
        reference: None,
        image: String::new(),
        rule: "storage".to_string(),
        reason: format!(
            "complete blobs {} down to {}, least recently used first, before any image is evicted; {targets}",
            human_bytes(s.complete),
            human_bytes(s.keep)
        ),
        bytes: Some(s.complete - s.keep),
        keep_bytes: Some(s.keep),
        cache: Some(CacheTarget {
            dir: policy.daemon.cache_dir.clone(),
            keep,
        }),
    }
}

/// The `prune_build` action of a due build-cache prune.
fn prune_action(p: storage::Prune) -> Action {
    Action {
        kind: Kind::PruneBuild,
        reference: None,
        image: String::new(),
        rule: "storage".to_string(),
        reason: format!(
            "build cache {} > build_cache_max {}",
            human_bytes(p.size),
            human_bytes(p.max)
        ),
        bytes: Some(p.size - p.max),
        keep_bytes: Some(p.max),
        cache: None,
    }
}
