//! Persistent state under `state_dir`: when each image was first seen, last
//! used and last pulled on this host, and the backoff of failing references.
//!
//! Written atomically (temp file in the same folder, fsync, rename, fsync of
//! the folder), so a crash leaves either the old or the new state. A corrupt or
//! unreadable state is moved aside and replaced by an empty one: losing
//! activity times only makes stowage more conservative (images look new).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

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
/// [`crate::policy::Prepull::key`]).
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
    /// Whether any reconcile has run. On the very first one, images already
    /// present count as first seen at their creation time.
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
}

impl State {
    /// Record that `image` was seen now, keeping its earlier first-seen time.
    /// Before the first reconcile, the creation time stands in for "now".
    pub fn observe(&mut self, image: &str, created: i64, now: i64) {
        let first = if self.initialized {
            now
        } else {
            created.min(now)
        };
        self.images
            .entry(image.to_string())
            .or_insert_with(|| ImageState {
                first_seen: first,
                ..ImageState::default()
            });
    }

    pub fn mark_used(&mut self, image: &str, now: i64) {
        let e = self.images.entry(image.to_string()).or_insert(ImageState {
            first_seen: now,
            ..ImageState::default()
        });
        e.last_used = Some(e.last_used.map_or(now, |t| t.max(now)));
    }

    pub fn mark_pulled(&mut self, image: &str, now: i64) {
        let e = self.images.entry(image.to_string()).or_insert(ImageState {
            first_seen: now,
            ..ImageState::default()
        });
        e.last_pulled = Some(e.last_pulled.map_or(now, |t| t.max(now)));
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
}

/// The state file in a folder.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
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

    /// Load the state. A missing file is an empty state; a corrupt one is
    /// moved aside (`state.json.corrupt-<unix>`) and reported in `warning`.
    pub fn load(&self, now: i64) -> Loaded {
        self.load_inner(now, true)
    }

    /// Load for read-only commands (`plan`, `status`): a corrupt state is
    /// reported and treated as empty, but left where it is.
    pub fn load_readonly(&self, now: i64) -> Loaded {
        self.load_inner(now, false)
    }

    fn load_inner(&self, now: i64, move_aside: bool) -> Loaded {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Loaded {
                    state: fresh(),
                    warning: None,
                };
            }
            Err(e) => {
                return Loaded {
                    state: fresh(),
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
                let aside = self.dir.join(format!("{STATE_FILE}.corrupt-{now}"));
                let moved = if !move_aside {
                    "left in place".to_string()
                } else {
                    match fs::rename(&path, &aside) {
                        Ok(()) => format!("moved aside to {}", aside.display()),
                        Err(m) => format!("could not move it aside: {m}"),
                    }
                };
                Loaded {
                    state: fresh(),
                    warning: Some(format!(
                        "state {} is corrupt ({e}); {moved}; starting with an empty state",
                        path.display()
                    )),
                }
            }
        }
    }

    /// Atomically replace the state file.
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
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let mut state = state.clone();
        state.format = FORMAT;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| write(e.into()))?;
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
            // A full disk leaves a partial temp file: it must not hold on to
            // the space the next save (or eviction) needs.
            let _ = fs::remove_file(&tmp);
            return Err(write(e));
        }
        sync_dir(&self.dir).map_err(write)?;
        Ok(())
    }
}

fn fresh() -> State {
    State {
        format: FORMAT,
        ..State::default()
    }
}

/// fsync the folder so the rename itself is durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
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

    #[test]
    fn a_failed_save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        // A folder where the state goes: the rename fails after the temp
        // file was written whole.
        fs::create_dir(store.path()).unwrap();
        fs::write(store.path().join("x"), b"").unwrap();
        assert!(store.save(&State::default()).is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [STATE_FILE]);
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
