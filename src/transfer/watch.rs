//! The stall watchdog: a transfer is abandoned when the engine reports no
//! progress for `stall_timeout`, or at once at shutdown.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::TransferError;
use crate::engine::{EngineError, Progress};

/// Progress bookkeeping shared by a transfer and its watchdog.
pub(super) struct Watch {
    inner: Mutex<(Instant, Option<String>)>,
}

impl Watch {
    pub(super) fn new() -> Self {
        Watch {
            inner: Mutex::new((Instant::now(), None)),
        }
    }

    pub(super) fn saw(&self, p: &Progress) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The engine's own retry countdown ("Retrying in 5 seconds") is not
        // progress: a transfer cut again and again must still time out.
        if !p.status.starts_with("Retrying") {
            g.0 = Instant::now();
        }
        g.1 = Some(p.status.clone());
    }

    fn idle(&self) -> (Duration, Option<String>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.elapsed(), g.1.clone())
    }
}

/// Drive `fut` while no-progress stays under `stall` and `shutdown` is not
/// cancelled; dropping the future closes the request, which makes the engine
/// cancel the transfer.
pub(super) async fn watched<F>(
    fut: F,
    watch: &Watch,
    stall: Duration,
    shutdown: &CancellationToken,
) -> Result<(), TransferError>
where
    F: std::future::Future<Output = Result<(), EngineError>>,
{
    let tick = (stall / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    tokio::pin!(fut);
    loop {
        tokio::select! {
            res = &mut fut => return res.map_err(TransferError::from),
            () = shutdown.cancelled() => return Err(TransferError::Interrupted),
            () = tokio::time::sleep(tick) => {
                let (idle, last) = watch.idle();
                if idle >= stall {
                    return Err(TransferError::Stalled { after: stall, last });
                }
            }
        }
    }
}
