//! The engine link: connecting with capped, jittered backoff, losing and
//! regaining the engine, the event stream's own backoff, the watchdog.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::jittered;
use crate::engine::{Engine, EngineError, EngineResult};

use super::handler::lock;
use super::{
    Daemon, EVENTS_HEALTHY, EVENTS_RETRY_CAP, EVENTS_RETRY_FIRST, RETRY_CAP, RETRY_FIRST, Trigger,
    events, join,
};

pub(super) async fn join_connect<E>(
    task: &mut Option<JoinHandle<EngineResult<E>>>,
) -> EngineResult<E> {
    match join(task).await {
        Some(r) => r,
        None => Err(EngineError::Other("the connection attempt panicked".into())),
    }
}

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    pub(super) fn start_connect(&mut self) {
        if self.connecting.is_none() {
            self.connecting = Some(tokio::spawn((self.connect)()));
        }
    }

    pub(super) fn on_connected(&mut self, result: EngineResult<E>) {
        match result {
            Ok(engine) => {
                let engine = Arc::new(engine);
                // Only a real outage (or the start) is worth a reconcile: a
                // reconnect for a failed event stream, with the engine
                // answering all along, is not.
                let outage = self.reachable != Some(true);
                if outage {
                    tracing::info!("engine {} reachable", self.view().engine);
                } else {
                    tracing::debug!("engine connection re-established");
                }
                self.reachable = Some(true);
                self.retry_delay = RETRY_FIRST;
                // A retry still scheduled from before would connect twice,
                // and an old watcher would report every event twice.
                self.retry_at = None;
                if let Some(old) = self.events.take() {
                    old.abort();
                }
                self.metrics.engine_reachable(true);
                *lock(&self.shared.engine) = Some(engine.clone());
                // A large pull may put the disk under pressure: with
                // `[storage]`, answer it within seconds, not at the next tick.
                let shared = self.shared.clone();
                let on_pulled: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                    if lock(&shared.policy).storage.is_some() {
                        let _ = shared.requests.try_send(Trigger::ImagesArrived);
                    }
                });
                self.events = Some(tokio::spawn(events::watch(
                    engine,
                    self.marks.clone(),
                    self.clock.clone(),
                    on_pulled,
                )));
                self.events_since = Some(Instant::now());
                if outage {
                    // Whatever happened while it was away, look again.
                    self.request(None);
                }
            }
            Err(e) => self.engine_lost(&e.to_string()),
        }
    }

    /// The engine is gone (or never came): drop the connection, log the
    /// change once, retry with capped backoff.
    pub(super) fn engine_lost(&mut self, why: &str) {
        *lock(&self.shared.engine) = None;
        if let Some(events) = self.events.take() {
            events.abort();
        }
        self.metrics.engine_reachable(false);
        let delay = self.retry_delay;
        if self.reachable != Some(false) {
            tracing::warn!(
                "engine unreachable: {why}; retrying with backoff up to {}s (logged once until it is back)",
                RETRY_CAP.as_secs()
            );
            self.note_error(format!("engine unreachable: {why}"));
            self.notifier
                .status(&format!("engine unreachable: {why}; retrying"));
        } else {
            tracing::debug!("engine still unreachable: {why}; next attempt in {delay:?}");
        }
        self.reachable = Some(false);
        {
            let mut view = self.view();
            view.engine_reachable = false;
            view.engine_error = Some(why.to_owned());
        }
        self.events_since = None;
        self.retry_at = Some(Instant::now() + jittered(delay));
        self.retry_delay = (delay * 2).min(RETRY_CAP);
    }

    pub(super) fn on_events_ended(&mut self, why: Option<Option<String>>) {
        let why = why
            .flatten()
            .unwrap_or_else(|| "the engine closed it".into());
        let lived = self.events_since.take().map(|t| t.elapsed());
        if lived.is_some_and(|l| l >= EVENTS_HEALTHY) {
            // It worked, then ended (an engine restart, most likely).
            // Reconnect at once: a reachable engine gets a new stream, and
            // one that went away is reported by the failed attempt.
            tracing::debug!("engine event stream ended ({why}); reconnecting");
            self.events_delay = EVENTS_RETRY_FIRST;
            *lock(&self.shared.engine) = None;
            self.start_connect();
            return;
        }
        // Failing at once while the engine answers (e.g. a socket proxy
        // refusing `/events`): back off, and keep the engine for
        // reconciles meanwhile.
        let delay = self.events_delay;
        if !self.events_failing {
            tracing::warn!(
                "engine event stream failed: {why}; container use and pulls are not recorded \
                 while it is down; retrying with backoff up to {}s (logged once until it works)",
                EVENTS_RETRY_CAP.as_secs()
            );
            self.note_error(format!("engine event stream failed: {why}"));
            self.events_failing = true;
        } else {
            tracing::debug!("engine event stream failed again: {why}; next attempt in {delay:?}");
        }
        self.events_delay = (delay * 2).min(EVENTS_RETRY_CAP);
        if self.retry_at.is_none() && self.connecting.is_none() {
            self.retry_at = Some(Instant::now() + jittered(delay));
        }
    }

    /// `WATCHDOG=1`: proof of progress from the loop itself, not a side
    /// task. Withheld while an engine call is in flight past its deadline
    /// (the deadline did not fire, so a reconcile waiting on it is stuck):
    /// systemd then restarts the daemon rather than trusting a live loop.
    pub(super) fn feed_watchdog(&mut self) {
        let stuck = self
            .running_engine
            .as_ref()
            .and_then(|e| e.stuck_call())
            .or_else(|| self.engine().and_then(|e| e.stuck_call()));
        match stuck {
            None => {
                if self.watchdog_withheld {
                    tracing::info!(
                        "no engine call is overdue any more; feeding the watchdog again"
                    );
                    self.watchdog_withheld = false;
                }
                self.notifier.watchdog();
            }
            Some(s) if !self.watchdog_withheld => {
                let message = format!(
                    "engine call `{}` is {}s past its deadline; the systemd watchdog is no longer fed",
                    s.call,
                    s.overdue.as_secs()
                );
                tracing::error!("{message}");
                self.notifier.status(&message);
                self.note_error(message);
                self.watchdog_withheld = true;
            }
            Some(_) => {}
        }
    }

    /// Says once that a failing event stream works again, and resets its
    /// backoff.
    pub(super) fn check_events_recovered(&mut self) {
        if self.events_failing
            && self
                .events_since
                .is_some_and(|t| t.elapsed() >= EVENTS_HEALTHY)
        {
            tracing::info!("engine event stream works again");
            self.events_failing = false;
            self.events_delay = EVENTS_RETRY_FIRST;
        }
    }
}
