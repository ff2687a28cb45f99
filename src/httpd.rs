//! The bounded HTTP/1 server loop that stowage's servers share (the metrics
//! endpoint, the content store's loopback registry): hyper, one request per
//! connection, a connection cap taken *before* `accept` (clients beyond it
//! wait in the kernel's queue, holding none of our descriptors), a deadline
//! on the request head and one on the whole connection (not a per-read
//! timeout a trickling client can renew), a bounded request buffer, accept
//! errors backed off, and a short drain at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What bounds one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For log lines: `metrics`, `content store`.
    pub name: &'static str,
    /// Connections served at once.
    pub connections: usize,
    /// The request head must arrive whole within this.
    pub header_timeout: Duration,
    /// A connection ends this long after it was accepted, whatever it is doing.
    pub deadline: Duration,
    /// Largest request head (hyper's minimum buffer is 8 KiB).
    pub max_request: usize,
    /// At shutdown, requests in flight get this long to finish.
    pub drain: Duration,
}

/// Serves `service` on `listener` within `limits` until `shutdown`, then
/// lets the requests in flight finish for up to `limits.drain`.
pub async fn serve<S, B>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    service: S,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Limits {
        name,
        connections,
        header_timeout,
        deadline,
        max_request,
        drain,
    } = limits;
    let slots = Arc::new(Semaphore::new(connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_request)
        .keep_alive(false)
        // As the server before hyper wrote them; clients may compare them so.
        .title_case_headers(true);
    let mut backoff = Duration::from_millis(10);
    loop {
        // A slot first, as mini-redis does: over the cap, connections wait
        // unaccepted instead of costing a descriptor each.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("{name}: accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let connection = graceful
            .watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            match tokio::time::timeout(deadline, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("{name} request: {e}"),
                Err(_) => tracing::debug!("{name} client dropped after {}s", deadline.as_secs()),
            }
            drop(permit);
        });
    }
    // New clients are refused from here on; those in flight may finish.
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("{name}: requests still running at shutdown abandoned");
    }
}
