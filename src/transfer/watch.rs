//! The engine's progress reports: the stall watchdog (a transfer is
//! abandoned when the engine reports no progress for `stall_timeout`, or at
//! once at shutdown) and what they say came over the network.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{PullProgress, TransferError};
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

/// What an engine pull's progress says was downloaded: per layer, the
/// largest `Downloading` count, the whole layer once `Download complete`
/// (a layer that "Already exists" moved nothing). An estimate: the engine
/// reports compressed bytes per layer, not the manifest and config.
#[derive(Debug, Default)]
pub(super) struct Downloads {
    /// Layer id -> (bytes so far, size when known).
    layers: BTreeMap<String, (u64, Option<u64>)>,
}

impl Downloads {
    pub(super) fn saw(&mut self, p: &Progress) {
        let Some(id) = &p.id else { return };
        match p.status.as_str() {
            "Downloading" => {
                let e = self.layers.entry(id.clone()).or_default();
                e.0 = e.0.max(p.current.unwrap_or(0));
                e.1 = p.total.or(e.1);
            }
            "Download complete" => {
                if let Some(e) = self.layers.get_mut(id) {
                    e.0 = e.1.unwrap_or(e.0).max(e.0);
                }
            }
            _ => {}
        }
    }

    /// Bytes received so far.
    pub(super) fn received(&self) -> u64 {
        self.layers.values().map(|(n, _)| n).sum()
    }

    /// For a progress line: received so far of the layers' known sizes.
    pub(super) fn progress(&self) -> PullProgress {
        PullProgress {
            done: self.received(),
            total: Some(self.layers.values().map(|(n, t)| t.unwrap_or(*n)).sum()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, status: &str, current: Option<u64>, total: Option<u64>) -> Progress {
        Progress {
            id: Some(id.into()),
            status: status.into(),
            current,
            total,
        }
    }

    #[test]
    fn downloads_count_layer_bytes_received_once() {
        let mut d = Downloads::default();
        d.saw(&p("a", "Pulling fs layer", None, None));
        d.saw(&p("b", "Already exists", None, None));
        d.saw(&p("a", "Downloading", Some(400), Some(1000)));
        d.saw(&p("a", "Downloading", Some(900), Some(1000)));
        assert_eq!(
            d.progress(),
            PullProgress {
                done: 900,
                total: Some(1000)
            }
        );
        d.saw(&p("a", "Download complete", None, None));
        // Extraction counts are not network bytes.
        d.saw(&p("a", "Extracting", Some(5000), Some(5000)));
        assert_eq!(d.received(), 1000);
    }
}
