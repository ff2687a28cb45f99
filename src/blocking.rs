//! Blocking work off the async threads. `stowage run` drives its loop, the
//! control socket and the metrics endpoint on one thread (a current-thread
//! runtime): CPU work on a large store (the planner, state parsing and
//! serialising) and fsyncs must not run there, or nothing answers meanwhile.

/// Runs `work` on tokio's blocking pool and waits for it without blocking
/// the caller's thread. A panic in `work` is resumed here, as if it had run
/// inline.
pub async fn off_loop<T, F>(work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only when the runtime shuts down before the work started.
            Err(e) => panic!("blocking work was cancelled: {e}"),
        },
    }
}
