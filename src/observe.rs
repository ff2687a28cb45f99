//! What the engine shows, gathered once per reconcile: images and
//! containers, plus layers, the data root's filesystem, the build cache and
//! the content store's bytes when `[storage]` is set; and the state's notes
//! of what was seen.
//!
//! A reconcile observes once and keeps the observation current from what
//! each of its actions did ([`Observed::removed`], [`Observed::tagged`]),
//! rather than listing the engine again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::blocking::off_loop;
use crate::engine::{Container, Engine, EngineError, EngineKind, Image, Layer, Removed};
use crate::policy::Policy;
use crate::state::State;
use crate::store::{Store, StoreError};

/// Layers per image id (Fx-hashed: the keys are engine ids, not input an
/// attacker picks).
pub type LayerMap = FxHashMap<String, Vec<Layer>>;

/// What the engine showed: the input of a plan besides policy, state and time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    /// Docker or Podman: how its names match a policy's globs.
    pub engine: EngineKind,
    pub images: Vec<Image>,
    pub containers: Vec<Container>,
    /// Layers per image id; gathered only when `[storage]` is set. Images
    /// without an entry count as one layer of their size.
    #[serde(skip)]
    pub layers: LayerMap,
    /// The filesystem holding the engine's data root, when on this host.
    pub disk: Option<Disk>,
    /// Why `disk` is unknown, for the plan and status.
    pub disk_error: Option<String>,
    /// Build cache bytes; gathered only with `build_cache_max`.
    pub build_cache: Option<u64>,
    /// The content store's bytes; gathered only when `[storage]` is set and
    /// `cache_dir` exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// Why the content store could not be read (it is then not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_error: Option<String>,
    /// Blobs `(digest, size)` of downloads into the content store not
    /// finished yet: set by the transfer phase before [`add_storage`], so
    /// that shrinking the store under pressure keeps them.
    #[serde(skip)]
    pub downloading: Vec<(String, u64)>,
}

impl Observed {
    /// What a removal did, as the engine answered it: untagged references
    /// leave their image, deleted images leave the observation.
    pub fn removed(&mut self, removed: &Removed) {
        for img in &mut self.images {
            img.repo_tags.retain(|t| !removed.untagged.contains(t));
            img.repo_digests.retain(|d| !removed.untagged.contains(d));
        }
        if !removed.deleted.is_empty() {
            self.images.retain(|i| !removed.deleted.contains(&i.id));
            self.layers.retain(|id, _| !removed.deleted.contains(id));
        }
    }

    /// `reference` now names `image` (and no other image).
    pub fn tagged(&mut self, image: &str, reference: &str) {
        for img in &mut self.images {
            img.repo_tags.retain(|t| t != reference);
            if img.id == image {
                img.repo_tags.push(reference.to_owned());
            }
        }
    }

    /// Image count and their summed sizes (shared layers counted per image,
    /// as `docker images` shows them): the metrics gauges.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.images.len() as u64,
            self.images.iter().map(|i| i.size).sum(),
        )
    }
}

/// The filesystem holding the engine's data root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    pub path: String,
    pub total: u64,
    pub available: u64,
}

impl Disk {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }
}

/// The content store under `cache_dir`, as `[storage]` counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Cache {
    /// Complete, verified blobs: copies of what the engine holds, or
    /// downloads not handed over yet.
    pub complete: u64,
    /// Partial downloads.
    pub partial: u64,
    /// Of `complete`, the bytes unfinished downloads need
    /// ([`Observed::downloading`]): never shrunk.
    pub pinned: u64,
    /// On the filesystem of the engine's data root: its bytes are part of
    /// that filesystem's used bytes, so shrinking it counts toward the
    /// watermarks. Known only when `disk` is.
    pub on_data_root: bool,
}

/// Observe the engine: one image listing and one container listing, whatever
/// the number of images.
pub async fn observe<E: Engine>(engine: &E) -> Result<Observed, EngineError> {
    let (images, containers) = tokio::try_join!(engine.list_images(), engine.list_containers())?;
    Ok(Observed {
        engine: engine.kind(),
        images,
        containers,
        ..Observed::default()
    })
}

/// Observe everything the policy needs: images and containers, plus layers,
/// the data root's filesystem and the build cache when `[storage]` is set.
/// Notes first-seen times in `state` (off the async threads; if this future
/// is dropped mid-way, `state` may be left empty).
pub async fn observe_for<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &mut State,
    at: i64,
) -> Result<Observed, EngineError> {
    let observed = observe(engine).await?;
    let (noted_state, mut observed) = noted(std::mem::take(state), observed, at).await;
    *state = noted_state;
    add_storage(engine, policy, state, &mut observed).await?;
    Ok(observed)
}

/// Add what `[storage]` needs to an observation: layers (from the state's
/// cache; new ones are added to it), the data root's filesystem, the build
/// cache, the content store's bytes. Nothing without `[storage]`. A content
/// store that cannot be read is said in `cache_error`, not an error.
pub async fn add_storage<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &mut State,
    observed: &mut Observed,
) -> Result<(), EngineError> {
    let Some(storage) = &policy.storage else {
        return Ok(());
    };
    // Owned ids, and no borrow of `state` across an await: the future must
    // stay `Send` for the daemon's spawned reconcile.
    let ids: Vec<String> = observed.images.iter().map(|i| i.id.clone()).collect();
    for id in ids {
        let cached: Vec<Layer> = match state.images.get(&id) {
            Some(s) => s.layers.clone(),
            None => Vec::new(),
        };
        let layers = if cached.is_empty() {
            match engine.image_layers(&id).await {
                Ok(l) => {
                    if let Some(s) = state.images.get_mut(&id) {
                        s.layers.clone_from(&l);
                    }
                    l
                }
                // Removed meanwhile: it counts as one pseudo-layer this time.
                Err(EngineError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        } else {
            cached
        };
        observed.layers.insert(id, layers);
    }
    if storage.high_watermark.is_some() {
        let info = engine.info().await?;
        if !engine.is_local() {
            observed.disk_error = Some(format!(
                "the engine is not on this host, so its data root {} cannot be measured here",
                info.data_root
            ));
        } else {
            match rustix::fs::statvfs(info.data_root.as_str()) {
                Ok(st) => {
                    observed.disk = Some(Disk {
                        path: info.data_root.clone(),
                        total: st.f_blocks.saturating_mul(st.f_frsize),
                        available: st.f_bavail.saturating_mul(st.f_frsize),
                    });
                }
                Err(e) => {
                    observed.disk_error = Some(format!(
                        "the engine's data root {} is not readable on this host ({e}); is the engine in another mount namespace or on another machine?",
                        info.data_root
                    ));
                }
            }
        }
    }
    if storage.build_cache_max.is_some() {
        observed.build_cache = Some(engine.disk_usage().await?.build_cache_size);
    }
    let dir = policy.daemon.cache_dir.clone();
    let downloading = observed.downloading.clone();
    let data_root = observed.disk.as_ref().map(|d| PathBuf::from(&d.path));
    match off_loop(move || cache_of(&dir, &downloading, data_root.as_deref())).await {
        Ok(cache) => observed.cache = cache,
        Err(e) => {
            let why = format!("content store not counted: {e}");
            tracing::warn!("{why}");
            observed.cache_error = Some(why);
        }
    }
    Ok(())
}

/// The content store in `dir` as `[storage]` counts it (blocking); `None`
/// when there is none yet (nothing is created for a look).
fn cache_of(
    dir: &Path,
    downloading: &[(String, u64)],
    data_root: Option<&Path>,
) -> Result<Option<Cache>, StoreError> {
    if !dir.exists() {
        return Ok(None);
    }
    let store = Store::open(dir)?;
    let usage = store.usage();
    let mut seen = HashSet::new();
    let pinned = downloading
        .iter()
        .filter(|(digest, _)| seen.insert(digest.as_str()) && store.has(digest))
        .map(|(_, size)| size)
        .sum();
    Ok(Some(Cache {
        complete: usage.complete,
        partial: usage.partial,
        pinned,
        on_data_root: data_root.is_some_and(|root| same_filesystem(dir, root)),
    }))
}

/// Whether two paths are on one filesystem (the same device); unknown is no.
fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (rustix::fs::stat(a), rustix::fs::stat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev,
        _ => false,
    }
}

/// Update the state with what is on the host now (first-seen times), and
/// forget images that are gone.
fn note_observed(state: &mut State, observed: &Observed, at: i64) {
    for img in &observed.images {
        state.observe(&img.id, img.created, at);
    }
    state.retain_images(observed.images.iter().map(|i| i.id.as_str()));
    state.initialized = true;
}

/// Update the state with what is on the host now (first-seen times) and
/// forget images that are gone, off the async threads (a large store takes
/// a while).
pub async fn noted(mut state: State, observed: Observed, at: i64) -> (State, Observed) {
    off_loop(move || {
        note_observed(&mut state, &observed, at);
        (state, observed)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Descriptor;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn the_content_store_is_counted_as_it_is_and_none_is_created_for_a_look() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(cache_of(&cache, &[], None).unwrap(), None);
        assert!(!cache.exists(), "a look creates nothing");

        let store = Store::open(&cache).unwrap();
        let blob = vec![7u8; 1000];
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
        let desc = Descriptor {
            media_type: "application/octet-stream".into(),
            digest: digest.clone(),
            size: 1000,
        };
        store.put(&desc, &blob).unwrap();
        // Named twice by two downloads, and one not in the store yet.
        let downloading = [
            (digest.clone(), 1000),
            (digest, 1000),
            (format!("sha256:{}", "e".repeat(64)), 50),
        ];
        let seen = cache_of(&cache, &downloading, Some(dir.path())).unwrap();
        assert_eq!(
            seen,
            Some(Cache {
                complete: 1000,
                partial: 0,
                pinned: 1000,
                on_data_root: true,
            })
        );
        let elsewhere = cache_of(&cache, &[], Some(Path::new("/proc"))).unwrap();
        assert!(!elsewhere.unwrap().on_data_root, "another filesystem");
    }
}
