//! The download loop: one blob from a [`BlobSource`] into the store,
//! resuming, retrying and verifying.
//!
//! - It resumes from what the partial keeps (every byte written in this
//!   boot, else its committed offset; its sha256 state read back from the
//!   bytes on disk) and asks the source for the rest; a server
//!   that ignores the range (`start == 0`) has the bytes already held
//!   skipped (they count as wire bytes).
//! - No byte for `stall` ends an attempt, as does a cut; retryable errors are
//!   retried with jittered backoff (0.5 s doubling to 10 s, back to 0.5 s
//!   after an attempt that brought bytes) until `give_up` passes without a
//!   single new byte.
//! - Bytes go to disk (written, hashed, now and then committed: data
//!   fsynced, then the sidecar; see [`COMMIT_EVERY`]) on a blocking thread while the next
//!   ones arrive: one write in flight at a time, so the network is read
//!   while the disk works. The offset is also committed at every error,
//!   cancellation included.
//! - Size and sha256 are checked before the rename into `blobs/`; a mismatch
//!   (more bytes than the size included) discards the partial and fetches
//!   once more from zero; a second one is [`StoreError::Verify`].
//! - A full disk keeps the partial at its last committed offset
//!   ([`StoreError::NoSpace`]).

use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::blocking::off_loop;
use crate::clock::jittered;

use super::partial::Partial;
use super::{BlobSource, Descriptor, SourceError, Store, StoreError, hex_of};

/// Bytes gathered in memory before they go to disk (off the async thread),
/// when the write before them is done.
const FLUSH_EVERY: usize = 1 << 20;
/// Bytes gathered at most while a write is still in flight: then the
/// download waits for the disk (bounded memory on a slow disk).
const GATHER_MAX: usize = 8 << 20;
/// The offset is committed once this many bytes and [`COMMIT_GAP`] passed
/// since the last commit: a power cut costs again at most the larger of
/// 4 MiB and half a second of transfer (a kill -9 nothing: the bytes are in
/// the page cache, see `partial`). On a slow link (under
/// 8 MiB/s) that is every 4 MiB; on a fast one at most two fsyncs a second,
/// which run beside the download (a write in flight) but share the disk's
/// bandwidth with it: a 50 MiB blob on loopback gets none, only the one
/// after it is complete, off the way (see `Partial::complete`).
pub(super) const COMMIT_EVERY: u64 = 4 << 20;
const COMMIT_GAP: Duration = Duration::from_millis(500);
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// How often a download waits for another one of the same blob to finish.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// How one download behaves.
pub struct FetchOptions<'a> {
    /// An attempt that receives no byte for this long is abandoned (and retried).
    pub stall: Duration,
    /// The download fails after this long without a single new byte.
    pub give_up: Duration,
    /// Cancelled: the partial is committed and the call returns
    /// [`StoreError::Interrupted`].
    pub cancel: &'a CancellationToken,
    /// Hears how far the download is, after each write to disk.
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

/// How far one download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the blob held (resumed ones included).
    pub have: u64,
    pub size: u64,
}

/// What one download took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes received over the network by this call (skipped ones included).
    pub bytes: u64,
    /// Bytes the partial already had when this call started.
    pub resumed: u64,
    /// Attempts after the first.
    pub retries: u32,
}

/// How one attempt ended, when it did not complete the blob.
enum Ended {
    /// Retry (when the give-up window allows).
    Retry(SourceError),
    /// The bytes did not match; the partial is discarded.
    Mismatch(String),
    /// Complete and verified.
    Done,
}

/// One download in progress: the partial and its tallies.
struct Run<'a, S> {
    store: &'a Store,
    src: &'a S,
    desc: &'a Descriptor,
    opts: &'a FetchOptions<'a>,
    /// `None` only while a blocking write has it.
    partial: Option<Partial>,
    /// The write in flight, which has the partial (and the bytes) meanwhile.
    writing: Option<tokio::task::JoinHandle<(Partial, std::io::Result<()>, BytesMut)>>,
    /// Bytes on disk or being written: the partial's length once the write
    /// in flight is done.
    written: u64,
    /// The partial's committed offset as last seen.
    committed: u64,
    buf: BytesMut,
    /// The buffer of the last write, back for the next one: gathering into
    /// memory already mapped, not fresh pages for every megabyte.
    spare: Option<BytesMut>,
    fetched: Fetched,
    last_new_byte: Instant,
}

pub(super) async fn fetch<S: BlobSource>(
    store: &Store,
    src: &S,
    desc: &Descriptor,
    opts: &FetchOptions<'_>,
) -> Result<Fetched, StoreError> {
    let hex = hex_of(&desc.digest)?.to_owned();
    let Some(partial) = lock(store, &hex, desc, opts).await? else {
        return Ok(Fetched::default());
    };
    let mut run = Run {
        store,
        src,
        desc,
        opts,
        written: partial.len,
        committed: partial.committed,
        partial: Some(partial),
        writing: None,
        buf: BytesMut::with_capacity(buffer_for(desc.size)),
        spare: None,
        fetched: Fetched::default(),
        last_new_byte: Instant::now(),
    };
    let began = Instant::now();
    let size = desc.size;
    run.on_disk(move |p| p.resume(size)).await?;
    run.fetched.resumed = run.held();
    let mut delay = RETRY_FIRST;
    let mut mismatches = 0;
    loop {
        let before = run.held();
        let ended = if before == size {
            run.finish().await?
        } else {
            run.attempt().await?
        };
        match ended {
            Ended::Done => {
                tracing::debug!(
                    "blob {} complete: {} bytes in {:?}",
                    desc.digest,
                    size,
                    began.elapsed()
                );
                return Ok(run.fetched);
            }
            Ended::Mismatch(why) => {
                mismatches += 1;
                run.on_disk(Partial::reset).await?;
                if mismatches == 2 {
                    return Err(StoreError::Verify {
                        digest: desc.digest.clone(),
                        from: src.name().to_owned(),
                        why,
                    });
                }
                tracing::warn!(
                    "blob {} from {} failed verification ({why}): fetching it again",
                    desc.digest,
                    src.name()
                );
                run.fetched.retries += 1;
            }
            Ended::Retry(error) => {
                run.on_disk(Partial::commit).await?;
                let idle = run.last_new_byte.elapsed();
                if idle >= opts.give_up {
                    return Err(StoreError::GaveUp {
                        digest: desc.digest.clone(),
                        from: src.name().to_owned(),
                        after: opts.give_up,
                        kept: run.committed(),
                        source: error,
                    });
                }
                delay = if run.held() > before {
                    RETRY_FIRST
                } else {
                    (delay * 2).min(RETRY_CAP)
                };
                tracing::debug!(
                    "blob {} from {}: {error}; retrying from byte {}",
                    desc.digest,
                    src.name(),
                    run.held()
                );
                let wait = jittered(delay).min(opts.give_up - idle);
                tokio::select! {
                    () = opts.cancel.cancelled() => return Err(run.interrupted()),
                    () = tokio::time::sleep(wait) => {}
                }
                run.fetched.retries += 1;
            }
        }
    }
}

/// Takes the blob's partial (its `flock`), waiting while another download of
/// it runs; `None` when the blob is (or became) complete.
async fn lock(
    store: &Store,
    hex: &str,
    desc: &Descriptor,
    opts: &FetchOptions<'_>,
) -> Result<Option<Partial>, StoreError> {
    loop {
        if store.has(&desc.digest) {
            super::touch(&store.blobs_dir().join(hex));
            return Ok(None);
        }
        let dir = store.partial_dir();
        let name = hex.to_owned();
        let opened = off_loop(move || Partial::try_open(&dir, &name, true)).await;
        match opened {
            Ok(Some(p)) if store.has(&desc.digest) => drop(p),
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {
                tokio::select! {
                    () = opts.cancel.cancelled() => return Err(StoreError::Interrupted {
                        digest: desc.digest.clone(),
                        kept: store.partial_len(&desc.digest).unwrap_or(0),
                    }),
                    () = tokio::time::sleep(LOCK_POLL) => {}
                }
            }
            Err(e) => {
                return Err(super::io(
                    "cannot open partial blob",
                    &store.partial_dir().join(hex),
                    e,
                ));
            }
        }
    }
}

impl<S: BlobSource> Run<'_, S> {
    fn partial(&self) -> &Partial {
        self.partial
            .as_ref()
            .expect("the partial is back after each write")
    }

    /// Bytes held: on disk, being written, and gathered in memory.
    fn held(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    fn committed(&self) -> u64 {
        self.committed
    }

    fn interrupted(&self) -> StoreError {
        StoreError::Interrupted {
            digest: self.desc.digest.clone(),
            kept: self.committed(),
        }
    }

    /// Waits for the write in flight, if any: the partial is back (its
    /// error, if it had one, is this call's).
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let (p, result, mut spent) = match writing.await {
            Ok(done) => done,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("blocking work was cancelled: {e}"),
            },
        };
        spent.clear();
        self.spare = Some(spent);
        self.back(p, result)?;
        (self.opts.progress)(Progress {
            have: self.written,
            size: self.desc.size,
        });
        Ok(())
    }

    /// The partial back from blocking work, with that work's result typed:
    /// a full disk keeps what was committed, anything else names the partial.
    fn back(&mut self, p: Partial, result: std::io::Result<()>) -> Result<(), StoreError> {
        let (data, kept) = (p.data.clone(), p.committed);
        self.written = p.len;
        self.committed = p.committed;
        self.partial = Some(p);
        result.map_err(|source| {
            if is_no_space(&source) {
                StoreError::NoSpace {
                    digest: self.desc.digest.clone(),
                    path: data,
                    kept,
                    source,
                }
            } else {
                super::io("cannot write partial blob", &data, source)
            }
        })
    }

    /// Runs `work` on the partial off the async thread, after the write in
    /// flight. On a full disk what was written is committed (best effort:
    /// the commit itself may not fit).
    async fn on_disk(
        &mut self,
        work: impl FnOnce(&mut Partial) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.settle().await?;
        let p = self.partial.take().expect("one write at a time");
        let (p, result) = off_loop(move || with_partial(p, work)).await;
        self.back(p, result)
    }

    /// Whether gathered bytes should go to disk now: enough of them and the
    /// disk free, or too many to keep gathering.
    fn due(&self) -> bool {
        let free = self.writing.as_ref().is_none_or(|w| w.is_finished());
        (self.buf.len() >= FLUSH_EVERY && free) || self.buf.len() >= GATHER_MAX
    }

    /// Starts writing what is gathered (after the write in flight),
    /// committing the offset as [`COMMIT_EVERY`] says; returns without
    /// waiting for it.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.settle().await?;
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(buffer_for(self.desc.size)));
        let bytes = std::mem::replace(&mut self.buf, next);
        let p = self.partial.take().expect("one write at a time");
        self.written += bytes.len() as u64;
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let (p, result) = with_partial(p, |p| {
                p.append(&bytes)?;
                if p.len - p.committed >= COMMIT_EVERY && p.last_commit.elapsed() >= COMMIT_GAP {
                    p.commit()?;
                }
                Ok(())
            });
            (p, result, bytes)
        }));
        Ok(())
    }

    /// One request to the source, read until it ends, fails or stalls.
    async fn attempt(&mut self) -> Result<Ended, StoreError> {
        let offset = self.held();
        let (stall, cancel) = (self.opts.stall, self.opts.cancel);
        let body = tokio::select! {
            () = cancel.cancelled() => return Err(self.interrupted()),
            b = tokio::time::timeout(stall, self.src.fetch(&self.desc.digest, offset)) => b,
        };
        let body = match body {
            Err(_) => return Ok(Ended::Retry(stalled(stall))),
            Ok(Err(e)) if e.retryable() => return Ok(Ended::Retry(e)),
            Ok(Err(e)) => return Err(self.source_error(e)),
            Ok(Ok(body)) => body,
        };
        let Some(mut skip) = offset.checked_sub(body.start) else {
            return Err(self.source_error(SourceError::Refused(format!(
                "asked for the blob from byte {offset}, it answered from byte {}",
                body.start
            ))));
        };
        let mut stream = body.stream;
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => {
                    self.flush().await?;
                    self.on_disk(Partial::commit).await?;
                    return Err(self.interrupted());
                }
                n = tokio::time::timeout(stall, stream.next()) => n,
            };
            let mut chunk = match next {
                Err(_) => {
                    self.flush().await?;
                    return Ok(Ended::Retry(stalled(stall)));
                }
                Ok(None) => {
                    self.flush().await?;
                    if self.held() < self.desc.size {
                        return Ok(Ended::Retry(SourceError::Io(format!(
                            "the answer ended at byte {} of {}",
                            self.held(),
                            self.desc.size
                        ))));
                    }
                    return self.finish().await;
                }
                Ok(Some(Err(e))) => {
                    self.flush().await?;
                    if e.retryable() {
                        return Ok(Ended::Retry(e));
                    }
                    self.on_disk(Partial::commit).await?;
                    return Err(self.source_error(e));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            self.fetched.bytes += chunk.len() as u64;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                let _ = chunk.split_to(n as usize);
                skip -= n;
            }
            if chunk.is_empty() {
                continue;
            }
            if self.held() + chunk.len() as u64 > self.desc.size {
                self.buf.clear();
                return Ok(Ended::Mismatch(format!(
                    "the registry sent more than the {} bytes the manifest says",
                    self.desc.size
                )));
            }
            self.last_new_byte = Instant::now();
            self.buf.extend_from_slice(&chunk);
            // A write that landed is taken back at once: its progress is told.
            if self.writing.as_ref().is_some_and(|w| w.is_finished()) {
                self.settle().await?;
            }
            if self.due() {
                self.flush().await?;
            }
        }
    }

    /// All bytes are there: verified, they become the blob.
    async fn finish(&mut self) -> Result<Ended, StoreError> {
        self.flush().await?;
        self.settle().await?;
        let got = self.partial().digest();
        if got != self.desc.digest {
            return Ok(Ended::Mismatch(format!("its sha256 is {got}")));
        }
        let blob = self.store.blobs_dir().join(hex_of(&self.desc.digest)?);
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let put = slot.clone();
        self.on_disk(move |p| {
            let durable = p.complete(&blob)?;
            *put.lock().unwrap_or_else(|e| e.into_inner()) = Some(durable);
            Ok(())
        })
        .await?;
        if let Some(durable) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.store.sync_later(durable);
        }
        Ok(Ended::Done)
    }

    fn source_error(&self, source: SourceError) -> StoreError {
        StoreError::Source {
            digest: self.desc.digest.clone(),
            from: self.src.name().to_owned(),
            source,
        }
    }
}

/// `work` on `p`, the partial handed back with its result; on a full disk
/// what was written is committed, as far as it fits.
fn with_partial(
    mut p: Partial,
    work: impl FnOnce(&mut Partial) -> std::io::Result<()>,
) -> (Partial, std::io::Result<()>) {
    let r = work(&mut p);
    if r.as_ref().is_err_and(is_no_space) {
        let _ = p.commit();
    }
    (p, r)
}

/// A gathering buffer for a blob of `size` bytes: room for a flush and the
/// bytes arriving while it starts, no more than the blob.
fn buffer_for(size: u64) -> usize {
    usize::try_from(size).map_or(2 * FLUSH_EVERY, |s| s.min(2 * FLUSH_EVERY))
}

fn stalled(stall: Duration) -> SourceError {
    SourceError::Io(format!("no data for {}", humantime::format_duration(stall)))
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}
