//! Disk pressure against real engines whose data root is a small tmpfs made
//! for the test: watermark eviction in LRU order with protections holding,
//! `max_size` over images sharing a base layer freeing exactly their unique
//! bytes, an unreachable target reported once, and the content store
//! counted and shrunk before any image is evicted.

use crate::engine_env;
use std::path::Path;
use std::process::Command;

use stowage::engine::{DockerEngine, Engine};

const DAY: i64 = 86_400;
const MIB: usize = 1024 * 1024;

use crate::engine_env::{stowage, text};

fn write_policy(dir: &Path, body: &str) -> std::path::PathBuf {
    write_policy_aged(dir, "1h", body)
}

fn write_policy_aged(dir: &Path, min_age: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\nmin_age = \"{min_age}\"\n{body}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    p
}

async fn ids(engine: &DockerEngine) -> Vec<String> {
    let mut v: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn watermark_eviction_reaches_low_in_lru_order_and_keeps_protected() {
    let Some(small) = engine_env::PrivateEngine::start(Some(320)) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    // Eight 10 MiB images, oldest first; #0 is used by a container, #1 protected.
    let images: Vec<_> = (0..8)
        .map(|i| {
            engine_env::image(
                &[&format!("fill/img{i}:v1")],
                now - (100 - i as i64) * DAY,
                10 * MIB,
            )
        })
        .collect();
    // In small batches: a load needs room for its archive besides the layers.
    for batch in images.chunks(2) {
        engine_env::load(&engine, batch).await;
    }
    engine_env::create_container(&small.addr, "fill/img0:v1");
    let (total, avail) = small.disk();
    let used_pct = (total - avail) as f64 * 100.0 / total as f64;
    // Ask for about three images' worth (30 MiB) to go.
    let high = (used_pct - 1.0).floor();
    let low = (used_pct - (30 * MIB) as f64 * 100.0 / total as f64).floor();
    eprintln!("data root at {used_pct:.1}%: high {high}%, low {low}%");
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "[[protect]]\nname = \"keep-one\"\nimages = [\"fill/img1\"]\n\n\
             [storage]\nhigh_watermark = \"{high}%\"\nlow_watermark = \"{low}%\"\n"
        ),
    );
    let plan = stowage(&small.addr, &policy, &["plan"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout).to_string();
    eprintln!("{shown}");
    assert!(shown.contains("> high_watermark"), "{shown}");

    let apply = stowage(&small.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let (total, avail) = small.disk();
    let after = (total - avail) as f64 * 100.0 / total as f64;
    assert!(
        after <= low,
        "still at {after:.1}% after eviction (low {low}%)"
    );
    // The least recently active unprotected images went, in that order.
    let audit = stowage::audit::read(&dir.path().join("state/audit.jsonl")).unwrap();
    let evicted: Vec<String> = audit
        .records
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Evict)
        .map(|r| r.reference.clone().unwrap_or_default())
        .collect();
    assert!(evicted.len() >= 3, "{evicted:?}");
    let want: Vec<String> = (2..2 + evicted.len())
        .map(|i| format!("fill/img{i}:v1"))
        .collect();
    assert_eq!(evicted, want);
    let left = ids(&engine).await;
    assert!(left.contains(&images[0].id()), "in-use image evicted");
    assert!(left.contains(&images[1].id()), "protected image evicted");
    assert!(left.contains(&images[7].id()), "most recent image evicted");
}

#[tokio::test]
async fn max_size_with_a_shared_base_frees_exactly_the_unique_bytes() {
    let Some(small) = engine_env::PrivateEngine::start(Some(200)) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let base = engine_env::unique_seed();
    // Four images on one 20 MiB base, 4 MiB each of their own, plus a lone
    // 8 MiB image: unique bytes = 20 + 4*4 + 8 = 44 MiB.
    let mut images: Vec<_> = (0..4)
        .map(|i| {
            engine_env::image(
                &[&format!("shared/app{i}:v1")],
                now - (50 - i as i64) * DAY,
                4 * MIB,
            )
            .with_base(base, 20 * MIB)
        })
        .collect();
    images.push(engine_env::image(&["lone/app:v1"], now - 10 * DAY, 8 * MIB));
    engine_env::load(&engine, &images).await;
    let before = engine.disk_usage().await.unwrap().layers_size;
    // 38 MiB allowed: the two oldest sharing images go (4 MiB each, the base
    // stays for the others): 8 MiB freed, 36 MiB left.
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!("[storage]\nmax_size = \"{}\"\n", 38 * MIB),
    );
    let apply = stowage(&small.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    eprintln!("{}", String::from_utf8_lossy(&apply.stdout));
    let after = engine.disk_usage().await.unwrap().layers_size;
    let audit = stowage::audit::read(&dir.path().join("state/audit.jsonl")).unwrap();
    let evicted: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Evict)
        .collect();
    let planned: u64 = evicted.iter().filter_map(|r| r.bytes).sum();
    let names: Vec<_> = evicted
        .iter()
        .map(|r| r.reference.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, vec!["shared/app0:v1", "shared/app1:v1"]);
    assert_eq!(
        before - after,
        planned,
        "engine freed {} bytes, plan said {planned}",
        before - after
    );
    assert!(after <= 38 * MIB as u64);
    let left = ids(&engine).await;
    assert!(left.contains(&images[2].id()) && left.contains(&images[4].id()));
}

#[tokio::test]
async fn unreachable_target_is_reported_once_with_protected_bytes() {
    let Some(small) = engine_env::PrivateEngine::start(Some(100)) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let images = [
        engine_env::image(&["db/main:v1"], now - 30 * DAY, 6 * MIB),
        engine_env::image(&["db/replica:v1"], now - 20 * DAY, 6 * MIB),
    ];
    engine_env::load(&engine, &images).await;
    engine_env::create_container(&small.addr, "db/replica:v1");
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "[[protect]]\nname = \"databases\"\nimages = [\"db/main\"]\n\n[storage]\nmax_size = \"1MB\"\n",
    );
    let apply = stowage(&small.addr, &policy, &["apply"]);
    // Not a failure: nothing failed, the target is out of reach.
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let audit = stowage::audit::read(&dir.path().join("state/audit.jsonl")).unwrap();
    let warns: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Warn)
        .collect();
    assert_eq!(warns.len(), 1, "{:#?}", audit.records);
    assert!(
        warns[0].reason.contains("out of reach"),
        "{}",
        warns[0].reason
    );
    assert!(warns[0].reason.contains("databases"), "{}", warns[0].reason);
    assert!(warns[0].reason.contains("in-use"), "{}", warns[0].reason);
    assert_eq!(ids(&engine).await.len(), 2);
}

#[tokio::test]
async fn a_large_load_is_answered_by_eviction_within_seconds() {
    let Some(small) = engine_env::PrivateEngine::start(Some(200)) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    // Two old images are already there: 20 MiB of a 25 MiB budget.
    let old: Vec<_> = (0..2)
        .map(|i| {
            engine_env::image(
                &[&format!("old/img{i}:v1")],
                now - (30 - i as i64) * DAY,
                10 * MIB,
            )
        })
        .collect();
    engine_env::load(&engine, &old).await;
    let dir = tempfile::tempdir().unwrap();
    // No schedule to speak of and no file watching: only the load's event
    // can make it reconcile after the first pass.
    let policy = write_policy(
        dir.path(),
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nwatch = false\ncontrol_socket = \"{}\"\n\n\
             [storage]\nmax_size = \"{}\"\n",
            dir.path().join("control.sock").display(),
            25 * MIB
        ),
    );
    let mut daemon = engine_env::stowage_cmd(&small.addr, &policy, &["run"])
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap())
        .spawn()
        .expect("starting stowage run");
    // Let the first reconcile pass (under budget: nothing to do).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let big = engine_env::image(&["new/big:v1"], now, 10 * MIB);
    let loaded_at = std::time::Instant::now();
    engine_env::load(&engine, std::slice::from_ref(&big)).await;
    let audit_path = dir.path().join("state/audit.jsonl");
    let mut evicted = Vec::new();
    while loaded_at.elapsed() < std::time::Duration::from_secs(20) {
        let audit = stowage::audit::read(&audit_path).unwrap();
        evicted = audit
            .records
            .iter()
            .filter(|r| r.action == stowage::audit::Action::Evict)
            .map(|r| r.reference.clone().unwrap_or_default())
            .collect();
        if !evicted.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let took = loaded_at.elapsed();
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let status = daemon.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    assert!(status.success(), "daemon exit {status:?}\n{log}");
    // 30 MiB against 25: the least recently active goes; the new image is
    // protected by min_age.
    assert_eq!(evicted, vec!["old/img0:v1"], "{log}");
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert!(log.contains("images pulled or loaded"), "{log}");
    eprintln!("load to eviction: {took:?}");
}

/// A content store of made-up blobs pushes the images over `max_size`:
/// `apply` shrinks the store (least recently used blobs) and evicts
/// nothing; with a lower `max_size`, the store goes whole before the
/// oldest image, in that order in the audit log.
#[tokio::test]
async fn the_content_store_shrinks_before_any_image_is_evicted() {
    let Some(small) = engine_env::PrivateEngine::start(Some(200)) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let images: Vec<_> = (0..3)
        .map(|i| {
            engine_env::image(
                &[&format!("cached/app{i}:v1")],
                now - (30 - i) * DAY,
                4 * MIB,
            )
        })
        .collect();
    engine_env::load(&engine, &images).await;
    let layers = engine.disk_usage().await.unwrap().layers_size;

    let dir = tempfile::tempdir().unwrap();
    let store = stowage::store::Store::open(&dir.path().join("state/cache")).unwrap();
    // Four 2 MiB blobs, the first used longest ago.
    let blobs: Vec<String> = (0..4u8)
        .map(|i| {
            let bytes: Vec<u8> = (0..2 * MIB)
                .map(|k| (k as u8).wrapping_mul(7) ^ i)
                .collect();
            let digest = format!(
                "sha256:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            );
            let desc = stowage::store::Descriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                digest: digest.clone(),
                size: bytes.len() as u64,
            };
            store.put(&desc, &bytes).unwrap();
            let age = std::time::Duration::from_secs(3600 * (4 - u64::from(i)));
            std::fs::File::options()
                .write(true)
                .open(store.root().join("blobs/sha256").join(&digest[7..]))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - age)
                .unwrap();
            digest
        })
        .collect();
    let cache = 8 * MIB as u64;
    assert_eq!(store.usage().complete, cache);

    // 3 MiB over: two blobs go (whole), no image.
    let policy = write_policy_aged(
        dir.path(),
        "0s",
        &format!(
            "[storage]\nmax_size = {}\n",
            layers + cache - 3 * MIB as u64
        ),
    );
    let plan = stowage(&small.addr, &policy, &["plan"]);
    let shown = String::from_utf8_lossy(&plan.stdout).to_string();
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    assert!(
        shown.contains("<content store>") && shown.contains("prune_cache"),
        "{shown}"
    );
    assert!(
        shown.contains("content store 8.4 MB: complete blobs 8.4 MB"),
        "{shown}"
    );
    assert!(!shown.contains("  evict "), "{shown}");
    let apply = stowage(&small.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let kept: Vec<bool> = blobs.iter().map(|b| store.has(b)).collect();
    assert_eq!(
        kept,
        [false, false, true, true],
        "least recently used first"
    );
    assert_eq!(ids(&engine).await.len(), 3, "no image evicted");
    let audit_path = dir.path().join("state/audit.jsonl");
    let records = stowage::audit::read(&audit_path).unwrap().records;
    let pruned: Vec<_> = records
        .iter()
        .map(|r| (r.action, r.outcome, r.bytes))
        .collect();
    assert_eq!(
        pruned,
        [(
            stowage::audit::Action::PruneCache,
            stowage::audit::Outcome::Ok,
            Some(4 * MIB as u64)
        )]
    );

    // 1 MiB under the images alone: the store's 4 MiB go first, then the
    // oldest image.
    let policy = write_policy_aged(
        dir.path(),
        "0s",
        &format!("[storage]\nmax_size = {}\n", layers - MIB as u64),
    );
    let apply = stowage(&small.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    eprintln!("{}", String::from_utf8_lossy(&apply.stdout));
    assert_eq!(store.usage().complete, 0);
    let records = stowage::audit::read(&audit_path).unwrap().records;
    let run = &records.last().unwrap().run;
    let order: Vec<_> = records
        .iter()
        .filter(|r| &r.run == run)
        .map(|r| (r.action, r.reference.clone()))
        .collect();
    assert_eq!(
        order,
        [
            (stowage::audit::Action::PruneCache, None),
            (
                stowage::audit::Action::Evict,
                Some("cached/app0:v1".to_owned())
            ),
        ]
    );
    let left = ids(&engine).await;
    assert!(
        !left.contains(&images[0].id()) && left.len() == 2,
        "{left:?}"
    );
}
