//! Deadlines of engine calls: every call bounded whole, every next item of a
//! streamed answer bounded, and the calls in flight tracked for the daemon's
//! watchdog.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};

use super::DockerEngine;
use crate::engine::{EngineError, EngineResult, StuckCall};

/// How far past its deadline a call counts as stuck: the timer has fired by
/// then unless something blocks the runtime.
pub(super) const STUCK_SLACK: Duration = Duration::from_secs(5);

/// Engine calls in flight with their deadlines.
#[derive(Debug, Default)]
struct InFlight {
    next: u64,
    calls: HashMap<u64, (String, Instant)>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Calls(Arc<Mutex<InFlight>>);

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // Plain bookkeeping: a panic elsewhere does not make it wrong.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `call`, due within `within`; it is done when the guard drops.
    pub(super) fn start(&self, call: &str, within: Duration) -> CallGuard {
        let mut g = self.lock();
        let id = g.next;
        g.next += 1;
        g.calls
            .insert(id, (call.to_owned(), Instant::now() + within));
        CallGuard {
            calls: self.clone(),
            id,
        }
    }

    /// The call furthest past its deadline by more than `slack`.
    pub(super) fn overdue(&self, slack: Duration) -> Option<StuckCall> {
        let now = Instant::now();
        self.lock()
            .calls
            .values()
            .filter(|(_, due)| now > *due + slack)
            .min_by_key(|(_, due)| *due)
            .map(|(call, due)| StuckCall {
                call: call.clone(),
                overdue: now - *due,
            })
    }
}

/// One call in flight; dropping it (done, failed or cancelled) ends it.
pub(super) struct CallGuard {
    calls: Calls,
    id: u64,
}

impl CallGuard {
    /// A streamed answer delivered an item: the next is due within `within`.
    pub(super) fn renew(&self, within: Duration) {
        if let Some(c) = self.calls.lock().calls.get_mut(&self.id) {
            c.1 = Instant::now() + within;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls.lock().calls.remove(&self.id);
    }
}

impl DockerEngine {
    pub(super) fn timed_out(call: &str, after: Duration) -> EngineError {
        EngineError::Timeout {
            call: call.to_owned(),
            after,
        }
    }

    /// Runs one whole call (answer body included) within `within`.
    pub(super) async fn bounded<T>(
        &self,
        call: &str,
        within: Duration,
        fut: impl Future<Output = EngineResult<T>>,
    ) -> EngineResult<T> {
        let _in_flight = self.calls.start(call, within);
        tokio::time::timeout(within, fut)
            .await
            .unwrap_or_else(|_| Err(Self::timed_out(call, within)))
    }

    /// The next item of a streamed answer, due within `within`.
    pub(super) async fn next_within<S: Stream + Unpin>(
        stream: &mut S,
        guard: &CallGuard,
        call: &str,
        within: Duration,
    ) -> EngineResult<Option<S::Item>> {
        guard.renew(within);
        tokio::time::timeout(within, stream.next())
            .await
            .map_err(|_| Self::timed_out(call, within))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_past_its_deadline_is_stuck_until_it_ends() {
        let calls = Calls::default();
        let late = calls.start("list images", Duration::ZERO);
        let _fine = calls.start("remove a:1", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        let stuck = calls.overdue(Duration::ZERO).expect("one call is overdue");
        assert_eq!(stuck.call, "list images");
        assert!(calls.overdue(Duration::from_secs(3600)).is_none());
        // A streamed answer that delivered an item is due again later.
        late.renew(Duration::from_secs(3600));
        assert!(calls.overdue(Duration::ZERO).is_none());
        drop(late);
        assert_eq!(calls.lock().calls.len(), 1);
    }

    #[test]
    fn timeout_names_the_call_and_its_deadline() {
        let e = DockerEngine::timed_out("list images", Duration::from_secs(120));
        assert_eq!(
            e.to_string(),
            "the Docker engine did not finish `list images` within 2m"
        );
    }
}
