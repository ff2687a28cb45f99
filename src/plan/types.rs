//! The plan's types: actions, protections, warnings, verdicts, the backlog.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Pressure;

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
    /// `[daemon] trash`: the image loses its references but stays, held
    /// by one `stowage-trash/` reference until its window ends.
    Trash,
    /// Prune the engine's build cache.
    PruneBuild,
    /// Shrink the content store (`cache_dir`): complete blobs, least
    /// recently used first.
    PruneCache,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tag => "tag",
            Kind::Untag => "untag",
            Kind::Remove => "remove",
            Kind::Evict => "evict",
            Kind::Trash => "trash",
            Kind::PruneBuild => "prune_build",
            Kind::PruneCache => "prune_cache",
        }
    }
    /// Counts against `max_removals`.
    pub fn is_removal(self) -> bool {
        matches!(self, Kind::Untag | Kind::Remove | Kind::Evict | Kind::Trash)
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
    /// `prune_build`: cache bytes above the maximum; `prune_cache`: at
    /// least these, in whole blobs).
    pub bytes: Option<u64>,
    /// For `prune_build`: the build-cache bytes to keep; for `prune_cache`:
    /// the complete bytes the content store keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_bytes: Option<u64>,
    /// For `prune_cache`: which store, and what it keeps whatever the limit.
    #[serde(skip)]
    pub cache: Option<CacheTarget>,
}

/// The content store a `prune_cache` action shrinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTarget {
    pub dir: PathBuf,
    /// Blobs unfinished downloads need (sorted); partial downloads are kept
    /// too, as the executor finds them.
    pub keep: Vec<String>,
}

/// What a `trash` action does to its image: the references it takes off
/// (all it has), and the one it puts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trashing {
    pub image: String,
    /// Sorted; empty for a dangling image.
    pub refs: Vec<String>,
    /// `stowage-trash/<12-hex id>:<expires>`.
    pub trash_ref: String,
    /// When its window ends (Unix seconds).
    pub expires: i64,
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
    Trash,
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
            Decision::Trash => "trash",
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
    /// full: only from [`plan`](super::plan()). A reconcile has no use for
    /// what it will not do, and on a large backlog spelling it out is most of
    /// a plan's work.
    pub deferred: Vec<Action>,
    /// Per `trash` action (in `actions` or `deferred`): what it takes off and
    /// puts on its image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trash: Vec<Trashing>,
    /// Where the executor journals each trash's state entry before it puts
    /// the trash reference on (`reconcile::trash_journal`): set by the
    /// reconcile, which owns the state; never by the planner.
    #[serde(skip)]
    pub trash_journal: Option<PathBuf>,
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
    pub(super) dangling_after: Vec<String>,
    /// Images (in index order) whose removal as dangling images is deferred:
    /// for the follow-up pass, which must not plan them twice.
    #[serde(skip)]
    pub(super) deferred_dangling: Vec<usize>,
}

impl Plan {
    /// What the `trash` action on `image` does.
    pub fn trashing(&self, image: &str) -> Option<&Trashing> {
        self.trash.iter().find(|t| t.image == image)
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.backlog.is_empty()
    }

    /// Removals held back by `max_removals`.
    pub fn deferred_count(&self) -> usize {
        self.backlog.iter().map(|b| b.count).sum()
    }

    /// Count `n` more deferred removals of a kind and rule.
    pub(super) fn defer(&mut self, kind: Kind, rule: &str, n: usize) {
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
