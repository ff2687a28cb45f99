//! The engine connection's lifecycle as one [`Link`] state, changed only by
//! the transitions of [`EngineLink`]. No logging or I/O here: the daemon's
//! part (the parent module) says what each change means.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::jittered;
use crate::engine::{EngineError, EngineResult};

/// First retry after the engine is lost; doubles up to [`RETRY_CAP`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two connection attempts.
pub(super) const RETRY_CAP: Duration = Duration::from_secs(10);
/// An event stream that lived this long was working: its end (an engine
/// restart) is followed by an immediate reconnect. Shorter-lived ones are
/// failing and back off.
const EVENTS_HEALTHY: Duration = Duration::from_secs(10);
/// First retry of a failing event stream; doubles up to [`EVENTS_RETRY_CAP`].
const EVENTS_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts at a failing event stream: activity
/// is not recorded meanwhile, so not much longer.
pub(super) const EVENTS_RETRY_CAP: Duration = Duration::from_secs(60);

/// A connection attempt in flight.
type Attempt<E> = JoinHandle<EngineResult<E>>;
/// The event watcher; its result says why the stream ended.
type Watcher = JoinHandle<Option<String>>;

/// Where the engine connection is. At most one task (an attempt or a
/// watcher) and at most one timer exist, by construction: a retry cannot
/// be scheduled beside an attempt, nor a second watcher beside the first.
enum Link<E> {
    /// Before the first attempt.
    Idle,
    /// A connection attempt in flight; `after` is what it follows.
    Connecting {
        attempt: Attempt<E>,
        after: After<E>,
    },
    /// Connected, the event watcher running since `since`.
    Up {
        engine: Arc<E>,
        events: Watcher,
        since: Instant,
    },
    /// Connected, but the event stream failed soon after it started (e.g.
    /// a socket proxy refusing `/events`): a new connection at `next_at`,
    /// and the engine serves reconciles meanwhile.
    EventsDown { engine: Arc<E>, next_at: Instant },
    /// No engine: `error` says why, the next attempt is at `next_at`.
    Down { error: String, next_at: Instant },
}

/// What a connection attempt follows: whether its success ends an outage
/// (worth a reconcile) and whether its failure is news (logged once).
enum After<E> {
    /// The daemon's start.
    Start,
    /// The engine answered: a working event stream ended (`keep` is `None`:
    /// reconcile only on the new connection), or a failing one is tried
    /// again (`keep`: the engine, still serving reconciles meanwhile).
    Up { keep: Option<Arc<E>> },
    /// An outage, with its last error.
    Down { error: String },
}

/// What woke the loop about the link.
pub(in crate::daemon) enum Wake<E> {
    /// The attempt in flight finished.
    Connected(EngineResult<E>),
    /// The event watcher ended, saying why when it knows.
    EventsEnded(Option<String>),
    /// The time of the next attempt has come.
    RetryDue,
}

/// The engine was lost (or an attempt failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lost {
    /// The engine answered (or nobody knew yet) until now: log it, once.
    pub(super) news: bool,
    /// The wait before the next attempt, before jitter.
    pub(super) delay: Duration,
}

/// What the end of an event stream leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventsEnded {
    /// It had worked (an engine restart, most likely): reconnecting now.
    Reconnecting,
    /// It failed soon after it started: tried again after `delay` (before
    /// jitter); `news` when it worked until now.
    Failing { news: bool, delay: Duration },
}

/// A delay that doubles up to a cap.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    const fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The delay to wait now; the one after is twice as long, capped.
    fn take(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.cap);
        delay
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// The engine connection: its [`Link`] state and the two backoffs.
pub(in crate::daemon) struct EngineLink<E> {
    state: Link<E>,
    retry: Backoff,
    events_retry: Backoff,
    /// The event stream is failing (logged once until it works again).
    events_failing: bool,
}

impl<E> EngineLink<E> {
    pub(in crate::daemon) fn new() -> Self {
        EngineLink {
            state: Link::Idle,
            retry: Backoff::new(RETRY_FIRST, RETRY_CAP),
            events_retry: Backoff::new(EVENTS_RETRY_FIRST, EVENTS_RETRY_CAP),
            events_failing: false,
        }
    }

    /// The engine reconciles and `status` may use now.
    pub(in crate::daemon) fn engine(&self) -> Option<&Arc<E>> {
        match &self.state {
            Link::Up { engine, .. }
            | Link::EventsDown { engine, .. }
            | Link::Connecting {
                after: After::Up { keep: Some(engine) },
                ..
            } => Some(engine),
            _ => None,
        }
    }

    /// Reachability as last known: an attempt after a working connection
    /// keeps it until it fails.
    pub(super) fn reachable(&self) -> bool {
        matches!(
            self.state,
            Link::Up { .. }
                | Link::EventsDown { .. }
                | Link::Connecting {
                    after: After::Up { .. },
                    ..
                }
        )
    }

    /// Why the engine is unreachable, while it is.
    pub(super) fn error(&self) -> Option<&str> {
        match &self.state {
            Link::Down { error, .. }
            | Link::Connecting {
                after: After::Down { error },
                ..
            } => Some(error),
            _ => None,
        }
    }

    /// Waits for what the state waits for; pending forever when idle. Cancel
    /// safe, for a `select!`; the caller must then apply the matching
    /// transition (a finished task is not awaited twice).
    pub(in crate::daemon) async fn wait(&mut self) -> Wake<E> {
        match &mut self.state {
            Link::Connecting { attempt, .. } => Wake::Connected(match attempt.await {
                Ok(result) => result,
                Err(_) => Err(EngineError::Other("the connection attempt panicked".into())),
            }),
            Link::Up { events, .. } => Wake::EventsEnded(events.await.ok().flatten()),
            Link::Down { next_at, .. } | Link::EventsDown { next_at, .. } => {
                tokio::time::sleep_until(*next_at).await;
                Wake::RetryDue
            }
            Link::Idle => std::future::pending().await,
        }
    }

    /// Starts an attempt unless one is in flight or the engine is up:
    /// `Idle`, `Down` and `EventsDown` become `Connecting`.
    pub(super) fn connect(&mut self, spawn: impl FnOnce() -> Attempt<E>) {
        let after = match std::mem::replace(&mut self.state, Link::Idle) {
            Link::Idle => After::Start,
            Link::Down { error, .. } => After::Down { error },
            Link::EventsDown { engine, .. } => After::Up { keep: Some(engine) },
            other => {
                self.state = other;
                return;
            }
        };
        self.state = Link::Connecting {
            attempt: spawn(),
            after,
        };
    }

    /// The attempt succeeded: `Up`, with `events` watching the new engine.
    /// True when this ends an outage (or is the first connection): look again.
    pub(super) fn connected(&mut self, engine: Arc<E>, events: Watcher, at: Instant) -> bool {
        let outage = !self.reachable();
        self.abort_tasks();
        self.retry.reset();
        self.state = Link::Up {
            engine,
            events,
            since: at,
        };
        outage
    }

    /// The attempt in flight failed: `Down` until the next attempt.
    pub(super) fn attempt_failed(&mut self, why: &str, at: Instant) -> Lost {
        let lost = Lost {
            news: self.error().is_none(),
            delay: self.retry.take(),
        };
        self.abort_tasks();
        self.state = Link::Down {
            error: why.to_owned(),
            next_at: at + jittered(lost.delay),
        };
        lost
    }

    /// Something else (a reconcile) found the engine gone: `Down`, or, with
    /// an attempt in flight, `Connecting` after an outage (the attempt
    /// decides what comes next).
    pub(super) fn lost(&mut self, why: &str, at: Instant) -> Lost {
        match std::mem::replace(&mut self.state, Link::Idle) {
            Link::Connecting { attempt, after } => {
                let news = !matches!(after, After::Down { .. });
                self.state = Link::Connecting {
                    attempt,
                    after: After::Down {
                        error: why.to_owned(),
                    },
                };
                Lost {
                    news,
                    delay: self.retry.take(),
                }
            }
            other => {
                self.state = other;
                self.attempt_failed(why, at)
            }
        }
    }

    /// The event watcher ended (only `Up` has one; `None` in any other
    /// state, which is left as it is). A stream that had
    /// worked reconnects at once (`Connecting`, the engine no longer used);
    /// one that failed soon after it started is tried again with its own
    /// backoff (`EventsDown`, the engine still used).
    pub(super) fn events_ended(
        &mut self,
        at: Instant,
        spawn: impl FnOnce() -> Attempt<E>,
    ) -> Option<EventsEnded> {
        let (engine, since) = match std::mem::replace(&mut self.state, Link::Idle) {
            Link::Up { engine, since, .. } => (engine, since),
            other => {
                self.state = other;
                return None;
            }
        };
        if at.duration_since(since) >= EVENTS_HEALTHY {
            self.events_retry.reset();
            self.state = Link::Connecting {
                attempt: spawn(),
                after: After::Up { keep: None },
            };
            return Some(EventsEnded::Reconnecting);
        }
        let news = !self.events_failing;
        self.events_failing = true;
        let delay = self.events_retry.take();
        self.state = Link::EventsDown {
            engine,
            next_at: at + jittered(delay),
        };
        Some(EventsEnded::Failing { news, delay })
    }

    /// True once, when a failing event stream has now worked for long
    /// enough: its backoff starts over.
    pub(super) fn events_recovered(&mut self, at: Instant) -> bool {
        let working = matches!(self.state, Link::Up { since, .. } if at.duration_since(since) >= EVENTS_HEALTHY);
        if self.events_failing && working {
            self.events_failing = false;
            self.events_retry.reset();
            return true;
        }
        false
    }

    /// Shutdown: no attempt or watcher outlives the loop.
    pub(in crate::daemon) fn close(&mut self) {
        self.abort_tasks();
        self.state = Link::Idle;
    }

    fn abort_tasks(&self) {
        match &self.state {
            Link::Connecting { attempt, .. } => attempt.abort(),
            Link::Up { events, .. } => events.abort(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link's engine type does not matter to its transitions.
    type Test = EngineLink<&'static str>;

    fn attempt() -> Attempt<&'static str> {
        tokio::spawn(std::future::pending())
    }

    fn watcher() -> Watcher {
        tokio::spawn(std::future::pending())
    }

    fn never() -> Attempt<&'static str> {
        panic!("no attempt may start here")
    }

    fn kind(link: &Test) -> &'static str {
        match &link.state {
            Link::Idle => "idle",
            Link::Connecting {
                after: After::Start,
                ..
            } => "connecting after start",
            Link::Connecting {
                after: After::Up { keep: None },
                ..
            } => "connecting after up",
            Link::Connecting {
                after: After::Up { keep: Some(_) },
                ..
            } => "connecting after up, engine kept",
            Link::Connecting {
                after: After::Down { .. },
                ..
            } => "connecting after down",
            Link::Up { .. } => "up",
            Link::EventsDown { .. } => "events down",
            Link::Down { .. } => "down",
        }
    }

    fn next_at(link: &Test) -> Instant {
        match &link.state {
            Link::Down { next_at, .. } | Link::EventsDown { next_at, .. } => *next_at,
            _ => panic!("no retry scheduled in {}", kind(link)),
        }
    }

    #[tokio::test]
    async fn attempts_back_off_doubling_to_the_cap_and_log_only_the_first_failure() {
        let mut link = Test::new();
        assert_eq!(kind(&link), "idle");
        assert!(!link.reachable() && link.engine().is_none() && link.error().is_none());
        link.connect(attempt);
        assert_eq!(kind(&link), "connecting after start");
        // One attempt at a time.
        link.connect(never);

        let now = Instant::now();
        let mut delays = Vec::new();
        for n in 0..6 {
            let lost = link.attempt_failed("refused", now);
            assert_eq!(lost.news, n == 0, "only the first failure is news");
            assert_eq!(kind(&link), "down");
            assert_eq!(link.error(), Some("refused"));
            let wait = next_at(&link) - now;
            assert!(wait >= lost.delay / 2 && wait <= lost.delay, "{wait:?}");
            delays.push(lost.delay.as_secs());
            link.connect(attempt);
            assert_eq!(kind(&link), "connecting after down");
            assert_eq!(link.error(), Some("refused"), "still unreachable meanwhile");
        }
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);

        assert!(
            link.connected(Arc::new("engine"), watcher(), now),
            "the end of an outage"
        );
        assert_eq!(kind(&link), "up");
        assert!(link.reachable() && link.error().is_none());
        assert_eq!(link.engine().map(|e| **e), Some("engine"));
        // Up: no attempt starts beside the connection.
        link.connect(never);
        assert_eq!(kind(&link), "up");
        // The backoff starts over, and losing it again is news.
        let lost = link.lost("gone", now);
        assert_eq!((lost.news, lost.delay.as_secs()), (true, 1));
        assert_eq!(kind(&link), "down");
    }

    #[tokio::test]
    async fn the_first_connection_is_worth_a_reconcile() {
        let mut link = Test::new();
        link.connect(attempt);
        assert!(link.connected(Arc::new("engine"), watcher(), Instant::now()));
    }

    #[tokio::test]
    async fn a_loss_reported_during_an_attempt_keeps_the_attempt() {
        let mut link = Test::new();
        link.connect(attempt);
        let now = Instant::now();
        assert!(link.connected(Arc::new("engine"), watcher(), now));
        // A working stream ended: reconnecting, the engine not used meanwhile.
        let later = now + EVENTS_HEALTHY;
        assert_eq!(
            link.events_ended(later, attempt),
            Some(EventsEnded::Reconnecting)
        );
        assert_eq!(kind(&link), "connecting after up");
        assert!(link.reachable() && link.engine().is_none());
        // Then a reconcile finds the engine gone while the attempt runs.
        let lost = link.lost("refused", later);
        assert!(lost.news);
        assert_eq!(kind(&link), "connecting after down");
        assert!(!link.reachable());
        assert_eq!(link.error(), Some("refused"));
        assert!(!link.lost("refused", later).news, "said once");
        // The attempt decides: its success ends the outage.
        assert!(link.connected(Arc::new("engine"), watcher(), later));
    }

    #[tokio::test]
    async fn a_working_stream_that_ends_reconnects_without_an_outage() {
        let mut link = Test::new();
        link.connect(attempt);
        let now = Instant::now();
        link.connected(Arc::new("old"), watcher(), now);
        let later = now + EVENTS_HEALTHY + Duration::from_secs(1);
        assert_eq!(
            link.events_ended(later, attempt),
            Some(EventsEnded::Reconnecting)
        );
        assert!(
            !link.connected(Arc::new("new"), watcher(), later),
            "no outage"
        );
        assert_eq!(link.engine().map(|e| **e), Some("new"));
    }

    #[tokio::test]
    async fn a_failing_stream_backs_off_on_its_own_and_keeps_the_engine() {
        let mut link = Test::new();
        link.connect(attempt);
        let now = Instant::now();
        link.connected(Arc::new("engine"), watcher(), now);
        let mut delays = Vec::new();
        for n in 0..8 {
            let ended = link.events_ended(now, never);
            let Some(EventsEnded::Failing { news, delay }) = ended else {
                panic!("{ended:?}")
            };
            assert_eq!(news, n == 0, "logged once until it works");
            delays.push(delay.as_secs());
            assert_eq!(kind(&link), "events down");
            assert!(link.reachable() && link.engine().is_some(), "still usable");
            let wait = next_at(&link) - now;
            assert!(wait >= delay / 2 && wait <= delay, "{wait:?}");
            link.connect(attempt);
            assert_eq!(kind(&link), "connecting after up, engine kept");
            assert!(link.engine().is_some(), "reconciles go on meanwhile");
            assert!(
                !link.connected(Arc::new("engine"), watcher(), now),
                "no outage"
            );
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert!(!link.events_recovered(now + EVENTS_HEALTHY / 2), "too soon");
        assert!(link.events_recovered(now + EVENTS_HEALTHY));
        assert!(!link.events_recovered(now + EVENTS_HEALTHY), "said once");
        let ended = link.events_ended(now, never);
        assert_eq!(
            ended,
            Some(EventsEnded::Failing {
                news: true,
                delay: EVENTS_RETRY_FIRST
            }),
            "the backoff starts over"
        );
    }

    #[tokio::test]
    async fn losing_a_connection_stops_its_watcher() {
        let mut link = Test::new();
        link.connect(attempt);
        let now = Instant::now();
        let events = watcher();
        let abort = events.abort_handle();
        link.connected(Arc::new("engine"), events, now);
        let lost = link.lost("refused", now);
        assert!(lost.news);
        assert_eq!(kind(&link), "down");
        assert!(link.engine().is_none() && !link.reachable());
        tokio::task::yield_now().await;
        assert!(
            abort.is_finished(),
            "an old watcher would count events twice"
        );
        // Without a watcher there is no stream to end.
        assert_eq!(link.events_ended(now, never), None);
        assert_eq!(kind(&link), "down");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_yields_what_each_state_waits_for() {
        let mut link = Test::new();
        let idle = tokio::time::timeout(Duration::from_secs(3600), link.wait()).await;
        assert!(idle.is_err(), "idle waits for nothing");

        link.connect(|| tokio::spawn(async { Err(EngineError::Other("refused".into())) }));
        let Wake::Connected(Err(e)) = link.wait().await else {
            panic!("the attempt's result")
        };
        let start = Instant::now();
        link.attempt_failed(&e.to_string(), start);
        assert!(matches!(link.wait().await, Wake::RetryDue));
        assert!(Instant::now() >= next_at(&link));

        link.connect(|| tokio::spawn(async { Ok("engine") }));
        let Wake::Connected(Ok(engine)) = link.wait().await else {
            panic!("the attempt's result")
        };
        let events = tokio::spawn(async { Some("closed".to_owned()) });
        link.connected(Arc::new(engine), events, Instant::now());
        let Wake::EventsEnded(why) = link.wait().await else {
            panic!("the watcher's end")
        };
        assert_eq!(why.as_deref(), Some("closed"));

        link.connect(attempt);
        link.close();
        assert_eq!(kind(&link), "idle");
    }
}
