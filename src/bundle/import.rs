//! `stowage bundle import FILE`: a bundle into the engine, all or nothing.
//!
//! 1. The whole bundle is verified ([`verify`]: every blob hashed, every
//!    image complete, `--expect` pinned) before anything changes.
//! 2. A delta bundle whose left-out layers this host lacks is refused,
//!    naming them (held = the engine has the layer's chain, or the content
//!    store has its blob).
//! 3. The blobs of the images the engine lacks go into the content store
//!    through the store's own download loop ([`Store::fetch`], with the
//!    bundle as its [`BlobSource`]): hashed as they are copied, resumed from
//!    partials after a kill.
//! 4. [`transfer::arrive`]: the engine pulls each image from the store's
//!    loopback endpoint, as for resumable pulls, and the references are
//!    tagged last, all or none; a killed import is undone at the next start.
//!
//! Each import is one audit record `import`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::BundleError;
use super::archive::{Archive, Member};
use super::verify::{Verified, verify};
use crate::audit::{self, AuditLog, Outcome, Record};
use crate::blocking::off_loop;
use crate::clock::Clock;
use crate::engine::Engine;
use crate::fmt::human_bytes;
use crate::policy::Policy;
use crate::store::{self, BlobBody, BlobSource, Descriptor, FetchOptions, SourceError, Store};
use crate::transfer::{self, Arrival, Arrived, ImportLock, TransferError};

/// Bytes per read from the bundle file.
const CHUNK: usize = 1 << 20;
/// A copy from a local file that gets no byte for this long is stuck.
const GIVE_UP: Duration = Duration::from_secs(120);

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The bundle's digest (`sha256:` of its `index.json`).
    pub digest: String,
    pub arrived: Arrived,
    /// Bytes copied into the content store (blobs it had are not counted).
    pub copied: u64,
}

impl Imported {
    /// `2 brought in, 1 tagged, 2 already present`.
    pub fn summary(&self) -> String {
        let a = &self.arrived;
        format!(
            "{} brought in, {} tagged, {} already present",
            a.brought.len(),
            a.tagged.len(),
            a.present.len()
        )
    }
}

/// Why an import did not happen. In every case the engine's references are
/// as they were.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The bundle is damaged, unsafe, unreadable or not the expected one.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A delta bundle for a host that lacks its base layers.
    #[error(
        "delta bundle {digest} refused: this host lacks the layers it leaves out: {}",
        missing.join("; ")
    )]
    MissingBase {
        digest: String,
        missing: Vec<String>,
    },
    /// Copying, handing over or tagging failed.
    #[error("{0}")]
    Failed(String),
    /// Stopped by a signal or shutdown.
    #[error("interrupted")]
    Interrupted,
    /// The state folder, the content store or the engine cannot be used.
    #[error("{0}")]
    CannotRun(String),
}

impl ImportError {
    /// The exit code of `bundle import`: 1 refused or failed (host
    /// unchanged), 2 could not run.
    pub fn exit_code(&self) -> u8 {
        match self {
            ImportError::Bundle(e) => e.exit_code(),
            ImportError::MissingBase { .. } | ImportError::Failed(_) | ImportError::Interrupted => {
                1
            }
            ImportError::CannotRun(_) => 2,
        }
    }

    /// Whether trying the same file again later may succeed without a new
    /// file (the inbox keeps such a bundle where it is).
    pub fn may_pass_later(&self) -> bool {
        matches!(self, ImportError::CannotRun(_) | ImportError::Interrupted)
            || matches!(self, ImportError::Bundle(e) if e.exit_code() == 2
                && !matches!(e, BundleError::NotATar { .. }))
    }
}

impl From<TransferError> for ImportError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Interrupted => ImportError::Interrupted,
            TransferError::Engine(e) if e.is_unreachable() => ImportError::CannotRun(e.to_string()),
            e => ImportError::Failed(e.to_string()),
        }
    }
}

/// Who asked, for the audit record's `rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cli,
    Inbox,
}

impl Origin {
    fn rule(self) -> &'static str {
        match self {
            Origin::Cli => "cli",
            Origin::Inbox => "inbox",
        }
    }
}

/// One import run: what it needs besides the file.
pub struct Run<'a, E: Engine> {
    pub engine: &'a E,
    pub policy: &'a Policy,
    pub clock: &'a dyn Clock,
    pub run_id: &'a str,
    pub origin: Origin,
    pub shutdown: &'a CancellationToken,
}

/// Imports `file` (see the module's text) and writes its audit record.
pub async fn import<E: Engine>(
    run: &Run<'_, E>,
    file: &Path,
    expect: Option<&str>,
    audit: &mut AuditLog,
) -> Result<Imported, ImportError> {
    let started = run.clock.now();
    let result = import_quiet(run, file, expect).await;
    if let Ok(imported) = &result {
        for v in &imported.arrived.verdicts {
            audit.append(&v.record(run.run_id, run.clock.now()));
        }
    }
    audit.append(&record(run, file, started, &result));
    result
}

fn record<E: Engine>(
    run: &Run<'_, E>,
    file: &Path,
    started: DateTime<Utc>,
    result: &Result<Imported, ImportError>,
) -> Record {
    let mut rec = Record {
        ts: started,
        run: run.run_id.to_owned(),
        action: audit::Action::Import,
        reference: Some(file.display().to_string()),
        image: None,
        rule: Some(run.origin.rule().to_owned()),
        reason: String::new(),
        outcome: Outcome::Ok,
        error: None,
        bytes: None,
        duration_ms: u64::try_from((run.clock.now() - started).num_milliseconds()).ok(),
        resumed_bytes: None,
    };
    match result {
        Ok(done) => {
            let names: Vec<&str> = done
                .arrived
                .brought
                .iter()
                .chain(&done.arrived.tagged)
                .map(|(n, _)| n.as_str())
                .collect();
            rec.reason = format!("bundle {}: {}", done.digest, done.summary());
            if !names.is_empty() {
                rec.reason.push_str(&format!(" ({})", names.join(", ")));
            }
            rec.bytes = Some(done.copied);
        }
        Err(e) => {
            rec.outcome = Outcome::Failed;
            rec.reason = "bundle import refused or failed; host unchanged".into();
            rec.error = Some(e.to_string());
        }
    }
    rec
}

/// [`import`] without the audit record.
pub async fn import_quiet<E: Engine>(
    run: &Run<'_, E>,
    file: &Path,
    expect: Option<&str>,
) -> Result<Imported, ImportError> {
    let policy = run.policy;
    let dir = policy.daemon.state_dir.clone();
    let lock = off_loop(move || ImportLock::take(&dir))
        .await
        .map_err(|e| {
            ImportError::CannotRun(format!(
                "cannot take the import lock in {}: {e}",
                policy.daemon.state_dir.display()
            ))
        })?;
    let undone = transfer::recover_imports(run.engine, &policy.daemon.state_dir, Some(&lock)).await;
    if !undone.is_empty() {
        tracing::info!("undid an interrupted import first: {}", undone.join(", "));
    }

    let (path, want) = (file.to_path_buf(), expect.map(str::to_owned));
    let (archive, verified) = off_loop(move || -> Result<_, BundleError> {
        let archive = Archive::open(&path)?;
        let verified = verify(&archive, want.as_deref())?;
        Ok((archive, verified))
    })
    .await?;
    let archive = Arc::new(archive);
    let digest = verified.digest.clone();

    let images = run
        .engine
        .list_images()
        .await
        .map_err(|e| ImportError::CannotRun(e.to_string()))?;
    let present: std::collections::HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
    let to_bring: Vec<_> = verified
        .images
        .iter()
        .filter(|i| !present.contains(i.id()))
        .collect();

    let cache = policy.daemon.cache_dir.clone();
    let store = off_loop(move || Store::open(&cache))
        .await
        .map_err(|e| ImportError::CannotRun(format!("content store: {e}")))?;
    if verified.is_delta() {
        check_base(run.engine, &store, &verified, &to_bring).await?;
    }

    // Every blob the images to bring have in the bundle, each once.
    let mut blobs: Vec<Descriptor> = Vec::new();
    for img in &to_bring {
        let missing: std::collections::HashSet<&str> = img
            .missing
            .iter()
            .map(|m| m.layer.digest.as_str())
            .collect();
        let own = [&img.top, &img.manifest, &img.config].into_iter().chain(
            img.layers
                .iter()
                .filter(|l| !missing.contains(l.digest.as_str())),
        );
        for d in own {
            if !blobs.iter().any(|b| b.digest == d.digest) {
                blobs.push(d.clone());
            }
        }
    }
    let noted: Vec<(String, u64)> = blobs.iter().map(|b| (b.digest.clone(), b.size)).collect();
    let (p, k) = (policy.clone(), digest.clone());
    // A `note_import` that fails only costs partials (gc may take them).
    let lock = off_loop(move || {
        if let Err(e) = transfer::note_import(&p, &lock, &k, noted) {
            tracing::warn!("cannot note the import in the downloads journal: {e}");
        }
        lock
    })
    .await;

    let copied = copy_blobs(run, &store, &archive, &blobs).await?;

    let arrivals: Vec<Arrival> = verified
        .images
        .iter()
        .map(|i| Arrival {
            name: i.name.clone(),
            top: i.top.clone(),
            manifest: i.manifest.clone(),
            config: i.id().to_owned(),
            platform: i.platform.clone(),
        })
        .collect();
    let arrived = transfer::arrive(run.engine, policy, run.shutdown, &lock, &digest, &arrivals)
        .await
        .map_err(ImportError::from)?;
    // Noted in the store's index: complete images only (a delta's are not).
    let complete: Vec<(String, Descriptor, Descriptor)> = verified
        .images
        .iter()
        .filter(|i| i.missing.is_empty())
        .map(|i| (i.name.clone(), i.top.clone(), i.manifest.clone()))
        .collect();
    off_loop(move || {
        for (name, top, manifest) in complete {
            if let Err(e) = store.add_image(&name, &top, &manifest) {
                tracing::debug!("{name}: not noted in the content store's index: {e}");
            }
        }
    })
    .await;
    Ok(Imported {
        digest,
        arrived,
        copied,
    })
}

/// Refuses a delta whose left-out layers this host does not hold.
async fn check_base<E: Engine>(
    engine: &E,
    store: &Store,
    verified: &Verified,
    to_bring: &[&super::BundleImage],
) -> Result<(), ImportError> {
    let images = engine
        .list_images()
        .await
        .map_err(|e| ImportError::CannotRun(e.to_string()))?;
    let mut held = std::collections::HashSet::new();
    for img in &images {
        match engine.image_layers(&img.id).await {
            Ok(layers) => held.extend(layers.into_iter().map(|l| l.chain_id)),
            Err(e) => tracing::debug!("layers of {}: {e}", img.id),
        }
    }
    let mut missing = Vec::new();
    for img in to_bring {
        for m in &img.missing {
            let have = held.contains(&m.chain_id) || store.has(&m.layer.digest);
            let line = format!(
                "layer {} (diff id {}) of {}",
                m.layer.digest, m.diff_id, img.name
            );
            if !have && !missing.contains(&line) {
                missing.push(line);
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ImportError::MissingBase {
            digest: verified.digest.clone(),
            missing,
        })
    }
}

/// Each blob into the store (at once for those it has), hashed as copied.
async fn copy_blobs<E: Engine>(
    run: &Run<'_, E>,
    store: &Store,
    archive: &Arc<Archive>,
    blobs: &[Descriptor],
) -> Result<u64, ImportError> {
    let source = ArchiveSource {
        archive: archive.clone(),
        name: archive.path().display().to_string(),
    };
    let quiet = |_: store::Progress| {};
    let opts = FetchOptions {
        stall: run.policy.daemon.stall_timeout,
        give_up: GIVE_UP,
        cancel: run.shutdown,
        progress: &quiet,
    };
    let mut copied = 0;
    for desc in blobs {
        match store.fetch(&source, desc, &opts).await {
            Ok(f) => copied += f.bytes,
            Err(store::StoreError::Interrupted { .. }) => return Err(ImportError::Interrupted),
            Err(e @ store::StoreError::NoSpace { .. }) => {
                return Err(ImportError::Failed(format!(
                    "{e} (copied so far: {})",
                    human_bytes(copied)
                )));
            }
            Err(e) => return Err(ImportError::Failed(e.to_string())),
        }
    }
    Ok(copied)
}

/// The bundle file as the source of the store's download loop: a blob
/// from an offset, read by `pread` off the daemon's thread.
struct ArchiveSource {
    archive: Arc<Archive>,
    name: String,
}

impl BlobSource for ArchiveSource {
    async fn fetch(&self, digest: &str, offset: u64) -> Result<BlobBody, SourceError> {
        let Some(m) = self.archive.blob_member(digest) else {
            return Err(SourceError::NotFound {
                repository: self.name.clone(),
                message: format!("the bundle holds no blob {digest}"),
            });
        };
        let from = Member {
            offset: m.offset + offset.min(m.present),
            size: m.size.saturating_sub(offset),
            present: m.present.saturating_sub(offset),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, SourceError>>(4);
        let archive = self.archive.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut reader = archive.reader(from);
            loop {
                let mut buf = vec![0u8; CHUNK];
                let sent = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        tx.blocking_send(Ok(Bytes::from(buf)))
                    }
                    Err(e) => tx.blocking_send(Err(SourceError::Io(e.to_string()))),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(BlobBody {
            start: offset,
            stream: Box::pin(stream),
        })
    }

    fn name(&self) -> &str {
        &self.name
    }
}
