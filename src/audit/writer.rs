//! Appending records: written through one at a time, held when they cannot
//! be, the file rotated before it would pass `audit_max`.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::Utc;

use super::held::{HELD_MAX_BYTES, Held, dropped_note, park, unpark};
use super::repeats::Repeats;
use super::{Action, Outcome, Record, Tally, rotated_path};

/// An open audit log, appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// `None` until the file could be opened (retried at each write).
    file: Option<File>,
    /// Rotate before a record would take the file past this many bytes.
    max: u64,
    /// A torn last line was found (or a cut-off failed): write a newline
    /// before the next record.
    needs_newline: bool,
    /// A rotation failed (said once until one succeeds).
    rotate_failed: bool,
    held: Held,
    /// Fingerprints of `warn`/`skip`/`deferred` records the previous
    /// reconcile stated, and those stated in this one.
    repeats: Repeats,
    tally: Tally,
}

impl AuditLog {
    /// Open (creating folders and file) for appending, never rotated. An
    /// error here is returned; [`AuditLog::open_lenient`] (what stowage
    /// itself uses) holds records instead.
    #[cfg(any(test, feature = "testkit"))]
    pub fn open(path: &Path) -> Result<Self, super::AuditError> {
        let mut log = Self::unopened(path, u64::MAX);
        log.try_open().map_err(|source| super::AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(log)
    }

    /// Open for appending, rotated at `max` bytes. If the file cannot be
    /// opened now (a full disk may refuse even a folder), the error is
    /// logged and records are held until a later write can open it.
    pub fn open_lenient(path: &Path, max: u64) -> Self {
        let mut log = Self::unopened(path, max.max(1));
        if let Err(e) = log.try_open() {
            log.write_failed(&e);
        }
        log.flush_held();
        log
    }

    fn unopened(path: &Path, max: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            max,
            needs_newline: false,
            rotate_failed: false,
            held: unpark(path),
            repeats: Repeats::default(),
            tally: Tally::default(),
        }
    }

    /// Open the file if it is not open. If a crash left a torn last line, the
    /// next record starts on a fresh line.
    fn try_open(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            self.needs_newline |= last[0] != b'\n';
        }
        self.file = Some(file);
        Ok(())
    }

    /// Where the log is (the executor keeps its journal of removals in
    /// flight beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the previous reconcile stated (from the state file): `warn`,
    /// `skip` and `deferred` records that say the same again are not written.
    pub fn set_previously_stated(&mut self, fingerprints: BTreeSet<u64>) {
        self.repeats.previous = fingerprints;
    }

    /// The fingerprints of the `warn`/`skip`/`deferred` records this log
    /// stated (written or suppressed as a repeat), for the state file.
    pub fn stated(&self) -> &BTreeSet<u64> {
        &self.repeats.stated
    }

    /// What the records appended so far say.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Records held in memory, not yet written.
    pub fn held(&self) -> usize {
        self.held.lines.len()
    }

    /// Append one record as a single write, so it reaches the file whole.
    /// Held records go first; if the write fails, this one is held too.
    pub fn append(&mut self, record: &Record) {
        if self.repeats.is_repeat(record) {
            return;
        }
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            // A record of plain strings and numbers always serializes.
            Err(e) => {
                tracing::error!("cannot encode an audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        self.tally.count(record);
        self.held.push(line);
        self.flush_held();
    }

    /// Write the held records, oldest first, until one fails. True when
    /// nothing is held any more.
    pub fn flush_held(&mut self) -> bool {
        let was_failing = self.held.failing;
        let mut written = 0usize;
        if self.held.dropped > 0 {
            let note = Record {
                ts: Utc::now(),
                run: String::new(),
                action: Action::Warn,
                reference: None,
                image: None,
                rule: Some("audit".to_owned()),
                reason: dropped_note(self.held.dropped),
                outcome: Outcome::Failed,
                error: None,
                bytes: None,
                duration_ms: None,
                resumed_bytes: None,
            };
            let mut line = serde_json::to_vec(&note).unwrap_or_default();
            line.push(b'\n');
            match self.write_line(&line) {
                Ok(()) => self.held.dropped = 0,
                Err(e) => {
                    self.write_failed(&e);
                    return false;
                }
            }
        }
        while let Some(line) = self.held.lines.pop_front() {
            match self.write_line(&line) {
                Ok(()) => {
                    self.held.bytes -= line.len();
                    written += 1;
                }
                Err(e) => {
                    self.held.lines.push_front(line);
                    self.write_failed(&e);
                    return false;
                }
            }
        }
        self.held.failing = false;
        if was_failing {
            tracing::info!(
                "audit log {} is writable again: wrote {written} held record(s)",
                self.path.display()
            );
        }
        true
    }

    /// Logged once per episode of failures, not per record.
    fn write_failed(&mut self, e: &std::io::Error) {
        if !self.held.failing {
            tracing::error!(
                "cannot write audit log {}: {e}; holding records in memory (up to {}) and writing them when it can",
                self.path.display(),
                crate::fmt::human_bytes(HELD_MAX_BYTES as u64)
            );
        }
        self.held.failing = true;
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.try_open()?;
        let len = self.file_len()?;
        if len > 0 && len.saturating_add(line.len() as u64) > self.max {
            match self.rotate() {
                Ok(()) => self.rotate_failed = false,
                // Not renamed: the record still goes into the current log,
                // past the cap, rather than be held.
                Err(e) if self.file.is_some() => {
                    if !self.rotate_failed {
                        tracing::warn!(
                            "cannot rotate audit log {}: {e}; it grows past audit_max until it can",
                            self.path.display()
                        );
                    }
                    self.rotate_failed = true;
                }
                Err(e) => return Err(e),
            }
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("audit log not open"))?;
        if self.needs_newline {
            file.write_all(b"\n")?;
            self.needs_newline = false;
        }
        let before = file.metadata()?.len();
        if let Err(e) = file.write_all(line).and_then(|()| file.flush()) {
            // A short write leaves half a record: cut it off (shrinking a
            // file needs no space), or start the next one on a fresh line.
            if file.set_len(before).is_err() {
                self.needs_newline = true;
            }
            return Err(e);
        }
        Ok(())
    }

    fn file_len(&self) -> std::io::Result<u64> {
        match &self.file {
            Some(f) => Ok(f.metadata()?.len()),
            None => Ok(0),
        }
    }

    /// Move the full log to `<audit_log>.1` (replacing the older generation)
    /// and start a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        let old = rotated_path(&self.path);
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        fs::rename(&self.path, &old)?;
        self.file = None;
        self.needs_newline = false;
        tracing::info!(
            "audit log {} reached audit_max ({}): rotated to {}",
            self.path.display(),
            crate::fmt::human_bytes(self.max),
            old.display()
        );
        self.try_open()
    }

    /// Make everything appended so far durable (end of a reconcile). Held
    /// records are written first; failures are logged, never returned.
    /// The fsync runs off the async threads: on a busy disk it takes seconds.
    pub async fn sync(&mut self) {
        if !self.flush_held() {
            tracing::error!(
                "{} audit record(s) still held in memory: {} cannot be written",
                self.held.lines.len(),
                self.path.display()
            );
            return;
        }
        let Some(f) = &self.file else {
            return;
        };
        // The same open file: syncing the duplicate syncs the log.
        let synced = match f.try_clone() {
            Ok(file) => crate::blocking::off_loop(move || file.sync_data()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            tracing::error!("cannot sync audit log {}: {e}", self.path.display());
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if !self.held.lines.is_empty() || self.held.dropped > 0 {
            park(&self.path, std::mem::take(&mut self.held));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{read, sample as rec, take_unwritten};
    use super::*;

    #[test]
    fn torn_last_line_is_tolerated_and_not_glued_to_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/audit.jsonl");
        let mut log = AuditLog::open(&p).unwrap();
        log.append(&rec(1));
        drop(log);
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"ts":"2023-11-14T22:13:20Z","run":"r1","act"#)
            .unwrap();
        drop(f);
        let h = read(&p).unwrap();
        assert_eq!((h.records.len(), h.unreadable), (1, 1));
        let mut log = AuditLog::open(&p).unwrap();
        log.append(&rec(2));
        let h = read(&p).unwrap();
        assert_eq!((h.records.len(), h.unreadable), (2, 1));
        assert_eq!(h.records[1].bytes, Some(2));
    }

    #[test]
    fn rotates_before_passing_the_cap_and_readers_see_both_generations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let line = serde_json::to_vec(&rec(1)).unwrap().len() as u64 + 1;
        // Room for three records per file.
        let mut log = AuditLog::open_lenient(&p, 3 * line + line / 2);
        for n in 1..=5 {
            log.append(&rec(n));
        }
        let old = rotated_path(&p);
        assert_eq!(fs::metadata(&old).unwrap().len(), 3 * line);
        assert_eq!(fs::metadata(&p).unwrap().len(), 2 * line);
        let bytes: Vec<_> = read(&p).unwrap().records.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, (1..=5).map(Some).collect::<Vec<_>>());
        // One generation only: the next rotation replaces `.1`.
        for n in 6..=7 {
            log.append(&rec(n));
        }
        let bytes: Vec<_> = read(&p).unwrap().records.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, (4..=7).map(Some).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn unwritable_records_are_held_and_written_when_the_log_can_be() {
        let dir = tempfile::tempdir().unwrap();
        // The log's folder is a file for now: every write fails.
        let blocker = dir.path().join("logs");
        fs::write(&blocker, b"").unwrap();
        let p = blocker.join("audit.jsonl");
        let mut log = AuditLog::open_lenient(&p, u64::MAX);
        log.append(&rec(1));
        log.append(&rec(2));
        log.sync().await;
        assert_eq!(log.held(), 2);
        // Held beyond this log, for the next one on the same path.
        drop(log);
        fs::remove_file(&blocker).unwrap();
        let mut log = AuditLog::open_lenient(&p, u64::MAX);
        assert_eq!(log.held(), 0);
        log.append(&rec(3));
        let bytes: Vec<_> = read(&p).unwrap().records.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, [Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_full_device_holds_records_and_leaves_no_partial_line() {
        let mut log = AuditLog::open_lenient(Path::new("/dev/full"), u64::MAX);
        log.append(&rec(1));
        assert_eq!(log.held(), 1);
        assert_eq!(
            take_unwritten(Path::new("/dev/full")).len(),
            0,
            "still owned by the log"
        );
        drop(log);
        let lines = take_unwritten(Path::new("/dev/full"));
        assert_eq!(lines.len(), 1);
        assert_eq!(serde_json::from_str::<Record>(&lines[0]).unwrap(), rec(1));
    }
}
