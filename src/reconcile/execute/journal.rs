//! The removals in flight, journaled beside the audit log, so that a process
//! killed (`kill -9`, the OOM killer) with removals in flight loses none of
//! their records.
//!
//! The executor writes an intent (the record a removal gets, and what it
//! removes) right after its re-check and before the engine is asked, and the
//! record itself once the removal is done. A process that dies in between
//! leaves its journal behind: the next execution, in any process, that can
//! lock it skips the intents whose record the audit log has, asks the engine
//! about the others, writes the records of what the engine carried out, and
//! removes the journal.
//!
//! One file per execution, `<audit_log>.removing.<run>`, created on the first
//! intent and locked (`flock`) as long as its writer lives, so that a live
//! process's journal is never taken for a dead one's; removed at the end of
//! the execution. Written through per intent like the audit log, not
//! fsynced: it survives a killed process, and a power cut only as the audit
//! log's own records do (both are synced at the end of a reconcile).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditError, AuditLog, Outcome, Record};
use crate::blocking::off_loop;
use crate::engine::{Engine, EngineError};

/// Intents after which the executor lets the removals in flight finish and
/// empties the journal: it stays small however long the plan.
pub(super) const SPAN: usize = 64;

/// Between the audit log's file name and the run id.
const INFIX: &str = ".removing.";

/// One removal about to be asked of the engine.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    /// The record it gets when the engine carries it out.
    record: Record,
    /// What it removes, in order: references, or the image id.
    targets: Vec<String>,
}

/// The journal of one execution (see the module documentation).
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    writer: Mutex<Writer>,
}

#[derive(Debug, Default)]
struct Writer {
    file: Option<File>,
    /// Intents written since the journal was last emptied.
    noted: usize,
    /// A write failed: nothing more is journaled in this execution.
    broken: bool,
}

impl Journal {
    /// The journal of run `run`, beside the audit log at `audit`; no file
    /// until the first intent.
    pub(super) fn new(audit: &Path, run: &str) -> Self {
        let mut name = audit.file_name().unwrap_or_default().to_owned();
        name.push(INFIX);
        name.push(run);
        Journal {
            path: audit.with_file_name(name),
            writer: Mutex::new(Writer::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // Plain data: a panic elsewhere does not make it wrong.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether intents are being written (false after a failed write: then
    /// the executor keeps one removal in flight, as a kill loses at most its
    /// record).
    pub(super) fn working(&self) -> bool {
        !self.lock().broken
    }

    /// Intents written since the journal was last emptied.
    pub(super) fn noted(&self) -> usize {
        self.lock().noted
    }

    /// Journal a removal whose re-check passed, before the engine is asked.
    /// A failure (a full disk, where eviction must still go on) is logged,
    /// and the removal goes ahead.
    pub(super) fn note(&self, record: &Record, targets: &[String]) {
        let mut w = self.lock();
        if w.broken {
            return;
        }
        let intent = Intent {
            record: record.clone(),
            targets: targets.to_vec(),
        };
        let written = serde_json::to_vec(&intent)
            .map_err(std::io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                if w.file.is_none() {
                    w.file = Some(create(&self.path)?);
                }
                let file = w
                    .file
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("not open"))?;
                file.write_all(&line)
            });
        match written {
            Ok(()) => w.noted += 1,
            Err(e) => {
                w.broken = true;
                tracing::warn!(
                    "cannot journal removals in {}: {e}; removing one at a time",
                    self.path.display()
                );
            }
        }
    }

    /// Empty the journal: every intent in it has its record (nothing is in
    /// flight). A failure leaves intents that the audit log already answers.
    pub(super) fn clear(&self) {
        let mut w = self.lock();
        w.noted = 0;
        if let Some(f) = &w.file
            && let Err(e) = f.set_len(0)
        {
            tracing::warn!("cannot empty {}: {e}", self.path.display());
        }
    }
}

impl Drop for Journal {
    /// The execution is over and its records are appended: the journal goes
    /// (removed while still locked, then closed).
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if w.file.take().is_some()
            && let Err(e) = fs::remove_file(&self.path)
        {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A new journal file, locked. A recovery that locked it first (it was
/// still empty) removed it: then it is not ours to write in.
fn create(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(path)?;
    file.lock()?;
    if fs::metadata(path)?.ino() != file.metadata()?.ino() {
        return Err(std::io::Error::other("removed by another process"));
    }
    Ok(file)
}

#[derive(Debug, thiserror::Error)]
enum RecoverError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
}

/// Write the records of the removals that stopped executions left in
/// flight, from the journals beside the audit log that no live process
/// holds. Failures are logged; the journal then stays for the next
/// execution. Nothing is recovered while the audit log cannot be written.
pub(super) async fn recover<E: Engine>(engine: &E, audit: &mut AuditLog) {
    if audit.held() > 0 {
        return;
    }
    for path in leftovers(audit.path()) {
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!("cannot open {}: {e}", path.display());
                continue;
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            // Its execution is still running.
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                tracing::warn!("cannot lock {}: {e}", path.display());
                continue;
            }
        }
        match recover_one(engine, audit, &file).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(
                        "wrote the records of {n} removal(s) a stopped run left in flight ({})",
                        path.display()
                    );
                }
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!("cannot remove {}: {e}", path.display());
                }
            }
            Err(e) => tracing::warn!(
                "cannot recover the removals in flight of {}: {e}; kept for the next reconcile",
                path.display()
            ),
        }
    }
}

/// The journals beside the audit log at `audit`, by name.
fn leftovers(audit: &Path) -> Vec<PathBuf> {
    let Some(name) = audit.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = format!("{name}{INFIX}");
    let dir = match audit.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Records for one dead execution's journal; how many were written.
async fn recover_one<E: Engine>(
    engine: &E,
    audit: &mut AuditLog,
    file: &File,
) -> Result<usize, RecoverError> {
    let mut intents = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(RecoverError::Read)?;
        // A torn last line: the kill hit while it was written, before the
        // engine was asked.
        if let Ok(intent) = serde_json::from_str::<Intent>(&line) {
            intents.push(intent);
        }
    }
    if intents.is_empty() {
        return Ok(0);
    }
    let recorded = recorded(audit.path(), &intents).await?;
    let mut written = 0;
    for intent in intents {
        let r = &intent.record;
        if recorded.contains(&(r.run.clone(), r.reference.clone(), r.image.clone())) {
            continue;
        }
        if let Some(rec) = resolve(engine, intent).await? {
            tracing::info!(
                "{} {} (recorded after a restart)",
                rec.action.as_str(),
                rec.reference
                    .as_deref()
                    .or(rec.image.as_deref())
                    .unwrap_or("")
            );
            audit.append(&rec);
            written += 1;
        }
    }
    Ok(written)
}

type Key = (String, Option<String>, Option<String>);

/// The (run, reference, image) of the audit records of the journal's runs:
/// intents that already have their record. One pass over the log, off the
/// async threads (it may be tens of MB).
async fn recorded(audit: &Path, intents: &[Intent]) -> Result<HashSet<Key>, AuditError> {
    let runs: HashSet<String> = intents.iter().map(|i| i.record.run.clone()).collect();
    let path = audit.to_path_buf();
    off_loop(move || {
        let mut keys = HashSet::new();
        for r in audit::records(&path) {
            let r = r?;
            if runs.contains(&r.run) {
                keys.insert((r.run, r.reference, r.image));
            }
        }
        Ok(keys)
    })
    .await
}

/// The record of an intent without one, as far as the engine tells: every
/// target gone (no longer naming the image) is the removal done; some gone,
/// an eviction stopped halfway; none, nothing done (the next plan has it
/// again), no record.
async fn resolve<E: Engine>(engine: &E, intent: Intent) -> Result<Option<Record>, EngineError> {
    let Intent {
        mut record,
        targets,
    } = intent;
    let image = record.image.clone().unwrap_or_default();
    let mut gone = Vec::new();
    for t in &targets {
        if engine.image(t).await?.is_none_or(|i| i.id != image) {
            gone.push(t.as_str());
        }
    }
    record.duration_ms = None;
    if gone.is_empty() {
        return Ok(None);
    }
    if gone.len() == targets.len() {
        record.outcome = Outcome::Ok;
        record.reason = format!(
            "{}; recorded after a restart: stowage stopped while the engine carried it out",
            record.reason
        );
    } else {
        record.outcome = Outcome::Failed;
        record.bytes = None;
        record.error = Some(format!(
            "stowage stopped before this finished; {} removed",
            gone.join(", ")
        ));
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::engine::Image;
    use crate::engine::fake::FakeEngine;

    fn image(hex: &str, tags: &[&str]) -> Image {
        Image {
            id: format!("sha256:{hex}"),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![],
            created: 0,
            size: 1,
        }
    }

    fn rec(run: &str, action: audit::Action, reference: Option<&str>, hex: &str) -> Record {
        Record {
            ts: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            run: run.into(),
            action,
            reference: reference.map(str::to_owned),
            image: Some(format!("sha256:{hex}")),
            rule: Some("old".into()),
            reason: "beyond keep_last=1".into(),
            outcome: Outcome::Ok,
            error: None,
            bytes: Some(7),
            resumed_bytes: None,
            duration_ms: None,
        }
    }

    fn journal_of(audit: &Path, run: &str, intents: &[(Record, &[&str])]) -> PathBuf {
        let j = Journal::new(audit, run);
        for (r, targets) in intents {
            let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
            j.note(r, &targets);
        }
        assert!(j.working());
        // A killed process closes the file (the lock goes) and removes nothing.
        let path = j.path.clone();
        drop(j.lock().file.take());
        drop(j);
        path
    }

    #[tokio::test]
    async fn a_dead_runs_journal_gets_the_records_it_lacks_and_goes() {
        use audit::Action::{Evict, Remove};
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        // The engine after the kill: app:1 and the dangling d1 are gone,
        // app:2 still names its image, app:3 names another one, and the
        // eviction of e1 untagged e:1 but not e:2.
        let engine = FakeEngine::new(
            vec![
                image("a2", &["app:2"]),
                image("zz", &["app:3"]),
                image("e1", &["e:2"]),
            ],
            vec![],
        );
        let done = rec("r1", Remove, Some("app:0"), "a0");
        let mut log = AuditLog::open(&audit_path).unwrap();
        log.append(&done);
        let path = journal_of(
            &audit_path,
            "r1",
            &[
                (done.clone(), &["app:0"]),
                (rec("r1", Remove, Some("app:1"), "a1"), &["app:1"]),
                (rec("r1", Remove, Some("app:2"), "a2"), &["app:2"]),
                (rec("r1", Remove, Some("app:3"), "a3"), &["app:3"]),
                (rec("r1", Remove, None, "d1"), &["sha256:d1"]),
                (rec("r1", Evict, None, "e1"), &["e:1", "e:2"]),
            ],
        );
        // The kill also tore the last line.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"record\":{\"ts\"")
            .unwrap();
        recover(&engine, &mut log).await;
        assert!(!path.exists(), "the journal goes once recovered");
        let records = audit::read(&audit_path).unwrap().records;
        let said: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.reference.as_deref().or(r.image.as_deref()).unwrap(),
                    r.outcome,
                )
            })
            .collect();
        assert_eq!(
            said,
            [
                ("app:0", Outcome::Ok),
                ("app:1", Outcome::Ok),
                ("app:3", Outcome::Ok),
                ("sha256:d1", Outcome::Ok),
                ("sha256:e1", Outcome::Failed),
            ]
        );
        assert!(records[1].reason.contains("recorded after a restart"));
        assert_eq!(records[1].bytes, Some(7));
        assert_eq!(
            records[4].error.as_deref(),
            Some("stowage stopped before this finished; e:1 removed")
        );
        // Nothing left to recover: no second record.
        recover(&engine, &mut log).await;
        assert_eq!(audit::read(&audit_path).unwrap().records.len(), 5);
    }

    #[tokio::test]
    async fn a_live_runs_journal_is_left_alone_and_removed_by_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let engine = FakeEngine::new(vec![], vec![]);
        let live = Journal::new(&audit_path, "r2");
        live.note(
            &rec("r2", audit::Action::Remove, Some("app:1"), "a1"),
            &["app:1".into()],
        );
        assert_eq!(live.noted(), 1);
        let mut log = AuditLog::open(&audit_path).unwrap();
        recover(&engine, &mut log).await;
        assert!(live.path.exists());
        assert!(audit::read(&audit_path).unwrap().records.is_empty());
        live.clear();
        assert_eq!(
            (live.noted(), fs::metadata(&live.path).unwrap().len()),
            (0, 0)
        );
        let path = live.path.clone();
        drop(live);
        assert!(!path.exists());
    }

    #[test]
    fn an_unwritable_journal_stops_journaling() {
        let dir = tempfile::tempdir().unwrap();
        // The audit log's folder does not exist: neither can the journal.
        let j = Journal::new(&dir.path().join("gone/audit.jsonl"), "r3");
        j.note(
            &rec("r3", audit::Action::Remove, Some("app:1"), "a1"),
            &["app:1".into()],
        );
        assert!(!j.working());
        assert_eq!(j.noted(), 0);
    }
}
