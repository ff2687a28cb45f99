//! `index.json` (the OCI index of complete images) and garbage collection.
//!
//! Each entry is the top descriptor of an image (what its reference
//! resolved to: an index or a manifest) with the annotations
//! `org.opencontainers.image.ref.name` and `io.containerd.image.name` (the
//! canonical reference, as bundles carry them) and [`MANIFEST_ANNOTATION`]
//! (the platform's image manifest). Rewrites are atomic and serialised (a
//! mutex in the process, a `flock` between processes).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::state::{sync_dir, write_atomic};

use super::partial::{Partial, is_hex_name};
use super::{Descriptor, Store, StoreError, io};

pub(super) const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The platform's image manifest of an entry whose top is an index.
pub(super) const MANIFEST_ANNOTATION: &str = "io.stowage.manifest";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Manifests and indexes larger than this are not parsed (the registry
/// client refuses them too).
pub(super) const MANIFEST_MAX: u64 = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Entry>,
    /// Whatever else a tool wrote: kept.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    desc: Descriptor,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl Entry {
    fn name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }

    fn manifest(&self) -> &str {
        self.annotations
            .get(MANIFEST_ANNOTATION)
            .map_or(&self.desc.digest, String::as_str)
    }
}

fn empty() -> Index {
    Index {
        schema_version: 2,
        media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
        manifests: Vec::new(),
        other: serde_json::Map::new(),
    }
}

pub(super) fn write_empty(store: &Store) -> Result<(), StoreError> {
    write(store, &empty())
}

fn write(store: &Store, index: &Index) -> Result<(), StoreError> {
    let path = store.index_path();
    let bytes = serde_json::to_vec_pretty(index).expect("an index always serializes");
    write_atomic(&path, &bytes).map_err(|e| io("cannot write", &path, e))
}

/// The index; a corrupt one counts as empty (it only lists what the blobs
/// hold) and is replaced by the next rewrite.
fn read(store: &Store) -> Index {
    let path = store.index_path();
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{} is corrupt ({e}): starting it again", path.display());
            empty()
        }),
        Err(_) => empty(),
    }
}

/// Runs `change` on the index under both locks, then rewrites it.
fn update(store: &Store, change: impl FnOnce(&mut Index)) -> Result<(), StoreError> {
    let _in_process = store.index.lock().unwrap_or_else(|e| e.into_inner());
    let lock_path = store.root.join("partial/index.lock");
    let lock = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io("cannot open", &lock_path, e))?;
    lock.lock().map_err(|e| io("cannot lock", &lock_path, e))?;
    let mut index = read(store);
    change(&mut index);
    write(store, &index)
}

/// The blobs a manifest or index names (config and layers, or manifests);
/// `None` when the bytes are not one.
pub(super) fn children(bytes: &[u8]) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Digest {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Parts {
        config: Option<Digest>,
        #[serde(default)]
        layers: Vec<Digest>,
        #[serde(default)]
        manifests: Vec<Digest>,
    }
    let parts: Parts = serde_json::from_slice(bytes).ok()?;
    Some(
        parts
            .config
            .into_iter()
            .chain(parts.layers)
            .chain(parts.manifests)
            .map(|d| d.digest)
            .collect(),
    )
}

/// The first blob of the image that the store lacks: the top, the
/// platform's manifest, its config or one of its layers.
fn missing(store: &Store, top: &str, manifest: &str) -> Option<String> {
    for d in [top, manifest] {
        if !store.has(d) {
            return Some(d.to_owned());
        }
    }
    let Ok(path) = store.blob_path(manifest) else {
        return Some(manifest.to_owned());
    };
    let small = fs::metadata(&path).is_ok_and(|m| m.len() <= MANIFEST_MAX);
    let children = small
        .then(|| fs::read(&path).ok())
        .flatten()
        .and_then(|b| children(&b));
    match children {
        Some(blobs) => blobs.into_iter().find(|d| !store.has(d)),
        None => Some(manifest.to_owned()),
    }
}

pub(super) fn add_image(
    store: &Store,
    name: &str,
    top: &Descriptor,
    manifest: &Descriptor,
) -> Result<(), StoreError> {
    if let Some(missing) = missing(store, &top.digest, &manifest.digest) {
        return Err(StoreError::Incomplete {
            name: name.to_owned(),
            missing,
        });
    }
    update(store, |index| {
        // A reference names one top: a moved tag replaces its old entry; the
        // same top for another platform is an entry of its own.
        index.manifests.retain(|e| {
            e.name() != Some(name)
                || (e.desc.digest == top.digest && e.manifest() != manifest.digest)
        });
        let mut annotations = BTreeMap::new();
        annotations.insert(REF_NAME.to_owned(), name.to_owned());
        annotations.insert(CONTAINERD_NAME.to_owned(), name.to_owned());
        annotations.insert(MANIFEST_ANNOTATION.to_owned(), manifest.digest.clone());
        index.manifests.push(Entry {
            desc: top.clone(),
            annotations,
            other: serde_json::Map::new(),
        });
    })
}

/// A complete blob on disk.
pub(super) struct Blob {
    pub hex: String,
    pub size: u64,
    pub used: SystemTime,
}

/// The complete blobs in `dir`.
pub(super) fn blobs(dir: &Path) -> Vec<Blob> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let hex = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().ok().filter(fs::Metadata::is_file)?;
            is_hex_name(&hex).then(|| Blob {
                hex,
                size: meta.len(),
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })
        })
        .collect()
}

pub(super) fn gc(
    store: &Store,
    cache_max: u64,
    wanted: &HashSet<String>,
) -> Result<u64, StoreError> {
    let wants = |hex: &str| wanted.contains(&format!("sha256:{hex}"));
    let mut freed = 0;
    let partial_dir = store.partial_dir();
    for (hex, _) in super::partial::sizes(&partial_dir) {
        if wants(&hex) {
            continue;
        }
        // A download in flight holds its lock: it stays.
        match Partial::try_open(&partial_dir, &hex, false) {
            Ok(Some(p)) => match p.remove() {
                Ok(n) => freed += n,
                Err(e) => return Err(io("cannot remove", &partial_dir.join(&hex), e)),
            },
            Ok(None) => {}
            Err(e) => return Err(io("cannot open", &partial_dir.join(&hex), e)),
        }
    }
    let blobs_dir = store.blobs_dir();
    let mut blobs = blobs(&blobs_dir);
    let mut total: u64 = blobs.iter().map(|b| b.size).sum();
    // Least recently used first; by name among equals, so the order is stable.
    blobs.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.hex.cmp(&b.hex)));
    let mut removed = false;
    for blob in &blobs {
        if total <= cache_max {
            break;
        }
        if wants(&blob.hex) {
            continue;
        }
        let path = blobs_dir.join(&blob.hex);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &path, e)),
        }
        total -= blob.size;
        freed += blob.size;
        removed = true;
    }
    if removed {
        sync_dir(&blobs_dir).map_err(|e| io("cannot sync", &blobs_dir, e))?;
    }
    let stale = read(store)
        .manifests
        .iter()
        .any(|e| missing(store, &e.desc.digest, e.manifest()).is_some());
    if stale {
        update(store, |index| {
            index
                .manifests
                .retain(|e| missing(store, &e.desc.digest, e.manifest()).is_none());
        })?;
    }
    Ok(freed)
}

/// The images `index.json` lists: `(reference, top digest, manifest digest)`.
#[cfg(test)]
pub(super) fn images(store: &Store) -> Vec<(String, String, String)> {
    read(store)
        .manifests
        .iter()
        .map(|e| {
            (
                e.name().unwrap_or_default().to_owned(),
                e.desc.digest.clone(),
                e.manifest().to_owned(),
            )
        })
        .collect()
}
