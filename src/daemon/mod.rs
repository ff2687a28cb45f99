//! The daemon (`stowage run`): one loop that owns the policy in force, the
//! engine connection and the reconciles.
//!
//! - Triggers (cron schedule, policy-file changes, SIGHUP, SIGUSR1, control
//!   requests, the engine coming back) all ask for the same thing: a
//!   reconcile. At most one runs and at most one waits; triggers arriving
//!   meanwhile coalesce into the waiting one. The reconciler is never told
//!   why it runs.
//! - A reload validates the whole new policy first; an invalid one is logged
//!   (`FILE:LINE:COL`), reported by `status`, and the old one stays in force.
//! - The daemon owns the state for its lifetime (the `flock` of
//!   [`crate::state::StateLock`]): `stowage apply` beside it asks it to
//!   reconcile instead of writing the state itself.
//! - Engine events become activity marks, written to the state in batches
//!   between reconciles (the loop is then the state's only writer).
//! - The engine may be down at start or go away: the loop reconnects with
//!   capped, jittered backoff, logs each change of reachability once, and
//!   reconciles when the engine is back. An event stream that fails while
//!   the engine answers (a proxy refusing `/events`) is retried with its own
//!   backoff and reconciles nothing: only a real outage does.
//! - Shutdown (the `shutdown` future) cancels transfers in flight (a push
//!   removes its temporary tag), lets a removal in flight finish, writes
//!   the state, and returns.
//!
//! Signal and file-watch sources live in [`sources`] and only feed the
//! trigger channel, so tests drive the loop with a fake engine and injected
//! triggers.

pub mod control;
pub mod events;
mod fleet;
mod handler;
mod holder;
pub mod inbox;
mod link;
pub mod metrics;
pub mod notify;
mod reconciles;
pub mod sources;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::blocking::off_loop;
use crate::clock::Clock;
use crate::engine::{Engine, EngineResult};
use crate::policy::{self, Policy};
use crate::state::{StateError, StateLock, StateStore};
use crate::status::{DaemonStatus, Dated, ReconcileResult};

use self::control::{ControlError, Request, Response};
use self::events::SharedMarks;
use self::handler::{Shared, lock};
use self::holder::{Held, Snapshot, snapshot_of};
use self::link::EngineLink;
use self::metrics::Metrics;
use self::notify::Notifier;
use self::reconciles::Finished;

/// Quiet time after the last change in the policy folder before the file
/// is read: editors write in several steps.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Activity marks are written at most this long after they were seen.
const FLUSH_EVERY: Duration = Duration::from_secs(15);
/// Heartbeat without a systemd watchdog (it also bounds how late a missed
/// wake-up is noticed).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// The cron wait is cut into slices this long and re-checked against the
/// wall clock, so clock jumps and suspend do not make it miss a fire time.
const CRON_SLICE: Duration = Duration::from_secs(60);
/// On shutdown, the reconcile in flight gets this long to stop: transfers
/// stop at once, a removal finishes, the state is saved. Only an engine that
/// does not answer uses it up (systemd's stop timeout in the unit is 15 s);
/// a push's temporary tag left then is removed at the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// `status` shows this many recent errors.
const KEEP_ERRORS: usize = 10;
/// `status` gives up on listing the engine after this long.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// At start, how long to wait for a `stowage apply` that owns the state to
/// finish (systemd's start timeout in the unit is 30 s).
const STATE_LOCK_WAIT: Duration = Duration::from_secs(20);
/// What the lock file says about the daemon.
const LOCK_HOLDER: &str = "the stowage daemon";

/// Why the loop should look at something. Only `Reload` and
/// `PolicyTouched` differ from "reconcile": they re-read the policy first.
#[derive(Debug)]
pub enum Trigger {
    /// Reconcile now (SIGUSR1).
    Reconcile,
    /// Re-read the policy (SIGHUP); reconcile when it loaded.
    Reload,
    /// Something changed in the policy's folder; debounced by the loop, and
    /// a reload only when the file's content changed.
    PolicyTouched,
    /// Reconcile, then send the result (control socket `reconcile`).
    ReconcileAndReply(oneshot::Sender<ReconcileResult>),
    /// Images were pulled or loaded and `[storage]` is set: check pressure.
    ImagesArrived,
    /// The registry policy's poller: a new policy, a refused one, a check.
    Fleet(crate::fleet::poll::Event),
}

impl From<crate::fleet::poll::Event> for Trigger {
    fn from(event: crate::fleet::poll::Event) -> Trigger {
        Trigger::Fleet(event)
    }
}

/// A registry policy (`-p oci://…`): what the daemon shares with its poller.
pub struct Remote {
    /// The poller's view, copied into `status` and the metrics.
    pub status: Arc<Mutex<crate::fleet::poll::RemoteStatus>>,
    /// Check now (SIGHUP: there is no file to re-read).
    pub wake: Arc<tokio::sync::Notify>,
}

/// What the daemon starts with.
pub struct Config {
    /// The validated policy (its `source` is the file reloads read).
    pub policy: Policy,
    /// The engine's address, for logs and `status`.
    pub engine_address: String,
    pub clock: Arc<dyn Clock>,
    pub notifier: Notifier,
    /// Shared so the caller (and tests) can read the counters.
    pub metrics: Arc<Metrics>,
    /// Set with a registry policy: it is polled instead of watched, and the
    /// schedule is shifted per host.
    pub remote: Option<Remote>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("the daemon cannot own its state: {0}")]
    State(#[from] StateError),
}

/// The loop's own state.
struct Daemon<E, F> {
    shared: Arc<Shared<E>>,
    connect: F,
    notifier: Notifier,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// The policy file's bytes at the last load attempt (`None`: unreadable),
    /// so folder noise and no-op saves do not reload.
    last_bytes: Option<Vec<u8>>,
    /// `Some`: a reconcile is wanted, with who waits for its result.
    pending: Option<Vec<oneshot::Sender<ReconcileResult>>>,
    running: Option<JoinHandle<Finished>>,
    /// The engine the running reconcile uses (the loop's own may have been
    /// replaced meanwhile), for the watchdog.
    running_engine: Option<Arc<E>>,
    /// `WATCHDOG=1` is withheld: an engine call outlived its deadline.
    watchdog_withheld: bool,
    /// Who waits for the result of the running reconcile.
    running_waiters: Vec<oneshot::Sender<ReconcileResult>>,
    /// The engine connection, from attempts to the event watcher.
    link: EngineLink<E>,
    marks: SharedMarks,
    /// The state; `None` while a reconcile or a write has it (or after
    /// one panicked: then it is loaded again).
    state: Option<Held>,
    /// Activity marks being written between reconciles (off the loop); gives
    /// the state back.
    flushing: Option<JoinHandle<(Held, Snapshot)>>,
    last_flush: Instant,
    next_fire: Option<DateTime<Utc>>,
    debounce_at: Option<Instant>,
    /// Cancelled at shutdown; the executor checks it between actions.
    stop: CancellationToken,
    /// Ownership of the state; moves when a reload changes `state_dir`.
    state_lock: StateLock,
    /// The last `state_dir` that could not be owned, so it is logged once.
    state_blocked: Option<PathBuf>,
    /// A registry policy's poller, when the policy is one.
    remote: Option<Remote>,
    /// This host's place in the schedule's period (`[0, 1)`, stable per
    /// host), so a fleet on one cron does not fire on the same second.
    schedule_spread: Option<f64>,
    /// Inbox files ready to import, at the start of the next reconcile.
    inbox_ready: Vec<PathBuf>,
}

/// Runs the daemon until `shutdown` completes. `connect` makes an engine
/// connection (called again after the engine is lost); `triggers` carries
/// signals and file-watch events. Binds the control socket and the metrics
/// endpoint named by the policy; fails only when those cannot be bound.
pub async fn run<E, F, Fut>(
    config: Config,
    connect: F,
    mut triggers: mpsc::Receiver<Trigger>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    let Config {
        policy,
        engine_address,
        clock,
        notifier,
        metrics,
        remote,
    } = config;
    let schedule_spread = remote
        .as_ref()
        .map(|_| fleet::host_fraction(&policy.daemon.state_dir));
    let now = clock.now();
    let policy_path = policy.source.clone();
    let control_path = policy.daemon.control_socket.clone();
    let metrics_addr = policy.daemon.metrics.clone();
    let (requests_tx, mut requests) = mpsc::channel(16);
    let view = DaemonStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: now,
        policy: policy_path.clone(),
        policy_loaded: now,
        policy_summary: policy.summary(),
        reload_error: None,
        engine: engine_address,
        engine_kind: None,
        engine_notes: Vec::new(),
        engine_reachable: false,
        engine_error: None,
        reconciling: false,
        reconcile_pending: false,
        reconciles: 0,
        last_reconcile: None,
        next_scheduled: None,
        errors: Vec::new(),
        backoffs: Vec::new(),
        pulls: Default::default(),
        state_warning: None,
        policy_remote: remote.as_ref().map(fleet::snapshot),
    };
    let marks = SharedMarks::default();
    let shared = Arc::new(Shared {
        marks: marks.clone(),
        view: Mutex::new(view),
        policy: Mutex::new(Arc::new(policy)),
        engine: Mutex::new(None),
        requests: requests_tx,
        clock: clock.clone(),
        snapshot: Mutex::new(Snapshot::default()),
    });

    let servers = CancellationToken::new();
    // The socket first: a second daemon is told so by it, not by the lock.
    let listener = control::bind(&control_path)?;
    let store = StateStore::new(&lock(&shared.policy).daemon.state_dir);
    let state_lock = store
        .lock_within(LOCK_HOLDER, STATE_LOCK_WAIT, |holder| {
            tracing::info!(
                "the state in {} is in use by {holder}; waiting up to {}s for it",
                store.dir().display(),
                STATE_LOCK_WAIT.as_secs()
            );
        })
        .await;
    let state_lock = match state_lock {
        Ok(l) => l,
        Err(e) => {
            // Nobody else may find the socket of a daemon that never ran.
            let _ = std::fs::remove_file(&control_path);
            return Err(e.into());
        }
    };
    // The state is loaded here once; reconciles borrow it from the loop.
    let dir = store.dir().to_path_buf();
    let (held, snapshot) = {
        let store = store.clone();
        let loaded = off_loop(move || store.load(now.timestamp())).await;
        if let Some(w) = &loaded.warning {
            tracing::warn!("{w}");
        }
        let held = Held {
            dir,
            state: loaded.state,
            unsaved: false,
        };
        snapshot_of(held, loaded.warning).await
    };
    *lock(&shared.snapshot) = snapshot;
    let control_task = tokio::spawn(control::serve(
        listener,
        control_path.clone(),
        shared.clone(),
        servers.clone(),
    ));
    let metrics_task = match &metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics {
                    addr: addr.clone(),
                    source,
                })?;
            tracing::info!("metrics at http://{addr}/metrics");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                servers.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(
        "stowage daemon started: policy {}, control socket {}",
        policy_path.display(),
        control_path.display()
    );

    let mut d = Daemon {
        shared,
        connect,
        notifier,
        metrics,
        clock,
        last_bytes: policy::file::read(&policy_path).ok(),
        pending: Some(Vec::new()),
        running: None,
        running_engine: None,
        watchdog_withheld: false,
        running_waiters: Vec::new(),
        link: EngineLink::new(),
        marks,
        state: Some(held),
        flushing: None,
        last_flush: Instant::now(),
        next_fire: None,
        debounce_at: None,
        stop: CancellationToken::new(),
        state_lock,
        state_blocked: None,
        schedule_spread,
        remote,
        inbox_ready: Vec::new(),
    };
    d.on_fleet_checked();
    d.schedule_next();
    d.notifier.ready("policy loaded; connecting to the engine");
    d.start_connect();

    let mut heartbeat = tokio::time::interval(
        d.notifier
            .watchdog_interval()
            .map_or(HEARTBEAT, |w| w.min(HEARTBEAT)),
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let (inbox_tx, mut inbox_rx) = mpsc::channel(4);
    let shared = d.shared.clone();
    let inbox_task = tokio::spawn(inbox::watch(
        move || lock(&shared.policy).clone(),
        inbox_tx,
        servers.clone(),
    ));

    loop {
        d.maybe_start_reconcile();
        d.publish();
        let cron_wait = d.cron_wait();
        tokio::select! {
            () = &mut shutdown => break,
            Some(t) = triggers.recv() => d.on_trigger(t),
            Some(t) = requests.recv() => d.on_trigger(t),
            Some(files) = inbox_rx.recv() => d.on_inbox(files),
            finished = join(&mut d.running) => d.on_finished(finished),
            wake = d.link.wait() => d.on_link(wake),
            () = sleep_until(d.debounce_at) => {
                d.debounce_at = None;
                d.on_policy_settled();
            }
            () = tokio::time::sleep(cron_wait) => d.on_cron_wake(),
            written = join(&mut d.flushing) => d.on_written(written),
            _ = heartbeat.tick() => {
                d.feed_watchdog();
                d.check_events_recovered();
                if d.running.is_none()
                    && d.flushing.is_none()
                    && d.last_flush.elapsed() >= FLUSH_EVERY
                {
                    d.flushing = d.flush_marks().map(tokio::spawn);
                }
            }
        }
    }

    d.shutdown().await;
    servers.cancel();
    let _ = inbox_task.await;
    let _ = control_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    tracing::info!("stowage daemon stopped");
    Ok(())
}

/// Waits for an optional task; pending forever when there is none, so it
/// can sit in a `select!`.
async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Option<T> {
    match task {
        Some(handle) => {
            let out = handle.await.ok();
            *task = None;
            out
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    fn policy(&self) -> Arc<Policy> {
        lock(&self.shared.policy).clone()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, DaemonStatus> {
        lock(&self.shared.view)
    }

    fn engine(&self) -> Option<Arc<E>> {
        self.link.engine().cloned()
    }

    /// Records an error for `status` (the log has it already).
    fn note_error(&self, message: String) {
        let at = self.clock.now();
        let mut view = self.view();
        view.errors.push(Dated { at, message });
        let excess = view.errors.len().saturating_sub(KEEP_ERRORS);
        view.errors.drain(..excess);
    }

    /// Mirrors the loop's state into the view `status` reads (the engine
    /// link mirrors itself as it changes).
    fn publish(&self) {
        let mut view = self.view();
        view.reconciling = self.running.is_some();
        view.reconcile_pending = self.pending.is_some();
        view.next_scheduled = self.next_fire;
    }

    fn request(&mut self, waiter: Option<oneshot::Sender<ReconcileResult>>) {
        let pending = self.pending.get_or_insert_with(Vec::new);
        pending.extend(waiter);
    }

    /// Inbox files that kept still: imported at the start of a reconcile.
    fn on_inbox(&mut self, files: Vec<PathBuf>) {
        let mut new = false;
        for f in files {
            if !self.inbox_ready.contains(&f) {
                tracing::info!("inbox: {} is ready to import", f.display());
                self.inbox_ready.push(f);
                new = true;
            }
        }
        if new {
            self.request(None);
        }
    }

    fn on_trigger(&mut self, trigger: Trigger) {
        match trigger {
            Trigger::Reconcile => {
                tracing::info!("reconcile requested (SIGUSR1)");
                self.request(None);
            }
            Trigger::ReconcileAndReply(tx) => {
                tracing::info!("reconcile requested on the control socket");
                self.request(Some(tx));
            }
            Trigger::ImagesArrived => {
                tracing::info!("images pulled or loaded: checking disk pressure");
                self.request(None);
            }
            Trigger::Fleet(event) => self.on_fleet(event),
            Trigger::Reload if self.remote.is_some() => self.poll_now(),
            Trigger::Reload => {
                if self.reload("SIGHUP") {
                    self.request(None);
                }
            }
            Trigger::PolicyTouched => {
                if self.policy().daemon.watch {
                    self.debounce_at = Some(Instant::now() + DEBOUNCE);
                }
            }
        }
    }

    /// The policy folder has been quiet for [`DEBOUNCE`]: reload if the
    /// file's content changed since the last attempt.
    fn on_policy_settled(&mut self) {
        let path = self.policy().source.clone();
        let bytes = policy::file::read(&path).ok();
        if bytes == self.last_bytes {
            return;
        }
        if self.reload("policy file changed") {
            self.request(None);
        }
    }

    /// Reads and validates the whole policy; only a valid one replaces the
    /// one in force. Returns whether it did.
    fn reload(&mut self, why: &str) -> bool {
        let old = self.policy();
        let path = old.source.clone();
        self.notifier.reloading();
        // The same reader and validator as at start: what a reload accepts,
        // the next boot accepts too.
        let bytes = policy::file::read(&path);
        self.last_bytes = bytes.as_ref().ok().cloned();
        let loaded = bytes.and_then(|b| policy::load_bytes(&b, &path));
        let now = self.clock.now();
        let ok = match loaded {
            Ok(new) => {
                tracing::info!(
                    "policy reloaded ({why}): {}: {}",
                    path.display(),
                    new.summary()
                );
                self.install(new);
                true
            }
            Err(diags) => {
                let text = diags.to_string().trim_end().to_owned();
                tracing::error!(
                    "policy reload ({why}) rejected; the policy loaded at {} stays in force:\n{text}",
                    self.view().policy_loaded.format("%H:%M:%S")
                );
                self.metrics.reload_error();
                self.view().reload_error = Some(Dated {
                    at: now,
                    message: text.clone(),
                });
                self.note_error(format!("policy reload rejected: {text}"));
                false
            }
        };
        let status = if ok {
            "policy reloaded".to_owned()
        } else {
            "policy reload FAILED; the old policy stays in force".to_owned()
        };
        self.notifier.ready(&status);
        ok
    }

    /// Puts a validated policy in force (a reload, or a registry policy
    /// the poller accepted).
    fn install(&mut self, new: Policy) {
        let old = self.policy();
        let now = self.clock.now();
        for (what, changed) in [
            (
                "control_socket",
                new.daemon.control_socket != old.daemon.control_socket,
            ),
            ("metrics", new.daemon.metrics != old.daemon.metrics),
        ] {
            if changed {
                tracing::warn!("daemon.{what} changed: it takes effect when the daemon restarts");
            }
        }
        {
            let mut view = self.view();
            view.policy_loaded = now;
            view.policy_summary = new.summary();
            view.reload_error = None;
        }
        *lock(&self.shared.policy) = Arc::new(new);
        self.schedule_next();
    }

    fn schedule_next(&mut self) {
        let now = self.clock.now();
        let schedule = &self.policy().daemon.schedule.schedule;
        self.next_fire = match self.schedule_spread {
            Some(fraction) => fleet::spread_fire(schedule, now, fraction),
            None => schedule.after(&now).next(),
        };
    }

    /// How long to sleep before looking at the schedule again.
    fn cron_wait(&self) -> Duration {
        match self.next_fire {
            Some(next) => (next - self.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(CRON_SLICE),
            None => CRON_SLICE,
        }
    }

    fn on_cron_wake(&mut self) {
        if let Some(next) = self.next_fire
            && self.clock.now() >= next
        {
            tracing::debug!(
                "scheduled reconcile ({})",
                self.policy().daemon.schedule.source
            );
            self.request(None);
            self.schedule_next();
        }
    }

    async fn shutdown(&mut self) {
        self.notifier.stopping();
        self.stop.cancel();
        if let Some(task) = self.running.take() {
            tracing::info!(
                "stopping the reconcile in flight (transfers cancelled, a removal finishes)"
            );
            let abort = task.abort_handle();
            match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
                Ok(finished) => self.on_finished(finished.ok()),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(
                        "the reconcile did not stop within {}s; abandoned (the next start converges)",
                        SHUTDOWN_GRACE.as_secs()
                    );
                }
            }
        }
        self.link.close();
        if let Some(flushing) = self.flushing.take() {
            self.on_written(flushing.await.ok());
        }
        if let Some(write) = self.flush_marks() {
            let written = write.await;
            self.on_written(Some(written));
        }
        // Waiters of a reconcile that will not run hear it: their sender drops.
        self.pending = None;
    }
}

/// Where a `status`/`reconcile` client finds the daemon's control socket
/// for the policy at `path`, even when the file no longer validates (a
/// broken edit is exactly when `status` matters): the validated value,
/// else `daemon.control_socket` read leniently, else the default.
pub fn control_socket_for(path: &Path) -> PathBuf {
    if let Ok(p) = policy::load(path) {
        return p.daemon.control_socket;
    }
    let lenient = policy::file::read(path)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| {
            t.get("daemon")?
                .get("control_socket")?
                .as_str()
                .map(PathBuf::from)
        });
    match lenient {
        // Relative paths are relative to the policy's folder, as in `policy`.
        Some(p) if p.is_relative() => sources::policy_folder(path).join(p),
        Some(p) => p,
        // The default, as a minimal policy gets it.
        None => policy::parse("version = 1\n", path)
            .map(|p| p.daemon.control_socket)
            .unwrap_or_else(|_| PathBuf::from("/run/stowage/control.sock")),
    }
}

/// Asks the daemon at `socket` for something, waiting at most `timeout` for
/// the answer; `None` when no daemon answers.
pub async fn ask(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Option<Response>, control::ClientError> {
    match control::request_within(socket, request, timeout).await {
        Ok(r) => Ok(Some(r)),
        Err(control::ClientError::NoDaemon { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
