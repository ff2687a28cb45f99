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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    Warn,
    Skip,
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
            Action::Warn => "warn",
            Action::Skip => "skip",
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
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write audit log {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read audit log {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bytes of records held in memory while the log cannot be written. Past it
/// the oldest held records are dropped, counted, and a record saying how many
/// is written once the log is writable again.
const HELD_MAX_BYTES: usize = 4 << 20;

/// A line longer than this is not a record (garbage or a corrupt file): the
/// reader skips it without holding it in memory.
const MAX_LINE: usize = 1 << 20;

/// The previous generation of the log at `path`: `<audit_log>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Records not yet written, oldest first.
#[derive(Debug, Default)]
struct Held {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Held records dropped because the bound was reached.
    dropped: u64,
    /// Whether the last write failed (an error was logged for this episode).
    failing: bool,
}

/// Held records outlive the [`AuditLog`] that could not write them: parked
/// here per path when it is dropped, taken back by the next `open` of the
/// same path in this process (the daemon's next reconcile).
static PARKED: Mutex<BTreeMap<PathBuf, Held>> = Mutex::new(BTreeMap::new());

fn park(path: &Path, held: Held) {
    let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
    parked.insert(path.to_path_buf(), held);
}

fn unpark(path: &Path) -> Held {
    let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
    parked.remove(path).unwrap_or_default()
}

/// The records for `path` that no writer could write, as JSON lines, taken
/// out of the process: a one-shot command prints them before it exits rather
/// than lose them.
pub fn take_unwritten(path: &Path) -> Vec<String> {
    let held = unpark(path);
    let mut out: Vec<String> = held
        .lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .collect();
    if held.dropped > 0 {
        out.insert(0, dropped_note(held.dropped));
    }
    out
}

fn dropped_note(n: u64) -> String {
    format!(
        "{n} earlier audit record(s) were dropped: the log could not be written and the in-memory hold was full"
    )
}

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
    previous: BTreeSet<u64>,
    stated: BTreeSet<u64>,
    tally: Tally,
}

/// What the records appended through one [`AuditLog`] say, counted as they
/// are appended (repeats it does not write are not counted): the daemon's
/// metrics, without reading the log back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records per action and outcome.
    pub records: BTreeMap<(Action, Outcome), u64>,
    /// Bytes that `ok` removals, evictions and build-cache prunes freed.
    pub bytes_freed: u64,
}

impl Tally {
    fn count(&mut self, r: &Record) {
        *self.records.entry((r.action, r.outcome)).or_default() += 1;
        if r.outcome == Outcome::Ok
            && matches!(
                r.action,
                Action::Remove | Action::Evict | Action::PruneBuild
            )
        {
            self.bytes_freed += r.bytes.unwrap_or(0);
        }
    }
}

impl AuditLog {
    /// Open (creating folders and file) for appending, never rotated. An
    /// error here is returned; [`AuditLog::open_lenient`] holds records
    /// instead.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let mut log = Self::unopened(path, u64::MAX);
        log.try_open().map_err(|source| AuditError::Open {
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
            previous: BTreeSet::new(),
            stated: BTreeSet::new(),
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the previous reconcile stated (from the state file): `warn`,
    /// `skip` and `deferred` records that say the same again are not written.
    pub fn set_previously_stated(&mut self, fingerprints: BTreeSet<u64>) {
        self.previous = fingerprints;
    }

    /// The fingerprints of the `warn`/`skip`/`deferred` records this log
    /// stated (written or suppressed as a repeat), for the state file.
    pub fn stated(&self) -> &BTreeSet<u64> {
        &self.stated
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
        if let Some(fp) = repeatable_fingerprint(record) {
            self.stated.insert(fp);
            if self.previous.contains(&fp) {
                return;
            }
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
        self.hold(line);
        self.flush_held();
    }

    fn hold(&mut self, line: Vec<u8>) {
        self.held.bytes += line.len();
        self.held.lines.push_back(line);
        while self.held.bytes > HELD_MAX_BYTES && self.held.lines.len() > 1 {
            if let Some(old) = self.held.lines.pop_front() {
                self.held.bytes -= old.len();
                self.held.dropped += 1;
            }
        }
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

/// For a record that must not repeat (`warn`, `skip`, `deferred`), a
/// fingerprint of what it says: everything but its time, run and figures.
fn repeatable_fingerprint(r: &Record) -> Option<u64> {
    let repeatable =
        matches!(r.action, Action::Warn | Action::Skip) || r.outcome == Outcome::Deferred;
    if !repeatable {
        return None;
    }
    let said = serde_json::to_vec(&(
        r.action,
        r.outcome,
        &r.reference,
        &r.image,
        &r.rule,
        &r.reason,
        &r.error,
    ))
    .ok()?;
    let digest = Sha256::digest(&said);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Some(u64::from_be_bytes(first))
}

/// The records of an audit log, and how many lines could not be read.
#[cfg(any(test, feature = "testkit"))]
#[derive(Debug, Default)]
pub struct History {
    pub records: Vec<Record>,
    /// Lines that are not records (a torn line left by a crash, usually).
    pub unreadable: usize,
}

/// Read an audit log whole, both generations (for tests; `history` streams
/// with [`records`]).
#[cfg(any(test, feature = "testkit"))]
pub fn read(path: &Path) -> Result<History, AuditError> {
    let mut h = History::default();
    let mut it = records(path);
    for r in it.by_ref() {
        h.records.push(r?);
    }
    h.unreadable = it.unreadable();
    Ok(h)
}

/// The records of the log at `path`, `<audit_log>.1` first, read line by
/// line: memory stays constant whatever the size of the log. Missing files
/// are empty; unreadable lines are skipped and counted
/// ([`Records::unreadable`]).
pub fn records(path: &Path) -> Records {
    Records {
        files: VecDeque::from([rotated_path(path), path.to_path_buf()]),
        current: None,
        line: Vec::new(),
        unreadable: 0,
    }
}

/// A streaming reader over an audit log's generations; see [`records`].
#[derive(Debug)]
pub struct Records {
    files: VecDeque<PathBuf>,
    current: Option<(PathBuf, BufReader<File>)>,
    line: Vec<u8>,
    unreadable: usize,
}

impl Records {
    /// Lines so far that were not records.
    pub fn unreadable(&self) -> usize {
        self.unreadable
    }

    /// The next line of the current file into `self.line`, at most
    /// [`MAX_LINE`] bytes kept (the rest of a longer line is skipped).
    /// `Ok(false)` at the end of the file.
    fn next_line(&mut self) -> std::io::Result<Option<bool>> {
        let Some((_, reader)) = self.current.as_mut() else {
            return Ok(None);
        };
        self.line.clear();
        let n = reader
            .by_ref()
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Ok(None);
        }
        if self.line.last() == Some(&b'\n') || n < MAX_LINE {
            return Ok(Some(true));
        }
        // Too long to be a record: skip to the end of the line.
        loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    reader.consume(i + 1);
                    break;
                }
                None => {
                    let len = buf.len();
                    reader.consume(len);
                }
            }
        }
        Ok(Some(false))
    }
}

impl Iterator for Records {
    type Item = Result<Record, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let path = self.files.pop_front()?;
                match File::open(&path) {
                    Ok(f) => self.current = Some((path, BufReader::new(f))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Some(Err(AuditError::Read { path, source })),
                }
            }
            match self.next_line() {
                Ok(None) => self.current = None,
                Ok(Some(false)) => self.unreadable += 1,
                Ok(Some(true)) => {
                    let text = String::from_utf8_lossy(&self.line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Record>(&text) {
                        Ok(r) => return Some(Ok(r)),
                        Err(_) => self.unreadable += 1,
                    }
                }
                Err(source) => {
                    let (path, _) = self.current.take()?;
                    return Some(Err(AuditError::Read { path, source }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> Record {
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

    #[test]
    fn writes_spec_field_names() {
        let v = serde_json::to_value(rec(1)).unwrap();
        for k in [
            "ts", "run", "action", "ref", "image", "rule", "reason", "outcome",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["action"], "remove");
        assert_eq!(v["outcome"], "ok");
    }

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
    fn warn(reason: &str) -> Record {
        Record {
            action: Action::Warn,
            reference: Some("app:bad tag".into()),
            rule: Some("names".into()),
            reason: reason.into(),
            bytes: None,
            duration_ms: None,
            resumed_bytes: None,
            ..rec(0)
        }
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

    #[test]
    fn the_reader_streams_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&p).unwrap();
        log.append(&rec(1));
        log.append(&rec(2));
        let mut it = records(&p);
        assert_eq!(it.next().unwrap().unwrap().bytes, Some(1));
        // Written after the reader started: a reader that had collected the
        // file would never see it.
        log.append(&rec(3));
        let rest: Vec<_> = it.map(|r| r.unwrap().bytes).collect();
        assert_eq!(rest, [Some(2), Some(3)]);
    }

    #[test]
    fn an_over_long_line_is_skipped_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![b'x'; 3 * MAX_LINE]).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        let mut log = AuditLog::open(&p).unwrap();
        log.append(&rec(1));
        let mut it = records(&p);
        assert_eq!(it.next().unwrap().unwrap().bytes, Some(1));
        assert!(it.next().is_none());
        assert_eq!(it.unreadable(), 1);
        assert!(it.line.capacity() <= 2 * MAX_LINE);
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

    #[test]
    fn warn_records_repeat_only_when_what_they_say_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let mut stated = BTreeSet::new();
        for reason in ["bad", "bad", "bad", "worse", "bad"] {
            let mut log = AuditLog::open_lenient(&p, u64::MAX);
            log.set_previously_stated(stated);
            log.append(&warn(reason));
            // Actions always get their record.
            log.append(&rec(1));
            stated = log.stated().clone();
        }
        let h = read(&p).unwrap();
        let warns: Vec<_> = h
            .records
            .iter()
            .filter(|r| r.action == Action::Warn)
            .map(|r| r.reason.as_str())
            .collect();
        assert_eq!(warns, ["bad", "worse", "bad"]);
        assert_eq!(h.records.len() - warns.len(), 5);
    }
}
