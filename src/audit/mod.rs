//! The audit log: one JSON object per line, appended and written through per
//! record so a crash loses at most the record being written. Readers tolerate
//! a torn last line; a writer that finds one starts on a fresh line.
//!
//! Writing never fails the caller: the record of an action that ran must not
//! stop the actions after it (eviction exists for a full disk, where writes
//! fail). A record that cannot be written (ENOSPC, EIO, a missing folder) is
//! held in memory, bounded, and written before the next record, at the end
//! of the reconcile, or by the next reconcile in the same process; the error
//! is logged once per episode. A partial line left by a failed write is cut
//! off again.
//!
//! When the log would pass `audit_max` it is renamed to `<audit_log>.1`
//! (replacing the previous generation) and a new file is started; readers
//! read both, oldest first, line by line.
//!
//! `warn`, `skip` and `deferred` records repeat nothing: each carries a
//! fingerprint of what it says, and one whose fingerprint was already stated
//! by the previous reconcile is not written again. The fingerprints live in
//! the state file ([`crate::state::State::reported`]), so a restart does not
//! repeat them either.
//!
//! Here the record types and the [`Tally`]; `writer` appends (held records
//! in `held`, rotation), `repeats` keeps `warn`/`skip`/`deferred` from
//! repeating, `reader` streams a log back.

mod held;
mod reader;
mod repeats;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use held::take_unwritten;
#[cfg(any(test, feature = "testkit"))]
pub use reader::{History, read};
pub use reader::{Records, records};
pub use writer::AuditLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Remove,
    Untag,
    Tag,
    Pull,
    Push,
    Evict,
    PruneBuild,
    PruneCache,
    Warn,
    Skip,
    /// `[daemon] trash`: references taken off, the image kept for the window.
    Trash,
    /// `stowage restore`: a trashed image's references put back.
    Restore,
    /// A bundle brought in (`stowage bundle import`, the daemon's inbox).
    Import,
    /// An admission check's verdict (`[[scan]]`).
    Scan,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Remove => "remove",
            Action::Untag => "untag",
            Action::Tag => "tag",
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Evict => "evict",
            Action::PruneBuild => "prune_build",
            Action::PruneCache => "prune_cache",
            Action::Warn => "warn",
            Action::Skip => "skip",
            Action::Trash => "trash",
            Action::Restore => "restore",
            Action::Import => "import",
            Action::Scan => "scan",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
    DryRun,
    Deferred,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::DryRun => "dry_run",
            Outcome::Deferred => "deferred",
        }
    }
}

/// One audit record, field names as in the policy spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub ts: DateTime<Utc>,
    /// Reconcile id.
    pub run: String,
    pub action: Action,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub reason: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `pull`: bytes a partial download already had, not fetched again in
    /// this attempt (`bytes` is what came over the network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Only [`AuditLog::open`] (tests) returns it: stowage holds records.
    #[cfg(any(test, feature = "testkit"))]
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read audit log {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The previous generation of the log at `path`: `<audit_log>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// What the records appended through one [`AuditLog`] say, counted as they
/// are appended (repeats it does not write are not counted): the daemon's
/// metrics, without reading the log back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records per action and outcome.
    pub records: BTreeMap<(Action, Outcome), u64>,
    /// Bytes that `ok` removals, evictions, build-cache and content-store
    /// prunes freed.
    pub bytes_freed: u64,
}

impl Tally {
    fn count(&mut self, r: &Record) {
        *self.records.entry((r.action, r.outcome)).or_default() += 1;
        if r.outcome == Outcome::Ok
            && matches!(
                r.action,
                Action::Remove | Action::Evict | Action::PruneBuild | Action::PruneCache
            )
        {
            self.bytes_freed += r.bytes.unwrap_or(0);
        }
    }
}

/// A record of an `ok` removal freeing `n` bytes, for the tests of each part.
#[cfg(test)]
fn sample(n: u64) -> Record {
    Record {
        ts: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        run: "r1".into(),
        action: Action::Remove,
        reference: Some("app:1".into()),
        image: Some("sha256:aa".into()),
        rule: Some("old".into()),
        reason: "beyond keep_last=1".into(),
        outcome: Outcome::Ok,
        error: None,
        bytes: Some(n),
        duration_ms: Some(3),
        resumed_bytes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_spec_field_names() {
        let v = serde_json::to_value(sample(1)).unwrap();
        for k in [
            "ts", "run", "action", "ref", "image", "rule", "reason", "outcome",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["action"], "remove");
        assert_eq!(v["outcome"], "ok");
    }
}
