//! The content store under `cache_dir`: an OCI image layout that stowage
//! downloads blobs into, resumably and verified, before any engine sees them.
//!
//! ```text
//! oci-layout                  {"imageLayoutVersion":"1.0.0"}
//! index.json                  one entry per complete image (ref.name = its reference)
//! blobs/sha256/<hex>          complete blobs: size and sha256 matched
//! partial/sha256/<hex>        a download so far (append-only)
//! partial/sha256/<hex>.offset its committed length, written after the data's fsync
//! partial/index.lock          serialises rewrites of index.json between processes
//! ```
//!
//! A blob is in `blobs/` only after its size and sha256 matched; partials
//! live apart and are never served ([`serve`]). Every file is written like
//! the state ([`crate::state::write_atomic`]: temp, fsync, rename, fsync of
//! the folder), and a partial is cut back to its committed offset when next
//! opened after a reboot (in the same boot every byte it wrote is kept: see
//! `partial`), so a kill -9 or a power cut at any byte leaves a valid
//! partial or nothing. A partial is `flock`ed while a download writes it: one writer per
//! blob, in this process or another.
//!
//! Last use of a complete blob is its file's mtime, set whenever it is stored,
//! verified or served: [`Store::gc`] keeps the most recently used up to
//! `cache_max`.
//!
//! Everything but [`Store::fetch`] and [`serve`] does blocking file I/O: on
//! the daemon's loop call it through [`crate::blocking::off_loop`].

mod fetch;
mod index;
mod partial;
pub mod serve;
#[cfg(test)]
mod tests;

use std::fs;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::state::{is_temp_name, write_atomic};

pub use fetch::{FetchOptions, Fetched, Progress};
pub use serve::{Serving, serve};

/// An OCI content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<64 hex>`: only sha256 is accepted.
    pub digest: String,
    pub size: u64,
}

/// Where blobs come from (the registry client implements it).
pub trait BlobSource: Send + Sync {
    /// The blob from byte `offset` on (HTTP `Range: bytes=offset-` when
    /// `offset > 0`).
    fn fetch(
        &self,
        digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BlobBody, SourceError>> + Send;
    /// `host[:port]` of this source, for messages and the audit log.
    fn name(&self) -> &str;
}

/// The answer to [`BlobSource::fetch`].
pub struct BlobBody {
    /// Where the body starts: the offset asked for when the server honoured
    /// the range (206), 0 when it ignored it (200 with the whole blob): the
    /// store then skips what it already has.
    pub start: u64,
    pub stream: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, SourceError>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// Why a source could not give (more of) a blob. [`SourceError::retryable`]
/// says whether the download loop tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The connection failed, was cut or reset: retryable.
    #[error("{0}")]
    Io(String),
    /// An HTTP status the source did not expect; 5xx and 429 are retryable.
    #[error("the registry answered HTTP {code}")]
    Status { code: u16, retryable: bool },
    /// 404: the repository it was asked in and the registry's message.
    #[error("the registry has no such blob in {repository}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    NotFound { repository: String, message: String },
    #[error("the registry refused the credentials (or asked for some)")]
    Unauthorized,
    /// Anything else the source will not do, said in its words.
    #[error("{0}")]
    Refused(String),
    #[error("the answer is larger than allowed")]
    TooLarge,
    #[error("the registry's redirects loop")]
    RedirectLoop,
}

impl SourceError {
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Io(_) => true,
            SourceError::Status { retryable, .. } => *retryable,
            SourceError::NotFound { .. }
            | SourceError::Unauthorized
            | SourceError::Refused(_)
            | SourceError::TooLarge
            | SourceError::RedirectLoop => false,
        }
    }
}

/// Typed content-store errors; each names the blob or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid blob: {0}")]
    BadDigest(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The disk filled up: the partial keeps its last committed bytes.
    #[error(
        "no space left writing blob {digest} to {}: {kept} bytes kept there to resume from once space is freed",
        path.display()
    )]
    NoSpace {
        digest: String,
        path: PathBuf,
        kept: u64,
        source: std::io::Error,
    },
    /// The bytes did not match the descriptor, twice: never stored.
    #[error("blob {digest} from {from} failed verification: {why}")]
    Verify {
        digest: String,
        from: String,
        why: String,
    },
    /// The source cannot give the blob (an error that is not retried).
    #[error("blob {digest} from {from}: {source}")]
    Source {
        digest: String,
        from: String,
        source: SourceError,
    },
    /// Retryable errors, but no new byte for the whole give-up window.
    #[error(
        "blob {digest} from {from}: no progress for {}, giving up ({kept} bytes kept): {source}",
        humantime::format_duration(*after)
    )]
    GaveUp {
        digest: String,
        from: String,
        after: std::time::Duration,
        kept: u64,
        source: SourceError,
    },
    /// Cancelled; the partial keeps its bytes for the next attempt.
    #[error("download of blob {digest} interrupted ({kept} bytes kept)")]
    Interrupted { digest: String, kept: u64 },
    /// `add_image` with a blob of the image not (yet) in the store.
    #[error("image {name} is not complete in the content store: blob {missing} is missing")]
    Incomplete { name: String, missing: String },
    /// `cache_dir` holds something that is not a content store.
    #[error("{} is not a content store: {why}", path.display())]
    Layout { path: PathBuf, why: String },
}

/// Bytes on disk in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Complete, verified blobs.
    pub complete: u64,
    /// Partial downloads.
    pub partial: u64,
}

/// The content store in one folder. Cheap to clone (shares its lock).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Serialises `index.json` rewrites within the process (the `flock` on
    /// `partial/index.lock` does between processes).
    index: Arc<Mutex<()>>,
    /// The fsyncs of blobs completed by this handle, still running.
    syncing: Arc<Mutex<Vec<tokio::task::JoinHandle<std::io::Result<()>>>>>,
}

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
pub(crate) const INDEX_FILE: &str = "index.json";

impl Store {
    /// Opens (creating when missing) the store in `cache_dir`: the layout
    /// files, temp files a crash left removed, partials that no download
    /// holds settled (cut back to their committed offset after a reboot).
    /// A folder whose `oci-layout`
    /// says something else is refused, untouched.
    pub fn open(cache_dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            root: cache_dir.to_path_buf(),
            index: Arc::default(),
            syncing: Arc::default(),
        };
        let layout = cache_dir.join(LAYOUT_FILE);
        match fs::read(&layout) {
            Ok(text) => {
                let version = serde_json::from_slice::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["imageLayoutVersion"].as_str().map(str::to_owned));
                if version.as_deref() != Some("1.0.0") {
                    return Err(StoreError::Layout {
                        path: cache_dir.to_path_buf(),
                        why: format!("{LAYOUT_FILE} does not say imageLayoutVersion 1.0.0"),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io("cannot read", &layout, source)),
        }
        for dir in [store.blobs_dir(), store.partial_dir()] {
            fs::create_dir_all(&dir).map_err(|e| io("cannot create folder", &dir, e))?;
        }
        if !layout.exists() {
            write_atomic(&layout, LAYOUT.as_bytes()).map_err(|e| io("cannot write", &layout, e))?;
        }
        if !store.index_path().exists() {
            index::write_empty(&store)?;
        }
        for dir in [
            store.root.clone(),
            store.blobs_dir(),
            store.partial_dir(),
            store.root.join("partial"),
        ] {
            remove_temps(&dir);
        }
        partial::recover(&store.partial_dir(), &store.blobs_dir());
        Ok(store)
    }

    /// Makes a completed blob durable on the blocking pool (the runtime
    /// waits for it at exit); [`Store::synced`] waits for it sooner.
    fn sync_later(&self, durable: partial::Durable) {
        let job = tokio::task::spawn_blocking(move || durable.run());
        self.syncing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
    }

    /// Waits until the blobs completed so far are on disk for good; a blob
    /// whose fsync failed was removed (and is fetched again when needed).
    pub async fn synced(&self) {
        let jobs = std::mem::take(&mut *self.syncing.lock().unwrap_or_else(|e| e.into_inner()));
        for job in jobs {
            match job.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    "content store: a blob could not be synced to disk, removed: {e}"
                ),
                Err(e) => tracing::warn!("content store: a blob's sync did not run: {e}"),
            }
        }
    }

    /// The folder of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the complete blob is present (verified when it was stored).
    pub fn has(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Bytes of a partial download of the blob that a resume keeps, if
    /// there is one: all it wrote in this boot, else what it committed.
    pub fn partial_len(&self, digest: &str) -> Option<u64> {
        let hex = hex_of(digest).ok()?;
        let data = self.partial_dir().join(hex);
        data.is_file().then(|| partial::kept(&data))
    }

    /// Stores a small blob (a manifest, an index, a config) from memory,
    /// after checking its size and sha256.
    pub fn put(&self, desc: &Descriptor, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.blob_path(&desc.digest)?;
        if bytes.len() as u64 != desc.size {
            return Err(StoreError::Verify {
                digest: desc.digest.clone(),
                from: "memory".into(),
                why: format!("{} bytes, the descriptor says {}", bytes.len(), desc.size),
            });
        }
        let got = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if got != desc.digest {
            return Err(StoreError::Verify {
                digest: desc.digest.clone(),
                from: "memory".into(),
                why: format!("its sha256 is {got}"),
            });
        }
        if path.is_file() {
            touch(&path);
            return Ok(());
        }
        write_atomic(&path, bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                StoreError::NoSpace {
                    digest: desc.digest.clone(),
                    path: path.clone(),
                    kept: 0,
                    source: e,
                }
            }
            _ => io("cannot write blob", &path, e),
        })
    }

    /// Downloads one blob to completion; see [`fetch`](fetch::fetch) for
    /// resuming, retries, verification and cancellation.
    pub async fn fetch<S: BlobSource>(
        &self,
        src: &S,
        desc: &Descriptor,
        opts: &FetchOptions<'_>,
    ) -> Result<Fetched, StoreError> {
        fetch::fetch(self, src, desc, opts).await
    }

    /// Records a complete image in `index.json` under `name` (its canonical
    /// reference): `top` is what the reference resolved to (index or
    /// manifest), `manifest` the platform's image manifest (`== top` for a
    /// single-platform image). Refused unless every blob of it is present.
    pub fn add_image(
        &self,
        name: &str,
        top: &Descriptor,
        manifest: &Descriptor,
    ) -> Result<(), StoreError> {
        index::add_image(self, name, top, manifest)
    }

    /// Re-hashes a complete blob (one an earlier process stored) before it
    /// is handed on; a blob that no longer matches is removed and reported.
    pub fn verify(&self, digest: &str) -> Result<(), StoreError> {
        let path = self.blob_path(digest)?;
        let mut file = fs::File::open(&path).map_err(|e| io("cannot open blob", &path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| io("cannot read blob", &path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got == digest {
            touch(&path);
            return Ok(());
        }
        let _ = fs::remove_file(&path);
        let _ = crate::state::sync_dir(&self.blobs_dir());
        Err(StoreError::Verify {
            digest: digest.to_owned(),
            from: self.root.display().to_string(),
            why: format!("the stored bytes hash to {got}: removed"),
        })
    }

    /// Frees space: partials whose digest is not in `wanted` are removed
    /// (unless a download holds them), then complete blobs beyond
    /// `cache_max` bytes, least recently used first; a blob in `wanted` is
    /// never removed. `index.json` keeps only images still complete.
    /// Returns the bytes freed.
    pub fn gc(
        &self,
        cache_max: u64,
        wanted: &std::collections::HashSet<String>,
    ) -> Result<u64, StoreError> {
        index::gc(self, cache_max, wanted)
    }

    /// Bytes of complete blobs and of partial downloads.
    pub fn usage(&self) -> Usage {
        Usage {
            complete: index::blobs(&self.blobs_dir()).iter().map(|b| b.size).sum(),
            partial: partial::sizes(&self.partial_dir())
                .iter()
                .map(|p| p.1)
                .sum(),
        }
    }

    /// Digests of the partial downloads on disk (for a [`Store::gc`] that
    /// must keep them all).
    pub fn partials(&self) -> Vec<String> {
        partial::sizes(&self.partial_dir())
            .into_iter()
            .map(|(hex, _)| format!("sha256:{hex}"))
            .collect()
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn partial_dir(&self) -> PathBuf {
        self.root.join("partial/sha256")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    /// The bytes of a complete blob, at most `max` of them (a config or a
    /// manifest read back; a larger blob is an error, not a large read).
    pub fn read(&self, digest: &str, max: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let mut out = Vec::new();
        fs::File::open(&path)
            .and_then(|f| f.take(max + 1).read_to_end(&mut out))
            .map_err(|e| io("cannot read", &path, e))?;
        if out.len() as u64 > max {
            return Err(StoreError::Layout {
                path,
                why: format!("blob {digest} is larger than the {max} bytes read back"),
            });
        }
        Ok(out)
    }

    /// The file of a complete blob, for a reader that hashes what it reads
    /// (`bundle create` copies blobs from it).
    pub fn blob_file(&self, digest: &str) -> Result<PathBuf, StoreError> {
        self.blob_path(digest)
    }

    /// `blobs/sha256/<hex>` of a valid digest.
    fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.blobs_dir().join(hex_of(digest)?))
    }
}

/// The hex of a `sha256:<64 lowercase hex>` digest.
fn hex_of(digest: &str) -> Result<&str, StoreError> {
    crate::refs::check_digest(digest).map_err(StoreError::BadDigest)?;
    Ok(&digest["sha256:".len()..])
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Marks a complete blob used now (its mtime: the LRU order of `gc`). Best
/// effort: a blob whose time cannot be set only goes sooner.
fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().write(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

fn remove_temps(dir: &Path) {
    // Another process (the daemon, while `stowage plan` opens the store) may
    // be between writing a temp file and renaming it: only temps left for
    // longer than any write takes are a dead writer's.
    const STALE: std::time::Duration = std::time::Duration::from_secs(600);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE);
        if stale && is_temp_name(&e.file_name().to_string_lossy()) {
            let _ = fs::remove_file(e.path());
        }
    }
}
