//! The journal of pulls through the content store (`downloads.json` in
//! `state_dir`), shared by the daemon, `apply` and `stowage pull`:
//!
//! - a download in progress: the blobs of the image it is fetching, so that
//!   the store's garbage collection keeps their partials for the next
//!   attempt (after a failure, a backoff, a kill -9) and `stowage plan` can
//!   say how far it got;
//! - an image in the engine whose upstream digest reference is still to be
//!   recorded (the upstream did not answer right after the hand-off), and
//!   the loopback reference to remove then.
//!
//! Each change re-reads the file under a lock (`downloads.lock`, `flock`)
//! and rewrites it atomically, so processes do not lose each other's
//! entries. Losing the file costs bytes, never correctness: a partial
//! nobody names is fetched again, a digest reference is not recorded.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File in `state_dir` (JSON, see [`Journal`]).
pub const DOWNLOADS_FILE: &str = "downloads.json";
const LOCK_FILE: &str = "downloads.lock";
/// How long a `stowage pull` download that never finished keeps its
/// partials: the command is run again by hand, maybe days later.
pub(super) const CLI_KEEP_SECS: i64 = 7 * 86_400;

/// One download in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Download {
    /// The digest the reference resolved to (index or manifest).
    pub top: String,
    /// Every blob to fetch for it, `(digest, size)`: manifests, config, the
    /// layers the engine lacks.
    pub blobs: Vec<(String, u64)>,
    /// Unix seconds when it began.
    pub since: i64,
}

/// An upstream digest reference still to record for an image in the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Upstream {
    /// `repository@sha256:…` to pull (moves only the manifest).
    pub from: String,
    /// Its registry, for credentials.
    pub registry: String,
    pub platform: Option<String>,
    /// `127.0.0.1:PORT/…@sha256:…` the hand-off left, removed afterwards.
    pub loopback: String,
    /// From a bundle import: until the upstream reference is recorded, the
    /// loopback one is the only record of the digest (a pin's), so it stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
}

/// A bundle import in progress, by the bundle's digest: what a killed one
/// leaves for the next start to undo (see `transfer::arrive`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Import {
    /// Unix seconds when it began.
    pub since: i64,
    /// Every blob it copies into the store `(digest, size)`: their partials
    /// are kept for a re-run.
    #[serde(default)]
    pub blobs: Vec<(String, u64)>,
    /// Loopback digest references its hand-offs may have made, each written
    /// here before its pull.
    #[serde(default)]
    pub loopback: Vec<String>,
    /// Written before the first tag: each reference with the image it named
    /// before (none: it did not exist) and the one it gets.
    #[serde(default)]
    pub retag: Vec<Retag>,
}

/// One reference an import moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Retag {
    pub reference: String,
    pub before: Option<String>,
    pub after: String,
}

/// What `downloads.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Entries {
    /// By pull key: a `[[prepull]]` entry's key, or `cli <reference>`.
    #[serde(default)]
    pub downloads: BTreeMap<String, Download>,
    /// By image id.
    #[serde(default)]
    pub upstream: BTreeMap<String, Upstream>,
    /// By bundle digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub imports: BTreeMap<String, Import>,
}

impl Entries {
    /// Pure: drop downloads nobody asks for any more (a `[[prepull]]` entry
    /// gone from the policy, a `stowage pull` older than [`CLI_KEEP_SECS`]);
    /// return the blobs `(digest, size)` the rest need, each once, which
    /// the store keeps.
    pub(super) fn prune(&mut self, prepull_keys: &HashSet<String>, now: i64) -> Vec<(String, u64)> {
        self.downloads.retain(|key, d| {
            if key.starts_with(CLI_PREFIX) {
                now - d.since < CLI_KEEP_SECS
            } else {
                prepull_keys.contains(key)
            }
        });
        // An import is run again by hand (or the inbox), like `stowage pull`.
        self.imports.retain(|_, i| now - i.since < CLI_KEEP_SECS);
        let mut seen = HashSet::new();
        self.downloads
            .values()
            .flat_map(|d| d.blobs.iter())
            .chain(self.imports.values().flat_map(|i| i.blobs.iter()))
            .filter(|(digest, _)| seen.insert(digest.clone()))
            .cloned()
            .collect()
    }
}

/// The prefix of the keys of `stowage pull` downloads.
pub(super) const CLI_PREFIX: &str = "cli ";

/// The journal in one `state_dir`.
#[derive(Debug, Clone)]
pub(super) struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub(super) fn new(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(DOWNLOADS_FILE)
    }

    /// What the file holds; missing or unreadable is empty (said in the log).
    pub(super) fn read(&self) -> Entries {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("{} is unreadable ({e}); starting it afresh", path.display());
                Entries::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Entries::default(),
            Err(e) => {
                tracing::warn!("cannot read {} ({e})", path.display());
                Entries::default()
            }
        }
    }

    /// Applies `change` to the entries as they are now (re-read under the
    /// lock) and writes them back; returns what `change` returned. Blocking.
    pub(super) fn update<T>(&self, change: impl FnOnce(&mut Entries) -> T) -> std::io::Result<T> {
        fs::create_dir_all(&self.dir)?;
        let lock = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))?;
        lock.lock()?;
        let mut entries = self.read();
        let before = entries.clone();
        let out = change(&mut entries);
        if entries != before {
            let path = self.path();
            if entries == Entries::default() {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => crate::state::sync_dir(&self.dir)?,
                }
            } else {
                let bytes = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::other)?;
                crate::state::write_atomic(&path, &bytes)?;
            }
        }
        Ok(out)
    }

    /// [`Journal::update`] where a failure only costs bytes: logged.
    pub(super) fn best_effort(&self, change: impl FnOnce(&mut Entries)) {
        if let Err(e) = self.update(change) {
            tracing::warn!("cannot update {}: {e}", self.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn download(since: i64, blobs: &[&str]) -> Download {
        Download {
            top: "sha256:top".into(),
            blobs: blobs.iter().map(|b| ((*b).to_owned(), 10)).collect(),
            since,
        }
    }

    #[test]
    fn prune_keeps_what_the_policy_or_a_recent_cli_pull_asks_for() {
        let mut e = Entries::default();
        e.downloads
            .insert("nginx:1".into(), download(0, &["a", "b"]));
        e.downloads.insert("gone:1".into(), download(0, &["c"]));
        e.downloads.insert("cli old:1".into(), download(0, &["d"]));
        e.downloads
            .insert("cli new:1".into(), download(CLI_KEEP_SECS, &["e"]));
        e.downloads.insert("nginx:2".into(), download(0, &["b"]));
        let keys: HashSet<String> = ["nginx:1".to_owned(), "nginx:2".to_owned()].into();
        let mut wanted: Vec<String> = e
            .prune(&keys, CLI_KEEP_SECS + 10)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        wanted.sort();
        // Each blob once, however many downloads need it.
        assert_eq!(wanted, ["a", "b", "e"]);
        assert_eq!(
            e.downloads.keys().collect::<Vec<_>>(),
            ["cli new:1", "nginx:1", "nginx:2"]
        );
    }

    #[test]
    fn updates_survive_a_new_process_and_an_empty_journal_is_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.update(|e| {
            e.downloads.insert("k".into(), download(5, &["a"]));
        })
        .unwrap();
        assert_eq!(
            Journal::new(dir.path()).read().downloads["k"],
            download(5, &["a"])
        );
        j.update(|e| e.downloads.clear()).unwrap();
        assert!(!dir.path().join(DOWNLOADS_FILE).exists());
        // A torn file is empty, and the next update starts it afresh.
        std::fs::write(dir.path().join(DOWNLOADS_FILE), b"{\"downl").unwrap();
        assert_eq!(j.read(), Entries::default());
    }
}
