//! What the loop shares with the control socket, and the socket's `status`
//! and `reconcile` requests.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::blocking::off_loop;
use crate::clock::Clock;
use crate::engine::Engine;
use crate::policy::Policy;
use crate::reconcile;
use crate::state::StateStore;
use crate::status::{self, DaemonStatus};

use super::control::{Handler, Response};
use super::holder::Snapshot;
use super::{STATUS_TIMEOUT, Trigger};

/// What the loop shares with the control socket.
pub(super) struct Shared<E> {
    pub(super) view: Mutex<DaemonStatus>,
    pub(super) policy: Mutex<Arc<Policy>>,
    pub(super) engine: Mutex<Option<Arc<E>>>,
    /// Control `reconcile` requests into the loop.
    pub(super) requests: mpsc::Sender<Trigger>,
    pub(super) clock: Arc<dyn Clock>,
    /// Activity marks (and `restore --protect` holds) the loop writes into
    /// the state it owns.
    pub(super) marks: super::events::SharedMarks,
    /// The state as the loop last had it, for `status`.
    pub(super) snapshot: Mutex<Snapshot>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind the lock: a panic elsewhere does not make it wrong.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<E: Engine + 'static> Handler for Shared<E> {
    async fn status(&self) -> Response {
        let mut daemon = lock(&self.view).clone();
        let policy = lock(&self.policy).clone();
        let engine = lock(&self.engine).clone();
        let now = self.clock.now();
        // The daemon's state as it holds it; the file is read only when it
        // changed behind the daemon's back, to say whether it is corrupt.
        // Planning every verdict and the rows are CPU work: off the loop,
        // which must keep answering meanwhile.
        let snapshot = lock(&self.snapshot).clone();
        let store = StateStore::new(&snapshot.dir);
        let stamp = snapshot.stamp;
        let changed = off_loop(move || {
            (store.stamp() != stamp)
                .then(|| store.load_readonly(now.timestamp()).warning)
                .flatten()
        })
        .await;
        let state = (*snapshot.state).clone();
        daemon.backoffs = status::backoffs(&state);
        let scans = Some(status::scan_counts(&state));
        daemon.state_warning = changed.or(snapshot.warning);
        let (references, images, references_error, trash) = match engine {
            None => (
                None,
                None,
                Some("the engine is unreachable".to_owned()),
                None,
            ),
            Some(engine) => {
                let planned = tokio::time::timeout(
                    STATUS_TIMEOUT,
                    reconcile::plan_now(&*engine, &policy, &state, now),
                )
                .await;
                match planned {
                    Ok(Ok((observed, plan))) => {
                        let images = observed.images.len();
                        let trash = crate::trash::totals(&observed.images);
                        let rows = off_loop(move || status::rows(&observed, &plan, &state)).await;
                        (Some(rows), Some(images), None, Some(trash))
                    }
                    Ok(Err(e)) => (None, None, Some(e.to_string()), None),
                    Err(_) => (
                        None,
                        None,
                        Some("the engine did not answer in time".into()),
                        None,
                    ),
                }
            }
        };
        Response::Status {
            daemon: Box::new(daemon),
            references,
            images,
            references_error,
            trash,
            scans,
        }
    }

    async fn hold(&self, image: String, until: i64) -> Response {
        lock(&self.marks).held.insert(image, until);
        Response::Held
    }

    async fn reconcile(&self) -> Response {
        let (tx, rx) = oneshot::channel();
        if self
            .requests
            .send(Trigger::ReconcileAndReply(tx))
            .await
            .is_err()
        {
            return shutting_down();
        }
        match rx.await {
            Ok(result) => Response::Reconcile { result },
            Err(_) => shutting_down(),
        }
    }
}

pub(super) fn shutting_down() -> Response {
    Response::Error {
        message: "the daemon is shutting down".into(),
    }
}
