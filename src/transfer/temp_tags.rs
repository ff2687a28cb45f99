//! The journal of the temporary tags mirror pushes make (`temp-tags.json` in
//! `state_dir`), and the removal of those an earlier, killed run left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Phase, TransferReport, elapsed_ms};
use crate::audit::{self, AuditError, AuditLog, Outcome, Record};
use crate::engine::Engine;
use crate::observe::Observed;

/// File in `state_dir` that names the temporary tags mirror pushes made and
/// have not removed yet (JSON: target reference -> [`TempTag`]).
pub const TEMP_TAGS_FILE: &str = "temp-tags.json";

/// One temporary tag a push made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TempTag {
    /// The image it was put on: a tag moved to another image since is no
    /// longer stowage's.
    pub(super) image: String,
    /// The mirror's name, for the audit record of its removal.
    pub(super) rule: String,
}

/// The journal of temporary tags. An entry is written (durably) before the
/// tag is made and dropped once the tag is gone, so a kill at any point
/// leaves either no tag or a tag the journal names.
pub(super) struct TempTags {
    pub(super) dir: PathBuf,
    entries: Mutex<BTreeMap<String, TempTag>>,
}

impl TempTags {
    pub(super) fn path_in(dir: &Path) -> PathBuf {
        dir.join(TEMP_TAGS_FILE)
    }

    /// A missing journal is empty; an unreadable one is reported and treated
    /// as empty (its tags then look like the user's: nothing is removed).
    pub(super) fn load(dir: &Path) -> Self {
        let path = Self::path_in(dir);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is unreadable ({e}); temporary tags it names are left alone",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}); temporary tags it names are left alone",
                    path.display()
                );
                BTreeMap::new()
            }
        };
        TempTags {
            dir: dir.to_path_buf(),
            entries: Mutex::new(entries),
        }
    }

    fn entries(&self) -> BTreeMap<String, TempTag> {
        self.lock().clone()
    }

    pub(super) fn contains(&self, target: &str) -> bool {
        self.lock().contains_key(target)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TempTag>> {
        // Plain data: a panic elsewhere does not make it wrong.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note `target` before it is tagged; the tag must not be made if this fails.
    pub(super) fn add(&self, target: &str, tag: TempTag) -> std::io::Result<()> {
        let mut entries = self.lock();
        entries.insert(target.to_owned(), tag);
        let written = self.write(&entries);
        if written.is_err() {
            entries.remove(target);
        }
        written
    }

    /// Forget `target` once its tag is gone. A failed write only leaves an
    /// entry whose tag the next start finds gone.
    pub(super) fn forget(&self, target: &str) {
        let mut entries = self.lock();
        if entries.remove(target).is_some()
            && let Err(e) = self.write(&entries)
        {
            tracing::warn!("cannot update {}: {e}", Self::path_in(&self.dir).display());
        }
    }

    /// Atomically replace the journal (temp file, fsync, rename, fsync of
    /// the folder); an empty journal is no file.
    fn write(&self, entries: &BTreeMap<String, TempTag>) -> std::io::Result<()> {
        let path = Self::path_in(&self.dir);
        if entries.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            std::fs::create_dir_all(&self.dir)?;
            let bytes = serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?;
            return crate::state::write_atomic(&path, &bytes);
        }
        crate::state::sync_dir(&self.dir)
    }
}

/// Remove the temporary tags that an earlier push could not remove (the
/// process was killed or abandoned it): they are stowage's, never a user's
/// reference. A tag moved to another image since is no longer stowage's and
/// stays. Like the push itself, removing the tag deletes the image when it
/// was its last reference (never forced).
pub(super) async fn remove_leftover_tags<E: Engine>(
    phase: &Phase<'_, E>,
    journal: &TempTags,
    observed: &mut Observed,
    audit: &mut AuditLog,
    report: &mut TransferReport,
) -> Result<(), AuditError> {
    let Phase {
        engine,
        run_id,
        clock,
        ..
    } = *phase;
    for (target, tag) in journal.entries() {
        match engine.image_id_of(&target).await {
            Ok(Some(id)) if id == tag.image => {}
            // Gone, or pointed elsewhere by someone since: not stowage's now.
            Ok(_) => {
                journal.forget(&target);
                continue;
            }
            Err(e) => {
                tracing::warn!("cannot check the leftover temporary tag {target}: {e}");
                continue;
            }
        }
        let started = clock.now();
        let mut rec = Record {
            ts: started,
            run: run_id.to_owned(),
            action: audit::Action::Untag,
            reference: Some(target.clone()),
            image: Some(tag.image.clone()),
            rule: Some(tag.rule.clone()),
            reason: "temporary tag of a mirror push that an earlier run did not finish".into(),
            outcome: Outcome::Ok,
            error: None,
            bytes: None,
            duration_ms: None,
            resumed_bytes: None,
        };
        if phase.options.dry_run {
            rec.outcome = Outcome::DryRun;
            report.dry_run += 1;
        } else {
            match engine.remove(&target).await {
                Ok(removed) => {
                    observed.removed(&removed);
                    journal.forget(&target);
                    tracing::info!(rule = %tag.rule, "untag {target}: {}", rec.reason);
                    report.untagged += 1;
                    report.changed = true;
                }
                Err(e) => {
                    // Kept in the journal: tried again at the next reconcile.
                    tracing::warn!(rule = %tag.rule, "cannot remove the leftover temporary tag {target}: {e}");
                    rec.outcome = Outcome::Failed;
                    rec.error = Some(e.to_string());
                    report.failed += 1;
                }
            }
            rec.duration_ms = elapsed_ms(clock, started);
        }
        audit.append(&rec);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_tag_journal_is_durable_and_no_file_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let journal = TempTags::load(&state_dir);
        let tag = TempTag {
            image: "sha256:a".into(),
            rule: "edge".into(),
        };
        journal.add("m:5000/app:1", tag.clone()).unwrap();
        journal.add("m:5000/app:2", tag.clone()).unwrap();
        journal.forget("m:5000/app:2");
        // What a later process finds.
        let again = TempTags::load(&state_dir);
        assert_eq!(
            again.entries().into_iter().collect::<Vec<_>>(),
            [("m:5000/app:1".to_owned(), tag)]
        );
        again.forget("m:5000/app:1");
        assert!(!state_dir.join(TEMP_TAGS_FILE).exists());
        // A torn journal names nothing: its tags are left alone.
        std::fs::write(state_dir.join(TEMP_TAGS_FILE), b"{\"m:5000/a").unwrap();
        assert!(TempTags::load(&state_dir).entries().is_empty());
    }
}
