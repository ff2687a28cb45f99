//! The daemon loop on the in-memory engine, under paused tokio time: the
//! coalescing of triggers, debouncing of policy-folder noise, reloads that
//! keep the old policy when the new one is invalid, an engine that is down
//! at start, and shutdown during a reconcile. The real binary against a real
//! engine is `tests/it/daemon_real.rs`.

use crate::fake_store;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stowage::daemon::control::{self, Request, Response};
use stowage::daemon::metrics::Metrics;
use stowage::daemon::notify::Notifier;
use stowage::daemon::{self, Config, DaemonError, Trigger};
use stowage::engine::EngineError;
use stowage::engine::fake::FakeEngine;
use stowage::policy;
use stowage::reconcile::SystemClock;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Every image listing of the fake engine takes this long, so a reconcile
/// (observe + the listing for the metrics) takes twice that.
const LIST: Duration = Duration::from_secs(10);

fn write_policy(dir: &Path, watch: bool, keep_last: usize) {
    let text = format!(
        r#"version = 1
[daemon]
# Never due during a test: the loop re-reads the wall clock, which paused
# tokio time does not move.
schedule = "0 0 0 1 1 * 2099"
watch = {watch}
state_dir = "{d}/state"
control_socket = "{d}/control.sock"

[[retain]]
name = "app"
images = ["app"]
keep_last = {keep_last}
"#,
        d = dir.display()
    );
    std::fs::write(dir.join("policy.toml"), text).unwrap();
}

fn fake() -> FakeEngine {
    let engine = FakeEngine::new(
        vec![
            fake_store::img("a1", 30.0, &["app:1"]),
            fake_store::img("a2", 20.0, &["app:2"]),
            fake_store::img("a3", 10.0, &["app:3"]),
        ],
        vec![],
    );
    engine.set_list_delay(LIST);
    engine
}

struct Harness {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    triggers: mpsc::Sender<Trigger>,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl Harness {
    /// Starts the daemon; `connect_failures` connection attempts fail first.
    fn start(watch: bool, connect_failures: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        write_policy(&path, watch, 2);
        let policy = policy::load(&path.join("policy.toml")).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (triggers, rx) = mpsc::channel(64);
        let (stop, stopped) = oneshot::channel::<()>();
        let config = Config {
            policy,
            engine_address: "fake".into(),
            clock: Arc::new(SystemClock),
            notifier: Notifier::disabled(),
            metrics: metrics.clone(),
            remote: None,
        };
        let attempts = Arc::new(AtomicUsize::new(0));
        let connect = move || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < connect_failures {
                    Err(EngineError::Unreachable {
                        address: "fake".into(),
                        message: format!("down (attempt {})", n + 1),
                    })
                } else {
                    Ok(fake())
                }
            }
        };
        let task = tokio::spawn(daemon::run(config, connect, rx, async {
            let _ = stopped.await;
        }));
        Harness {
            _dir: dir,
            dir: path,
            triggers,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    fn reconciles(&self) -> u64 {
        self.metrics.reconciles()
    }

    async fn status(&self) -> stowage::status::DaemonStatus {
        match control::request(&self.dir.join("control.sock"), &Request::Status)
            .await
            .unwrap()
        {
            Response::Status { daemon, .. } => *daemon,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn advance(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn triggers_during_a_reconcile_coalesce_into_exactly_one_more() {
    let h = Harness::start(false, 0);
    advance(1).await;
    // The first reconcile (at start) is running now.
    assert_eq!(h.reconciles(), 0);
    for _ in 0..5 {
        h.triggers.send(Trigger::Reconcile).await.unwrap();
    }
    let (tx, rx) = oneshot::channel();
    h.triggers
        .send(Trigger::ReconcileAndReply(tx))
        .await
        .unwrap();
    for _ in 0..5 {
        h.triggers.send(Trigger::Reload).await.unwrap();
    }
    // The waiter is answered by the reconcile that started after its request.
    let result = rx.await.unwrap();
    assert_eq!(h.reconciles(), 2, "{result:?}");
    assert!(result.error.is_none(), "{result:?}");
    advance(300).await;
    assert_eq!(h.reconciles(), 2, "eleven triggers, one more reconcile");

    // Idle again: one trigger, one reconcile.
    h.triggers.send(Trigger::Reconcile).await.unwrap();
    advance(100).await;
    assert_eq!(h.reconciles(), 3);
    let status = h.status().await;
    assert_eq!(status.reconciles, 3);
    assert!(!status.reconciling && !status.reconcile_pending);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn policy_folder_noise_is_debounced_and_unchanged_content_ignored() {
    let h = Harness::start(true, 0);
    advance(60).await;
    assert_eq!(h.reconciles(), 1);
    // Touches without a content change (e.g. another file in the folder).
    for _ in 0..10 {
        h.triggers.send(Trigger::PolicyTouched).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    advance(60).await;
    assert_eq!(h.reconciles(), 1, "no reload, no reconcile");

    // An edit written in several steps: one reload, one reconcile.
    write_policy(&h.dir, true, 1);
    for _ in 0..5 {
        h.triggers.send(Trigger::PolicyTouched).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    advance(60).await;
    assert_eq!(h.reconciles(), 2);
    let status = h.status().await;
    assert!(status.reload_error.is_none());

    // A broken edit: rejected, the old policy stays, no reconcile.
    std::fs::write(
        h.dir.join("policy.toml"),
        "version = 1\n[daemon]\nwatch = maybe\n",
    )
    .unwrap();
    h.triggers.send(Trigger::PolicyTouched).await.unwrap();
    advance(60).await;
    assert_eq!(h.reconciles(), 2);
    let status = h.status().await;
    let err = status.reload_error.expect("reload error reported");
    assert!(err.message.contains("policy.toml:3:"), "{}", err.message);
    assert!(
        status.policy_summary.contains("1 retain"),
        "{}",
        status.policy_summary
    );
    assert!(
        h.metrics
            .render()
            .contains("stowage_policy_reload_errors_total 1\n")
    );
    // The old policy is still used: a reconcile runs fine.
    h.triggers.send(Trigger::Reconcile).await.unwrap();
    advance(60).await;
    assert_eq!(h.reconciles(), 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn watch_false_ignores_folder_changes_but_sighup_reloads() {
    let h = Harness::start(false, 0);
    advance(60).await;
    write_policy(&h.dir, false, 1);
    h.triggers.send(Trigger::PolicyTouched).await.unwrap();
    advance(60).await;
    assert_eq!(h.reconciles(), 1);
    h.triggers.send(Trigger::Reload).await.unwrap();
    advance(60).await;
    assert_eq!(h.reconciles(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn engine_down_at_start_is_retried_with_backoff_then_reconciled() {
    let h = Harness::start(false, 3);
    advance(2).await;
    let status = h.status().await;
    assert!(!status.engine_reachable);
    assert!(status.engine_error.as_deref().unwrap().contains("down"));
    assert!(
        status.reconcile_pending,
        "the start reconcile waits for the engine"
    );
    assert!(h.metrics.render().contains("stowage_engine_reachable 0\n"));
    // A control request while the engine is down is answered once it is back.
    let (tx, rx) = oneshot::channel();
    h.triggers
        .send(Trigger::ReconcileAndReply(tx))
        .await
        .unwrap();
    // Attempts at 0, 1 s, 3 s fail; the one at 7 s succeeds.
    let result = rx.await.unwrap();
    assert!(result.error.is_none(), "{result:?}");
    assert_eq!(
        h.reconciles(),
        1,
        "one reconcile for the start and the request"
    );
    assert!(h.metrics.render().contains("stowage_engine_reachable 1\n"));
    let status = h.status().await;
    assert!(status.engine_reachable);
    assert_eq!(
        status.errors.len(),
        1,
        "unreachable noted once: {:?}",
        status.errors
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_the_reconcile_in_flight() {
    let h = Harness::start(false, 0);
    // Observing takes 10 s; stop in the middle (the grace is 8 s).
    advance(5).await;
    assert_eq!(h.reconciles(), 0);
    let metrics = h.metrics.clone();
    let started = tokio::time::Instant::now();
    h.stop().await;
    // The running reconcile finished (and was counted) before the exit.
    assert_eq!(metrics.reconciles(), 1);
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_reload_refuses_what_a_start_refuses() {
    let h = Harness::start(false, 0);
    advance(60).await;
    assert_eq!(h.reconciles(), 1);
    // Valid TOML but for one Latin-1 byte in a comment: reloads used to
    // repair it (U+FFFD) and accept a file the next start rejects.
    let path = h.dir.join("policy.toml");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"# caf\xe9\n");
    std::fs::write(&path, &bytes).unwrap();
    let at_start = policy::load(&path).unwrap_err().to_string();
    assert!(at_start.contains("not UTF-8"), "{at_start}");

    h.triggers.send(Trigger::Reload).await.unwrap();
    advance(60).await;
    let status = h.status().await;
    let err = status.reload_error.expect("the reload is refused");
    assert_eq!(err.message.trim(), at_start.trim());
    assert_eq!(h.reconciles(), 1, "a refused reload reconciles nothing");
    h.stop().await;
}
