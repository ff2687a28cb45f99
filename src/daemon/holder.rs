//! The daemon as the state's one holder: loaded once, lent to a reconcile or
//! a write of activity marks and given back, a snapshot for `status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::time::Instant;

use crate::blocking::off_loop;
use crate::engine::{Engine, EngineResult};
use crate::policy::Policy;
use crate::state::{Stamp, State, StateStore};

use super::handler::lock;
use super::{Daemon, LOCK_HOLDER, events};

/// The state as the daemon holds it: in memory, owned by the loop and lent
/// to one task at a time (a reconcile or a write of activity marks), which
/// gives it back. Loaded once at start (and when a reload moves
/// `state_dir`), never read back from the file meanwhile.
pub(super) struct Held {
    /// The `state_dir` it belongs to.
    pub(super) dir: PathBuf,
    pub(super) state: State,
    /// Changed in memory since it was last written (activity marks, or a
    /// reconcile whose save failed).
    pub(super) unsaved: bool,
}

/// What `status` reads of the state: a copy as of the last reconcile or
/// write, and the file's [`Stamp`] then.
#[derive(Clone, Default)]
pub(super) struct Snapshot {
    pub(super) dir: PathBuf,
    pub(super) state: Arc<State>,
    pub(super) stamp: Option<Stamp>,
    /// What loading it said (a corrupt file moved aside), until a save.
    pub(super) warning: Option<String>,
}

/// The held state of `dir`: `held` when it is that folder's, else loaded
/// (off the loop) from it.
pub(super) async fn hold(held: Option<Held>, dir: &Path, at: i64) -> Held {
    if let Some(h) = held.filter(|h| h.dir == dir) {
        return h;
    }
    let store = StateStore::new(dir);
    let loaded = off_loop(move || store.load(at)).await;
    if let Some(w) = &loaded.warning {
        tracing::warn!("{w}");
    }
    Held {
        dir: dir.to_path_buf(),
        state: loaded.state,
        unsaved: false,
    }
}

/// A copy of `held` for `status` (off the loop: a large state takes a
/// while), with the file's stamp as it is now.
pub(super) async fn snapshot_of(held: Held, warning: Option<String>) -> (Held, Snapshot) {
    off_loop(move || {
        let snapshot = Snapshot {
            dir: held.dir.clone(),
            state: Arc::new(held.state.clone()),
            stamp: StateStore::new(&held.dir).stamp(),
            warning,
        };
        (held, snapshot)
    })
    .await
}

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    /// Whether the daemon owns the state of `policy`: after a reload moved
    /// `state_dir`, the new folder is locked (and the old one released)
    /// before anything is written there. While another process owns it,
    /// reconciles and marks wait (said once); later loop turns retry.
    pub(super) fn owns_state(&mut self, policy: &Policy) -> bool {
        let dir = &policy.daemon.state_dir;
        if self.state_lock.dir() == dir.as_path() {
            return true;
        }
        match StateStore::new(dir).try_lock(LOCK_HOLDER) {
            Ok(l) => {
                tracing::info!("state_dir is now {}", dir.display());
                self.state_lock = l;
                self.state_blocked = None;
                true
            }
            Err(e) => {
                if self.state_blocked.as_ref() != Some(dir) {
                    tracing::warn!("{e}; reconciles wait until the daemon can own it");
                    self.note_error(e.to_string());
                    self.state_blocked = Some(dir.clone());
                }
                false
            }
        }
    }

    /// Takes the pending activity marks and the state; the future (`None`
    /// when there is nothing to write) applies them and saves the state off
    /// the loop, then gives it back. Only one writer at a time: run as
    /// `flushing`, which a reconcile waits for, or awaited at shutdown.
    /// Marks wait while another process owns the state (after a reload moved
    /// `state_dir`).
    pub(super) fn flush_marks(
        &mut self,
    ) -> Option<impl Future<Output = (Held, Snapshot)> + Send + 'static> {
        self.last_flush = Instant::now();
        let policy = self.policy();
        let marks = events::take(&self.marks);
        let unsaved = self.state.as_ref().is_some_and(|h| h.unsaved);
        if marks.is_empty() && !unsaved {
            return None;
        }
        if !self.owns_state(&policy) {
            events::put_back(&self.marks, marks);
            return None;
        }
        let held = self.state.take();
        let dir = policy.daemon.state_dir.clone();
        let now = self.clock.now().timestamp();
        Some(async move {
            let mut held = hold(held, &dir, now).await;
            marks.apply(&mut held.state);
            let (mut held, saved) = off_loop(move || {
                let saved = StateStore::new(&held.dir).save(&held.state);
                (held, saved)
            })
            .await;
            match saved {
                Ok(()) => {
                    tracing::debug!("wrote {} activity mark(s) to the state", marks.len());
                    held.unsaved = false;
                }
                Err(e) => {
                    tracing::warn!("cannot write activity marks: {e}; trying again later");
                    held.unsaved = true;
                }
            }
            snapshot_of(held, None).await
        })
    }

    /// A write of marks is over: the state is back.
    pub(super) fn on_written(&mut self, written: Option<(Held, Snapshot)>) {
        if let Some((held, snapshot)) = written {
            self.state = Some(held);
            *lock(&self.shared.snapshot) = snapshot;
        }
    }
}
