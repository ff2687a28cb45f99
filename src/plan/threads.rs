//! The planner's second thread: work beside the main line on large stores,
//! the same result either way.

/// `f` on a second thread, when `on` and a thread can be had.
pub(super) fn beside<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    on: bool,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Option<std::thread::ScopedJoinHandle<'scope, T>> {
    on.then(|| {
        std::thread::Builder::new()
            .name("stowage-plan".into())
            .spawn_scoped(scope, f)
            .ok()
    })
    .flatten()
}

/// The result of a thread, or its panic passed on.
pub(super) fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `(0..n).map(f)`, in two halves on two threads when `n` is large: for
/// building the strings of a plan, which at 100k references is much of its
/// time. Same result in the same order either way.
pub(super) fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if n < PARALLEL_FROM {
        return (0..n).map(&f).collect();
    }
    let mid = n / 2;
    std::thread::scope(|scope| {
        let f = &f;
        let upper = beside(scope, true, move || (mid..n).map(f).collect::<Vec<T>>());
        let mut out: Vec<T> = Vec::with_capacity(n);
        out.extend((0..mid).map(f));
        match upper {
            Some(handle) => out.extend(join(handle)),
            None => out.extend((mid..n).map(f)),
        }
        out
    })
}

/// `(0..n).map(f)` for a few tasks of uneven size: with `parallel`, two
/// threads each take the next task until none is left. Same result in the
/// same order either way.
pub(super) fn parallel_tasks<T: Send>(
    n: usize,
    parallel: bool,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    if !parallel || n < 2 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= n {
                return done;
            }
            done.push((k, f(k)));
        }
    };
    let mut done = std::thread::scope(|scope| {
        let other = beside(scope, true, work);
        // Should the thread not start, this one takes every task.
        let mut done = work();
        if let Some(handle) = other {
            done.extend(join(handle));
        }
        done
    });
    done.sort_unstable_by_key(|(k, _)| *k);
    done.into_iter().map(|(_, t)| t).collect()
}

/// Images (for `parallel_map`: items) from which a second thread pays for
/// itself.
pub(crate) const PARALLEL_FROM: usize = 4096;
