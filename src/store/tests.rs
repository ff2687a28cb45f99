//! The store on a temp folder with an in-memory [`BlobSource`] whose every
//! answer is scripted: cuts, stalls, ignored ranges, wrong bytes, failures.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::*;

const MIB: usize = 1 << 20;

/// What one answer of [`Mem`] does.
#[derive(Debug, Clone)]
enum Act {
    Serve,
    /// The body breaks off after this many bytes.
    Cut(usize),
    /// 200 with the whole blob, whatever the offset.
    IgnoreRange,
    /// The byte at this absolute position arrives flipped.
    Flip(usize),
    /// This many bytes, then nothing, forever.
    StallAfter(usize),
    /// This many bytes more than the blob has.
    Extra(usize),
    Fail(SourceError),
}

struct Mem {
    data: Bytes,
    script: Mutex<VecDeque<Act>>,
    /// After the script: what every answer does.
    then: Act,
    asked: Mutex<Vec<u64>>,
}

impl Mem {
    fn new(data: Bytes, script: &[Act], then: Act) -> Mem {
        Mem {
            data,
            script: Mutex::new(script.iter().cloned().collect()),
            then,
            asked: Mutex::new(Vec::new()),
        }
    }

    fn asked(&self) -> Vec<u64> {
        self.asked.lock().unwrap().clone()
    }
}

impl BlobSource for Mem {
    fn fetch(
        &self,
        _digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BlobBody, SourceError>> + Send {
        let act = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.then.clone());
        self.asked.lock().unwrap().push(offset);
        let data = self.data.clone();
        async move {
            let offset = offset as usize;
            let start = if matches!(act, Act::IgnoreRange) {
                0
            } else {
                offset
            };
            let mut body = data[start..].to_vec();
            let mut tail: Option<Result<Bytes, SourceError>> = None;
            let mut stall = false;
            match act {
                Act::Fail(e) => return Err(e),
                Act::Cut(n) => {
                    body.truncate(n);
                    tail = Some(Err(SourceError::Io("connection reset".into())));
                }
                Act::Flip(i) if i >= start && i - start < body.len() => body[i - start] ^= 0xff,
                Act::StallAfter(n) => {
                    body.truncate(n);
                    stall = true;
                }
                Act::Extra(n) => body.extend(std::iter::repeat_n(7u8, n)),
                _ => {}
            }
            let chunks: Vec<Result<Bytes, SourceError>> = body
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .chain(tail)
                .collect();
            let stream = futures_util::stream::iter(chunks);
            let stream = if stall {
                stream.chain(futures_util::stream::pending()).boxed()
            } else {
                stream.boxed()
            };
            Ok(BlobBody {
                start: start as u64,
                stream,
            })
        }
    }

    fn name(&self) -> &str {
        "mem:5000"
    }
}

pub(super) fn blob(size: usize, seed: u8) -> (Bytes, Descriptor) {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect();
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&data))),
        size: size as u64,
    };
    (Bytes::from(data), desc)
}

fn hex(desc: &Descriptor) -> &str {
    &desc.digest[7..]
}

struct Opts {
    cancel: CancellationToken,
    stall: Duration,
    give_up: Duration,
}

impl Opts {
    fn new() -> Opts {
        Opts {
            cancel: CancellationToken::new(),
            stall: Duration::from_secs(30),
            give_up: Duration::from_secs(300),
        }
    }

    fn with<'a>(&'a self, progress: &'a (dyn Fn(Progress) + Sync)) -> FetchOptions<'a> {
        FetchOptions {
            stall: self.stall,
            give_up: self.give_up,
            cancel: &self.cancel,
            progress,
        }
    }
}

fn quiet(_: Progress) {}

pub(super) fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    (dir, store)
}

/// A partial as a killed download leaves it: `bytes` on disk, `committed`
/// in the sidecar (`None`: no sidecar).
pub(super) fn leave_partial(
    store: &Store,
    desc: &Descriptor,
    bytes: &[u8],
    committed: Option<u64>,
) {
    let data = store.partial_dir().join(hex(desc));
    fs::write(&data, bytes).unwrap();
    if let Some(n) = committed {
        fs::write(format!("{}.offset", data.display()), format!("{n}\n")).unwrap();
    }
}

#[tokio::test]
async fn a_cut_resumes_from_where_it_stopped() {
    let (_d, store) = open();
    let (data, desc) = blob(10 * MIB, 1);
    let src = Mem::new(data.clone(), &[Act::Cut(5 * MIB)], Act::Serve);
    let o = Opts::new();
    let got = store.fetch(&src, &desc, &o.with(&quiet)).await.unwrap();
    assert_eq!(src.asked(), vec![0, 5 * MIB as u64]);
    assert_eq!(
        got,
        Fetched {
            bytes: 10 * MIB as u64,
            resumed: 0,
            retries: 1
        }
    );
    assert!(store.has(&desc.digest));
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
    assert_eq!(store.partial_len(&desc.digest), None, "the partial is gone");
    assert_eq!(
        store.usage(),
        Usage {
            complete: 10 * MIB as u64,
            partial: 0
        }
    );
    // Already there: nothing is asked.
    let again = store.fetch(&src, &desc, &o.with(&quiet)).await.unwrap();
    assert_eq!(again, Fetched::default());
    assert_eq!(src.asked().len(), 2);
}

#[tokio::test]
async fn a_partial_left_by_another_process_is_resumed_not_fetched_again() {
    let (d, store) = open();
    let (data, desc) = blob(6 * MIB, 2);
    let held = 3 * MIB;
    leave_partial(&store, &desc, &data[..held], Some(held as u64));
    drop(store);
    let store = Store::open(&d.path().join("cache")).unwrap();
    assert_eq!(store.partial_len(&desc.digest), Some(held as u64));
    let src = Mem::new(data, &[], Act::Serve);
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(src.asked(), vec![held as u64]);
    assert_eq!(got.resumed, held as u64);
    assert_eq!(got.bytes, (6 * MIB - held) as u64);
    assert!(store.has(&desc.digest));
}

#[tokio::test]
async fn bytes_past_the_committed_offset_are_cut_off_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let store = Store::open(&root).unwrap();
    let (data, desc) = blob(4 * MIB, 3);
    // Killed after writing 3 MiB but committing 1 MiB: the rest may be torn.
    leave_partial(&store, &desc, &data[..3 * MIB], Some(MIB as u64));
    let (other_data, other) = blob(1000, 4);
    // No sidecar: nothing was committed, nothing is trusted.
    leave_partial(&store, &other, &other_data[..500], None);
    // A sidecar whose data went (renamed into blobs/ before a crash), and a
    // temp file of an atomic write.
    let orphan = store
        .partial_dir()
        .join(format!("{}.offset", "ab".repeat(32)));
    fs::write(&orphan, "12\n").unwrap();
    let temp = store
        .blobs_dir()
        .join(format!(".{}.tmp.1.2", "cd".repeat(32)));
    fs::write(&temp, "half").unwrap();
    // Left by a dead writer: older than any write takes.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&temp)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // Another process's write in flight: kept.
    let fresh = store
        .blobs_dir()
        .join(format!(".{}.tmp.3.4", "ef".repeat(32)));
    fs::write(&fresh, "half").unwrap();
    drop(store);

    let store = Store::open(&root).unwrap();
    let data_path = store.partial_dir().join(hex(&desc));
    assert_eq!(fs::metadata(&data_path).unwrap().len(), MIB as u64);
    assert_eq!(store.partial_len(&desc.digest), Some(MIB as u64));
    assert_eq!(store.partial_len(&other.digest), Some(0));
    assert!(!orphan.exists() && !temp.exists());
    assert!(fresh.exists(), "a temp file of a write in flight survives");

    let src = Mem::new(data, &[], Act::Serve);
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(src.asked(), vec![MIB as u64]);
    assert_eq!(got.resumed, MIB as u64);
}

/// This kernel's boot id, as the partial's sidecar records it.
fn this_boot() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_owned()
}

/// `N BOOT` in the sidecar, as a commit writes it.
fn leave_partial_of_boot(
    store: &Store,
    desc: &Descriptor,
    bytes: &[u8],
    committed: u64,
    boot: &str,
) {
    leave_partial(store, desc, bytes, None);
    let data = store.partial_dir().join(hex(desc));
    fs::write(
        format!("{}.offset", data.display()),
        format!("{committed} {boot}\n"),
    )
    .unwrap();
}

/// `desc` fetched from a source serving `data` as asked: what it asked
/// for and what the fetch took.
async fn fetch_served(store: &Store, data: &Bytes, desc: &Descriptor) -> (Vec<u64>, Fetched) {
    let src = Mem::new(data.clone(), &[], Act::Serve);
    let got = store
        .fetch(&src, desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    (src.asked(), got)
}

#[tokio::test]
async fn a_partial_killed_in_this_boot_keeps_every_byte_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let store = Store::open(&root).unwrap();
    let (data, desc) = blob(4 * MIB, 9);
    // A kill -9 after writing 3 MiB and committing 1 MiB: the page cache
    // holds all 3, fsynced or not.
    leave_partial_of_boot(&store, &desc, &data[..3 * MIB], MIB as u64, &this_boot());
    drop(store);
    let store = Store::open(&root).unwrap();
    assert_eq!(store.partial_len(&desc.digest), Some(3 * MIB as u64));
    let (asked, got) = fetch_served(&store, &data, &desc).await;
    assert_eq!(
        asked,
        vec![3 * MIB as u64],
        "nothing written is fetched again"
    );
    assert_eq!((got.resumed, got.bytes), (3 * MIB as u64, MIB as u64));
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
}

#[tokio::test]
async fn after_a_reboot_only_the_committed_bytes_of_a_partial_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let store = Store::open(&root).unwrap();
    let (data, desc) = blob(4 * MIB, 10);
    let other_boot = "00000000-0000-4000-8000-000000000000";
    assert_ne!(this_boot(), other_boot);
    leave_partial_of_boot(&store, &desc, &data[..3 * MIB], MIB as u64, other_boot);
    drop(store);
    let store = Store::open(&root).unwrap();
    let data_path = store.partial_dir().join(hex(&desc));
    assert_eq!(
        fs::metadata(&data_path).unwrap().len(),
        MIB as u64,
        "the tail may be torn"
    );
    assert_eq!(store.partial_len(&desc.digest), Some(MIB as u64));
    let sidecar = fs::read_to_string(format!("{}.offset", data_path.display())).unwrap();
    assert_eq!(
        sidecar,
        format!("{MIB} {}\n", this_boot()),
        "committed again in this boot"
    );
    let (asked, got) = fetch_served(&store, &data, &desc).await;
    assert_eq!(asked, vec![MIB as u64]);
    assert_eq!(got.resumed, MIB as u64);
}

#[tokio::test]
async fn a_wrong_tail_kept_in_this_boot_is_caught_by_the_hash_and_fetched_again() {
    let (_d, store) = open();
    let (data, desc) = blob(2 * MIB, 11);
    let mut bad = data[..3 * MIB / 2].to_vec();
    bad[MIB + 77] ^= 1;
    leave_partial_of_boot(&store, &desc, &bad, MIB as u64, &this_boot());
    let (asked, got) = fetch_served(&store, &data, &desc).await;
    assert_eq!(
        asked,
        vec![3 * MIB as u64 / 2, 0],
        "resumed, then again from zero"
    );
    assert_eq!(got.retries, 1);
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
}

#[tokio::test]
async fn a_corrupt_partial_is_discarded_and_fetched_again_from_zero() {
    let (_d, store) = open();
    let (data, desc) = blob(2 * MIB, 5);
    let mut bad = data[..MIB].to_vec();
    bad[1234] ^= 1;
    leave_partial(&store, &desc, &bad, Some(MIB as u64));
    let src = Mem::new(data.clone(), &[], Act::Serve);
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(src.asked(), vec![MIB as u64, 0]);
    assert_eq!(got.retries, 1);
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
}

#[tokio::test]
async fn wrong_bytes_twice_are_a_verify_error_naming_the_blob_and_the_source() {
    let (_d, store) = open();
    let (data, desc) = blob(300_000, 6);
    let src = Mem::new(data, &[], Act::Flip(77));
    let err = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap_err();
    match &err {
        StoreError::Verify { digest, from, why } => {
            assert_eq!(digest, &desc.digest);
            assert_eq!(from, "mem:5000");
            assert!(why.starts_with("its sha256 is sha256:"), "{why}");
        }
        other => panic!("expected a verify error, got {other:?}"),
    }
    assert!(err.to_string().contains(&desc.digest), "{err}");
    assert_eq!(src.asked(), vec![0, 0], "one refetch, from zero");
    assert!(!store.has(&desc.digest));
    assert_eq!(store.usage().partial, 0, "the wrong bytes are not kept");
}

#[tokio::test]
async fn more_bytes_than_the_size_is_a_mismatch() {
    let (_d, store) = open();
    let (data, desc) = blob(100_000, 7);
    let src = Mem::new(data.clone(), &[Act::Extra(10)], Act::Extra(1));
    let err = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Verify { why, .. } if why.contains("more than the 100000 bytes")),
        "{err:?}"
    );
    // Once only: the second answer is right.
    let src = Mem::new(data, &[Act::Extra(10)], Act::Serve);
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(got.retries, 1);
    assert!(store.has(&desc.digest));
}

#[tokio::test]
async fn a_server_ignoring_the_range_has_the_held_bytes_skipped() {
    let (_d, store) = open();
    let (data, desc) = blob(3 * MIB, 8);
    leave_partial(&store, &desc, &data[..2 * MIB], Some(2 * MIB as u64));
    let src = Mem::new(data.clone(), &[], Act::IgnoreRange);
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(src.asked(), vec![2 * MIB as u64]);
    assert_eq!(got.resumed, 2 * MIB as u64);
    // The whole body came over the wire, skipped bytes included.
    assert_eq!(got.bytes, 3 * MIB as u64);
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
}

#[tokio::test(start_paused = true)]
async fn a_stall_ends_the_attempt_and_the_next_resumes() {
    let (_d, store) = open();
    let (data, desc) = blob(3 * MIB, 9);
    let src = Mem::new(data, &[Act::StallAfter(2 * MIB)], Act::Serve);
    let mut o = Opts::new();
    o.stall = Duration::from_secs(20);
    let started = tokio::time::Instant::now();
    let got = store.fetch(&src, &desc, &o.with(&quiet)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(20));
    assert_eq!(src.asked(), vec![0, 2 * MIB as u64]);
    assert_eq!(got.retries, 1);
    assert_eq!(got.bytes, 3 * MIB as u64);
}

#[tokio::test(start_paused = true)]
async fn retries_with_backoff_then_gives_up_after_no_new_byte() {
    let (_d, store) = open();
    let (data, desc) = blob(MIB, 10);
    let down = SourceError::Io("connection refused".into());
    let src = Mem::new(data, &[Act::Cut(1000)], Act::Fail(down.clone()));
    let mut o = Opts::new();
    o.give_up = Duration::from_secs(60);
    let started = tokio::time::Instant::now();
    let err = store.fetch(&src, &desc, &o.with(&quiet)).await.unwrap_err();
    let took = started.elapsed();
    match &err {
        StoreError::GaveUp {
            kept,
            source,
            after,
            ..
        } => {
            assert_eq!(*kept, 1000, "the bytes before the cut are committed");
            assert_eq!(source, &down);
            assert_eq!(*after, Duration::from_secs(60));
        }
        other => panic!("expected giving up, got {other:?}"),
    }
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(75),
        "{took:?}"
    );
    // 0.5 s doubling to 10 s (jittered down by up to half) within 60 s.
    let asked = src.asked();
    assert!((7..=40).contains(&asked.len()), "{asked:?}");
    assert!(asked[1..].iter().all(|&o| o == 1000), "{asked:?}");
    assert_eq!(store.partial_len(&desc.digest), Some(1000));
}

#[tokio::test]
async fn an_error_that_is_not_retryable_fails_at_once() {
    let (_d, store) = open();
    let (data, desc) = blob(1000, 11);
    let src = Mem::new(
        data,
        &[],
        Act::Fail(SourceError::NotFound {
            repository: "team/app".into(),
            message: "BLOB_UNKNOWN: blob unknown to registry".into(),
        }),
    );
    let err = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Source {
                source: SourceError::NotFound { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "blob {} from mem:5000: the registry has no such blob in team/app: \
             BLOB_UNKNOWN: blob unknown to registry",
            desc.digest
        )
    );
    assert_eq!(src.asked().len(), 1);
}

#[tokio::test]
async fn cancel_commits_what_arrived_and_the_next_call_resumes() {
    let (_d, store) = open();
    let (data, desc) = blob(4 * MIB, 12);
    let src = Mem::new(data.clone(), &[Act::StallAfter(2 * MIB)], Act::Serve);
    let o = Opts::new();
    let cancel = o.cancel.clone();
    let seen = Mutex::new(Vec::new());
    let progress = |p: Progress| {
        seen.lock().unwrap().push(p);
        cancel.cancel();
    };
    let err = store
        .fetch(&src, &desc, &o.with(&progress))
        .await
        .unwrap_err();
    let StoreError::Interrupted { kept, .. } = err else {
        panic!("expected an interruption, got {err:?}");
    };
    assert!(kept >= MIB as u64, "{kept}");
    assert_eq!(seen.lock().unwrap()[0].size, 4 * MIB as u64);
    assert_eq!(store.partial_len(&desc.digest), Some(kept));
    let got = store
        .fetch(&src, &desc, &Opts::new().with(&quiet))
        .await
        .unwrap();
    assert_eq!(got.resumed, kept);
    assert_eq!(src.asked(), vec![0, kept]);
    assert_eq!(
        fs::read(store.blob_path(&desc.digest).unwrap()).unwrap(),
        data
    );
}

#[tokio::test]
async fn two_downloads_of_one_blob_take_turns() {
    let (_d, store) = open();
    let (data, desc) = blob(3 * MIB, 13);
    let src = Mem::new(data, &[], Act::Serve);
    let o = Opts::new();
    let opts = o.with(&quiet);
    let (a, b) = tokio::join!(
        store.fetch(&src, &desc, &opts),
        store.fetch(&src, &desc, &opts)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.bytes + b.bytes, 3 * MIB as u64, "{a:?} {b:?}");
    assert_eq!(src.asked().len(), 1);
    assert!(store.has(&desc.digest));
}

#[test]
fn put_checks_size_and_sha256() {
    let (_d, store) = open();
    let (data, desc) = blob(100, 14);
    let short = Descriptor {
        size: 99,
        ..desc.clone()
    };
    assert!(matches!(
        store.put(&short, &data),
        Err(StoreError::Verify { .. })
    ));
    let mut wrong = data.to_vec();
    wrong[0] ^= 1;
    let err = store.put(&desc, &wrong).unwrap_err();
    assert!(err.to_string().contains("its sha256 is sha256:"), "{err}");
    assert!(!store.has(&desc.digest));
    let bad = Descriptor {
        digest: "sha512:00".into(),
        ..desc.clone()
    };
    assert!(matches!(
        store.put(&bad, &data),
        Err(StoreError::BadDigest(_))
    ));
    store.put(&desc, &data).unwrap();
    assert!(store.has(&desc.digest));
}

#[test]
fn verify_finds_a_complete_blob_corrupted_on_disk_and_removes_it() {
    let (_d, store) = open();
    let (data, desc) = blob(5000, 15);
    store.put(&desc, &data).unwrap();
    store.verify(&desc.digest).unwrap();
    let path = store.blob_path(&desc.digest).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[4000] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    let err = store.verify(&desc.digest).unwrap_err();
    assert!(
        matches!(&err, StoreError::Verify { digest, why, .. } if digest == &desc.digest && why.contains("removed")),
        "{err:?}"
    );
    assert!(!store.has(&desc.digest));
}

#[test]
fn open_refuses_a_folder_that_is_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"9"}"#,
    )
    .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Layout { .. }), "{err:?}");
    assert!(!dir.path().join("blobs").exists(), "nothing was created");
    // A fresh one is a valid layout.
    let (d, _store) = open();
    let layout: serde_json::Value =
        serde_json::from_slice(&fs::read(d.path().join("cache/oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(d.path().join("cache/index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"], serde_json::json!([]));
}

/// An image in the store: config, one layer, the manifest naming them.
pub(super) fn image(store: &Store, seed: u8) -> (Descriptor, Descriptor, Descriptor) {
    let (config, config_desc) = blob(200, seed);
    let (layer, layer_desc) = blob(3000, seed.wrapping_add(100));
    store.put(&config_desc, &config).unwrap();
    store.put(&layer_desc, &layer).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }))
    .unwrap();
    let manifest_desc = Descriptor {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&manifest))),
        size: manifest.len() as u64,
    };
    store.put(&manifest_desc, &manifest).unwrap();
    (manifest_desc, config_desc, layer_desc)
}

#[test]
fn add_image_needs_every_blob_and_a_moved_tag_replaces_its_entry() {
    let (_d, store) = open();
    let (m1, _, layer1) = image(&store, 20);
    store.add_image("docker.io/library/a:1", &m1, &m1).unwrap();
    let (m2, _, layer2) = image(&store, 21);
    fs::remove_file(store.blob_path(&layer2.digest).unwrap()).unwrap();
    let err = store
        .add_image("docker.io/library/a:1", &m2, &m2)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Incomplete { missing, .. } if missing == &layer2.digest),
        "{err:?}"
    );
    assert_eq!(
        index::images(&store),
        vec![(
            "docker.io/library/a:1".into(),
            m1.digest.clone(),
            m1.digest.clone()
        )]
    );
    image(&store, 21);
    store.add_image("docker.io/library/a:1", &m2, &m2).unwrap();
    store.add_image("docker.io/library/b:1", &m1, &m1).unwrap();
    let names: Vec<_> = index::images(&store)
        .into_iter()
        .map(|(n, d, _)| (n, d))
        .collect();
    assert_eq!(
        names,
        vec![
            ("docker.io/library/a:1".into(), m2.digest.clone()),
            ("docker.io/library/b:1".into(), m1.digest.clone())
        ]
    );
    // An entry whose blobs go is dropped by gc.
    let wanted: HashSet<String> = [&m2, &layer1].iter().map(|d| d.digest.clone()).collect();
    store.gc(0, &wanted).unwrap();
    assert!(
        index::images(&store).is_empty(),
        "{:?}",
        index::images(&store)
    );
}

#[test]
fn gc_keeps_the_most_recently_used_up_to_cache_max_and_wanted_partials() {
    let (_d, store) = open();
    let t0 = std::time::SystemTime::now() - Duration::from_secs(3600);
    let mut descs = Vec::new();
    for (i, seed) in [30u8, 31, 32].into_iter().enumerate() {
        let (data, desc) = blob(100, seed);
        store.put(&desc, &data).unwrap();
        let f = fs::File::options()
            .write(true)
            .open(store.blob_path(&desc.digest).unwrap())
            .unwrap();
        f.set_modified(t0 + Duration::from_secs(60 * i as u64))
            .unwrap();
        descs.push(desc);
    }
    let [oldest, middle, newest] = [&descs[0], &descs[1], &descs[2]];
    let (p1_data, p1) = blob(1000, 33);
    let (p2_data, p2) = blob(1000, 34);
    leave_partial(&store, &p1, &p1_data[..400], Some(400));
    leave_partial(&store, &p2, &p2_data[..300], Some(300));
    // The oldest is wanted (an image being pulled needs it): it stays.
    let wanted: HashSet<String> = [oldest, &p1].iter().map(|d| d.digest.clone()).collect();
    let freed = store.gc(250, &wanted).unwrap();
    assert_eq!(freed, 100 + 300);
    assert!(store.has(&oldest.digest) && store.has(&newest.digest));
    assert!(!store.has(&middle.digest));
    assert_eq!(store.partial_len(&p1.digest), Some(400));
    assert_eq!(store.partial_len(&p2.digest), None);
    assert!(
        !store
            .partial_dir()
            .join(format!("{}.offset", hex(&p2)))
            .exists()
    );
    // Under the cap: nothing more goes.
    assert_eq!(store.gc(250, &wanted).unwrap(), 0);
    // Serving or verifying is a use: the oldest becomes the newest.
    store.verify(&oldest.digest).unwrap();
    assert_eq!(
        store.gc(100, &HashSet::from([p1.digest.clone()])).unwrap(),
        100
    );
    assert!(store.has(&oldest.digest) && !store.has(&newest.digest));
    assert_eq!(
        store.usage(),
        Usage {
            complete: 100,
            partial: 400
        }
    );
    assert_eq!(store.gc(0, &HashSet::new()).unwrap(), 500);
    assert_eq!(store.usage(), Usage::default());
}

#[test]
fn gc_leaves_a_partial_that_a_download_holds() {
    let (_d, store) = open();
    let (data, desc) = blob(1000, 40);
    leave_partial(&store, &desc, &data[..10], Some(10));
    let held = partial::Partial::try_open(&store.partial_dir(), hex(&desc), false)
        .unwrap()
        .unwrap();
    assert_eq!(store.gc(0, &HashSet::new()).unwrap(), 0);
    assert_eq!(store.partial_len(&desc.digest), Some(10));
    drop(held);
    assert_eq!(store.gc(0, &HashSet::new()).unwrap(), 10);
}

#[test]
fn a_download_can_be_spawned() {
    fn send<T: Send>(_: &T) {}
    let (_d, store) = open();
    let (data, desc) = blob(10, 60);
    let src = Mem::new(data, &[], Act::Serve);
    let o = Opts::new();
    let opts = o.with(&quiet);
    // The daemon runs pulls in spawned tasks: the future must be `Send`.
    send(&store.fetch(&src, &desc, &opts));
}
