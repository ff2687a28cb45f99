//! Records the log could not write: held in memory, bounded, and parked per
//! path when their writer goes, for the next writer in this process (or for
//! a one-shot command to print before it exits).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes of records held in memory while the log cannot be written. Past it
/// the oldest held records are dropped, counted, and a record saying how many
/// is written once the log is writable again.
pub(super) const HELD_MAX_BYTES: usize = 4 << 20;

/// Records not yet written, oldest first.
#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) lines: VecDeque<Vec<u8>>,
    pub(super) bytes: usize,
    /// Held records dropped because the bound was reached.
    pub(super) dropped: u64,
    /// Whether the last write failed (an error was logged for this episode).
    pub(super) failing: bool,
}

/// Held records outlive the [`AuditLog`](super::AuditLog) that could not write them: parked
/// here per path when it is dropped, taken back by the next `open` of the
/// same path in this process (the daemon's next reconcile).
static PARKED: Mutex<BTreeMap<PathBuf, Held>> = Mutex::new(BTreeMap::new());

pub(super) fn park(path: &Path, held: Held) {
    let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
    parked.insert(path.to_path_buf(), held);
}

pub(super) fn unpark(path: &Path) -> Held {
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

pub(super) fn dropped_note(n: u64) -> String {
    format!(
        "{n} earlier audit record(s) were dropped: the log could not be written and the in-memory hold was full"
    )
}

impl Held {
    /// Holds `line`, dropping (and counting) the oldest held records past
    /// [`HELD_MAX_BYTES`]; the newest is always kept.
    pub(super) fn push(&mut self, line: Vec<u8>) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > HELD_MAX_BYTES && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len();
                self.dropped += 1;
            }
        }
    }
}
