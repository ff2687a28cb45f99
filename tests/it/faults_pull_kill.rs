//! A download killed (SIGKILL) mid-blob, against the real registry: the
//! test runs itself in a child process that downloads through a throttled
//! proxy, kills it past its first commit, and resumes in a new store handle
//! from every byte it wrote (the same boot) without fetching them again.

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stowage::store::{Descriptor, Store};

use crate::faults_pull::{Limits, MIB, Pushed, client, new_store, quiet, ranges};
use crate::net::{Fault, HttpProxy};

/// Set in the child process: what it downloads.
const CHILD_VAR: &str = "STOWAGE_FAULTS_PULL_CHILD";

/// What the child process of the kill -9 test downloads.
#[derive(Serialize, Deserialize)]
struct ChildJob {
    proxy: String,
    repository: String,
    blob: Descriptor,
    cache: std::path::PathBuf,
}

/// The child process, killed when the test ends early (a failed assertion).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// In the child: download the blob (until killed).
async fn child_download(job: &str) {
    let job: ChildJob = serde_json::from_str(job).expect("the child's job");
    let store = Store::open(&job.cache).unwrap();
    let src = client(&job.proxy).blobs(&job.repository);
    let limits = Limits::new(Duration::from_secs(30));
    store
        .fetch(&src, &job.blob, &limits.with(&quiet))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_mid_blob_resumes_from_its_committed_offset() {
    if let Ok(job) = std::env::var(CHILD_VAR) {
        return child_download(&job).await;
    }
    let Some(p) = Pushed::new("pull-kill", 12 << 20, 1 << 10).await else {
        return;
    };
    let base = p.base().clone();
    let proxy = HttpProxy::start(&p.registry, |_, _| Fault::Pass).await;
    proxy.set_rate(6 * MIB);
    let (dir, store) = new_store();
    let job = ChildJob {
        proxy: proxy.addr.clone(),
        repository: p.repository.clone(),
        blob: base.clone(),
        cache: store.root().to_path_buf(),
    };
    // This very test in a process of its own, downloading.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "faults_pull_kill::a_download_killed_mid_blob_resumes_from_its_committed_offset",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, serde_json::to_string(&job).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.partial_len(&base.digest).unwrap_or(0) < 4 * MIB {
        assert!(Instant::now() < deadline, "the child downloaded nothing");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the child ended early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed mid-blob: {status:?}");
    assert!(!store.has(&base.digest));

    // A new process (a new store handle) resumes from every byte the killed
    // one wrote: the same boot, so the page cache has them all, committed
    // or not.
    drop(store);
    let store = Store::open(&dir.path().join("cache")).unwrap();
    let committed = store.partial_len(&base.digest).unwrap();
    assert!(committed >= 4 * MIB && committed < base.size, "{committed}");
    let hex = base.digest.trim_start_matches("sha256:");
    let on_disk = std::fs::metadata(store.root().join("partial/sha256").join(hex))
        .unwrap()
        .len();
    assert_eq!(committed, on_disk, "nothing written is cut off");
    proxy.set_rate(0);
    // The killed child's answer is over once the proxy noticed it gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.open() > 0 {
        assert!(
            Instant::now() < deadline,
            "the child's connection did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = proxy.bytes();
    let limits = Limits::new(Duration::from_secs(5));
    let src = client(&proxy.addr).blobs(&p.repository);
    let got = store
        .fetch(&src, &base, &limits.with(&quiet))
        .await
        .unwrap();
    assert_eq!((got.resumed, got.bytes), (committed, base.size - committed));
    assert_eq!(
        ranges(&proxy, &base).last().unwrap().as_deref(),
        Some(format!("bytes={committed}-").as_str())
    );
    let wire = proxy.bytes() - before;
    assert!(
        wire >= base.size - committed && wire < base.size - committed + 4096,
        "the committed bytes are not fetched again: {wire} on the wire"
    );
    store.verify(&base.digest).unwrap();
}
