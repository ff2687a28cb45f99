//! Faults of resumable pulls through the real `stowage pull` binary (issue
//! 14), against the real engine and registry with a proxy as the link: what
//! `pull_real` does not already cover (a cut link, SIGTERM and kill -9
//! mid-blob, a flipped byte, shared layers): a full cache disk, a 404 of one
//! layer, a stall bounded by the policy's `stall_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stowage::audit::{Action, Outcome};
use stowage::store::Store;

use crate::engine_env::text;
use crate::faults_pull::{Pushed, blob_path};
use crate::net::{Fault, HttpProxy, Seen};
use crate::store_real::Tmpfs;
use crate::transfer_real::{Dir, ENGINE_WIDE, has_image, holder, records, stowage};

const MIB: u64 = 1 << 20;

/// GET requests the proxy saw for `part`, with their ranges.
fn gets(proxy: &HttpProxy, part: &str) -> Vec<Option<String>> {
    proxy
        .seen(part)
        .into_iter()
        .filter(|s: &Seen| s.method == "GET")
        .map(|s| s.range)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_fails_the_pull_clearly_host_unchanged_and_the_rerun_resumes() {
    let Some(p) = Pushed::new("cli-enospc", 8 << 20, 64 << 10).await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let dir = Dir::new();
    let Some(disk) = Tmpfs::mount(&dir.path().join("small"), "5m") else {
        return;
    };
    let cache = disk.0.join("cache");
    let policy = dir.policy(&format!("cache_dir = \"{}\"\n", cache.display()));
    let proxy = HttpProxy::start(&p.registry, |_, _| Fault::Pass).await;
    let reference = format!("{}/{}:v1", proxy.addr, p.repository);
    let addr = engine_env_addr();
    let base = p.base().digest.clone();

    let full = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(full.status.code(), Some(1), "{}", text(&full));
    let said = text(&full);
    assert!(
        said.contains("failed, host unchanged")
            && said.contains(&format!("no space left writing blob {base}"))
            && said.contains("bytes kept there to resume from once space is freed"),
        "{said}"
    );
    assert!(
        !has_image(&p.engine, &p.id).await,
        "the engine got an image"
    );
    assert_eq!(holder(&p.engine, &reference).await, None);
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let error = failed[0].error.clone().unwrap();
    assert!(
        error.contains(&format!("no space left writing blob {base}")),
        "{error}"
    );
    assert_eq!(gets(&proxy, &blob_path(p.base())).len(), 1, "not retried");
    let kept = Store::open(&cache).unwrap().partial_len(&base).unwrap();
    assert!(kept >= MIB && kept < p.base().size, "{kept}");

    disk.resize("32m");
    let again = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(holder(&p.engine, &reference).await, Some(p.id.clone()));
    assert_eq!(
        gets(&proxy, &blob_path(p.base()))
            .last()
            .unwrap()
            .as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(ok[0].resumed_bytes, Some(kept), "{:?}", ok[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_of_one_layer_fails_naming_it_and_the_rerun_fetches_only_that_layer() {
    let Some(p) = Pushed::new("cli-404", 3 << 20, 256 << 10).await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    // The last layer fetched is missing at the registry, for a while.
    let gone = Arc::new(AtomicBool::new(true));
    let (own, missing) = (blob_path(p.own()), gone.clone());
    let proxy = HttpProxy::start(&p.registry, move |seen, _| {
        if seen.target.ends_with(&own) && missing.load(Ordering::SeqCst) {
            Fault::Answer(404)
        } else {
            Fault::Pass
        }
    })
    .await;
    let reference = format!("{}/{}:v1", proxy.addr, p.repository);
    let (addr, dir) = (engine_env_addr(), Dir::new());
    let policy = dir.policy("");

    let out = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let naming = format!(
        "blob {} from {}: the registry has no such blob in {}: UNKNOWN: GET /v2/{}/blobs/{} answered 404",
        p.own().digest,
        proxy.addr,
        p.repository,
        p.repository,
        p.own().digest,
    );
    assert!(text(&out).contains(&naming), "{}", text(&out));
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    assert!(
        failed[0].error.as_deref().unwrap().contains(&naming),
        "{:?}",
        failed[0]
    );
    assert!(!has_image(&p.engine, &p.id).await);
    assert_eq!(
        gets(&proxy, &blob_path(p.own())).len(),
        1,
        "a 404 is not retried"
    );
    let base_gets = gets(&proxy, &blob_path(p.base())).len();
    assert_eq!(base_gets, 1);

    gone.store(false, Ordering::SeqCst);
    let again = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(holder(&p.engine, &reference).await, Some(p.id.clone()));
    // The config and base layer of the failed pull were kept for this one.
    assert_eq!(gets(&proxy, &blob_path(p.base())).len(), base_gets);
    assert_eq!(gets(&proxy, &blob_path(&p.resolved.config)).len(), 1);
    assert_eq!(gets(&proxy, &blob_path(p.own())).len(), 2);
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    let bytes = ok[0].bytes.unwrap();
    assert!(bytes < p.own().size + 64 * 1024, "{:?}", ok[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_mid_blob_is_abandoned_after_stall_timeout_and_resumed_at_its_offset() {
    let Some(p) = Pushed::new("cli-stall", 4 << 20, 64 << 10).await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let base = blob_path(p.base());
    let stalled = base.clone();
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        if seen.target.ends_with(&stalled) && before == 0 {
            Fault::StallAfter(2 * MIB)
        } else {
            Fault::Pass
        }
    })
    .await;
    let reference = format!("{}/{}:v1", proxy.addr, p.repository);
    let (addr, dir) = (engine_env_addr(), Dir::new());
    let policy = dir.policy("stall_timeout = \"1s\"\n");
    let started = Instant::now();
    let out = stowage(&addr, &policy, &["pull", &reference]).await;
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&p.engine, &reference).await, Some(p.id.clone()));
    assert_eq!(
        gets(&proxy, &base),
        [None, Some(format!("bytes={}-", 2 * MIB))]
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    let size: u64 = p.blobs().iter().map(|b| b.size).sum();
    let bytes = ok[0].bytes.unwrap();
    assert!(
        (size..size + 8192).contains(&bytes),
        "each byte once: {:?}, blobs {size}",
        ok[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layers_of_an_image_download_at_once_on_a_slow_link() {
    let Some(p) = Pushed::new("cli-layers", 3 << 20, 2 << 20).await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let proxy = Arc::new(HttpProxy::start(&p.registry, |_, _| Fault::Pass).await);
    // Each answer at 2 MiB/s: one layer after the other would take 2.5 s,
    // both at once 1.5 s; the proxy's open connections tell which it was.
    proxy.set_rate(2 * MIB);
    let reference = format!("{}/{}:v1", proxy.addr, p.repository);
    let (addr, dir) = (engine_env_addr(), Dir::new());
    let policy = dir.policy("");
    let done = Arc::new(AtomicBool::new(false));
    let (watched, over) = (proxy.clone(), done.clone());
    let most = tokio::spawn(async move {
        let mut most = 0;
        while !over.load(Ordering::SeqCst) {
            most = most.max(watched.open());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    });
    let out = stowage(&addr, &policy, &["pull", &reference]).await;
    done.store(true, Ordering::SeqCst);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&p.engine, &reference).await, Some(p.id.clone()));
    let most = most.await.unwrap();
    assert!(
        most >= 2,
        "the two layers came one after the other ({most} at once at most)"
    );
    for layer in [p.base(), p.own()] {
        assert_eq!(
            gets(&proxy, &blob_path(layer)),
            [None],
            "each layer once, whole"
        );
    }
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    let size: u64 = p.blobs().iter().map(|b| b.size).sum();
    let bytes = ok[0].bytes.unwrap();
    assert!(
        (size..size + 8192).contains(&bytes),
        "{:?}, blobs {size}",
        ok[0]
    );
}

fn engine_env_addr() -> String {
    crate::engine_env::engine_addr().expect("the engine answered above")
}
