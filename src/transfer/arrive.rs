//! The engine side of a bundle import: images whose blobs are all in the
//! content store go to the engine through the same hand-off as a pull
//! ([`hand_off_at`]: the engine pulls `127.0.0.1:PORT/<path>@<digest>` from
//! the store's loopback endpoint), and only once every one of them is there
//! and checked are the references tagged, all of them or none.
//!
//! A kill -9 at any point leaves the host's references as they were: every
//! loopback reference is journaled (`downloads.json`, `imports`) before its
//! pull, and the references with the images they named before the first
//! tag; the next import or reconcile ([`recover_imports`]) puts those
//! references back and removes the loopback ones (so an image the import
//! brought and never tagged goes again). An import holds `import.lock` in
//! `state_dir` for its run, so recovery never undoes a live one.
//!
//! Once committed (one journal write), each loopback reference becomes an
//! `upstream` entry: the image keeps it as the record of its digest (what
//! a `[[prepull]]` pin is checked against) until a reconcile can record the
//! upstream digest reference instead, as after a pull.

use std::collections::HashMap;

use futures_util::StreamExt as _;
use std::fs::File;
use std::path::Path;

use super::content::{Handed, hand_off_at, loopback_ref};
use super::downloads::{Import, Journal, Retag, Upstream};
use super::{Ctx, TransferError};
use crate::blocking::off_loop;
use crate::credentials::CredentialStore;
use crate::engine::{Engine, Image};
use crate::policy::Policy;
use crate::refs::{registry_of, split_tag};
use crate::store::{self, Descriptor, Store};

/// Held by an import for its whole run (`flock`).
const LOCK_FILE: &str = "import.lock";

/// One image of a bundle whose blobs are all in the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The full reference with its tag (`registry/repo:tag`).
    pub name: String,
    /// What the name resolved to where the bundle was made (index or
    /// manifest): the engine pulls this digest.
    pub top: Descriptor,
    /// The platform's image manifest (`== top` for one platform).
    pub manifest: Descriptor,
    /// The config's digest: the image id the engine must end up with.
    pub config: String,
    /// The platform to pick when `top` is an index.
    pub platform: Option<String>,
}

/// What [`arrive`] did, per name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arrived {
    /// Handed to the engine and tagged: `(name, image id)`.
    pub brought: Vec<(String, String)>,
    /// Already in the engine, only tagged now.
    pub tagged: Vec<(String, String)>,
    /// Already in the engine under that name: nothing done.
    pub present: Vec<(String, String)>,
    /// The `[[scan]]` verdicts of the images whose references moved.
    pub verdicts: Vec<crate::scan::Verdict>,
}

/// An import's hold on `state_dir`: one import at a time, and recovery
/// leaves a held one alone.
#[derive(Debug)]
pub struct ImportLock {
    _file: File,
}

impl ImportLock {
    /// Waits for another import in the same `state_dir` to finish. Blocking.
    pub fn take(state_dir: &Path) -> std::io::Result<ImportLock> {
        std::fs::create_dir_all(state_dir)?;
        let file = lock_file(state_dir)?;
        file.lock()?;
        Ok(ImportLock { _file: file })
    }

    /// `None` when another import holds it. Blocking.
    fn try_take(state_dir: &Path) -> std::io::Result<Option<ImportLock>> {
        let file = lock_file(state_dir)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ImportLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

fn lock_file(state_dir: &Path) -> std::io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join(LOCK_FILE))
}

/// Note an import before its blobs are copied: the store's garbage
/// collection keeps their partials for a re-run. Blocking.
pub fn note_import(
    policy: &Policy,
    _lock: &ImportLock,
    key: &str,
    blobs: Vec<(String, u64)>,
) -> std::io::Result<()> {
    let journal = Journal::new(&policy.daemon.state_dir);
    journal.update(|e| {
        let entry = e.imports.entry(key.to_owned()).or_insert_with(|| Import {
            since: chrono::Utc::now().timestamp(),
            ..Import::default()
        });
        entry.blobs = blobs;
    })
}

/// Forget an import that will not go on (refused after it was noted).
/// Blocking.
pub fn forget_import(policy: &Policy, _lock: &ImportLock, key: &str) {
    Journal::new(&policy.daemon.state_dir).best_effort(|e| drop(e.imports.remove(key)));
}

/// Undo what killed imports left in the engine: each reference they moved
/// back to the image it named before (or removed when it named none), then
/// their loopback references removed. Their blobs stay noted for a re-run.
/// A running import (its lock held) is left alone; so is everything when
/// `lock` is `None` and it cannot be taken. Returns what was undone, for
/// the log.
pub async fn recover_imports<E: Engine>(
    engine: &E,
    state_dir: &Path,
    lock: Option<&ImportLock>,
) -> Vec<String> {
    let journal = Journal::new(state_dir);
    let j = journal.clone();
    let pending: Vec<(String, Import)> = off_loop(move || j.read().imports)
        .await
        .into_iter()
        .filter(|(_, i)| !i.loopback.is_empty() || !i.retag.is_empty())
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    // Held for the recovery when the caller holds none.
    let _own = match lock {
        Some(_) => None,
        None => {
            let dir = state_dir.to_path_buf();
            match off_loop(move || ImportLock::try_take(&dir)).await {
                Ok(Some(l)) => Some(l),
                Ok(None) => return Vec::new(),
                Err(e) => {
                    tracing::warn!("cannot take {LOCK_FILE}: {e}; imports left to recover later");
                    return Vec::new();
                }
            }
        }
    };
    let mut undone = Vec::new();
    for (key, import) in pending {
        match roll_back(engine, &import.retag, &import.loopback).await {
            Ok(mut said) => {
                settle(&journal, &key).await;
                undone.append(&mut said);
            }
            Err(e) => tracing::warn!("cannot undo the interrupted import of {key} yet: {e}"),
        }
    }
    undone
}

/// Put `retag`'s references back as they were, then remove `loopback`
/// references still there. Never forced.
async fn roll_back<E: Engine>(
    engine: &E,
    retag: &[Retag],
    loopback: &[String],
) -> Result<Vec<String>, TransferError> {
    let mut said = Vec::new();
    let images = engine.list_images().await?;
    for r in retag.iter().rev() {
        if holder(&images, &r.reference) != Some(r.after.as_str()) {
            continue;
        }
        let back = match &r.before {
            Some(before) if images.iter().any(|i| &i.id == before) => {
                engine.tag(before, &r.reference).await?;
                format!("{} back to {}", r.reference, crate::fmt::short_id(before))
            }
            _ => {
                engine.remove(&r.reference).await?;
                format!("{} removed (it did not exist before)", r.reference)
            }
        };
        said.push(back);
    }
    let images = engine.list_images().await?;
    for l in loopback {
        if images.iter().any(|i| i.repo_digests.contains(l)) {
            engine.remove(l).await?;
            said.push(format!("{l} removed"));
        }
    }
    Ok(said)
}

fn holder<'a>(images: &'a [Image], reference: &str) -> Option<&'a str> {
    images
        .iter()
        .find(|i| i.repo_tags.iter().any(|t| t == reference))
        .map(|i| i.id.as_str())
}

/// Hand-offs at once (or `concurrency`, when that is higher): they cross
/// loopback only, so `concurrency`, which spares the uplink, does not hold
/// them down. The engine downloads a shared base once and extracts the
/// images' own layers side by side.
const HAND_OFFS: usize = 8;

/// Hand every image of `arrivals` that the engine lacks to it from the
/// content store, check each is the image the bundle names, then tag every
/// name, all or none. On `Err` the engine's references are as they were
/// (loopback references made removed). `key`: the bundle's digest, noted
/// by [`note_import`] under the same `lock`.
pub async fn arrive<E: Engine>(
    engine: &E,
    policy: &Policy,
    shutdown: &tokio_util::sync::CancellationToken,
    _lock: &ImportLock,
    key: &str,
    arrivals: &[Arrival],
) -> Result<Arrived, TransferError> {
    let dir = policy.daemon.cache_dir.clone();
    let store = off_loop(move || Store::open(&dir)).await?;
    let journal = Journal::new(&policy.daemon.state_dir);
    let creds = CredentialStore::default();
    let ctx = Ctx {
        engine,
        creds: &creds,
        creds_error: None,
        stall: policy.daemon.stall_timeout,
        shutdown,
        progress: None,
        content: None,
        scan: None,
    };
    let images = engine.list_images().await?;
    let have: HashMap<&str, &Image> = images.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut out = Arrived::default();
    let mut to_pull: Vec<&Arrival> = Vec::new();
    for a in arrivals {
        if !have.contains_key(a.config.as_str()) && !to_pull.iter().any(|p| p.config == a.config) {
            to_pull.push(a);
        }
    }

    let mut handed: Vec<Handed> = Vec::new();
    if !to_pull.is_empty() {
        let serving = store::serve(store.clone(), shutdown).await?;
        let names: Vec<String> = to_pull
            .iter()
            .map(|a| loopback_ref(&serving, &api_path_of(&a.name), &a.top.digest))
            .collect();
        let noted = names.clone();
        journaled(&journal, key, move |i| i.loopback.extend(noted)).await?;
        // Several at once, as the engine pulls: images sharing a base fetch
        // it once, and layers decompress on every core.
        // Futures of a plain `async fn` collected first: closures returning
        // async blocks trip `Send` inference for the daemon's spawn.
        let pulls: Vec<_> = to_pull
            .iter()
            .zip(names.iter().cloned())
            .map(|(a, loopback)| hand_off_one(&ctx, &serving, a, loopback))
            .collect();
        let results: Vec<Result<Handed, TransferError>> = futures_util::stream::iter(pulls)
            .buffered(HAND_OFFS.max(policy.daemon.concurrency))
            .collect()
            .await;
        let mut failed = None;
        for (a, r) in to_pull.iter().zip(results) {
            match r {
                Ok(h) if h.image == a.config => handed.push(h),
                Ok(h) => {
                    failed.get_or_insert(TransferError::Config(format!(
                        "{}: the engine made image {} of it, the bundle names {}",
                        a.name, h.image, a.config
                    )));
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        serving.stop().await;
        // The blobs' fsyncs ran beside the engine's pulls.
        store.synced().await;
        if let Some(e) = failed {
            // Every name journaled: a pull that failed here may still have
            // left its image.
            undo(engine, &journal, key, &[], &names).await;
            return Err(e);
        }
    }

    // Tags last: the images named now, noted before the first tag.
    let images = engine.list_images().await?;
    let mut retag = Vec::new();
    for a in arrivals {
        let before = holder(&images, &a.name).map(str::to_owned);
        if before.as_deref() == Some(a.config.as_str()) {
            out.present.push((a.name.clone(), a.config.clone()));
            continue;
        }
        retag.push(Retag {
            reference: a.name.clone(),
            before,
            after: a.config.clone(),
        });
    }
    let loopbacks = handed_refs(&handed);
    // Admission before any reference moves: a blocked image this import
    // brought goes with its loopback reference, the references stay.
    match admit(engine, policy, shutdown, &retag).await {
        Ok(mut verdicts) => out.verdicts.append(&mut verdicts),
        Err(why) => {
            undo(engine, &journal, key, &[], &loopbacks).await;
            return Err(TransferError::Blocked(why));
        }
    }
    let noted = retag.clone();
    if let Err(e) = journaled(&journal, key, move |i| i.retag = noted).await {
        undo(engine, &journal, key, &[], &loopbacks).await;
        return Err(e);
    }
    for (n, r) in retag.iter().enumerate() {
        if let Err(e) = engine.tag(&r.after, &r.reference).await {
            undo(engine, &journal, key, &retag[..n], &loopbacks).await;
            return Err(e.into());
        }
    }

    // Commit: one journal write turns the import into upstream references
    // to record later.
    let ups: Vec<(String, Upstream)> = handed
        .iter()
        .zip(&to_pull)
        .map(|(h, a)| {
            let repository = split_tag(&a.name).0;
            (
                h.image.clone(),
                Upstream {
                    from: format!("{repository}@{}", a.top.digest),
                    registry: registry_of(repository).to_owned(),
                    platform: h.platform_name().map(str::to_owned),
                    loopback: h.loopback.clone(),
                    imported: true,
                },
            )
        })
        .collect();
    let (j, k) = (journal.clone(), key.to_owned());
    let committed = off_loop(move || {
        j.update(|e| {
            e.imports.remove(&k);
            e.upstream.extend(ups);
        })
    })
    .await;
    if let Err(e) = committed {
        undo(engine, &journal, key, &retag, &loopbacks).await;
        return Err(TransferError::Unusable(format!(
            "cannot record the import in the downloads journal: {e}"
        )));
    }
    for r in retag {
        let pulled = to_pull.iter().any(|a| a.config == r.after);
        let entry = (r.reference, r.after);
        if pulled {
            out.brought.push(entry);
        } else {
            out.tagged.push(entry);
        }
    }
    Ok(out)
}

async fn hand_off_one<E: Engine>(
    ctx: &Ctx<'_, E>,
    serving: &store::Serving,
    a: &Arrival,
    loopback: String,
) -> Result<Handed, TransferError> {
    let platform = (a.top != a.manifest || a.platform.is_some()).then(|| {
        a.platform
            .clone()
            .unwrap_or_else(super::layers::host_platform)
    });
    hand_off_at(ctx, serving, loopback, platform.as_deref()).await
}

fn handed_refs(handed: &[Handed]) -> Vec<String> {
    handed.iter().map(|h| h.loopback.clone()).collect()
}

/// `Err` when the journal cannot be written: the step it guards is not taken.
async fn journaled(
    journal: &Journal,
    key: &str,
    change: impl FnOnce(&mut Import) + Send + 'static,
) -> Result<(), TransferError> {
    let (j, k) = (journal.clone(), key.to_owned());
    off_loop(move || {
        j.update(|e| {
            let entry = e.imports.entry(k).or_insert_with(|| Import {
                since: chrono::Utc::now().timestamp(),
                ..Import::default()
            });
            change(entry);
        })
    })
    .await
    .map_err(|e| TransferError::Unusable(format!("cannot write the downloads journal: {e}")))
}

/// Undo a failed import now; what cannot be undone stays journaled for
/// [`recover_imports`].
async fn undo<E: Engine>(
    engine: &E,
    journal: &Journal,
    key: &str,
    retag: &[Retag],
    loopback: &[String],
) {
    match roll_back(engine, retag, loopback).await {
        Ok(_) => settle(journal, key).await,
        Err(e) => tracing::warn!("cannot undo the import of {key} now ({e}): at the next start"),
    }
}

/// The repository of `name` as a registry's API names it.
fn api_path_of(name: &str) -> String {
    super::layers::api_path(split_tag(name).0)
}

/// The policy's `[[scan]]` rules on every image a reference moves to (no
/// verdict cache outside the daemon's state: an import scans, as `stowage
/// pull` does); `Err` says which blocked, or why the checks could not run.
async fn admit<E: Engine>(
    engine: &E,
    policy: &Policy,
    shutdown: &tokio_util::sync::CancellationToken,
    retag: &[Retag],
) -> Result<Vec<crate::scan::Verdict>, String> {
    if policy.scan.is_empty() {
        return Ok(Vec::new());
    }
    let admission = crate::scan::Admission::new(
        engine,
        policy,
        std::collections::BTreeMap::new(),
        shutdown.clone(),
    );
    let arrivals: Vec<(String, String)> = retag
        .iter()
        .filter(|r| admission.in_scope(&r.reference))
        .map(|r| (r.reference.clone(), r.after.clone()))
        .collect();
    let verdicts = crate::scan::admit(&admission, &arrivals)
        .await
        .map_err(|e| format!("admission checks could not run: {e}; nothing tagged"))?;
    if let Some(v) = crate::scan::blocking(&verdicts) {
        return Err(format!(
            "{} blocked by scan {:?}: {}; nothing tagged",
            v.reference, v.rule, v.reason
        ));
    }
    Ok(verdicts)
}

/// An import's references are as before again: nothing left to undo.
async fn settle(journal: &Journal, key: &str) {
    let (j, k) = (journal.clone(), key.to_owned());
    off_loop(move || {
        j.best_effort(|e| {
            if let Some(i) = e.imports.get_mut(&k) {
                i.loopback.clear();
                i.retag.clear();
            }
        });
    })
    .await;
}
