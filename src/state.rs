//! Persistent state under `state_dir`: when each image was first seen, last
//! used and last pulled on this host, and the backoff of failing references.
//!
//! Written atomically (a temp file of its own in the same folder, fsync,
//! rename, fsync of the folder), so a crash leaves either the old or the new
//! state and a reader never sees half a file. A corrupt or unreadable state is
//! moved aside and replaced by an empty one: losing activity times only makes
//! stowage more conservative (images look new: see [`State::initialized`]).
//!
//! One process owns the state at a time: the daemon for its lifetime, or one
//! `stowage apply` for its run, by an exclusive `flock` on [`LOCK_FILE`]
//! ([`StateStore::try_lock`]). Readers (`plan`, `status`) take no lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "state.json";
/// The lock file inside `state_dir`: whoever holds its `flock` owns the
/// state; its content names the holder, for the others' messages.
pub const LOCK_FILE: &str = "lock";
/// Left in `state_dir` by the first saved state. It outlives a lost or
/// corrupt `state.json`, so a new state knows it is not the host's first run.
const INITIALIZED_FILE: &str = "initialized";
const FORMAT: u32 = 1;
/// Temp files of saves: `.state.json.tmp.<pid>.<n>` (see [`write_atomic`]).
const TMP_PREFIX: &str = ".state.json.tmp.";
/// What [`write_atomic`] puts between the name and the pid of its temp files.
const TMP_INFIX: &str = ".tmp.";
/// Makes each atomic write's temp name unique within the process.
static SAVES: AtomicU64 = AtomicU64::new(0);

/// What stowage remembers about one image (keyed by image id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageState {
    /// First time stowage saw the image on this host (Unix seconds).
    pub first_seen: i64,
    /// Last time a container was created or started from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<i64>,
    /// Last time it was pulled or loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pulled: Option<i64>,
    /// Its layers with sizes, cached (an image id never changes content) so
    /// disk accounting asks the engine once per image, not per reconcile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<crate::engine::Layer>,
}

/// Retry bookkeeping for one failing reference (pull or push).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Consecutive failures.
    pub failures: u32,
    /// Not retried before this time (Unix seconds).
    pub next_attempt: i64,
    /// The last error, for `status`.
    pub last_error: String,
}

/// What stowage remembers about one `[[prepull]]` entry (keyed by
/// `Prepull::key` in `policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepullState {
    /// Image ids this reference pointed at before stowage moved it, newest
    /// first: the planner protects the first `keep_previous` for rollback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
    /// Last time the registry was asked for the tag's digest (Unix seconds):
    /// the `refresh` schedule counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<i64>,
}

/// What stowage pushed to one mirror target. The engine forgets the target's
/// digest once the temporary tag is removed, so stowage remembers it: the next
/// reconcile compares the registry's digest with it and pushes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirrored {
    /// The local image id that was pushed.
    pub image: String,
    /// The manifest digest the target got.
    pub digest: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version of the file, for future migrations.
    #[serde(default)]
    pub format: u32,
    /// Whether any reconcile has run on this host. On the very first one,
    /// images already present count as first seen at their creation time;
    /// afterwards (a lost or corrupt state included) an image the state has
    /// not seen counts as first seen now, so `min_age` protects it.
    #[serde(default)]
    pub initialized: bool,
    #[serde(default)]
    pub images: BTreeMap<String, ImageState>,
    /// Keyed by `action reference`, e.g. `pull nginx:1.25`.
    #[serde(default)]
    pub backoff: BTreeMap<String, Backoff>,
    /// Per `[[prepull]]` entry: previous images and refresh bookkeeping.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prepull: BTreeMap<String, PrepullState>,
    /// Per mirror target reference: what was pushed there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrored: BTreeMap<String, Mirrored>,
    /// Fingerprints of the `warn`, `skip` and `deferred` audit records the
    /// last reconcile stated: one that says the same again is not written
    /// again (see [`crate::audit`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reported: BTreeSet<u64>,
    /// Per image id: what the trash holds of it (see [`crate::trash`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trash: BTreeMap<String, crate::trash::Entry>,
    /// Per image id: restored with `--protect`, held out of retention until
    /// then (Unix seconds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<String, i64>,
    /// Admission verdicts, keyed by `image-id command-hash` (see
    /// `crate::scan`): an image is scanned once per command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scans: BTreeMap<String, ScanVerdict>,
}

/// One cached admission verdict (never the secret or the tool's output:
/// only its first line, and for `builtin:secrets` kinds, files and lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanVerdict {
    pub passed: bool,
    pub reason: String,
    /// When it was reached (Unix seconds).
    pub at: i64,
}

impl State {
    /// Record that `image` was seen now, keeping its earlier first-seen time.
    /// Before the first reconcile, the creation time stands in for "now".
    pub fn observe(&mut self, image: &str, created: i64, at: i64) {
        let first = if self.initialized {
            at
        } else {
            created.min(at)
        };
        self.images
            .entry(image.to_string())
            .or_insert_with(|| ImageState {
                first_seen: first,
                ..ImageState::default()
            });
    }

    pub fn mark_used(&mut self, image: &str, at: i64) {
        let e = self.images.entry(image.to_string()).or_insert(ImageState {
            first_seen: at,
            ..ImageState::default()
        });
        e.last_used = Some(e.last_used.map_or(at, |t| t.max(at)));
    }

    pub fn mark_pulled(&mut self, image: &str, at: i64) {
        let e = self.images.entry(image.to_string()).or_insert(ImageState {
            first_seen: at,
            ..ImageState::default()
        });
        e.last_pulled = Some(e.last_pulled.map_or(at, |t| t.max(at)));
    }

    /// Forget images that are no longer on the host.
    pub fn retain_images<'a>(&mut self, present: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = present.into_iter().collect();
        self.images.retain(|id, _| keep.contains(id.as_str()));
        // A previous image removed by hand cannot be rolled back to.
        for p in self.prepull.values_mut() {
            p.previous.retain(|id| keep.contains(id.as_str()));
        }
        self.mirrored.retain(|_, m| keep.contains(m.image.as_str()));
    }
}

/// Typed state errors. Only saving can fail the caller; loading recovers.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock state {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process owns the state.
    #[error("the state in {dir} is in use by {holder}")]
    Held { dir: PathBuf, holder: String },
}

/// Ownership of the state: the `flock` on [`LOCK_FILE`], released when this
/// is dropped (or the process dies, however it dies).
#[derive(Debug)]
pub struct StateLock {
    dir: PathBuf,
    _file: File,
}

impl StateLock {
    /// The `state_dir` this lock owns.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The state file in a folder.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

/// Which state file is on disk and as of when: its inode, length and
/// modification time. The daemon notes it after each load and save, so
/// `status` knows without parsing whether someone changed the file behind
/// the daemon's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// The result of loading: the state, and a warning when it had to be reset.
#[derive(Debug)]
pub struct Loaded {
    pub state: State,
    pub warning: Option<String>,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The state file's [`Stamp`]; `None` when there is none.
    pub fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(self.path()).ok()?;
        Some(Stamp {
            inode: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Take ownership of the state without waiting: [`StateError::Held`]
    /// (naming the holder) when another process owns it. `who` says what
    /// this process is (`stowage run`, `stowage apply`) in the others'
    /// messages. Temp files left by a crashed save are removed: with the lock
    /// held, no other save can be in flight.
    pub fn try_lock(&self, who: &str) -> Result<StateLock, StateError> {
        fs::create_dir_all(&self.dir).map_err(|source| StateError::CreateDir {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.dir.join(LOCK_FILE);
        let failed = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        // Never truncated on open: the holder's name is in it.
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            0o600,
        )
        .open(&path)
        .map_err(failed)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateError::Held {
                    dir: self.dir.clone(),
                    holder: self.holder(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
        let name = format!("{who} (pid {})\n", std::process::id());
        // The name only serves others' messages; the lock is the flock. On a
        // full disk (where eviction must still run) it may not fit.
        if let Err(e) = file
            .set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&file, name.as_bytes(), 0))
        {
            tracing::warn!(
                "cannot write the lock holder's name into {}: {e}",
                path.display()
            );
        }
        self.remove_stale_temps();
        Ok(StateLock {
            dir: self.dir.clone(),
            _file: file,
        })
    }

    /// [`Self::try_lock`], retried for up to `wait` while another process
    /// owns the state; `on_wait` hears the holder once, when waiting starts.
    pub async fn lock_within(
        &self,
        who: &str,
        wait: Duration,
        on_wait: impl FnOnce(&str),
    ) -> Result<StateLock, StateError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut on_wait = Some(on_wait);
        loop {
            match self.try_lock(who) {
                Err(StateError::Held { holder, .. }) if tokio::time::Instant::now() < deadline => {
                    if let Some(f) = on_wait.take() {
                        f(&holder);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Who owns the state, as the holder wrote it into the lock file.
    fn holder(&self) -> String {
        match fs::read_to_string(self.dir.join(LOCK_FILE)) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => "another stowage process".to_owned(),
        }
    }

    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Load the state. A missing file is an empty state; a corrupt one is
    /// moved aside (`state.json.corrupt-<unix>`) and reported in `warning`.
    pub fn load(&self, at: i64) -> Loaded {
        self.load_inner(at, true)
    }

    /// Load for read-only commands (`plan`, `status`): a corrupt state is
    /// reported and treated as empty, but left where it is.
    pub fn load_readonly(&self, at: i64) -> Loaded {
        self.load_inner(at, false)
    }

    fn load_inner(&self, at: i64, move_aside: bool) -> Loaded {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No state: the host's first run, unless an earlier one left
                // its mark (the state was deleted).
                let ran_before = self.dir.join(INITIALIZED_FILE).exists();
                return Loaded {
                    state: reset(ran_before),
                    warning: None,
                };
            }
            Err(e) => {
                return Loaded {
                    state: reset(true),
                    warning: Some(format!(
                        "cannot read state {}: {e}; starting with an empty state",
                        path.display()
                    )),
                };
            }
        };
        match serde_json::from_slice::<State>(&bytes) {
            Ok(state) => Loaded {
                state,
                warning: None,
            },
            Err(e) => {
                let aside = self.dir.join(format!("{STATE_FILE}.corrupt-{at}"));
                let moved = if !move_aside {
                    "left in place".to_string()
                } else {
                    match fs::rename(&path, &aside) {
                        Ok(()) => format!("moved aside to {}", aside.display()),
                        Err(m) => format!("could not move it aside: {m}"),
                    }
                };
                Loaded {
                    state: reset(true),
                    warning: Some(format!(
                        "state {} is corrupt ({e}); {moved}; starting with an empty state",
                        path.display()
                    )),
                }
            }
        }
    }

    /// Atomically replace the state file. The temp file is this save's own
    /// (pid and a counter in its name), so even a writer that does not hold
    /// the lock cannot tear another's file; it is removed when the save fails.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(|source| StateError::CreateDir {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.path();
        let write = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut state = state.clone();
        state.format = FORMAT;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| write(e.into()))?;
        write_atomic(&path, &bytes).map_err(write)?;
        if state.initialized {
            let mark = self.dir.join(INITIALIZED_FILE);
            // Best effort: the state is saved; the next save tries again.
            if !mark.exists() {
                match fs::write(
                    &mark,
                    "stowage has reconciled on this host: without state.json, images count as first seen when next seen\n",
                ) {
                    Ok(()) => {
                        let _ = sync_dir(&self.dir);
                    }
                    Err(e) => tracing::warn!("cannot write {}: {e}", mark.display()),
                }
            }
        }
        Ok(())
    }
}

fn fresh() -> State {
    State {
        format: FORMAT,
        ..State::default()
    }
}

/// The empty state that replaces a missing or corrupt one. Only on the
/// host's first run do existing images count as first seen at creation;
/// after a reset they count as first seen now (more careful, not less).
fn reset(ran_before: bool) -> State {
    State {
        initialized: ran_before,
        ..fresh()
    }
}

/// Atomically replace `path` with `bytes`: a temp file of this call's own in
/// the same folder (`.<name>.tmp.<pid>.<n>`, removed when the write fails),
/// fsync, rename over `path`, fsync of the folder. A crash leaves the old
/// file or the new one, never half of one; [`is_temp_name`] finds what a
/// crash left behind. The state and the content store (blobs, offsets, its
/// index) are written this way.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = dir.join(format!(
        ".{name}{TMP_INFIX}{}.{}",
        std::process::id(),
        SAVES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = File::create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Whether a file name is one of [`write_atomic`]'s temp files.
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TMP_INFIX)
}

/// fsync the folder so a rename (or removal) in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s"));
        let mut st = store.load(100).state;
        assert!(st.images.is_empty());
        st.observe("sha256:a", 50, 100);
        st.initialized = true;
        st.mark_used("sha256:a", 120);
        st.backoff.insert(
            "pull x:1".into(),
            Backoff {
                failures: 2,
                next_attempt: 500,
                last_error: "down".into(),
            },
        );
        store.save(&st).unwrap();
        let back = store.load(130);
        assert!(back.warning.is_none());
        assert_eq!(back.state, st);
        assert_eq!(back.state.images["sha256:a"].first_seen, 50);

        fs::write(store.path(), b"{\"images\": {\"x\": tor").unwrap();
        let broken = store.load(140);
        assert!(broken.warning.unwrap().contains("corrupt"));
        assert!(broken.state.images.is_empty());
        assert!(dir.path().join("s/state.json.corrupt-140").exists());
        assert!(!store.path().exists());
    }

    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect()
    }

    #[test]
    fn one_owner_at_a_time_named_to_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s"));
        // A temp file a crashed save left behind.
        fs::create_dir_all(store.dir()).unwrap();
        fs::write(store.dir().join(".state.json.tmp.1.0"), b"{\"ima").unwrap();
        let first = store.try_lock("first").unwrap();
        assert!(
            temps(store.dir()).is_empty(),
            "the owner removes stale temps"
        );
        // flock is per open file: a second open in this process conflicts too.
        match store.try_lock("second") {
            Err(StateError::Held { holder, .. }) => {
                assert_eq!(holder, format!("first (pid {})", std::process::id()));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        let _again = store.try_lock("second").unwrap();
    }

    #[test]
    fn a_failed_save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        store.save(&State::default()).unwrap();
        assert!(temps(dir.path()).is_empty());
        // A folder where the state file goes: the rename fails.
        fs::remove_file(store.path()).unwrap();
        fs::create_dir_all(store.path().join("x")).unwrap();
        assert!(matches!(
            store.save(&State::default()),
            Err(StateError::Write { .. })
        ));
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn a_lost_or_corrupt_state_counts_images_as_first_seen_now() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        // The host's first run: creation time stands in for "first seen".
        let mut st = store.load(100).state;
        assert!(!st.initialized);
        st.observe("old", 10, 100);
        assert_eq!(st.images["old"].first_seen, 10);
        st.initialized = true;
        store.save(&st).unwrap();
        // Deleted: the new state is not the host's first run.
        fs::remove_file(store.path()).unwrap();
        let mut lost = store.load(200).state;
        lost.observe("old", 10, 200);
        assert_eq!(lost.images["old"].first_seen, 200);
        // Corrupt, even with no mark left: a state existed.
        fs::remove_file(dir.path().join(INITIALIZED_FILE)).unwrap();
        fs::write(store.path(), b"{\"images\": ").unwrap();
        let mut broken = store.load(300).state;
        broken.observe("old", 10, 300);
        assert_eq!(broken.images["old"].first_seen, 300);
    }

    #[test]
    fn first_seen_uses_creation_time_only_before_first_reconcile() {
        let mut st = State::default();
        st.observe("a", 10, 100);
        st.initialized = true;
        st.observe("b", 10, 100);
        st.observe("a", 10, 200);
        assert_eq!(st.images["a"].first_seen, 10);
        assert_eq!(st.images["b"].first_seen, 100);
    }
}
