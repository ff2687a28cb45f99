//! The daemon on a registry policy (issue 16): the fake engine, the real
//! private registry, real time (`policy_poll = "1s"`). A new policy is
//! applied as a reload, an invalid or older one is refused (status, audit
//! `warn`) and the one in force stays, the last good one is kept, the
//! metrics show the digest.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use stowage::daemon::control::{self, Request, Response};
use stowage::daemon::metrics::Metrics;
use stowage::daemon::notify::Notifier;
use stowage::daemon::{self, Config, Remote};
use stowage::engine::fake::FakeEngine;
use stowage::fleet::poll::{self, Poller};
use stowage::fleet::{PolicyRef, PublicKey};
use stowage::reconcile::SystemClock;
use stowage::status::DaemonStatus;

use crate::fake_store;
use crate::policy_oci::{KEY_A, PUB_A, client, policy_text, publish, reference};

fn daemon_part(dir: &Path) -> String {
    format!(
        "schedule = \"0 0 0 1 1 * 2099\"\ncontrol_socket = \"{}/control.sock\"",
        dir.display()
    )
}

/// The daemon's status; `None` while its socket is not bound yet.
async fn status(dir: &Path) -> Option<DaemonStatus> {
    match control::request(&dir.join("control.sock"), &Request::Status).await {
        Ok(Response::Status { daemon, .. }) => Some(*daemon),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(control::ClientError::NoDaemon { .. }) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Polls `cond` on the daemon's status for up to 20 s.
async fn until(dir: &Path, what: &str, cond: impl Fn(&DaemonStatus) -> bool) -> DaemonStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(dir).await;
        if let Some(s) = s.as_ref().filter(|s| cond(s)) {
            return s.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
    metrics: Arc<Metrics>,
}

async fn start(r: &PolicyRef, dir: &Path, key: Option<&str>) -> Running {
    let state = dir.join("state");
    let key = key.map(|k| PublicKey::parse(k).unwrap());
    let opened = poll::open(r, &state, key.as_ref(), true, true, Utc::now())
        .await
        .unwrap();
    let status = Arc::new(Mutex::new(opened.status.clone()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let (triggers, rx) = tokio::sync::mpsc::channel(64);
    let poller = Poller {
        r: r.clone(),
        registry: client(&r.host),
        key,
        state_dir: state,
        interval: opened.policy.daemon.policy_poll,
        current: opened.current.clone(),
        status: status.clone(),
        clock: Arc::new(SystemClock),
        wake: wake.clone(),
    };
    tokio::spawn(poller.run(triggers));
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        policy: opened.policy,
        engine_address: "fake".into(),
        clock: Arc::new(SystemClock),
        notifier: Notifier::disabled(),
        metrics: metrics.clone(),
        remote: Some(Remote { status, wake }),
    };
    let connect = || async {
        Ok(FakeEngine::new(
            vec![fake_store::img("a1", 30.0, &["app:1"])],
            vec![],
        ))
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(daemon::run(config, connect, rx, async {
        let _ = stopped.await;
    }));
    Running {
        stop,
        task,
        metrics,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_policies_apply_and_invalid_or_older_ones_are_kept_out() {
    let Some(r) = reference("fleet_loop") else {
        return;
    };
    let folder = crate::engine_env::short_folder("fl");
    let dir = folder.path();
    let extra = daemon_part(dir);
    let t0 = Utc::now();
    let d1 = publish(&r, &policy_text(1, &extra), t0, None).await;
    let daemon = start(&r, dir, None).await;
    let s = until(dir, "started on v1", |s| s.reconciles >= 1).await;
    let remote = s.policy_remote.clone().unwrap();
    assert_eq!(remote.digest, d1);
    assert!(s.policy_summary.contains("1 retain"));

    // A new valid policy: in force within a poll or two, kept as last good.
    let d2 = publish(
        &r,
        &policy_text(2, &format!("{extra}\ndry_run = true")),
        t0 + chrono::Duration::seconds(1),
        None,
    )
    .await;
    let s = until(dir, "v2 in force", |s| {
        s.policy_remote.as_ref().is_some_and(|p| p.digest == d2)
    })
    .await;
    assert!(s.policy_summary.contains("dry_run"), "{}", s.policy_summary);
    let good = stowage::fleet::last_good::load(&dir.join("state"))
        .unwrap()
        .unwrap();
    assert_eq!(good.digest, d2);
    let metrics = daemon.metrics.render();
    assert!(metrics.contains(&format!("digest=\"{d2}\"")), "{metrics}");
    assert!(
        metrics.contains("stowage_policy_check_age_seconds "),
        "{metrics}"
    );

    // Invalid: refused, reported, v2 stays.
    let bad = publish(
        &r,
        &format!("version = 1\n[daemon]\n{extra}\nmin_age = \"soon\"\n"),
        t0 + chrono::Duration::seconds(2),
        None,
    )
    .await;
    let s = until(dir, "v3 refused", |s| {
        s.policy_remote
            .as_ref()
            .and_then(|p| p.refused.as_ref())
            .is_some_and(|x| x.digest.as_deref() == Some(&bad))
    })
    .await;
    assert_eq!(s.policy_remote.as_ref().unwrap().digest, d2);
    assert!(
        s.reload_error
            .as_ref()
            .unwrap()
            .message
            .contains("daemon.min_age"),
        "{s:#?}"
    );
    assert!(s.policy_summary.contains("dry_run"));

    // Older than the one in force (a replayed tag): refused too.
    let old = publish(
        &r,
        &policy_text(7, &extra),
        t0 - chrono::Duration::days(1),
        None,
    )
    .await;
    let s = until(dir, "older refused", |s| {
        s.policy_remote
            .as_ref()
            .and_then(|p| p.refused.as_ref())
            .is_some_and(|x| x.digest.as_deref() == Some(&old))
    })
    .await;
    assert_eq!(s.policy_remote.as_ref().unwrap().digest, d2);
    let rendered = stowage::status::render_daemon(&s, Utc::now());
    assert!(rendered.contains(&format!("digest {d2}")), "{rendered}");
    assert!(
        rendered.contains("older than the policy in force"),
        "{rendered}"
    );
    daemon.stop().await;

    // Both refusals are audit `warn` records, each once.
    let audit = std::fs::read_to_string(dir.join("state/audit.jsonl")).unwrap();
    let warns: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"action\":\"warn\"") && l.contains("\"rule\":\"policy\""))
        .collect();
    assert_eq!(warns.len(), 2, "{audit}");
    assert!(
        warns[0].contains(&bad) && warns[1].contains(&old),
        "{warns:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_an_unsigned_update_is_refused_and_a_signed_one_applies() {
    let Some(r) = reference("fleet_signed") else {
        return;
    };
    let folder = crate::engine_env::short_folder("fs");
    let dir = folder.path();
    let extra = daemon_part(dir);
    let t0 = Utc::now();
    publish(&r, &policy_text(1, &extra), t0, Some(KEY_A)).await;
    let daemon = start(&r, dir, Some(PUB_A)).await;
    until(dir, "started", |s| s.reconciles >= 1).await;
    let unsigned = publish(
        &r,
        &policy_text(2, &extra),
        t0 + chrono::Duration::seconds(1),
        None,
    )
    .await;
    let s = until(dir, "unsigned refused", |s| {
        s.policy_remote
            .as_ref()
            .and_then(|p| p.refused.as_ref())
            .is_some_and(|x| x.digest.as_deref() == Some(&unsigned))
    })
    .await;
    let reason = &s.policy_remote.unwrap().refused.unwrap().reason;
    assert!(reason.contains("unsigned"), "{reason}");
    let signed = publish(
        &r,
        &policy_text(3, &extra),
        t0 + chrono::Duration::seconds(2),
        Some(KEY_A),
    )
    .await;
    until(dir, "signed applies", |s| {
        s.policy_remote.as_ref().is_some_and(|p| p.digest == signed)
    })
    .await;
    daemon.stop().await;
}
