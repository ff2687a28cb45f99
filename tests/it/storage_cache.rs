//! The content store in `[storage]`'s accounting, on the fake engine and a
//! real content store in a temporary folder: its bytes count toward
//! `max_size`, it shrinks (least recently used blobs first) before any image
//! is evicted, partial downloads and the blobs unfinished downloads need
//! stay, and a store that cannot be read is said, not a failed reconcile.

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::fake_store::{NOW, img};
use stowage::audit::{self, Action as AuditAction, AuditLog, Outcome};
use stowage::engine::fake::FakeEngine;
use stowage::fixture::FixedClock;
use stowage::plan::{self, Action, CacheTarget, Kind, Plan};
use stowage::reconcile::{self, Options};
use stowage::store::{BlobBody, BlobSource, Descriptor, FetchOptions, SourceError, Store};

const MB: u64 = 1_000_000;

/// A made-up blob of `len` bytes, stored complete, last used `age` ago.
fn put_blob(store: &Store, seed: u8, len: usize, age: Duration) -> String {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: digest.clone(),
        size: len as u64,
    };
    store.put(&desc, &bytes).unwrap();
    let path = store.root().join("blobs/sha256").join(&digest[7..]);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
    digest
}

/// Gives the first `cut` bytes of the blob, then the link drops.
struct Cut {
    bytes: Vec<u8>,
    cut: usize,
}

impl BlobSource for Cut {
    fn fetch(
        &self,
        _digest: &str,
        offset: u64,
    ) -> impl std::future::Future<Output = Result<BlobBody, SourceError>> + Send {
        let chunk = bytes::Bytes::copy_from_slice(&self.bytes[offset as usize..self.cut]);
        async move {
            let items = vec![Ok(chunk), Err(SourceError::Io("cut".into()))];
            Ok(BlobBody {
                start: offset,
                stream: futures_util::stream::iter(items).boxed(),
            })
        }
    }
    fn name(&self) -> &str {
        "cut"
    }
}

/// A partial download of `have` of `len` bytes left in the store (the
/// download gave up at once); its digest.
async fn leave_partial(store: &Store, len: usize, have: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: digest.clone(),
        size: len as u64,
    };
    let cancel = CancellationToken::new();
    let opts = FetchOptions {
        stall: Duration::from_secs(5),
        give_up: Duration::ZERO,
        cancel: &cancel,
        progress: &|_| {},
    };
    let src = Cut { bytes, cut: have };
    assert!(
        store.fetch(&src, &desc, &opts).await.is_err(),
        "it gives up"
    );
    assert_eq!(store.partial_len(&digest), Some(have as u64));
    digest
}

fn policy(dir: &Path, max_size: u64) -> stowage::policy::Policy {
    let text = format!(
        "version = 1\n[daemon]\nstate_dir = {:?}\nmin_age = \"0s\"\n\n[storage]\nmax_size = {max_size}\n",
        dir.join("state").display().to_string()
    );
    stowage::policy::parse(&text, Path::new("t.toml")).unwrap()
}

async fn reconcile(
    engine: &FakeEngine,
    policy: &stowage::policy::Policy,
) -> (Plan, reconcile::Report) {
    reconcile::reconcile_with(
        engine,
        policy,
        &FixedClock(NOW),
        Options::default(),
        &CancellationToken::new(),
    )
    .await
    .expect("the reconcile runs")
}

/// Two 1 MB images, four 1 MB complete blobs and a 0.5 MB partial against
/// 4 MB: 2.5 MB must go, and the store gives them (three least recently
/// used blobs, whole), so no image is evicted; planning again finds
/// nothing to do.
#[tokio::test]
async fn a_full_content_store_shrinks_and_no_image_is_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 4 * MB);
    let store = Store::open(&policy.daemon.cache_dir).unwrap();
    let hour = Duration::from_secs(3600);
    let blobs: Vec<String> = (0..4)
        .map(|i| put_blob(&store, i, MB as usize, hour * (4 - u32::from(i))))
        .collect();
    let partial = leave_partial(&store, MB as usize, 500_000).await;
    let engine = FakeEngine::new(
        vec![img("a", 30.0, &["a:1"]), img("b", 20.0, &["b:1"])],
        vec![],
    );

    let (plan, report) = reconcile(&engine, &policy).await;
    let kinds: Vec<Kind> = plan.actions.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [Kind::PruneCache], "{}", plan::render(&plan));
    assert_eq!(plan.actions[0].bytes, Some(2_500_000));
    assert_eq!(plan.actions[0].keep_bytes, Some(1_500_000));
    assert_eq!((report.ok, report.failed, report.removed), (1, 0, 0));
    assert_eq!(report.bytes_freed, 3 * MB, "whole blobs: three of them");
    assert_eq!(engine.images().len(), 2, "no image evicted");
    let kept: Vec<bool> = blobs.iter().map(|b| store.has(b)).collect();
    assert_eq!(
        kept,
        [false, false, false, true],
        "the most recently used stays"
    );
    assert_eq!(
        store.partial_len(&partial),
        Some(500_000),
        "the partial stays"
    );

    let records = audit::read(&policy.daemon.audit_log).unwrap().records;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(
        (r.action, r.outcome),
        (AuditAction::PruneCache, Outcome::Ok)
    );
    assert_eq!(
        (r.bytes, r.rule.as_deref()),
        (Some(3 * MB), Some("storage"))
    );
    assert!(
        r.reason.contains("before any image is evicted"),
        "{}",
        r.reason
    );
    assert_eq!(report.records.bytes_freed, 3 * MB);

    // 2 MB of images + 1.5 MB of store: under 4 MB.
    let (again, _) = reconcile(&engine, &policy).await;
    assert!(again.actions.is_empty(), "{}", plan::render(&again));
    let shown = plan::render(&again);
    assert!(
        shown.contains("images take 2.0 MB + content store 1.5 MB of max_size 4.0 MB"),
        "{shown}"
    );
}

/// When the store cannot free enough, images go for the rest, after it.
#[tokio::test]
async fn what_the_store_cannot_free_is_evicted_after_it() {
    let dir = tempfile::tempdir().unwrap();
    // 2 MB of images + 1 MB of store against 1.5 MB.
    let policy = policy(dir.path(), 1_500_000);
    let store = Store::open(&policy.daemon.cache_dir).unwrap();
    put_blob(&store, 7, MB as usize, Duration::from_secs(60));
    let engine = FakeEngine::new(
        vec![img("a", 30.0, &["a:1"]), img("b", 20.0, &["b:1"])],
        vec![],
    );
    let (plan, report) = reconcile(&engine, &policy).await;
    let kinds: Vec<Kind> = plan.actions.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [Kind::PruneCache, Kind::Evict],
        "{}",
        plan::render(&plan)
    );
    assert_eq!(report.failed, 0);
    assert_eq!(store.usage().complete, 0);
    assert_eq!(engine.references(), ["b:1"], "the older image went");
    let records = audit::read(&policy.daemon.audit_log).unwrap().records;
    let order: Vec<AuditAction> = records.iter().map(|r| r.action).collect();
    assert_eq!(order, [AuditAction::PruneCache, AuditAction::Evict]);
}

/// The executor keeps what the action names for unfinished downloads even
/// below its limit, and a dry run removes nothing.
#[tokio::test]
async fn the_executor_keeps_unfinished_downloads_blobs_and_a_dry_run_keeps_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    let hour = Duration::from_secs(3600);
    let oldest = put_blob(&store, 1, 1000, hour * 3);
    let newer = put_blob(&store, 2, 1000, hour);
    let mut plan = Plan::default();
    plan.actions = vec![Action {
        kind: Kind::PruneCache,
        reference: None,
        image: String::new(),
        rule: "storage".into(),
        reason: "test".into(),
        bytes: Some(2000),
        keep_bytes: Some(0),
        cache: Some(CacheTarget {
            dir: store.root().to_path_buf(),
            keep: vec![oldest.clone()],
        }),
    }];
    let engine = FakeEngine::new(vec![], vec![]);
    for dry_run in [true, false] {
        let mut log = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
        let report = reconcile::execute(
            &engine,
            &plan,
            &mut log,
            "run-1",
            dry_run,
            &FixedClock(NOW),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(report.failed, 0);
        assert_eq!(store.has(&newer), dry_run, "dry run {dry_run}");
        assert!(store.has(&oldest), "an unfinished download's blob stays");
    }
    let records = audit::read(&dir.path().join("audit.jsonl"))
        .unwrap()
        .records;
    let got: Vec<(Outcome, Option<u64>)> = records.iter().map(|r| (r.outcome, r.bytes)).collect();
    assert_eq!(
        got,
        [(Outcome::DryRun, Some(2000)), (Outcome::Ok, Some(1000))]
    );
}

/// A `cache_dir` that holds something else is reported and not counted;
/// the reconcile runs and evicts nothing for it.
#[tokio::test]
async fn an_unreadable_content_store_is_reported_not_a_failed_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 2 * MB);
    std::fs::create_dir_all(&policy.daemon.cache_dir).unwrap();
    std::fs::write(
        policy.daemon.cache_dir.join("oci-layout"),
        "{\"imageLayoutVersion\":\"9.9\"}",
    )
    .unwrap();
    let engine = FakeEngine::new(vec![img("a", 30.0, &["a:1"])], vec![]);
    let (plan, report) = reconcile(&engine, &policy).await;
    assert!(plan.actions.is_empty(), "{}", plan::render(&plan));
    assert_eq!(report.failed, 0);
    let summary = &plan.pressure.as_ref().unwrap().summary;
    assert!(
        summary.contains("content store not counted") && summary.contains("not a content store"),
        "{summary}"
    );
    assert!(plan::render(&plan).contains("content store not counted"));
}

/// A store that cannot be shrunk at execution is a failed `prune_cache`
/// record with the store's words, and the actions after it still run.
#[tokio::test]
async fn a_store_that_cannot_be_shrunk_is_a_failed_record() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("oci-layout"), "not json").unwrap();
    let engine = FakeEngine::new(vec![img("a", 30.0, &["a:1"])], vec![]);
    let mut plan = Plan::default();
    let prune = Action {
        kind: Kind::PruneCache,
        reference: None,
        image: String::new(),
        rule: "storage".into(),
        reason: "test".into(),
        bytes: Some(10),
        keep_bytes: Some(0),
        cache: Some(CacheTarget {
            dir: cache,
            keep: vec![],
        }),
    };
    let evict = Action {
        kind: Kind::Evict,
        reference: Some("a:1".into()),
        image: engine.images()[0].id.clone(),
        cache: None,
        bytes: Some(MB),
        keep_bytes: None,
        ..prune.clone()
    };
    plan.actions = vec![prune, evict];
    let mut log = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
    let report = reconcile::execute(
        &engine,
        &plan,
        &mut log,
        "run-1",
        false,
        &FixedClock(NOW),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((report.failed, report.removed), (1, 1));
    let records = audit::read(&dir.path().join("audit.jsonl"))
        .unwrap()
        .records;
    let r = &records[0];
    assert_eq!(
        (r.action, r.outcome, r.bytes),
        (AuditAction::PruneCache, Outcome::Failed, None)
    );
    let error = r.error.as_deref().unwrap_or_default();
    assert!(error.contains("is not a content store"), "{error}");
    assert_eq!(
        (records[1].action, records[1].outcome),
        (AuditAction::Evict, Outcome::Ok)
    );
    assert!(engine.images().is_empty());
}
