//! Faults of resumable pulls (issue 14) at the level of the registry client
//! and the content store, against the REAL distribution registry (and the
//! real engine where an image is handed over): an image the engine pushed
//! is downloaded blob by blob with `Store::fetch` over `Registry::blobs`
//! through a fault-injecting proxy (`net::Proxy` for the link,
//! `net::HttpProxy` for what a registry answers), which also counts the
//! bytes on the wire.
//!
//! Not repeated here: a blob damaged on disk after it was stored, and the
//! full disk resumed once there is room (`store_real`); the registry
//! client's own answers to huge manifests and redirects from tiny servers
//! (`registry_servers`); the store's loop against a source in memory
//! (`src/store/tests.rs`); the same faults through `stowage pull`
//! (`pull_real`, `faults_pull_cli`); a kill -9 mid-blob (`faults_pull_kill`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stowage::engine::{DockerEngine, Engine};
use stowage::registry::{Options, Registry, RegistryError, Resolved};
use stowage::store::{Descriptor, FetchOptions, Fetched, Progress, SourceError, Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::engine_env;
use crate::net::{Fault, HttpProxy, Mode, Proxy, TestRegistry};
use crate::store_real::Tmpfs;

pub(crate) const MIB: u64 = 1 << 20;
const CREATED: i64 = 1_700_000_000;
const PLATFORM: &str = "linux/amd64";

/// An image of two layers of random bytes, pushed by the real engine to a
/// real registry and removed from the engine again.
pub(crate) struct Pushed {
    pub engine: DockerEngine,
    /// `127.0.0.1:PORT` of the registry holding it.
    pub registry: String,
    /// Its path there (it is tagged `v1`).
    pub repository: String,
    /// The image id (the config's digest).
    pub id: String,
    pub resolved: Resolved,
}

impl Pushed {
    /// To the harness registry; `None` (after a SKIP line) outside CI
    /// without one.
    pub(crate) async fn new(test: &str, base: usize, own: usize) -> Option<Pushed> {
        let engine = engine_env::engine().await?;
        let registry = engine_env::registry()?;
        Some(Pushed::to(engine, &registry, test, base, own).await)
    }

    pub(crate) async fn to(
        engine: DockerEngine,
        registry: &str,
        test: &str,
        base: usize,
        own: usize,
    ) -> Pushed {
        let repository = engine_env::unique_ns(test);
        let reference = format!("{registry}/{repository}:v1");
        let image = engine_env::image(&[&reference], CREATED, own)
            .with_base(engine_env::unique_seed(), base);
        engine_env::load(&engine, std::slice::from_ref(&image)).await;
        engine
            .push(&reference, None, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
        engine.remove(&reference).await.expect("remove after push");
        let resolved = client(registry)
            .resolve(&repository, "v1", PLATFORM)
            .await
            .expect("resolving the pushed image");
        assert_eq!(resolved.layers.len(), 2, "{:?}", resolved.layers);
        assert_eq!(resolved.config.digest, image.id());
        Pushed {
            engine,
            registry: registry.to_owned(),
            repository,
            id: image.id(),
            resolved,
        }
    }

    /// The base layer (the larger one).
    pub(crate) fn base(&self) -> &Descriptor {
        &self.resolved.layers[0]
    }

    /// The image's own layer.
    pub(crate) fn own(&self) -> &Descriptor {
        &self.resolved.layers[1]
    }

    /// Config, then the layers.
    pub(crate) fn blobs(&self) -> Vec<Descriptor> {
        let mut all = vec![self.resolved.config.clone()];
        all.extend(self.resolved.layers.iter().cloned());
        all
    }

    /// The engine pulls the image from `store` served on loopback; the
    /// answer and whether the engine then has the image.
    async fn hand_over(&self, store: &Store) -> (Result<(), String>, bool) {
        let _engine_wide = crate::transfer_real::ENGINE_WIDE.read().await;
        let (top, bytes) = &self.resolved.top;
        store.put(top, bytes).unwrap();
        let stop = CancellationToken::new();
        let serving = stowage::store::serve(store.clone(), &stop).await.unwrap();
        let loopback = format!(
            "127.0.0.1:{}/{}@{}",
            serving.addr.port(),
            self.repository,
            top.digest
        );
        let pulled = self
            .engine
            .pull(&loopback, None, None, &mut |_| {})
            .await
            .map_err(|e| e.to_string());
        serving.stop().await;
        let present = self.engine.image(&self.id).await.unwrap().is_some();
        (pulled, present)
    }
}

/// A registry client for `addr` (the registry or a proxy in front of it).
pub(crate) fn client(addr: &str) -> Registry {
    let options = Options {
        timeout: Duration::from_secs(5),
        ..Options::default()
    };
    Registry::new(addr, None, &options).unwrap()
}

pub(crate) fn quiet(_: Progress) {}

/// Stall and give-up limits of one download, with its own cancel token.
pub(crate) struct Limits {
    stall: Duration,
    give_up: Duration,
    cancel: CancellationToken,
}

impl Limits {
    pub(crate) fn new(stall: Duration) -> Limits {
        Limits {
            stall,
            give_up: Duration::from_secs(20),
            cancel: CancellationToken::new(),
        }
    }

    pub(crate) fn with<'a>(&'a self, progress: &'a (dyn Fn(Progress) + Sync)) -> FetchOptions<'a> {
        FetchOptions {
            stall: self.stall,
            give_up: self.give_up,
            cancel: &self.cancel,
            progress,
        }
    }
}

/// A fresh store in the scratch folder (kept alive by the returned dir).
pub(crate) fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    (dir, store)
}

/// The path part of a blob's URL, to match requests the proxy saw.
pub(crate) fn blob_path(desc: &Descriptor) -> String {
    format!("/blobs/{}", desc.digest)
}

/// Ranges the proxy saw asked for `desc`, in order.
pub(crate) fn ranges(proxy: &HttpProxy, desc: &Descriptor) -> Vec<Option<String>> {
    proxy
        .seen(&blob_path(desc))
        .into_iter()
        .map(|s| s.range)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_every_1_5_mib_completes_each_blob_within_1_05x_on_the_wire() {
    let Some(p) = Pushed::new("pull-cuts", 5 << 20, 5 << 20).await else {
        return;
    };
    let (_dir, store) = new_store();
    // A partial of the own layer first, over a clean but slow link (the
    // bytes arrive while the download is cancelled; they are resumed, not
    // fetched again, below).
    let slow = Proxy::start(&p.registry).await;
    slow.set(Mode::Throttle(2 * MIB));
    let direct = client(&slow.addr).blobs(&p.repository);
    let first = Limits::new(Duration::from_secs(5));
    let cancel_at = |pr: Progress| {
        if pr.have >= MIB {
            first.cancel.cancel();
        }
    };
    let err = store
        .fetch(&direct, p.own(), &first.with(&cancel_at))
        .await
        .unwrap_err();
    let StoreError::Interrupted { kept, .. } = err else {
        panic!("expected an interrupted download, got {err}");
    };
    assert!(kept >= MIB && kept < p.own().size, "{kept}");

    let cut = 1536 * 1024;
    assert!(
        kept + cut < p.own().size,
        "the rest of it is cut too: {kept}"
    );
    let proxy = Proxy::start(&p.registry).await;
    proxy.set(Mode::CutAfter(cut));
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let mut got: Vec<Fetched> = Vec::new();
    for blob in p.blobs() {
        let fetched = store
            .fetch(&src, &blob, &limits.with(&quiet))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", blob.digest));
        assert!(store.has(&blob.digest));
        store.verify(&blob.digest).unwrap();
        assert_eq!(
            fetched.bytes + fetched.resumed,
            blob.size,
            "{blob:?}: {fetched:?}"
        );
        got.push(fetched);
    }
    let [config, base, own] = got[..] else {
        unreachable!()
    };
    assert_eq!((config.resumed, config.retries), (0, 0), "{config:?}");
    assert_eq!(base.resumed, 0);
    assert!(
        u64::from(base.retries) >= p.base().size / cut,
        "several cuts of the base layer: {base:?}"
    );
    assert_eq!(own.resumed, kept, "the partial's bytes are resumed");
    assert!(own.retries >= 1, "{own:?}");

    let needed = p.resolved.config.size + p.base().size + p.own().size - kept;
    let wire = proxy.bytes();
    assert_eq!(got.iter().map(|f| f.bytes).sum::<u64>(), needed);
    assert!(
        wire >= needed && wire * 100 <= needed * 105,
        "wire {wire} bytes for {needed} bytes of blobs"
    );
    assert!(
        proxy.connections() > u64::from(base.retries),
        "each cut a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_mid_blob_is_abandoned_and_the_download_resumes_at_its_offset() {
    let Some(p) = Pushed::new("pull-stall", 4 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let path = blob_path(&base);
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        if seen.target.ends_with(&path) && before == 0 {
            Fault::StallAfter(2 * MIB)
        } else {
            Fault::Pass
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(1));
    let started = Instant::now();
    let got = store
        .fetch(&src, &base, &limits.with(&quiet))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        ranges(&proxy, &base),
        [None, Some(format!("bytes={}-", 2 * MIB))],
        "the second request starts where the stalled one stopped"
    );
    assert_eq!((got.bytes, got.resumed, got.retries), (base.size, 0, 1));
    assert!(
        took >= limits.stall && took < Duration::from_secs(8),
        "{took:?}"
    );
    store.verify(&base.digest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_answering_5xx_twice_then_ok_completes() {
    let Some(p) = Pushed::new("pull-5xx", 2 << 20, 1 << 10).await else {
        return;
    };
    let path = blob_path(p.base());
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        match (seen.target.ends_with(&path), before) {
            (true, 0) => Fault::Answer(500),
            (true, 1) => Fault::Answer(503),
            _ => Fault::Pass,
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    for blob in p.blobs() {
        let got = store
            .fetch(&src, &blob, &limits.with(&quiet))
            .await
            .unwrap();
        let retries = if blob == *p.base() { 2 } else { 0 };
        assert_eq!((got.bytes, got.retries), (blob.size, retries), "{blob:?}");
        store.verify(&blob.digest).unwrap();
    }
    assert_eq!(ranges(&proxy, p.base()).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_of_one_blob_fails_at_once_naming_it_and_keeps_the_rest_and_its_partial() {
    let Some(p) = Pushed::new("pull-404", 3 << 20, 1 << 10).await else {
        return;
    };
    let path = blob_path(p.base());
    // The registry loses the blob after sending its first MiB.
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        match (seen.target.ends_with(&path), before) {
            (true, 0) => Fault::CutAfter(MIB),
            (true, _) => Fault::Answer(404),
            _ => Fault::Pass,
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let started = Instant::now();
    let mut errors = Vec::new();
    for blob in p.blobs() {
        if let Err(e) = store.fetch(&src, &blob, &limits.with(&quiet)).await {
            errors.push(e);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not retried for long"
    );
    let [err] = &errors[..] else {
        panic!("one failure expected: {errors:?}");
    };
    assert!(
        matches!(err, StoreError::Source { source: SourceError::NotFound { .. }, digest, .. } if digest == &p.base().digest),
        "{err:?}"
    );
    // The blob, the repository and the registry's own message.
    let text = err.to_string();
    let naming = format!(
        "blob {} from {}: the registry has no such blob in {}: UNKNOWN: GET /v2/{}/blobs/{} answered 404",
        p.base().digest,
        proxy.addr,
        p.repository,
        p.repository,
        p.base().digest,
    );
    assert!(text.starts_with(&naming), "{text}");
    assert_eq!(ranges(&proxy, p.base()).len(), 2, "the 404 is not retried");
    assert!(store.has(&p.resolved.config.digest) && store.has(&p.own().digest));
    assert!(!store.has(&p.base().digest));
    assert_eq!(
        store.partial_len(&p.base().digest),
        Some(MIB),
        "the partial is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_down_for_seconds_mid_blob_is_waited_for_within_give_up() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let mut registry = TestRegistry::start(&dir.path().join("registry"), None);
    let p = Pushed::to(
        engine,
        &registry.addr.clone(),
        "pull-down",
        6 << 20,
        1 << 10,
    )
    .await;
    let base = p.base().clone();
    let proxy = HttpProxy::start(&registry.addr, |_, _| Fault::Pass).await;
    proxy.set_rate(4 * MIB);
    let (_store_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(2));
    let have = Arc::new(AtomicU64::new(0));
    let seen_have = have.clone();
    let progress = move |pr: Progress| seen_have.store(pr.have, Ordering::SeqCst);
    let down = Duration::from_secs(2);
    // Down once 2 MiB are in; back after `down`.
    let outage = tokio::spawn(async move {
        while have.load(Ordering::SeqCst) < 2 * MIB {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::spawn_blocking(move || {
            registry.stop();
            let stopped = Instant::now();
            std::thread::sleep(down);
            registry.restart();
            (registry, stopped.elapsed())
        })
        .await
        .unwrap()
    });
    let started = Instant::now();
    let got = store
        .fetch(&src, &base, &limits.with(&progress))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    let (_registry, outage) = outage.await.unwrap();
    assert!(outage >= down);
    assert!(took >= down && took < limits.give_up, "{took:?}");
    assert!(
        got.retries >= 2,
        "failed attempts while it was down: {got:?}"
    );
    // Every byte came once: each attempt asked from where the last stopped.
    assert_eq!((got.bytes, got.resumed), (base.size, 0));
    let asked = ranges(&proxy, &base);
    assert!(asked.len() as u32 > got.retries, "{asked:?}");
    assert!(
        asked.last().unwrap().is_some(),
        "the last attempt resumed: {asked:?}"
    );
    store.verify(&base.digest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_once_is_detected_and_the_blob_fetched_again_whole() {
    let Some(p) = Pushed::new("pull-flip-once", 2 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let (path, at) = (blob_path(&base), base.size / 2);
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        if seen.target.ends_with(&path) && before == 0 {
            Fault::Flip(at)
        } else {
            Fault::Pass
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let got = store
        .fetch(&src, &base, &limits.with(&quiet))
        .await
        .unwrap();
    assert_eq!((got.bytes, got.retries), (2 * base.size, 1), "{got:?}");
    assert_eq!(ranges(&proxy, &base), [None, None], "refetched from zero");
    store.verify(&base.digest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_every_time_is_a_verify_error_and_the_engine_gets_no_image() {
    let Some(p) = Pushed::new("pull-flip", 2 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let path = blob_path(&base);
    let proxy = HttpProxy::start(&p.registry, move |seen, _| {
        if seen.target.ends_with(&path) {
            Fault::Flip(1000)
        } else {
            Fault::Pass
        }
    })
    .await;
    let (dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let mut errors = Vec::new();
    for blob in p.blobs() {
        if let Err(e) = store.fetch(&src, &blob, &limits.with(&quiet)).await {
            errors.push(e);
        }
    }
    let [err] = &errors[..] else {
        panic!("one failure expected: {errors:?}");
    };
    let StoreError::Verify { digest, from, why } = err else {
        panic!("expected a verify error, got {err:?}");
    };
    assert_eq!((digest, from), (&base.digest, &proxy.addr));
    assert!(why.starts_with("its sha256 is sha256:"), "{why}");
    assert!(
        err.to_string().starts_with(&format!(
            "blob {} from {} failed verification: its sha256 is",
            base.digest, proxy.addr
        )),
        "{err}"
    );
    assert_eq!(
        ranges(&proxy, &base),
        [None, None],
        "one refetch, then no more"
    );
    assert!(!store.has(&base.digest), "never a complete blob");
    assert!(
        !dir.path()
            .join("cache/blobs/sha256")
            .join(&base.digest[7..])
            .exists()
    );
    assert_eq!(
        store.partial_len(&base.digest).unwrap_or(0),
        0,
        "the wrong bytes are gone"
    );

    // Served anyway (the manifest and the other blobs are there), the
    // engine cannot take the image.
    let (pulled, present) = p.hand_over(&store).await;
    assert!(pulled.is_err(), "the engine pulled an image missing a blob");
    assert!(!present, "the engine has no image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_ignored_has_the_held_bytes_skipped_and_counted() {
    let Some(p) = Pushed::new("pull-range", 4 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let path = blob_path(&base);
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        match (seen.target.ends_with(&path), before) {
            (true, 0) => Fault::CutAfter(2 * MIB),
            (true, _) => Fault::IgnoreRange,
            _ => Fault::Pass,
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let got = store
        .fetch(&src, &base, &limits.with(&quiet))
        .await
        .unwrap();
    assert_eq!(
        ranges(&proxy, &base),
        [None, Some(format!("bytes={}-", 2 * MIB))],
        "the range was asked for (and dropped by the proxy)"
    );
    assert_eq!(
        (got.bytes, got.resumed, got.retries),
        (base.size + 2 * MIB, 0, 1),
        "the whole blob came again: its first 2 MiB skipped, counted as wire bytes"
    );
    let wire = proxy.bytes();
    assert!(wire >= got.bytes && wire < got.bytes + 4096, "{wire}");
    store.verify(&base.digest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_not_retried_serves_nothing_partial_and_leaves_the_engine_without_the_image()
{
    let Some(p) = Pushed::new("pull-enospc", 10 << 20, 1 << 10).await else {
        return;
    };
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("small"), "6m") else {
        return;
    };
    let proxy = HttpProxy::start(&p.registry, |_, _| Fault::Pass).await;
    let store = Store::open(&disk.0.join("cache")).unwrap();
    // As a pull does: the manifest first, then its blobs (the large one last).
    store.put(&p.resolved.top.0, &p.resolved.top.1).unwrap();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let mut errors = Vec::new();
    let (config, own) = (p.resolved.config.clone(), p.own().clone());
    for blob in [config, own, p.base().clone()] {
        if let Err(e) = store.fetch(&src, &blob, &limits.with(&quiet)).await {
            errors.push(e);
        }
    }
    let [err] = &errors[..] else {
        panic!("one failure expected: {errors:?}");
    };
    let base = p.base();
    let StoreError::NoSpace { digest, kept, .. } = err else {
        panic!("expected a full disk, got {err:?}");
    };
    assert_eq!(digest, &base.digest);
    assert!(*kept > 0 && *kept < base.size, "{kept}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("no space left writing blob {}", base.digest))
            && text.ends_with(&format!(
                "{kept} bytes kept there to resume from once space is freed"
            )),
        "{text}"
    );
    assert_eq!(ranges(&proxy, base).len(), 1, "a full disk is not retried");
    assert_eq!(store.partial_len(&base.digest), Some(*kept));
    assert!(store.has(&p.resolved.config.digest) && store.has(&p.own().digest));

    // The endpoint serves no partial: the engine cannot take the image.
    let (pulled, present) = p.hand_over(&store).await;
    assert!(pulled.is_err(), "the engine pulled an image missing a blob");
    assert!(!present);
    assert_eq!(
        store.partial_len(&base.digest),
        Some(*kept),
        "still there to resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_for_a_blob_fails_at_once_and_keeps_its_partial() {
    let Some(p) = Pushed::new("pull-redirect", 2 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let path = blob_path(&base);
    let proxy = HttpProxy::start(&p.registry, move |seen, before| {
        match (seen.target.ends_with(&path), before) {
            (true, 0) => Fault::CutAfter(MIB),
            // Back to itself, without end.
            (true, _) => Fault::Redirect(seen.target.clone()),
            _ => Fault::Pass,
        }
    })
    .await;
    let (_dir, store) = new_store();
    let src = client(&proxy.addr).blobs(&p.repository);
    let limits = Limits::new(Duration::from_secs(5));
    let started = Instant::now();
    let err = store
        .fetch(&src, &base, &limits.with(&quiet))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            StoreError::Source {
                source: SourceError::RedirectLoop,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "blob {} from {}: the registry's redirects loop",
            base.digest, proxy.addr
        )
    );
    let asked = ranges(&proxy, &base).len();
    assert!((2..=7).contains(&asked), "bounded: {asked} requests");
    assert_eq!(store.partial_len(&base.digest), Some(MIB));
    assert!(!store.has(&base.digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_manifest_on_the_registry_path_is_refused_after_reading_at_most_the_cap() {
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let proxy = HttpProxy::start(&registry, |seen, _| {
        if seen.target.contains("/manifests/") {
            Fault::Endless(1 << 30)
        } else {
            Fault::Pass
        }
    })
    .await;
    let cap = Options::default().max_manifest;
    let started = Instant::now();
    let err = client(&proxy.addr)
        .resolve("stowage-test/huge", "v1", PLATFORM)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, RegistryError::TooLarge { limit, .. } if limit == cap),
        "{err}"
    );
    assert!(!err.retryable());
    // Hung up at the cap: what the proxy got out is the cap plus socket buffers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = proxy.bytes();
    assert!(sent >= cap && sent < cap + 32 * MIB, "{sent}");
}
