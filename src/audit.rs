//! The audit log: one JSON object per line, appended and written through per
//! record so a crash loses at most the record being written. Readers tolerate
//! a torn last line; a writer that finds one starts on a fresh line.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// An open audit log, appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
}

impl AuditLog {
    /// Open (creating folders and file) for appending. If a crash left a torn
    /// last line, a newline is written first so the next record stands alone.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(open_err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(open_err)?;
            file.read_exact(&mut last).map_err(open_err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(open_err)?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record as a single write, so it reaches the file whole.
    pub fn append(&mut self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).map_err(|e| AuditError::Write {
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|source| AuditError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Make everything appended so far durable (end of a reconcile). The
    /// fsync runs off the async threads: on a busy disk it takes seconds.
    pub async fn sync(&mut self) -> Result<(), AuditError> {
        let write = |source| AuditError::Write {
            path: self.path.clone(),
            source,
        };
        // The same open file: syncing the duplicate syncs the log.
        let file = self.file.try_clone().map_err(write)?;
        crate::blocking::off_loop(move || file.sync_data())
            .await
            .map_err(write)
    }
}

/// The records of an audit log, and how many lines could not be read.
#[derive(Debug, Default)]
pub struct History {
    pub records: Vec<Record>,
    /// Lines that are not records (a torn line left by a crash, usually).
    pub unreadable: usize,
}

/// Read an audit log. A missing file is an empty history; unreadable lines
/// (a torn last line after a crash) are counted and skipped.
pub fn read(path: &Path) -> Result<History, AuditError> {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::default()),
        Err(source) => {
            return Err(AuditError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut h = History::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Record>(line) {
            Ok(r) => h.records.push(r),
            Err(_) => h.unreadable += 1,
        }
    }
    Ok(h)
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
        log.append(&rec(1)).unwrap();
        drop(log);
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"ts":"2023-11-14T22:13:20Z","run":"r1","act"#)
            .unwrap();
        drop(f);
        let h = read(&p).unwrap();
        assert_eq!((h.records.len(), h.unreadable), (1, 1));
        let mut log = AuditLog::open(&p).unwrap();
        log.append(&rec(2)).unwrap();
        let h = read(&p).unwrap();
        assert_eq!((h.records.len(), h.unreadable), (2, 1));
        assert_eq!(h.records[1].bytes, Some(2));
    }
}
