//! The engine link: connecting with capped, jittered backoff, losing and
//! regaining the engine, the event stream's own backoff, the watchdog.
//!
//! The connection's lifecycle is one state (`state.rs`); here is what each
//! of its changes means for the daemon: logs, `status`, metrics, a reconcile.

mod state;

use std::sync::Arc;

use tokio::time::Instant;

use crate::engine::{Engine, EngineResult};

use super::handler::lock;
use super::{Daemon, Trigger, events};

pub(super) use state::EngineLink;
use state::{EVENTS_RETRY_CAP, EventsEnded, Lost, RETRY_CAP, Wake};

impl<E, F, Fut> Daemon<E, F>
where
    E: Engine + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = EngineResult<E>> + Send + 'static,
{
    pub(super) fn start_connect(&mut self) {
        self.link.connect(|| tokio::spawn((self.connect)()));
        self.link_changed();
    }

    pub(super) fn on_link(&mut self, wake: Wake<E>) {
        match wake {
            Wake::Connected(Ok(engine)) => self.on_connected(engine),
            Wake::Connected(Err(e)) => {
                let why = e.to_string();
                let lost = self.link.attempt_failed(&why, Instant::now());
                self.on_lost(&why, lost);
            }
            Wake::EventsEnded(why) => self.on_events_ended(why),
            Wake::RetryDue => self.start_connect(),
        }
    }

    fn on_connected(&mut self, engine: E) {
        let engine = Arc::new(engine);
        // A large pull may put the disk under pressure: with `[storage]`,
        // answer it within seconds, not at the next tick.
        let shared = self.shared.clone();
        let on_pulled: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if lock(&shared.policy).storage.is_some() {
                let _ = shared.requests.try_send(Trigger::ImagesArrived);
            }
        });
        let watcher = tokio::spawn(events::watch(
            engine.clone(),
            self.marks.clone(),
            self.clock.clone(),
            on_pulled,
        ));
        // Only a real outage (or the start) is worth a reconcile: a
        // reconnect for a failed event stream, with the engine answering
        // all along, is not.
        self.note_engine(engine.as_ref());
        let outage = self.link.connected(engine, watcher, Instant::now());
        if outage {
            let (address, kind) = {
                let view = self.view();
                (view.engine.clone(), view.engine_kind.unwrap_or_default())
            };
            tracing::info!("engine {address} ({kind}) reachable");
        } else {
            tracing::debug!("engine connection re-established");
        }
        self.link_changed();
        if outage {
            // Whatever happened while it was away, look again.
            self.request(None);
        }
    }

    /// What differs on the engine just connected, for `status`, and said
    /// once in the log (again only when another kind of engine answers).
    fn note_engine(&self, engine: &E) {
        let kind = engine.kind();
        let policy = lock(&self.shared.policy).clone();
        let notes = crate::status::engine_notes(kind, engine.is_local(), &policy, None);
        let mut view = self.view();
        if view.engine_kind != Some(kind) {
            // The first says how names match (news, not trouble); the
            // others are what does not work as on Docker.
            for (i, n) in notes.iter().enumerate() {
                if i == 0 {
                    tracing::info!("{n}");
                } else {
                    tracing::warn!("{n}");
                }
            }
        }
        view.engine_kind = Some(kind);
        view.engine_notes = notes;
    }

    /// The engine is gone (a reconcile found it so): drop the connection,
    /// log the change once, retry with capped backoff.
    pub(super) fn engine_lost(&mut self, why: &str) {
        let lost = self.link.lost(why, Instant::now());
        self.on_lost(why, lost);
    }

    fn on_lost(&mut self, why: &str, lost: Lost) {
        if lost.news {
            tracing::warn!(
                "engine unreachable: {why}; retrying with backoff up to {}s (logged once until it is back)",
                RETRY_CAP.as_secs()
            );
            self.note_error(format!("engine unreachable: {why}"));
            self.notifier
                .status(&format!("engine unreachable: {why}; retrying"));
        } else {
            let delay = lost.delay;
            tracing::debug!("engine still unreachable: {why}; next attempt in {delay:?}");
        }
        self.link_changed();
    }

    fn on_events_ended(&mut self, why: Option<String>) {
        let why = why.unwrap_or_else(|| "the engine closed it".into());
        let ended = self
            .link
            .events_ended(Instant::now(), || tokio::spawn((self.connect)()));
        match ended {
            // It worked, then ended (an engine restart, most likely).
            // Reconnect at once: a reachable engine gets a new stream, and
            // one that went away is reported by the failed attempt.
            Some(EventsEnded::Reconnecting) => {
                tracing::debug!("engine event stream ended ({why}); reconnecting");
            }
            // Failing at once while the engine answers (e.g. a socket proxy
            // refusing `/events`): back off, and keep the engine for
            // reconciles meanwhile.
            Some(EventsEnded::Failing { news: true, .. }) => {
                tracing::warn!(
                    "engine event stream failed: {why}; container use and pulls are not recorded \
                     while it is down; retrying with backoff up to {}s (logged once until it works)",
                    EVENTS_RETRY_CAP.as_secs()
                );
                self.note_error(format!("engine event stream failed: {why}"));
            }
            Some(EventsEnded::Failing { news: false, delay }) => {
                tracing::debug!(
                    "engine event stream failed again: {why}; next attempt in {delay:?}"
                );
            }
            None => {}
        }
        self.link_changed();
    }

    /// Mirrors the link into what others read: the engine the control
    /// socket's `status` uses, the view and the reachability gauge.
    fn link_changed(&self) {
        *lock(&self.shared.engine) = self.link.engine().cloned();
        {
            let mut view = self.view();
            view.engine_reachable = self.link.reachable();
            view.engine_error = self.link.error().map(str::to_owned);
        }
        self.metrics.engine_reachable(self.link.reachable());
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
        if self.link.events_recovered(Instant::now()) {
            tracing::info!("engine event stream works again");
        }
    }
}
