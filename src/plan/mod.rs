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
//! 8. the trash's expiry (`[daemon] trash`): references whose window ended;
//! 9. `[storage]` eviction on the store as all that leaves it, the trash
//!    first.

mod evict;
mod follow_up;
mod index;
mod render;
mod retention;
mod threads;
mod trash;
mod types;

use crate::policy::Policy;
use crate::state::State;
use crate::storage::{self, Pressure};

use follow_up::follow_up;
use index::{Index, Sorted};
use retention::retention;
use threads::{PARALLEL_FROM, beside, join, parallel_map, parallel_tasks};

pub use render::render;
pub use types::{
    Action, Backlog, CacheTarget, Decision, Kind, Plan, Protected, Trashing, Verdict, Warning,
};

// The observation is the planner's input; re-exported under its old path.
pub use crate::observe::{LayerMap, Observed};

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

    /// Of `all` removals whose first `kept` fit the budget: how many to
    /// build as actions. The rest are only counted unless deferred ones are
    /// spelled out.
    fn removals_to_build(self, all: usize, kept: usize) -> usize {
        if self.deferred { all } else { kept }
    }
}

/// Plan one reconcile, with a verdict for every reference (`status`,
/// `plan --json`), as of `at` (Unix seconds).
pub fn plan(policy: &Policy, observed: &Observed, state: &State, at: i64) -> Plan {
    plan_with(policy, observed, state, at, Detail::ALL, PARALLEL_FROM)
}

/// The same plan without `verdicts` and with `deferred` only counted (in
/// `backlog`): what a reconcile executes. The verdicts, a row per reference,
/// are for `status`; a reconcile would only build and drop them.
pub fn plan_to_apply(policy: &Policy, observed: &Observed, state: &State, at: i64) -> Plan {
    plan_with(policy, observed, state, at, Detail::APPLY, PARALLEL_FROM)
}

fn plan_with(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    at: i64,
    detail: Detail,
    parallel_from: usize,
) -> Plan {
    let sorted = Sorted::new(&observed.images);
    let parallel = observed.images.len() >= parallel_from;
    let look = || index::known(&sorted, policy, &observed.containers, state, at);
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
        let naming = observed.engine.naming();
        let index = Index::build(policy, naming, &observed.images, &sorted, || {
            known.map_or_else(look, join)
        });
        let placement = retention::place_all(policy, &index, at, parallel);
        let counting = beside(scope, parallel, count_layers);
        let mut result = retention(policy, &index, placement, at, detail);
        if !result.dangling_after.is_empty() {
            follow_up(policy, observed, state, at, &index, detail, &mut result);
        }
        result.deferred_dangling = Vec::new();
        trash::expire(policy, &index, state, at, detail, &mut result);
        let counts = counting.map_or_else(count_layers, join);
        if let (Some(storage), Some(counts)) = (&policy.storage, counts) {
            evict::evict(
                policy,
                storage,
                observed,
                &index,
                counts,
                at,
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

fn decision_of(k: Kind) -> Decision {
    match k {
        Kind::Tag | Kind::PruneBuild | Kind::PruneCache => Decision::Keep,
        Kind::Untag => Decision::Untag,
        Kind::Remove => Decision::Remove,
        Kind::Evict => Decision::Evict,
        Kind::Trash => Decision::Trash,
    }
}

fn count_removals(actions: &[Action]) -> usize {
    actions.iter().filter(|a| a.kind.is_removal()).count()
}

/// Keep the first `budget` removals; the rest are deferred. Tags always pass.
fn split_budget(actions: Vec<Action>, budget: usize) -> (Vec<Action>, Vec<Action>) {
    let mut kept = Vec::new();
    let mut deferred = Vec::new();
    let mut used = 0;
    for a in actions {
        if a.kind.is_removal() {
            if used < budget {
                used += 1;
                kept.push(a);
            } else {
                deferred.push(a);
            }
        } else {
            kept.push(a);
        }
    }
    (kept, deferred)
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

    /// The content store shrinks first, whatever `max_removals` leaves (it
    /// removes no image), keeping what unfinished downloads need.
    #[test]
    fn the_content_store_shrinks_first_and_is_not_a_removal() {
        use crate::engine::{Image, Layer};
        const MB: u64 = 1_000_000;
        let policy = crate::policy::parse(
            "version = 1\n[daemon]\nmax_removals = 0\nmin_age = \"0s\"\ncache_dir = \"/srv/cache\"\n\
             [storage]\nmax_size = \"50MB\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("valid");
        let image = |id: &str, created: i64| Image {
            id: format!("sha256:{id:0<64}"),
            repo_tags: vec![format!("{id}:1")],
            repo_digests: vec![],
            created,
            size: 30 * MB,
        };
        let mut observed = Observed {
            images: vec![image("a", 10), image("b", 20)],
            cache: Some(crate::observe::Cache {
                complete: 30 * MB,
                partial: 5 * MB,
                pinned: 10 * MB,
                on_data_root: false,
            }),
            downloading: vec![
                ("sha256:22".into(), 10 * MB),
                ("sha256:11".into(), 5 * MB),
                ("sha256:22".into(), 10 * MB),
            ],
            ..Observed::default()
        };
        for img in &observed.images {
            let layer = Layer {
                chain_id: img.id.clone(),
                size: img.size,
            };
            observed.layers.insert(img.id.clone(), vec![layer]);
        }
        // 60 MB of images + 35 MB of store against 50 MB: 45 MB to free;
        // the store gives 20 MB, an eviction (deferred here) the rest.
        let p = plan(&policy, &observed, &State::default(), 1_000);
        assert_eq!(p.actions.len(), 1, "{}", render(&p));
        let a = &p.actions[0];
        assert_eq!(
            (a.kind, a.bytes, a.keep_bytes),
            (Kind::PruneCache, Some(20 * MB), Some(10 * MB))
        );
        let target = a.cache.as_ref().expect("names its store");
        assert_eq!(target.dir, std::path::Path::new("/srv/cache"));
        assert_eq!(target.keep, ["sha256:11", "sha256:22"]);
        assert_eq!(p.deferred.len(), 1);
        assert_eq!(p.deferred[0].kind, Kind::Evict);
        let json = serde_json::to_value(&p.actions[0]).unwrap();
        assert_eq!(json["kind"], "prune_cache");
        assert!(json.get("cache").is_none(), "{json}");
        // Without a content store, no such action.
        observed.cache = None;
        let p = plan(&policy, &observed, &State::default(), 1_000);
        assert!(p.actions.iter().all(|a| a.kind != Kind::PruneCache));
    }
}
