//! `[[scan]]` gating arrivals on the real private engine and registry: a
//! new digest that fails leaves the old image serving, one that passes
//! moves the reference; verdicts are cached across runs; a hanging command
//! is killed at its timeout; 100 MB of output is bounded.

use std::time::{Duration, Instant};

use stowage::audit::{Action, Outcome};
use stowage::engine::Engine;

use crate::engine_env::{self, text};
use crate::transfer_real::{Dir, ENGINE_WIDE, has_image, holder, now, publish, records, stowage};

const DAY: i64 = 86_400;

/// A command failing exactly on image `bad`.
fn refuse(bad: &str) -> String {
    format!(
        "[\"/bin/sh\", \"-c\", \"if [ {{image}} = {bad} ]; then echo 'CVE-2099-0001 critical in {{ref}}'; exit 1; fi; echo clean\"]"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_failing_new_digest_leaves_the_old_image_and_a_passing_one_moves() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("scan-gate");
    let reference = format!("{reg}/{ns}/app:1");
    // Later versions under the registry's other name (see transfer_real).
    let later = format!("{}/{ns}/app:1", reg.replace("127.0.0.1:", "localhost:"));
    let a = engine_env::image(&[&reference], now() - 3 * DAY, 4096);
    let b = engine_env::image(&[&later], now() - 2 * DAY, 4096);
    let c = engine_env::image(&[&later], now() - DAY, 4096);
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "[[prepull]]\nimage = \"{reference}\"\n\
         [[scan]]\nname = \"cves\"\ncommand = {}\n",
        refuse(&b.id())
    ));
    publish(&engine, &a, None).await;
    let plan = stowage(&addr, &policy, &["plan"]).await;
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("pending scan"),
        "{}",
        text(&plan)
    );
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    let ok = records(dir.audit(), Action::Scan, Outcome::Ok);
    assert_eq!(ok.len(), 1, "{:#?}", dir.audit());
    assert_eq!(ok[0].reason, "clean");

    publish(&engine, &b, None).await;
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        holder(&engine, &reference).await,
        Some(a.id()),
        "the failing image took the reference"
    );
    assert!(!has_image(&engine, &b.id()).await, "blocked image kept");
    let failed = records(dir.audit(), Action::Scan, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    assert_eq!(failed[0].image.as_deref(), Some(b.id().as_str()));
    assert!(
        failed[0].reason.starts_with("CVE-2099-0001"),
        "{:?}",
        failed[0]
    );
    let status = stowage(&addr, &policy, &["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("scans: 2 verdicts, 1 failed"),
        "{}",
        text(&status)
    );
    let pulls = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert!(
        pulls[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("blocked by scan \"cves\""),
        "{pulls:#?}"
    );

    publish(&engine, &c, None).await;
    // The failure backs off: a fresh state dir's backoff would wait, so clear it.
    let mut state = dir.state();
    state["backoff"] = serde_json::json!({});
    std::fs::write(dir.path().join("state/state.json"), state.to_string()).unwrap();
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(c.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_verdict_cache_survives_a_restart_and_the_next_reconcile_runs_no_scan() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("scan-cache");
    let reference = format!("{reg}/{ns}/app:1");
    let a = engine_env::image(&[&reference], now() - DAY, 4096);
    let dir = Dir::new();
    let counter = dir.path().join("scans-run");
    let policy = dir.policy(&format!(
        "[[prepull]]\nimage = \"{reference}\"\n\
         [[scan]]\nname = \"count\"\ncommand = [\"/bin/sh\", \"-c\", \"echo {{image}} >> {}\"]\n",
        counter.display()
    ));
    publish(&engine, &a, None).await;
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        1
    );
    let scans = &dir.state()["scans"];
    assert_eq!(scans.as_object().map(|o| o.len()), Some(1), "{scans}");

    // The reference is lost while the image stays: the next run (a new
    // process, the state from disk) retags it, admitted from the cache.
    let keep = format!("{ns}/keep:1");
    engine.tag(&a.id(), &keep).await.unwrap();
    engine.remove(&reference).await.unwrap();
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        1,
        "the cached verdict was not used"
    );
    assert_eq!(records(dir.audit(), Action::Scan, Outcome::Ok).len(), 2);
    engine.remove(&keep).await.unwrap();
}

/// A local image for `stowage scan` runs.
async fn local_image(name: &str) -> (stowage::engine::DockerEngine, String, String) {
    let engine = engine_env::engine().await.unwrap();
    let reference = format!("{}/img:1", engine_env::unique_ns(name));
    let img = engine_env::image(&[&reference], now() - DAY, 1024);
    engine_env::load(&engine, std::slice::from_ref(&img)).await;
    (engine, reference, img.id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_hanging_command_is_killed_at_its_timeout_with_its_children() {
    if engine_env::engine().await.is_none() {
        return;
    }
    let addr = engine_env::engine_addr().unwrap();
    let (engine, reference, _) = local_image("scan-hang").await;
    let dir = Dir::new();
    let pidfile = dir.path().join("child.pid");
    let policy = dir.policy(&format!(
        "[[scan]]\nname = \"hangs\"\ntimeout = \"2s\"\n\
         command = [\"/bin/sh\", \"-c\", \"sleep 300 & echo $! > {}; wait\"]\n",
        pidfile.display()
    ));
    let started = Instant::now();
    let out = stowage(&addr, &policy, &["scan", &reference]).await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("timed out after 2s, killed"),
        "{}",
        text(&out)
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let proc = format!("/proc/{}", pid.trim());
    engine_env::wait(10, "the scan's child to be killed", || {
        // Gone, or a zombie waiting for init.
        std::fs::read_to_string(format!("{proc}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    engine.remove(&reference).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_output_of_100_mb_is_bounded() {
    if engine_env::engine().await.is_none() {
        return;
    }
    let addr = engine_env::engine_addr().unwrap();
    let (engine, reference, _) = local_image("scan-loud").await;
    let dir = Dir::new();
    let policy = dir.policy(
        "[[scan]]\nname = \"loud\"\n\
         command = [\"/bin/sh\", \"-c\", \"head -c 100000000 /dev/zero | tr '\\\\0' 'v'; exit 1\"]\n",
    );
    let out = stowage(&addr, &policy, &["scan", &reference]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        out.stdout.len() < 4096,
        "{} bytes of stdout",
        out.stdout.len()
    );
    let failed = records(dir.audit(), Action::Scan, Outcome::Failed);
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].reason.starts_with("vvvv"),
        "{:?}",
        failed[0].reason
    );
    assert!(failed[0].reason.len() <= 310, "{}", failed[0].reason.len());
    engine.remove(&reference).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_failing_image_is_not_mirrored() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("scan-mirror");
    let good = engine_env::image(&[&format!("{ns}/app:1")], now() - DAY, 4096);
    let bad = engine_env::image(&[&format!("{ns}/app:2")], now() - DAY, 4096);
    engine_env::load(&engine, &[good.clone(), bad.clone()]).await;
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "[[mirror]]\nname = \"edge\"\nregistry = \"{reg}\"\nimages = [\"{ns}/app\"]\n\
         [[scan]]\nname = \"cves\"\ncommand = {}\n",
        refuse(&bad.id())
    ));
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let pushed = records(dir.audit(), Action::Push, Outcome::Ok);
    assert_eq!(pushed.len(), 1, "{:#?}", dir.audit());
    assert_eq!(pushed[0].image.as_deref(), Some(good.id().as_str()));
    let refused = records(dir.audit(), Action::Push, Outcome::Failed);
    assert!(
        refused[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("blocked by scan \"cves\""),
        "{refused:#?}"
    );
    assert!(
        engine
            .remote_digest(&format!("{reg}/{ns}/app:2"), None)
            .await
            .is_err(),
        "the failing image reached the mirror"
    );
    assert!(
        engine
            .remote_digest(&format!("{reg}/{ns}/app:1"), None)
            .await
            .is_ok()
    );
    for i in [&good, &bad] {
        engine.remove(&i.tags[0]).await.unwrap();
    }
}
