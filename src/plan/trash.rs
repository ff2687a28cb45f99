//! Step 8 (before eviction): the trash's expiry. A `stowage-trash/`
//! reference stowage made ([`crate::trash::expiry_of`]) whose window has
//! ended goes (`remove`, rule `trash`; `untag` if the image has other
//! names now), whether or not the state still has its entry: the reference
//! carries its own expiry, so a reset state strands nothing. Within the
//! window it is shown as protected. Hand-made `stowage-trash/` tags are not
//! stowage's: left alone.

use crate::fmt::Human;
use crate::state::State;
use crate::trash;

use super::index::Index;
use super::{Action, Decision, Detail, Kind, Plan, count_removals, decision_of};

pub(super) fn expire(
    policy: &crate::policy::Policy,
    index: &Index,
    state: &State,
    at: i64,
    detail: Detail,
    result: &mut Plan,
) {
    let mut due: Vec<(usize, Action)> = Vec::new();
    for r in (0..index.repos.len()).filter(|&r| trash::is_trash_repo(index.repos[r])) {
        for i in index.repo_entries(r) {
            let e = &index.entries[i];
            let img = index.images[e.img];
            let (Some(reference), Some(expires)) = (
                e.reference,
                e.reference.and_then(|r| trash::expiry_of(r, &img.id)),
            ) else {
                continue;
            };
            let entry = state
                .trash
                .get(&img.id)
                .filter(|t| t.reference == reference);
            if expires > at {
                if detail.verdicts
                    && let Some(v) = result.verdicts.get_mut(i)
                {
                    v.decision = Decision::Protected;
                    v.rule = Some("trash".to_string());
                    v.reason = format!("in the trash for {} more", Human(expires - at));
                }
                continue;
            }
            // Absolute protections outlast the window (an image a container
            // uses is never removed).
            if index.facts[e.img].protection.is_some() {
                continue;
            }
            let reason = match entry {
                Some(t) => format!(
                    "in the trash since {} ago (rule {}), its window ended {} ago",
                    Human(at - t.removed_at),
                    t.rule,
                    Human(at - expires)
                ),
                None => format!(
                    "trash entry lost from the state (former references unknown); the window its reference carries ended {} ago",
                    Human(at - expires)
                ),
            };
            let only = img.repo_tags.len() <= 1;
            due.push((
                i,
                Action {
                    kind: if only { Kind::Remove } else { Kind::Untag },
                    reference: Some(reference.to_string()),
                    image: img.id.clone(),
                    rule: "trash".to_string(),
                    reason,
                    bytes: only.then_some(img.size),
                    keep_bytes: None,
                    cache: None,
                },
            ));
        }
    }
    let budget = policy
        .daemon
        .max_removals
        .saturating_sub(count_removals(&result.actions));
    for (n, (i, a)) in due.into_iter().enumerate() {
        let now = n < budget;
        if detail.verdicts
            && let Some(v) = result.verdicts.get_mut(i)
        {
            v.decision = if now {
                decision_of(a.kind)
            } else {
                Decision::Deferred
            };
            v.rule = Some(a.rule.clone());
            v.reason.clone_from(&a.reason);
        }
        if now {
            result.actions.push(a);
        } else {
            result.defer(a.kind, "trash", 1);
            if detail.deferred {
                result.deferred.push(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::{Image, Layer};
    use crate::plan::{Kind, Observed, plan};
    use crate::state::State;

    const MB: u64 = 1_000_000;

    /// Disk pressure empties the trash first, oldest first, and plans the
    /// bytes each eviction frees.
    #[test]
    fn eviction_takes_the_trash_first_oldest_first() {
        let policy = crate::policy::parse(
            "version = 1\n[daemon]\nmin_age = \"0s\"\ntrash = \"7d\"\n[storage]\nmax_size = \"70MB\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("valid");
        let id = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let image = |c: char, tags: Vec<String>, created: i64| Image {
            id: id(c),
            repo_tags: tags,
            repo_digests: vec![],
            created,
            size: 30 * MB,
        };
        let at = 10_000;
        let trash_ref = |c: char, t: i64| crate::trash::reference(&id(c), t);
        let mut observed = Observed {
            images: vec![
                // The oldest by creation, but not in the trash.
                image('a', vec!["app:1".into()], 10),
                image('b', vec![trash_ref('b', at + 500)], 500),
                image('c', vec![trash_ref('c', at + 100)], 900),
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
        let p = plan(&policy, &observed, &State::default(), at);
        let evicted: Vec<(&str, Option<u64>)> = p
            .actions
            .iter()
            .filter(|a| a.kind == Kind::Evict)
            .map(|a| (a.image.as_str(), a.bytes))
            .collect();
        // 90 MB against 70 MB: one eviction, the trash entry expiring first.
        assert_eq!(
            evicted,
            [(id('c').as_str(), Some(30 * MB))],
            "{}",
            crate::plan::render(&p)
        );
        assert!(p.actions[0].reason.contains("the trash is emptied first"));
    }
}
