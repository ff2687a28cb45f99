//! Reading a log back: both generations, oldest first, line by line,
//! tolerating torn and over-long lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::{AuditError, Record, rotated_path};

/// A line longer than this is not a record (garbage or a corrupt file): the
/// reader skips it without holding it in memory.
const MAX_LINE: usize = 1 << 20;

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
    use std::io::Write;

    use super::super::{AuditLog, sample as rec};
    use super::*;

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
}
