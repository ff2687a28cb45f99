//! The trash: what `[daemon] trash` keeps of an image that retention or a
//! `[[tags]]` rule removed, pure (no I/O, no clock).
//!
//! A trashed image loses its references and keeps one,
//! `stowage-trash/<12-hex id>:<unix seconds>`, that says when its window
//! ends: the engine holds the image, and the tag holds the expiry, so a lost
//! or reset state strands nothing (the tag alone says when it goes). The
//! state keeps an [`Entry`] per trashed image: its former references, the
//! rule, the time, its `RepoDigests` (to pull it back after the window).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::Image;
use crate::fmt::short_id;
use crate::refs::split_tag;
use crate::state::State;

/// The repository prefix of trash references.
pub const PREFIX: &str = "stowage-trash/";

/// Expired entries kept (for `restore` by digest after the window), newest
/// first; older ones are forgotten.
const GONE_KEPT: usize = 256;

/// What the state keeps of one trashed image (keyed by image id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The `stowage-trash/…` reference holding it.
    pub reference: String,
    /// Every reference it had when it was trashed, sorted.
    pub former: Vec<String>,
    /// Its `RepoDigests` then: where a registry may still have it.
    #[serde(default)]
    pub repo_digests: Vec<String>,
    pub rule: String,
    pub reason: String,
    pub removed_at: i64,
    pub expires: i64,
    pub size: u64,
    /// When the window passed and the image went (kept for a `restore` by
    /// digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_at: Option<i64>,
}

/// The trash reference of `image` expiring at `expires`.
pub fn reference(image: &str, expires: i64) -> String {
    format!("{PREFIX}{}:{expires}", short_id(image))
}

/// Whether `reference` is in the trash's repositories at all (made by
/// stowage or by hand): retention never scopes these.
pub fn is_trash_repo(repo: &str) -> bool {
    repo.starts_with(PREFIX)
}

/// The expiry a trash reference of `image` carries, when stowage made it:
/// `stowage-trash/<the image's 12-hex id prefix>:<unix seconds>`. A tag that
/// is not a plain unix time, or names another id, is someone else's.
pub fn expiry_of(reference: &str, image: &str) -> Option<i64> {
    let (repo, tag) = split_tag(reference);
    let id = repo.strip_prefix(PREFIX)?;
    let tag = tag?;
    let plain = !tag.is_empty()
        && tag.len() <= 12
        && tag.bytes().all(|b| b.is_ascii_digit())
        && !tag.starts_with('0');
    let own = id.len() == 12 && id == short_id(image);
    if !(plain && own) {
        return None;
    }
    tag.parse().ok()
}

/// The trash reference stowage made on `img`, and its expiry.
pub fn held_by(img: &Image) -> Option<(&str, i64)> {
    img.repo_tags
        .iter()
        .find_map(|r| expiry_of(r, &img.id).map(|t| (r.as_str(), t)))
}

/// One row of `stowage trash`: an entry of the state, or a trash reference
/// on the host whose entry was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub image: String,
    pub reference: String,
    /// `None`: the entry was lost (a reset state); its former references
    /// are not known.
    pub former: Option<Vec<String>>,
    pub rule: Option<String>,
    pub removed_at: Option<i64>,
    pub expires: i64,
    pub size: u64,
    /// Still on the host (within its window, or expired and not yet removed).
    pub present: bool,
}

/// What is in the trash, as the state and the host say, oldest expiry first.
pub fn rows(state: &State, images: &[Image]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for img in images {
        let Some((r, expires)) = held_by(img) else {
            continue;
        };
        seen.insert(img.id.as_str());
        let e = state.trash.get(&img.id).filter(|e| e.reference == r);
        out.push(Row {
            image: img.id.clone(),
            reference: r.to_string(),
            former: e.map(|e| e.former.clone()),
            rule: e.map(|e| e.rule.clone()),
            removed_at: e.map(|e| e.removed_at),
            expires,
            size: img.size,
            present: true,
        });
    }
    for (id, e) in &state.trash {
        if seen.contains(id.as_str()) {
            continue;
        }
        out.push(Row {
            image: id.clone(),
            reference: e.reference.clone(),
            former: Some(e.former.clone()),
            rule: Some(e.rule.clone()),
            removed_at: Some(e.removed_at),
            expires: e.expires,
            size: e.size,
            present: false,
        });
    }
    out.sort_by(|a, b| a.expires.cmp(&b.expires).then(a.image.cmp(&b.image)));
    out
}

/// How much the trash holds on the host (`status`, the daemon's gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub images: u64,
    /// Sum of their sizes as the engine lists them.
    pub bytes: u64,
}

/// Count and bytes of the images the trash holds on the host (held by a
/// trash reference stowage made, in their window or due).
pub fn totals(images: &[Image]) -> Totals {
    images
        .iter()
        .filter(|i| held_by(i).is_some())
        .fold(Totals::default(), |t, i| Totals {
            images: t.images + 1,
            bytes: t.bytes + i.size,
        })
}

/// Journaled entries (`reconcile::trash_journal`: written before each trash
/// reference is put on) into the state: those whose image carries their
/// trash reference and that the state does not hold. Gives how many came
/// back (a run killed before its state's save, or a trash stopped halfway).
pub fn recover(state: &mut State, journaled: BTreeMap<String, Entry>, images: &[Image]) -> usize {
    if journaled.is_empty() {
        return 0;
    }
    let held: BTreeMap<&str, &str> = images
        .iter()
        .filter_map(|i| held_by(i).map(|(r, _)| (i.id.as_str(), r)))
        .collect();
    let mut n = 0;
    for (id, e) in journaled {
        let carried = held.get(id.as_str()) == Some(&e.reference.as_str());
        let known = state
            .trash
            .get(&id)
            .is_some_and(|t| t.reference == e.reference);
        if carried && !known {
            state.trash.insert(id, e);
            n += 1;
        }
    }
    n
}

/// After an execution: the entries it trashed go into the state; an entry
/// whose image is no longer held by its reference is marked gone (kept, a
/// bounded number, for `restore` by digest); `--protect` holds that ended
/// are dropped.
pub fn settle(state: &mut State, added: Vec<(String, Entry)>, images: &[Image], at: i64) {
    state.trash.extend(added);
    let held: BTreeMap<&str, &str> = images
        .iter()
        .filter_map(|i| held_by(i).map(|(r, _)| (i.id.as_str(), r)))
        .collect();
    let present: std::collections::HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
    // On the host without its trash reference: restored (by `stowage
    // restore` beside the daemon, or by hand): the entry goes.
    state.trash.retain(|id, e| {
        held.get(id.as_str()) == Some(&e.reference.as_str()) || !present.contains(id.as_str())
    });
    for (id, e) in &mut state.trash {
        let on_host = held.get(id.as_str()) == Some(&e.reference.as_str());
        if on_host {
            e.gone_at = None;
        } else if e.gone_at.is_none() {
            e.gone_at = Some(at);
        }
    }
    let mut gone: Vec<(i64, String)> = state
        .trash
        .iter()
        .filter_map(|(id, e)| e.gone_at.map(|t| (t, id.clone())))
        .collect();
    if gone.len() > GONE_KEPT {
        gone.sort();
        for (_, id) in &gone[..gone.len() - GONE_KEPT] {
            state.trash.remove(id);
        }
    }
    state.held.retain(|_, until| *until > at);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn journaled_entries_come_back_only_while_their_reference_holds_the_image() {
        let expires = 1_700_000_000;
        let entry = |former: &str| Entry {
            reference: reference(ID, expires),
            former: vec![former.to_owned()],
            ..Entry::default()
        };
        let held = Image {
            id: ID.to_owned(),
            repo_tags: vec![reference(ID, expires)],
            repo_digests: vec![],
            created: 0,
            size: 1,
        };
        let journaled: BTreeMap<String, Entry> = [(ID.to_owned(), entry("app:v1"))].into();
        let mut state = State::default();
        // Restored since (no trash reference), or gone: nothing comes back.
        let restored = Image {
            repo_tags: vec!["app:v1".into()],
            ..held.clone()
        };
        assert_eq!(recover(&mut state, journaled.clone(), &[restored]), 0);
        assert_eq!(recover(&mut state, journaled.clone(), &[]), 0);
        assert!(state.trash.is_empty());
        assert_eq!(
            recover(&mut state, journaled.clone(), std::slice::from_ref(&held)),
            1
        );
        assert_eq!(state.trash[ID].former, ["app:v1"]);
        // The state's own entry wins over the journal's.
        state.trash.get_mut(ID).unwrap().rule = "kept".into();
        assert_eq!(recover(&mut state, journaled, &[held]), 0);
        assert_eq!(state.trash[ID].rule, "kept");
    }

    #[test]
    fn only_references_stowage_made_count() {
        let r = reference(ID, 1_700_000_000);
        assert_eq!(r, "stowage-trash/0123456789ab:1700000000");
        assert_eq!(expiry_of(&r, ID), Some(1_700_000_000));
        for hand_made in [
            "stowage-trash/0123456789ab:latest",
            "stowage-trash/0123456789ab:017",
            "stowage-trash/0123456789ab:-5",
            "stowage-trash/0123456789ab:99999999999999",
            "stowage-trash/ffffffffffff:1700000000",
            "stowage-trash/0123456789:1700000000",
            "stowage-trash/0123456789ab",
            "app:1700000000",
        ] {
            assert_eq!(expiry_of(hand_made, ID), None, "{hand_made}");
        }
        assert!(is_trash_repo("stowage-trash/x"));
        assert!(!is_trash_repo("stowage-trashy"));
    }
}
