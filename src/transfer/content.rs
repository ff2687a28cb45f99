//! Pulls through the content store, for a local engine. The registry client
//! resolves the reference; the store downloads each blob the engine lacks,
//! resuming partials and verifying every blob; only when all are present
//! does the engine pull the image from the store's read-only loopback
//! endpoint (`127.0.0.1:PORT/<path>@<digest>`), so its own pull stores it
//! with the same id and layers as a direct pull. The caller then points the
//! canonical reference at it, as for any pull; afterwards the upstream
//! digest reference is recorded (the engine pulls `<upstream>@<digest>`,
//! which moves only the manifest) and the loopback one removed, now or, when
//! the upstream does not answer, at a later reconcile.
//!
//! Until the hand-off the engine is untouched: a cut, a stall, a kill -9 or
//! a reboot costs only the bytes in flight.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;

use super::downloads::{Download, Journal, Upstream};
use super::layers::{api_path, diff_ids, split_layers};
use super::{Candidate, Ctx, PullCounters, PullIntent, PullProgress, TransferError};
use crate::blocking::off_loop;
use crate::engine::{Engine, Image};
use crate::observe::Observed;
use crate::policy::Policy;
use crate::refs::split_tag;
use crate::registry::{self, Registry, RepoBlobs, Resolved};
use crate::store::{self, Descriptor, FetchOptions, Store, StoreError};

/// Largest image config read back from the store (its `rootfs.diff_ids`).
const CONFIG_MAX: u64 = 4 << 20;
/// Layers of one image downloaded at once, as the engine's own pull does
/// (dockerd's `max-concurrent-downloads` default): on a link with latency
/// each blob's request and slow start overlap the others' transfer.
const LAYER_DOWNLOADS: usize = 3;

/// The content store and registry clients of one transfer phase.
pub(super) struct Content {
    store: Store,
    journal: Journal,
    /// One client per registry host: tokens and connections are reused.
    registries: Mutex<HashMap<String, Registry>>,
    options: registry::Options,
    /// Pulled when an entry names no platform: the engine's own (asked
    /// once, when first needed), as its own pull would choose.
    default_platform: tokio::sync::OnceCell<String>,
    /// A download fails after this long without a single new byte.
    give_up: Duration,
}

/// A reference resolved at one candidate registry.
pub(super) struct Source {
    registry: Registry,
    /// The repository as the registry's API names it (`library/nginx`).
    path: String,
    resolved: Resolved,
    platform: String,
}

impl Source {
    /// The digest the reference resolved to (index or manifest).
    pub(super) fn digest(&self) -> &str {
        &self.resolved.top.0.digest
    }
}

/// An image the engine has taken from the loopback endpoint.
pub(super) struct Handed {
    pub image: String,
    /// The digest reference the hand-off left (`127.0.0.1:PORT/…@…`).
    pub loopback: String,
    platform: Option<String>,
}

impl Handed {
    /// The platform the engine was told to pick, if any.
    pub(super) fn platform_name(&self) -> Option<&str> {
        self.platform.as_deref()
    }
}

impl Content {
    /// Opens the store in `cache_dir` (creating it). `give_up`: how long a
    /// download may go without a new byte (longer for `stowage pull`, where
    /// someone waits for it, than for a reconcile, which backs off).
    pub(super) async fn open(policy: &Policy, give_up: Duration) -> Result<Content, StoreError> {
        let dir = policy.daemon.cache_dir.clone();
        let store = off_loop(move || Store::open(&dir)).await?;
        Ok(Content {
            store,
            journal: Journal::new(&policy.daemon.state_dir),
            registries: Mutex::default(),
            options: registry::Options {
                timeout: policy.daemon.stall_timeout,
                ..registry::Options::default()
            },
            default_platform: tokio::sync::OnceCell::new(),
            give_up,
        })
    }

    fn registry<E: Engine>(&self, ctx: &Ctx<'_, E>, host: &str) -> Result<Registry, TransferError> {
        let mut clients = self.registries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = clients.get(host) {
            return Ok(r.clone());
        }
        let r = Registry::new(host, ctx.credentials(host), &self.options)?;
        clients.insert(host.to_owned(), r.clone());
        Ok(r)
    }

    /// The platform `intent` names, else the engine's.
    async fn platform<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        intent: &PullIntent,
    ) -> Result<String, TransferError> {
        if let Some(p) = &intent.platform {
            return Ok(p.clone());
        }
        let asked = self
            .default_platform
            .get_or_try_init(|| ctx.engine.platform());
        tokio::select! {
            p = asked => Ok(p?.clone()),
            () = ctx.shutdown.cancelled() => Err(TransferError::Interrupted),
        }
    }

    /// Resolve what `intent` asks for at `c`: the pin, else its tag. The
    /// manifests' bytes count as received.
    pub(super) async fn resolve<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        intent: &PullIntent,
        c: &Candidate,
        counters: &mut PullCounters,
    ) -> Result<Source, TransferError> {
        let registry = self.registry(ctx, &c.registry)?;
        let path = api_path(&c.repository);
        let reference = match &intent.pin {
            Some(pin) => pin.clone(),
            None => intent
                .tag_ref
                .as_deref()
                .and_then(|t| split_tag(t).1)
                .unwrap_or("latest")
                .to_owned(),
        };
        let platform = self.platform(ctx, intent).await?;
        let resolved = tokio::select! {
            r = registry.resolve(&path, &reference, &platform) => r?,
            () = ctx.shutdown.cancelled() => return Err(TransferError::Interrupted),
        };
        counters.bytes_received += resolved.top.0.size;
        if resolved.manifest.0 != resolved.top.0 {
            counters.bytes_received += resolved.manifest.0.size;
        }
        Ok(Source {
            registry,
            path,
            resolved,
            platform,
        })
    }

    /// What the tag of `intent` resolves to at `c` now, when the registry
    /// says (for the message of a pin it does not have).
    pub(super) async fn tag_digest<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        intent: &PullIntent,
        c: &Candidate,
    ) -> Option<String> {
        let tag = intent.tag_ref.as_deref().and_then(|t| split_tag(t).1)?;
        let registry = self.registry(ctx, &c.registry).ok()?;
        let platform = self.platform(ctx, intent).await.ok()?;
        let resolved = registry
            .resolve(&api_path(&c.repository), tag, &platform)
            .await
            .ok()?;
        Some(resolved.top.0.digest)
    }

    /// Download what the engine lacks of `src` into the store, then hand it
    /// to the engine from the loopback endpoint and check that the engine
    /// has it. The engine is not asked to change anything before every blob
    /// is present and verified.
    pub(super) async fn pull<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        intent: &PullIntent,
        src: &Source,
        observed: &Observed,
        counters: &mut PullCounters,
    ) -> Result<Handed, TransferError> {
        let Resolved {
            top,
            manifest,
            config,
            layers,
        } = &src.resolved;
        let store = self.store.clone();
        let (t, m) = (top.clone(), manifest.clone());
        off_loop(move || {
            store.put(&t.0, &t.1)?;
            store.put(&m.0, &m.1)
        })
        .await?;
        let blobs = src.registry.blobs(&src.path);
        let meter = Meter::new(ctx.progress);
        // The config first: its diff ids say which layers the engine has.
        meter.add(config.size + layers.iter().map(|l| l.size).sum::<u64>());
        self.fetch_all(ctx, &blobs, std::slice::from_ref(config), &meter, counters)
            .await?;
        let held = held_chains(ctx, observed, intent).await;
        let diff_ids = self.diff_ids(&config.digest).await?;
        let (needed, skipped) = split_layers(layers, &diff_ids, &held);
        self.note(intent, top, manifest, config, &needed).await;
        meter.forget(skipped.iter().map(|l| l.size).sum());
        self.fetch_all(ctx, &blobs, &needed, &meter, counters)
            .await?;
        // The index entry is written beside the hand-off (the endpoint
        // serves blobs by digest, not from the index).
        let indexed = skipped.is_empty().then(|| {
            let (store, name) = (self.store.clone(), intent.reference.clone());
            let (t, m) = (top.0.clone(), manifest.0.clone());
            tokio::task::spawn_blocking(move || store.add_image(&name, &t, &m))
        });
        // For an index the engine must pick the platform whose blobs are here.
        let platform =
            (top.0 != manifest.0 || intent.platform.is_some()).then(|| src.platform.clone());
        let handed = self.hand_off(ctx, src, platform.as_deref()).await;
        if let Some(job) = indexed {
            match job.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("not noted in the content store's index: {e}"),
                Err(e) => tracing::debug!("not noted in the content store's index: {e}"),
            }
        }
        match handed {
            Ok(h) => Ok(h),
            Err(TransferError::Interrupted) => Err(TransferError::Interrupted),
            // The engine may lack a layer it was thought to have (one it
            // got by `docker load` is not known by its compressed digest):
            // fetch those too, and hand off once more.
            Err(e) if !skipped.is_empty() => {
                tracing::info!(
                    "{}: {e}; fetching the {} layer(s) the engine was thought to have",
                    intent.reference,
                    skipped.len()
                );
                let all: Vec<Descriptor> = needed.iter().chain(&skipped).cloned().collect();
                self.note(intent, top, manifest, config, &all).await;
                meter.add(skipped.iter().map(|l| l.size).sum());
                self.fetch_all(ctx, &blobs, &skipped, &meter, counters)
                    .await?;
                self.hand_off(ctx, src, platform.as_deref()).await
            }
            Err(e) => Err(e),
        }
    }

    /// The blobs `descs` into the store, [`LAYER_DOWNLOADS`] at a time.
    /// Each runs to its end even when another fails (what arrived stays
    /// verified or resumable); the first failure is the result.
    async fn fetch_all<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        blobs: &RepoBlobs,
        descs: &[Descriptor],
        meter: &Meter<'_>,
        counters: &mut PullCounters,
    ) -> Result<(), TransferError> {
        let mut seen = HashSet::new();
        // Futures of a plain `async fn` collected first: closures returning
        // async blocks trip `Send` inference for the daemon's spawn.
        let jobs: Vec<_> = descs
            .iter()
            .filter(|d| seen.insert(d.digest.as_str()))
            .map(|desc| self.fetch(ctx, blobs, desc, meter))
            .collect();
        let results: Vec<(Result<(), TransferError>, PullCounters)> =
            futures_util::stream::iter(jobs)
                .buffer_unordered(LAYER_DOWNLOADS)
                .collect()
                .await;
        let mut first = None;
        for (r, moved) in results {
            counters.add(&moved);
            if let Err(e) = r {
                // An interruption says why the others stopped too.
                if first.is_none() || matches!(e, TransferError::Interrupted) {
                    first = Some(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// One blob into the store (at once when it is there already), with
    /// what it moved: its bytes, a failed download's too (as far as its
    /// progress showed them); a blob that failed verification counts as
    /// such.
    async fn fetch<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        blobs: &RepoBlobs,
        desc: &Descriptor,
        meter: &Meter<'_>,
    ) -> (Result<(), TransferError>, PullCounters) {
        let mut counters = PullCounters::default();
        let (store, digest) = (self.store.clone(), desc.digest.clone());
        let start = off_loop(move || store.partial_len(&digest).unwrap_or(0)).await;
        let furthest = AtomicU64::new(start);
        let tell = |p: store::Progress| {
            furthest.fetch_max(p.have, Ordering::Relaxed);
            meter.moved(&desc.digest, p.have);
        };
        let opts = FetchOptions {
            stall: ctx.stall,
            give_up: self.give_up,
            cancel: ctx.shutdown,
            progress: &tell,
        };
        let got = self.store.fetch(blobs, desc, &opts).await;
        meter.done(&desc.digest, desc.size);
        let r = match got {
            Ok(f) => {
                counters.bytes_received += f.bytes;
                counters.resumed_bytes += f.resumed;
                Ok(())
            }
            Err(e) => {
                counters.bytes_received += furthest.load(Ordering::Relaxed).saturating_sub(start);
                counters.resumed_bytes += start;
                match e {
                    StoreError::Interrupted { .. } => Err(TransferError::Interrupted),
                    e => {
                        if matches!(e, StoreError::Verify { .. }) {
                            counters.verify_failures += 1;
                        }
                        Err(e.into())
                    }
                }
            }
        };
        (r, counters)
    }

    /// Note the download in the journal before its blobs arrive, so that
    /// the store keeps their partials until it completes.
    async fn note(
        &self,
        intent: &PullIntent,
        top: &(Descriptor, bytes::Bytes),
        manifest: &(Descriptor, bytes::Bytes),
        config: &Descriptor,
        layers: &[Descriptor],
    ) {
        let mut blobs: Vec<(String, u64)> = vec![(top.0.digest.clone(), top.0.size)];
        if manifest.0 != top.0 {
            blobs.push((manifest.0.digest.clone(), manifest.0.size));
        }
        blobs.push((config.digest.clone(), config.size));
        blobs.extend(layers.iter().map(|l| (l.digest.clone(), l.size)));
        let download = Download {
            top: top.0.digest.clone(),
            blobs,
            since: chrono::Utc::now().timestamp(),
        };
        let (journal, key) = (self.journal.clone(), intent.key.clone());
        off_loop(move || {
            journal.best_effort(|e| {
                e.downloads.insert(key, download);
            });
        })
        .await;
    }

    /// The config's `rootfs.diff_ids`, read back from the store.
    async fn diff_ids(&self, digest: &str) -> Result<Vec<String>, TransferError> {
        let store = self.store.clone();
        let owned = digest.to_owned();
        let bytes = off_loop(move || store.read(&owned, CONFIG_MAX))
            .await
            .map_err(|e| TransferError::Config(format!("cannot read the config {digest}: {e}")))?;
        diff_ids(&bytes).map_err(|why| TransferError::Config(format!("config {digest}: {why}")))
    }

    /// Serve the store on loopback and have the engine pull the image from
    /// it; `Ok` once the engine lists an image for that digest.
    async fn hand_off<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        src: &Source,
        platform: Option<&str>,
    ) -> Result<Handed, TransferError> {
        let serving = store::serve(self.store.clone(), ctx.shutdown).await?;
        let loopback = loopback_ref(&serving, &src.path, src.digest());
        let handed = hand_off_at(ctx, &serving, loopback, platform).await;
        serving.stop().await;
        // The blobs' fsyncs ran beside the engine's pull.
        self.store.synced().await;
        handed
    }

    /// After the reference points at the image: the download is done (its
    /// journal entry goes); record the upstream digest reference `from` and
    /// remove the loopback one, or leave that to a later reconcile when the
    /// upstream does not answer now.
    pub(super) async fn finish<E: Engine>(
        &self,
        ctx: &Ctx<'_, E>,
        intent: &PullIntent,
        c: &Candidate,
        from: &str,
        handed: Handed,
    ) {
        let up = Upstream {
            from: from.to_owned(),
            registry: c.registry.clone(),
            platform: handed.platform.clone(),
            loopback: handed.loopback.clone(),
            imported: false,
        };
        let tagged = intent.tag_ref.is_some();
        let done = record_upstream(ctx, &handed.image, &up, tagged).await;
        let (journal, key, image) = (self.journal.clone(), intent.key.clone(), handed.image);
        off_loop(move || {
            journal.best_effort(|e| {
                e.downloads.remove(&key);
                if done {
                    e.upstream.remove(&image);
                } else {
                    e.upstream.insert(image, up);
                }
            });
        })
        .await;
    }

    /// At the start of a transfer phase: record the upstream digest
    /// references that earlier hand-offs could not (an image gone since is
    /// forgotten).
    pub(super) async fn catch_up<E: Engine>(&self, ctx: &Ctx<'_, E>, observed: &Observed) {
        let journal = self.journal.clone();
        let pending = off_loop(move || journal.read().upstream).await;
        for (image, up) in pending {
            let present = observed.images.iter().find(|i| i.id == image);
            let done = match present {
                None => true,
                Some(img) if img.repo_digests.contains(&up.from) => {
                    remove_loopback(ctx, img, &up.loopback).await;
                    true
                }
                // An imported image's loopback reference is its digest's
                // only record until the upstream one is there.
                Some(img) => {
                    let tagged = !img.repo_tags.is_empty() && !up.imported;
                    record_upstream(ctx, &image, &up, tagged).await
                }
            };
            if done {
                let journal = self.journal.clone();
                off_loop(move || journal.best_effort(|e| drop(e.upstream.remove(&image)))).await;
            }
        }
    }

    /// Keep what unfinished downloads need and, of complete blobs, up to
    /// `cache_max`; drop the rest (not in a dry run). Returns the blobs
    /// `(digest, size)` unfinished downloads need, which `[storage]` must
    /// not shrink either.
    pub(super) async fn gc(&self, policy: &Policy, now: i64, dry_run: bool) -> Vec<(String, u64)> {
        let keys: HashSet<String> = policy.prepull.iter().map(|p| p.key()).collect();
        let (journal, store, max) = (
            self.journal.clone(),
            self.store.clone(),
            policy.daemon.cache_max,
        );
        off_loop(move || {
            if dry_run {
                return journal.read().prune(&keys, now);
            }
            let needed = journal.update(|e| e.prune(&keys, now)).unwrap_or_else(|e| {
                tracing::warn!("cannot update the downloads journal: {e}");
                journal.read().prune(&keys, now)
            });
            let wanted: HashSet<String> = needed.iter().map(|(d, _)| d.clone()).collect();
            match store.gc(max, &wanted) {
                Ok(0) => {}
                Ok(n) => tracing::debug!("content store: {n} bytes freed"),
                Err(e) => tracing::warn!("content store: cannot free space: {e}"),
            }
            needed
        })
        .await
    }

    /// For `stowage plan`: how much of the download toward `top` that
    /// `key` began the store holds.
    pub(super) async fn downloaded(&self, key: &str, top: &str) -> Option<super::Downloaded> {
        let (journal, store) = (self.journal.clone(), self.store.clone());
        let (key, top) = (key.to_owned(), top.to_owned());
        off_loop(move || {
            let entries = journal.read();
            let d = entries.downloads.get(&key).filter(|d| d.top == top)?;
            super::Downloaded::of(d.blobs.iter().map(|(digest, size)| {
                let held = if store.has(digest) {
                    *size
                } else {
                    store.partial_len(digest).unwrap_or(0)
                };
                (*size, held)
            }))
        })
        .await
    }
}

/// Pull `up.from` (the manifest only: the layers are there), then remove
/// the loopback reference. When that fails, the loopback reference goes
/// anyway if a tag holds the image (removing the last reference would
/// delete it). `true` when nothing is left to do.
async fn record_upstream<E: Engine>(
    ctx: &Ctx<'_, E>,
    image: &str,
    up: &Upstream,
    tagged: bool,
) -> bool {
    let (pulled, _) = ctx
        .pull_quiet(&up.registry, &up.from, up.platform.as_deref())
        .await;
    let img = match ctx.engine.image(image).await {
        Ok(Some(img)) => img,
        Ok(None) => return true,
        Err(e) => {
            tracing::debug!("cannot inspect {image}: {e}");
            return false;
        }
    };
    if let Err(e) = &pulled {
        tracing::info!(
            "{}: the upstream digest reference is recorded later ({})",
            up.from,
            ctx.scrub(&e.to_string())
        );
        if tagged {
            remove_loopback(ctx, &img, &up.loopback).await;
        }
        return false;
    }
    remove_loopback(ctx, &img, &up.loopback).await;
    true
}

async fn remove_loopback<E: Engine>(ctx: &Ctx<'_, E>, img: &Image, loopback: &str) {
    let others = img.repo_tags.len() + img.repo_digests.iter().filter(|d| *d != loopback).count();
    if !img.repo_digests.iter().any(|d| d == loopback) || others == 0 {
        return;
    }
    if let Err(e) = ctx.engine.remove(loopback).await {
        tracing::warn!("cannot remove the loopback reference {loopback}: {e}");
    }
}

/// The name the engine pulls `digest` of `path` by from `serving`
/// (`127.0.0.1:PORT/<path>@<digest>`), which it keeps as a digest reference.
pub(super) fn loopback_ref(serving: &store::Serving, path: &str, digest: &str) -> String {
    format!("{}/{path}@{digest}", serving.addr)
}

/// The hand-off itself: the engine pulls `loopback` from `serving`; `Ok`
/// once the engine lists an image for exactly that digest reference. The
/// one way an image goes from the content store into the engine (pulls and
/// bundle imports).
pub(super) async fn hand_off_at<E: Engine>(
    ctx: &Ctx<'_, E>,
    serving: &store::Serving,
    loopback: String,
    platform: Option<&str>,
) -> Result<Handed, TransferError> {
    let addr = serving.addr.to_string();
    let (pulled, _) = ctx.pull_quiet(&addr, &loopback, platform).await;
    match pulled {
        Ok(()) => {}
        Err(TransferError::Interrupted) => return Err(TransferError::Interrupted),
        Err(e) => {
            return Err(TransferError::HandOff {
                loopback,
                source: Box::new(e),
            });
        }
    }
    let found = ctx
        .engine
        .image(&loopback)
        .await?
        .filter(|i| i.repo_digests.contains(&loopback));
    match found {
        Some(img) => Ok(Handed {
            image: img.id,
            loopback,
            platform: platform.map(str::to_owned),
        }),
        None => Err(TransferError::Verify(loopback)),
    }
}

/// The chain ids of the layers the engine holds that may be shared with
/// the image: all layers the observation has (with `[storage]`), and those
/// of the images of the same repository (a refresh shares most with them).
async fn held_chains<E: Engine>(
    ctx: &Ctx<'_, E>,
    observed: &Observed,
    intent: &PullIntent,
) -> HashSet<String> {
    let mut held: HashSet<String> = observed
        .layers
        .values()
        .flatten()
        .map(|l| l.chain_id.clone())
        .collect();
    let repository = intent
        .tag_ref
        .as_deref()
        .map(|t| split_tag(t).0)
        .unwrap_or_else(|| intent.reference.split('@').next().unwrap_or_default());
    let prefix = format!("{repository}:");
    let digest_prefix = format!("{repository}@");
    for img in &observed.images {
        let related = img.repo_tags.iter().any(|t| t.starts_with(&prefix))
            || img
                .repo_digests
                .iter()
                .any(|d| d.starts_with(&digest_prefix));
        if !related || observed.layers.contains_key(&img.id) {
            continue;
        }
        match ctx.engine.image_layers(&img.id).await {
            Ok(layers) => held.extend(layers.into_iter().map(|l| l.chain_id)),
            Err(e) => tracing::debug!("layers of {}: {e}", img.id),
        }
    }
    held
}

/// The progress of one image's download: blobs done plus those in flight.
struct Meter<'a> {
    tell: Option<super::OnProgress<'a>>,
    sums: Mutex<Sums>,
}

#[derive(Default)]
struct Sums {
    /// Bytes of blobs finished.
    finished: u64,
    /// Bytes of all blobs known so far.
    total: u64,
    /// Bytes held of each blob in flight, by digest.
    flight: HashMap<String, u64>,
}

impl Sums {
    fn done(&self) -> u64 {
        self.finished + self.flight.values().sum::<u64>()
    }
}

impl<'a> Meter<'a> {
    fn new(tell: Option<super::OnProgress<'a>>) -> Self {
        Meter {
            tell,
            sums: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sums> {
        self.sums.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, size: u64) {
        self.lock().total += size;
    }

    /// Bytes that will not come after all (layers the engine has).
    fn forget(&self, size: u64) {
        let mut g = self.lock();
        g.total = g.total.saturating_sub(size);
    }

    /// `digest` is `have` bytes along.
    fn moved(&self, digest: &str, have: u64) {
        let (done, total) = {
            let mut g = self.lock();
            g.flight.insert(digest.to_owned(), have);
            (g.done(), g.total)
        };
        self.show(done, total);
    }

    /// `digest` (of `size` bytes) is finished, or given up.
    fn done(&self, digest: &str, size: u64) {
        let (done, total) = {
            let mut g = self.lock();
            g.flight.remove(digest);
            g.finished += size;
            (g.done(), g.total)
        };
        self.show(done, total);
    }

    fn show(&self, done: u64, total: u64) {
        if let Some(tell) = self.tell {
            tell(PullProgress {
                done,
                total: Some(total),
            });
        }
    }
}
